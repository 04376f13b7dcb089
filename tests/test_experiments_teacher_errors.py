"""configs/teacher_errors.py: removing the teacher's errors, or its miscalibration, from KD.

No training here (the smoke study takes about a minute): the config resolves for every SIZE,
holds the arms and the validation split its docstring claims, pairs every student with a partner
of the same seed in every other arm (so the analysis runs Wilcoxon signed-rank tests), has the
seeds for a Holm-corrected verdict, and its docstring's table of sizes is the study it builds."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

from kdjax import stats
from kdjax import study as study_lib
from kdjax.analysis import predictions as predictions_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "teacher_errors.py"
ARMS = {"kd", "kd_correct_only", "kd_corrected", "kd_calibrated", "siddo", "rcd"}
SIZES = ("smoke", "mnist1d")


def _resolve(arg):
  return study_lib.resolve(study_lib.load_config(str(CONFIG), arg))


def _docstring_table() -> dict[str, dict]:
  """The docstring's rows `SIZE  data  model  T / S  seeds  students` (columns 2+ spaces apart)."""
  spec = importlib.util.spec_from_file_location("teacher_errors_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  rows = {}
  for line in module.__doc__.splitlines():
    cells = re.split(r"\s{2,}", line.strip())
    if len(cells) == 6 and cells[0] in SIZES:
      teacher_epochs, student_epochs = (int(v) for v in cells[3].split(" / "))
      rows[cells[0]] = {"dataset": cells[1], "model": cells[2], "teacher_epochs": teacher_epochs,
                        "student_epochs": student_epochs, "seeds": int(cells[4]),
                        "students": int(cells[5])}
  return rows


@pytest.mark.parametrize("arg", [None, "smoke", "mnist1d"])
def test_every_size_has_the_arms_and_the_validation_split(arg):
  study = _resolve(arg)
  assert study.dataset.name == ("mnist1d" if arg == "mnist1d" else "digits")
  assert {r.arm for r in study.students.replicas} == ARMS
  assert study.val_fraction == 0.1
  total = study.num_train + study.num_val
  assert study.num_val == round(0.1 * total) and study.num_val > 0
  assert len(study.teacher.replicas) == 1
  # Self-distillation: every student starts from the teacher's parameters, kd-like arms at
  # alpha 0.5 and T = 1.
  assert {r.init for r in study.students.replicas} == {"teacher"}
  assert {(r.alpha, r.temperature) for r in study.students.replicas if r.arm != "siddo"} == {
      (0.5, 1.0)}


@pytest.mark.parametrize("arg", SIZES)
def test_every_student_has_a_seed_matched_partner_and_a_verdict_is_possible(arg):
  """Each arm holds seeds 0..n-1 of the one teacher, so kd meets every arm in n pairs (the
  analysis's Wilcoxon test); n reaches a Holm-corrected p <= 0.05 over the report's metrics."""
  study = _resolve(arg)
  keys = {}
  for r in study.students.replicas:
    keys.setdefault(r.arm, []).append((r.seed, r.teacher))
  seeds = study.config.num_seeds
  for arm, arm_keys in keys.items():
    assert sorted(arm_keys) == [(s, 0) for s in range(seeds)], arm
  num_metrics = len(predictions_lib.METRICS)
  assert num_metrics == 10
  needed = stats.seeds_for_verdict("wilcoxon", num_metrics)
  assert needed == 9 and seeds >= needed
  assert num_metrics * stats.min_p_value("wilcoxon", seeds) <= 0.05
  assert num_metrics * stats.min_p_value("wilcoxon", 8) > 0.05  # the default study's 8 cannot


def test_the_docstring_table_is_the_study():
  table = _docstring_table()
  assert set(table) == set(SIZES)
  for size, row in table.items():
    study = _resolve(size)
    assert study.dataset.name == row["dataset"], size
    assert [g.model.label for g in study.students.groups] == [row["model"]], size
    assert [g.model.label for g in study.teacher.groups] == [row["model"]], size
    assert study.teacher.num_epochs == row["teacher_epochs"], size
    assert study.students.num_epochs == row["student_epochs"], size
    assert study.config.num_seeds == row["seeds"], size
    assert len(study.students.replicas) == row["students"] == len(ARMS) * row["seeds"], size


def test_the_calibrated_arm_needs_the_validation_split():
  config = study_lib.load_config(str(CONFIG), "smoke")
  config.val_fraction = 0.0
  with pytest.raises(study_lib.ConfigError, match="val_fraction"):
    study_lib.resolve(config)


@pytest.mark.parametrize("arg", ["cifar10", "smoke,width", "digits"])
def test_bad_arguments_name_what_is_allowed(arg):
  with pytest.raises(ValueError, match="SIZE one of smoke, mnist1d"):
    study_lib.load_config(str(CONFIG), arg)
