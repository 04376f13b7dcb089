"""Teachers of a class subset (`teacher_classes`): accuracy and agreement on known and novel
classes.

When the teachers are trained on some classes only, distilling on the others teaches noise
(the `kd_known` arm distils on the known classes only). This section splits the eval split by
whether an example's label is a class the teachers saw ("known") or not ("novel") and reports,
for every teacher and student, top-1 accuracy and (students) top-1 agreement with its compared
teacher on each part, and per arm entry the mean and std (ddof 1) over its included students:

  known_classes = {"classes": [known...], "num_known", "num_novel",
                   "teachers": [{"index", "known": {"accuracy"}, "novel": {"accuracy"}}],
                   "replicas": [{"index", "known": {"accuracy", "agreement"}, "novel": {...}}],
                   "arms": {entry: {part: {metric: {"mean", "std", "n"}}}}}

A label position counts once (sequence labels are flattened).
"""

from __future__ import annotations

import numpy as np

from kdjax import stats
from kdjax.analysis import sections

PARTS = ("known", "novel")


def measure(study, preds, groups) -> dict | None:
  """metrics.json's `known_classes` (module docstring), or None when teachers see every class."""
  if not study.teacher_classes:
    return None
  labels = preds.labels.reshape(-1)
  known = np.isin(labels, study.teacher_classes)
  masks = {"known": known, "novel": ~known}
  top1 = lambda logits: logits.reshape(-1, logits.shape[-1]).argmax(-1)
  teacher_top1 = [top1(t) for t in preds.teacher_logits]

  def part_metrics(predicted, teacher=None):
    out = {}
    for part, mask in masks.items():
      values = {"accuracy": float(np.mean(predicted[mask] == labels[mask])) if mask.any()
                else float("nan")}
      if teacher is not None:
        values["agreement"] = float(np.mean(predicted[mask] == teacher[mask])) if mask.any() \
            else float("nan")
      out[part] = values
    return out

  teachers = [{"index": t.index, **part_metrics(teacher_top1[t.index])}
              for t in study.teacher.replicas]
  replicas = [{"index": r.index, **part_metrics(
      top1(preds.student_logits[r.index]),
      teacher_top1[int(preds.compared_teacher[r.index])])} for r in study.students.replicas]
  arms = {}
  for g in groups:
    arms[g.name] = {}
    for part in PARTS:
      arms[g.name][part] = {}
      for metric in ("accuracy", "agreement"):
        mean, std = stats.mean_std([replicas[i][part][metric] for i in g.included])
        arms[g.name][part][metric] = {"mean": float(mean), "std": float(std),
                                      "n": len(g.included)}
  return {"classes": list(study.teacher_classes), "num_known": int(known.sum()),
          "num_novel": int((~known).sum()), "teachers": teachers, "replicas": replicas,
          "arms": arms}


def section(record: dict, groups) -> sections.Section:
  """The report's "Known and novel classes" table."""
  fmt = lambda e: f"{e['mean']:.4f}" + (f" ± {e['std']:.4f}" if np.isfinite(e["std"]) else "")
  lines = ["## Known and novel classes", "",
           f"The teachers were trained on classes {', '.join(map(str, record['classes']))} only. "
           f"Eval examples of those classes ({record['num_known']}) and of the others "
           f"({record['num_novel']}), top-1 accuracy and agreement with the compared teacher "
           "(mean ± std over an arm's students).", "",
           "| teacher | known accuracy | novel accuracy |", "|---|---|---|"]
  lines += [f"| {t['index']} | {t['known']['accuracy']:.4f} | {t['novel']['accuracy']:.4f} |"
            for t in record["teachers"]]
  lines += ["", "| arm | known accuracy | novel accuracy | known agreement | novel agreement |",
            "|---|---|---|---|---|"]
  display = {g.name: g.display for g in groups}
  for name, parts in record["arms"].items():
    lines.append(f"| {display.get(name, name)} | {fmt(parts['known']['accuracy'])} | "
                 f"{fmt(parts['novel']['accuracy'])} | {fmt(parts['known']['agreement'])} | "
                 f"{fmt(parts['novel']['agreement'])} |")
  return sections.Section(results=record, markdown="\n".join(lines))
