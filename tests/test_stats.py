"""Tests of kdjax.stats against scipy and independent numpy / closed-form references."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import scipy.stats

from kdjax import stats

ALTERNATIVES = ("two-sided", "less", "greater")


# ---------------------------------------------------------------- independent references


def _pairwise_u1(x, y) -> float:
  """U1 = #{x_i > y_j} + 0.5 #{x_i = y_j} by brute force over all pairs."""
  d = np.asarray(x, float)[:, None] - np.asarray(y, float)[None, :]
  return float(np.sum(d > 0) + 0.5 * np.sum(d == 0))


def _normal_p(x, y, alternative: str) -> float:
  """Tie-corrected normal approximation with 0.5 continuity correction (textbook formula)."""
  n1, n2 = len(x), len(y)
  n = n1 + n2
  u1 = _pairwise_u1(x, y)
  _, t = np.unique(np.concatenate([x, y]), return_counts=True)
  sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - np.sum(t**3 - t) / (n * (n - 1))))
  mu = n1 * n2 / 2
  sf = lambda z: 0.5 * math.erfc(z / math.sqrt(2))
  if alternative == "greater":
    return sf((u1 - mu - 0.5) / sigma)
  if alternative == "less":
    return sf((mu - u1 - 0.5) / sigma)
  return min(1.0, 2 * sf((abs(u1 - mu) - 0.5) / sigma))


def _holm_loop(p):
  """Holm adjusted p-values written as the textbook loop over sorted p-values."""
  idx = sorted(range(len(p)), key=lambda i: p[i])
  m, running, out = len(p), 0.0, [0.0] * len(p)
  for rank, i in enumerate(idx):
    running = max(running, (m - rank) * p[i])
    out[i] = min(1.0, running)
  return np.array(out)


def _holm_rejects(p, alpha):
  """Holm's sequentially rejective procedure: reject while p_(i) <= alpha / (m - i + 1)."""
  m = len(p)
  rejected = np.zeros(m, bool)
  for rank, i in enumerate(np.argsort(p, kind="stable")):
    if p[i] > alpha / (m - rank):
      break
    rejected[i] = True
  return rejected


# ---------------------------------------------------------------- mann_whitney_u


def _samples(rng, n1, n2, ties):
  if ties:  # few distinct values: many ties within and across samples
    return rng.integers(0, 4, n1).astype(float), rng.integers(1, 5, n2).astype(float)
  return rng.normal(size=n1), rng.normal(0.7, 1.0, size=n2)


def _null_u_counts(n1: int, n2: int) -> np.ndarray:
  """Without ties: counts[u] = how many of the C(n1+n2, n1) rank sets of x give U1 = u, by
  dynamic programming over the ranks 1..n (counts[k][s] = subsets of size k with rank sum s):
  the exact null distribution at sizes too large to enumerate."""
  n = n1 + n2
  max_sum = sum(range(n - n1 + 1, n + 1))
  counts = np.zeros((n1 + 1, max_sum + 1), dtype=object)  # Python ints: no overflow
  counts[0, 0] = 1
  for rank in range(1, n + 1):
    for k in range(min(rank, n1), 0, -1):
      counts[k, rank:] = counts[k, rank:] + counts[k - 1, :max_sum + 1 - rank]
  offset = n1 * (n1 + 1) // 2
  return np.array(counts[n1, offset:offset + n1 * n2 + 1], dtype=float)


def _exact_p_dp(u1: float, n1: int, n2: int, alternative: str) -> float:
  """Exact p-value of U1 without ties from `_null_u_counts`."""
  counts = _null_u_counts(n1, n2)
  us = np.arange(counts.size)
  total = counts.sum()
  p_ge = counts[us >= u1 - 1e-9].sum() / total
  p_le = counts[us <= u1 + 1e-9].sum() / total
  return {"greater": p_ge, "less": p_le}.get(alternative, min(1.0, 2 * min(p_ge, p_le)))


def _all_splits_u(x, y) -> tuple[float, np.ndarray]:
  """(observed U1, U1 of every split of the pooled values into sizes n1, n2): brute force over
  all C(n1+n2, n1) label permutations, ties and all, U1 by counting pairs."""
  pooled = np.concatenate([np.asarray(x, float), np.asarray(y, float)])
  n, n1 = pooled.size, len(x)
  greater = (pooled[:, None] > pooled[None, :]).astype(float) + \
      0.5 * (pooled[:, None] == pooled[None, :])
  np.fill_diagonal(greater, 0.0)
  us = []
  for chosen in itertools.combinations(range(n), n1):
    mask = np.zeros(n, bool)
    mask[list(chosen)] = True
    us.append(greater[mask][:, ~mask].sum())
  return _pairwise_u1(x, y), np.array(us)


def _permutation_p(x, y, alternative: str) -> float:
  """The permutation p-value by enumerating every split (scipy's two-sided convention:
  min(1, 2 min(P(U >= u), P(U <= u))))."""
  u1, us = _all_splits_u(x, y)
  p_ge, p_le = np.mean(us >= u1 - 1e-9), np.mean(us <= u1 + 1e-9)
  return {"greater": p_ge, "less": p_le}.get(alternative, min(1.0, 2 * min(p_ge, p_le)))


