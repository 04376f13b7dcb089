"""A study's replicas: the (arm, seed, teacher, alpha, temperature, ...) rows a stage trains.

A grid in the config (alpha, temperature, learning rate, KD windows) times `num_seeds`
becomes replicas of one stacked train state. Each replica's identity travels in checkpoint metadata
and every output file (`Replica.to_json`).

Models. A stage may hold several architectures or capacities (`model` a comma-separated list of
names, times the product of the `model_grid` keyword grids; likewise `teacher_model` and
`teacher_model_grid`): each replica names its model by a label ("cnn(width=0.5)"), and the
replicas of one model (and, for students, one teacher model) form a group that is one compiled
program (kdjax.study.Group). Students are expanded over the teacher models their arm needs:
  * arms initialised from their teacher pair with the teacher model equal to their own;
  * other arms with a teacher term pair with every teacher model;
  * arms with neither (onehot, label_smoothing, fresh siddo) are trained once per student model.

Ensembles. Arms that distil from a teacher ensemble (kdjax.arms, signal 'ensemble') learn from
every teacher of their teacher model by default. `ensembles` names compositions instead, each by
the augmentation preset of its members ("weak+weak,strong+weak,strong+strong": two-teacher
ensembles T1w+T2w, T1s+T2w, T1s+T2s of arXiv 2405.00739): member j of the ensemble of student
seed s is the teacher with that preset and seed (s * M + j) mod num_teachers (M members), so with
num_teachers = M every seed shares one set of teachers (the paper) and with num_teachers = k * M
seeds cycle over k independent sets. Such arms are expanded over the compositions; a replica's
`ensemble` lists its members, and its `teacher_augment` names the composition ("strong+weak").

Randomness: one root key per (stage, seed), split into named streams with `jax.random.fold_in`:

  replica_key(config_seed, stage, seed) = fold_in(fold_in(PRNGKey(config_seed), STAGE), seed)
  stream(replica_key, name)             = fold_in(replica_key, STREAM[name])
  streams: init, data (epoch order), augment, rcd (noise teachers), dropout

Student replicas with the same seed share their data order and augmentation across arms, so arms
are compared on paired data (SIDDO's order still differs from its teacher's, which comes from the
teacher stage's key). A student initialised from its teacher uses the teacher's `init` stream.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

import jax
import numpy as np

from kdjax import arms as arms_lib

STAGES = ("teacher", "students")
_STAGE_CODE = {"teacher": 1, "students": 2}
STREAMS = {"init": 1, "data": 2, "augment": 3, "rcd": 4, "dropout": 5}


@dataclasses.dataclass(frozen=True)
class Replica:
  """One trained model of a stage. `teacher` indexes the teacher stage's replicas (-1: none)."""
  index: int
  stage: str
  arm: str
  seed: int
  teacher: int
  alpha: float
  temperature: float
  learning_rate: float
  label_smoothing: float
  kd_start: int  # the steps between which the teacher term is on (kd_windows, in steps)
  kd_stop: int
  init: str  # 'teacher' | 'fresh'
  augment: str  # the augmentation preset of its training batches
  model: str = ""  # its model's label (ModelSpec.label); teachers' too
  teacher_model: str = ""  # its teacher's model label ("" without a teacher)
  teacher_augment: str = ""  # its teacher's augmentation preset, for arms that learn from one
  kd_window: str = ""  # its KD window as configured, "START-STOP" fractions ("" without one)
  ensemble: tuple[int, ...] = ()  # the teacher replicas it distils from as an ensemble
  # Its cohort (mutual learning): the student replicas, itself included, that learn from each
  # other on shared batches; () for other arms.
  cohort: tuple[int, ...] = ()
  # Its arm's loss weights from arm_options.ce_weight / kd_weight; None: the arm's default form
  # ((1 - alpha, alpha) for kd-like losses; kdjax.arms, "Loss weights").
  ce_weight: float | None = None
  kd_weight: float | None = None

  def to_json(self) -> dict[str, Any]:
    """The replica as JSON values (what a metadata file round-trips to: lists, not tuples); the
    cohort only for replicas that have one."""
    out = {**dataclasses.asdict(self), "ensemble": list(self.ensemble),
           "cohort": list(self.cohort)}
    if not self.cohort:
      del out["cohort"]
    return out

  @property
  def data_seed(self) -> int:
    """The seed of its data order and augmentation: its own, or its cohort's first member's
    (cohort members see the same batches; cohorts are consecutive seeds)."""
    return self.seed - self.cohort.index(self.index) if self.cohort else self.seed


