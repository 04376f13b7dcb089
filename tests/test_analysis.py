"""Tests of the analysis stage (kdjax.analysis) on a tiny study trained once per module.

metrics.json is checked against an independent numpy recomputation from predictions.npz (the
docs/design.md definitions written again below), the arm summaries against numpy/scipy, the tests
against scipy.stats.mannwhitneyu and a hand-written Holm; the report, the plots and the
re-run reproducibility against the issue's requirements.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from PIL import Image

from kdjax import stats

import _cli
# A persistent compilation cache for this module, shared with the command's runs: the analysis
# re-run and the in-process analysis reuse the first analysis' programs.
from test_engine import compilation_cache  # noqa: F401  (its module-scoped autouse fixture)
# The same compiler settings in this process as in the command's runs (JAX_DISABLE_MOST_
# OPTIMIZATIONS=1), so the in-process analysis also finds their programs in the cache.
from test_engine_training import fast_compilation  # noqa: F401  (module-scoped autouse fixture)
from test_groups import config_from_flags, run_in_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default study made tiny: an MLP (compiles in a fraction of the CNN's time; the analysis
# does not depend on the architecture), one epoch, 3 seeds per arm, and two teachers so that
# students with odd seeds are paired with teacher 1, not teacher 0. Vmapped replicas (an MLP is
# not slow vmapped on XLA:CPU) compile one step and one forward pass for all 9 students instead
# of one per student; the analysis reads the same checkpoints either way.
STUDY_FLAGS = ["--config.model=mlp", "--config.num_seeds=3", "--config.num_epochs=1",
               "--config.teacher_num_epochs=1", "--config.num_teachers=2",
               "--config.execution=vmap"]
DEFAULT_MARGINS = {  # configs/default.py's analysis_options.equivalence_margins
    "accuracy": 0.01, "agreement": 0.01, "agree_when_teacher_correct": 0.01,
    "agree_when_teacher_incorrect": 0.05, "js_divergence": 0.005, "activation_distance": 0.02,
    "kl_divergence": 0.02, "rank_disagreement": 0.02, "mutual_information": 0.05, "ece": 0.01}
METRICS = ("accuracy", "agreement", "agree_when_teacher_correct", "agree_when_teacher_incorrect",
           "js_divergence", "activation_distance", "kl_divergence", "rank_disagreement",
           "mutual_information", "ece")
NPZ_KEYS = {"labels", "teacher_logits", "student_logits", "replica_arm", "replica_seed",
            "replica_teacher", "replica_alpha", "replica_temperature",
            # beyond docs/design.md: the model of each student and teacher (several in one study)
            "replica_model", "teacher_model"}
OUTPUTS = ("metrics.json", "report.md", "replicas.csv", "classes.csv",
           "plots/confidence_scatter.png",
           "plots/agreement_split.png", "plots/metrics.png")


def _run_cli(workdir, cache_dir, *flags):
  # JAX_DISABLE_MOST_OPTIMIZATIONS=1 halves XLA:CPU's compile time, most of each run.
  env = dict(_cli.env(cache_dir=cache_dir), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  result = _cli.main([*STUDY_FLAGS, *flags], workdir, env)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _strict_load(path):
  def reject(token):
    raise ValueError(f"non-strict JSON token {token}")
  with open(path) as f:
    return json.load(f, parse_constant=reject)


@pytest.fixture(scope="module")
def study(tmp_path_factory, compilation_cache):
  """A trained tiny study (2 teachers, 3 arms x 3 seeds, 1 epoch) and its first analysis: the
  training stages in this process (tests/test_groups.py, `run_in_process`), the analysis by
  `python -m kdjax.main --config.stages=analysis`."""
  workdir = str(tmp_path_factory.mktemp("analysis") / "wd")
  run_in_process(config_from_flags(STUDY_FLAGS), workdir, stages=("teacher", "students"))
  _run_cli(workdir, compilation_cache, "--config.stages=analysis")
  out = os.path.join(workdir, "analysis")
  with np.load(os.path.join(out, "predictions.npz")) as npz:
    preds = {k: npz[k] for k in npz.files}
  return {"workdir": workdir, "out": out, "preds": preds, "cache": compilation_cache,
          "metrics": _strict_load(os.path.join(out, "metrics.json")),
          "report": open(os.path.join(out, "report.md")).read(),
          "bytes": {name: _read(os.path.join(out, name)) for name in OUTPUTS}}


# ------------------------------------------------------------------------------------------------
# Independent numpy references, from the docs/design.md metric definitions (float64).


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_kl(log_p, log_q):
  p = np.exp(log_p)
  return np.sum(np.where(p > 0, p * (log_p - log_q), 0.0), -1)


def np_similarity(s, t, y):
  """The ten docs/design.md metrics of student logits s [N, C] vs teacher logits t [N, C]."""
  log_ps, log_pt = np_log_softmax(s), np_log_softmax(t)
  ps, pt = np.exp(log_ps), np.exp(log_pt)
  a_s, a_t = s.argmax(-1), t.argmax(-1)
  agree = a_s == a_t
  m = 0.5 * (ps + pt)
  log_m = np.log(np.where(m > 0, m, 1.0))
  js = 0.5 * np_kl(log_ps, log_m) + 0.5 * np_kl(log_pt, log_m)
  # Descending order, ties to the lowest class index.
  rank_s = np.argsort(-s, axis=-1, kind="stable")
  rank_t = np.argsort(-t, axis=-1, kind="stable")
  num_classes = s.shape[-1]
  joint = np.zeros((num_classes, num_classes))
  np.add.at(joint, (a_s, a_t), 1.0)
  p_joint = joint / joint.sum()
  outer = p_joint.sum(1, keepdims=True) * p_joint.sum(0, keepdims=True)
  nz = p_joint > 0
  mi = float(np.sum(p_joint[nz] * np.log(p_joint[nz] / outer[nz])))
  conf, correct = ps.max(-1), a_s == y
  ece = 0.0
  for b in range(15):
    lo, hi = b / 15, (b + 1) / 15
    in_bin = (conf > lo) & (conf <= hi)
    if in_bin.any():
      ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
  teacher_ok = a_t == y
  return {
      "accuracy": float(np.mean(a_s == y)),
      "agreement": float(np.mean(agree)),
      "agree_when_teacher_correct": float(agree[teacher_ok].mean()) if teacher_ok.any()
                                    else math.nan,
      "agree_when_teacher_incorrect": float(agree[~teacher_ok].mean()) if (~teacher_ok).any()
                                      else math.nan,
      "js_divergence": float(js.mean()),
      "activation_distance": float(np.linalg.norm(ps - pt, axis=-1).mean()),
      "kl_divergence": float(np_kl(log_pt, log_ps).mean()),
      "rank_disagreement": float(np.mean(rank_s != rank_t)),
      "mutual_information": mi,
      "ece": float(ece),
  }


def np_holm(p):
  """Holm step-down adjusted p-values, written out as a loop."""
  p = np.asarray(p, float)
  order = np.argsort(p, kind="stable")
  m = len(p)
  adjusted = np.empty(m)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, (m - rank) * p[i])
    adjusted[i] = min(1.0, running)
  return adjusted


def close(actual, expected, atol=2e-5, rtol=2e-4):
  if expected is None or (isinstance(expected, float) and math.isnan(expected)):
    return actual is None
  return actual is not None and math.isclose(actual, expected, rel_tol=rtol, abs_tol=atol)


# ------------------------------------------------------------------------------------------------
# Output files of the stage.


def test_predictions_npz_contract(study):
  p = study["preds"]
  assert set(p) == NPZ_KEYS
  num_teachers, num_examples, num_classes = p["teacher_logits"].shape
  assert (num_teachers, num_classes) == (2, 10)
  assert p["labels"].shape == (num_examples,)
  assert p["student_logits"].shape == (9, num_examples, num_classes)
  assert list(p["replica_arm"]) == ["kd"] * 3 + ["rcd"] * 3 + ["siddo"] * 3
  np.testing.assert_array_equal(p["replica_seed"], [0, 1, 2] * 3)
  # Student seed s learns from (and is compared with) teacher s mod 2.
  np.testing.assert_array_equal(p["replica_teacher"], [0, 1, 0] * 3)
  np.testing.assert_allclose(p["replica_alpha"], [0.5] * 6 + [0.0] * 3)
  np.testing.assert_allclose(p["replica_temperature"], 1.0)
  assert set(p["replica_model"]) == set(p["teacher_model"]) == {"mlp(width=0.25)"}
  assert np.isfinite(p["student_logits"]).all() and np.isfinite(p["teacher_logits"]).all()


def test_metrics_json_equals_numpy_recomputation(study):
  p, results = study["preds"], study["metrics"]
  y = p["labels"]
  assert len(results["replicas"]) == 9
  for r, record in enumerate(results["replicas"]):
    assert record["index"] == r and record["arm"] == p["replica_arm"][r]
    assert record["seed"] == p["replica_seed"][r] and record["teacher"] == p["replica_teacher"][r]
    assert record["diverged"] is False
    assert list(record["metrics"]) == list(METRICS)
    expected = np_similarity(p["student_logits"][r], p["teacher_logits"][record["teacher"]], y)
    for m in METRICS:
      assert close(record["metrics"][m], expected[m]), (r, m, record["metrics"][m], expected[m])
  for j, record in enumerate(results["teachers"]):
    t = p["teacher_logits"][j]
    expected = np_similarity(t, t, y)
    assert record["index"] == j and record["seed"] == j and record["diverged"] is False
    assert close(record["metrics"]["accuracy"], expected["accuracy"])
    assert close(record["metrics"]["ece"], expected["ece"])
    assert record["metrics"]["num_incorrect"] == int(np.sum(t.argmax(-1) != y))


def test_teacher_agreement_is_the_pairwise_reference(study):
  p, agreement = study["preds"], study["metrics"]["teacher_agreement"]
  (pair,) = agreement["pairs"]
  assert (pair["a"], pair["b"]) == (0, 1)
  expected = np_similarity(p["teacher_logits"][1], p["teacher_logits"][0], p["labels"])
  for m, value in pair["metrics"].items():
    assert close(value, expected[m]), m
    assert close(agreement["mean"][m], expected[m]), m
  assert "agreement" in pair["metrics"] and "accuracy" not in pair["metrics"]


def test_arm_summaries_equal_numpy_and_scipy(study):
  results = study["metrics"]
  assert list(results["arms"]) == ["kd", "rcd", "siddo"]
  for arm, summary in results["arms"].items():
    rows = [r for r in results["replicas"] if r["arm"] == arm]
    assert results["groups"][arm]["replicas"] == [r["index"] for r in rows]
    for m in METRICS:
      x = np.array([r["metrics"][m] for r in rows if r["metrics"][m] is not None])
      s = summary[m]
      assert s["n"] == x.size
      assert close(s["mean"], float(np.mean(x)), atol=1e-12, rtol=1e-12)
      assert close(s["std"], float(np.std(x, ddof=1)), atol=1e-12, rtol=1e-12)
      if np.ptp(x) == 0:
        assert s["ci_low"] == s["ci_high"] == s["mean"]
        continue
      teachers = [r["teacher"] for r in rows if r["metrics"][m] is not None]
      assert s["n_teachers"] == len(set(teachers))
      if len(set(teachers)) > 1:  # students nested in teachers: the two-stage bootstrap
        assert s["ci_method"] == "cluster"
        low, high = stats.cluster_bootstrap_ci(x, teachers, num_resamples=10_000, seed=0)
        assert (s["ci_low"], s["ci_high"]) == (low, high)
        continue
      assert s["ci_method"] == "percentile"
      ci = scipy.stats.bootstrap((x,), np.mean, n_resamples=10_000, confidence_level=0.95,
                                 method="percentile", rng=np.random.default_rng(0))
      assert close(s["ci_low"], float(ci.confidence_interval.low), atol=1e-12, rtol=1e-12)
      assert close(s["ci_high"], float(ci.confidence_interval.high), atol=1e-12, rtol=1e-12)
      assert s["ci_low"] <= s["mean"] <= s["ci_high"]


def test_tests_equal_scipy_and_holm(study):
  results = study["metrics"]
  tests = results["tests"]
  assert [(t["a"], t["b"]) for t in tests] == [("kd", "rcd")] * 10 + [("kd", "siddo")] * 10
  for block in (tests[:10], tests[10:]):
    assert [t["metric"] for t in block] == list(METRICS)
    for t in block:
      x = [r["metrics"][t["metric"]] for r in results["replicas"] if r["arm"] == t["a"]]
      y = [r["metrics"][t["metric"]] for r in results["replicas"] if r["arm"] == t["b"]]
      x = np.array([v for v in x if v is not None])
      y = np.array([v for v in y if v is not None])
      assert (t["n_a"], t["n_b"]) == (x.size, y.size)
      # Seeds 0, 1, 2 in every arm, each with its teacher s mod 2: seed-matched pairs, so the
      # Wilcoxon signed-rank test on the differences (scipy's, every sign flip enumerated).
      assert t["test"] == "wilcoxon" and t["n_pairs"] == 3 and "seed-matched" in t["test_reason"]
      d = x - y
      nonzero = d[d != 0]
      if nonzero.size == 0:
        assert (t["statistic"], t["p_value"], t["effect_size"]) == (0.0, 1.0, 0.0)
      else:
        ref = scipy.stats.wilcoxon(nonzero, method=scipy.stats.PermutationMethod(
            n_resamples=np.inf))
        assert t["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-12)
        ranks = scipy.stats.rankdata(np.abs(nonzero))
        assert t["statistic"] == pytest.approx(ranks[nonzero > 0].sum())
        assert t["effect_size"] == pytest.approx(
            (ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum())
      # The smallest p the test can reach with 3 pairs, 0.25, and Holm's 10 x that.
      assert t["power"]["min_p"] == 0.25 and t["power"]["min_p_holm"] == 1.0
      assert t["power"]["verdict_possible"] is False and t["power"]["seeds_for_verdict"] == 9
      # TOST in its paired form, against statsmodels.
      from statsmodels.stats.weightstats import ttost_paired
      e = t["equivalence"]
      margin = DEFAULT_MARGINS[t["metric"]]
      assert e["margin"] == margin and e["test"] == "TOST paired t"
      if np.ptp(d) > 0:
        assert e["p_value"] == pytest.approx(float(ttost_paired(x, y, -margin, margin)[0]),
                                             rel=1e-9)
      # The Mann-Whitney result of the same values is kept beside it.
      u = t["unpaired"]
      if np.ptp(np.concatenate([x, y])) == 0:  # no variation: U = n1 n2 / 2, p = 1 by contract
        assert (u["statistic"], u["p_value"]) == (x.size * y.size / 2, 1.0)
        continue
      # 3 vs 3 seeds: exact without ties, else every split of the pooled values enumerated
      # (scipy's default would take the normal approximation whenever values tie).
      tied = np.unique(np.concatenate([x, y])).size < x.size + y.size
      assert u["p_method"] == ("permutation" if tied else "exact")
      method = scipy.stats.PermutationMethod(n_resamples=np.inf) if tied else "exact"
      ref = scipy.stats.mannwhitneyu(x, y, alternative="two-sided", method=method)
      assert u["statistic"] == pytest.approx(float(ref.statistic), abs=1e-12)
      assert u["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-12)
      diff = x[:, None] - y[None, :]
      rank_biserial = (np.sum(diff > 0) - np.sum(diff < 0)) / diff.size
      assert u["effect_size"] == pytest.approx(rank_biserial, abs=1e-12)
    holm = np_holm([t["p_value"] for t in block])
    np.testing.assert_allclose([t["p_holm"] for t in block], holm, rtol=1e-12)
    tost_holm = np_holm([t["equivalence"]["p_value"] for t in block])
    np.testing.assert_allclose([t["equivalence"]["p_holm"] for t in block], tost_holm,
                               rtol=1e-12)


def test_unpaired_arms_keep_mann_whitney():
  """A control whose seeds do not all match: Mann-Whitney, and the record says why."""
  from kdjax.analysis import statistics  # pylint: disable=g-import-not-at-top
  groups = [statistics.ArmGroup("kd", "kd", (), (0, 1, 2), (0, 1, 2)),
            statistics.ArmGroup("rcd", "rcd", (), (3, 4, 5), (3, 4, 5))]
  metrics = [{"accuracy": v} for v in (0.93, 0.95, 0.96, 0.88, 0.87, 0.90)]
  keys = [(0, 0), (1, 0), (2, 0), (0, 0), (5, 0), (6, 0)]
  (record,) = statistics.run_tests(groups, metrics, ["accuracy"], pair_keys=keys)
  assert record["test"] == "mann_whitney" and "not paired" in record["test_reason"]
  assert record["p_value"] == pytest.approx(0.1)  # exact, 3 vs 3 separated
  keys[4], keys[5] = (1, 0), (2, 0)
  (record,) = statistics.run_tests(groups, metrics, ["accuracy"], pair_keys=keys)
  assert record["test"] == "wilcoxon" and record["p_value"] == pytest.approx(0.25)


def test_csv_tables_read_back_equal_metrics_json(study):
  import csv  # pylint: disable=g-import-not-at-top
  results = study["metrics"]
  with open(os.path.join(study["out"], "replicas.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(results["replicas"]) == 9
  for row, record in zip(rows, results["replicas"]):
    assert int(row["index"]) == record["index"] and row["arm"] == record["arm"]
    assert int(row["seed"]) == record["seed"]
    assert int(row["compared_teacher"]) == record["teacher"]
    assert float(row["alpha"]) == record["alpha"] and row["group"] == record["arm"]
    assert row["diverged"] == "false" and row["excluded"] == "false"
    for m in METRICS:
      value = record["metrics"][m]
      assert (row[m] == "") if value is None else float(row[m]) == value, m
  with open(os.path.join(study["out"], "classes.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  classes = results["classes"]
  assert len(rows) == 10 * 3
  p = study["preds"]
  y = p["labels"]
  for row in rows:
    c, g = int(row["class"]), classes["groups"][row["group"]]
    assert int(row["examples"]) == classes["examples"][c] == int(np.sum(y == c))
    for key in ("accuracy", "agreement", "teacher_accuracy"):
      assert float(row[key]) == g[key][c]
    # numpy from predictions.npz: the mean over the group's students of the per-class rates.
    members = [i for i, arm in enumerate(p["replica_arm"]) if arm == row["group"]]
    on_c = y == c
    acc = np.mean([np.mean(p["student_logits"][i][on_c].argmax(-1) == c) for i in members])
    agree = np.mean([np.mean(p["student_logits"][i][on_c].argmax(-1) == p["teacher_logits"][
        p["replica_teacher"][i]][on_c].argmax(-1)) for i in members])
    assert float(row["accuracy"]) == pytest.approx(acc) and float(row["agreement"]) == \
        pytest.approx(agree)
  # Per-class accuracy weighted by the class sizes is the arm's mean accuracy.
  for name, g in classes["groups"].items():
    weighted = np.dot(g["accuracy"], classes["examples"]) / np.sum(classes["examples"])
    assert weighted == pytest.approx(results["arms"][name]["accuracy"]["mean"], abs=1e-6)


def test_null_references_equal_numpy_recomputation(study):
  p, ref = study["preds"], study["metrics"]["null_reference"]
  for arm in ("kd", "rcd", "siddo"):
    members = [i for i, a in enumerate(p["replica_arm"]) if a == arm]
    pairs = [(i, j) for k, i in enumerate(members) for j in members[k + 1:]]
    entry = ref["student_pairs"][arm]
    assert entry["n_pairs"] == len(pairs) == 3
    values = [np_similarity(p["student_logits"][j], p["student_logits"][i], p["labels"])
              for i, j in pairs]
    for m in ("agreement", "js_divergence", "kl_divergence", "rank_disagreement"):
      assert close(entry["metrics"][m]["mean"], float(np.mean([v[m] for v in values]))), m
      assert close(entry["metrics"][m]["min"], float(np.min([v[m] for v in values]))), m
  assert ref["teacher_pairs"]["mean"] == study["metrics"]["teacher_agreement"]["mean"]
  assert ref["teacher_onehot"] == {}  # the study has no onehot arm


def test_bad_equivalence_margins_are_one_config_error():
  from kdjax import study as study_lib  # pylint: disable=g-import-not-at-top
  config = study_lib.load_config(os.path.join(REPO, "configs", "default.py"))
  config.analysis_options.equivalence_margins = "accuracy=-0.01"
  with pytest.raises(study_lib.ConfigError) as error:
    study_lib.resolve(config)
  assert str(error.value).startswith("--config.analysis_options.equivalence_margins: ")
  assert "\n" not in str(error.value)


def test_report_names_every_arm_and_explains_the_tests(study):
  report = study["report"]
  for text in ("KD (n = 3)", "RCD (n = 3)", "SIDDO (n = 3)", "### KD vs RCD", "### KD vs SIDDO",
               "Holm-corrected across the 10 metrics of each comparison",
               "--config.stages=analysis", "Teacher-teacher similarity",
               "(plots/confidence_scatter.png)", "(plots/agreement_split.png)",
               "(plots/metrics.png)", "| teacher | seed |", "## Diverged and excluded replicas",
               # issue 15: the test and why, TOST, power, null references, nested teachers
               "Test: Wilcoxon signed-rank on 3 seed-matched pairs", "TOST p_holm",
               "## Power", "## Null references", "cluster bootstrap", "replicas.csv",
               "> **No verdict is possible for KD vs RCD:**", "`--config.num_seeds=9`"):
    assert text in report, text
  assert "`kd`, `rcd`, `siddo`" in report
  # Every comparison has a verdict in words.
  assert report.count("than RCD controls") + report.count("KD students and RCD controls") >= 1
  assert report.count("than SIDDO controls") + report.count("KD students and SIDDO controls") >= 1
  assert not re.search(r"\bnan\b", report, re.IGNORECASE)


def test_plots_are_real_pngs(study):
  for name in (o for o in OUTPUTS if o.endswith(".png")):
    path = os.path.join(study["out"], name)
    assert os.path.getsize(path) > 10_000, name
    with Image.open(path) as image:
      assert image.format == "PNG"
      assert image.width >= 400 and image.height >= 300, (name, image.size)
      pixels = np.asarray(image.convert("RGB"))
    # Distinct RGB triples, each packed into one integer (np.unique over rows is 30x slower).
    colors = np.unique(pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32))
    assert len(colors) > 50, (name, len(colors))
    # Mostly background, but a real share of drawn (non-white) pixels.
    assert 0.02 < np.mean(np.any(pixels < 240, axis=-1)) < 0.9, name


def test_rerunning_the_analysis_reproduces_the_files(study):
  _run_cli(study["workdir"], study["cache"], "--config.stages=analysis")
  for name in OUTPUTS:
    assert _read(os.path.join(study["out"], name)) == study["bytes"][name], name
  with np.load(os.path.join(study["out"], "predictions.npz")) as npz:
    assert set(npz.files) == NPZ_KEYS
    for k in NPZ_KEYS:
      np.testing.assert_array_equal(npz[k], study["preds"][k])


def test_a_diverged_replica_is_excluded_with_the_count(study, tmp_path, monkeypatch):
  """A student whose parameters are NaN gives NaN logits: marked diverged, left out of its arm's
  summaries and of the tests, and listed in the report."""
  from kdjax import analysis, train
  workdir = str(tmp_path / "wd")
  shutil.copytree(study["workdir"], workdir, ignore=shutil.ignore_patterns("analysis"))
  load = train.load_final_state
  bad = 4  # rcd, seed 1

  def poisoned(study_, workdir_, stage):
    engines, states = load(study_, workdir_, stage)
    if stage == "students":
      state = states["group0"]
      states = {"group0": state.replace(
          params=jax.tree.map(lambda a: a.at[bad].set(jnp.nan), state.params))}
    return engines, states

  monkeypatch.setattr(train, "load_final_state", poisoned)
  analysis.run(workdir)
  results = _strict_load(os.path.join(workdir, "analysis", "metrics.json"))
  assert [r["diverged"] for r in results["replicas"]] == [i == bad for i in range(9)]
  assert results["groups"]["rcd"] == {"arm": "rcd", "hyperparameters": {},
                                      "replicas": [3, 5], "excluded": [4]}
  for m in METRICS:
    assert results["arms"]["rcd"][m]["n"] == 2
    assert results["arms"]["kd"][m]["n"] == results["arms"]["siddo"][m]["n"] == 3
  assert all(t["n_b"] == 2 for t in results["tests"] if t["b"] == "rcd")
  # The surviving rcd students' numbers are unchanged.
  for i in (3, 5):
    assert results["replicas"][i] == study["metrics"]["replicas"][i]
  report = open(os.path.join(workdir, "analysis", "report.md")).read()
  assert "1 of 9 student replicas are excluded" in report
  assert "replica 4 (rcd, seed 1, alpha 0.5, T 1): diverged (non-finite logits)" in report
  assert "| RCD (n = 2) |" in report


# ------------------------------------------------------------------------------------------------
# Units: divergence metadata, grids, verdicts, sequence labels, strict JSON.


def test_diverged_flags_from_logits_and_checkpoint_metadata():
  from kdjax.analysis import diverged_flags
  logits = np.zeros((4, 3, 2), np.float32)
  logits[1, 2, 0] = np.inf
  np.testing.assert_array_equal(diverged_flags(logits), [False, True, False, False])
  meta = {"replicas": [{"index": 0}, {"index": 1}, {"index": 2, "diverged": True}, {}]}
  np.testing.assert_array_equal(diverged_flags(logits, meta), [False, True, True, False])
  np.testing.assert_array_equal(diverged_flags(logits, {"diverged": [3]}),
                                [False, True, False, True])
  np.testing.assert_array_equal(diverged_flags(logits, {"diverged": [True, False, False, False]}),
                                [True, True, False, False])


def test_grid_groups_and_matched_comparisons():
  from kdjax.analysis import statistics
  from kdjax import study as study_lib
  config = study_lib.load_config(os.path.join(REPO, "configs", "default.py"))
  config.alpha, config.num_seeds = "0.1,0.9", 2
  rows = study_lib.resolve(config).students.replicas
  groups = statistics.make_groups(rows, excluded={1})
  names = [g.name for g in groups]
  assert names == ["kd[alpha=0.1]", "kd[alpha=0.9]", "rcd[alpha=0.1]", "rcd[alpha=0.9]", "siddo"]
  assert groups[0].replicas == (0, 1) and groups[0].included == (0,)
  assert groups[0].display == "KD[alpha=0.1]"
  pairs = [(a.name, b.name) for a, b in statistics.comparisons(groups)]
  assert pairs == [("kd[alpha=0.1]", "rcd[alpha=0.1]"), ("kd[alpha=0.1]", "siddo"),
                   ("kd[alpha=0.9]", "rcd[alpha=0.9]"), ("kd[alpha=0.9]", "siddo")]
  assert statistics.reference_arm(["dkd", "siddo"]) == "dkd"


def test_verdicts_follow_direction_and_holm_p():
  from kdjax.analysis import statistics
  groups = {g.name: g for g in (statistics.ArmGroup("kd", "kd", (), (0,), (0,)),
                                statistics.ArmGroup("siddo", "siddo", (), (1,), (1,)))}
  test = {"metric": "agree_when_teacher_incorrect", "a": "kd", "b": "siddo", "statistic": 60.0,
          "p_value": 0.0004, "p_holm": 0.003, "effect_size": 0.94, "n_a": 8, "n_b": 8}
  assert statistics.verdict(test, groups) == (
      "KD students agree with their teacher more than SIDDO controls on teacher-incorrect points "
      "(p_holm = 0.003, r = +0.94).")
  lower = dict(test, metric="js_divergence", effect_size=-0.5)
  assert statistics.verdict(lower, groups).startswith(
      "KD students are closer to their teacher in JS divergence than SIDDO controls")
  higher = dict(test, metric="js_divergence", effect_size=0.5)
  assert "further from their teacher" in statistics.verdict(higher, groups)
  weak = dict(test, p_holm=0.2)
  assert statistics.verdict(weak, groups).startswith(
      "No significant difference between KD students and SIDDO controls in agreement on "
      "teacher-incorrect points (p_holm = 0.2")
  untested = dict(test, p_holm=math.nan, n_b=1)
  assert "not tested" in statistics.verdict(untested, groups)


def test_streamed_states_with_sequence_labels_and_padding():
  """Labels [B, L] (next-token targets): metrics average over all unmasked positions, padded
  rows (mask 0, garbage logits) are ignored."""
  from kdjax.analysis import predictions
  rng = np.random.default_rng(0)
  num_students, batch, length, classes = 2, 5, 3, 4
  students = rng.normal(size=(num_students, batch, length, classes)).astype(np.float32) * 3
  teachers = rng.normal(size=(2, batch, length, classes)).astype(np.float32) * 3
  labels = rng.integers(0, classes, size=(batch, length)).astype(np.int32)
  mask = np.array([1, 1, 1, 1, 0], np.float32)
  students[:, 4] = np.nan  # padding may hold anything
  compared = np.array([1, 0], np.int32)
  similarity, teacher_bins = jax.jit(predictions.batch_states)(
      students, teachers, compared, predictions.teacher_pairs(2), labels, mask)
  got = predictions.compute_each(similarity)
  assert len(got) == num_students + 1  # the students, then the one teacher pair (1 vs 0)
  pairs = [(students[r], teachers[compared[r]]) for r in range(num_students)]
  pairs.append((teachers[1], teachers[0]))
  for r, (s, t) in enumerate(pairs):
    expected = np_similarity(s[:4].reshape(-1, classes), t[:4].reshape(-1, classes),
                             labels[:4].reshape(-1))
    for m in METRICS:
      value = got[r][m]
      assert close(None if math.isnan(value) else value, expected[m]), (r, m)
  for j, quality in enumerate(predictions.teacher_quality(teacher_bins)):
    expected = np_similarity(teachers[j, :4].reshape(-1, classes),
                             teachers[j, :4].reshape(-1, classes), labels[:4].reshape(-1))
    assert close(quality["accuracy"], expected["accuracy"])
    assert close(quality["ece"], expected["ece"])


def test_strict_json_writes_null_for_nan():
  from kdjax.analysis import strict_json
  value = strict_json({"a": [np.float32(np.nan), 1.5, np.int64(3)], "b": {"c": math.inf},
                       "d": np.bool_(True)})
  assert json.dumps(value, allow_nan=False) == '{"a": [null, 1.5, 3], "b": {"c": null}, ' \
                                               '"d": true}'
