"""Tests of the arXiv 2301.12923 experiments: configs/deviation_switch.py, configs/linear_eigen.py,
their analysis sections (kdjax/analysis/deviation.py, kdjax/analysis/eigen.py) and `kd_windows`.

Each config runs once per module from command-line flags, in this process (tests/test_groups.py,
`run_in_process`), made smaller than its smoke size (an MLP and 1 epoch for the switch study; 300
synthetic points and 8 + 24 GD steps for the linear study), with vmapped replicas (no convolutions
here, so vmap is not slow on XLA:CPU, and it compiles one step for all replicas instead of one per
replica). The references are independent: the sections' numbers are recomputed in numpy from
predictions.npz, from a numpy forward pass of the final checkpoint (train split), and from a numpy
re-implementation of full-batch gradient descent on the same synthetic data, started from the
documented initialisation key.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import models
from kdjax import replicas as replicas_lib
from kdjax import study as study_lib
from kdjax import train
from kdjax.analysis import deviation
from kdjax.analysis import eigen
from kdjax.analysis import predictions as predictions_lib
from kdjax.analysis import sections
from kdjax.data import synthetic
from test_groups import config_from_flags, run_in_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOWS = "0-1,0.5-1,0-0.5"
SWITCH_FLAGS = ["--config=configs/deviation_switch.py:smoke", "--config.model=mlp",
                "--config.num_seeds=2", "--config.num_epochs=1", "--config.teacher_num_epochs=1",
                f"--config.kd_windows={WINDOWS}", "--config.execution=vmap"]
# The class-similarity variant made tiny: 6 classes in 2 superclasses, 12 dimensions.
SYNTHETIC = ("classes=6,superclasses=2,separation=4,class_separation=1,dim=12,n_train=300,"
             "n_test=200,decay=1,label_noise=0,seed=0")
TEACHER_STEPS, STUDENT_STEPS, LR = 8, 24, 0.3
EIGEN_FLAGS = ["--config=configs/linear_eigen.py:smoke,superclass",
               f"--config.dataset=synthetic:{SYNTHETIC}", "--config.batch_size=300",
               f"--config.teacher_num_epochs={TEACHER_STEPS}",
               f"--config.num_epochs={STUDENT_STEPS}", "--config.eval_batch_size=200",
               f"--config.optimizer.learning_rate={LR}", "--config.execution=vmap"]


def _run(workdir, data_dir, flags):
  """The study of `flags` (the --config flag first) run in `workdir`; its outputs."""
  config, *overrides = flags
  run_in_process(config_from_flags([*overrides, f"--config.data_dir={data_dir}"], config),
                 workdir)
  with open(os.path.join(workdir, "analysis", "metrics.json")) as f:
    metrics = json.load(f)
  with open(os.path.join(workdir, "students", "replicas.json")) as f:
    rows = json.load(f)["replicas"]
  with open(os.path.join(workdir, "analysis", "report.md")) as f:
    report = f.read()
  return {"workdir": workdir, "metrics": metrics, "rows": rows, "report": report}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
  """Both studies, one after the other."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return {name: _run(str(tmp_path_factory.mktemp(name) / "wd"), data_dir, flags)
          for name, flags in (("switch", SWITCH_FLAGS), ("linear", EIGEN_FLAGS))}


@pytest.fixture(scope="module")
def switch(studies):
  out = studies["switch"]
  with np.load(os.path.join(out["workdir"], "analysis", "predictions.npz")) as npz:
    out["preds"] = {k: npz[k] for k in npz.files}
  return out


@pytest.fixture(scope="module")
def linear(studies):
  out = studies["linear"]
  for name in ("eigen_trajectory", "gradient_denoising"):
    with np.load(os.path.join(out["workdir"], "analysis", f"{name}.npz")) as npz:
      out[name] = {k: npz[k] for k in npz.files}
  return out


# ------------------------------------------------------------------------------------------------
# Independent numpy references.


def np_log_odds(z, y):
  """log(p_y / (1 - p_y)) for softmax(z): z_y minus the log-sum-exp of the other logits."""
  z = np.asarray(z, np.float64)
  rows = np.arange(len(y))
  others = z.copy()
  others[rows, y] = -np.inf
  m = others.max(1)
  return z[rows, y] - (m + np.log(np.exp(others - m[:, None]).sum(1)))


