"""Plans the launches of a study's grid: one launch when its replicas fit, several when not.

  python launch/sweep.py --config=configs/NAME.py[:ARG] --workdir=DIR --devices=N \
      [--max_replicas_per_device=K] [--split=KEY] [--launcher='python -m kdjax.main'] \
      [--run] [--config.KEY=VALUE ...]

The config (with the `--config.KEY=VALUE` overrides) is resolved as `kdjax.main` resolves it
(kdjax.study.resolve, then kdjax.study.fit_devices), but for N devices, the devices of the launch
target: every grid point of a study becomes replicas of one compiled program, sharded over the
mesh's 'replica' axis (config `mesh`). The grid fits one launch when it resolves on N devices (each group's replicas
divide over the replica axis, the batch over the data axis) and no training stage holds more
than K replicas per device (summed over the stage's groups, whose states share the devices; K
is the memory budget, found by running one launch; no limit by default). Otherwise the values
of one grid key (`--split`, default: the longest of alpha, temperature, kd_windows) are cut into
as few consecutive chunks as make every launch fit, each launch with its own workdir
DIR/<key>_<i>, a complete study of its own: it trains its own teachers (identical in every launch:
they do not depend on these keys) and its arms without a teacher term (siddo, onehot), so each
workdir's analysis compares its KD arms with their controls. optimizer.learning_rate is not
split (the teachers train with its first value) and neither are arms (controls must share a
workdir with the arm they control).

Prints the command lines (default, a dry run) or, with --run, runs them one after another and
stops at the first failure. `--launcher` is the command the kdjax.main arguments are appended
to, e.g. 'launch/multiprocess.sh --processes 2 --devices-per-process 2 --' or
'sbatch launch/slurm.sbatch'.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere: import this checkout's kdjax
  sys.path.insert(0, ROOT)

from kdjax import study as study_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# Student grid keys that may be split: teachers and controls do not depend on them.
SPLIT_KEYS = ("alpha", "temperature", "kd_windows")
DEFAULT_LAUNCHER = "python -m kdjax.main"


@dataclasses.dataclass(frozen=True)
class Launch:
  """One launch: the config overrides it adds, its workdir, and per training stage its largest
  number of replicas per device."""
  overrides: dict[str, str]
  workdir: str
  replicas_per_device: dict[str, int]


def grid_values(config, key: str) -> list[str]:
  """The comma-separated values of a grid key, as written (so they pass through unchanged)."""
  node = config
  for part in key.split("."):
    node = node[part]
  return [v.strip() for v in str(node).split(",") if v.strip()]


def load_per_device(study: study_lib.Study) -> dict[str, int]:
  """Per training stage, replicas per device: sum over its groups of R_g / the group's replica
  axis (`kdjax.study.Study.group_mesh`)."""
  return {name: sum(-(-len(g.replicas) // study.group_mesh(g)[0])
                    for g in study.stage(name).groups)
          for name in ("teacher", "students") if name in study.stages}


@dataclasses.dataclass(frozen=True)
class Fit:
  """Whether a config fits one launch: `reason` is None if it does; `size_only` when only the
  number of students is wrong (too many per device, or not dividing over the replica axis),
  which fewer grid values per launch may fix."""
  reason: str | None
  size_only: bool
  load: dict[str, int]


def check_fit(config, devices: int, max_per_device: int | None) -> Fit:
  """Resolves `config` for `devices` devices and checks the replicas-per-device budget."""
  try:
    study = study_lib.fit_devices(study_lib.resolve(config), devices)
  except study_lib.MeshError as e:
    # The students' count not dividing over the replica axis: fewer grid values may fit.
    return Fit(str(e), e.key == "num_seeds", {})
  except study_lib.ConfigError as e:
    return Fit(str(e), False, {})
  load = load_per_device(study)
  if max_per_device is not None:
    for stage, count in load.items():
      if count > max_per_device:
        return Fit(f"the {stage} stage puts {count} replicas on a device, more than "
                   f"--max_replicas_per_device={max_per_device}", stage == "students", load)
  return Fit(None, False, load)


def chunks(values: Sequence[str], count: int) -> list[list[str]]:
  """`values` cut into `count` consecutive chunks whose sizes differ by at most one."""
  size, extra = divmod(len(values), count)
  out, start = [], 0
  for i in range(count):
    end = start + size + (1 if i < extra else 0)
    out.append(list(values[start:end]))
    start = end
  return out


def _with(config, key: str, value: str):
  config = config.copy_and_resolve_references()
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  return config


def plan(config, *, devices: int, workdir: str, max_per_device: int | None = None,
         split: str | None = None) -> list[Launch]:
  """The launches of `config` on `devices` devices (see the module docstring).

  Raises ValueError when the config is invalid for another reason than its size, or when even
  one value of the split key per launch does not fit.
  """
  fit = check_fit(config, devices, max_per_device)
  reason = fit.reason
  if reason is None:
    return [Launch({}, workdir, fit.load)]
  if not fit.size_only:
    raise ValueError(reason)  # invalid whatever the split (a bad value, the teachers' count)
  candidates = [k for k in SPLIT_KEYS if _has(config, k)]
  if split is None:
    lengths = {k: len(grid_values(config, k)) for k in candidates}
    split = max(candidates, key=lambda k: lengths[k]) if candidates else None
    if split is None or lengths[split] < 2:
      raise ValueError(f"{reason}; no grid key ({', '.join(SPLIT_KEYS)}) has several values "
                       "to split into launches: use more devices or fewer seeds")
  elif split not in candidates:
    raise ValueError(f"--split must be one of {', '.join(candidates)}; got {split!r}")
  values = grid_values(config, split)
  for count in range(2, len(values) + 1):
    launches = []
    for i, part in enumerate(chunks(values, count)):
      value = ",".join(part)
      part = check_fit(_with(config, split, value), devices, max_per_device)
      if part.reason is not None:
        break
      launches.append(Launch({split: value}, os.path.join(
          workdir, f"{split.replace('.', '_')}_{i}"), part.load))
    else:
      return launches
  raise ValueError(f"{reason}; even one value of {split} per launch does not fit "
                   f"({part.reason})")


def _has(config, key: str) -> bool:
  node = config
  for part in key.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


def commands(launches: Sequence[Launch], forwarded: Sequence[str],
             launcher: str = DEFAULT_LAUNCHER) -> list[list[str]]:
  """The command line of each launch: the launcher, the forwarded kdjax.main arguments (the
  --config file and overrides, less --workdir and the overrides of the split key), then the
  launch's --workdir and overrides."""
  out = []
  for launch in launches:
    replaced = {f"--config.{k}" for k in launch.overrides} | {"--workdir"}
    kept = [a for a in forwarded if a.split("=", 1)[0] not in replaced]
    out.append(shlex.split(launcher) + kept + [f"--workdir={launch.workdir}"] +
               [f"--config.{k}={v}" for k, v in launch.overrides.items()])
  return out


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset read at INFO
  args = flags.FLAGS
  if args.devices < 1:
    _fail(f"--devices must be an integer >= 1; got {args.devices}")
  if args.max_replicas_per_device is not None and args.max_replicas_per_device < 1:
    _fail(f"--max_replicas_per_device must be an integer >= 1; got "
          f"{args.max_replicas_per_device}")
  if not args.workdir:
    _fail("--workdir is required")
  try:
    launches = plan(args.config, devices=args.devices, workdir=args.workdir,
                    max_per_device=args.max_replicas_per_device, split=args.split)
  except ValueError as e:
    _fail(str(e))
  forwarded = [a for a in sys.argv[1:] if a.startswith("--config")]
  lines = commands(launches, forwarded, args.launcher)
  print(f"# {len(lines)} launch(es) on {args.devices} device(s); replicas per device: " +
        "; ".join(", ".join(f"{k} {v}" for k, v in launch.replicas_per_device.items())
                  for launch in launches), flush=True)
  for line in lines:
    print(shlex.join(line), flush=True)
    if args.run:
      code = subprocess.call(line, cwd=ROOT)
      if code:
        _fail(f"the launch exited with status {code}: {shlex.join(line)}", code)


def _fail(message: str, code: int = 2) -> None:
  print(f"sweep.py: error: {message}", file=sys.stderr)
  sys.exit(code)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "A study config file (configs/*.py).")
  flags.DEFINE_string("workdir", None, "Base workdir; split launches use DIR/<key>_<i>.")
  flags.DEFINE_integer("devices", None, "Devices of one launch (all processes together).")
  flags.DEFINE_integer("max_replicas_per_device", None,
                       "Memory budget: most replicas of a training stage per device.")
  flags.DEFINE_string("split", None, f"Grid key to split ({', '.join(SPLIT_KEYS)}); default: "
                      "the one with most values.")
  flags.DEFINE_string("launcher", DEFAULT_LAUNCHER,
                      "Command the kdjax.main arguments are appended to.")
  flags.DEFINE_bool("run", False, "Run the launches (default: print them, a dry run).")
  flags.mark_flags_as_required(["config", "devices"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
