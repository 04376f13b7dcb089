"""A study config, validated and resolved into what the stages run, in three steps.

  study = resolve(config)                # every key checked and typed; no devices, no data
  study = fit_devices(study, num_devices)  # the mesh of each group; MeshError says what fits
  study = load_data(study)               # the train and test splits, checked

`resolve` raises `ConfigError` naming the key and what is allowed (the CLI turns it into one line
on stderr and exit code 2); it returns a `Study`: the dataset spec and split sizes, the two
training stages with their models and replica tables, the loss options, and the typed run
settings (`RunSettings`). It reads the dataset once to count its examples (the steps per epoch
depend on them) through `_splits`, which keeps the last dataset's arrays, so `load_data` and a
sweep's repeated resolves do not read it again.

`fit_devices` is the only step that knows the devices: it checks that each group's replicas and
batches divide over the mesh (`config.mesh`, or per group `auto_mesh`) and raises `MeshError`, a
ConfigError carrying the meshes that would fit (`fits`). `load_data` checks the splits (shapes,
labels, finite inputs); the stages that read data call it (kdjax.main before anything is written,
kdjax.train and kdjax.analysis when they are called directly).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from kdjax import _checks
from kdjax import arms as arms_lib
from kdjax import configfile
from kdjax import data as data_lib
from kdjax import distributed
from kdjax import models as models_lib
from kdjax import optim
from kdjax import replicas as replicas_lib
from kdjax import stats
from kdjax.data import splits as splits_lib

ALL_STAGES = ("teacher", "students", "analysis")
EXECUTIONS = ("auto", "vmap", "unrolled", "blocked")


class ConfigError(ValueError):
  """An invalid config value: `key` is the dotted config key."""

  def __init__(self, key: str, message: str):
    super().__init__(f"--config.{key}: {message}")
    self.key = key
    self.message = message


class MeshError(ConfigError):
  """A study that does not fit the devices (`fit_devices`): `fits` lists the (replica, data)
  meshes over the same devices on which it would, largest replica axis first (empty: none)."""

  def __init__(self, key: str, message: str, fits: list[tuple[int, int]]):
    super().__init__(key, message)
    self.fits = fits


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """How a study runs, not what it studies: the run keys of the config, typed once by `resolve`
  (README, "Writing a config"). `steps_per_call` 0 and `replicas_per_block` 0 mean "choose"
  (kdjax.engine); configs written before a key existed get the value they ran with."""
  seed: int
  batch_size: int
  eval_batch_size: int
  eval_every_steps: int
  log_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  execution: str
  replicas_per_block: int = 0
  steps_per_call: int = 1
  compute_dtype: str = "float32"
  shared_order: bool = False


@dataclasses.dataclass(frozen=True)
class Group:
  """The replicas of one stage that share a model (and, for students, a teacher model): one
  compiled program. `replicas` keep their stage-wide `index`; `teacher_indices` are the teacher
  replicas whose variables the program is given (those of `teacher_group`)."""
  key: str  # "group0", "group1", ...: its entry in the stage's checkpoints
  stage: str
  model: replicas_lib.ModelSpec
  replicas: tuple[replicas_lib.Replica, ...]
  num_epochs: int
  steps_per_epoch: int
  teacher_group: str | None = None
  teacher_model: replicas_lib.ModelSpec | None = None
  teacher_indices: tuple[int, ...] = ()
  teacher_loss: str = "ce"  # a teacher group's loss kind (arm_options.teacher_loss)

  @property
  def name(self) -> str:
    return self.stage

  @property
  def total_steps(self) -> int:
    return self.num_epochs * self.steps_per_epoch

  @property
  def indices(self) -> tuple[int, ...]:
    return tuple(r.index for r in self.replicas)

  def module(self, num_classes: int):
    return self.model.module(num_classes)

  def arms(self) -> tuple[arms_lib.Arm, ...]:
    teacher_arm = dataclasses.replace(_TEACHER_ARM, loss=self.teacher_loss)
    return tuple(teacher_arm if r.arm == "teacher" else arms_lib.ARMS[r.arm]
                 for r in self.replicas)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: its replicas, in the groups (one per model) that train them."""
  name: str
  replicas: tuple[replicas_lib.Replica, ...]
  groups: tuple[Group, ...]
  num_epochs: int
  steps_per_epoch: int

  @property
  def total_steps(self) -> int:
    return self.num_epochs * self.steps_per_epoch

  def group_of(self, index: int) -> Group:
    return next(g for g in self.groups if index in g.indices)


def _groups(name: str, rows, specs, num_epochs: int, spe: int, teacher: Stage | None = None):
  """Splits a stage's rows into groups: by model, then (students) by their teacher's group;
  students without a teacher join the first group of their model, so that arms share programs."""
  by_label = {s.label: s for s in specs}
  keyed: dict[tuple, list] = {}
  for r in rows:
    if teacher is not None and r.teacher >= 0:
      keyed.setdefault((r.model, teacher.group_of(r.teacher)), [])
  for r in rows:
    if teacher is not None and r.teacher >= 0:
      key = (r.model, teacher.group_of(r.teacher))
    else:
      key = next((k for k in keyed if k[0] == r.model), (r.model, None))
    keyed.setdefault(key, []).append(r)
  return tuple(
      Group(key=f"group{i}", stage=name, model=by_label[label], replicas=tuple(members),
            num_epochs=num_epochs, steps_per_epoch=spe,
            teacher_group=None if tg is None else tg.key,
            teacher_model=None if tg is None else tg.model,
            teacher_indices=() if tg is None else tg.indices)
      for i, ((label, tg), members) in enumerate(keyed.items()))


