"""From per-replica metrics to per-arm summaries, arm-vs-control tests and plain-language verdicts.

The protocol is the one of Mason-Williams et al. (arXiv 2510.12615): every metric gives one
number per student replica; the replicas of an arm are summarised (mean, sample std, 95%
percentile-bootstrap CI of the mean, n; `kdjax.stats.summarize`) and the reference arm (kd) is
compared with every control arm by a two-sided Mann-Whitney U test per metric
(`kdjax.stats.mann_whitney_u`, rank-biserial effect size; exact or permutation p-values at small
or tied samples, the method recorded per test). kdjax adds a Holm correction across
the metrics of each comparison (`kdjax.stats.holm`), since one comparison tests ten metrics.

Groups. An arm with one grid point is one group named by the arm ("kd"). An arm whose replicas
span several grid points (alpha, temperature, learning rate, KD window) has one group per
point, named by the hyperparameters that vary within the arm: "kd[alpha=0.1,T=4]",
"kd[window=0.5-1]"; a study with
several student or teacher models splits by those too: "kd[model=cnn(width=0.5),alpha=0.1]". Each group of
the reference arm is compared with the group of every other arm at the same values of the
hyperparameters that arm varies over (rcd spans the alpha grid, so kd[alpha=0.1] meets
rcd[alpha=0.1]; siddo has no alpha, so every kd group meets the one siddo group).

Exclusion. A replica whose logits hold NaN/inf on the eval split, or that its checkpoint
metadata marks `diverged`, is diverged; it and every student of a diverged teacher are left out
of the summaries and tests (listed, and counted, in the report). A metric that is undefined for
a replica (agree_when_teacher_incorrect when its teacher makes no error) is left out of that
metric's n only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from kdjax import stats

SIGNIFICANCE = 0.05
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95

# Grid hyperparameters that can split an arm into groups: (Replica field, label in a group name).
GRID_FIELDS = (("model", "model"), ("teacher_model", "teacher"),
               ("teacher_augment", "teacher_augment"), ("alpha", "alpha"),
               ("temperature", "T"), ("learning_rate", "lr"), ("kd_window", "window"))

# +1: larger means more similar to the teacher (or better); -1: smaller does.
HIGHER_IS_MORE_SIMILAR = {
    "accuracy": +1, "agreement": +1, "agree_when_teacher_correct": +1,
    "agree_when_teacher_incorrect": +1, "js_divergence": -1, "activation_distance": -1,
    "kl_divergence": -1, "rank_disagreement": -1, "mutual_information": +1, "ece": -1,
}

_ARM_DISPLAY = {"kd": "KD", "rcd": "RCD", "siddo": "SIDDO", "onehot": "one-hot",
                "label_smoothing": "label-smoothing", "ensemble_kd": "ensemble-KD",
                "ensemble_standardized_kd": "ensemble-standardized-KD",
                "standardized_kd": "standardized-KD", "ats": "ATS", "isats": "ISATS",
                "dkd": "DKD", "feature_hint": "feature-hint", "nkd": "NKD", "dist": "DIST",
                "ttm": "TTM", "wttm": "WTTM", "attention_transfer": "AT",
                "kd_correct_only": "KD-correct-only", "kd_corrected": "KD-corrected-teacher",
                "kd_calibrated": "KD-calibrated-teacher", "mutual": "DML",
                "kd_known": "KD-known-classes"}


@dataclasses.dataclass(frozen=True)
class ArmGroup:
  """The student replicas of one arm at one grid point."""
  name: str
  arm: str
  hparams: tuple[tuple[str, float], ...]  # the varying (label, value) pairs in the name
  replicas: tuple[int, ...]               # every replica index of the group
  included: tuple[int, ...]               # those not excluded

  @property
  def display(self) -> str:
    """The name for prose: the arm's usual spelling plus the grid label, e.g. KD[alpha=0.1]."""
    return _ARM_DISPLAY.get(self.arm, self.arm) + self.name[len(self.arm):]


