"""configs/capacity_mismatch.py (arXiv 2405.13078): the fgcr arm and RegT teachers, the class
relations the engine gives fgcr, and the `capacity` section.

References are independent: the losses re-implemented in numpy; the class relations from a
numpy softmax of a hand-made linear "teacher"; the section's numbers recomputed from
predictions.npz with numpy and scipy.stats (spearmanr, kendalltau)."""

from __future__ import annotations

import json
import pathlib
import types

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from kdjax import arms as arms_lib
from kdjax import data as data_lib
from kdjax import study as study_lib
from kdjax import train
# A persistent compilation cache for the module: the study's groups share their equal programs.
from test_engine import compilation_cache  # noqa: F401  (its module-scoped autouse fixture)
from test_groups import config_from_flags, run_in_process

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "capacity_mismatch.py"


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _hp(alpha, temperature):
  return arms_lib.ReplicaHParams(
      alpha=jnp.float32(alpha), temperature=jnp.float32(temperature),
      label_smoothing=jnp.float32(0.0), kd_start=jnp.int32(0), kd_stop=jnp.int32(10**6),
      teacher_slot=jnp.int32(0), member_slots=jnp.zeros(1, jnp.int32),
      member_weights=jnp.zeros(1, jnp.float32))


@pytest.fixture(scope="module")
def logits():
  rng = np.random.default_rng(0)
  s = rng.normal(0, 2, (6, 5)).astype(np.float32)
  t = rng.normal(0, 3, (6, 5)).astype(np.float32)
  y = rng.integers(0, 5, 6)
  relations = _softmax(rng.normal(0, 1, (5, 5))).astype(np.float32)
  return s, t, y, relations


@pytest.mark.parametrize("alpha,temperature,fusion", [(0.9, 4.0, 0.5), (0.5, 1.0, 0.0),
                                                      (1.0, 2.0, 1.0)])
def test_fgcr_arm_equals_numpy(logits, alpha, temperature, fusion):
  s, t, y, relations = logits
  options = arms_lib.LossOptions(fgcr_fusion=fusion)
  got = arms_lib.kind_loss("fgcr", s, t, y, _hp(alpha, temperature), 0, options,
                           class_relations=relations)
  # Fused at T = 1 (the relations' temperature), then softened: q^T = q^(1/T), renormalised.
  fused = (1 - fusion) * _softmax(t.astype(np.float64)) + fusion * relations[y]
  q = fused**(1 / temperature) / np.sum(fused**(1 / temperature), -1, keepdims=True)
  log_ps = np.log(_softmax(s / temperature))
  kl = np.sum(np.where(q > 0, q * (np.log(np.maximum(q, 1e-300)) - log_ps), 0.0), -1)
  ce = -np.log(_softmax(s))[np.arange(len(y)), y]
  expected = (1 - alpha) * ce + alpha * temperature**2 * kl
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-6)


def test_regt_teacher_loss_equals_numpy(logits):
  _, t, y, _ = logits
  options = arms_lib.LossOptions(regt_weight=0.7)
  got = arms_lib.kind_loss("regt", t, None, y, _hp(0.0, 1.0), 0, options)
  c = t.shape[-1]
  expected = []
  for row, label in zip(t, y):
    rest = np.delete(row, label)
    p_hat = _softmax(rest) * (c - 1)
    ce = -np.log(_softmax(row)[label])
    expected.append(ce - 0.7 * np.var(p_hat) / (c - 2))  # the reward's maximum is C - 2
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_class_relations_of_a_teacher_group_on_the_train_split():
  """train.class_relations: per teacher, the mean softmax of each class's train examples."""
  spec = data_lib.spec("digits")
  split = data_lib.load("digits", "train")
  dim = int(np.prod(spec.input_shape))
  weights = np.random.default_rng(1).normal(0, 0.05, (2, dim, spec.num_classes)).astype(np.float32)

  def predict(variables, x):
    del variables
    return jnp.einsum("bd,tdc->tbc", x.reshape(x.shape[0], -1), weights)

  engine = types.SimpleNamespace(dataset=spec, replicated=None, predict=predict)
  got = train.class_relations(engine, None, split, batch_size=256)
  x = np.asarray(data_lib.eval_batch(data_lib.to_device(split), spec,
                                     np.arange(len(split["label"])),
                                     np.ones(len(split["label"])))[spec.input_key])
  labels = np.asarray(split["label"])
  assert got.shape == (2, spec.num_classes, spec.num_classes)
  for j in range(2):
    probs = _softmax(x.reshape(len(labels), -1).astype(np.float64) @ weights[j])
    expected = np.stack([probs[labels == c].mean(0) for c in range(spec.num_classes)])
    np.testing.assert_allclose(got[j], expected, rtol=1e-4, atol=1e-6)


def test_smoke_config_resolves_to_four_teacher_capacities_and_paired_students():
  study = study_lib.resolve(study_lib.load_config(str(CONFIG), "smoke"))
  assert [t.model for t in study.teacher.replicas] == [
      f"cnn(width={w})" for w in ("0.25", "0.5", "1", "2")]
  assert study.analyses == ("capacity",)
  rows = {(r.arm, r.teacher_model) for r in study.students.replicas}
  for arm in ("kd", "ats", "isats", "fgcr"):  # every distilling arm learns from every teacher
    assert {m for a, m in rows if a == arm} == {t.model for t in study.teacher.replicas}
  assert ("onehot", "") in rows
  assert all(a.loss == "ce" for g in study.teacher.groups for a in g.arms())


