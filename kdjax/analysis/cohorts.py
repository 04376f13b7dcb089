"""Mutual learning's cohorts: how much the students of a cohort agree with each other.

A `mutual` arm's students learn from the other members of their cohort (kdjax.arms, signal
'peers'; `Replica.cohort`). The core analysis compares each of them with a teacher (the one its
seed maps to, as for the other arms without a teacher); this module adds what the arm is about,
the peers' similarity on the eval split, per cohort and per arm entry:

  cohorts = {"metrics": [...], "cohorts": [{"arm", "group", "members": [indices],
              "pairs": [{"a", "b", metric: value}], "mean": {metric: mean over its pairs}}],
             "arms": {entry: {metric: {"mean", "std", "n"}}}}

over every unordered pair of members (a < b) of a cohort whose members are all included (not
diverged): `agreement` (top-1), `js_divergence` (nats) and `kl_divergence` of b from a (nats),
kdjax.metrics' definitions on every eval prediction. An arm entry summarises its cohorts'
means (`n` cohorts; std with ddof 1).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from kdjax import metrics as metrics_lib
from kdjax import stats
from kdjax.analysis import sections

PEER_METRICS = ("agreement", "js_divergence", "kl_divergence")


def measure(replicas, student_logits: np.ndarray, groups) -> dict | None:
  """metrics.json's `cohorts` (module docstring), or None without cohorts."""
  group_of = {i: g for g in groups for i in g.included}
  seen, cohorts = set(), []
  for r in replicas:
    if not r.cohort or r.cohort in seen:
      continue
    seen.add(r.cohort)
    if not all(i in group_of for i in r.cohort):
      continue  # a diverged member: the cohort is excluded with it
    pairs = []
    for a, b in itertools.combinations(r.cohort, 2):
      la, lb = (student_logits[i].reshape(-1, student_logits.shape[-1]) for i in (a, b))
      pairs.append({"a": a, "b": b,
                    "agreement": float(np.mean(metrics_lib.agreement(la, lb))),
                    "js_divergence": float(np.mean(metrics_lib.js_divergence(la, lb))),
                    "kl_divergence": float(np.mean(metrics_lib.kl_divergence(la, lb)))})
    cohorts.append({"arm": r.arm, "group": group_of[r.index].name, "members": list(r.cohort),
                    "pairs": pairs,
                    "mean": {m: float(np.mean([p[m] for p in pairs])) for m in PEER_METRICS}})
  if not seen:
    return None
  arms = {}
  for name in dict.fromkeys(c["group"] for c in cohorts):
    means = [c["mean"] for c in cohorts if c["group"] == name]
    arms[name] = {}
    for m in PEER_METRICS:
      mean, std = stats.mean_std([x[m] for x in means])
      arms[name][m] = {"mean": float(mean), "std": float(std), "n": len(means)}
  return {"metrics": list(PEER_METRICS), "cohorts": cohorts, "arms": arms}


def section(record: dict, groups) -> sections.Section:
  """The report's "Mutual learning: peer similarity" table."""
  display = {g.name: g.display for g in groups}
  lines = ["## Mutual learning: peer similarity", "",
           "Students of one cohort learn from each other (deep mutual learning, Zhang et al. "
           "2018) on shared batches. Similarity of every pair of peers on the eval split, "
           "averaged per cohort, then over the cohorts of an arm (mean ± std over cohorts).", "",
           "| arm | cohorts | " + " | ".join(PEER_METRICS) + " |",
           "|---|---|" + "---|" * len(PEER_METRICS)]
  for name, summary in record["arms"].items():
    cells = [_mean_std_text(summary[m]) for m in PEER_METRICS]
    lines.append(f"| {display.get(name, name)} | {summary[PEER_METRICS[0]]['n']} | "
                 + " | ".join(cells) + " |")
  return sections.Section(results=record, markdown="\n".join(lines))


def _mean_std_text(entry: dict) -> str:
  if not math.isfinite(entry["std"]):
    return f"{entry['mean']:.4f}"
  return f"{entry['mean']:.4f} ± {entry['std']:.4f}"