def np_buckets(t, num):
  """Equal-count buckets: sort ascending (ties by index), rank r goes to bucket r * num // N."""
  out = np.empty(len(t), int)
  for rank, n in enumerate(np.argsort(t, kind="mergesort")):
    out[n] = rank * num // len(t)
  return out


def np_deviation(s, t, num):
  b = np_buckets(t, num)
  below = [np.mean(s[b == k] < t[b == k]) for k in range(num)]
  gap = [np.mean(s[b == k] - t[b == k]) for k in range(num)]
  return np.array(below), np.array(gap), np.mean(s < t)


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def mean_std(values):
  v = np.asarray(values, float)
  return v.mean(0), (v.std(0, ddof=1) if len(v) > 1 else np.full(v.shape[1:], np.nan))


def assert_close(actual, expected, **kw):
  actual = np.array([np.nan if a is None else a for a in np.ravel(actual)], float)
  np.testing.assert_allclose(actual, np.ravel(np.asarray(expected, float)), **kw)


# ------------------------------------------------------------------------------------------------
# kd_windows


def test_kd_windows_parse_and_reject():
  assert replicas_lib.parse_windows("kd_windows", "0-1, 0.25-1,0-0.5") == (
      (0.0, 1.0), (0.25, 1.0), (0.0, 0.5))
  assert replicas_lib.parse_windows("kd_windows", [(0, 0.75)]) == ((0.0, 0.75),)
  for bad, why in (("0.5-0.25", "START < STOP"), ("0-0", "START < STOP"),
                   ("0-1.5", "START < STOP"), ("0-1,0-1", "twice"), ("a-b", "START-STOP"),
                   ("0.5", "START-STOP"), ("", "START-STOP")):
    with pytest.raises(ValueError, match=why):
      replicas_lib.parse_windows("kd_windows", bad)


def test_kd_windows_become_replicas_with_step_windows(tmp_path):
  """One study holds one-hot -> KD and KD -> one-hot students: each window is a grid point of
  the arms with a teacher term (steps = round(fraction x total steps)); label-only arms get none;
  a bad window is a ConfigError naming kd_windows."""
  config = study_lib.load_config(os.path.join(REPO, "configs", "deviation_switch.py"), "smoke")
  config.data_dir = str(tmp_path)
  config.num_seeds = 1
  study = study_lib.resolve(config)
  total = study.students.total_steps
  windows = [w.split("-") for w in config.kd_windows.split(",")]
  kd = [r for r in study.students.replicas if r.arm == "kd"]
  assert [(r.kd_start, r.kd_stop) for r in kd] == [
      (int(round(float(a) * total)), int(round(float(b) * total))) for a, b in windows]
  assert [r.kd_window for r in kd] == config.kd_windows.split(",")
  onehot = [r for r in study.students.replicas if r.arm == "onehot"]
  assert len(onehot) == 1 and onehot[0].kd_window == "" and onehot[0].kd_stop == 0
  assert {r.init for r in study.students.replicas} == {"fresh"}
  config.kd_windows = "0-1,0.5-0.25"
  with pytest.raises(study_lib.ConfigError) as err:
    study_lib.resolve(config)
  assert err.value.key == "kd_windows" and "0.5-0.25" in str(err.value)


# ------------------------------------------------------------------------------------------------
# deviation: pure functions


def test_true_class_log_odds_matches_logit_of_softmax_and_stays_ordered():
  rng = np.random.default_rng(0)
  z, y = rng.normal(size=(50, 7)) * 3, rng.integers(0, 7, 50)
  p = np_softmax(z)[np.arange(50), y]
  np.testing.assert_allclose(deviation.true_class_log_odds(z, y), np.log(p / (1 - p)),
                             rtol=1e-10)
  # p rounds to 1 in float64 for both rows, the log-odds still order them (10000 - log 2 < ...)
  big = deviation.true_class_log_odds(np.array([[1e4, 0.0, 0.0], [1e4, -1.0, -1.0]]),
                                      np.array([0, 0]))
  np.testing.assert_allclose(big, [1e4 - np.log(2), 1e4 + 1 - np.log(2)])