def _fmt(value) -> str:
  return value if isinstance(value, str) else f"{value:g}"


def make_groups(replicas: Sequence, excluded: set[int]) -> list[ArmGroup]:
  """Groups of student replicas (see the module docstring), in the order of first appearance."""
  by_arm: dict[str, list] = {}
  for r in replicas:
    by_arm.setdefault(r.arm, []).append(r)
  groups = []
  for arm, rows in by_arm.items():
    varying = [(field, label) for field, label in GRID_FIELDS
               if len({getattr(r, field) for r in rows}) > 1]
    points: dict[tuple, list[int]] = {}
    for r in rows:
      key = tuple((label, getattr(r, field)) for field, label in varying)
      points.setdefault(key, []).append(r.index)
    for key, indices in points.items():
      name = arm + ("[" + ",".join(f"{label}={_fmt(v)}" for label, v in key) + "]" if key else "")
      groups.append(ArmGroup(name=name, arm=arm, hparams=key, replicas=tuple(indices),
                          included=tuple(i for i in indices if i not in excluded)))
  return groups


def reference_arm(arm_names: Sequence[str]) -> str:
  """The arm tested against all others: kd when present, else the first arm of the study."""
  return "kd" if "kd" in arm_names else arm_names[0]


def comparisons(groups: Sequence[ArmGroup]) -> list[tuple[ArmGroup, ArmGroup]]:
  """(reference group, control group) pairs: every reference-arm group against the matching
  group of every other arm (same values of the hyperparameters the control arm varies over;
  every group of that arm when none matches)."""
  arms = list(dict.fromkeys(g.arm for g in groups))
  ref = reference_arm(arms)
  pairs = []
  for g in (g for g in groups if g.arm == ref):
    values = dict(g.hparams)
    for arm in arms:
      if arm == ref:
        continue
      candidates = [c for c in groups if c.arm == arm]
      matched = [c for c in candidates
                 if all(values.get(label) == v for label, v in c.hparams)]
      pairs.extend((g, c) for c in (matched or candidates))
  return pairs


def metric_values(replica_metrics: Sequence[dict], indices: Sequence[int],
                  metric: str) -> np.ndarray:
  """The metric's finite values over `indices` (undefined / NaN values dropped)."""
  values = np.array([replica_metrics[i][metric] for i in indices], np.float64)
  return values[np.isfinite(values)]


def summarize_groups(groups: Sequence[ArmGroup], replica_metrics: Sequence[dict],
                     metric_names: Sequence[str],
                     clusters: Sequence[int] | None = None) -> dict[str, dict[str, dict]]:
  """{group: {metric: {"mean", "std", "ci_low", "ci_high", "n", "n_teachers", "ci_method"}}}
  via kdjax.stats.summarize. `clusters[i]`: the teacher replica i is compared with. Where a
  group's values come from students of several teachers the CI is the two-stage cluster
  bootstrap (teachers, then students within them; `kdjax.stats.cluster_bootstrap_ci`,
  ci_method "cluster"), else the percentile bootstrap of the students (ci_method
  "percentile"). n_teachers counts the distinct teachers behind the values."""
  out = {}
  for g in groups:
    out[g.name] = {}
    for m in metric_names:
      indices = finite_indices(replica_metrics, g.included, m)
      values = metric_values(replica_metrics, g.included, m)
      labels = None if clusters is None else [int(clusters[i]) for i in indices]
      summary = stats.summarize(values, confidence=CONFIDENCE, seed=BOOTSTRAP_SEED,
                                clusters=labels)
      num_teachers = len(set(labels)) if labels is not None else (1 if values.size else 0)
      summary["n_teachers"] = num_teachers
      summary["ci_method"] = "cluster" if num_teachers > 1 and values.size >= 2 else \
          ("percentile" if values.size >= 2 else None)
      out[g.name][m] = summary
  return out


