"""kdjax's command: one study, stages teacher -> students -> analysis.

  python -m kdjax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

`--config.stages=students` (a comma-separated subset of teacher,students,analysis) runs some
stages; a stage resumes from its latest checkpoint. Invalid input gets one line on stderr naming
the key and what is allowed, exit code 2, and nothing written.

WORKDIR is a local directory or an object-store prefix (gs://bucket/path); every access goes
through kdjax.workdir. Reliability: a run holds an exclusive lock on WORKDIR (a second run there
is refused, exit 2); SIGTERM or Ctrl-C during training saves a checkpoint at the current step
and exits with 128 + the signal number (143, 130) and one line saying so; after that, or after
a kill -9, rerunning the same command resumes and ends with the results of an uninterrupted
run. Training refuses a mesh that the study's groups do not fit, naming the meshes that would;
the analysis lays out its own (kdjax.analysis.fit_to_devices).
"""

from __future__ import annotations

import json
import os
import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from kdjax import configfile


class _ConfigFileParser(flags.ArgumentParser):
  """ml_collections' parser of --config, loading the file with kdjax.configfile: a file that
  cannot give a config (missing, a syntax error, no get_config, a wrong return type) raises
  ConfigFileError, one line, at flag parsing (ml_collections would defer some failures to the
  first use of the config and report others as tracebacks)."""

  def parse(self, path):
    config = configfile.load_flag(path)
    config.lock()
    return config

  def flag_type(self):
    return "config object"


_CONFIG = config_flags.DEFINE_config_file("config", None, "A study config file (configs/*.py).",
                                          lock_config=True)
flags.FLAGS["config"].parser = _ConfigFileParser()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")

# Keys that may change between runs of one study (how it is run, not what it is).
RUN_KEYS = ("stages", "overwrite", "execution", "replicas_per_block", "steps_per_call",
            "log_every_steps",
            "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size",
            "data_dir", "mesh",
            # How the analysis tests (TOST margins): a rerun with --config.stages=analysis may
            # change it, and workdirs from before the key existed still match.
            "analysis_options")
STAGE_DIRS = ("teacher", "students", "analysis")


def fail(message: str) -> None:
  print(f"kdjax: error: {message}", file=sys.stderr)
  sys.exit(2)


# Study keys added later, with the value that workdirs from before the key existed trained with.
LATER_KEYS = {"compute_dtype": "float32"}


def _study_fields(config_json: dict) -> dict:
  return {k: v for k, v in config_json.items()
          if k not in RUN_KEYS and not (k in LATER_KEYS and v == LATER_KEYS[k])}


def _check_workdir(workdir: str, config) -> bool:
  """True if the workdir holds a different study that `overwrite` allows replacing."""
  from kdjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from kdjax.study import ConfigError  # pylint: disable=g-import-not-at-top
  path = workdir_lib.join(workdir, "config.json")
  if not workdir_lib.exists(path):
    return False
  try:
    existing = _study_fields(workdir_lib.read_json(path))
  except (OSError, ValueError, AttributeError) as e:  # not JSON, or not an object
    if config.overwrite:
      return True
    raise ConfigError("overwrite", f"the workdir {workdir} holds a config.json that cannot be "
                      f"read ({type(e).__name__}); use another --workdir or set "
                      "--config.overwrite=True to replace the workdir's study") from None
  requested = _study_fields(json.loads(config.to_json_best_effort()))
  if existing == requested:
    return False
  if not config.overwrite:
    changed = sorted(k for k in set(existing) | set(requested)
                     if existing.get(k) != requested.get(k))
    raise ConfigError("overwrite", f"the workdir {workdir} holds a different study (keys "
                      f"{', '.join(changed)} differ); use another --workdir or set "
                      "--config.overwrite=True to replace it")
  return True


def _check_workdir_state(study, config, workdir: str) -> bool:
  """Checks what the workdir holds against the request (raises ConfigError/RuntimeError);
  True if it holds a different study that `overwrite` replaces."""
  from kdjax import train  # pylint: disable=g-import-not-at-top
  replace = _check_workdir(workdir, config)
  for earlier in train.prerequisites(study):
    if replace:
      raise RuntimeError(f"--config.overwrite=True replaces this workdir's {earlier} stage, "
                         f"which --config.stages={config.stages} needs; add {earlier} to stages")
    train.check_finished(study, workdir, earlier)
  return replace


def validate(config, workdir: str, num_devices: int | None = None):
  """(study, replace): everything a run checks before it writes anything, raising one-line
  errors (ConfigError, ValueError, RuntimeError): the workdir's path (`workdir.check_usable`),
  every config key and the data (`resolve`), and what the workdir holds (`replace`: a different
  study that `overwrite` replaces). The CLI's checks, callable in-process."""
  from kdjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.check_usable(workdir)
  study = resolve(config, num_devices)
  return study, _check_workdir_state(study, config, workdir)


