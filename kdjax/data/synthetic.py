"""Dataset `synthetic`: Gaussian classes grouped into superclasses, with a known covariance.

Made for the linear-model theory experiments of Nagarajan et al., "On student-teacher deviations
in distillation: does it pay to disobey?" (arXiv 2301.12923): class similarity (classes of one
superclass lie close together, so a teacher's non-target probabilities carry structure) and a
known covariance spectrum (distillation exaggerates gradient descent's bias toward the top
eigendirections).

Generative model, for classes c = 0..C-1, superclasses s = 0..S-1, dimension D:
  superclass(c) = floor(c * S / C)                          (contiguous blocks of classes)
  m_s  = separation * u_s,        u_s ~ uniform on the unit sphere in R^D
  mu_c = m_superclass(c) + class_separation * v_c,  v_c ~ uniform on the unit sphere
  lambda_i = i ** (-decay),  i = 1..D                       (decay = 0: isotropic, identity)
  x = mu_y + diag(sqrt(lambda)) z,  z ~ N(0, I_D)           (within-class covariance diag(lambda))
Labels are exactly balanced (y = index mod C, then permuted). Label noise, train split only: exactly
round(label_noise * n_train) examples chosen uniformly get a label drawn uniformly from the C - 1
other classes; `clean_label` keeps the original (equal to `label` on test). So the within-class
covariance has eigenvalues lambda along the coordinate axes, and the total covariance adds the
between-class part (rank <= C - 1).

Name syntax (the one way to choose parameters), e.g.
  `synthetic:classes=10,superclasses=2,dim=64,n_train=4000,n_test=2000,separation=4,
   class_separation=1.5,decay=0,label_noise=0.1,seed=0`
Omitted keys take the defaults of `SyntheticParams`. Every draw comes from
`np.random.RandomState([seed, stream])` (legacy streams are frozen by NumPy's compatibility
policy): stream 0 the means, 1 the train split, 2 the test split, 3 the label noise, so changing
n_test leaves the train split unchanged.

Examples: `vector` float32 [D], `label`, `clean_label` int in 0..C-1, `superclass` (of the clean
label) int in 0..S-1. `kdjax.data.load` returns `generate(params, split)` (labels as int32), without
TensorFlow; the TFDS builder of the same data is `kdjax.data.builders.Synthetic`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kdjax import _checks


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
  """Parameters of the superclass Gaussian data (see the module docstring for the model)."""
  classes: int = 10
  superclasses: int = 2
  dim: int = 64
  n_train: int = 4000
  n_test: int = 2000
  separation: float = 4.0
  class_separation: float = 1.5
  decay: float = 0.0
  label_noise: float = 0.0
  seed: int = 0

  def __post_init__(self):
    _checks.check_int("synthetic classes", self.classes, low=2)
    _checks.check_int("synthetic superclasses", self.superclasses, low=1, high=self.classes)
    _checks.check_int("synthetic dim", self.dim, low=1)
    _checks.check_int("synthetic n_train", self.n_train, low=1)
    _checks.check_int("synthetic n_test", self.n_test, low=1)
    _checks.check_int("synthetic seed", self.seed, low=0)
    _checks.check_range("synthetic separation", self.separation, low=0)
    _checks.check_range("synthetic class_separation", self.class_separation, low=0)
    _checks.check_range("synthetic decay", self.decay, low=0)
    _checks.check_range("synthetic label_noise", self.label_noise, low=0, high=1)

  @property
  def config_name(self) -> str:
    """A file-system safe name that identifies these parameters (the TFDS config name)."""
    return (f"c{self.classes}_s{self.superclasses}_d{self.dim}_tr{self.n_train}_te{self.n_test}"
            f"_sep{self.separation:g}_csep{self.class_separation:g}_decay{self.decay:g}"
            f"_noise{self.label_noise:g}_seed{self.seed}")


def parse(options: str) -> SyntheticParams:
  """Parses `key=value,key=value` (the part after `synthetic:`) into SyntheticParams."""
  fields = {f.name: f.type for f in dataclasses.fields(SyntheticParams)}
  kwargs = {}
  for item in filter(None, (s.strip() for s in options.split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in fields:
      raise ValueError(f"synthetic option {item!r} must be KEY=VALUE with KEY one of "
                       f"{', '.join(fields)}")
    kind = "an integer" if fields[key] == "int" else "a number"
    try:
      kwargs[key] = int(value) if fields[key] == "int" else float(value)
    except ValueError:
      raise ValueError(f"synthetic {key} must be {kind}, got {value.strip()!r}") from None
  return SyntheticParams(**kwargs)


def eigenvalues(params: SyntheticParams) -> np.ndarray:
  """Within-class covariance eigenvalues lambda_i = i ** (-decay), i = 1..D (descending)."""
  return np.arange(1, params.dim + 1, dtype=np.float64) ** (-float(params.decay))


def superclass_of(params: SyntheticParams) -> np.ndarray:
  """Superclass of each class, floor(c * S / C), shape [C]."""
  return np.arange(params.classes) * params.superclasses // params.classes


def class_means(params: SyntheticParams) -> np.ndarray:
  """Class means mu_c, shape [C, D] float64."""
  rng = np.random.RandomState([params.seed, 0])

  def unit(n):
    v = rng.standard_normal((n, params.dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)

  centres = params.separation * unit(params.superclasses)
  return centres[superclass_of(params)] + params.class_separation * unit(params.classes)


def generate(params: SyntheticParams, split: str) -> dict[str, np.ndarray]:
  """The split ('train' or 'test') as numpy arrays, exactly as the builder stores them."""
  _checks.check_choice("split", split, ("train", "test"))
  n = params.n_train if split == "train" else params.n_test
  rng = np.random.RandomState([params.seed, 1 if split == "train" else 2])
  clean = rng.permutation(np.arange(n) % params.classes)
  noise = rng.standard_normal((n, params.dim)) * np.sqrt(eigenvalues(params))
  vector = (class_means(params)[clean] + noise).astype(np.float32)
  label = clean.copy()
  if split == "train" and params.label_noise > 0:
    flip_rng = np.random.RandomState([params.seed, 3])
    flipped = flip_rng.choice(n, int(round(params.label_noise * n)), replace=False)
    # An offset in 1..C-1 modulo C is a uniform draw among the other classes.
    label[flipped] = (clean[flipped] + flip_rng.randint(1, params.classes, len(flipped))) \
        % params.classes
  return {"vector": vector, "label": label.astype(np.int64), "clean_label": clean.astype(np.int64),
          "superclass": superclass_of(params)[clean].astype(np.int64)}


def __getattr__(name: str):
  """The TFDS builder `Synthetic`, `SyntheticConfig` and `config_for` now live in
  kdjax.data.builders (which imports TFDS)."""
  if name in ("Synthetic", "SyntheticConfig", "config_for"):
    from kdjax.data import builders  # pylint: disable=g-import-not-at-top
    return getattr(builders, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
