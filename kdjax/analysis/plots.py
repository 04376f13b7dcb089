"""The analysis figures (matplotlib, Agg, PNG), one function per figure.

  confidence_scatter  teacher vs student probability of the true class, both logit-transformed,
                      one panel per group, with the y = x line (Nagarajan et al., arXiv 2301.12923,
                      Fig. 1: students underfit the teacher's low-confidence points);
  agreement_split     agreement with the teacher on teacher-correct vs teacher-incorrect points
                      per group (the negative asymmetric payoff of Mason-Williams et al.,
                      arXiv 2510.12615);
  metric_strips       every metric per group: a box over the replicas and one dot per replica.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global backend switch), so
plotting never opens a window or touches the caller's matplotlib state.
"""

from __future__ import annotations

import io
from typing import Sequence

import jax
import numpy as np
from matplotlib.figure import Figure

from kdjax import metrics as metrics_lib
from kdjax import workdir as workdir_lib
from kdjax.analysis.statistics import ArmGroup, HIGHER_IS_MORE_SIMILAR

# At most this many points per scatter panel (a fixed-seed subsample beyond it).
MAX_SCATTER_POINTS = 20_000
_CORRECT, _INCORRECT = "#1f77b4", "#d62728"
_DPI = 110


def _color(i: int) -> str:
  return f"C{i % 10}"


def _save(fig: Figure, path: str) -> None:
  """Writes `fig` as PNG to `path`, a local path or gs:// (through kdjax.workdir)."""
  # No "Software" entry: the PNG bytes do not depend on the matplotlib version string.
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
  workdir_lib.write_bytes(path, buffer.getvalue())


