"""Study-specific analyses: extra sections of the report chosen by the config's `analyses` key.

The core analysis (kdjax.analysis.run) measures every student against its teacher for every study.
Some seed papers need more (the weight trajectory of a linear model along eigendirections, the
accuracy of loss-switching schedules, teacher capacity, attention maps); each such analysis is one
function here, registered under a name that configs list in `analyses` (comma-separated):

  section(context) -> Section

It reads what it needs from `context` (the predictions already collected, the study, each stage's
final models, restored once for the whole analysis; the workdir for anything else, such as every
saved step), writes its plots into `context.plot_dir`, and returns its JSON-ready results (they
appear in metrics.json under "analyses"[name]) and a markdown section for report.md. Sections are
deterministic (no timestamps, fixed seeds), so re-running the analysis reproduces both files.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Context:
  """What a section may read. `preds` is kdjax.analysis.predictions.Predictions; `groups` the
  per-arm (and grid point) groups of kdjax.analysis.statistics with excluded replicas removed;
  `teachers` and `students` each stage's final models (kdjax.analysis.predictions.RestoredStage:
  engines and variables; restore nothing else from the final checkpoints); `workdir` the study's
  directory, for what the final models do not hold (kdjax.analysis.eigen reads every saved step)."""
  workdir: str
  study: Any
  preds: Any
  groups: Any
  student_diverged: np.ndarray
  teacher_diverged: np.ndarray
  plot_dir: str
  teachers: Any = None
  students: Any = None


@dataclasses.dataclass(frozen=True)
class Section:
  """One analysis's output: `results` go to metrics.json["analyses"][name] (JSON-ready: dicts,
  lists, Python/numpy numbers, NaN for undefined), `markdown` to report.md (start it with a
  '## ' heading; reference plots as plots/NAME.png)."""
  results: dict
  markdown: str


SECTIONS: dict[str, Callable[[Context], Section]] = {}


def register(name: str):
  """Decorator: registers a section function under `name` (the value configs list)."""

  def wrap(fn):
    if name in SECTIONS:
      raise ValueError(f"analysis section {name!r} is registered twice")
    SECTIONS[name] = fn
    return fn

  return wrap


# Where each section is defined: validation reads the names without importing anything (as
# big_vision finds evaluators by name); the analysis imports a section's module when it runs it.
# tests/test_analysis.py checks this table against the modules' `register` calls.
MODULES = {
    "capacity": "kdjax.analysis.capacity",  # arXiv 2405.13078
    "deviation": "kdjax.analysis.deviation",  # arXiv 2301.12923, Sec. 3
    "kd_switch": "kdjax.analysis.deviation",
    "ensemble_attention": "kdjax.analysis.ensemble",  # arXiv 2405.00739
    "eigen_trajectory": "kdjax.analysis.eigen",  # arXiv 2301.12923, Sec. 4
    "gradient_denoising": "kdjax.analysis.eigen",
    "width_scaling": "kdjax.analysis.width",  # arXiv 2510.12615
}


def available() -> tuple[str, ...]:
  """The section names a config may list in `analyses` (no module is imported)."""
  return tuple(sorted(MODULES))


def get(name: str) -> Callable[[Context], Section]:
  """The section function registered under `name`, importing its module."""
  if name not in MODULES:
    raise ValueError(f"analyses must be a comma-separated list of {', '.join(available())}; "
                     f"got {name!r}")
  importlib.import_module(MODULES[name])
  return SECTIONS[name]