@pytest.mark.parametrize("n1,n2,ties,method", [
    (3, 3, False, "exact"), (3, 4, False, "exact"), (5, 8, False, "exact"),
    (8, 12, False, "exact"), (10, 12, False, "exact"), (30, 25, False, "exact"),
    (3, 3, True, "permutation"), (4, 6, True, "permutation"), (8, 8, True, "permutation"),
    (15, 20, True, "asymptotic")])
def test_mann_whitney_against_enumeration_and_closed_forms(n1, n2, ties, method):
  """p-values against the null distribution itself: enumeration of all label permutations of
  the pooled values (tied samples), the exact U distribution by dynamic programming (untied),
  or the textbook tie-corrected normal approximation (large tied samples)."""
  rng = np.random.default_rng(n1 * 100 + n2)
  for trial in range(3):
    x, y = _samples(rng, n1, n2, ties)
    assert ties == (np.unique(np.concatenate([x, y])).size < n1 + n2)
    for alternative in ALTERNATIVES:
      res = stats.mann_whitney_u(x, y, alternative=alternative)
      assert isinstance(res, stats.MannWhitneyResult)
      assert res.method == method and method in stats.P_VALUE_METHODS
      assert res.statistic == _pairwise_u1(x, y)
      if method == "exact":
        expected = _exact_p_dp(res.statistic, n1, n2, alternative)
        if math.comb(n1 + n2, n1) <= 20_000:  # and by plain enumeration where it is cheap
          assert expected == pytest.approx(_permutation_p(x, y, alternative), rel=1e-12)
      elif method == "permutation":
        expected = _permutation_p(x, y, alternative)
      else:
        expected = _normal_p(x, y, alternative)
      assert res.p_value == pytest.approx(expected, rel=1e-9, abs=1e-12), (trial, alternative)
      # Kerby's r = P(x > y) - P(x < y) over all pairs, ties count 0.
      r = np.mean(np.sign(x[:, None] - y[None, :]))
      assert res.effect_size == pytest.approx(r, abs=1e-12)


def test_mann_whitney_three_seeds_with_ties_cannot_go_below_the_permutation_floor():
  """3 vs 3 seeds (configs/capacity_mismatch.py's paper size) with a tie: the normal
  approximation (scipy's default whenever values tie) gives p = 0.072 here, but no two-sided
  permutation test on 3 vs 3 can give less than 2 / C(6, 3) = 0.1, which complete separation
  attains."""
  x, y = [0.93, 0.95, 0.95], [0.88, 0.88, 0.90]
  assert scipy.stats.mannwhitneyu(x, y).pvalue < 0.1  # what kdjax reported before
  res = stats.mann_whitney_u(x, y)
  assert res.method == "permutation"
  assert res.p_value == pytest.approx(_permutation_p(x, y, "two-sided"), rel=1e-12)
  assert res.p_value == pytest.approx(2 / math.comb(6, 3), rel=1e-12)
  rng = np.random.default_rng(3)
  for _ in range(20):  # any 3 vs 3 with ties
    x, y = rng.integers(0, 3, 3).astype(float), rng.integers(0, 3, 3).astype(float)
    if np.ptp(np.concatenate([x, y])) > 0:
      assert stats.mann_whitney_u(x, y).p_value >= 0.1 - 1e-12


def test_mann_whitney_monte_carlo_for_large_tied_unbalanced_samples():
  """3 vs 70 tied values (62,196 splits, above the enumeration limit): a seeded Monte Carlo
  permutation p-value, reproducible, and within 4 standard errors of the exact one (all splits
  enumerated here)."""
  rng = np.random.default_rng(11)
  x, y = rng.integers(2, 6, 3).astype(float), rng.integers(0, 5, 70).astype(float)
  assert math.comb(73, 3) > stats.EXACT_PERMUTATION_LIMIT
  res = stats.mann_whitney_u(x, y, alternative="greater")
  assert res.method == "monte_carlo"
  assert res == stats.mann_whitney_u(x, y, alternative="greater")  # seeded
  exact = _permutation_p(x, y, "greater")
  se = math.sqrt(exact * (1 - exact) / stats.MONTE_CARLO_RESAMPLES)
  assert abs(res.p_value - exact) <= 4 * se + 1 / stats.MONTE_CARLO_RESAMPLES


def test_mann_whitney_effect_sign_and_one_sided_direction():
  x, y = np.array([5.0, 6.0, 7.0, 8.0]), np.array([1.0, 2.0, 3.0])
  up = stats.mann_whitney_u(x, y, alternative="greater")
  assert up.effect_size == 1.0 and up.statistic == 12.0
  assert up.p_value == pytest.approx(1 / math.comb(7, 3))
  assert stats.mann_whitney_u(x, y, alternative="less").p_value == 1.0
  down = stats.mann_whitney_u(y, x)
  assert down.effect_size == -1.0 and down.statistic == 0.0
  assert down.p_value == pytest.approx(2 / math.comb(7, 3))


