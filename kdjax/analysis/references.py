"""Null references: how similar two models get without one distilling the other (issue 15).

A KD student's agreement with its teacher means little on its own: two models trained on the same
data agree on most points anyway. This module measures, from the eval-split logits the analysis
already holds (`Predictions.student_logits` [R, N, ..., C], the arrays of predictions.npz), the
similarity of pairs of students of different seeds within each arm (group), with the same
`kdjax.metrics.SimilarityMetrics` as every student-teacher number (student b against student a,
so the agree_when_* split follows student a's correctness). Together with the teacher-teacher
pairs (`teacher_agreement`, several teachers) and the students of a `onehot` arm (trained on
labels from a fresh initialisation; their numbers against the teacher are that arm's own
metrics), they are the levels that unrelated models reach.

Pairs are computed in chunks of PAIR_CHUNK (one jitted, vmapped call each), at most MAX_PAIRS per
group (the first ones in (i, j), i < j order), so memory stays at a few pairs' logits.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import jax
import numpy as np

from kdjax import metrics as metrics_lib

# The similarity entries of a model pair (accuracy / ece would be the second model's own).
PAIR_METRICS = tuple(m for m in metrics_lib.SimilarityMetrics.__annotations__
                     if m not in ("accuracy", "ece"))
MAX_PAIRS = 300
PAIR_CHUNK = 8
NULL_ARMS = ("onehot",)  # arms whose students are independent of the teacher


def student_pairs(indices: Sequence[int], seeds: Sequence[int]) -> list[tuple[int, int]]:
  """(i, j), i < j in `indices` order, of students with different seeds; at most MAX_PAIRS."""
  pairs = [(i, j) for i, j in itertools.combinations(indices, 2) if seeds[i] != seeds[j]]
  return pairs[:MAX_PAIRS]


@jax.jit
def _pair_states(first, second, labels):
  """SimilarityMetrics of second[p] against first[p] for every pair p (all examples valid)."""
  return jax.vmap(lambda a, b: metrics_lib.SimilarityMetrics.from_batch(b, a, labels))(first,
                                                                                       second)


def pair_metrics(logits: np.ndarray, labels: np.ndarray,
                 pairs: Sequence[tuple[int, int]]) -> list[dict[str, float]]:
  """PAIR_METRICS of logits[j] against logits[i] for every (i, j) in `pairs`, over all examples."""
  out = []
  for start in range(0, len(pairs), PAIR_CHUNK):
    chunk = pairs[start:start + PAIR_CHUNK]
    # Pad the last chunk to the chunk size, so one program serves every chunk.
    padded = list(chunk) + [chunk[-1]] * (PAIR_CHUNK - len(chunk))
    first = logits[np.array([i for i, _ in padded])]
    second = logits[np.array([j for _, j in padded])]
    states = jax.device_get(_pair_states(first, second, labels))
    for p in range(len(chunk)):
      computed = jax.tree.map(lambda x: x[p], states).compute()
      out.append({m: float(computed[m]) for m in PAIR_METRICS})
  return out


def _moments(values: list[float]) -> dict[str, float]:
  x = np.array([v for v in values if math.isfinite(v)], np.float64)
  if x.size == 0:
    return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
  return {"mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)) if x.size > 1 else math.nan,
          "min": float(np.min(x)), "max": float(np.max(x))}


def null_references(groups, replicas, student_logits: np.ndarray, labels: np.ndarray,
                    summaries: dict, teacher_agreement: dict | None) -> dict:
  """The metrics.json "null_reference" entry:

    student_pairs: {group: {"n_pairs", "metrics": {metric: {"mean", "std", "min", "max"}}}}
                   over pairs of the group's included students of different seeds;
    teacher_onehot: {group: {"n", "mean": {metric: mean}}} for groups of NULL_ARMS (their
                   students against the teacher, from the arm summaries);
    teacher_pairs: {"n_pairs", "mean": {metric: mean}} from `teacher_agreement` (several
                   teachers), else absent.
  """
  seeds = {r.index: r.seed for r in replicas}
  labels = np.asarray(labels)
  student = {}
  for g in groups:
    pairs = student_pairs(g.included, seeds)
    values = pair_metrics(student_logits, labels, pairs) if pairs else []
    student[g.name] = {"n_pairs": len(pairs), "metrics": {
        m: _moments([v[m] for v in values]) for m in PAIR_METRICS}}
  out = {"student_pairs": student,
         "teacher_onehot": {g.name: {"n": summaries[g.name]["agreement"]["n"],
                                     "mean": {m: summaries[g.name][m]["mean"]
                                              for m in PAIR_METRICS}}
                            for g in groups if g.arm in NULL_ARMS}}
  if teacher_agreement:
    out["teacher_pairs"] = {"n_pairs": len(teacher_agreement["pairs"]),
                            "mean": dict(teacher_agreement["mean"])}
  return out