def finite_indices(replica_metrics: Sequence[dict], indices: Sequence[int],
                   metric: str) -> list[int]:
  """The replicas of `indices` whose value of `metric` is finite (`metric_values`' order)."""
  return [i for i in indices if np.isfinite(np.float64(replica_metrics[i][metric]))]


# ------------------------------------------------------------------------------------------------
# Equivalence margins (config key analysis_options.equivalence_margins; the defaults and the
# parser are kdjax.stats', so that config validation does not import the analysis).

MARGINS_KEY = "analysis_options.equivalence_margins"
DEFAULT_EQUIVALENCE_MARGINS = stats.DEFAULT_EQUIVALENCE_MARGINS
parse_equivalence_margins = stats.parse_equivalence_margins


def equivalence_margins(config) -> dict[str, float]:
  """The margins of a study's config (`parse_equivalence_margins` of
  analysis_options.equivalence_margins; the defaults when a config.json predates the key)."""
  options = config.get("analysis_options") if hasattr(config, "get") else None
  value = options.get("equivalence_margins", "") if options is not None else ""
  return parse_equivalence_margins(value)


# ------------------------------------------------------------------------------------------------
# Tests: paired where seeds match, Mann-Whitney otherwise; TOST; power.

NUM_POWER_SIMULATIONS = 2000
MAX_POWER_SEEDS = 100
POWER = 0.8
POWER_METHOD = (f"simulation: {NUM_POWER_SIMULATIONS} studies per seed count drawn from the "
                "observed values by the shrunk smoothed bootstrap (kdjax.stats.seeds_for_power), "
                "tested with the comparison's test (exact no-ties null distribution)")


def pairing(a_indices: Sequence[int], b_indices: Sequence[int],
            pair_keys: Sequence | None) -> tuple[list[tuple[int, int]] | None, str]:
  """(pairs, reason): the seed-matched pairs (i in a, j in b with pair_keys[i] == pair_keys[j],
  ordered by key) when every replica of one side has a partner in the other and there are at
  least 2 pairs, else (None, why not). pair_keys[i] is (seed, teacher): students of one seed
  share their initialisation and data order across arms (kdjax.replicas)."""
  if pair_keys is None:
    return None, "the replicas' seeds are not known"
  keys_a = [tuple(pair_keys[i]) for i in a_indices]
  keys_b = [tuple(pair_keys[j]) for j in b_indices]
  for keys, side in ((keys_a, "first"), (keys_b, "second")):
    if len(set(keys)) < len(keys):
      return None, f"seeds repeat within the {side} arm, so a seed does not name one partner"
  common = sorted(set(keys_a) & set(keys_b))
  if len(common) < 2:
    return None, "fewer than 2 seeds appear in both arms"
  if len(common) < len(keys_a) and len(common) < len(keys_b):
    return None, (f"only {len(common)} seeds appear in both arms ({len(keys_a)} and "
                  f"{len(keys_b)} students), so neither arm's students all have a partner")
  where_a = {k: i for k, i in zip(keys_a, a_indices)}
  where_b = {k: j for k, j in zip(keys_b, b_indices)}
  unmatched = len(keys_a) + len(keys_b) - 2 * len(common)
  reason = ("seed-matched pairs: the students of one seed share their initialisation and data "
            "order across arms")
  if unmatched:
    reason += f" ({unmatched} student(s) without a partner left out)"
  return [(where_a[k], where_b[k]) for k in common], reason


