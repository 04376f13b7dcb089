"""The teachers' post-hoc calibration (students/calibration.json) in metrics.json and the report.

With `val_fraction` > 0 the students stage fits each teacher's temperature on the validation
split (Guo et al. 2017; kdjax.train.teacher_calibration) and records its ECE and NLL before and
after scaling on the validation and the eval split. This module reads that record back:

  teacher_calibration = {"source": "students/calibration.json", "val_fraction", "num_val",
                         "teachers": [{"index", "temperature", "val": {...}, "test": {...}}]}

each split's {"ece_before", "ece_after", "nll_before", "nll_after"} as recorded (ECE with 15
equal-width bins, NLL in nats per example).
"""

from __future__ import annotations

from kdjax import train
from kdjax import workdir as workdir_lib
from kdjax.analysis import sections

SOURCE = f"students/{train.CALIBRATION_FILE}"


def read(workdir: str, teachers) -> dict | None:
  """metrics.json's `teacher_calibration`, or None without a record of these teachers."""
  path = workdir_lib.join(workdir, SOURCE)
  if not workdir_lib.exists(path):
    return None
  saved = workdir_lib.read_json(path)
  if [t["index"] for t in saved.get("teachers", [])] != [t.index for t in teachers]:
    return None
  return {"source": SOURCE, "val_fraction": saved["val_fraction"], "num_val": saved["num_val"],
          "teachers": saved["teachers"]}


def section(record: dict) -> sections.Section:
  """The report's "Teacher calibration" table from `read`'s record."""
  lines = ["## Teacher calibration", "",
           f"Post-hoc temperature scaling (Guo et al. 2017) of each teacher, fitted on the "
           f"validation split ({record['num_val']} training examples held out, val_fraction "
           f"{record['val_fraction']:g}; `kdjax/calibration.py`); the `kd_calibrated` arm learns "
           "from the scaled teacher. ECE (15 bins) and NLL (nats) before -> after, on the "
           "validation split and on the eval split, which the fit never sees.", "",
           "| teacher | temperature | val ECE | val NLL | eval ECE | eval NLL |",
           "|---|---|---|---|---|---|"]
  for t in record["teachers"]:
    cells = [f"{t[s][m + '_before']:.4f} -> {t[s][m + '_after']:.4f}"
             for s in ("val", "test") for m in ("ece", "nll")]
    lines.append(f"| {t['index']} | {t['temperature']:.3f} | " + " | ".join(cells) + " |")
  return sections.Section(results=record, markdown="\n".join(lines))
