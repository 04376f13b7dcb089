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

# The public functions and classes (constants and type aliases stay importable by name).
__all__ = [
    "MannWhitneyResult",
    "ConfidenceInterval",
    "mann_whitney_u",
    "p_value_method",
    "bootstrap_ci",
    "holm",
    "mean_std",
    "summarize",
    "WilcoxonResult",
    "signed_rank_sums",
    "wilcoxon_p_value_method",
    "wilcoxon_signed_rank",
    "TostResult",
    "tost",
    "cluster_bootstrap_ci",
    "min_p_value",
    "seeds_for_verdict",
    "smoothed_resample",
    "signed_rank_null_counts",
    "rank_sum_null_counts",
    "resampled_p_values",
    "seeds_for_power",
    "format_margins",
    "parse_equivalence_margins",
]

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


def mean_std(values) -> tuple[np.ndarray, np.ndarray]:
  """(mean, sample standard deviation, ddof = 1) over the first axis of `values`, float64, as the
  report sections summarise a group's seeds: 0-d arrays for a 1-D sample (`float()` them),
  per-position arrays for [n, ...]. NaN, without a warning, for the std of fewer than two values
  and the mean of none; values are not checked (NaN propagates)."""
  v = np.asarray(values, np.float64)
  mean = v.mean(0) if v.shape[0] else np.full(v.shape[1:], math.nan)
  std = v.std(0, ddof=1) if v.shape[0] > 1 else np.full_like(mean, math.nan)
  return mean, std