def test_bucket_deviation_by_hand():
  b = deviation.confidence_buckets(np.array([3.0, 1.0, 2.0, 0.0]), 2)
  np.testing.assert_array_equal(b, [1, 0, 1, 0])
  d = deviation.bucket_deviation(np.array([4.0, 0.0, 1.0, 0.0]), np.array([3.0, 1.0, 2.0, 0.0]),
                                 b, 2)
  np.testing.assert_allclose(d["fraction_below"], [0.5, 0.5])   # {1: yes, 3: no}, {0: no, 2: yes}
  np.testing.assert_allclose(d["log_odds_gap"], [-0.5, 0.0])
  assert d["fraction_below_all"] == 0.5
  with pytest.raises(ValueError, match="num_buckets"):
    deviation.confidence_buckets(np.zeros(3), 4)


def test_describe_window():
  assert [deviation.describe_window(w) for w in ("0-1", "0.25-1", "0-0.5", "0.25-0.75", "")] == [
      "KD throughout", "one-hot -> KD at 25%", "KD -> one-hot at 50%", "KD from 25% to 75%",
      "labels only"]


# ------------------------------------------------------------------------------------------------
# deviation_switch study


def _groups(rows):
  """{(arm, window): [replica indices]} from the students' replicas.json."""
  out = {}
  for r in rows:
    out.setdefault((r["arm"], r["kd_window"]), []).append(r["index"])
  return out


def test_deviation_eval_split_against_numpy(switch):
  preds, res = switch["preds"], switch["metrics"]["analyses"]["deviation"]
  num = res["num_buckets"]
  labels = preds["labels"]
  teacher = [np_log_odds(t, labels) for t in preds["teacher_logits"]]
  by_index = {r["index"]: r for r in res["test"]["replicas"]}
  assert sorted(by_index) == list(range(len(switch["rows"])))
  expected = {}
  for r in switch["rows"]:
    t = teacher[preds["replica_teacher"][r["index"]]]
    below, gap, overall = np_deviation(np_log_odds(preds["student_logits"][r["index"]], labels), t,
                                       num)
    got = by_index[r["index"]]
    assert_close(got["fraction_below"], below, atol=1e-12)
    assert_close(got["log_odds_gap"], gap, rtol=1e-9, atol=1e-9)
    assert math.isclose(got["fraction_below_all"], overall)
    expected.setdefault((r["arm"], r["kd_window"]), []).append(below)
  names = {(row["arm"], row["window"]): row["group"]
           for row in switch["metrics"]["analyses"]["kd_switch"]["rows"]}
  assert len(res["test"]["groups"]) == len(expected) == 1 + len(WINDOWS.split(","))
  for key, values in expected.items():
    mean, std = mean_std(values)
    entry = res["test"]["groups"][names[key]]
    assert_close(entry["fraction_below"]["mean"], mean, atol=1e-12)
    assert_close(entry["fraction_below"]["std"], std, atol=1e-12)


def test_deviation_train_split_against_numpy_forward_pass(switch):
  """The train split's numbers from a numpy forward pass of the final MLPs on the train images
  (uint8 / 255, normalised with the dataset's per-channel mean and std)."""
  study = predictions_lib.load_study(switch["workdir"])
  spec = study.dataset
  images = study.data["train"]["image"].astype(np.float64) / 255.0
  x = ((images - np.array(spec.mean)) / np.array(spec.std)).reshape(len(images), -1)
  y = np.asarray(study.data["train"]["label"])

  def log_odds(stage):
    _, states = train.load_final_state(study, switch["workdir"], stage)
    out = np.zeros((len(study.stage(stage).replicas), len(y)))
    for group in study.stage(stage).groups:
      params = jax.tree.map(np.asarray, states[group.key].params)
      for k, r in enumerate(group.indices):
        h = x
        for layer in ("dense1", "dense2"):
          h = np.maximum(h @ params[layer]["kernel"][k] + params[layer]["bias"][k], 0.0)
        out[r] = np_log_odds(h @ params["head"]["kernel"][k] + params["head"]["bias"][k], y)
    return out

  teacher, student = log_odds("teacher"), log_odds("students")
  res = switch["metrics"]["analyses"]["deviation"]
  for got in res["train"]["replicas"]:
    below, gap, _ = np_deviation(student[got["index"]], teacher[got["teacher"]], res["num_buckets"])
    # float32 logits against float64: a point whose two log-odds lie within 1e-4 may flip.
    assert_close(got["fraction_below"], below, atol=2.5 / (len(y) / res["num_buckets"]))
    assert_close(got["log_odds_gap"], gap, atol=1e-3)