def test_mann_whitney_no_variation_is_no_difference():
  for n1, n2 in [(3, 3), (9, 12)]:  # exact-sized and asymptotic-sized
    for alternative in ALTERNATIVES:
      with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = stats.mann_whitney_u(np.full(n1, 0.25), [0.25] * n2, alternative=alternative)
      assert res == (n1 * n2 / 2, 1.0, 0.0, "exact")


def test_mann_whitney_allows_inf_and_sequences():
  x, y = [1.0, np.inf, 3.0], [-np.inf, 0.5, 2.0, 2.5]
  res = stats.mann_whitney_u(x, y)
  assert res.statistic == _pairwise_u1(x, y) == 10.0
  assert res.method == "exact"
  assert res.p_value == pytest.approx(_permutation_p(x, y, "two-sided"))


@pytest.mark.parametrize("x,y,match", [
    ([1.0], [1.0, 2.0, 3.0], r"x must contain at least 2 values, got 1"),
    ([1.0, 2.0], [], r"y must contain at least 2 values, got 0"),
    ([1.0, np.nan, 2.0], [1.0, 2.0], r"x contains NaN at index \[1\]"),
    ([1.0, 2.0], [np.nan, 2.0], r"y contains NaN"),
    ([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0], r"x must be a 1-D"),
])
def test_mann_whitney_invalid_samples(x, y, match):
  with pytest.raises(ValueError, match=match):
    stats.mann_whitney_u(x, y)


def test_mann_whitney_invalid_alternative():
  with pytest.raises(ValueError, match=r"alternative must be one of 'two-sided'"):
    stats.mann_whitney_u([1.0, 2.0], [3.0, 4.0], alternative="two_sided")


# ---------------------------------------------------------------- bootstrap_ci


def test_bootstrap_ci_contains_mean_deterministic_and_seeded():
  x = np.random.default_rng(0).normal(size=12)
  ci = stats.bootstrap_ci(x, seed=3)
  assert isinstance(ci, stats.ConfidenceInterval)
  assert ci.low < np.mean(x) < ci.high
  assert ci == stats.bootstrap_ci(x, seed=3)
  assert ci != stats.bootstrap_ci(x, seed=4)
  wide = stats.bootstrap_ci(x, confidence=0.99, seed=3)
  narrow = stats.bootstrap_ci(x, confidence=0.8, seed=3)
  assert wide.low < ci.low < narrow.low < narrow.high < ci.high < wide.high
  # The percentile interval of the mean cannot leave the data's range.
  assert x.min() <= wide.low and wide.high <= x.max()


def test_bootstrap_ci_matches_normal_closed_form_and_shrinks_with_n():
  rng = np.random.default_rng(1)
  big = rng.normal(2.0, 3.0, size=400)
  # Bootstrap distribution of the mean ~ N(mean, std_ddof0^2 / n): percentile CI = mean -+ z se.
  se = np.std(big) / math.sqrt(big.size)
  z = 1.959963984540054
  low, high = stats.bootstrap_ci(big, seed=0)
  assert low == pytest.approx(np.mean(big) - z * se, abs=0.1 * se)
  assert high == pytest.approx(np.mean(big) + z * se, abs=0.1 * se)
  small = stats.bootstrap_ci(big[:25], seed=0)
  ratio = (small.high - small.low) / (high - low)
  assert 2.5 < ratio < 6.0  # ~ sqrt(400 / 25) = 4


def test_bootstrap_ci_is_the_percentile_interval():
  # Skewed small sample, where percentile and BCa differ (BCa shifts both ends up by ~0.02-0.04).
  x = np.random.default_rng(6).exponential(1.0, size=15)
  rng = np.random.default_rng(123)
  means = x[rng.integers(0, x.size, (200_000, x.size))].mean(axis=1)
  ref_low, ref_high = np.quantile(means, [0.025, 0.975])
  low, high = stats.bootstrap_ci(x, seed=0)
  assert low == pytest.approx(ref_low, abs=0.012)  # Monte Carlo error of B = 10^4: ~0.006
  assert high == pytest.approx(ref_high, abs=0.012)


def test_bootstrap_ci_coverage_roughly_nominal():
  rng = np.random.default_rng(2)
  hits = 0
  trials = 200
  for seed in range(trials):
    x = rng.exponential(1.0, size=30)
    low, high = stats.bootstrap_ci(x, num_resamples=1000, seed=seed)
    hits += low <= 1.0 <= high
  # Percentile intervals under-cover a little at n = 30 on skewed data (~0.92).
  assert 0.85 <= hits / trials <= 0.99


def test_bootstrap_ci_other_statistics():
  x = np.array([0.3, 0.1, 0.9, 0.5, 0.7, 0.2])
  med = stats.bootstrap_ci(x, statistic=np.median, num_resamples=2000)
  assert x.min() <= med.low <= np.median(x) <= med.high <= x.max()
  # A statistic without an `axis` keyword goes through scipy's per-resample loop.
  rng_width = stats.bootstrap_ci(x, statistic=lambda v: float(np.ptp(v)), num_resamples=300)
  assert 0.0 <= rng_width.low <= rng_width.high <= np.ptp(x)


