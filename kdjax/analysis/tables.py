"""analysis/replicas.csv and analysis/classes.csv: the study's numbers as flat tables (issue 15).

  replicas.csv  one row per student replica: its identity (every field of kdjax.replicas.Replica,
                the group it is summarised in, the teacher it is compared with), whether it
                diverged or was excluded, and its ten metrics against its teacher (the numbers
                of metrics.json "replicas");
  classes.csv   one row per (class, group): the class's eval examples, the group's students, their
                mean accuracy and mean agreement with their teachers on the examples of that
                class, and their teachers' mean accuracy there (metrics.json "classes").

Comma-separated, one header line, written with the csv module; floats as Python's repr (they
read back to the same doubles), undefined values (NaN, None) as empty fields, booleans as
true/false, lists (a replica's ensemble) joined by '+'. Labels with extra axes ([N, L] token
targets) count every position as an example of its label's class.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from typing import Sequence

import numpy as np

from kdjax.replicas import Replica

IDENTITY_FIELDS = tuple(f.name for f in dataclasses.fields(Replica))
CLASS_COLUMNS = ("class", "group", "arm", "examples", "students", "accuracy", "agreement",
                 "teacher_accuracy")


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, (bool, np.bool_)):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return "+".join(str(v) for v in value)
  if isinstance(value, (float, np.floating)):
    return repr(float(value)) if math.isfinite(value) else ""
  if isinstance(value, np.integer):
    return str(int(value))
  return str(value)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
  """`rows` under `header` to the local file `path` (cells as the module docstring says)."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([_cell(v) for v in row] for row in rows)


def replica_table(replicas, groups, compared_teacher, student_diverged, excluded: set[int],
                  student_metrics: Sequence[dict], metric_names: Sequence[str]):
  """(header, rows) of replicas.csv."""
  group_of = {i: g.name for g in groups for i in g.replicas}
  # The cohort column only where the study has cohorts (mutual learning), as Replica.to_json.
  fields = [f for f in IDENTITY_FIELDS if f != "cohort" or any(r.cohort for r in replicas)]
  header = (fields + ["group", "compared_teacher", "diverged", "excluded"]
            + list(metric_names))
  rows = []
  for r in replicas:
    identity = dataclasses.asdict(r)
    rows.append([identity[f] for f in fields]
                + [group_of.get(r.index, ""), int(compared_teacher[r.index]),
                   bool(student_diverged[r.index]), r.index in excluded]
                + [student_metrics[r.index][m] for m in metric_names])
  return header, rows


def class_results(groups, labels: np.ndarray, teacher_logits: np.ndarray,
                  student_logits: np.ndarray, compared_teacher, num_classes: int) -> dict:
  """metrics.json "classes": {"examples": [C], "groups": {group: {"students", "accuracy" [C],
  "agreement" [C], "teacher_accuracy" [C]}}}; per class c, the mean over the group's included
  students of (student correct on the examples of class c), (student's top-1 = its teacher's
  top-1 there) and (its teacher correct there). NaN for a class without examples."""
  y = np.asarray(labels).reshape(-1)
  examples = np.bincount(y, minlength=num_classes).astype(np.int64)

  def per_class(hits):  # [N] bool -> [C] mean over the examples of each class
    sums = np.bincount(y, weights=hits.astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(examples > 0, sums / np.maximum(examples, 1), np.nan)

  teacher_pred = np.argmax(teacher_logits, -1).reshape(teacher_logits.shape[0], -1)
  out = {"examples": examples.tolist(), "groups": {}}
  for g in groups:
    acc, agree, teacher_acc = [], [], []
    for i in g.included:
      pred = np.argmax(student_logits[i], -1).reshape(-1)
      t = teacher_pred[int(compared_teacher[i])]
      acc.append(per_class(pred == y))
      agree.append(per_class(pred == t))
      teacher_acc.append(per_class(t == y))
    nan = [math.nan] * num_classes
    mean = lambda rows: np.mean(rows, axis=0).tolist() if rows else nan  # noqa: E731
    out["groups"][g.name] = {"arm": g.arm, "students": len(g.included), "accuracy": mean(acc),
                             "agreement": mean(agree), "teacher_accuracy": mean(teacher_acc)}
  return out


def class_table(classes: dict):
  """(header, rows) of classes.csv from `class_results`."""
  rows = []
  for c, count in enumerate(classes["examples"]):
    for name, g in classes["groups"].items():
      rows.append([c, name, g["arm"], count, g["students"], g["accuracy"][c], g["agreement"][c],
                   g["teacher_accuracy"][c]])
  return list(CLASS_COLUMNS), rows