def test_kd_switch_table_against_numpy(switch):
  preds, res = switch["preds"], switch["metrics"]["analyses"]["kd_switch"]
  acc = (preds["student_logits"].argmax(-1) == preds["labels"]).mean(-1)
  groups = _groups(switch["rows"])
  stats = {key: (np.mean(acc[i]), np.std(acc[i], ddof=1), len(i)) for key, i in groups.items()}
  base, full = stats[("onehot", "")], stats[("kd", "0-1")]
  assert res["baseline"] == "onehot"
  assert [(r["arm"], r["window"]) for r in res["rows"]] == list(groups)
  for row in res["rows"]:
    mean, std, n = stats[(row["arm"], row["window"])]
    # The section reads the streamed float32 accuracy of metrics.json.
    assert row["n"] == n and math.isclose(row["mean"], mean, abs_tol=1e-6)
    assert math.isclose(row["std"], std, abs_tol=1e-6)
    assert math.isclose(row["minus_baseline"], mean - base[0], abs_tol=1e-6)
    if row["arm"] == "kd":
      assert math.isclose(row["minus_full_kd"], mean - full[0], abs_tol=1e-6)
      gain, noise = full[0] - base[0], math.sqrt(full[1]**2 / full[2] + base[1]**2 / base[2])
      if gain > noise:
        assert math.isclose(row["recovered"], (mean - base[0]) / gain, rel_tol=1e-4)
      else:
        assert row["recovered"] is None
    else:
      assert row["minus_full_kd"] is None
  assert math.isclose(res["teacher_accuracy"][0],
                      (preds["teacher_logits"][0].argmax(-1) == preds["labels"]).mean(),
                      abs_tol=1e-6)


def test_switch_report_plots_and_group_names(switch):
  out = os.path.join(switch["workdir"], "analysis")
  for name in ("deviation.png", "kd_switch.png", "confidence_scatter.png"):
    assert os.path.getsize(os.path.join(out, "plots", name)) > 10_000
  report = switch["report"]
  assert "## Student-teacher deviations by teacher confidence" in report
  assert "## Loss switching: accuracy per KD window" in report
  assert "| KD[window=0.5-1] | one-hot -> KD at 50% |" in report
  assert "| KD[window=0-0.5] | KD -> one-hot at 50% |" in report
  assert "KD windows (fractions of training) | 0-1,0.5-1,0-0.5 |" in report
  groups = {g for g in switch["metrics"]["groups"]}
  assert groups == {"onehot", "kd[window=0-1]", "kd[window=0.5-1]", "kd[window=0-0.5]"}


def test_eigen_sections_refuse_a_nonlinear_study(switch):
  study = predictions_lib.load_study(switch["workdir"])
  context = sections.Context(workdir=switch["workdir"], study=study, preds=None, groups=[],
                             student_diverged=None, teacher_diverged=None, plot_dir="")
  for name in ("eigen_trajectory", "gradient_denoising"):
    with pytest.raises(ValueError, match="`linear` model"):
      sections.get(name)(context)


def test_paper_size_switch_config_resolves_with_mocked_cifar100():
  config = study_lib.load_config(os.path.join(REPO, "configs", "deviation_switch.py"))
  with tfds.testing.mock_data(num_examples=130):
    study = study_lib.resolve(config)
  assert study.dataset.name == "cifar100" and study.dataset.num_classes == 100
  assert {g.model.label for s in ("teacher", "students") for g in study.stage(s).groups} == {
      "resnet56"}
  rows = study.students.replicas
  assert len(rows) == 4 * 8 and {r.kd_window for r in rows if r.arm == "kd"} == {
      "0-1", "0.25-1", "0.5-1", "0.75-1", "0-0.25", "0-0.5", "0-0.75"}
  assert study.analyses == ("deviation", "kd_switch")
  with pytest.raises(ValueError, match="smoke"):
    study_lib.load_config(os.path.join(REPO, "configs", "deviation_switch.py"), "tiny")