def split_list(name: str, value) -> list:
  """The entries of a comma-separated string (stripped) or of a sequence. A blank string is
  no entries; an empty entry inside a list ("0.1,,0.5", a trailing comma) is refused, naming
  it: it is a typo, not a shorter list."""
  if isinstance(value, str):
    if not value.strip():
      return []
    items = [p.strip() for p in value.split(",")]
    if not all(items):
      raise ValueError(f"{name} has an empty entry (entry {items.index('') + 1} of "
                       f"{value!r}); write comma-separated entries without empty ones")
    return items
  if isinstance(value, (list, tuple)):
    return list(value)
  return [value]


def parse_grid(name: str, value) -> tuple[float, ...]:
  """One value or a grid: a number, a sequence, or a comma-separated string ("0.1,0.5,0.9") of
  finite numbers, none empty or repeated."""
  usage = f"{name} must be a number or a comma-separated list of finite numbers"
  grid = []
  for p in split_list(name, value):
    try:
      if isinstance(p, bool):
        raise TypeError
      v = float(p)
    except (TypeError, ValueError):
      raise ValueError(f"{usage}; {p!r} in {value!r} is not a number") from None
    if not np.isfinite(v):
      raise ValueError(f"{usage}; got {p!r} in {value!r}")
    if v in grid:
      raise ValueError(f"{name} lists {v:g} twice in {value!r}; every grid point is one value")
    grid.append(v)
  if not grid:
    raise ValueError(f"{usage}, e.g. '0.5' or '0.1,0.5,0.9'; got {value!r}")
  return tuple(grid)


def parse_names(name: str, value, allowed: Sequence[str]) -> tuple[str, ...]:
  """A comma-separated list of names, each in `allowed`, without repeats."""
  names = tuple(str(s).strip() for s in split_list(name, value))
  bad = [n for n in names if n not in allowed]
  if not names or bad:
    raise ValueError(f"{name} must be a comma-separated list of {', '.join(allowed)}; "
                     f"got {value!r}")
  if len(set(names)) != len(names):
    raise ValueError(f"{name} lists a name twice: {value!r}")
  return names


def parse_windows(name: str, value) -> tuple[tuple[float, float], ...]:
  """KD windows: a comma-separated string of START-STOP fractions of training
  ("0-1,0.5-1,0-0.5") or a sequence of (start, stop) pairs. The teacher term is on while
  start <= step / total_steps < stop, so "0.5-1" switches one-hot -> KD at half of training and
  "0-0.5" KD -> one-hot (the loss-switching experiment of arXiv 2301.12923). Each window needs
  0 <= start < stop <= 1; a window may not be listed twice."""
  items = split_list(name, value)
  usage = f"{name} must be comma-separated START-STOP fractions of training, e.g. '0-1,0.5-1'"
  windows = []
  for item in items:
    parts = item.split("-") if isinstance(item, str) else item
    try:
      start, stop = (float(p) for p in parts)
    except (TypeError, ValueError):
      raise ValueError(f"{usage}; got {value!r}") from None
    if not (0.0 <= start < stop <= 1.0):
      raise ValueError(f"{name} must hold windows with 0 <= START < STOP <= 1; got {item!r}")
    windows.append((start, stop))
  if not windows:
    raise ValueError(f"{usage}; got {value!r}")
  if len(set(windows)) != len(windows):
    raise ValueError(f"{name} lists a window twice: {value!r}")
  return tuple(windows)


def parse_arm_weights(name: str, value, allowed: Sequence[str]) -> dict[str, float]:
  """Per-arm loss weights: a comma-separated "ARM=WEIGHT" list ("ats=0.5,standardized_kd=9"),
  each ARM one of `allowed` (once) and each WEIGHT a finite number >= 0; "" = none."""
  weights: dict[str, float] = {}
  for item in (str(i).strip() for i in split_list(name, value)):
    arm, sep, number = item.partition("=")
    arm = arm.strip()
    try:
      weight = float(number) if sep else float("nan")
    except ValueError:
      weight = float("nan")
    if arm not in allowed or not np.isfinite(weight) or weight < 0:
      raise ValueError(f"{name} must be comma-separated ARM=WEIGHT pairs, ARM one of "
                       f"{', '.join(allowed)} and WEIGHT a number >= 0, e.g. "
                       f"'standardized_kd=0.1'; got {item!r}")
    if arm in weights:
      raise ValueError(f"{name} lists {arm} twice: {value!r}")
    weights[arm] = weight
  return weights


