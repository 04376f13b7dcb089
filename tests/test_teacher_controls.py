"""Issue 16 in a whole study: calibrated, corrected and correct-only teachers and a mutual-learning
cohort, trained in this process; the analysis' `teacher_calibration` and `cohorts` against numpy
recomputations from predictions.npz and the validation split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import special

from kdjax import train
from kdjax.analysis import predictions as predictions_lib

# pylint: disable=unused-import
from test_engine import compilation_cache  # noqa: F401  (its module-scoped autouse fixture)
from test_engine_training import fast_compilation  # noqa: F401  (module-scoped autouse fixture)
from test_groups import _config, run_in_process

ARMS = "kd,kd_calibrated,kd_corrected,kd_correct_only,mutual,ctkd"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("teacher_controls")
  config = _config(teacher_model="", model_grid={}, arms=ARMS, num_seeds=2, num_teachers=1,
                   val_fraction=0.25, num_epochs=2, teacher_num_epochs=3)
  run_in_process(config, path)
  return path


def _read(workdir, name):
  return json.loads((workdir / "analysis" / name).read_text())


def _np_nll(logits, labels, temperature=1.0):
  log_p = special.log_softmax(np.asarray(logits, np.float64) / temperature, -1)
  return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def _np_ece(logits, labels, num_bins=15):
  p = special.softmax(np.asarray(logits, np.float64), -1)
  confidence, predicted = p.max(-1), p.argmax(-1)
  # kdjax.metrics' right-closed bins ((b - 1)/B, b/B], b = 1..B
  bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    inside = bins == b
    if inside.any():
      ece += inside.mean() * abs(confidence[inside].mean() - (predicted[inside] ==
                                                              labels[inside]).mean())
  return ece


def test_teacher_calibration_is_the_validation_nll_minimum_and_reports_eval_ece(workdir):
  """The recorded temperature minimises the validation NLL (a dense scan of the teacher's
  validation logits, recomputed here from its checkpoint), and the eval split's ECE and NLL
  before and after equal numpy's on predictions.npz's teacher logits."""
  record = _read(workdir, "metrics.json")["teacher_calibration"]
  assert record["num_val"] == round(0.25 * 1198) and len(record["teachers"]) == 1
  (teacher,) = record["teachers"]
  t = teacher["temperature"]
  study = predictions_lib.load_study(str(workdir))
  engines, states = train.load_final_state(study, str(workdir), "teacher")
  val_logits = train.split_logits(engines[0], states[engines[0].group.key].variables(),
                                  study.data["val"], 256)[0]
  val_labels = study.data["val"]["label"]
  grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))
  scan = [_np_nll(val_logits, val_labels, g) for g in grid]
  assert abs(np.log(t) - np.log(grid[int(np.argmin(scan))])) < 2 * np.log(grid[1] / grid[0])
  assert _np_nll(val_logits, val_labels, t) <= min(scan) + 1e-6
  # The reliability scores of reliability-weighted ensembles.
  np.testing.assert_allclose(teacher["val_accuracy"], np.mean(val_logits.argmax(-1) == val_labels))
  np.testing.assert_allclose(teacher["val_confidence"],
                             np.mean(special.softmax(val_logits / t, -1).max(-1)), rtol=1e-5)
  preds = np.load(workdir / "analysis" / "predictions.npz")
  logits, labels = preds["teacher_logits"][0], preds["labels"]
  test = teacher["test"]
  np.testing.assert_allclose(test["nll_before"], _np_nll(logits, labels), rtol=1e-4)
  np.testing.assert_allclose(test["nll_after"], _np_nll(logits, labels, t), rtol=1e-4)
  np.testing.assert_allclose(test["ece_before"], _np_ece(logits, labels), atol=1e-5)
  np.testing.assert_allclose(test["ece_after"], _np_ece(logits / t, labels), atol=1e-5)
  assert "## Teacher calibration" in (workdir / "analysis" / "report.md").read_text()


def test_cohort_peer_similarity_equals_numpy(workdir):
  """mutual's cohort (seeds 0 and 1): agreement, JS and KL between the two peers' eval logits,
  recomputed in numpy from predictions.npz."""
  results = _read(workdir, "metrics.json")
  preds = np.load(workdir / "analysis" / "predictions.npz")
  arms = list(preds["replica_arm"])
  a, b = [i for i, arm in enumerate(arms) if arm == "mutual"]
  (cohort,) = results["cohorts"]["cohorts"]
  assert cohort["members"] == [a, b]
  p, q = (special.softmax(preds["student_logits"][i].astype(np.float64), -1) for i in (a, b))
  m = (p + q) / 2
  kl = lambda x, y: np.sum(x * (np.log(x) - np.log(y)), -1)
  expected = {"agreement": np.mean(p.argmax(-1) == q.argmax(-1)),
              "js_divergence": np.mean(0.5 * kl(p, m) + 0.5 * kl(q, m)),
              "kl_divergence": np.mean(kl(p, q))}
  for metric, value in expected.items():
    np.testing.assert_allclose(cohort["mean"][metric], value, rtol=1e-4, atol=1e-6,
                               err_msg=metric)
    assert results["cohorts"]["arms"]["mutual"][metric]["n"] == 1
  assert "## Mutual learning: peer similarity" in (workdir / "analysis" / "report.md").read_text()
  # Every arm of the study was trained and analysed.
  assert set(results["arms"]) == set(ARMS.split(","))


def test_ctkd_learned_temperatures_are_read_from_the_checkpoint(workdir):
  """The final T = 1 + 20 sigmoid(theta) of each ctkd student, theta from its checkpoint's
  parameters (kdjax.engine.LEARNED_TEMPERATURE), which training moved from its start of 1."""
  record = _read(workdir, "metrics.json")["learned_temperatures"]
  study = predictions_lib.load_study(str(workdir))
  engines, states = train.load_final_state(study, str(workdir), "students")
  (engine,) = engines
  thetas = np.asarray(states[engine.group.key].params["ctkd_temperature"])
  ctkd = [r.index for r in study.students.replicas if r.arm == "ctkd"]
  assert [row["index"] for row in record["replicas"]] == ctkd and len(ctkd) == 2
  for row in record["replicas"]:
    theta = thetas[list(engine.group.indices).index(row["index"])]
    assert theta != 1.0
    np.testing.assert_allclose(row["theta"], theta)
    np.testing.assert_allclose(row["temperature"], 1 + 20 / (1 + np.exp(-theta)), rtol=1e-6)
  np.testing.assert_allclose(record["arms"]["ctkd"]["mean"],
                             np.mean([row["temperature"] for row in record["replicas"]]))
  assert "## CTKD: learned temperatures" in (workdir / "analysis" / "report.md").read_text()


@pytest.fixture(scope="module")
def partial_workdir(tmp_path_factory):
  """Teachers trained on classes 0-4 of digits; students kd, kd_known, siddo on all 10."""
  path = tmp_path_factory.mktemp("known_classes")
  config = _config(teacher_model="", model_grid={}, arms="kd,kd_known,siddo", num_seeds=2,
                   num_teachers=1, teacher_classes="0-4", num_epochs=2, teacher_num_epochs=3)
  run_in_process(config, path)
  return path


def test_teachers_of_a_class_subset_train_on_its_examples_only(partial_workdir):
  study = predictions_lib.load_study(str(partial_workdir))
  labels = study.data["train"]["label"]
  assert study.teacher_classes == (0, 1, 2, 3, 4)
  np.testing.assert_array_equal(study.data["teacher_train"]["label"], labels[labels < 5])
  assert study.num_teacher_train == int(np.sum(labels < 5))
  assert study.teacher.steps_per_epoch == -(-study.num_teacher_train // study.run.batch_size)
  assert study.students.steps_per_epoch == -(-len(labels) // study.run.batch_size)


def test_known_and_novel_class_split_equals_numpy(partial_workdir):
  """Accuracy and agreement on eval examples of the teachers' classes and of the others, per
  replica and per arm, from predictions.npz; the teacher never predicts a class it never saw."""
  record = _read(partial_workdir, "metrics.json")["known_classes"]
  preds = np.load(partial_workdir / "analysis" / "predictions.npz")
  labels = preds["labels"]
  known = labels < 5
  assert (record["num_known"], record["num_novel"]) == (int(known.sum()), int((~known).sum()))
  teacher = preds["teacher_logits"][0].argmax(-1)
  assert record["teachers"][0]["novel"]["accuracy"] == 0.0
  np.testing.assert_allclose(record["teachers"][0]["known"]["accuracy"],
                             np.mean(teacher[known] == labels[known]))
  per_arm = {}
  for i, arm in enumerate(preds["replica_arm"]):
    student = preds["student_logits"][i].argmax(-1)
    row = record["replicas"][i]
    for part, mask in (("known", known), ("novel", ~known)):
      np.testing.assert_allclose(row[part]["accuracy"], np.mean(student[mask] == labels[mask]))
      np.testing.assert_allclose(row[part]["agreement"], np.mean(student[mask] == teacher[mask]))
    per_arm.setdefault(str(arm), []).append(row["novel"]["accuracy"])
  for arm, values in per_arm.items():
    np.testing.assert_allclose(record["arms"][arm]["novel"]["accuracy"]["mean"], np.mean(values))
    np.testing.assert_allclose(record["arms"][arm]["novel"]["accuracy"]["std"],
                               np.std(values, ddof=1))
  assert "## Known and novel classes" in (partial_workdir / "analysis" / "report.md").read_text()