# Teachers train on labels: the 'ce' loss kind with no teacher signal.
_TEACHER_ARM = arms_lib.Arm("teacher", "none", "ce", "fresh", "a teacher trained on labels")


@dataclasses.dataclass(frozen=True)
class Study:
  """A resolved study (module docstring): what `resolve` makes of a config, then laid out on
  devices (`fit_devices`) and given its data (`load_data`)."""
  config: Any
  dataset: data_lib.DatasetSpec
  num_train: int
  num_eval: int
  stages: tuple[str, ...]
  analyses: tuple[str, ...]  # the study-specific report sections (kdjax.analysis.sections)
  teacher: Stage
  students: Stage
  loss_options: arms_lib.LossOptions
  run: RunSettings
  # The mesh `config.mesh` asks for, {"replica": r, "data": d} with -1 filling the devices the
  # other axis leaves (`mesh_shape`); None: the default, each group laid out by `auto_mesh`.
  mesh_request: dict[str, int] | None = None
  # Set by `fit_devices`: the devices the study is laid out on (None before: the engines then
  # use every process's devices) and the (replica, data) shape of the requested mesh on them
  # (None for the default mesh, which is per group: `group_mesh`).
  num_devices: int | None = None
  mesh: tuple[int, int] | None = None
  # The fraction of the training split held out as the validation split ("val" in `data`;
  # kdjax.data.splits); `num_train` counts the rest.
  val_fraction: float = 0.0
  num_val: int = 0
  # The classes the teachers are trained on (`teacher_classes`; () = all): the teacher stage
  # trains on the "teacher_train" split, the training examples of those classes.
  teacher_classes: tuple[int, ...] = ()
  num_teacher_train: int = 0
  # The loaded splits {"train", "test"[, "val"]: arrays} once `load_data` ran.
  data: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def stage(self, name: str) -> Stage:
    return {"teacher": self.teacher, "students": self.students}[name]

  def train_split(self, stage: str) -> str:
    """The split `stage` trains on: "teacher_train" for teachers of a class subset, else
    "train"."""
    return "teacher_train" if stage == "teacher" and self.teacher_classes else "train"

  def num_examples(self, split: str) -> int:
    """The examples of a split of the study (known before `load_data`)."""
    return {"train": self.num_train, "teacher_train": self.num_teacher_train,
            "test": self.num_eval, "val": self.num_val}[split]

  def group_mesh(self, group: Group, num_devices: int | None = None) -> tuple[int, int]:
    """(replica, data) of the mesh `group` trains on over `num_devices` devices (default: those
    the study was fitted to, else every device): `config.mesh` when it is set, else
    `auto_mesh` for the group."""
    if num_devices is None:
      num_devices = jax.device_count() if self.num_devices is None else self.num_devices
    num_devices = int(num_devices)
    if self.mesh_request is None:
      return auto_mesh(len(group.replicas), num_devices,
                       (self.run.batch_size, self.run.eval_batch_size))
    return mesh_shape(self.mesh_request, num_devices)

  def groups(self) -> tuple[Group, ...]:
    """Every group of both training stages, teachers first."""
    return self.teacher.groups + self.students.groups


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The ConfigDict of a config file's `get_config(arg)`, as `--config=PATH[:ARG]` loads it;
  kdjax.configfile.ConfigFileError (a ValueError, one line) for a file that cannot give one."""
  return configfile.load(path, arg)


def _int(config, key: str, *, low: int) -> int:
  value = _get(config, key)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ConfigError(key, f"must be an integer >= {low}, got {value!r}")
  return int(value)


def _number(config, key: str, **bounds) -> float:
  """A real number within `bounds` (kdjax._checks.check_range's keywords)."""
  value = _get(config, key)
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ConfigError(key, f"must be a number, got {value!r}")
  try:
    _checks.check_range(key, value, **bounds)
  except ValueError as e:
    raise ConfigError(key, str(e)) from None
  return float(value)


def _get(config, key: str):
  node = config
  for part in key.split("."):
    if part not in node:
      raise ConfigError(key, "is missing from the config")
    node = node[part]
  return node


def _bool(config, key: str) -> bool:
  value = _get(config, key)
  if not isinstance(value, bool):
    raise ConfigError(key, f"must be True or False, got {value!r}")
  return value


def _check_splits(name: str, spec, splits: dict) -> None:
  """Refuses data the stages cannot train or evaluate on: an empty split, inputs of another
  shape than the train split's (`spec.input_shape`), non-finite float inputs, labels outside
  [0, num_classes), fewer than 2 classes. A class without training examples is allowed (it
  is never predicted from data, and the metrics count it like any other)."""
  how = (" (num_classes of npz: and image_folder: data is the largest train label + 1)"
         if name.startswith(("npz:", "image_folder:")) else "")
  if spec.num_classes < 2:
    raise ConfigError("dataset", f"{name} has labels of {spec.num_classes} class(es); a study "
                      f"needs at least 2 classes{how}")
  for split, arrays in splits.items():
    x, y = arrays.get(spec.input_key), np.asarray(arrays["label"])
    if x is None:
      raise ConfigError("dataset", f"the {split} split of {name} holds no {spec.input_key!r} "
                        f"inputs (it holds {', '.join(sorted(arrays))}), unlike the train split")
    if not len(y):
      raise ConfigError("dataset", f"the {split} split of {name} has no examples; train and "
                        "test need at least one each")
    if tuple(x.shape[1:]) != tuple(spec.input_shape):
      raise ConfigError("dataset", f"the {split} split of {name} has inputs of shape "
                        f"{tuple(x.shape[1:])}, but the dataset's are "
                        f"{tuple(spec.input_shape)}; every example must have that shape")
    if np.issubdtype(x.dtype, np.floating):
      finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
      if not finite.all():
        raise ConfigError("dataset", f"the {split} split of {name} has NaN/inf inputs in "
                          f"{int((~finite).sum())} example(s) (the first: example "
                          f"{int(np.argmin(finite))}); inputs must be finite")
    bad = (y < 0) | (y >= spec.num_classes)
    if bad.any():
      first = int(np.flatnonzero(bad.reshape(-1))[0])
      raise ConfigError("dataset", f"the {split} split of {name} has label "
                        f"{int(y.reshape(-1)[first])} (at flat position {first}); labels must "
                        f"be integers in [0, {spec.num_classes - 1}]{how}")


def _choice(config, key: str, allowed) -> str:
  value = _get(config, key)
  if value not in allowed:
    raise ConfigError(key, f"must be one of {', '.join(allowed)}; got {value!r}")
  return value


def _grid(config, key: str, *, low=None, high=None, low_open=False) -> tuple[float, ...]:
  try:
    grid = replicas_lib.parse_grid(key, _get(config, key))
  except ValueError as e:
    raise ConfigError(key, str(e)) from None
  for v in grid:
    if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
      interval = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}" \
                 f"{']' if high is not None else ')'}"
      raise ConfigError(key, f"values must lie in {interval}; got {v:g}")
  return grid