def test_bootstrap_ci_constant_sample_is_a_point_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert stats.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert stats.bootstrap_ci(np.full(7, -3.0), statistic=np.median) == (-3.0, -3.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=[1.0]), r"x must contain at least 2 values, got 1"),
    (dict(x=[]), r"x must contain at least 2 values, got 0"),
    (dict(x=[1.0, np.nan]), r"x contains NaN"),
    (dict(x=[1.0, np.inf]), r"x contains \+-inf"),
    (dict(x=[1.0, 2.0], confidence=1.0), r"confidence must be a finite number in \(0, 1\)"),
    (dict(x=[1.0, 2.0], confidence=0.0), r"confidence"),
    (dict(x=[1.0, 2.0], num_resamples=0), r"num_resamples must be a finite number in \[1, inf"),
    (dict(x=[1.0, 2.0], num_resamples=10.5), r"num_resamples must be an integer >= 1"),
    (dict(x=[1.0, 2.0], seed=-1), r"seed"),
])
def test_bootstrap_ci_invalid(kwargs, match):
  with pytest.raises(ValueError, match=match):
    stats.bootstrap_ci(**kwargs)


# ---------------------------------------------------------------- holm


def test_holm_textbook_example():
  # Wikipedia "Holm-Bonferroni method": p = (0.01, 0.04, 0.03, 0.005), alpha = 0.05; H1 and H4
  # are rejected. By hand: sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, 1*0.04 =
  # 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06.
  adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
  np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
  np.testing.assert_array_equal(adjusted <= 0.05, [True, False, False, True])


def test_holm_matches_loop_and_sequential_procedure():
  rng = np.random.default_rng(3)
  for m in (1, 2, 7, 40):
    p = rng.uniform(0, 0.2, m) ** 2
    p[: m // 4] = p[-1]  # ties
    adjusted = stats.holm(p)
    np.testing.assert_allclose(adjusted, _holm_loop(list(p)), rtol=1e-12)
    assert np.all(adjusted >= p) and np.all(adjusted <= 1.0)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(adjusted[order]) >= 0)
    for alpha in (0.001, 0.01, 0.05, 0.2):
      np.testing.assert_array_equal(adjusted <= alpha, _holm_rejects(p, alpha))


def test_holm_caps_at_one_keeps_shape_and_nan():
  np.testing.assert_array_equal(stats.holm([0.5, 0.9, 0.6]), [1.0, 1.0, 1.0])
  out = stats.holm([[0.01, np.nan], [0.04, 0.2]])
  assert out.shape == (2, 2) and np.isnan(out[0, 1])
  # NaN is not part of the family: m = 3.
  np.testing.assert_allclose(out[~np.isnan(out)], [0.03, 0.08, 0.2], rtol=1e-12)
  assert np.all(np.isnan(stats.holm([np.nan, np.nan])))
  assert stats.holm([]).shape == (0,)


@pytest.mark.parametrize("bad", [[0.1, 1.5], [-0.01], [np.inf, 0.2]])
def test_holm_invalid(bad):
  with pytest.raises(ValueError, match=r"p_values must lie in \[0, 1\]"):
    stats.holm(bad)


def test_holm_matches_statsmodels():
  # statsmodels is in the `test` extras (setup.py) and pinned in constraints.txt: no skip.
  from statsmodels.stats import multitest  # pylint: disable=g-import-not-at-top
  p = np.random.default_rng(4).uniform(0, 0.1, 25)
  np.testing.assert_allclose(stats.holm(p), multitest.multipletests(p, method="holm")[1],
                             rtol=1e-12)


# ---------------------------------------------------------------- summarize


def test_mean_std_over_the_first_axis():
  x = np.random.default_rng(6).normal(0.5, 0.1, size=(5, 3))
  mean, std = stats.mean_std(x)
  np.testing.assert_allclose(mean, x.sum(0) / 5, rtol=1e-14)
  np.testing.assert_allclose(std, np.sqrt(((x - x.mean(0))**2).sum(0) / 4), rtol=1e-12)
  one_mean, one_std = stats.mean_std([0.25])
  assert float(one_mean) == 0.25 and math.isnan(float(one_std))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    none_mean, none_std = stats.mean_std([])
    row_mean, row_std = stats.mean_std(x[:1])
  assert math.isnan(float(none_mean)) and math.isnan(float(none_std))
  np.testing.assert_array_equal(row_mean, x[0])
  assert row_std.shape == (3,) and np.isnan(row_std).all()


def test_summarize_against_numpy():
  x = np.random.default_rng(5).normal(0.8, 0.05, size=9)
  rec = stats.summarize(x, num_resamples=2000, seed=1)
  assert list(rec) == ["mean", "std", "ci_low", "ci_high", "n"]
  assert rec["mean"] == pytest.approx(np.sum(x) / x.size, rel=1e-14)
  assert rec["std"] == pytest.approx(math.sqrt(np.sum((x - x.mean())**2) / (x.size - 1)),
                                     rel=1e-12)
  assert rec["n"] == 9 and isinstance(rec["n"], int)
  assert (rec["ci_low"], rec["ci_high"]) == stats.bootstrap_ci(x, num_resamples=2000, seed=1)
  assert rec["ci_low"] < rec["mean"] < rec["ci_high"]
  assert json.loads(json.dumps(rec)) == rec