def _grid(num: int, max_cols: int) -> tuple[int, int]:
  cols = min(num, max_cols)
  return -(-num // cols), cols


@jax.jit
def _true_class_logit(logits, labels):
  return metrics_lib.logit_transform(metrics_lib.confidence(logits, labels))


def true_class_logit(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """logit(softmax(logits)[label]) (kdjax.metrics.confidence, logit_transform), flattened."""
  return np.asarray(_true_class_logit(logits, labels)).reshape(-1)


def confidence_scatter(path: str, groups: Sequence[ArmGroup], labels: np.ndarray,
                       teacher_logits: np.ndarray, student_logits: np.ndarray,
                       compared_teacher: np.ndarray) -> None:
  """One panel per group: x = teacher's, y = student's logit-transformed probability of the true
  class, one point per (included student, eval example), coloured by whether the teacher's top-1
  prediction is correct."""
  teacher_x = [true_class_logit(t, labels) for t in teacher_logits]
  teacher_ok = [(np.argmax(t, -1) == labels).reshape(-1) for t in teacher_logits]
  rows, cols = _grid(len(groups), 3)
  fig = Figure(figsize=(4.2 * cols, 4.2 * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
  rng = np.random.default_rng(0)
  bound = float(metrics_lib.logit_transform(1.0))
  for ax in axes.flat[len(groups):]:
    ax.set_visible(False)
  for ax, g in zip(axes.flat, groups):
    xs, ys, ok = [], [], []
    for r in g.included:
      j = compared_teacher[r]
      xs.append(teacher_x[j])
      ys.append(true_class_logit(student_logits[r], labels))
      ok.append(teacher_ok[j])
    ax.plot([-bound, bound], [-bound, bound], color="black", lw=1, ls="--", label="y = x")
    if xs:
      x, y, correct = np.concatenate(xs), np.concatenate(ys), np.concatenate(ok)
      if x.size > MAX_SCATTER_POINTS:
        keep = np.sort(rng.choice(x.size, MAX_SCATTER_POINTS, replace=False))
        x, y, correct = x[keep], y[keep], correct[keep]
      ax.scatter(x[correct], y[correct], s=6, alpha=0.25, color=_CORRECT, lw=0,
                 label="teacher correct")
      ax.scatter(x[~correct], y[~correct], s=10, alpha=0.6, color=_INCORRECT, lw=0,
                 label="teacher incorrect")
    ax.set_title(f"{g.display} ({len(g.included)} students)")
    ax.set_xlim(-bound - 0.5, bound + 0.5)
    ax.set_ylim(-bound - 0.5, bound + 0.5)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
  for ax in axes[-1]:
    ax.set_xlabel("teacher: logit p(true class)")
  for ax in axes[:, 0]:
    ax.set_ylabel("student: logit p(true class)")
  axes.flat[0].legend(loc="upper left", fontsize=8, markerscale=2)
  fig.suptitle("Teacher vs student confidence in the true class (below y = x: student less "
               "confident)", fontsize=11)
  _save(fig, path)


def agreement_split(path: str, groups: Sequence[ArmGroup], replica_metrics: Sequence[dict],
                    summaries: dict, teacher_pair_means: dict | None = None) -> None:
  """Per group, bars of mean agreement with the teacher on teacher-correct and teacher-incorrect
  points (error bars: 95% bootstrap CI), one dot per student; dashed lines: teacher-teacher
  agreement (when there are several teachers)."""
  keys = (("agree_when_teacher_correct", "teacher correct", _CORRECT),
          ("agree_when_teacher_incorrect", "teacher incorrect", _INCORRECT))
  fig = Figure(figsize=(max(5.0, 1.6 * len(groups) + 2.0), 4.2), layout="constrained")
  ax = fig.subplots()
  width = 0.36
  rng = np.random.default_rng(0)
  for k, (metric, label, color) in enumerate(keys):
    offset = (k - 0.5) * width
    for i, g in enumerate(groups):
      s = summaries[g.name][metric]
      mean = s["mean"]
      if mean is None or not np.isfinite(mean):
        continue
      low, high = s["ci_low"], s["ci_high"]
      err = None
      if np.isfinite(low) and np.isfinite(high):
        err = [[mean - low], [high - mean]]
      ax.bar(i + offset, mean, width, color=color, alpha=0.35, edgecolor=color,
             yerr=err, capsize=3, label=label if i == 0 else None)
      values = np.array([replica_metrics[r][metric] for r in g.included], float)
      values = values[np.isfinite(values)]
      jitter = rng.uniform(-width / 4, width / 4, values.size)
      ax.scatter(i + offset + jitter, values, s=14, color=color, zorder=3, lw=0)
    if teacher_pair_means and np.isfinite(teacher_pair_means.get(metric, np.nan)):
      ax.axhline(teacher_pair_means[metric], color=color, ls="--", lw=1,
                 label=f"teacher-teacher, {label}")
  ax.set_xticks(range(len(groups)), [g.display for g in groups])
  ax.set_ylabel("top-1 agreement with the teacher")
  ax.set_ylim(0, 1.05)
  ax.set_title("Agreement split by teacher correctness (bars: mean, 95% CI; dots: students)")
  fig.legend(loc="outside lower center", ncols=2, fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  _save(fig, path)


def metric_strips(path: str, groups: Sequence[ArmGroup], replica_metrics: Sequence[dict],
                  metric_names: Sequence[str]) -> None:
  """One panel per metric: a box plot per group over its students, with a dot per student."""
  rows, cols = _grid(len(metric_names), 5)
  fig = Figure(figsize=(3.1 * cols, 3.3 * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  rng = np.random.default_rng(0)
  for ax in axes.flat[len(metric_names):]:
    ax.set_visible(False)
  for ax, metric in zip(axes.flat, metric_names):
    data = []
    for g in groups:
      v = np.array([replica_metrics[r][metric] for r in g.included], float)
      data.append(v[np.isfinite(v)])
    positions = np.arange(len(groups))
    nonempty = [i for i, d in enumerate(data) if d.size]
    if nonempty:
      ax.boxplot([data[i] for i in nonempty], positions=positions[nonempty], widths=0.55,
                 showfliers=False, medianprops={"color": "black"})
    for i, d in enumerate(data):
      ax.scatter(i + rng.uniform(-0.15, 0.15, d.size), d, s=12, color=_color(i), zorder=3,
                 lw=0)
    ax.set_xticks(positions, [g.display for g in groups],
                  rotation=30 if len(groups) > 3 else 0, fontsize=8)
    better = "higher" if HIGHER_IS_MORE_SIMILAR[metric] > 0 else "lower"
    meaning = "better" if metric in ("accuracy", "ece") else "more similar"
    ax.set_title(f"{metric}\n({better} = {meaning})", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle("Per-student metrics by arm (box: quartiles; dots: students)", fontsize=11)
  _save(fig, path)
