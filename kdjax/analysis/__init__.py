"""The analysis stage: from a study's checkpoints to metrics, statistics, a report and plots.

  python -m kdjax.main --config=configs/default.py --workdir=DIR --config.stages=analysis
  kdjax.analysis.run(DIR)                      # the same from Python

reads only WORKDIR/config.json and the teacher/student Orbax checkpoints (so it also runs on a
workdir copied from elsewhere, or in place on gs://), restoring each stage's final checkpoint
once (kdjax.analysis.predictions.restore) for the predictions and the sections, and writes
WORKDIR/analysis/:

  predictions.npz  labels [N]; teacher_logits [T, N, C]; student_logits [R, N, C]; replica_arm,
                   replica_seed, replica_teacher (the teacher it is compared with),
                   replica_alpha, replica_temperature [R]   (label axes beyond N carry over)
  metrics.json     {"teachers", "replicas", "arms", "tests"} as docs/design.md specifies, plus
                   "groups" (which replicas each arm entry summarises, which were excluded),
                   "protocol" (the test, correction and interval used) and, with several
                   teachers, "teacher_agreement" (pairwise teacher-teacher similarity), and
                   "analyses": the results of the study-specific sections the config lists in
                   `analyses` (kdjax.analysis.sections), which also add to report.md. Strict
                   JSON: undefined values (a mean over no example, std of one value) are null.
  report.md        the study, teacher accuracy, a table per arm, the tests with verdicts, the
                   excluded replicas and the plots
  plots/           confidence_scatter.png, agreement_split.png, metrics.png, and curves.png
                   where the students stage recorded similarity over training
                   (kdjax.analysis.curves; metrics.json "curves")
  replicas.csv, classes.csv  per-replica and per-class tables (kdjax.analysis.tables)

Per student, the metrics of docs/design.md against its own teacher (kdjax.metrics.SimilarityMetrics,
streamed over padded eval batches); per arm, kdjax.stats summaries; the reference arm (kd) vs
every other arm, two-sided Mann-Whitney U per metric with Holm correction across the metrics of
each comparison (arXiv 2510.12615; see kdjax.analysis.statistics). Re-running writes the same
metrics.json and report.md byte for byte and the same predictions.npz arrays.

The devices: the mesh a study trained with describes the training hosts (config.json leaves it
out); the analysis lays the models out on the devices of the host it runs on
(`fit_to_devices`), whatever their number. The outputs are written into a staging directory and
moved (locally: renamed, file by file) or copied (object store) into WORKDIR/analysis/ at the end
(kdjax.workdir.staged_dir): a full disk or a signal while writing never leaves a half-written
metrics.json or report.md in place, and a rerun writes them all again.
"""

from __future__ import annotations

# Importing kdjax.analysis is light (its modules load matplotlib, the engine and the training
# loop): kdjax.study reads the section names (kdjax.analysis.sections) while validating a
# config, and the stage is imported when it runs.
_STAGE_NAMES = ("PAIR_METRICS", "build_results", "divergence_reasons", "diverged_flags",
                "exclusions", "fit_to_devices", "strict_json")


def run(workdir: str, *, command: str | None = None) -> dict | None:
  """Runs the analysis of the study in `workdir` (kdjax.analysis.stage.run)."""
  from kdjax.analysis import stage  # pylint: disable=g-import-not-at-top
  return stage.run(workdir, command=command)


def __getattr__(name: str):
  """The stage's helpers (`_STAGE_NAMES`), imported on first use."""
  if name in _STAGE_NAMES:
    from kdjax.analysis import stage  # pylint: disable=g-import-not-at-top
    return getattr(stage, name)
  raise AttributeError(f"module 'kdjax.analysis' has no attribute {name!r}")