def arm_weights(config) -> tuple[dict[str, float], dict[str, float]]:
  """(ce_weight, kd_weight) per arm from `arm_options.ce_weight` / `kd_weight` (absent in configs
  written before them: no arm has weights). Only arms with a teacher term take weights."""
  allowed = tuple(a.name for a in arms_lib.ARMS.values() if a.teacher_signal != "none")
  options = config.arm_options
  return (parse_arm_weights("arm_options.ce_weight", options.get("ce_weight", ""), allowed),
          parse_arm_weights("arm_options.kd_weight", options.get("kd_weight", ""), allowed))


def window_label(window: tuple[float, float]) -> str:
  """"0.25-1": a window as Replica.kd_window and group names show it."""
  return f"{window[0]:g}-{window[1]:g}"


def parse_ensembles(name: str, value, presets: Sequence[str]) -> tuple[tuple[str, ...], ...]:
  """Ensemble compositions: a comma-separated list of '+'-joined augmentation presets, one per
  member ("weak+weak,strong+weak"), each preset one of `presets`; "" = none given (every teacher
  of the teacher model is a member)."""
  compositions = []
  for item in (str(i).strip() for i in split_list(name, value)):
    members = tuple(m.strip() for m in item.split("+"))
    if not all(members) or any(m not in presets for m in members):
      raise ValueError(f"{name} must be comma-separated ensembles written as the '+'-joined "
                       f"augmentation presets of their members, each one of the teachers' "
                       f"presets ({', '.join(presets)}), e.g. 'weak+weak,strong+weak'; "
                       f"got {item!r}")
    compositions.append(members)
  if len(set(compositions)) != len(compositions):
    raise ValueError(f"{name} lists an ensemble twice: {value!r}")
  return tuple(compositions)


def ensemble_members(group: Sequence[Replica], composition: Sequence[str], seed: int,
                     num_teachers: int) -> tuple[int, ...]:
  """The teacher indices of student seed `seed`'s ensemble (module docstring): member j has
  preset composition[j] and teacher seed (seed * M + j) mod num_teachers."""
  by_key = {(t.augment, t.seed): t.index for t in group}
  size = len(composition)
  return tuple(by_key[(preset, (seed * size + j) % num_teachers)]
               for j, preset in enumerate(composition))


def teacher_augments(config) -> tuple[str, ...]:
  """The teachers' augmentation presets: `teacher_augment` (a list) or else `augment`."""
  value = config.get("teacher_augment", "") or config.augment
  return tuple(s.strip() for s in value.split(",") if s.strip())


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """An architecture: a kdjax.models name and its keyword arguments."""
  name: str
  kwargs: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs, hashable

  @property
  def label(self) -> str:
    """"cnn(width=0.5)", or the bare name without keywords: the replicas' `model` field."""
    args = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.kwargs)
    return f"{self.name}({args})" if args else self.name

  def module(self, num_classes: int):
    from kdjax import models as models_lib  # pylint: disable=g-import-not-at-top
    return models_lib.get(self.name, num_classes=num_classes, **dict(self.kwargs))


def model_specs(names, kwargs, grid) -> tuple[ModelSpec, ...]:
  """Every name (a comma-separated string) times every point of the keyword grid (a mapping
  from a keyword to one value or a grid), over the fixed keywords `kwargs`."""
  grid = dict(grid or {})
  keys = sorted(grid)
  # Grid values are floats; whole numbers become ints (depths, block counts: models take ints).
  points = [dict(zip(keys, (int(v) if v.is_integer() else v for v in point)))
            for point in itertools.product(*(parse_grid(k, grid[k]) for k in keys))]
  specs = []
  for name in (str(n).strip() for n in split_list("model", names)):
    for point in points:
      merged = {**dict(kwargs), **point}
      # A sequence option (mlp's `hidden`) comes back from config.json as a list: a tuple keeps
      # the spec hashable and its label the same before and after the round trip.
      merged = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
      specs.append(ModelSpec(name, tuple(sorted(merged.items()))))
  return tuple(dict.fromkeys(specs))