def summarize(x, *, confidence: float = 0.95, num_resamples: int = DEFAULT_NUM_RESAMPLES,
              seed: int = 0, clusters=None) -> dict:
  """The per-arm, per-metric record of `metrics.json`: {"mean", "std", "ci_low", "ci_high", "n"}.

  mean = sum_i x_i / n; std = sqrt(sum_i (x_i - mean)^2 / (n - 1)) (ddof = 1, the sample
  standard deviation across seeds); [ci_low, ci_high] = `bootstrap_ci(x, statistic=np.mean,
  confidence=confidence, num_resamples=num_resamples, seed=seed)`, the percentile bootstrap CI
  of the mean; n = number of values. With `clusters` (the teacher of each value) naming more
  than one cluster, the CI is `cluster_bootstrap_ci` instead (students nested in teachers).

  Fewer than 2 values (an arm where all but one seed diverged, or none survived): std, ci_low
  and ci_high are NaN, mean is x_0 for n = 1 and NaN for n = 0; no warning is raised.

  Args:
    x: 1-D finite sample of one metric over an arm's replicas (diverged replicas excluded).
    confidence: confidence level in (0, 1).
    num_resamples: bootstrap resamples B >= 1.
    seed: bootstrap seed.
    clusters: None, or one cluster label per value.

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
  if clusters is not None and len(set(np.asarray(clusters).reshape(-1).tolist())) > 1:
    low, high = cluster_bootstrap_ci(x, clusters, confidence=confidence,
                                     num_resamples=num_resamples, seed=seed)
  else:
    low, high = bootstrap_ci(x, statistic=np.mean, confidence=confidence,
                             num_resamples=num_resamples, seed=seed)
  return {"mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)), "ci_low": low,
          "ci_high": high, "n": n}


# ------------------------------------------------------------------------------------------------
# Paired samples: the Wilcoxon signed-rank test (issue 15).

# How `wilcoxon_signed_rank` computes a p-value (see its docstring).
WILCOXON_P_VALUE_METHODS = ("exact", "permutation", "asymptotic")
# Tied |differences| with at most this many non-zero differences get every one of the 2^n sign
# assignments enumerated (2^16 = 65,536).
WILCOXON_PERMUTATION_LIMIT = 16


class WilcoxonResult(NamedTuple):
  """Result of `wilcoxon_signed_rank`: W+ (sum of the ranks of the positive differences),
  p-value, matched-pairs rank-biserial correlation, which of WILCOXON_P_VALUE_METHODS gave the
  p-value, and the number of non-zero differences the ranks were taken over."""
  statistic: float
  p_value: float
  effect_size: float
  method: str
  num_nonzero: int


def signed_rank_sums(d) -> tuple[float, float, int]:
  """(W+, W-, n'): the sums of the ranks of |d_i| over the positive and the negative differences,
  ranks taken over the n' non-zero differences only (zeros dropped: Wilcoxon 1945's original
  treatment, scipy's zero_method="wilcox"), tied |d| getting their average rank
  (`scipy.stats.rankdata`). W+ + W- = n' (n' + 1) / 2."""
  d = np.asarray(d, np.float64).reshape(-1)
  d = d[d != 0]
  if d.size == 0:
    return 0.0, 0.0, 0
  ranks = scipy.stats.rankdata(np.abs(d))
  return float(ranks[d > 0].sum()), float(ranks[d < 0].sum()), int(d.size)


def wilcoxon_p_value_method(d) -> str:
  """Which of WILCOXON_P_VALUE_METHODS `wilcoxon_signed_rank` uses for differences d."""
  d = np.asarray(d, np.float64).reshape(-1)
  nonzero = np.abs(d[d != 0])
  if np.unique(nonzero).size == nonzero.size:
    return "exact"
  if nonzero.size <= WILCOXON_PERMUTATION_LIMIT:
    return "permutation"
  return "asymptotic"


def wilcoxon_signed_rank(x, y, *, alternative: str = "two-sided") -> WilcoxonResult:
  """Wilcoxon signed-rank test of the paired differences d_i = x_i - y_i (Wilcoxon 1945).

  The test for seed-matched pairs: students of seed s in two arms share their initialisation
  and data order, so d_i carries the comparison. H0: the distribution of d is symmetric about 0,
  i.e. under H0 every one of the 2^n' assignments of signs to the n' non-zero |d_i| is equally
  likely. The statistic is

    W+ = sum_{i: d_i > 0} rank(|d_i|),

  ranks over the non-zero |d_i| (zero differences are dropped, scipy's zero_method="wilcox";
  tied |d_i| get their average rank). p is the fraction of sign assignments whose W+ is at least
  as extreme as the observed one ("greater": W+ >= observed, "less": W+ <= observed,
  "two-sided": min(1, 2 min(p_greater, p_less)), scipy's convention). `method`, chosen by the
  data (all computed by `scipy.stats.wilcoxon`):

    "exact"        the non-zero |d_i| are distinct: the exact null distribution of W+
                   (`wilcoxon(d[d != 0], method="exact")`), any n';
    "permutation"  tied |d_i| and n' <= WILCOXON_PERMUTATION_LIMIT (16): all 2^n' sign
                   assignments enumerated on the mid-ranks
                   (`method=PermutationMethod(n_resamples=inf)`), exact with ties;
    "asymptotic"   tied |d_i| and n' > 16: the normal approximation with the tie-corrected
                   variance n'(n' + 1)(2n' + 1)/24 - sum_k (t_k^3 - t_k)/48 and a 0.5 continuity
                   correction (`method="asymptotic", correction=True`).

  Dropping zeros first and then enumerating signs is exact for the "wilcox" treatment: a zero
  difference has no sign to flip. Like `mann_whitney_u`, scipy's default ("auto") is not used
  because it falls back to the normal approximation whenever a |d| ties or a d is zero,
  however small n' is.

  The smallest two-sided p-value the test can attain is 2 / 2^n' (all differences of one
  sign): 0.0078 at 8 pairs, against 2 / C(16, 8) = 1.6e-4 for Mann-Whitney at 8 vs 8.

  effect_size is the matched-pairs rank-biserial correlation (Kerby 2014, "The simple
  difference formula", Comprehensive Psychology 3:11.IT.3.1):

    r = (W+ - W-) / (W+ + W-),

  r = 1 when every non-zero d is positive (x larger), -1 when every one is negative.

  No non-zero difference (x == y pairwise): W+ = 0, p = 1, r = 0, method "exact".

  Args:
    x: 1-D sample of the first arm, one value per seed, at least 2 values, no NaN.
    y: 1-D sample of the second arm, y[i] the partner of x[i]; same length.
    alternative: "two-sided", "less" (x tends to be smaller) or "greater".

  Returns:
    WilcoxonResult(statistic=W+, p_value, effect_size, method, num_nonzero).

  Raises:
    ValueError: a sample with fewer than 2 values, not 1-D, NaN or +-inf, samples of different
      lengths, or an unknown alternative.
  """
  check_choice("alternative", alternative, ALTERNATIVES)
  x = _as_sample("x", x, min_size=2, allow_inf=False)
  y = _as_sample("y", y, min_size=2, allow_inf=False)
  if x.size != y.size:
    raise ValueError(f"x and y must be paired (the same length), got {x.size} and {y.size}")
  d = x - y
  w_plus, w_minus, n = signed_rank_sums(d)
  if n == 0:
    return WilcoxonResult(statistic=0.0, p_value=1.0, effect_size=0.0, method="exact",
                          num_nonzero=0)
  method = wilcoxon_p_value_method(d)
  nonzero = d[d != 0]
  if method == "exact":
    res = scipy.stats.wilcoxon(nonzero, alternative=alternative, method="exact")
  elif method == "permutation":
    res = scipy.stats.wilcoxon(nonzero, alternative=alternative,
                               method=scipy.stats.PermutationMethod(n_resamples=np.inf))
  else:
    res = scipy.stats.wilcoxon(nonzero, alternative=alternative, method="asymptotic",
                               correction=True)
  return WilcoxonResult(statistic=w_plus, p_value=min(1.0, float(res.pvalue)),
                        effect_size=(w_plus - w_minus) / (w_plus + w_minus), method=method,
                        num_nonzero=n)


# ------------------------------------------------------------------------------------------------
# Equivalence: two one-sided tests (issue 15).


class TostResult(NamedTuple):
  """Result of `tost`: the TOST p-value max(p_lower, p_upper), the two one-sided p-values, the
  mean difference, its (1 - 2 alpha) confidence interval, the degrees of freedom and the form
  ("paired t" or "Welch t")."""
  p_value: float
  p_lower: float
  p_upper: float
  difference: float
  ci_low: float
  ci_high: float
  df: float
  method: str


def tost(x, y, margin: float, *, paired: bool, alpha: float = 0.05) -> TostResult:
  """Two one-sided t-tests of equivalence of x and y within +-margin (Schuirmann 1987, J.
  Pharmacokinet. Biopharm. 15:657; Lakens 2017, Soc. Psychol. Personal. Sci. 8:355).

  With delta = mean(x) - mean(y) (paired: the mean of d_i = x_i - y_i) and margin m > 0, the
  two null hypotheses are H01: delta <= -m and H02: delta >= +m. Each is tested one-sided,

    p_lower = P(T >= (dbar + m) / se),   p_upper = P(T <= (dbar - m) / se),

  and equivalence within +-m is concluded at level alpha when p_TOST = max(p_lower, p_upper) <=
  alpha, which is the same as the (1 - 2 alpha) confidence interval of delta lying inside
  (-m, m). Paired (seed-matched pairs): the one-sample t-test of d, se = sd(d) / sqrt(n), df =
  n - 1 (`scipy.stats.ttest_1samp(d + m, 0, alternative="greater")` and `ttest_1samp(d - m, 0,
  alternative="less")`). Unpaired: Welch's t-test, se = sqrt(s_x^2 / n_x + s_y^2 / n_y) with the
  Welch-Satterthwaite df (`scipy.stats.ttest_ind(x + m, y, equal_var=False,
  alternative="greater")` and the mirror), the form Lakens recommends. The confidence interval
  is scipy's `confidence_interval(1 - 2 alpha)` of the same t-test.

  Why t-tests and not rank tests: TOST on ranks has no agreed textbook form, and at 8 pairs a
  signed-rank TOST could not attain p < 1/256 per side anyway; the t form is the standard one
  (statsmodels' `ttost_paired` / `ttost_ind`, which the tests compare with).

  No variation (se = 0: every difference equal, or both samples constant): the t statistics
  are +-inf and the limit is taken: p_lower = 0 if dbar > -m else 1, p_upper = 0 if dbar < m
  else 1, the interval is the point dbar; df is reported as usual.

  Args:
    x, y: 1-D finite samples (one value per seed), at least 2 values each; paired: the same
      length, y[i] the partner of x[i].
    margin: the equivalence margin m > 0, in the metric's units.
    paired: the paired form (on d = x - y) or Welch's unpaired form.
    alpha: level of each one-sided test; the interval is the (1 - 2 alpha) one.

  Returns:
    TostResult as Python floats and a str.

  Raises:
    ValueError: bad samples (as `wilcoxon_signed_rank`), margin <= 0, alpha outside (0, 0.5).
  """
  check_range("margin", margin, low=0.0, low_inclusive=False)
  check_range("alpha", alpha, low=0.0, high=0.5, low_inclusive=False, high_inclusive=False)
  x = _as_sample("x", x, min_size=2, allow_inf=False)
  y = _as_sample("y", y, min_size=2, allow_inf=False)
  m = float(margin)
  if paired:
    if x.size != y.size:
      raise ValueError(f"paired x and y must have the same length, got {x.size} and {y.size}")
    d = x - y
    diff, se, df, form = float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(d.size)), \
        float(d.size - 1), "paired t"
  else:
    vx, vy = np.var(x, ddof=1) / x.size, np.var(y, ddof=1) / y.size
    diff, se, form = float(np.mean(x) - np.mean(y)), float(math.sqrt(vx + vy)), "Welch t"
    df = float((vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))) \
        if se > 0 else float(x.size + y.size - 2)
  if se == 0.0:
    p_lower, p_upper = float(not diff > -m), float(not diff < m)
    return TostResult(max(p_lower, p_upper), p_lower, p_upper, diff, diff, diff, df, form)
  if paired:
    lower = scipy.stats.ttest_1samp(d + m, 0.0, alternative="greater")
    upper = scipy.stats.ttest_1samp(d - m, 0.0, alternative="less")
    ci = scipy.stats.ttest_1samp(d, 0.0).confidence_interval(1.0 - 2.0 * alpha)
  else:
    lower = scipy.stats.ttest_ind(x + m, y, equal_var=False, alternative="greater")
    upper = scipy.stats.ttest_ind(x - m, y, equal_var=False, alternative="less")
    ci = scipy.stats.ttest_ind(x, y, equal_var=False).confidence_interval(1.0 - 2.0 * alpha)
  p_lower, p_upper = float(lower.pvalue), float(upper.pvalue)
  return TostResult(max(p_lower, p_upper), p_lower, p_upper, diff, float(ci.low),
                    float(ci.high), df, form)


# ------------------------------------------------------------------------------------------------
# Students nested in teachers: the two-stage (cluster) bootstrap (issue 15).


def cluster_bootstrap_ci(x, clusters, *, confidence: float = 0.95,
                         num_resamples: int = DEFAULT_NUM_RESAMPLES,
                         seed: int = 0) -> ConfidenceInterval:
  """Percentile CI of the mean of x by the two-stage bootstrap of nested data (Davison &
  Hinkley 1997, "Bootstrap Methods and their Application", sec. 3.8, strategy "resample at both
  stages"; Field & Welsh 2007, JRSS B 69:369).

  x_ij is student j of teacher (cluster) i, K clusters of sizes n_i. One resample draws K
  clusters i*_1..i*_K with replacement, then, within each drawn cluster, n_i* students with
  replacement from that cluster; the resampled statistic is the mean over all drawn students,
  sum_k sum_j x*_kj / sum_k n_i*_k (the students-weighted mean, which on the data itself is the
  plain mean of x). The interval is the (1 - confidence)/2 and (1 + confidence)/2 quantiles of
  the B resampled means (numpy's default linear interpolation).

  Resampling at both stages carries the within-teacher variance twice into the between-teacher
  part, so the interval is somewhat conservative when K is large (Davison & Hinkley, eq. 3.19);
  with few clusters (K < about 5-10) it is too narrow instead, because it can only recombine K
  teacher means: a bootstrap cannot show the variation of teachers that were never trained.
  scipy has no nested bootstrap, hence this hand-written, vectorised version.

  One cluster: the ordinary bootstrap of the students (use `bootstrap_ci`, which the analysis
  does). A constant sample returns (mean, mean).

  Args:
    x: 1-D finite sample, at least 2 values.
    clusters: 1-D labels of the same length: x[k] belongs to cluster clusters[k] (any hashable
      numbers or strings).
    confidence: level in (0, 1).
    num_resamples: B >= 1.
    seed: seed of the numpy Generator.

  Returns:
    ConfidenceInterval(low, high) as Python floats.

  Raises:
    ValueError: bad x (as `bootstrap_ci`), clusters of another length, or a hyperparameter out of
      range.
  """
  check_range("confidence", confidence, low=0.0, high=1.0, low_inclusive=False,
              high_inclusive=False)
  check_int("num_resamples", num_resamples, low=1)
  check_int("seed", seed, low=0)
  x = _as_sample("x", x, min_size=2, allow_inf=False)
  labels = np.asarray(clusters).reshape(-1)
  if labels.size != x.size:
    raise ValueError(f"clusters must give one label per value: {labels.size} labels for "
                     f"{x.size} values")
  if np.all(x == x[0]):
    return ConfidenceInterval(float(x[0]), float(x[0]))
  _, inverse = np.unique(labels, return_inverse=True)
  members = [x[inverse == k] for k in range(inverse.max() + 1)]
  num_clusters = len(members)
  sizes = np.array([m.size for m in members])
  padded = np.zeros((num_clusters, sizes.max()))
  for k, m in enumerate(members):
    padded[k, :m.size] = m
  rng = np.random.default_rng(seed)
  drawn = rng.integers(0, num_clusters, size=(num_resamples, num_clusters))  # [B, K]
  drawn_sizes = sizes[drawn]                                                 # [B, K]
  # Student j* ~ U{0..n_i - 1} within each drawn cluster i; slots beyond n_i are masked out.
  slots = np.arange(sizes.max())
  picks = np.floor(rng.random((num_resamples, num_clusters, sizes.max()))
                   * drawn_sizes[..., None]).astype(np.int64)
  values = padded[drawn[..., None], picks]                                   # [B, K, max n]
  mask = slots[None, None, :] < drawn_sizes[..., None]
  means = (values * mask).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
  tail = (1.0 - confidence) / 2.0
  low, high = np.quantile(means, [tail, 1.0 - tail])
  return ConfidenceInterval(float(low), float(high))


# ------------------------------------------------------------------------------------------------
# Power in plain words (issue 15).

TESTS = ("mann_whitney", "wilcoxon")


def min_p_value(test: str, n_a: int, n_b: int | None = None, *,
                method: str = "exact") -> float:
  """The smallest two-sided p-value `test` can attain with these sample sizes.

  Mann-Whitney, n_a vs n_b values: the exact and permutation tests reach it at the most extreme
  split, p_min = 2 / C(n_a + n_b, n_a) (one split in each tail); Monte Carlo counts the observed
  split among its R + 1 = 10,000, so p_min = max(2 / C, 2 / 10,000); the normal approximation
  at U = 0 without ties, z = (n_a n_b / 2 - 1/2) / sqrt(n_a n_b (n_a + n_b + 1) / 12),
  p_min = 2 Phi(-z). Wilcoxon, n_a pairs (n_b unused): p_min = 2 / 2^n_a exact and by
  permutation; the normal approximation at W+ = n(n + 1)/2, z = (n(n + 1)/4 - 1/2) /
  sqrt(n(n + 1)(2n + 1)/24). All capped at 1. Ties can only raise the attainable minimum.

  Args:
    test: "mann_whitney" or "wilcoxon".
    n_a, n_b: sample sizes (Mann-Whitney); n_a is the number of pairs for Wilcoxon.
    method: the p_method (P_VALUE_METHODS or WILCOXON_P_VALUE_METHODS).

  Returns:
    p_min as a Python float.
  """
  check_choice("test", test, TESTS)
  if test == "wilcoxon":
    n = int(n_a)
    if method == "asymptotic":
      z = (n * (n + 1) / 4 - 0.5) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
      return min(1.0, 2.0 * float(scipy.stats.norm.sf(z)))
    return min(1.0, 2.0 / 2.0 ** n)
  n_a, n_b = int(n_a), int(n_b)
  if method == "asymptotic":
    z = (n_a * n_b / 2 - 0.5) / math.sqrt(n_a * n_b * (n_a + n_b + 1) / 12)
    return min(1.0, 2.0 * float(scipy.stats.norm.sf(z)))
  p = 2.0 / math.comb(n_a + n_b, n_a)
  if method == "monte_carlo":
    p = max(p, 2.0 / (MONTE_CARLO_RESAMPLES + 1))
  return min(1.0, p)


def seeds_for_verdict(test: str, num_tests: int, *, alpha: float = 0.05,
                      max_seeds: int = 1000) -> int | None:
  """The smallest number of seeds per arm n at which `test` can reach a Holm-adjusted p-value
  <= alpha in a family of `num_tests` tests: the smallest n with num_tests * p_min(n) <= alpha
  (Holm's smallest adjusted p-value is m p_(1)), p_min from `min_p_value` for n pairs
  (Wilcoxon: 2^n >= 2 m / alpha) or n vs n seeds (Mann-Whitney: C(2n, n) >= 2 m / alpha),
  without ties. None if no n <= max_seeds does."""
  check_choice("test", test, TESTS)
  for n in range(2, max_seeds + 1):
    if num_tests * min_p_value(test, n, n) <= alpha:
      return n
  return None


def smoothed_resample(x, size: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  """Draws from the shrunk smoothed bootstrap of x (Silverman 1986, "Density Estimation", sec.
  6.4.1): x*_k = xbar + (x_J - xbar + h eps) / sqrt(1 + h^2 / s^2), J uniform over the values,
  eps ~ N(0, 1), s the standard deviation of x (ddof = 0), h = 0.9 min(s, IQR / 1.34) n^(-1/5)
  (Silverman's rule of thumb; h = 0.9 s n^(-1/5) when the IQR is 0). The draws keep the mean
  and variance of the empirical distribution of x (that of plain resampling) but have no ties, so
  rank tests on them have their no-ties null distributions. A constant x is returned as is
  (h = 0)."""
  x = np.asarray(x, np.float64).reshape(-1)
  s = float(np.std(x))  # the spread of the empirical distribution (ddof = 0)
  picks = x[rng.integers(0, x.size, size=size)]
  if s == 0.0:
    return picks
  q75, q25 = np.percentile(x, [75, 25])
  spread = min(s, (q75 - q25) / 1.34) or s
  h = 0.9 * spread * x.size ** -0.2
  mean = float(np.mean(x))
  return mean + (picks - mean + h * rng.standard_normal(size)) / math.sqrt(1.0 + h * h / (s * s))


def _two_sided_p_from_counts(counts: np.ndarray, statistic: np.ndarray) -> np.ndarray:
  """Two-sided p = min(1, 2 min(P(T >= t), P(T <= t))) of statistics t (integers or
  half-integers) under the null distribution counts[k] = #{T = k}, k = 0..K."""
  total = counts.sum()
  cdf = np.cumsum(counts) / total
  sf = np.cumsum(counts[::-1])[::-1] / total  # sf[k] = P(T >= k)
  hi = np.clip(np.ceil(statistic - 1e-9).astype(np.int64), 0, counts.size - 1)
  lo = np.clip(np.floor(statistic + 1e-9).astype(np.int64), 0, counts.size - 1)
  return np.minimum(1.0, 2.0 * np.minimum(sf[hi], cdf[lo]))


def signed_rank_null_counts(n: int) -> np.ndarray:
  """counts[t] = #{subsets of {1..n} with sum t}, t = 0..n(n+1)/2: the exact null distribution
  of W+ without ties (each subset = the ranks given a + sign), by the recursion
  c_n(t) = c_{n-1}(t) + c_{n-1}(t - n)."""
  counts = np.ones(1)
  for k in range(1, n + 1):
    nxt = np.zeros(counts.size + k)
    nxt[:counts.size] += counts
    nxt[k:] += counts
    counts = nxt
  return counts


def rank_sum_null_counts(n_a: int, n_b: int) -> np.ndarray:
  """counts[u] = #{splits with U = u}, u = 0..n_a n_b: the exact null distribution of the
  Mann-Whitney U without ties, by the recursion c(u; i, j) = c(u - j; i - 1, j) + c(u; i, j - 1)
  (Mann & Whitney 1947)."""
  size = n_a * n_b + 1
  prev = [np.eye(1, size).ravel() for _ in range(n_b + 1)]  # i = 0: U = 0 for every j
  for i in range(1, n_a + 1):
    row = [np.eye(1, size).ravel()]  # j = 0: U = 0
    for j in range(1, n_b + 1):
      c = row[j - 1].copy()
      c[j:] += prev[j][:size - j]
      row.append(c)
    prev = row
  return prev[n_b]


def resampled_p_values(x, y, n: int, *, paired: bool, num_simulations: int,
                       rng: np.random.Generator) -> np.ndarray:
  """Two-sided p-values of `num_simulations` simulated studies with n seeds per arm, drawn by
  `smoothed_resample` from the observed values: paired, n differences from d = x - y, tested
  by the signed-rank test; unpaired, n values from x and n from y, tested by Mann-Whitney.
  p-values from the exact no-ties null distributions (`signed_rank_null_counts`,
  `rank_sum_null_counts`; the draws have no ties), vectorised over the simulations."""
  if paired:
    d = smoothed_resample(np.asarray(x) - np.asarray(y), (num_simulations, n), rng)
    ranks = scipy.stats.rankdata(np.abs(d), axis=1)
    w_plus = np.where(d > 0, ranks, 0.0).sum(axis=1)
    p = _two_sided_p_from_counts(signed_rank_null_counts(n), w_plus)
    return np.where(np.all(d == 0, axis=1), 1.0, p)
  xs = smoothed_resample(x, (num_simulations, n), rng)
  ys = smoothed_resample(y, (num_simulations, n), rng)
  u = ((xs[:, :, None] > ys[:, None, :]).sum(axis=(1, 2))
       + 0.5 * (xs[:, :, None] == ys[:, None, :]).sum(axis=(1, 2)))
  constant = np.all(xs == xs[:, :1], axis=1) & np.all(ys == xs[:, :1], axis=1)
  return np.where(constant, 1.0, _two_sided_p_from_counts(rank_sum_null_counts(n, n), u))


def seeds_for_power(x, y, *, paired: bool, alpha: float = 0.05, power: float = 0.8,
                    num_simulations: int = 2000, max_seeds: int = 100,
                    seed: int = 0) -> int | None:
  """The smallest number of seeds per arm with which the two-sided test (Wilcoxon signed-rank
  when `paired`, else Mann-Whitney) rejects at `alpha` with probability >= `power`, when future
  seeds behave like the observed ones.

  Power at n is estimated by simulation from the observed values (`resampled_p_values`: the
  shrunk smoothed bootstrap of the observed differences, or of each arm, num_simulations
  simulated studies; the same random numbers for every n). The n is found by doubling from 2
  until the power is reached and then bisecting, so for the noisy, slightly non-monotone power
  curve of a discrete test it is a crossing point, accurate to the Monte Carlo error (about
  +-0.01 in power at 2,000 simulations). Written here because scipy has no power function for
  rank tests.

  Args:
    x, y: the observed values (paired: the same length, y[i] the partner of x[i]).
    paired: test and resampling form.
    alpha: two-sided level the test is run at.
    power: the target probability of rejecting, in (0, 1).
    num_simulations: simulated studies per n.
    max_seeds: the largest n tried.
    seed: seed of the simulations.

  Returns:
    n, or None when even max_seeds seeds do not reach the power (no or a tiny observed effect).
  """
  check_range("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
  check_range("power", power, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
  check_int("num_simulations", num_simulations, low=1)
  check_int("max_seeds", max_seeds, low=2)
  x = _as_sample("x", x, min_size=2, allow_inf=False)
  y = _as_sample("y", y, min_size=2, allow_inf=False)

  def reaches(n):
    p = resampled_p_values(x, y, n, paired=paired, num_simulations=num_simulations,
                           rng=np.random.default_rng(seed))
    return float(np.mean(p <= alpha)) >= power

  low, high = 1, 2  # invariant once found: not reaches(low) (or low = 1), reaches(high)
  while not reaches(high):
    if high >= max_seeds:
      return None
    low, high = high, min(2 * high, max_seeds)
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (low, mid) if reaches(mid) else (mid, high)
  return high


# ------------------------------------------------------------------------------------------------
# Equivalence margins of kdjax's metrics (the analysis's TOST; issue 15).

# Default TOST margins, in each metric's units: 1 point (0.01) of accuracy, agreement and ECE;
# 5 points of agreement on teacher-incorrect points, which is measured on the teacher's errors
# only (32 points in the default study, where one example is 3 points); for the divergences
# about a quarter of the KD-vs-SIDDO spread of the default study: JS 0.005 nats (of at most
# ln 2), KL 0.02 nats, activation distance 0.02 (of at most sqrt 2), rank disagreement 0.02 (2
# of every 100 rank positions), mutual information 0.05 nats.
DEFAULT_EQUIVALENCE_MARGINS = {
    "accuracy": 0.01, "agreement": 0.01, "agree_when_teacher_correct": 0.01,
    "agree_when_teacher_incorrect": 0.05, "js_divergence": 0.005, "activation_distance": 0.02,
    "kl_divergence": 0.02, "rank_disagreement": 0.02, "mutual_information": 0.05, "ece": 0.01,
}


def format_margins(margins: dict[str, float]) -> str:
  """"METRIC=M,..." (the config key's syntax)."""
  return ",".join(f"{k}={v:g}" for k, v in margins.items())


def parse_equivalence_margins(value) -> dict[str, float]:
  """The TOST margin of every metric: DEFAULT_EQUIVALENCE_MARGINS overridden by `value`, a
  "METRIC=MARGIN,..." string (or a dict); "" or None: the defaults. Raises ValueError (the
  message completes "--config.analysis_options.equivalence_margins: ...", the analysis's
  config key)."""
  margins = dict(DEFAULT_EQUIVALENCE_MARGINS)
  if value is None or value == "":
    return margins
  if isinstance(value, str):
    items = []
    for part in (p.strip() for p in value.split(",")):
      if not part:  # "accuracy=0.01,,js_divergence=0.01", a trailing comma: a typo
        raise ValueError(f"has an empty entry in {value!r}; write METRIC=MARGIN entries "
                         "separated by single commas")
      if part.count("=") != 1:
        raise ValueError(f"must be METRIC=MARGIN,... (e.g. accuracy=0.01,agreement=0.02); got "
                         f"{part!r}")
      items.append(tuple(t.strip() for t in part.split("=")))
  elif isinstance(value, dict) or hasattr(value, "items"):
    items = list(dict(value).items())
  else:
    raise ValueError(f"must be METRIC=MARGIN,... (e.g. accuracy=0.01); got {value!r}")
  seen = set()
  for metric, margin in items:
    if metric in seen:
      raise ValueError(f"names {metric} twice; give each metric one margin")
    seen.add(metric)
    if metric not in margins:
      raise ValueError(f"{metric!r} is not a metric; the metrics are {', '.join(margins)}")
    try:
      number = float(margin)
    except (TypeError, ValueError):
      number = math.nan
    if isinstance(margin, bool) or not (math.isfinite(number) and number > 0):
      raise ValueError(f"the margin of {metric} must be a number > 0 (in the metric's units); "
                       f"got {margin!r}")
    margins[metric] = number
  return margins