def resolve(config, num_devices: int | None = None):
  """The study of `config` as a run uses it: resolved (`kdjax.study.resolve`), laid out on this
  run's `num_devices` (default: all; `kdjax.study.fit_devices`, whose MeshError names the meshes
  that fit) when it trains, and with its data (`kdjax.study.load_data`). A study that only runs
  the analysis is not fitted here: the analysis lays out its own mesh, as a workstation must for
  a pod's workdir."""
  from kdjax import study as study_lib  # pylint: disable=g-import-not-at-top
  study = study_lib.resolve(config)
  if set(study.stages) & {"teacher", "students"}:
    study = study_lib.fit_devices(study, num_devices)
  return study_lib.load_data(study)


class _KdjaxRecords(logging.Filter):
  """Keeps the console to kdjax's own lines and warnings: Orbax, TFDS and JAX log every
  checkpoint write and file read at INFO level through absl. While `validating`, other
  libraries' warnings are dropped too: an invalid config gets exactly one line (TFDS warns about
  an unprepared dataset before kdjax reports it)."""

  validating = False
  # kdjax's own records come from files in this package's directory. (Not "/kdjax/" in the
  # path: in a checkout named kdjax, every library under its .venv would match.)
  package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep

  def filter(self, record: logging.LogRecord) -> bool:
    own = os.path.abspath(record.pathname).startswith(self.package_dir)
    if self.validating:
      return own
    return record.levelno >= logging.WARNING or own  # own: also train.py's per-arm eval lines


def main(argv) -> None:
  records = _KdjaxRecords()
  absl_logging.get_absl_handler().addFilter(records)
  if len(argv) > 1:
    fail(f"unexpected arguments {' '.join(argv[1:])}; use --config=FILE --workdir=DIR "
         "[--config.KEY=VALUE ...]")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None:
    fail("--config is required, e.g. --config=configs/default.py")
  if not workdir:
    fail("--workdir is required, e.g. --workdir=runs/default")

  # Import after flag parsing: JAX and TensorFlow take seconds to load, a bad flag should not.
  from kdjax import compilation  # pylint: disable=g-import-not-at-top
  from kdjax import distributed  # pylint: disable=g-import-not-at-top
  try:  # before anything touches a device: the mesh spans every process's devices
    distributed.initialize()
  except ValueError as e:
    fail(str(e))
  compilation.enable_persistent_cache()  # before the first compile; KDJAX_COMPILATION_CACHE=off
  from kdjax import study as study_lib  # pylint: disable=g-import-not-at-top
  from kdjax import preemption  # pylint: disable=g-import-not-at-top
  from kdjax import train  # pylint: disable=g-import-not-at-top
  from kdjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  primary = distributed.is_primary()  # with several processes, process 0 owns the workdir
  if not workdir_lib.is_local(workdir):
    try:
      workdir_lib.kvstore_spec(workdir)  # a store that Orbax and the lock can write to
    except ValueError as e:
      fail(str(e))
  records.validating = True
  try:
    study, _ = validate(config, workdir)
    if primary:
      # Checked again under the lock: a run that held it may have changed the workdir meanwhile.
      workdir_lib.lock(workdir)  # held until the process ends
      replace = _check_workdir_state(study, config, workdir)
  except (ValueError, RuntimeError) as e:  # ConfigError, the workdir's path, a busy workdir
    fail(str(e))
  records.validating = False
  if primary:
    if replace:
      for name in STAGE_DIRS:
        workdir_lib.rmtree(workdir_lib.join(workdir, name))
    # Without `mesh`: it describes this run's devices, and the analysis, which reads config.json
    # (also on one host, from a copy of a pod's workdir), lays out the devices it finds.
    record = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k != "mesh"}
    path = workdir_lib.join(workdir, "config.json")
    try:
      workdir_lib.write_text(path, json.dumps(record, indent=2, sort_keys=True))
    except OSError as e:  # written whole or not at all (kdjax.workdir.write_bytes)
      fail(f"cannot write {path} ({e.strerror or e}); free space and rerun the same command")
  distributed.barrier("kdjax: workdir ready")  # the others start once process 0 has written

  for stage in study.stages:
    try:
      if stage == "analysis":
        from kdjax import analysis  # pylint: disable=g-import-not-at-top
        analysis.run(workdir, command=" ".join(["python -m kdjax.main"] + sys.argv[1:]))
      else:
        train.run_stage(study, stage, workdir)
    except preemption.Preempted as e:
      print(f"kdjax: {e}", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except RuntimeError as e:  # e.g. a prerequisite checkpoint that cannot be read
      fail(str(e))


def _parse_flags(argv):
  """absl's parser, but a bad flag is one line and exit code 2 (absl prints a usage dump)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if isinstance(e.__context__, configfile.ConfigFileError):  # absl wraps a parser's ValueError
      fail(str(e.__context__))
    # ml_collections appends the config file's traceback: keep its first and last lines.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}")
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that is not there
    key = str(e).strip("\"' ")
    named = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
             a.split("=", 1)[0].rsplit(".", 1)[-1] == key]
    fail(f"{named[0] if named else key}: no such key in the config; the keys are those of the "
         "config file's get_config()")


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