def _power(test: str, x, y, num_tests: int, paired: bool, p_method: str | None) -> dict:
  """The power record of one test: the smallest p and p_holm the test can reach with these n,
  the seeds that would make a verdict possible, the seeds for 80% power at 0.05 and at 0.05/m."""
  n_a, n_b = (len(x), len(x)) if paired else (len(x), len(y))
  min_p = stats.min_p_value(test, n_a, n_b, method=p_method or "exact")
  min_p_holm = min(1.0, num_tests * min_p)
  record = {"min_p": min_p, "min_p_holm": min_p_holm,
            "verdict_possible": bool(min_p_holm <= SIGNIFICANCE),
            "seeds_for_verdict": stats.seeds_for_verdict(test, num_tests, alpha=SIGNIFICANCE),
            "power": POWER, "seeds_for_power": None, "seeds_for_power_holm": None,
            "num_tests": num_tests}
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if (np.all(x == y) if paired else np.ptp(np.concatenate([x, y])) == 0):
    return record  # no observed difference: no seed count detects it
  for key, level in (("seeds_for_power", SIGNIFICANCE),
                     ("seeds_for_power_holm", SIGNIFICANCE / num_tests)):
    record[key] = stats.seeds_for_power(
        x, y, paired=paired, alpha=level, power=POWER, num_simulations=NUM_POWER_SIMULATIONS,
        max_seeds=MAX_POWER_SEEDS, seed=BOOTSTRAP_SEED)
  return record


def run_tests(groups: Sequence[ArmGroup], replica_metrics: Sequence[dict],
              metric_names: Sequence[str], *, pair_keys: Sequence | None = None,
              margins: dict[str, float] | None = None, power: bool = False) -> list[dict]:
  """Reference vs control for every metric, Holm-corrected across the metrics of each
  comparison.

  The test (`test`, with `test_reason`): the two-sided Wilcoxon signed-rank test on the
  seed-matched differences (`kdjax.stats.wilcoxon_signed_rank`, "wilcoxon") where `pairing`
  finds pairs (`pair_keys[i]`: replica i's (seed, teacher)), else the two-sided Mann-Whitney U
  (`kdjax.stats.mann_whitney_u`, "mann_whitney"). statistic is W+ or U, effect_size the
  matched-pairs or the two-sample rank-biserial correlation, `p_method` how the p-value was
  computed (kdjax.stats.WILCOXON_P_VALUE_METHODS / P_VALUE_METHODS); a paired record also holds
  the Mann-Whitney result of the same values under "unpaired", and n_pairs. With `margins`
  ({metric: margin}), "equivalence" holds the TOST (`kdjax.stats.tost`, paired form when
  paired) with its own Holm correction across the metrics; with `power`, "power" holds
  `_power`. A metric with fewer than 2 values on a side gets null statistic / p-values /
  p_method / equivalence / power (not part of the Holm family)."""
  records = []
  for a, b in comparisons(groups):
    block = []
    for m in metric_names:
      ia = finite_indices(replica_metrics, a.included, m)
      ib = finite_indices(replica_metrics, b.included, m)
      x = metric_values(replica_metrics, a.included, m)
      y = metric_values(replica_metrics, b.included, m)
      record = {"metric": m, "a": a.name, "b": b.name, "statistic": math.nan,
                "p_value": math.nan, "p_holm": math.nan, "effect_size": math.nan,
                "n_a": int(x.size), "n_b": int(y.size), "p_method": None,
                "test": None, "test_reason": None, "n_pairs": None}
      if margins is not None:
        record["equivalence"] = None
      if power:
        record["power"] = None
      if x.size >= 2 and y.size >= 2:
        pairs, reason = pairing(ia, ib, pair_keys)
        unpaired = stats.mann_whitney_u(x, y, alternative="two-sided")
        if pairs is not None:
          xp = np.array([replica_metrics[i][m] for i, _ in pairs], np.float64)
          yp = np.array([replica_metrics[j][m] for _, j in pairs], np.float64)
          result = stats.wilcoxon_signed_rank(xp, yp, alternative="two-sided")
          record.update(statistic=result.statistic, p_value=result.p_value,
                        effect_size=result.effect_size, p_method=result.method,
                        test="wilcoxon", test_reason=reason, n_pairs=len(pairs),
                        unpaired={"test": "mann_whitney", "statistic": unpaired.statistic,
                                  "p_value": unpaired.p_value,
                                  "effect_size": unpaired.effect_size,
                                  "p_method": unpaired.method})
          tx, ty = xp, yp
        else:
          record.update(statistic=unpaired.statistic, p_value=unpaired.p_value,
                        effect_size=unpaired.effect_size, p_method=unpaired.method,
                        test="mann_whitney", test_reason=f"not paired: {reason}")
          tx, ty = x, y
        if margins is not None and m in margins:
          t = stats.tost(tx, ty, margins[m], paired=pairs is not None, alpha=SIGNIFICANCE)
          record["equivalence"] = {
              "margin": margins[m], "test": "TOST " + t.method, "p_value": t.p_value,
              "p_holm": math.nan, "p_lower": t.p_lower, "p_upper": t.p_upper,
              "difference": t.difference, "ci_low": t.ci_low, "ci_high": t.ci_high,
              "confidence": 1.0 - 2.0 * SIGNIFICANCE, "df": t.df, "equivalent": False}
        record["_samples"] = (tx, ty, pairs is not None)
      block.append(record)
    adjusted = stats.holm([r["p_value"] for r in block])
    for record, p in zip(block, adjusted):
      record["p_holm"] = float(p)
    if margins is not None:
      tested = [r for r in block if r.get("equivalence")]
      for record, p in zip(tested, stats.holm([r["equivalence"]["p_value"] for r in tested])):
        record["equivalence"]["p_holm"] = float(p)
        record["equivalence"]["equivalent"] = bool(p <= SIGNIFICANCE)
    num_tests = int(np.sum(np.isfinite([r["p_value"] for r in block])))
    for record in block:
      samples = record.pop("_samples", None)
      if power and samples is not None:
        tx, ty, paired = samples
        record["power"] = _power(record["test"], tx, ty, num_tests, paired, record["p_method"])
    records.extend(block)
  return records