def test_summarize_fewer_than_two_values():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    one = stats.summarize([0.7])
    none = stats.summarize([])
  assert one["mean"] == 0.7 and one["n"] == 1
  assert none["n"] == 0 and math.isnan(none["mean"])
  for rec in (one, none):
    assert all(math.isnan(rec[k]) for k in ("std", "ci_low", "ci_high"))


def test_summarize_invalid():
  with pytest.raises(ValueError, match=r"x contains NaN"):
    stats.summarize([0.1, np.nan, 0.3])
  with pytest.raises(ValueError, match=r"confidence"):
    stats.summarize([0.1, 0.3], confidence=1.2)


def test_analysis_records_the_p_value_method_of_every_test():
  """metrics.json's tests carry `p_method`; tied 3 vs 3 seeds get the permutation p-value."""
  from kdjax.analysis import statistics  # pylint: disable=g-import-not-at-top
  groups = [statistics.ArmGroup("kd", "kd", (), (0, 1, 2), (0, 1, 2)),
            statistics.ArmGroup("rcd", "rcd", (), (3, 4, 5), (3, 4, 5))]
  accuracy = [0.93, 0.95, 0.95, 0.88, 0.88, 0.90]
  js = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
  replica_metrics = [{"accuracy": a, "js_divergence": j} for a, j in zip(accuracy, js)]
  records = statistics.run_tests(groups, replica_metrics, ["accuracy", "js_divergence"])
  by_metric = {r["metric"]: r for r in records}
  assert by_metric["accuracy"]["p_method"] == "permutation"
  assert by_metric["accuracy"]["p_value"] == pytest.approx(
      _permutation_p(accuracy[:3], accuracy[3:], "two-sided"))
  assert by_metric["js_divergence"]["p_method"] == "exact"
  assert by_metric["js_divergence"]["p_value"] == pytest.approx(0.1)
  assert json.loads(json.dumps(records)) == records


# ------------------------------------------------------------------------------------------------
# Issue 15: Wilcoxon signed-rank, TOST, cluster bootstrap, power.


def _sign_flip_p(d, alternative="two-sided") -> float:
  """Brute force: every one of the 2^n' sign assignments of the non-zero |d| (zeros dropped),
  W+ on average ranks, p as the fraction at least as extreme (two-sided: 2 min, capped)."""
  d = np.asarray(d, float)
  d = d[d != 0]
  ranks = scipy.stats.rankdata(np.abs(d))
  observed = ranks[d > 0].sum()
  signs = np.array(list(itertools.product([0, 1], repeat=d.size)), float)
  w = signs @ ranks
  greater = np.mean(w >= observed - 1e-9)
  less = np.mean(w <= observed + 1e-9)
  return {"greater": greater, "less": less,
          "two-sided": min(1.0, 2 * min(greater, less))}[alternative]


