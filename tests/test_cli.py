"""Tests of `python -m kdjax.main` on bad input.

The contract (docs/design.md, "Public contracts"): invalid input gets exactly one non-empty line on
stderr naming the key and what is allowed, exit code 2, and nothing written. Every case runs
the real command in a subprocess (tests/_cli.py); the cases run concurrently (each pays the
Python/JAX/TF imports, about 2-10 s). Runs interrupted, resumed or refused for a busy workdir are
in test_reliability.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib

import _cli
import pytest

# name -> (extra arguments, the key the line must name, what it must say is allowed,
#          number of forced CPU devices)
BAD_INPUT = {
    "unknown_arm": (["--config.arms=kd,distill"], "--config.arms",
                    ["kd, rcd, siddo", "'kd,distill'"], 1),
    "unknown_model": (["--config.model=resnet9000"], "--config.model",
                      ["resnet9000", "resnet20", "cnn"], 1),
    "unknown_dataset": (["--config.dataset=imagenet_xxl"], "--config.dataset",
                        ["imagenet_xxl", "digits", "cifar10"], 1),
    "alpha_above_1": (["--config.alpha=0.5,1.5"], "--config.alpha", ["[0.0, 1.0]", "1.5"], 1),
    "temperature_0": (["--config.temperature=0"], "--config.temperature", ["(0.0, inf)"], 1),
    "negative_seeds": (["--config.num_seeds=-2"], "--config.num_seeds", [">= 1", "-2"], 1),
    "unknown_stage": (["--config.stages=teacher,distill"], "--config.stages",
                      ["teacher, students, analysis"], 1),
    "learning_rate_0": (["--config.optimizer.learning_rate=0"], "--config.optimizer.learning_rate",
                        ["(0.0, inf)"], 1),
    # On an explicit mesh of 2 replica shards 2 teachers fit; 3 arms x 1 seed = 3 students
    # do not (the default mesh would lay them out on data=2).
    "grid_does_not_fit_devices": (["--config.num_teachers=2", "--config.num_seeds=1",
                                   "--config.mesh.data=1"],
                                  "--config.num_seeds", ["3 replicas", "multiple of 2"], 2),
    # learning_rate lives under optimizer: a plausible slip.
    "unknown_key": (["--config.learning_rate=0.1"], "--config.learning_rate", ["no such key"], 1),
    "bad_value_type": (["--config.num_seeds=abc"], "--config.num_seeds", ["int", "abc"], 1),
    "missing_workdir": (["--no-workdir"], "--workdir", ["required"], 1),  # no --workdir flag
    # The bad value is a model keyword: the line should name model_kwargs, not model.
    "bad_model_kwarg": (["--config.model_kwargs.width=-1"], "--config.model_kwargs",
                        ["width", "(0, inf)"], 1),
    # The students stage needs a finished teacher stage in the workdir.
    "students_before_teacher": (["--config.stages=students"], "--config.stages",
                                ["teacher"], 1),
    "negative_epochs": (["--config.num_epochs=-1"], "--config.num_epochs", [">= 1", "-1"], 1),
    # -1 means "the students' num_epochs"; 0 used to be read that way too, silently.
    "teacher_epochs_0": (["--config.teacher_num_epochs=0"], "--config.teacher_num_epochs",
                         ["-1", ">= 1"], 1),
    "unknown_analysis": (["--config.analyses=kd_switch,bogus"], "--config.analyses",
                         ["kd_switch", "'kd_switch,bogus'"], 1),
    # Available but not prepared: the line says how to prepare it (TFDS's own warning about the
    # missing folder used to come first, a second line).
    "dataset_not_prepared": (["--config.dataset=mnist",
                              "--config.data_dir=/nonexistent/kdjax-test-data"],
                             "--config.dataset", ["mnist", "not prepared", "tfds build"], 1),
    # Optimiser numbers used to pass unchecked (a negative momentum trained; a negative decay
    # factor failed with a traceback after the workdir was written).
    "momentum_negative": (["--config.optimizer.momentum=-0.5"], "--config.optimizer.momentum",
                          ["[0, 1)", "-0.5"], 1),
    "decay_factor_0": (["--config.optimizer.schedule=step", "--config.optimizer.decay_factor=0.0"],
                       "--config.optimizer.decay_factor", ["(0, inf)"], 1),
    "decay_boundary_above_1": (["--config.optimizer.schedule=step",
                                "--config.optimizer.decay_boundaries=(0.5,1.5)"],
                               "--config.optimizer.decay_boundaries", ["[0, 1]", "1.5"], 1),
}
# A real run kept cheap: 2 steps of a 12-unit MLP (a cnn's init alone compiles for ~10 s).
TINY = ["--config.stages=teacher", "--config.num_epochs=1", "--config.batch_size=600",
        "--config.model=mlp", "--config.model_kwargs.width=0.05"]


def _other_study(base: pathlib.Path) -> dict:
  """A finished tiny run, then the same workdir asked for another study (num_seeds 8 -> 4):
  refused, then allowed with --config.overwrite=True."""
  workdir = base / "study"
  env = _cli.env(1, base / "xla_cache")
  out = {"first": _cli.main(TINY, workdir, env)}
  out["digest_before"] = _cli.digest(workdir) if workdir.exists() else {}
  out["refused"] = _cli.main([*TINY, "--config.num_seeds=4"], workdir, env)
  out["digest_after"] = _cli.digest(workdir) if workdir.exists() else {}
  out["overwrite"] = _cli.main([*TINY, "--config.num_seeds=4", "--config.overwrite=True"],
                               workdir, env)
  out["config_after"] = json.loads((workdir / "config.json").read_text())
  out["workdir"] = workdir
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every case's finished subprocess(es), run concurrently."""
  base = tmp_path_factory.mktemp("cli")
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    other = pool.submit(_other_study, base / "other_study")
    futures = {}
    for name, (args, _, _, devices) in BAD_INPUT.items():
      workdir = None if "--no-workdir" in args else base / name / "workdir"
      args = [a for a in args if a != "--no-workdir"]
      futures[name] = (workdir, pool.submit(_cli.main, args, workdir, _cli.env(devices)))
    results = {name: (workdir, f.result()) for name, (workdir, f) in futures.items()}
    results["other_study"] = other.result()
  return results


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_nothing_written(name, runs):
  _, key, allowed, _ = BAD_INPUT[name]
  workdir, proc = runs[name]
  line = _cli.one_error_line(proc)
  assert key in line, line
  for words in allowed:
    assert words in line, f"{words!r} not in {line!r}"
  assert proc.stdout.strip() == "", proc.stdout
  if workdir is not None:
    assert not workdir.exists(), line