def _models(config, key: str, kwargs_key: str, grid_key: str, num_classes: int):
  """The ModelSpecs of `key` (names) x `grid_key` (keyword grids) over `kwargs_key`."""
  grid = config.get(grid_key) or {}
  names = _names_or_error(lambda: replicas_lib.split_list(key, _get(config, key)), key)
  if len({str(n).strip() for n in names}) != len(names):
    raise ConfigError(key, f"lists a model twice: {_get(config, key)!r}")
  try:
    specs = replicas_lib.model_specs(_get(config, key), dict(_get(config, kwargs_key)), grid)
  except ValueError as e:
    raise ConfigError(grid_key, str(e)) from None
  if not specs:
    raise ConfigError(key, f"must name a model, one of {', '.join(models_lib.available())}")
  for spec in specs:
    name, blamed = spec.name, [(key, {})]  # the name first, then its options
    blamed.append((grid_key if set(grid) & set(dict(spec.kwargs)) else kwargs_key,
                   dict(spec.kwargs)))
    for blame, kw in blamed:
      try:
        module = models_lib.get(name, num_classes=num_classes, **kw)
      except (ValueError, TypeError) as e:
        raise ConfigError(blame, str(e)) from None
      # The models check the ranges of numbers only (a string would reach the first trace).
      defaults = {f.name: f.default for f in dataclasses.fields(module)}
      for k, v in kw.items():
        default = defaults.get(k)
        number = isinstance(default, numbers.Real) and not isinstance(default, bool)
        if (number and (isinstance(v, bool) or not isinstance(v, numbers.Real))) or (
            isinstance(default, bool) and not isinstance(v, bool)):
          raise ConfigError(blame, f"{k} of model {name!r} must be "
                            f"{'a number' if number else 'True or False'}, got {v!r}")
  return specs


