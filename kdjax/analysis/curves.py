"""Similarity over training: the `curves` of metrics.json and plots/curves.png.

The students stage records, at every eval (`eval_every_steps` and the last step), each student's
`kdjax.train.CURVE_METRICS` against its own teacher on the eval split in
WORKDIR/students/curves.json (kdjax.train.Curves: rewritten whole at each eval, trimmed to the
restored step on resume). This module reads it back, per replica and per arm entry:

  curves = {"source": "students/curves.json", "metrics": [...], "steps": [S...],
            "replicas": [{"index", "arm", "seed", "group", "values": {metric: [per step]}}],
            "arms": {entry: {metric: {"mean", "min", "max": [per step], "n": [per step]}}}}

An arm entry's statistics are over its included (not diverged) students where the value is
defined (agree_when_teacher_incorrect is undefined while the teacher makes no error: null). The
last step's values are those of the analysis' own `replicas` metrics (same checkpoint, same
eval batches, the same kdjax.metrics.SimilarityMetrics).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from kdjax import train
from kdjax import workdir as workdir_lib
from kdjax.analysis import plots as plots_lib
from kdjax.analysis.statistics import ArmGroup

SOURCE = f"students/{train.CURVES_FILE}"
_TITLES = {"accuracy": "accuracy", "agreement": "agreement with the teacher",
           "agree_when_teacher_correct": "agreement, teacher correct",
           "agree_when_teacher_incorrect": "agreement, teacher incorrect",
           "js_divergence": "JS divergence (nats)"}


def read(workdir: str, replicas) -> dict | None:
  """The saved curves.json, or None where there is none or it describes other replicas."""
  path = workdir_lib.join(workdir, SOURCE)
  if not workdir_lib.exists(path):
    return None
  saved = workdir_lib.read_json(path)
  expected = [{"index": r.index, "arm": r.arm, "seed": r.seed} for r in replicas]
  if saved.get("replicas") != expected or not saved.get("points"):
    return None
  return saved


def build(saved: dict, groups: Sequence[ArmGroup]) -> dict:
  """metrics.json's `curves` from curves.json's content (see the module docstring)."""
  metrics = list(saved["metrics"])
  points = sorted(saved["points"], key=lambda p: p["step"])
  steps = [int(p["step"]) for p in points]
  values = {m: np.array([[math.nan if v is None else v for v in p[m]] for p in points],
                        np.float64) for m in metrics}  # [steps, R]
  group_of = {i: g.name for g in groups for i in g.replicas}
  replicas = [{**row, "group": group_of.get(row["index"]),
               "values": {m: values[m][:, k].tolist() for m in metrics}}
              for k, row in enumerate(saved["replicas"])]
  arms = {}
  for g in groups:
    entry = {}
    for m in metrics:
      block = values[m][:, list(g.included)] if g.included else np.full((len(steps), 0), np.nan)
      n = np.isfinite(block).sum(axis=1)
      with np.errstate(all="ignore"):
        mean = [float(np.nanmean(row)) if k else math.nan for row, k in zip(block, n)]
        low = [float(np.nanmin(row)) if k else math.nan for row, k in zip(block, n)]
        high = [float(np.nanmax(row)) if k else math.nan for row, k in zip(block, n)]
      entry[m] = {"mean": mean, "min": low, "max": high, "n": [int(k) for k in n]}
    arms[g.name] = entry
  return {"source": SOURCE, "metrics": metrics, "steps": steps, "replicas": replicas,
          "arms": arms}


def plot(path: str, curves: dict, groups: Sequence[ArmGroup]) -> None:
  """plots/curves.png: per metric, each arm entry's mean over its students by step, with the
  min-max band over them."""
  metrics = curves["metrics"]
  steps = np.array(curves["steps"])
  rows, cols = plots_lib._grid(len(metrics), 3)  # pylint: disable=protected-access
  fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
  for i, m in enumerate(metrics):
    ax = fig.add_subplot(rows, cols, i + 1)
    for j, g in enumerate(groups):
      c = curves["arms"][g.name][m]
      mean, low, high = (np.array(c[k], np.float64) for k in ("mean", "min", "max"))
      color = plots_lib._color(j)  # pylint: disable=protected-access
      ax.plot(steps, mean, color=color, label=g.display, marker="." if len(steps) < 30 else None)
      ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set_title(_TITLES.get(m, m), fontsize=10)
    ax.set_xlabel("student step")
    ax.grid(alpha=0.3)
    if i == 0:
      ax.legend(fontsize=8)
  fig.suptitle("Similarity to the teacher over training: mean over seeds, min-max band",
               fontsize=11)
  fig.tight_layout()
  plots_lib._save(fig, path)  # pylint: disable=protected-access
