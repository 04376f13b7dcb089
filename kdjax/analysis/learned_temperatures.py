"""CTKD's learned temperatures: where each `ctkd` student's adversarial temperature ended.

A `ctkd` student trains a raw parameter theta beside its model's (kdjax.engine,
`LEARNED_TEMPERATURE`) and distils at T = t_start + t_range * sigmoid(theta) (kdjax.losses.
ctkd_temperature; `arm_options.ctkd_t_start`, `ctkd_t_range`). This section reads theta from
each student's final checkpoint:

  learned_temperatures = {"t_start", "t_range",
                          "replicas": [{"index", "theta", "temperature"}],
                          "arms": {entry: {"mean", "std", "n"}}}   (of the final temperatures)
"""

from __future__ import annotations

import numpy as np

from kdjax import engine as engine_lib
from kdjax import stats
from kdjax.analysis import sections


def measure(study, students, groups) -> dict | None:
  """metrics.json's `learned_temperatures`, or None without ctkd students."""
  ctkd = [r for r in study.students.replicas if r.arm == "ctkd"]
  if not ctkd:
    return None
  options = study.loss_options
  rows = []
  for r in ctkd:
    theta = float(np.asarray(students.replica_variables(r.index)["params"][
        engine_lib.LEARNED_TEMPERATURE]))
    rows.append({"index": r.index, "theta": theta, "temperature": float(
        options.ctkd_t_start + options.ctkd_t_range / (1.0 + np.exp(-theta)))})
  by_index = {row["index"]: row for row in rows}
  arms = {}
  for g in groups:
    values = [by_index[i]["temperature"] for i in g.included if i in by_index]
    if values:
      mean, std = stats.mean_std(values)
      arms[g.name] = {"mean": float(mean), "std": float(std), "n": len(values)}
  return {"t_start": options.ctkd_t_start, "t_range": options.ctkd_t_range, "replicas": rows,
          "arms": arms}


def section(record: dict, groups) -> sections.Section:
  """The report's "CTKD: learned temperatures" table."""
  display = {g.name: g.display for g in groups}
  lines = ["## CTKD: learned temperatures", "",
           f"Each ctkd student's final temperature T = {record['t_start']:g} + "
           f"{record['t_range']:g} sigmoid(theta), theta trained against the distillation "
           "loss through gradient reversal (Li et al. 2023); mean ± std over an arm's students.",
           "", "| arm | students | final T |", "|---|---|---|"]
  for name, entry in record["arms"].items():
    spread = f" ± {entry['std']:.3f}" if np.isfinite(entry["std"]) else ""
    lines.append(f"| {display.get(name, name)} | {entry['n']} | {entry['mean']:.3f}{spread} |")
  return sections.Section(results=record, markdown="\n".join(lines))