# ------------------------------------------------------------------------------------------------
# linear_eigen


@pytest.mark.parametrize("arg", [None, "smoke", "superclass", "smoke,superclass"])
def test_linear_eigen_configs_are_full_batch_gd_with_every_step_kept(arg):
  config = study_lib.load_config(os.path.join(REPO, "configs", "linear_eigen.py"), arg)
  params = synthetic.parse(config.dataset.partition(":")[2])
  assert config.batch_size == params.n_train     # one full-batch step per epoch
  assert config.optimizer.momentum == 0 and config.optimizer.weight_decay == 0
  assert config.optimizer.schedule == "constant"
  assert config.keep_checkpoints * config.checkpoint_every_steps > config.num_epochs
  assert config.teacher_num_epochs < config.num_epochs          # the teacher is stopped early
  assert (params.superclasses > 1) == ("superclass" in (arg or ""))
  with pytest.raises(ValueError, match="smoke, superclass"):
    study_lib.load_config(os.path.join(REPO, "configs", "linear_eigen.py"), "big")


def test_within_superclass_centering_by_hand():
  w = np.arange(12.0).reshape(2, 6) ** 1.5
  s = np.array([0, 0, 1, 1, 1, 2])
  expected = w.copy()
  for k in range(3):
    expected[:, s == k] -= w[:, s == k].mean(1, keepdims=True)
  np.testing.assert_allclose(w @ eigen.within_superclass_centering(s), expected, atol=1e-12)
  np.testing.assert_allclose(eigen.within_superclass_centering(np.zeros(4, int)),
                             eigen.class_centering(4))


def _numpy_gd(linear_study):
  """Full-batch GD in float64 from the documented initial kernel: the teacher (one-hot CE,
  TEACHER_STEPS), the kd student (alpha = 1, T = 1: gradient X^T (p_s - p_teacher) / N) and the
  siddo student (one-hot CE, STUDENT_STEPS); kernels per step, step 0 first."""
  params = synthetic.parse(SYNTHETIC)
  train_split = synthetic.generate(params, "train")
  x = train_split["vector"].astype(np.float64)
  onehot = np.eye(params.classes)[train_split["label"]]
  # kdjax/replicas.py: init key = fold_in(fold_in(fold_in(PRNGKey(seed), STAGE=1), 0), init=1).
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 1), 0), 1)
  module = models.get("linear", num_classes=params.classes, use_bias=False)
  w0 = np.asarray(module.init(key, jnp.zeros((1, params.dim)), train=False)["params"]["head"][
      "kernel"], np.float64)

  def run(target_fn, steps):
    w, out = w0.copy(), [w0.copy()]
    for _ in range(steps):
      w = w - LR * x.T @ (np_softmax(x @ w) - target_fn()) / len(x)
      out.append(w.copy())
    return np.stack(out)

  teacher = run(lambda: onehot, TEACHER_STEPS)
  p_teacher = np_softmax(x @ teacher[-1])
  return {"x": x, "params": params, "teacher": teacher, "siddo": run(lambda: onehot, STUDENT_STEPS),
          "kd": run(lambda: p_teacher, STUDENT_STEPS)}


@pytest.fixture(scope="module")
def reference(linear):
  return _numpy_gd(linear)