def teacher_replicas(config, specs: Sequence[ModelSpec]) -> list[Replica]:
  """For each teacher model, num_teachers seeds for each preset of `teacher_augment`: teachers
  with the same seed share their initialisation and data order and differ only in augmentation
  (arXiv 2405.00739) or in model."""
  lr = parse_grid("optimizer.learning_rate", config.optimizer.learning_rate)[0]
  rows = []
  for spec in specs:
    for augment in teacher_augments(config):
      for seed in range(int(config.num_teachers)):
        rows.append(Replica(index=len(rows), stage="teacher", arm="teacher", seed=seed,
                            teacher=-1, alpha=0.0, temperature=1.0, learning_rate=lr,
                            label_smoothing=0.0, kd_start=0, kd_stop=0, init="fresh",
                            augment=augment, model=spec.label))
  return rows


def student_replicas(config, total_steps: int, specs: Sequence[ModelSpec],
                     teachers: Sequence[Replica]) -> list[Replica]:
  """Student models x arms x teacher models x grid points x seeds, in that order (see the module
  docstring for which teacher models an arm pairs with); the grid is alpha x temperature x
  learning rate x KD window. Arms without a teacher term ignore the alpha/temperature/window
  grids (one grid point each, recorded as alpha 0, temperature 1, no window). Other arms are
  expanded only over the grid axes their loss reads (`kdjax.arms.LossKind.grid`; alpha is not
  read by an arm with fixed weights): on an axis it does not read an arm is trained once, at the
  axis's first value, which its replicas record.
  Student seed s learns from the s mod n-th teacher of its teacher model (n of them); arms that
  learn from their own teacher are also expanded over the teachers' augmentation presets
  (`teacher_augment`), so that with presets none,strong every seed has a student of each, and
  arms that learn from an ensemble over the `ensembles` compositions (module docstring)."""
  arm_names = parse_names("arms", config.arms, tuple(arms_lib.ARMS))
  alphas = parse_grid("alpha", config.alpha)
  temperatures = parse_grid("temperature", config.temperature)
  lrs = parse_grid("optimizer.learning_rate", config.optimizer.learning_rate)
  windows = parse_windows("kd_windows", config.kd_windows)
  compositions = parse_ensembles("ensembles", config.get("ensembles", ""),
                                 teacher_augments(config))
  ce_weights, kd_weights = arm_weights(config)
  by_model: dict[str, list[Replica]] = {}
  for t in teachers:
    by_model.setdefault(t.model, []).append(t)
  rows = []
  for spec in specs:
    for arm_name in arm_names:
      arm = arms_lib.ARMS[arm_name]
      init = config.student_init if arm.init == "config" else arm.init
      has_teacher_term = arm.teacher_signal != "none"
      if init == "teacher":
        if spec.label not in by_model:
          raise ValueError(f"arm {arm_name} starts from its teacher's initial parameters, but no "
                           f"teacher model is {spec.label} (teachers: {', '.join(by_model)}); "
                           "set student_init='fresh' or make the models match")
        teacher_models = [by_model[spec.label]]
      elif has_teacher_term:
        teacher_models = list(by_model.values())
      else:
        teacher_models = [None]
      # One entry per teacher set the arm is trained against: (teachers, composition).
      teacher_sets = [(group, None) for group in teacher_models]
      if arm.reads == "teacher":
        # Teachers trained with different augmentation are different teachers to learn from
        # (arXiv 2510.12615: a heavily augmented teacher); other arms would train duplicates.
        teacher_sets = [([t for t in group if t.augment == preset], None)
                        for group in teacher_models
                        for preset in dict.fromkeys(t.augment for t in group)]
      elif arm.reads == "ensemble" and compositions:
        teacher_sets = [(group, c) for group in teacher_models for c in compositions]
      # The grid axes the arm's loss reads (kdjax.arms.LossKind.grid; an arm with fixed weights
      # does not read alpha); on the others it is trained once, recorded at the first value.
      reads = arms_lib.LOSS_KINDS[arm.loss].grid - ({"alpha"} if arm_name in ce_weights else set())
      grid = list(itertools.product(alphas if "alpha" in reads else alphas[:1],
                                    temperatures if "temperature" in reads else temperatures[:1],
                                    lrs, windows)) \
          if has_teacher_term else [(0.0, 1.0, lr, None) for lr in lrs]
      smoothing = float(config.arm_options.label_smoothing) \
          if arm_name == "label_smoothing" else 0.0
      cohort_size = int(config.arm_options.get("mutual_cohort", 2)) \
          if arm.teacher_signal == "peers" else 0
      for group, composition in teacher_sets:
        for alpha, temperature, lr, window in grid:
          start, stop = window or (0.0, 0.0)
          first = len(rows)  # the row of seed 0 at this grid point
          for seed in range(int(config.num_seeds)):
            cohort = () if not cohort_size else tuple(
                first + s for s in range(seed - seed % cohort_size,
                                         seed - seed % cohort_size + cohort_size))
            ensemble = ()
            if arm.reads == "ensemble":
              ensemble = tuple(t.index for t in group) if composition is None else \
                  ensemble_members(group, composition, seed, int(config.num_teachers))
            augment_label = "" if group is None else \
                group[0].augment if arm.reads == "teacher" else \
                "+".join(composition) if composition is not None else ""
            rows.append(Replica(
                index=len(rows), stage="students", arm=arm_name, seed=seed,
                teacher=-1 if group is None else ensemble[0] if composition is not None
                else group[seed % len(group)].index,
                alpha=alpha, temperature=temperature, learning_rate=lr,
                label_smoothing=smoothing, kd_start=int(round(start * total_steps)),
                kd_stop=int(round(stop * total_steps)), init=init, augment=config.augment,
                model=spec.label, teacher_model="" if group is None else group[0].model,
                teacher_augment=augment_label, ensemble=ensemble,
                kd_window="" if window is None else window_label(window),
                ce_weight=ce_weights.get(arm_name), kd_weight=kd_weights.get(arm_name),
                cohort=cohort))
  return rows