def test_a_workdir_holding_another_study_is_refused_unless_overwrite(runs):
  out = runs["other_study"]
  assert out["first"].returncode == 0, out["first"].stderr[-3000:]
  assert out["digest_before"] and "config.json" in out["digest_before"]
  line = _cli.one_error_line(out["refused"])
  for words in ("--config.overwrite", "num_seeds", "--config.overwrite=True", "--workdir"):
    assert words in line, f"{words!r} not in {line!r}"
  assert out["digest_after"] == out["digest_before"], "the refused run wrote into the workdir"
  assert out["overwrite"].returncode == 0, out["overwrite"].stderr[-3000:]
  assert out["config_after"]["num_seeds"] == 4
  assert (out["workdir"] / "teacher" / "checkpoints").is_dir()


def test_the_console_keeps_kdjax_records_by_package_not_by_path_text(tmp_path):
  """kdjax.main's log filter keeps kdjax's own INFO lines and drops other libraries' INFO lines,
  also when the checkout (and its .venv) lives in a directory named kdjax, where a library's
  path contains "/kdjax/" too."""
  import logging  # pylint: disable=g-import-not-at-top
  from kdjax import main as main_lib  # pylint: disable=g-import-not-at-top
  records = main_lib._KdjaxRecords()  # pylint: disable=protected-access

  def record(path, level=logging.INFO):
    return logging.LogRecord("x", level, str(path), 1, "message", None, None)

  own = pathlib.Path(main_lib.__file__).parent / "train.py"
  library = tmp_path / "kdjax" / ".venv" / "lib" / "site-packages" / "orbax" / "checkpoint.py"
  assert records.filter(record(own))
  assert not records.filter(record(library))
  assert records.filter(record(library, logging.WARNING))  # other libraries' warnings stay
  records.validating = True  # while validating: kdjax's records only
  assert records.filter(record(own)) and not records.filter(record(library, logging.WARNING))