def protocol(margins: dict[str, float]) -> dict:
  """metrics.json "protocol" entries of the tests, equivalence, power and intervals."""
  return {
      "test": "two-sided Wilcoxon signed-rank test on seed-matched pairs where every student of "
              "one arm has a partner of the same seed (and teacher) in the other "
              "(kdjax.stats.wilcoxon_signed_rank: exact, or every sign assignment enumerated "
              "when |differences| tie; zero differences dropped), else two-sided Mann-Whitney U "
              "(kdjax.stats.mann_whitney_u: exact, permutation, monte_carlo or asymptotic); "
              "each test record names its test, why, and its p_method",
      "effect_size": "rank-biserial correlation: r = 2 U / (n_a n_b) - 1 (Mann-Whitney), "
                     "r = (W+ - W-) / (W+ + W-) (Wilcoxon, matched pairs)",
      "equivalence": "two one-sided t-tests (TOST; paired t on seed-matched pairs, else Welch) "
                     f"at {SIGNIFICANCE} against +-margin, Holm across the metrics of each "
                     "comparison; equivalent when its p_holm <= "
                     f"{SIGNIFICANCE} (the {1 - 2 * SIGNIFICANCE:.0%} CI of the difference lies "
                     "inside +-margin)",
      "equivalence_margins": dict(margins),
      "power": f"min_p: the smallest two-sided p the test can reach with the n at hand; "
               f"min_p_holm = min(1, m min_p) over the m tests of the comparison; "
               f"seeds_for_verdict: the seeds per arm with m p_min <= {SIGNIFICANCE}; "
               f"seeds_for_power(_holm): the seeds per arm for {POWER:.0%} power at "
               f"{SIGNIFICANCE} (at {SIGNIFICANCE}/m), by {POWER_METHOD}; at most "
               f"{MAX_POWER_SEEDS}, null beyond",
      "interval": f"{CONFIDENCE:.0%} percentile bootstrap of the mean, "
                  f"{stats.DEFAULT_NUM_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}; where an "
                  "entry's students learn from several teachers, the two-stage cluster "
                  "bootstrap (teachers, then students within them; ci_method 'cluster')",
  }