def resolve(config) -> Study:
  """Validates `config` and resolves it into a Study (module docstring), without devices and
  without holding data; raises ConfigError on the first bad key."""
  stages = _names_or_error(lambda: replicas_lib.parse_names(
      "stages", _get(config, "stages"), ALL_STAGES), "stages")
  arm_names = _names_or_error(lambda: replicas_lib.parse_names(
      "arms", _get(config, "arms"), tuple(arms_lib.ARMS)), "arms")
  _grid(config, "alpha", low=0.0, high=1.0)
  _grid(config, "temperature", low=0.0, low_open=True)
  windows = _get(config, "kd_windows")
  _names_or_error(lambda: replicas_lib.parse_windows("kd_windows", windows), "kd_windows")
  _grid(config, "optimizer.learning_rate", low=0.0, low_open=True)
  _int(config, "num_seeds", low=1)
  _int(config, "num_teachers", low=1)
  _int(config, "seed", low=0)
  batch_size = _int(config, "batch_size", low=1)
  num_epochs = _int(config, "num_epochs", low=1)
  teacher_epochs = _int(config, "teacher_num_epochs", low=-1)
  if teacher_epochs == 0:
    raise ConfigError("teacher_num_epochs", "must be -1 (the students' num_epochs) or an integer "
                      ">= 1, got 0")
  for key in ("eval_batch_size", "eval_every_steps", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints"):
    _int(config, key, low=1)
  for key in ("shared_order", "overwrite", "optimizer.nesterov"):  # absent from old configs
    parent, _, leaf = key.rpartition(".")
    if leaf in (_get(config, parent) if parent else config):
      _bool(config, key)
  _choice(config, "student_init", ("teacher", "fresh"))
  _choice(config, "execution", EXECUTIONS)
  if "replicas_per_block" in config:
    _int(config, "replicas_per_block", low=0)
  if "steps_per_call" in config:
    _int(config, "steps_per_call", low=0)
  if "compute_dtype" in config:
    _choice(config, "compute_dtype", ("float32", "bfloat16"))
  _choice(config, "optimizer.name", optim.OPTIMIZERS)
  _choice(config, "optimizer.schedule", optim.SCHEDULES)
  _optimizer_numbers(config)
  _choice(config, "augment", data_lib.AUGMENT_PRESETS)
  if config.get("teacher_augment", ""):
    _names_or_error(lambda: replicas_lib.parse_names(
        "teacher_augment", config.teacher_augment, data_lib.AUGMENT_PRESETS), "teacher_augment")
  ensembles = _names_or_error(lambda: replicas_lib.parse_ensembles(
      "ensembles", config.get("ensembles", ""), replicas_lib.teacher_augments(config)),
      "ensembles")
  if ensembles:
    ensemble_arms = [a for a in arms_lib.ARMS.values() if a.reads == "ensemble"]
    if not any(a.name in arm_names for a in ensemble_arms):
      raise ConfigError("ensembles", "is set, but no arm learns from an ensemble; add one of "
                        f"{', '.join(a.name for a in ensemble_arms)} to arms or set ensembles=''")
    largest = max(len(c) for c in ensembles)
    if int(config.num_teachers) < largest:
      raise ConfigError("num_teachers", f"must be at least {largest}, the members of the largest "
                        f"ensemble in ensembles ({config.ensembles!r}), so that its members are "
                        f"different teachers; got {config.num_teachers}")
  options, dkd_warmup_epochs = _loss_options(config)
  cohort_arms = [a for a in arm_names
                 if arms_lib.TEACHER_SIGNALS[arms_lib.ARMS[a].teacher_signal].source == "peers"]
  if cohort_arms and int(config.num_seeds) % options.mutual_cohort:
    raise ConfigError("num_seeds", f"must be a multiple of arm_options.mutual_cohort="
                      f"{options.mutual_cohort}: arm {cohort_arms[0]} trains cohorts of that "
                      f"many seeds that learn from each other; got {config.num_seeds}")
  analyses = ()
  if config.get("analyses", ""):
    from kdjax.analysis import sections  # pylint: disable=g-import-not-at-top  (a name table)
    analyses = _names_or_error(lambda: replicas_lib.parse_names(
        "analyses", config.analyses, sections.available()), "analyses")

  analysis_options = config.get("analysis_options")
  if analysis_options is not None:  # the analysis's TOST margins (absent from older configs)
    try:
      stats.parse_equivalence_margins(analysis_options.get("equivalence_margins", ""))
    except ValueError as e:
      raise ConfigError("analysis_options.equivalence_margins", str(e)) from None


  name = _get(config, "dataset")
  data_dir = _get(config, "data_dir") or None
  if data_dir is not None and not isinstance(data_dir, str):
    raise ConfigError("data_dir", f"must be a directory name ('' for the default), got "
                      f"{data_dir!r}")
  try:
    spec = data_lib.spec(name, data_dir=data_dir)
  except ValueError as e:  # includes DatasetNotAvailableError
    raise ConfigError("dataset", str(e)) from None
  # Before loading: loading may first generate the data (kdjax's synthetic builder).
  for key in ("augment", "teacher_augment"):
    if set(replicas_lib.teacher_augments(config) if key == "teacher_augment" else
           (config.augment,)) != {"none"} and spec.modality != "image":
      raise ConfigError(key, f"must be 'none' for {spec.modality} data ({name})")
  num_train, num_eval = (len(_splits(name, data_dir)[split]["label"])
                         for split in ("train", "test"))
  if not num_train:
    raise ConfigError("dataset", f"the train split of {name} has no examples; train and test "
                      "need at least one each")
  val_fraction = _number(config, "val_fraction", low=0.0, high=0.5) \
      if "val_fraction" in config else 0.0
  num_val = splits_lib.validation_size(num_train, val_fraction)
  if val_fraction and not num_val:
    raise ConfigError("val_fraction", f"holds out no example of the {num_train} training "
                      f"examples; use at least {0.5 / num_train:.2g} or 0 for no validation split")
  num_train -= num_val
  for arm in arm_names:
    if "validation" in arms_lib.TEACHER_SIGNALS[arms_lib.ARMS[arm].teacher_signal].needs \
        and not num_val:
      raise ConfigError("val_fraction", f"must be > 0 for arm {arm}: its teachers are "
                        "calibrated on a validation split carved from the training split "
                        "(e.g. --config.val_fraction=0.1)")
  if batch_size > num_train:
    raise ConfigError("batch_size", f"must be at most the {num_train} training examples")
  # Teachers trained on a subset of the classes: their own training split (the examples of
  # those classes) and so their own steps per epoch.
  teacher_classes = _teacher_classes(config, spec.num_classes)
  num_teacher_train = num_train
  if teacher_classes:
    labels = np.asarray(_splits(name, data_dir)["train"]["label"])
    keep = np.ones(len(labels), bool)
    keep[splits_lib.validation_indices(len(labels), val_fraction)] = False
    num_teacher_train = int(np.isin(labels[keep], teacher_classes).sum())
    if batch_size > num_teacher_train:
      raise ConfigError("teacher_classes", f"leaves the teachers {num_teacher_train} training "
                        f"examples, fewer than batch_size={batch_size}")
  options = dataclasses.replace(options, known_classes=teacher_classes)
  for arm in arm_names:
    if arms_lib.LOSS_KINDS[arms_lib.ARMS[arm].loss].needs & {"known_classes"} and \
        not teacher_classes:
      raise ConfigError("teacher_classes", f"must name the classes the teachers see for arm "
                        f"{arm} (e.g. --config.teacher_classes=0-4)")

  model_specs = _models(config, "model", "model_kwargs", "model_grid", spec.num_classes)
  teacher_specs = _models(config, "teacher_model", "teacher_model_kwargs", "teacher_model_grid",
                          spec.num_classes) if config.teacher_model else model_specs
  spe = data_lib.steps_per_epoch(num_train, batch_size)
  if dkd_warmup_epochs is not None:  # mdistiller's warm-up in epochs, as steps of this study
    options = dataclasses.replace(options, dkd_warmup_steps=int(round(dkd_warmup_epochs * spe)))
  options = dataclasses.replace(options, ctkd_steps_per_epoch=spe)
  teacher_rows = replicas_lib.teacher_replicas(config, teacher_specs)
  teacher_spe = data_lib.steps_per_epoch(num_teacher_train, batch_size)
  teacher = Stage("teacher", tuple(teacher_rows), (), teacher_epochs if teacher_epochs > 0
                  else num_epochs, teacher_spe)
  teacher = dataclasses.replace(teacher, groups=tuple(
      dataclasses.replace(g, teacher_loss=options.teacher_loss) for g in _groups(
          "teacher", teacher_rows, teacher_specs, teacher.num_epochs, teacher_spe)))
  try:
    student_rows = replicas_lib.student_replicas(config, num_epochs * spe, model_specs,
                                                 teacher_rows)
  except ValueError as e:
    raise ConfigError("teacher_model", str(e)) from None
  students = Stage("students", tuple(student_rows), _groups(
      "students", student_rows, model_specs, num_epochs, spe, teacher), num_epochs, spe)
  if options.teacher_loss == "regt" and spec.num_classes < 3:
    raise ConfigError("arm_options.teacher_loss", f"'regt' needs at least 3 classes; "
                      f"{name} has {spec.num_classes}")
  kinds = tuple(dict.fromkeys(arms_lib.ARMS[a].loss for a in arm_names))
  if "features" in arms_lib.needs(kinds):
    for group in students.groups:
      if group.teacher_model is not None:
        _check_features(options, kinds, group.model, group.teacher_model, spec)
  return Study(
      config=config, dataset=spec, num_train=num_train, num_eval=num_eval, stages=stages,
      analyses=analyses, teacher=teacher, students=students, loss_options=options,
      run=_run_settings(config), mesh_request=_mesh_request(config.get("mesh")),
      val_fraction=val_fraction, num_val=num_val, teacher_classes=teacher_classes,
      num_teacher_train=num_teacher_train)


def _teacher_classes(config, num_classes: int) -> tuple[int, ...]:
  """`teacher_classes`: "" (every class) or comma-separated class indices and START-STOP
  ranges (inclusive), e.g. "0-4" or "0,2,5-7", each in [0, num_classes), at least 2."""
  value = config.get("teacher_classes", "")
  usage = (f"must be empty (every class) or comma-separated class indices and ranges in "
           f"[0, {num_classes - 1}] such as '0-4' or '0,2,5-7', at least 2 classes")
  if isinstance(value, str) and not value.strip():
    return ()
  classes = []
  try:
    for item in replicas_lib.split_list("teacher_classes", value):
      text = str(item).strip()
      if isinstance(item, bool):
        raise ValueError
      start, sep, stop = text.partition("-")
      first, last = (int(start), int(stop)) if sep else (int(text), int(text))
      if first > last:
        raise ValueError
      classes += range(first, last + 1)
  except (TypeError, ValueError):
    raise ConfigError("teacher_classes", f"{usage}; got {value!r}") from None
  if len(classes) < 2 or len(set(classes)) != len(classes) or \
      not all(0 <= c < num_classes for c in classes):
    raise ConfigError("teacher_classes", f"{usage}; got {value!r}")
  return tuple(sorted(classes))


def _run_settings(config) -> RunSettings:
  """The run keys, typed (their ranges were checked by `resolve`); keys absent from configs
  written before them get the value those configs ran with."""
  return RunSettings(
      seed=int(config.seed), batch_size=int(config.batch_size),
      eval_batch_size=int(config.eval_batch_size),
      eval_every_steps=int(config.eval_every_steps),
      log_every_steps=int(config.log_every_steps),
      checkpoint_every_steps=int(config.checkpoint_every_steps),
      keep_checkpoints=int(config.keep_checkpoints), execution=str(config.execution),
      replicas_per_block=int(config.get("replicas_per_block", 0)),
      steps_per_call=int(config.get("steps_per_call", 1)),
      compute_dtype=str(config.get("compute_dtype", "float32")),
      shared_order=bool(config.get("shared_order", False)))


def fit_devices(study: Study, num_devices: int | None = None) -> Study:
  """`study` laid out on `num_devices` devices (default `jax.device_count()`, all processes'
  devices; launch/sweep.py passes a target machine's count). Raises MeshError, naming the key to
  change and listing the meshes that fit (`kdjax.distributed.fitting_meshes`), when a group's
  replicas do not divide over the mesh's replica axis, a batch size over its data axis, or
  `config.mesh` does not cover the devices; with the default mesh, only when several processes
  would leave devices out of a group's mesh."""
  num_devices = jax.device_count() if num_devices is None else int(num_devices)
  groups = [(stage, group) for stage in (study.teacher, study.students)
            for group in stage.groups]
  batch_sizes = (study.run.batch_size, study.run.eval_batch_size)
  sizes = [len(g.replicas) for _, g in groups]

  def fail(key: str, message: str):
    fits = distributed.fitting_meshes(sizes, num_devices, batch_sizes)
    if fits:
      allowed = " or ".join(f"--config.mesh.replica={r} --config.mesh.data={d}" for r, d in fits)
      hint = f"; meshes that fit the {num_devices} devices: {allowed}"
    else:
      hint = (f"; no mesh of the {num_devices} devices fits: mesh.replica must divide every "
              f"group's replica count ({', '.join(map(str, sorted(set(sizes))))}) and mesh.data "
              "batch_size and eval_batch_size")
    return MeshError(key, message + hint, fits)

  if study.mesh_request is None:
    # Each group gets the mesh that fits it (`auto_mesh`). Several processes must all hold
    # devices of every mesh, so there no group may leave devices out.
    for stage, group in groups:
      replica, data = auto_mesh(len(group.replicas), num_devices, batch_sizes)
      if replica * data < num_devices and jax.process_count() > 1:
        raise fail("mesh", f"the {stage.name} stage's {group.model.label} group fits only "
                   f"{replica * data} of the {num_devices} devices (its {len(group.replicas)} "
                   "replicas and the batch sizes do not divide over more); set "
                   "--config.mesh.replica and --config.mesh.data")
    return dataclasses.replace(study, num_devices=num_devices)
  try:
    mesh = mesh_shape(study.mesh_request, num_devices)
  except ConfigError as e:
    raise fail(e.key, e.message) from None
  for key, size in zip(("batch_size", "eval_batch_size"), batch_sizes):
    if size % mesh[1]:
      raise fail(key, f"must be a multiple of mesh.data={mesh[1]} (each replica's batch is "
                 f"split over the data axis); got {size}")
  for stage, group in groups:
    if len(group.replicas) % mesh[0]:
      raise fail("num_seeds" if stage.name == "students" else "num_teachers",
                 f"the {stage.name} stage's {group.model.label} group has "
                 f"{len(group.replicas)} replicas, which do not divide over the {mesh[0]} "
                 f"replica shards of the mesh ({_mesh_text(mesh)}); make the count a multiple "
                 f"of {mesh[0]} or change mesh.replica/mesh.data")
  return dataclasses.replace(study, num_devices=num_devices, mesh=mesh)


def load_data(study: Study) -> Study:
  """`study` with its train and test splits (`Study.data`), checked (`_check_splits`): the
  data step of the stages that read data. A no-op when they are loaded."""
  if study.data:
    return study
  name, data_dir = study.dataset.name, study.config.get("data_dir") or None
  splits = dict(_splits(name, data_dir))
  _check_splits(name, study.dataset, splits)
  if study.num_val:  # the validation split, carved from train (kdjax.data.splits)
    splits["train"], splits["val"] = splits_lib.carve_validation(splits["train"],
                                                                 study.val_fraction)
  if study.teacher_classes:  # the teachers' training examples: those of their classes
    keep = np.isin(splits["train"]["label"], study.teacher_classes)
    splits["teacher_train"] = {k: np.asarray(v)[keep] for k, v in splits["train"].items()}
  return dataclasses.replace(study, data=splits)


_LOADED: dict = {}  # the last dataset's splits: {(name, data_dir, file stamp): splits}


def _splits(name: str, data_dir: str | None) -> dict:
  """{"train", "test"} arrays of a dataset, read once per process for the last dataset asked
  for (`resolve` counts them, `load_data` returns them). ConfigError('dataset') when they
  cannot be read. A file-backed dataset (npz:PATH, image_folder:PATH) is read again when its
  file changes."""
  path = name.partition(":")[2] if name.startswith(("npz:", "image_folder:")) else ""
  try:
    stamp = os.stat(path).st_mtime_ns if path else None
  except OSError:
    stamp = None
  key = (name, data_dir, stamp)
  if key not in _LOADED:
    try:
      splits = {split: data_lib.load(name, split, data_dir=data_dir)
                for split in ("train", "test")}
    except ValueError as e:  # includes DatasetNotAvailableError
      raise ConfigError("dataset", str(e)) from None
    _LOADED.clear()
    _LOADED[key] = splits
  return _LOADED[key]


MESH_AXES = ("replica", "data")
# The default: both axes 0, every group laid out by `auto_mesh`.
DEFAULT_MESH = {"replica": 0, "data": 0}


def is_auto_mesh(mesh) -> bool:
  """True when `mesh` ({"replica": r, "data": d}; None: DEFAULT_MESH) leaves both axes at 0."""
  mesh = dict(DEFAULT_MESH if mesh is None else mesh)
  return not set(mesh) - set(MESH_AXES) and all(
      not isinstance(mesh.get(a, 0), bool) and mesh.get(a, 0) == 0 for a in MESH_AXES)


def auto_mesh(group_size: int, num_devices: int,
              batch_sizes: tuple[int, ...] = ()) -> tuple[int, int]:
  """The mesh of a group of `group_size` replicas on `num_devices` devices when `config.mesh` is
  left at its default: the largest replica axis that divides both the replica count and the
  device count (whole replicas per device first), then the largest data axis that divides the
  devices left and every batch size. Devices beyond replica x data stay idle (a batch size that
  does not divide over them)."""
  replica = max(r for r in range(1, num_devices + 1)
                if num_devices % r == 0 and group_size % r == 0)
  rest = num_devices // replica
  data = max(d for d in range(1, rest + 1)
             if rest % d == 0 and all(int(b) % d == 0 for b in batch_sizes))
  return replica, data


def _mesh_request(mesh) -> dict[str, int] | None:
  """The mesh `config.mesh` asks for as {"replica": r, "data": d}, each an integer >= 1 or -1
  (fill the devices the other axis leaves; 0 is -1), or None for the default (both 0, laid out
  per group: `auto_mesh`). Raises ConfigError naming mesh.replica or mesh.data."""
  if mesh is None or is_auto_mesh(mesh):
    return None
  mesh = dict(mesh)
  unknown = sorted(set(mesh) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"mesh.{unknown[0]}", f"is not a mesh axis; the axes are "
                      f"{', '.join(MESH_AXES)}")
  sizes = {}
  for axis in MESH_AXES:
    value = mesh.get(axis, 0)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < -1:
      raise ConfigError(f"mesh.{axis}", f"must be an integer >= 1, or -1 or 0 (fill the "
                        f"devices; both 0: kdjax lays out each group); got {value!r}")
    sizes[axis] = -1 if value == 0 else int(value)
  if sizes["replica"] == -1 and sizes["data"] == -1:
    raise ConfigError("mesh.data", "at most one of mesh.replica and mesh.data may be -1 (or "
                      "leave both at 0 for kdjax's layout)")
  return sizes


def mesh_shape(mesh, num_devices: int) -> tuple[int, int]:
  """(replica, data) axis sizes of the device mesh that `mesh` ({"replica": r, "data": d})
  asks for on `num_devices` devices; -1 (or 0) fills the devices the other axis leaves. The
  sizes must multiply to `num_devices`. Raises ConfigError naming mesh.replica or mesh.data.
  (A mesh with both axes 0, the default, is laid out per group: `auto_mesh`; here it is one
  replica axis over every device.)"""
  sizes = _mesh_request(mesh) or {"replica": -1, "data": 1}
  for axis, other in (("replica", sizes["data"]), ("data", sizes["replica"])):
    if sizes[axis] == -1:
      if num_devices % other:
        blamed = "data" if axis == "replica" else "replica"
        raise ConfigError(f"mesh.{blamed}", f"must divide the {num_devices} devices; got {other}")
      sizes[axis] = num_devices // other
  replica, data = sizes["replica"], sizes["data"]
  if replica * data != num_devices:
    asked = _mesh_request(mesh) or {}
    raise ConfigError("mesh.replica" if asked.get("replica", -1) != -1 else "mesh.data",
                      f"mesh.replica x mesh.data = {replica} x {data} = {replica * data} must "
                      f"equal the {num_devices} devices (use -1 to fill)")
  return replica, data


def _mesh_text(mesh: tuple[int, int]) -> str:
  return f"replica={mesh[0]} x data={mesh[1]}"


def _optimizer_numbers(config) -> None:
  """The ranges of the optimiser's numbers that the config sets (kdjax.optim reads them)."""
  opt = _get(config, "optimizer")
  for key, bounds in (("momentum", dict(low=0.0, high=1.0, high_inclusive=False)),
                      ("weight_decay", dict(low=0.0)), ("grad_clip_norm", dict(low=0.0)),
                      ("decay_factor", dict(low=0.0, low_inclusive=False))):
    if key in opt:
      _number(config, f"optimizer.{key}", **bounds)
  if "warmup_steps" in opt:
    _int(config, "optimizer.warmup_steps", low=0)
  for fraction in opt.get("decay_boundaries", ()):  # fractions of training
    try:
      if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise ValueError(f"optimizer.decay_boundaries must be numbers, got {fraction!r}")
      _checks.check_range("optimizer.decay_boundaries", fraction, low=0.0, high=1.0)
    except ValueError as e:
      raise ConfigError("optimizer.decay_boundaries", f"{e} (fractions of training)") from None


def _names_or_error(fn, key: str):
  try:
    return fn()
  except ValueError as e:
    raise ConfigError(key, str(e)) from None


def _loss_options(config) -> arms_lib.LossOptions:
  """The arms' study-wide settings (`arm_options`). `dkd_warmup_steps` is still in epochs here:
  `resolve` converts it once the steps per epoch are known."""
  prefix = "arm_options"
  o = config.arm_options
  isats = _grid(config, f"{prefix}.isats_temperatures", low=0.0, low_open=True)
  for key in ("dkd_alpha", "dkd_beta", "hint_weight"):
    _grid(config, f"{prefix}.{key}", low=0.0)
  _grid(config, f"{prefix}.label_smoothing", low=0.0, high=1.0)
  minval, maxval = (_grid(config, f"{prefix}.{k}")[0] for k in ("rcd_minval", "rcd_maxval"))
  if minval >= maxval:
    raise ConfigError(f"{prefix}.rcd_maxval", f"must be greater than rcd_minval={minval:g}")
  # Keys added after the first configs: absent from configs (config.json) written before them.
  extra = {}
  for key in ("ats_target_temperature", "ats_nontarget_temperature", "ats_student_temperature",
              "isats_target_temperature"):
    if key in o:
      extra[key] = _number(config, f"{prefix}.{key}", low=0.0, low_inclusive=False)
  if "fgcr_fusion" in o:
    extra["fgcr_fusion"] = _number(config, f"{prefix}.fgcr_fusion", low=0.0, high=1.0)
  if "teacher_loss" in o:
    extra["teacher_loss"] = _choice(config, f"{prefix}.teacher_loss", ("ce", "regt"))
  if "regt_weight" in o:
    extra["regt_weight"] = _number(config, f"{prefix}.regt_weight", low=0.0)
  positive, non_negative = dict(low=0.0, low_inclusive=False), dict(low=0.0)
  for key, bounds in (("nkd_temperature", positive), ("nkd_gamma", non_negative),
                      ("dist_temperature", positive), ("dist_beta", non_negative),
                      ("dist_gamma", non_negative), ("dist_weight", non_negative),
                      ("ttm_gamma", positive), ("ttm_weight", non_negative),
                      ("wttm_gamma", positive), ("wttm_weight", non_negative),
                      ("at_weight", non_negative), ("mutual_temperature", positive)):
    if key in o:
      extra[key] = _number(config, f"{prefix}.{key}", **bounds)
  for key, bounds in (("ctkd_t_start", positive), ("ctkd_t_range", non_negative),
                      ("ctkd_init", {}), ("ctkd_max_lambda", non_negative)):
    if key in o:
      extra[key] = _number(config, f"{prefix}.{key}", **bounds)
  if "ctkd_ramp_epochs" in o:
    extra["ctkd_ramp_epochs"] = _int(config, f"{prefix}.ctkd_ramp_epochs", low=1)
  if "ensemble_reliability" in o:
    extra["ensemble_reliability"] = _choice(config, f"{prefix}.ensemble_reliability",
                                            ("accuracy", "confidence"))
  if "mutual_cohort" in o:
    extra["mutual_cohort"] = _int(config, f"{prefix}.mutual_cohort", low=2)
  if "at_features" in o:
    names = _names_or_error(lambda: tuple(
        n.strip() if isinstance(n, str) else n
        for n in replicas_lib.split_list("at_features", o.at_features)),
        f"{prefix}.at_features")
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
      raise ConfigError(f"{prefix}.at_features", "must name the feature maps to match, "
                        f"comma-separated and each once (e.g. 'block1,block2'); got "
                        f"{o.at_features!r}")
    extra["at_features"] = names
  # The DKD warm-up in epochs (mdistiller: 20); configs written before it gave steps.
  if "dkd_warmup_epochs" in o:
    warmup_epochs = _number(config, f"{prefix}.dkd_warmup_epochs", low=0.0)
  else:
    warmup_epochs = None
    extra["dkd_warmup_steps"] = _int(config, f"{prefix}.dkd_warmup_steps", low=0)
  ce_weights, kd_weights = _names_or_error(lambda: replicas_lib.arm_weights(config),
                                           _weights_key(config))
  for key, mine, other in (("ce_weight", ce_weights, kd_weights),
                           ("kd_weight", kd_weights, ce_weights)):
    missing = sorted(set(other) - set(mine))
    if missing:
      raise ConfigError(f"{prefix}.{key}", f"must give a weight for every arm that "
                        f"arm_options.{'kd_weight' if key == 'ce_weight' else 'ce_weight'} lists "
                        f"(both weights, or neither for the (1 - alpha, alpha) form); missing "
                        f"{', '.join(missing)}")
  if not isinstance(o.hint_feature, str) or not o.hint_feature:
    raise ConfigError(f"{prefix}.hint_feature", "must name a feature of the models (e.g. "
                      f"'block1'), got {o.hint_feature!r}")
  options = arms_lib.LossOptions(**extra,
      isats_temperatures=isats, dkd_alpha=float(o.dkd_alpha), dkd_beta=float(o.dkd_beta),
      hint_feature=str(o.hint_feature), hint_weight=float(o.hint_weight),
      rcd_minval=minval, rcd_maxval=maxval)
  return options, warmup_epochs


def _weights_key(config) -> str:
  """The weights key to blame for an unparsable value: the first that does not parse."""
  allowed = tuple(a.name for a in arms_lib.ARMS.values() if a.teacher_signal != "none")
  for key in ("ce_weight", "kd_weight"):
    try:
      replicas_lib.parse_arm_weights(key, config.arm_options.get(key, ""), allowed)
    except ValueError:
      return f"arm_options.{key}"
  return "arm_options.kd_weight"


def _check_features(options: arms_lib.LossOptions, kinds, student: replicas_lib.ModelSpec,
                    teacher: replicas_lib.ModelSpec, spec) -> None:
  """Every feature map the loss kinds `kinds` match (`LossKind.features`) exists in both models
  and agrees between them as the kind needs (`LossKind.feature_match`)."""
  x = spec.example_input()
  shapes = {}
  for model in (student, teacher):
    module = model.module(spec.num_classes)
    variables = jax.eval_shape(lambda m=module: m.init(jax.random.PRNGKey(0), x, train=False))
    _, features, _ = jax.eval_shape(
        lambda v, m=module: models_lib.apply_with_features(m, v, x), variables)
    shapes[model.label] = {n: tuple(f.shape) for n, f in features.items()}
  for kind in (arms_lib.LOSS_KINDS[k] for k in kinds):
    if kind.features is None:
      continue
    key = "arm_options." + next(o for o in kind.options if o in ("hint_feature", "at_features"))
    for name in kind.features(options):
      for model in (student, teacher):
        if name not in shapes[model.label]:
          raise ConfigError(key, f"must be one of {', '.join(shapes[model.label])} (the "
                            f"features {model.label} sows); got {name!r}")
      a, b = shapes[student.label][name], shapes[teacher.label][name]
      if kind.feature_match == "spatial" and a[:-1] != b[:-1]:
        raise ConfigError(key, f"student feature {name} {a} of {student.label} and teacher "
                          f"feature {b} of {teacher.label} differ in their spatial size; "
                          f"{kind.name} needs equal [..., H, W] (channels may differ)")
      if kind.feature_match == "shape" and a != b:
        raise ConfigError(key, f"student feature {a} of {student.label} and teacher feature "
                          f"{b} of {teacher.label} differ in shape; {kind.name} needs equal "
                          "shapes")
