"""Section `width_scaling`: how the transfer of a teacher's right and wrong answers grows with
student capacity (Mason-Williams et al., arXiv 2510.12615, "capacity-scaled error
amplification": as the student widens, its agreement with the teacher on the teacher's errors
grows faster than on the teacher's correct answers).

For every arm and student model (one `width` each; the study's `model_grid`), over the arm's
included students (diverged ones left out):

  correct(w)   = mean over students of agree_when_teacher_correct
  incorrect(w) = mean over students of agree_when_teacher_incorrect

and, per arm, least-squares slopes against log2 width,

  slope_correct   = d correct / d log2(w),   slope_incorrect = d incorrect / d log2(w),
  ratio           = slope_incorrect / slope_correct   (> 1: errors transfer faster),

computed from the per-student values (every student one point), so a slope has the usual OLS
standard error. The figure plots both curves per arm with one dot per student.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
from matplotlib.figure import Figure

from kdjax.analysis import plots
from kdjax.analysis import sections

SPLITS = (("agree_when_teacher_correct", "teacher correct"),
          ("agree_when_teacher_incorrect", "teacher incorrect"))


def student_widths(study) -> dict[str, float]:
  """{model label: its `width` option} of the study's student models (1.0 when not set)."""
  return {g.model.label: float(dict(g.model.kwargs).get("width", 1.0))
          for g in study.students.groups}


def ols_slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(slope, standard error) of the least-squares line y = a + b x over the finite points
  (`scipy.stats.linregress`); NaN where undefined: both for fewer than two distinct x, the
  standard error for fewer than three points (linregress gives 0 for two)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  keep = np.isfinite(x) & np.isfinite(y)
  x, y = x[keep], y[keep]
  if x.size < 2 or np.ptp(x) == 0:
    return math.nan, math.nan
  fit = scipy.stats.linregress(x, y)
  return float(fit.slope), (float(fit.stderr) if x.size > 2 else math.nan)


def width_table(study, student_metrics, included: set[int]) -> dict:
  """{arm: {"widths": [...], metric: {"mean": [...], "n": [...]}, "slopes": {...}}}."""
  widths = student_widths(study)
  table = {}
  rows_by_arm: dict[str, list] = {}
  for r in study.students.replicas:
    if r.index in included:
      rows_by_arm.setdefault(r.arm, []).append(r)
  for arm, rows in rows_by_arm.items():
    arm_widths = sorted({widths[r.model] for r in rows})
    entry = {"widths": arm_widths}
    for metric, _ in SPLITS:
      per_width_mean, per_width_n = [], []
      for w in arm_widths:
        values = np.array([student_metrics[r.index][metric] for r in rows
                           if widths[r.model] == w], np.float64)
        values = values[np.isfinite(values)]
        per_width_mean.append(float(values.mean()) if values.size else math.nan)
        per_width_n.append(int(values.size))
      x = np.log2([widths[r.model] for r in rows])
      y = np.array([student_metrics[r.index][metric] for r in rows], np.float64)
      slope, stderr = ols_slope(x, y)
      entry[metric] = {"mean": per_width_mean, "n": per_width_n, "slope_per_doubling": slope,
                       "slope_stderr": stderr}
    slope_c = entry[SPLITS[0][0]]["slope_per_doubling"]
    slope_i = entry[SPLITS[1][0]]["slope_per_doubling"]
    entry["ratio_incorrect_to_correct"] = slope_i / slope_c if (
        math.isfinite(slope_c) and math.isfinite(slope_i) and slope_c != 0) else math.nan
    table[arm] = entry
  return table


def _plot(path: str, study, student_metrics, included: set[int], table: dict) -> None:
  widths = student_widths(study)
  arms = list(table)
  fig = Figure(figsize=(4.2 * len(arms), 3.6))
  axes = fig.subplots(1, len(arms), squeeze=False)[0]
  for ax, arm in zip(axes, arms):
    for (metric, label), color in zip(SPLITS, (plots._CORRECT, plots._INCORRECT)):  # pylint: disable=protected-access
      dots = [(widths[r.model], student_metrics[r.index][metric])
              for r in study.students.replicas if r.arm == arm and r.index in included]
      dots = [(w, v) for w, v in dots if math.isfinite(v)]
      if dots:
        ax.scatter(*zip(*dots), s=10, color=color, alpha=0.4)
      ax.plot(table[arm]["widths"], table[arm][metric]["mean"], "o-", color=color,
              label=f"{label} (slope {table[arm][metric]['slope_per_doubling']:+.3f}/doubling)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("student width")
    ax.set_ylabel("top-1 agreement with the teacher")
    ax.set_title(arm)
    ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  plots._save(fig, path)  # pylint: disable=protected-access


@sections.register("width_scaling")
def width_scaling(context: sections.Context) -> sections.Section:
  study, preds = context.study, context.preds
  included = {i for g in context.groups for i in g.included}
  table = width_table(study, preds.student_metrics, included)
  _plot(f"{context.plot_dir}/width_scaling.png", study, preds.student_metrics, included, table)
  lines = ["## Width scaling: do errors transfer faster?", "",
           "Agreement with the teacher on the points it gets right and on those it gets wrong, "
           "per student width (arXiv 2510.12615). Slopes are least-squares fits against "
           "log2(width) over the students; a ratio above 1 means the extra capacity goes "
           "preferentially to copying the teacher's errors.", "",
           "| arm | width | agree (teacher correct) | agree (teacher incorrect) | n |",
           "|---|---|---|---|---|"]
  for arm, entry in table.items():
    c, i = entry[SPLITS[0][0]], entry[SPLITS[1][0]]
    for k, w in enumerate(entry["widths"]):
      lines.append(f"| {arm} | {w:g} | {c['mean'][k]:.4f} | {i['mean'][k]:.4f} | "
                   f"{c['n'][k]} |")
  lines += ["", "| arm | slope, teacher correct | slope, teacher incorrect | ratio |",
            "|---|---|---|---|"]
  for arm, entry in table.items():
    c, i = entry[SPLITS[0][0]], entry[SPLITS[1][0]]
    lines.append(f"| {arm} | {c['slope_per_doubling']:+.4f} ± {c['slope_stderr']:.4f} | "
                 f"{i['slope_per_doubling']:+.4f} ± {i['slope_stderr']:.4f} | "
                 f"{entry['ratio_incorrect_to_correct']:.2f} |")
  lines += ["", "![width scaling](plots/width_scaling.png)"]
  return sections.Section(results=table, markdown="\n".join(lines))