@pytest.mark.parametrize("n", [3, 6, 9])
@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_wilcoxon_without_ties_is_scipys_exact_test_and_enumeration(n, alternative):
  rng = np.random.default_rng(n)
  x, y = rng.normal(0.4, 1, n), rng.normal(0, 1, n)
  result = stats.wilcoxon_signed_rank(x, y, alternative=alternative)
  ref = scipy.stats.wilcoxon(x, y, alternative=alternative, method="exact")
  assert result.method == "exact"
  assert result.p_value == pytest.approx(float(ref.pvalue), rel=1e-12)
  assert result.p_value == pytest.approx(_sign_flip_p(x - y, alternative), rel=1e-12)
  d = x - y
  ranks = scipy.stats.rankdata(np.abs(d))
  assert result.statistic == pytest.approx(ranks[d > 0].sum())
  assert result.effect_size == pytest.approx(
      (ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


@pytest.mark.parametrize("d", [
    [0.02, 0.02, -0.01, 0.03, 0.0, 0.02, 0.01, -0.01],   # ties and a zero (accuracy-like)
    [1, 1, 1, -1, 1, 1, 0, 0, 1, 1],                      # all |d| tied: the sign test
    [0.5, 0.0, 0.0, 0.25, 0.25, 0.5, -0.25],
])
@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_wilcoxon_ties_and_zeros_against_sign_flip_enumeration(d, alternative):
  y = np.full(len(d), 0.5)  # exact differences: x - y == d
  x = y + np.array(d, float)
  result = stats.wilcoxon_signed_rank(x, y, alternative=alternative)
  assert result.method == "permutation"
  assert result.num_nonzero == int(np.sum(np.array(d) != 0))
  assert result.p_value == pytest.approx(_sign_flip_p(x - y, alternative), rel=1e-9)
  if np.all(np.abs(np.array(d)[np.array(d) != 0]) == 1):  # the sign test (binomial) p-value
    k = int(np.sum(np.array(d) > 0))
    n = int(np.sum(np.array(d) != 0))
    if alternative == "two-sided":
      binom = scipy.stats.binom(n, 0.5)
      assert result.p_value == pytest.approx(min(1, 2 * min(binom.sf(k - 1), binom.cdf(k))))


def test_wilcoxon_degenerate_asymptotic_and_invalid():
  assert stats.wilcoxon_signed_rank([1, 2, 3], [1, 2, 3]) == (0.0, 1.0, 0.0, "exact", 0)
  rng = np.random.default_rng(0)
  d = np.round(rng.normal(0.3, 1, 30), 1)  # many tied |d|, n' > 16
  result = stats.wilcoxon_signed_rank(d, np.zeros(30))
  assert result.method == "asymptotic"
  ref = scipy.stats.wilcoxon(d[d != 0], method="asymptotic", correction=True)
  assert result.p_value == pytest.approx(float(ref.pvalue), rel=1e-12)
  with pytest.raises(ValueError, match="paired"):
    stats.wilcoxon_signed_rank([1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match="NaN"):
    stats.wilcoxon_signed_rank([1, np.nan], [1, 2])


def _textbook_tost(d, margin, alpha=0.05):
  """Schuirmann's TOST written from the formulas: t1 = (mean + m) / se, t2 = (mean - m) / se,
  p1 = P(T_{n-1} >= t1), p2 = P(T_{n-1} <= t2)."""
  n = len(d)
  se = np.std(d, ddof=1) / math.sqrt(n)
  t1, t2 = (np.mean(d) + margin) / se, (np.mean(d) - margin) / se
  p1, p2 = scipy.stats.t.sf(t1, n - 1), scipy.stats.t.cdf(t2, n - 1)
  half = scipy.stats.t.ppf(1 - alpha, n - 1) * se
  return max(p1, p2), p1, p2, np.mean(d) - half, np.mean(d) + half


def test_tost_paired_known_answers():
  # Differences with mean 0.002 and sd 0.004 over 10 pairs: se = 0.004 / sqrt(10) = 0.001265;
  # against +-0.01: t = (0.002 + 0.01) / se = 9.49 and (0.002 - 0.01) / se = -6.32, df 9.
  base = np.array([-1, 1, -1, 1, -1, 1, -1, 1, -1, 1], float)
  d = 0.002 + 0.004 * base * math.sqrt(9 / 10)  # sd(ddof=1) exactly 0.004
  assert np.std(d, ddof=1) == pytest.approx(0.004)
  y = np.full(10, 0.9)
  result = stats.tost(y + d, y, 0.01, paired=True)
  p, p1, p2, lo, hi = _textbook_tost(d, 0.01)
  assert (result.p_value, result.p_lower, result.p_upper) == pytest.approx((p, p1, p2), rel=1e-9)
  assert result.p_upper == pytest.approx(scipy.stats.t.cdf(-0.008 / (0.004 / math.sqrt(10)), 9))
  assert result.p_value < 1e-4 and (result.ci_low, result.ci_high) == pytest.approx((lo, hi))
  assert result.method == "paired t" and result.df == 9
  # Against +-0.002 the mean difference sits on the margin: p_upper = 0.5, not equivalent.
  on_margin = stats.tost(y + d, y, 0.002, paired=True)
  assert on_margin.p_upper == pytest.approx(0.5) and on_margin.p_value == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tost_matches_statsmodels_and_the_ci_rule(seed):
  from statsmodels.stats.weightstats import ttost_ind, ttost_paired
  rng = np.random.default_rng(seed)
  x, y = rng.normal(0.93, 0.01, 8), rng.normal(0.935, 0.015, 8)
  for margin in (0.005, 0.01, 0.02):
    paired = stats.tost(x, y, margin, paired=True)
    ref = ttost_paired(x, y, -margin, margin)
    assert paired.p_value == pytest.approx(float(ref[0]), rel=1e-9)
    assert paired.p_lower == pytest.approx(float(ref[1][1]), rel=1e-9)
    assert paired.p_upper == pytest.approx(float(ref[2][1]), rel=1e-9)
    welch = stats.tost(x, y, margin, paired=False)
    ref = ttost_ind(x, y, -margin, margin, usevar="unequal")
    assert welch.p_value == pytest.approx(float(ref[0]), rel=1e-9)
    assert welch.df == pytest.approx(float(ref[1][2]), rel=1e-9)
    for r in (paired, welch):  # equivalent at 0.05 <=> the 90% CI lies inside +-margin
      assert (r.p_value <= 0.05) == (-margin < r.ci_low and r.ci_high < margin)


def test_tost_no_variation_and_invalid():
  same = stats.tost([1, 2, 3], [1, 2, 3], 0.1, paired=True)
  assert (same.p_value, same.difference, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0, 0.0)
  far = stats.tost([1, 2, 3], [0.5, 1.5, 2.5], 0.1, paired=True)
  assert far.p_value == 1.0
  with pytest.raises(ValueError, match="margin"):
    stats.tost([1, 2], [1, 2], 0.0, paired=True)


def test_cluster_bootstrap_coverage_on_simulated_nested_data():
  """Students nested in teachers (teacher effect sd 1, student sd 0.5, 12 teachers x 4
  students): the two-stage bootstrap covers the true mean about as often as promised (it is
  conservative by design), while the students-only percentile bootstrap, which ignores the
  nesting, covers far less."""
  rng = np.random.default_rng(0)
  num_sims, k, m = 200, 12, 4
  clusters = np.repeat(np.arange(k), m)
  hits_cluster = hits_naive = 0
  for s in range(num_sims):
    x = np.repeat(rng.normal(0, 1, k), m) + rng.normal(0, 0.5, k * m)
    lo, hi = stats.cluster_bootstrap_ci(x, clusters, num_resamples=1000, seed=s)
    hits_cluster += lo <= 0 <= hi
    lo, hi = stats.bootstrap_ci(x, num_resamples=1000, seed=s)
    hits_naive += lo <= 0 <= hi
  assert 0.88 <= hits_cluster / num_sims <= 1.0
  assert hits_naive / num_sims < 0.8


def test_cluster_bootstrap_deterministic_constant_and_one_stage_variance():
  x = np.arange(12.0)
  clusters = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
  assert stats.cluster_bootstrap_ci(x, clusters, seed=3) == stats.cluster_bootstrap_ci(
      x, clusters, seed=3)
  assert stats.cluster_bootstrap_ci([2.0] * 4, [0, 0, 1, 1]) == (2.0, 2.0)
  # Identical students within each teacher: only the teacher draw varies, so the interval is
  # the percentile interval of the mean of K draws from the 4 teacher means (closed form of
  # its spread: sd = sqrt(var_pop / K)).
  means = np.array([1.0, 2.0, 4.0, 8.0])
  x = np.repeat(means, 3)
  lo, hi = stats.cluster_bootstrap_ci(x, np.repeat(np.arange(4), 3), num_resamples=40_000)
  sd = math.sqrt(np.var(means) / 4)
  assert (hi - lo) == pytest.approx(2 * 1.96 * sd, rel=0.12)
  with pytest.raises(ValueError, match="one label per value"):
    stats.cluster_bootstrap_ci([1.0, 2.0], [0])


def test_summarize_uses_the_cluster_bootstrap_with_several_teachers():
  x = [0.9, 0.91, 0.93, 0.95, 0.96, 0.97]
  one = stats.summarize(x, clusters=[0] * 6)
  assert (one["ci_low"], one["ci_high"]) == stats.bootstrap_ci(x)
  two = stats.summarize(x, clusters=[0, 1, 0, 1, 0, 1])
  assert (two["ci_low"], two["ci_high"]) == stats.cluster_bootstrap_ci(x, [0, 1, 0, 1, 0, 1])


def test_min_p_value_closed_forms_and_enumeration():
  for n in (3, 5, 8):  # all differences of one sign
    assert stats.min_p_value("wilcoxon", n) == pytest.approx(
        _sign_flip_p(np.arange(1.0, n + 1)))
  for n_a, n_b in ((3, 3), (3, 5), (8, 8)):  # complete separation
    x, y = np.arange(n_a) + 100.0, np.arange(n_b) + 0.0
    assert stats.min_p_value("mann_whitney", n_a, n_b) == pytest.approx(
        scipy.stats.mannwhitneyu(x, y, method="exact").pvalue)
  assert stats.min_p_value("mann_whitney", 20, 20, method="monte_carlo") == 2 / 10_000
  z = (64 / 2 - 0.5) / math.sqrt(64 * 17 / 12)
  assert stats.min_p_value("mann_whitney", 8, 8, method="asymptotic") == pytest.approx(
      2 * scipy.stats.norm.sf(z))
  # Holm over 10 metrics: Wilcoxon needs 2^n >= 400 (n = 9), Mann-Whitney C(2n, n) >= 400 (6).
  assert stats.seeds_for_verdict("wilcoxon", 10) == 9
  assert stats.seeds_for_verdict("mann_whitney", 10) == 6
  assert stats.seeds_for_verdict("wilcoxon", 1) == 6  # 2 / 2^6 = 0.031


def test_null_distributions_equal_enumeration():
  for n in range(1, 9):
    counts = stats.signed_rank_null_counts(n)
    sums = [sum(s) for r in range(n + 1) for s in itertools.combinations(range(1, n + 1), r)]
    np.testing.assert_array_equal(counts, np.bincount(sums, minlength=n * (n + 1) // 2 + 1))
  for n_a, n_b in ((2, 3), (3, 3), (4, 2)):
    u = []
    pooled = np.arange(n_a + n_b)
    for chosen in itertools.combinations(range(n_a + n_b), n_a):
      x = pooled[list(chosen)]
      y = np.setdiff1d(pooled, x)
      u.append(int(np.sum(x[:, None] > y[None, :])))
    np.testing.assert_array_equal(stats.rank_sum_null_counts(n_a, n_b),
                                  np.bincount(u, minlength=n_a * n_b + 1))


def test_resampled_p_values_equal_scipy_on_tie_free_draws():
  rng = np.random.default_rng(0)
  x, y = rng.normal(0.3, 1, 9), rng.normal(0, 1, 9)
  for paired in (True, False):
    p = stats.resampled_p_values(x, y, 7, paired=paired, num_simulations=20,
                                 rng=np.random.default_rng(1))
    draws = np.random.default_rng(1)
    if paired:
      d = stats.smoothed_resample(x - y, (20, 7), draws)
      ref = [scipy.stats.wilcoxon(row, method="exact").pvalue for row in d]
    else:
      xs, ys = stats.smoothed_resample(x, (20, 7), draws), stats.smoothed_resample(y, (20, 7),
                                                                                  draws)
      ref = [scipy.stats.mannwhitneyu(a, b, method="exact").pvalue for a, b in zip(xs, ys)]
    np.testing.assert_allclose(p, ref, rtol=1e-9)


def test_smoothed_resample_keeps_mean_and_variance():
  x = np.array([0.91, 0.93, 0.93, 0.94, 0.95, 0.97, 0.98, 0.99])
  draws = stats.smoothed_resample(x, (200_000,), np.random.default_rng(0))
  assert np.mean(draws) == pytest.approx(np.mean(x), abs=2e-4)
  assert np.var(draws) == pytest.approx(np.var(x), rel=0.02)  # population variance of x
  assert np.unique(draws).size == draws.size


def test_power_against_closed_forms():
  # Every difference far above zero: every simulated study has all differences positive, so the
  # power is 1 exactly when 2 / 2^n <= alpha: n = 6 at 0.05, 9 at 0.005.
  x, y = np.array([1.0, 1.1, 1.2, 1.3]), np.zeros(4)
  assert stats.seeds_for_power(x, y, paired=True, alpha=0.05) == 6
  assert stats.seeds_for_power(x, y, paired=True, alpha=0.005) == 9
  # Complete separation for Mann-Whitney: 2 / C(2n, n) <= 0.05 from n = 4 (C(8, 4) = 70).
  assert stats.seeds_for_power(x + 10, y + np.arange(4) * 0.1, paired=False) == 4
  # Under H0 (differences symmetric about 0) the rejection rate is the test's size, which the
  # enumeration of all 2^8 sign assignments gives in closed form.
  d = np.array([-0.4, -0.3, -0.2, -0.1, 0.1, 0.2, 0.3, 0.4])
  p = stats.resampled_p_values(d, np.zeros(8), 8, paired=True, num_simulations=20_000,
                               rng=np.random.default_rng(0))
  signs = np.array(list(itertools.product([0, 1], repeat=8)), float)
  w = signs @ np.arange(1.0, 9.0)
  p_all = [min(1.0, 2 * min(np.mean(w >= t), np.mean(w <= t))) for t in w]
  size = np.mean(np.array(p_all) <= 0.05)
  assert np.mean(p <= 0.05) == pytest.approx(size, abs=0.006)
  # Normal shift, large observed samples: Mann-Whitney's power is close to the t-test's at
  # the same n scaled by the asymptotic relative efficiency 3 / pi (Lehmann 1975); the
  # noncentral-t power is the closed form.
  rng = np.random.default_rng(1)
  x, y = rng.normal(1.0, 1, 400), rng.normal(0, 1, 400)
  x = (x - x.mean()) / x.std(ddof=1) + 1.0
  y = (y - y.mean()) / y.std(ddof=1)
  n = 20
  simulated = np.mean(stats.resampled_p_values(x, y, n, paired=False, num_simulations=4000,
                                               rng=np.random.default_rng(2)) <= 0.05)
  n_eff = n * 3 / math.pi
  df = 2 * n_eff - 2
  nc = 1.0 * math.sqrt(n_eff / 2)
  crit = scipy.stats.t.ppf(0.975, df)
  closed = scipy.stats.nct.sf(crit, df, nc) + scipy.stats.nct.cdf(-crit, df, nc)
  assert simulated == pytest.approx(closed, abs=0.04)


def test_power_without_an_effect_is_none():
  x = np.array([0.1, -0.1, 0.2, -0.2, 0.05, -0.05])
  assert stats.seeds_for_power(x, np.zeros(6), paired=True, max_seeds=30) is None


@pytest.mark.parametrize("value,match", [
    ("accuracy", "METRIC=MARGIN"), ("accuracy=0", "number > 0"), ("accuracy=x", "number > 0"),
    ("acc=0.01", "not a metric"), ("accuracy=-1", "number > 0"), ("accuracy=inf", "number > 0")])
def test_equivalence_margins_invalid(value, match):
  with pytest.raises(ValueError, match=match):
    stats.parse_equivalence_margins(value)


def test_equivalence_margins_defaults_and_overrides():
  assert stats.parse_equivalence_margins("") == stats.DEFAULT_EQUIVALENCE_MARGINS
  margins = stats.parse_equivalence_margins("accuracy=0.02, ece=0.005")
  assert margins["accuracy"] == 0.02 and margins["ece"] == 0.005
  assert margins["agreement"] == stats.DEFAULT_EQUIVALENCE_MARGINS["agreement"]