def replica_key(config_seed: int, stage: str, seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config_seed),
                                               _STAGE_CODE[stage]), seed)


def stream_keys(config_seed: int, replicas: Sequence[Replica], stream: str,
                teachers: Sequence[Replica] = ()) -> jax.Array:
  """[R, 2] raw keys of one named stream for every replica (the `init` stream of a student
  initialised from its teacher is that teacher's; `teachers` are the teacher stage's rows)."""
  keys = []
  for r in replicas:
    if stream == "init" and r.init == "teacher" and r.stage == "students":
      base = replica_key(config_seed, "teacher", teachers[r.teacher].seed)
    elif stream in ("data", "augment"):  # a cohort shares its first member's batches
      base = replica_key(config_seed, r.stage, r.data_seed)
    else:
      base = replica_key(config_seed, r.stage, r.seed)
    keys.append(jax.random.fold_in(base, STREAMS[stream]))
  return jax.numpy.stack(keys)


def hparams(replicas: Sequence[Replica],
            teacher_indices: Sequence[int] = ()) -> arms_lib.ReplicaHParams:
  """The stacked per-replica loss hyperparameters ([R] leaves). `teacher_slot` is the position
  of a replica's teacher in `teacher_indices` (the teacher replicas its program is given);
  `member_slots` / `member_weights` [R, M] those of its ensemble's members and 1/M each, or of
  its cohort's members in `replicas` (the program's own replicas) with 1/(K - 1) on each peer
  and 0 on itself."""
  column = lambda name, dtype: np.array([getattr(r, name) for r in replicas], dtype)
  position = {t: i for i, t in enumerate(teacher_indices)}
  local = {r.index: i for i, r in enumerate(replicas)}
  # Members padded to the largest ensemble or cohort: weight 0 on padding.
  size = max([len(r.ensemble) for r in replicas] + [len(r.cohort) for r in replicas] + [1])
  members = np.zeros((len(replicas), size), np.int32)
  weights = np.zeros((len(replicas), size), np.float32)
  for i, r in enumerate(replicas):
    if r.cohort:
      members[i, :len(r.cohort)] = [local[j] for j in r.cohort]
      weights[i, :len(r.cohort)] = [0.0 if j == r.index else 1.0 / (len(r.cohort) - 1)
                                    for j in r.cohort]
      continue
    members[i, :len(r.ensemble)] = [position[t] for t in r.ensemble]
    weights[i, :len(r.ensemble)] = 1.0 / max(len(r.ensemble), 1)
  fixed = [getattr(r, "ce_weight", None) is not None for r in replicas]
  return arms_lib.ReplicaHParams(
      alpha=column("alpha", np.float32), temperature=column("temperature", np.float32),
      label_smoothing=column("label_smoothing", np.float32),
      kd_start=column("kd_start", np.int32), kd_stop=column("kd_stop", np.int32),
      teacher_slot=np.array([position.get(r.teacher, 0) for r in replicas], np.int32),
      member_slots=members, member_weights=weights,
      ce_weight=np.array([r.ce_weight if f else 0.0 for r, f in zip(replicas, fixed)],
                         np.float32),
      kd_weight=np.array([r.kd_weight if f else 0.0 for r, f in zip(replicas, fixed)],
                         np.float32),
      fixed_weights=np.array(fixed, np.float32))
