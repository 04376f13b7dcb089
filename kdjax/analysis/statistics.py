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
                "dkd": "DKD", "feature_hint": "feature-hint"}


@dataclasses.dataclass(frozen=True)
class Group:
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


def make_groups(replicas: Sequence, excluded: set[int]) -> list[Group]:
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
      groups.append(Group(name=name, arm=arm, hparams=key, replicas=tuple(indices),
                          included=tuple(i for i in indices if i not in excluded)))
  return groups


def reference_arm(arm_names: Sequence[str]) -> str:
  """The arm tested against all others: kd when present, else the first arm of the study."""
  return "kd" if "kd" in arm_names else arm_names[0]


def comparisons(groups: Sequence[Group]) -> list[tuple[Group, Group]]:
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


def summarize_groups(groups: Sequence[Group], replica_metrics: Sequence[dict],
                     metric_names: Sequence[str]) -> dict[str, dict[str, dict]]:
  """{group: {metric: {"mean", "std", "ci_low", "ci_high", "n"}}} via kdjax.stats.summarize."""
  return {g.name: {m: stats.summarize(metric_values(replica_metrics, g.included, m),
                                      confidence=CONFIDENCE, seed=BOOTSTRAP_SEED)
                   for m in metric_names}
          for g in groups}


def run_tests(groups: Sequence[Group], replica_metrics: Sequence[dict],
              metric_names: Sequence[str]) -> list[dict]:
  """Two-sided Mann-Whitney U of reference vs control for every metric, Holm-corrected across
  the metrics of each comparison. `p_method` names how the p-value was computed
  (`kdjax.stats.P_VALUE_METHODS`: exact, or a permutation p-value when values tie at small n).
  A metric with fewer than 2 values on a side gets null statistic / p-values / p_method (not
  part of the Holm family)."""
  records = []
  for a, b in comparisons(groups):
    block = []
    for m in metric_names:
      x = metric_values(replica_metrics, a.included, m)
      y = metric_values(replica_metrics, b.included, m)
      record = {"metric": m, "a": a.name, "b": b.name, "statistic": math.nan,
                "p_value": math.nan, "p_holm": math.nan, "effect_size": math.nan,
                "n_a": int(x.size), "n_b": int(y.size), "p_method": None}
      if x.size >= 2 and y.size >= 2:
        result = stats.mann_whitney_u(x, y, alternative="two-sided")
        record.update(statistic=result.statistic, p_value=result.p_value,
                      effect_size=result.effect_size, p_method=result.method)
      block.append(record)
    adjusted = stats.holm([r["p_value"] for r in block])
    for record, p in zip(block, adjusted):
      record["p_holm"] = float(p)
    records.extend(block)
  return records


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


def verdict(test: dict, groups_by_name: dict[str, Group],
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
  if is_significant(test, alpha) and r != 0:
    phrase = (larger if r > 0 else smaller)
    if "{}" in phrase:
      return f"{who} {phrase.format('than ' + than)} {stat}."
    return f"{who} {phrase} than {than} {stat}."
  return f"No significant difference between {who} and {than} in {words} {stat}."


def is_significant(test: dict, alpha: float = SIGNIFICANCE) -> bool:
  p = test["p_holm"]
  return p is not None and bool(np.isfinite(p)) and p <= alpha


def comparison_verdicts(block: Sequence[dict], groups_by_name: dict[str, Group],
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