# ------------------------------------------------------------------------------------------------
# Plain-language verdicts.

# metric -> (phrase when the reference value is larger, phrase when smaller, metric in words).
# The phrases complete "<A> students ... than <B> controls".
_PHRASES = {
    "accuracy": ("are more accurate", "are less accurate", "accuracy"),
    "agreement": ("agree with their teacher more", "agree with their teacher less",
                  "agreement with the teacher"),
    "agree_when_teacher_correct": (
        "agree with their teacher more {} on teacher-correct points",
        "agree with their teacher less {} on teacher-correct points",
        "agreement on teacher-correct points"),
    "agree_when_teacher_incorrect": (
        "agree with their teacher more {} on teacher-incorrect points",
        "agree with their teacher less {} on teacher-incorrect points",
        "agreement on teacher-incorrect points"),
    "js_divergence": ("are further from their teacher in JS divergence",
                      "are closer to their teacher in JS divergence", "JS divergence"),
    "activation_distance": ("are further from their teacher in activation distance",
                            "are closer to their teacher in activation distance",
                            "activation distance"),
    "kl_divergence": ("are further from their teacher in KL(teacher || student)",
                      "are closer to their teacher in KL(teacher || student)",
                      "KL(teacher || student)"),
    "rank_disagreement": ("rank the classes less like their teacher",
                          "rank the classes more like their teacher", "rank disagreement"),
    "mutual_information": ("share more information with their teacher's predictions",
                           "share less information with their teacher's predictions",
                           "mutual information with the teacher"),
    "ece": ("are less well calibrated (higher ECE)", "are better calibrated (lower ECE)", "ECE"),
}


def format_p(p: float) -> str:
  """3 significant digits; scientific notation below 1e-3 (e.g. 1.55e-04)."""
  if not np.isfinite(p):
    return "n/a"
  return f"{p:.2e}" if p < 1e-3 else f"{p:.3g}"


def verdict(test: dict, groups_by_name: dict[str, ArmGroup],
            alpha: float = SIGNIFICANCE) -> str:
  """One sentence for one test record: direction from the rank-biserial r (r > 0: the reference
  group tends to be larger), significance from p_holm at `alpha`."""
  a, b = groups_by_name[test["a"]], groups_by_name[test["b"]]
  larger, smaller, words = _PHRASES[test["metric"]]
  who, than = f"{a.display} students", f"{b.display} controls"
  p, r = test["p_holm"], test["effect_size"]
  if not np.isfinite(p):
    return (f"{words}: not tested ({who}: n = {test['n_a']}, {than}: n = {test['n_b']}; "
            "a test needs at least 2 values on each side).")
  stat = f"(p_holm = {format_p(p)}, r = {r:+.2f})"
  if test.get("test"):
    stat = f"({TEST_NAMES[test['test']]}, p_holm = {format_p(p)}, r = {r:+.2f})"
  if is_significant(test, alpha) and r != 0:
    phrase = (larger if r > 0 else smaller)
    if "{}" in phrase:
      return f"{who} {phrase.format('than ' + than)} {stat}."
    return f"{who} {phrase} than {than} {stat}."
  return f"No significant difference between {who} and {than} in {words} {stat}."


TEST_NAMES = {"wilcoxon": "Wilcoxon signed-rank", "mann_whitney": "Mann-Whitney U"}


def test_choice(block: Sequence[dict]) -> str:
  """One sentence: which test gave the verdicts of a comparison, and why."""
  chosen = [t for t in block if t.get("test")]
  if not chosen:
    return "No metric could be tested."
  lines = []
  for name in dict.fromkeys(t["test"] for t in chosen):
    these = [t for t in chosen if t["test"] == name]
    t = these[0]
    n = (f"{t['n_pairs']} seed-matched pairs" if name == "wilcoxon"
         else f"{t['n_a']} vs {t['n_b']} students")
    which = "" if len(these) == len(chosen) else \
        f" for {', '.join(_PHRASES[x['metric']][2] for x in these)}"
    reason = t["test_reason"]
    lines.append(f"Test{which}: {TEST_NAMES[name]} on {n}; {reason}.")
  return " ".join(lines)


