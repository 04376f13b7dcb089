"""Similarity over training (issue 15 item 6): the students stage's curves.json, its TensorBoard
scalars, metrics.json's `curves` and plots/curves.png.

References: the analysis' own final metrics (same final checkpoint), a numpy recomputation from
predictions.npz (float64, the docs/design.md definitions), numpy means/min/max of the recorded
values, and an uninterrupted run for the resumed one."""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest

from test_engine import compilation_cache  # noqa: F401  (its module-scoped autouse fixture)
from test_engine_training import fast_compilation  # noqa: F401  (module-scoped autouse fixture)
from test_engine_training import optimizations_disabled
from test_groups import config_from_flags, run_in_process

CURVE_METRICS = ("accuracy", "agreement", "agree_when_teacher_correct",
                 "agree_when_teacher_incorrect", "js_divergence")
# Digits' 1198 train examples at batch 64: 19 steps; evals at 5, 10, 15 and the last step.
FLAGS = ["--config.model=mlp", "--config.num_seeds=2", "--config.num_epochs=1",
         "--config.teacher_num_epochs=1", "--config.num_teachers=2", "--config.execution=vmap",
         "--config.eval_every_steps=5", "--config.checkpoint_every_steps=7",
         "--config.log_every_steps=5"]
STEPS = [5, 10, 15, 19]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("curves") / "wd")
  run_in_process(config_from_flags(FLAGS), workdir)
  with open(os.path.join(workdir, "students", "curves.json")) as f:
    saved = json.load(f)
  with open(os.path.join(workdir, "analysis", "metrics.json")) as f:
    metrics = json.load(f)
  with np.load(os.path.join(workdir, "analysis", "predictions.npz")) as npz:
    preds = {k: npz[k] for k in npz.files}
  return {"workdir": workdir, "saved": saved, "metrics": metrics, "preds": preds}


def np_curve_metrics(s, t, y) -> dict[str, float]:
  """accuracy, agreement (all / teacher correct / teacher incorrect), JS divergence, float64."""
  s, t = s.astype(np.float64), t.astype(np.float64)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  log_p, log_q = log_softmax(s), log_softmax(t)
  p, q = np.exp(log_p), np.exp(log_q)
  m = 0.5 * (p + q)
  js = 0.5 * np.sum(p * (log_p - np.log(m)), -1) + 0.5 * np.sum(q * (log_q - np.log(m)), -1)
  agree = s.argmax(-1) == t.argmax(-1)
  right = t.argmax(-1) == y
  return {"accuracy": float(np.mean(s.argmax(-1) == y)), "agreement": float(agree.mean()),
          "agree_when_teacher_correct": float(agree[right].mean()) if right.any() else np.nan,
          "agree_when_teacher_incorrect": float(agree[~right].mean()) if (~right).any()
          else np.nan, "js_divergence": float(js.mean())}


def test_final_point_equals_the_analysis_and_numpy(study):
  saved, metrics, preds = study["saved"], study["metrics"], study["preds"]
  assert saved["metrics"] == list(CURVE_METRICS)
  assert [p["step"] for p in saved["points"]] == STEPS
  last = saved["points"][-1]
  for r, replica in enumerate(metrics["replicas"]):
    ref = np_curve_metrics(preds["student_logits"][r],
                           preds["teacher_logits"][preds["replica_teacher"][r]], preds["labels"])
    for m in CURVE_METRICS:
      # The analysis' own final metrics: same checkpoint, same batches, same kdjax.metrics.
      np.testing.assert_allclose(last[m][r], replica["metrics"][m], rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(last[m][r], ref[m], rtol=1e-4, atol=1e-6)


def test_metrics_json_curves_per_replica_and_arm(study):
  saved, curves = study["saved"], study["metrics"]["curves"]
  assert curves["steps"] == STEPS and curves["metrics"] == list(CURVE_METRICS)
  values = {m: np.array([p[m] for p in saved["points"]], np.float64) for m in CURVE_METRICS}
  for k, row in enumerate(curves["replicas"]):
    assert row["index"] == k
    for m in CURVE_METRICS:
      np.testing.assert_array_equal(row["values"][m], values[m][:, k])
  for name, group in study["metrics"]["groups"].items():
    for m in CURVE_METRICS:
      block = values[m][:, group["replicas"]]
      entry = curves["arms"][name][m]
      np.testing.assert_allclose(entry["mean"], block.mean(1), rtol=1e-12)
      np.testing.assert_allclose(entry["min"], block.min(1), rtol=1e-12)
      np.testing.assert_allclose(entry["max"], block.max(1), rtol=1e-12)
      assert entry["n"] == [len(group["replicas"])] * len(STEPS)
  png = os.path.join(study["workdir"], "analysis", "plots", "curves.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(study["workdir"], "analysis", "report.md")) as f:
    assert "plots/curves.png" in f.read()


def test_tensorboard_scalars_equal_curves_json(study):
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(os.path.join(study["workdir"], "students"))
  acc.Reload()
  saved = study["saved"]
  for k, replica in enumerate(saved["replicas"]):
    tag = f"replica_{k:03d}_{replica['arm']}_s{replica['seed']}"
    for m in CURVE_METRICS[1:]:
      got = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
             for e in acc.Tensors(f"{tag}/{m}")}
      expected = {p["step"]: p[m][k] for p in saved["points"]}
      assert sorted(got) == STEPS
      np.testing.assert_allclose([got[s] for s in STEPS], [expected[s] for s in STEPS],
                                 rtol=1e-6)
    acc_tag = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
               for e in acc.Tensors(f"{tag}/eval_accuracy")}
    np.testing.assert_allclose([acc_tag[s] for s in STEPS],
                               [p["accuracy"][k] for p in saved["points"]], rtol=1e-6)
  arm = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
         for e in acc.Tensors("arm_kd/agreement")}
  kd = [k for k, r in enumerate(saved["replicas"]) if r["arm"] == "kd"]
  np.testing.assert_allclose([arm[s] for s in STEPS],
                             [np.mean([p["agreement"][k] for k in kd]) for p in saved["points"]],
                             rtol=1e-6)


def test_resume_keeps_the_curves_complete(study, tmp_path, monkeypatch):
  """Stopped at step 12 (checkpoint saved there), with a stale point at step 15 left in
  curves.json (as an eval written after the last checkpoint before a kill -9 leaves it), the
  resumed run ends with the uninterrupted run's curves."""
  from kdjax import preemption, study as study_lib, train
  resumed = tmp_path / "resumed"
  os.makedirs(resumed)
  shutil.copytree(os.path.join(study["workdir"], "teacher"), resumed / "teacher")
  spec = study_lib.resolve(config_from_flags(FLAGS))

  def poll(self, step):
    if step >= 12:
      self.signum = signal.SIGTERM
    return self.signum is not None

  monkeypatch.setattr(preemption.StopRequests, "poll", poll)
  with optimizations_disabled(), pytest.raises(preemption.Preempted):
    train.run_stage(spec, "students", str(resumed))
  monkeypatch.undo()
  path = resumed / "students" / "curves.json"
  partial = json.loads(path.read_text())
  assert [p["step"] for p in partial["points"]] == [5, 10]
  stale = dict(partial["points"][-1], step=15)
  stale["agreement"] = [-1.0] * len(stale["agreement"])
  path.write_text(json.dumps(dict(partial, points=partial["points"] + [stale])))
  with optimizations_disabled():
    train.run_stage(spec, "students", str(resumed))
  assert json.loads(path.read_text()) == study["saved"]