def test_regt_variant_trains_teachers_with_regt_and_bad_options_are_named():
  config = study_lib.load_config(str(CONFIG), "smoke,regt")
  study = study_lib.resolve(config)
  assert all(a.loss == "regt" for g in study.teacher.groups for a in g.arms())
  assert {r.arm for r in study.students.replicas} == {"kd"}
  for key, value, match in (("teacher_loss", "mse", "teacher_loss"),
                            ("fgcr_fusion", 1.5, "fgcr_fusion"),
                            ("regt_weight", -1.0, "regt_weight")):
    bad = study_lib.load_config(str(CONFIG), "smoke")
    bad.arm_options[key] = value
    with pytest.raises(study_lib.ConfigError, match=match):
      study_lib.resolve(bad)
  with pytest.raises(ValueError, match="SIZE"):
    study_lib.load_config(str(CONFIG), "cifar10")
  paper = study_lib.load_config(str(CONFIG), "paper")
  assert paper.dataset == "cifar100" and paper.teacher_model.count(",") == 3


@pytest.fixture(scope="module")
def capacity_run(tmp_path_factory):
  """Below smoke size: MLP teachers of widths 0.05 and 0.2 trained with RegT, kd/fgcr/onehot
  students, 1 seed, 1 epoch, run in this process (tests/test_groups.py, `run_in_process`).
  Compiling is most of the run: vmapped replicas (MLPs are not slow vmapped on XLA:CPU) compile
  one step per group instead of one per replica; the section does not depend on it."""
  workdir = tmp_path_factory.mktemp("capacity") / "wd"
  config = config_from_flags(
      ["--config.model=mlp", "--config.teacher_model=mlp", "--config.model_kwargs.width=0.05",
       "--config.teacher_model_grid.width=0.05,0.2", "--config.arms=kd,fgcr,onehot",
       "--config.num_seeds=1", "--config.num_epochs=1", "--config.batch_size=100",
       "--config.arm_options.teacher_loss=regt", "--config.execution=vmap"],
      config=f"--config={CONFIG}:smoke")
  run_in_process(config, workdir)
  return workdir


def test_capacity_section_equals_a_numpy_scipy_recomputation(capacity_run):
  results = json.loads((capacity_run / "analysis" / "metrics.json").read_text())
  table = results["analyses"]["capacity"]
  preds = np.load(capacity_run / "analysis" / "predictions.npz")
  labels, t_logits = preds["labels"], preds["teacher_logits"].astype(np.float64)
  num_classes = t_logits.shape[-1]
  models = list(preds["teacher_model"])
  assert [t["model"] for t in table["teachers"]] == models  # already in capacity order
  assert table["teachers"][0]["num_params"] < table["teachers"][1]["num_params"]
  rows = np.arange(len(labels))
  for j, entry in enumerate(table["teachers"]):
    probs = _softmax(t_logits[j])
    nontarget = np.stack([np.delete(p, y) for p, y in zip(probs, labels)])
    assert entry["nontarget_variance"] == pytest.approx(np.var(nontarget, 1).mean(), rel=1e-4)
    assert entry["accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == labels), abs=1e-9)
  k = table["k"]
  assert k == 5
  (pair,) = table["rank_consistency"]
  spearman, kendall, overlap = [], [], []
  for n in rows:
    a = np.delete(t_logits[0, n], labels[n])
    b = np.delete(t_logits[1, n], labels[n])
    spearman.append(scipy_stats.spearmanr(a, b).statistic)
    kendall.append(scipy_stats.kendalltau(a, b).statistic)
    overlap.append(len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k)
  assert pair["spearman"] == pytest.approx(np.nanmean(spearman), abs=1e-5)
  assert pair["kendall"] == pytest.approx(np.nanmean(kendall), abs=1e-5)
  assert pair["topk_overlap"] == pytest.approx(np.mean(overlap), abs=1e-6)
  accuracy = np.mean(preds["student_logits"].argmax(-1) == labels, axis=1)
  for arm, per_model in table["student_accuracy"].items():
    for model, cell in per_model.items():
      on = preds["replica_arm"] == arm
      if model != "-":
        on &= preds["teacher_model"][preds["replica_teacher"]] == model
      assert cell["n"] == on.sum() and cell["mean"] == pytest.approx(accuracy[on].mean())
  assert set(table["student_accuracy"]) == {"kd", "fgcr", "onehot"}
  assert set(table["student_accuracy"]["fgcr"]) == set(models)
  assert list(table["student_accuracy"]["onehot"]) == ["-"]
  assert num_classes == 10
  for name in ("capacity_variance.png", "capacity_students.png"):
    assert (capacity_run / "analysis" / "plots" / name).stat().st_size > 5_000
  assert "## Teacher capacity" in (capacity_run / "analysis" / "report.md").read_text()