def _margin(value: float) -> str:
  return f"+-{value:g}"


def equivalence_lines(block: Sequence[dict], groups_by_name: dict[str, ArmGroup]) -> list[str]:
  """The TOST verdicts of one comparison: one sentence per equivalent metric, one listing the
  undecided metrics (neither significantly different nor equivalent), one for metrics that
  differ significantly by more than the margin allows."""
  tested = [t for t in block if t.get("equivalence")]
  if not tested:
    return []
  a, b = groups_by_name[block[0]["a"]], groups_by_name[block[0]["b"]]
  lines = []
  for t in tested:
    e = t["equivalence"]
    if e["equivalent"]:
      lines.append(f"{a.display} students and {b.display} controls are equivalent in "
                   f"{_PHRASES[t['metric']][2]} within {_margin(e['margin'])} (TOST "
                   f"p_holm = {format_p(e['p_holm'])}; {e['confidence']:.0%} CI of the "
                   f"difference [{e['ci_low']:+.4g}, {e['ci_high']:+.4g}]).")
  undecided = [t for t in tested if not t["equivalence"]["equivalent"]
               and not is_significant(t)]
  if undecided:
    items = "; ".join(
        f"{_PHRASES[t['metric']][2]} ({_margin(t['equivalence']['margin'])}, TOST p_holm = "
        f"{format_p(t['equivalence']['p_holm'])}, {t['equivalence']['confidence']:.0%} CI "
        f"[{t['equivalence']['ci_low']:+.4g}, {t['equivalence']['ci_high']:+.4g}])"
        for t in undecided)
    lines.append(f"Undecided (neither a difference nor equivalence within the margin can be "
                 f"claimed): {items}.")
  return lines


def no_verdict_comparisons(tests: Sequence[dict]) -> list[tuple[str, str, dict]]:
  """(a, b, power record) of the comparisons in which no metric's test can reach p_holm <=
  SIGNIFICANCE with the n at hand (`_power`'s verdict_possible false for every tested metric);
  the record is that of the metric with the smallest reachable p_holm."""
  out = []
  for a, b in dict.fromkeys((t["a"], t["b"]) for t in tests):
    records = [t["power"] for t in tests
               if (t["a"], t["b"]) == (a, b) and t.get("power")]
    if records and not any(r["verdict_possible"] for r in records):
      out.append((a, b, min(records, key=lambda r: r["min_p_holm"])))
  return out


def is_significant(test: dict, alpha: float = SIGNIFICANCE) -> bool:
  p = test["p_holm"]
  return p is not None and bool(np.isfinite(p)) and p <= alpha


def comparison_verdicts(block: Sequence[dict], groups_by_name: dict[str, ArmGroup],
                        alpha: float = SIGNIFICANCE) -> list[str]:
  """The verdicts of one comparison (the tests of one (a, b) pair): one sentence per significant
  metric, then one sentence listing the metrics without a significant difference, then the
  metrics that could not be tested."""
  lines = [verdict(t, groups_by_name, alpha) for t in block if is_significant(t, alpha)]
  tested = [t for t in block if not is_significant(t, alpha) and np.isfinite(t["p_holm"])]
  if tested:
    a, b = groups_by_name[block[0]["a"]], groups_by_name[block[0]["b"]]
    items = "; ".join(f"{_PHRASES[t['metric']][2]} (p_holm = {format_p(t['p_holm'])}, "
                      f"r = {t['effect_size']:+.2f})" for t in tested)
    lines.append(f"No significant difference between {a.display} students and {b.display} "
                 f"controls in: {items}.")
  lines += [verdict(t, groups_by_name, alpha) for t in block if not np.isfinite(t["p_holm"])]
  return lines

