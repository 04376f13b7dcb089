"""Statistics that compare KD arms across seeds: Mann-Whitney U, bootstrap CIs, Holm.

The protocol is the one of Mason-Williams et al. (arXiv 2510.12615): each arm (KD, RCD, SIDDO,
...) is trained for several seeds, every functional-similarity metric gives one number per seed,
and two arms are compared per metric with a two-sided Mann-Whitney U test at 0.05. Because many
metrics are tested at once, kdjax also reports Holm-adjusted p-values (Holm 1979).

Researchers publish these numbers, so the tests and intervals are scipy's own
(`scipy.stats.mannwhitneyu`, `scipy.stats.bootstrap`) and this module only fixes the choices
(an exact or permutation p-value wherever samples are small or tied, see `mann_whitney_u`),
validates the input and handles the degenerate cases that replicate studies actually hit
(identical metrics across seeds, a single surviving seed). This is host-side numpy/scipy code:
it runs once per analysis on a few numbers per arm, so there is nothing to gain from JAX.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import scipy.stats

from kdjax._checks import check_choice, check_int, check_range

ALTERNATIVES = ("two-sided", "less", "greater")
DEFAULT_NUM_RESAMPLES = 10_000

# How `mann_whitney_u` computes a p-value (see its docstring for when each is used).
P_VALUE_METHODS = ("exact", "permutation", "monte_carlo", "asymptotic")
# Tied samples with at most this many splits C(n1 + n2, n1) get the exact permutation p-value
# (every split enumerated; 9 vs 9 seeds = 48,620 splits, about 0.4 s).
EXACT_PERMUTATION_LIMIT = 50_000
# Tied samples with more splits but at most this many values on the smaller side get a
# Monte Carlo permutation p-value; beyond it the normal approximation is accurate.
SMALL_SAMPLE = 8
MONTE_CARLO_RESAMPLES = 9_999
MONTE_CARLO_SEED = 0


class MannWhitneyResult(NamedTuple):
  """Result of `mann_whitney_u`: U of the first sample, p-value, rank-biserial correlation, and
  which of `P_VALUE_METHODS` gave the p-value."""
  statistic: float
  p_value: float
  effect_size: float
  method: str


class ConfidenceInterval(NamedTuple):
  """A two-sided confidence interval [low, high]."""
  low: float
  high: float


def _as_sample(name: str, values, *, min_size: int, allow_inf: bool) -> np.ndarray:
  """Returns `values` as a 1-D float64 array, or raises ValueError naming `name`."""
  x = np.asarray(values, dtype=np.float64)
  if x.ndim != 1:
    raise ValueError(f"{name} must be a 1-D sequence of numbers (one value per replica), "
                     f"got shape {x.shape}")
  if x.size < min_size:
    raise ValueError(f"{name} must contain at least {min_size} values, got {x.size}")
  if np.isnan(x).any():
    raise ValueError(f"{name} contains NaN at index {np.flatnonzero(np.isnan(x)).tolist()}; "
                     "exclude diverged replicas before computing statistics")
  if not allow_inf and np.isinf(x).any():
    raise ValueError(f"{name} contains +-inf at index {np.flatnonzero(np.isinf(x)).tolist()}; "
                     "values must be finite")
  return x


def mann_whitney_u(x, y, *, alternative: str = "two-sided") -> MannWhitneyResult:
  """Mann-Whitney U test of x against y, with the rank-biserial correlation as effect size.

  The test of the arm comparison in Mason-Williams et al. (arXiv 2510.12615). The statistic is

    U1 = R1 - n1 (n1 + 1) / 2 = #{(i, j): x_i > y_j} + 0.5 #{(i, j): x_i = y_j},

  with R1 the sum of the (average, for ties) ranks of x in the pooled sample, as
  `scipy.stats.mannwhitneyu` computes it. The p-value is that of the permutation null
  hypothesis: under H0 every one of the C(n1 + n2, n1) ways to split the pooled values into
  samples of sizes n1 and n2 is equally likely, and p is the fraction of splits whose U1 is at
  least as extreme as the observed one ("greater": U1 >= observed, "less": U1 <= observed,
  "two-sided": min(1, 2 min(p_greater, p_less)), scipy's convention). `method` says how it was
  computed, chosen by the data (all by scipy):

    "exact"        no tied values: the exact null distribution of U
                   (`mannwhitneyu(method="exact")`), any sample size;
    "permutation"  tied values and at most EXACT_PERMUTATION_LIMIT (50,000) splits: every split
                   enumerated (`method=PermutationMethod(n_resamples=inf)`), exact with ties;
    "monte_carlo"  tied values, more splits, and at most SMALL_SAMPLE (8) values on the smaller
                   side: MONTE_CARLO_RESAMPLES (9,999) random splits from a fixed seed
                   (`PermutationMethod`, whose p-value counts the observed split, so p >=
                   1 / 10,000); reproducible, not exact;
    "asymptotic"   tied values and more than 8 values on each side with more than 50,000
                   splits: the normal approximation with the tie-corrected variance
                   sigma^2 = n1 n2 / 12 * ((n + 1) - sum_k (t_k^3 - t_k) / (n (n - 1))) and a 0.5
                   continuity correction.

  Why not scipy's default ("auto"): it uses the normal approximation whenever a value is tied,
  however small the samples. Replicate studies tie often (accuracy and agreement on a few
  hundred eval points take few distinct values), and at 3 vs 3 seeds the approximation can give
  p = 0.047 where the smallest p-value a two-sided permutation test can attain is 2 / 20 = 0.1.

  effect_size is the rank-biserial correlation by Kerby's simple difference formula
  (Kerby 2014, "The simple difference formula", Comprehensive Psychology 3:11.IT.3.1):

    r = 2 U1 / (n1 n2) - 1 = P(x > y) - P(x < y)

  over all n1 n2 pairs (ties count for neither side); r > 0 when x tends to be larger than y,
  r = 1 when every x exceeds every y, and r = -1 when every x is below every y.

  No variation (every value of x and y identical): every split has the same U, so the result is
  U1 = n1 n2 / 2, p_value = 1.0, effect_size = 0.0 and method "exact" for every alternative.

  Args:
    x: 1-D sample of the first arm (one value per replica), at least 2 values, no NaN (+-inf
      is allowed: ranks are still defined).
    y: 1-D sample of the second arm, same requirements.
    alternative: "two-sided", "less" or "greater".

  Returns:
    MannWhitneyResult(statistic=U1, p_value, effect_size, method): Python floats and a str.

  Raises:
    ValueError: a sample has fewer than 2 values, is not 1-D or contains NaN; or an unknown
      alternative.
  """
  check_choice("alternative", alternative, ALTERNATIVES)
  # With one value per side the smallest attainable two-sided p is 1, so a "test" is meaningless.
  x = _as_sample("x", x, min_size=2, allow_inf=True)
  y = _as_sample("y", y, min_size=2, allow_inf=True)
  n1, n2 = x.size, y.size
  if np.all(x == x[0]) and np.all(y == x[0]):
    return MannWhitneyResult(statistic=n1 * n2 / 2, p_value=1.0, effect_size=0.0,
                             method="exact")
  method = p_value_method(x, y)
  if method == "exact":
    scipy_method = "exact"
  elif method == "permutation":
    scipy_method = scipy.stats.PermutationMethod(n_resamples=np.inf)
  elif method == "monte_carlo":
    scipy_method = scipy.stats.PermutationMethod(
        n_resamples=MONTE_CARLO_RESAMPLES, rng=np.random.default_rng(MONTE_CARLO_SEED))
  else:
    scipy_method = "asymptotic"
  res = scipy.stats.mannwhitneyu(x, y, use_continuity=True, alternative=alternative,
                                 method=scipy_method)
  u1 = float(res.statistic)
  return MannWhitneyResult(statistic=u1, p_value=min(1.0, float(res.pvalue)),
                           effect_size=2.0 * u1 / (n1 * n2) - 1.0, method=method)


def p_value_method(x, y) -> str:
  """Which of P_VALUE_METHODS `mann_whitney_u` uses for samples x and y (its docstring)."""
  x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
  pooled = np.concatenate([x, y])
  if np.unique(pooled).size == pooled.size:
    return "exact"
  if math.comb(pooled.size, x.size) <= EXACT_PERMUTATION_LIMIT:
    return "permutation"
  if min(x.size, y.size) <= SMALL_SAMPLE:
    return "monte_carlo"
  return "asymptotic"


def bootstrap_ci(x, *, statistic: Callable[..., np.ndarray] = np.mean, confidence: float = 0.95,
                 num_resamples: int = DEFAULT_NUM_RESAMPLES,
                 seed: int = 0) -> ConfidenceInterval:
  """Percentile bootstrap confidence interval of `statistic(x)` (Efron & Tibshirani 1993, ch. 13).

  Draws B = num_resamples resamples x*_b of size n with replacement and returns the
  (1 - confidence)/2 and (1 + confidence)/2 quantiles of {statistic(x*_b)}_b, via
  `scipy.stats.bootstrap(..., method="percentile", rng=np.random.default_rng(seed))`.

  Why percentile and not scipy's default BCa: arms have few seeds (often 3-10), where BCa's
  jackknife estimate of the acceleration is itself very noisy, and BCa returns NaN with a
  DegenerateDataWarning when the jackknife or bootstrap distribution is degenerate (scipy 1.17:
  a constant sample, or np.min as the statistic). The percentile interval is always defined,
  stays inside the range the statistic takes on resamples of the data (an accuracy CI stays in
  [0, 1]) and is transformation-respecting. Its known cost: at small n it is too narrow (for
  the mean by a factor of about sqrt((n - 1) / n), plus the t-vs-normal gap), so its coverage
  is below nominal there.

  A constant sample returns (statistic(x), statistic(x)) without resampling or warnings.

  Args:
    x: 1-D finite sample, at least 2 values.
    statistic: maps a 1-D array to a scalar; if it accepts an `axis` keyword (np.mean,
      np.median, ...) scipy evaluates all resamples in one vectorized call.
    confidence: confidence level in (0, 1).
    num_resamples: number of bootstrap resamples B >= 1.
    seed: seed of the numpy Generator; the same (x, seed, ...) gives the same interval.

  Returns:
    ConfidenceInterval(low, high) as Python floats.

  Raises:
    ValueError: fewer than 2 values, not 1-D, NaN or +-inf in x, or a hyperparameter out of range.
  """
  check_range("confidence", confidence, low=0.0, high=1.0, low_inclusive=False,
              high_inclusive=False)
  check_int("num_resamples", num_resamples, low=1)
  check_int("seed", seed, low=0)
  # One value has no sampling variability to resample: the interval would be a point.
  x = _as_sample("x", x, min_size=2, allow_inf=False)
  if np.all(x == x[0]):
    c = float(statistic(x))
    return ConfidenceInterval(c, c)
  res = scipy.stats.bootstrap((x,), statistic, n_resamples=num_resamples,
                              confidence_level=confidence, method="percentile",
                              rng=np.random.default_rng(seed))
  ci = res.confidence_interval
  return ConfidenceInterval(float(ci.low), float(ci.high))


def holm(p_values) -> np.ndarray:
  """Holm-Bonferroni step-down adjusted p-values (Holm 1979, Scand. J. Statist. 6:65-70).

  With the m non-NaN p-values sorted ascending, p_(1) <= ... <= p_(m):

    p~_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)),

  returned in the input order (and shape). Rejecting every hypothesis with p~ <= alpha is Holm's
  procedure at family-wise error rate alpha. The running max makes the adjusted values monotone
  in the raw ones, so tied raw p-values get equal adjusted values. NaN entries (a test that
  could not be run) stay NaN and do not count in m: they are not part of the family.

  scipy has no Holm adjustment (`scipy.stats.false_discovery_control` is Benjamini-Hochberg)
  and statsmodels is not a runtime dependency of kdjax (only of its tests, which check this
  function against `statsmodels.stats.multitest.multipletests(method="holm")`), hence this
  short implementation.

  Args:
    p_values: array-like of p-values in [0, 1] or NaN, any shape.

  Returns:
    float64 array of the same shape with the adjusted p-values.

  Raises:
    ValueError: a p-value outside [0, 1] (or +-inf).
  """
  p = np.asarray(p_values, dtype=np.float64)
  valid = ~np.isnan(p)
  bad = valid & ~((p >= 0.0) & (p <= 1.0))
  if bad.any():
    raise ValueError(f"p_values must lie in [0, 1] (or be NaN), got {p[bad].tolist()} at flat "
                     f"index {np.flatnonzero(bad).tolist()}")
  out = np.full(p.shape, np.nan)
  flat_valid = p[valid]
  m = flat_valid.size
  if m == 0:
    return out
  order = np.argsort(flat_valid, kind="stable")
  factors = m - np.arange(m)  # (m - j + 1) for j = 1..m
  adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(factors * flat_valid[order]))
  adjusted = np.empty(m)
  adjusted[order] = adjusted_sorted
  out[valid] = adjusted
  return out


def summarize(x, *, confidence: float = 0.95, num_resamples: int = DEFAULT_NUM_RESAMPLES,
              seed: int = 0) -> dict:
  """The per-arm, per-metric record of `metrics.json`: {"mean", "std", "ci_low", "ci_high", "n"}.

  mean = sum_i x_i / n; std = sqrt(sum_i (x_i - mean)^2 / (n - 1)) (ddof = 1, the sample
  standard deviation across seeds); [ci_low, ci_high] = `bootstrap_ci(x, statistic=np.mean,
  confidence=confidence, num_resamples=num_resamples, seed=seed)`, the percentile bootstrap CI
  of the mean; n = number of values.

  Fewer than 2 values (an arm where all but one seed diverged, or none survived): std, ci_low
  and ci_high are NaN, mean is x_0 for n = 1 and NaN for n = 0; no warning is raised.

  Args:
    x: 1-D finite sample of one metric over an arm's replicas (diverged replicas excluded).
    confidence: confidence level in (0, 1).
    num_resamples: bootstrap resamples B >= 1.
    seed: bootstrap seed.

  Returns:
    dict with Python floats "mean", "std", "ci_low", "ci_high" and Python int "n".

  Raises:
    ValueError: x not 1-D or with NaN/+-inf, or a hyperparameter out of range.
  """
  check_range("confidence", confidence, low=0.0, high=1.0, low_inclusive=False,
              high_inclusive=False)
  check_int("num_resamples", num_resamples, low=1)
  check_int("seed", seed, low=0)
  x = _as_sample("x", x, min_size=0, allow_inf=False)
  n = int(x.size)
  nan = float("nan")
  if n < 2:
    return {"mean": float(x[0]) if n == 1 else nan, "std": nan, "ci_low": nan, "ci_high": nan,
            "n": n}
  low, high = bootstrap_ci(x, statistic=np.mean, confidence=confidence,
                           num_resamples=num_resamples, seed=seed)
  return {"mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)), "ci_low": low,
          "ci_high": high, "n": n}