def test_eigen_projections_follow_numpy_gradient_descent(linear, reference):
  npz, x = linear["eigen_trajectory"], reference["x"]
  values, vectors = np.linalg.eigh(x.T @ x / len(x))
  np.testing.assert_allclose(npz["eigenvalues"], values[::-1], rtol=1e-6)
  np.testing.assert_array_equal(npz["teacher_steps"], np.arange(TEACHER_STEPS + 1))
  np.testing.assert_array_equal(npz["student_steps"], np.arange(STUDENT_STEPS + 1))
  center = np.eye(6) - 1 / 6

  def proj(kernels):  # || v_i^T (W - W0) P || per step and direction, v_i from numpy's eigh
    return np.linalg.norm(np.einsum("di,sdc->sic", vectors[:, ::-1],
                                    (kernels - kernels[0]) @ center), axis=-1)

  rows = {r["arm"]: r["index"] for r in linear["rows"]}
  expected = {"teacher": proj(reference["teacher"]), "siddo": proj(reference["siddo"]),
              "kd": proj(reference["kd"])}
  scale = expected["teacher"].max()
  np.testing.assert_allclose(npz["teacher_projections"][:, 0], expected["teacher"], rtol=1e-3,
                             atol=1e-4 * scale)
  for arm in ("siddo", "kd"):
    np.testing.assert_allclose(npz["student_projections"][:, rows[arm]], expected[arm],
                               rtol=1e-3, atol=1e-4 * scale)

  # Crossing steps and relative progress against the numpy curves (a crossing within 1e-3 of its
  # threshold may land one step apart in float32).
  reference_final = expected["teacher"][-1]
  models = {(m["stage"], m["index"]): m
            for m in linear["metrics"]["analyses"]["eigen_trajectory"]["models"]}
  for stage, index, curve in (("teacher", 0, expected["teacher"]),
                              ("students", rows["siddo"], expected["siddo"]),
                              ("students", rows["kd"], expected["kd"])):
    got = models[(stage, index)]
    rel = curve / reference_final
    assert_close(got["relative_final"], rel[-1], rtol=2e-3)
    assert_close(got["relative_at_teacher_stop"], rel[TEACHER_STEPS], rtol=2e-3)
    for fraction in (0.5, 0.9):
      for i, step in enumerate(got[f"steps_to_{int(100 * fraction)}"]):
        hits = np.flatnonzero(rel[:, i] >= fraction)
        want = int(hits[0]) if hits.size else None
        if want is not None and abs(rel[want, i] - fraction) < 1e-3:
          continue
        assert step == want, (stage, index, fraction, i)

  # Closed-form facts of this setting: siddo is the teacher until the teacher stops (same init,
  # same full batch), so its progress at that step is 1 along every direction.
  assert_close(models[("students", rows["siddo"])]["relative_at_teacher_stop"], np.ones(12),
               rtol=1e-4)


def test_gradient_denoising_against_numpy(linear, reference):
  params = reference["params"]
  w_star = (synthetic.class_means(params) / (np.arange(1, 13) ** -1.0)[None]).T
  npz = linear["gradient_denoising"]
  np.testing.assert_allclose(npz["w_star"], w_star, rtol=1e-12)
  sc = np.array([0, 0, 0, 1, 1, 1])
  center = np.eye(6) - 1 / 6
  within = np.eye(6) - (sc[:, None] == sc[None]) / 3

  def cos(a, b):
    return np.sum(a * b, axis=(-2, -1)) / (np.linalg.norm(a, axis=(-2, -1)) * np.linalg.norm(b))

  test = synthetic.generate(params, "test")
  rows = {r["arm"]: r["index"] for r in linear["rows"]}
  models = {(m["stage"], m["index"]): m
            for m in linear["metrics"]["analyses"]["gradient_denoising"]["models"]}
  for stage, index, kernels in (("teacher", 0, reference["teacher"]),
                                ("students", rows["siddo"], reference["siddo"]),
                                ("students", rows["kd"], reference["kd"])):
    updates = np.diff(kernels, axis=0)
    got = models[(stage, index)]
    assert math.isclose(got["mean_update_alignment"],
                        np.mean(cos(updates @ center, w_star @ center)), abs_tol=1e-4)
    assert math.isclose(got["mean_update_alignment_within"],
                        np.mean(cos(updates @ within, w_star @ within)), abs_tol=1e-4)
    assert math.isclose(got["final_displacement_alignment"],
                        cos((kernels[-1] - kernels[0]) @ center, w_star @ center), abs_tol=1e-4)
    accuracy = np.mean(np.argmax(test["vector"] @ kernels[-1], -1) == test["label"])
    assert abs(got["final_accuracy"] - accuracy) <= 2 / len(test["label"])
  report = linear["report"]
  assert "## Weights along the data's eigendirections" in report
  assert "## Gradient denoising under class similarity" in report
  for name in ("eigen_trajectory.png", "gradient_denoising.png"):
    assert os.path.getsize(os.path.join(linear["workdir"], "analysis", "plots", name)) > 10_000
