"""The analysis stage itself (kdjax.analysis's docstring says what it reads and writes): the
predictions of every model, the metrics and tests, the tables, plots and report, and the
study-specific sections the config lists, written through a staging directory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from kdjax import distributed
from kdjax import stats
from kdjax import workdir as workdir_lib
from kdjax.analysis import cohorts as cohorts_lib
from kdjax.analysis import curves as curves_lib
from kdjax.analysis import known_classes as known_classes_lib
from kdjax.analysis import learned_temperatures as learned_temperatures_lib
from kdjax.analysis import plots as plots_lib
from kdjax.analysis import predictions as predictions_lib
from kdjax.analysis import report as report_lib
from kdjax.analysis import references as references_lib
from kdjax.analysis import sections as sections_lib
from kdjax.analysis import statistics
from kdjax.analysis import tables as tables_lib
from kdjax.analysis import teacher_calibration as teacher_calibration_lib
from kdjax.analysis.predictions import METRICS

# The similarity entries of a teacher-teacher pair (its accuracy/ece are the second teacher's own).
PAIR_METRICS = tuple(m for m in METRICS if m not in ("accuracy", "ece"))


def divergence_reasons(logits: np.ndarray, metadata: dict | None = None) -> list[str]:
  """Per model m of a stage, why it counts as diverged ("" when it does not): logits[m] holds a
  NaN/inf on the eval split, or the stage's checkpoint metadata marks it (`"diverged": true` in
  its replicas row, or a top-level `"diverged"` list of indices or of per-replica booleans)."""
  num = logits.shape[0]
  reasons = [[] for _ in range(num)]
  for m in range(num):
    if not np.isfinite(logits[m]).all():
      reasons[m].append("non-finite logits")
  marked = np.zeros(num, bool)
  metadata = metadata or {}
  for i, row in enumerate((metadata.get("replicas") or [])[:num]):
    marked[i] |= bool(isinstance(row, dict) and row.get("diverged"))
  listed = metadata.get("diverged")
  if isinstance(listed, (list, tuple)):
    if listed and all(isinstance(v, bool) for v in listed):
      marked[:min(num, len(listed))] |= np.array(listed[:num], bool)
    else:
      for i in listed:
        if 0 <= int(i) < num:
          marked[int(i)] = True
  for m in np.flatnonzero(marked):
    reasons[m].append("marked diverged in its checkpoint")
  return ["; ".join(r) for r in reasons]


def diverged_flags(logits: np.ndarray, metadata: dict | None = None) -> np.ndarray:
  """[M] bool: `divergence_reasons` is non-empty."""
  return np.array([bool(r) for r in divergence_reasons(logits, metadata)], bool)


def exclusions(replicas, compared_teacher, student_reasons: list[str],
               teacher_reasons: list[str]) -> tuple[set[int], list[str]]:
  """(excluded student indices, the report's lines): diverged teachers, diverged students and
  the students of diverged teachers."""
  excluded, lines = set(), []
  lines += [f"teacher {j}: diverged ({why})" for j, why in enumerate(teacher_reasons) if why]
  for r in replicas:
    reasons = []
    if student_reasons[r.index]:
      reasons.append(f"diverged ({student_reasons[r.index]})")
    if teacher_reasons[compared_teacher[r.index]]:
      reasons.append(f"its teacher {compared_teacher[r.index]} diverged")
    if reasons:
      excluded.add(r.index)
      lines.append(f"replica {r.index} ({r.arm}, seed {r.seed}, alpha {r.alpha:g}, "
                   f"T {r.temperature:g}): {'; '.join(reasons)}")
  return excluded, lines


def build_results(study, preds: predictions_lib.Predictions, student_diverged: np.ndarray,
                  teacher_diverged: np.ndarray, groups, tests: list[dict],
                  summaries: dict) -> dict:
  """The metrics.json content (Python floats; NaN where undefined, made null when written)."""
  teachers = [{"index": t.index, "seed": t.seed, "diverged": bool(teacher_diverged[t.index]),
               "metrics": preds.teacher_metrics[t.index]}
              for t in study.teacher.replicas]
  replicas = [{"index": r.index, "arm": r.arm, "seed": r.seed,
               "teacher": int(preds.compared_teacher[r.index]), "alpha": r.alpha,
               "temperature": r.temperature, "diverged": bool(student_diverged[r.index]),
               "metrics": {m: preds.student_metrics[r.index][m] for m in METRICS}}
              for r in study.students.replicas]
  results = {
      "teachers": teachers, "replicas": replicas, "arms": summaries, "tests": tests,
      "groups": {g.name: {"arm": g.arm, "hyperparameters": dict(g.hparams),
                          "replicas": list(g.included),
                          "excluded": [i for i in g.replicas if i not in g.included]}
                 for g in groups},
      "protocol": {
          "reference_arm": statistics.reference_arm([g.arm for g in groups]),
          "test": "two-sided Mann-Whitney U (scipy.stats.mannwhitneyu, method='auto', "
                  "continuity correction)",
          "effect_size": "rank-biserial correlation r = 2 U / (n_a n_b) - 1",
          "correction": f"Holm across the {len(METRICS)} metrics of each comparison",
          "significance": statistics.SIGNIFICANCE,
          "interval": f"{statistics.CONFIDENCE:.0%} percentile bootstrap of the mean, "
                      f"{stats.DEFAULT_NUM_RESAMPLES} resamples, seed {statistics.BOOTSTRAP_SEED}",
          "std": "sample standard deviation (ddof = 1)",
      },
  }
  if len(study.teacher.replicas) > 1:
    pairs = [{"a": a, "b": b, "metrics": {m: metrics[m] for m in PAIR_METRICS}}
             for a, b, metrics in preds.pair_metrics]
    valid = [p for p in pairs if not (teacher_diverged[p["a"]] or teacher_diverged[p["b"]])]
    mean = {}
    for m in PAIR_METRICS:
      values = np.array([p["metrics"][m] for p in valid], np.float64)
      values = values[np.isfinite(values)]
      mean[m] = float(np.mean(values)) if values.size else math.nan
    results["teacher_agreement"] = {"pairs": pairs, "mean": mean}
  return results


def strict_json(value):
  """A copy with NaN/inf floats as None and numpy scalars as Python numbers (strict JSON)."""
  if isinstance(value, dict):
    return {str(k): strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value


def fit_to_devices(study, num_devices: int | None = None):
  """`study` laid out on `num_devices` devices (default: all of this host's): the mesh
  (replica, data) with the largest replica axis that divides every group's replica count
  (`kdjax.distributed.fitting_meshes`; data takes the remaining devices and splits each eval
  batch), and the eval batch size rounded up to a multiple of data. Both are run settings
  (`Study.mesh`, `Study.run`): they change how the predictions are computed, not the study."""
  num_devices = jax.device_count() if num_devices is None else int(num_devices)
  sizes = [len(g.replicas) for g in study.groups()]
  replica, data = distributed.fitting_meshes(sizes, num_devices)[0]
  batch = study.run.eval_batch_size
  return dataclasses.replace(
      study, mesh_request={"replica": replica, "data": data}, mesh=(replica, data),
      num_devices=num_devices,
      run=dataclasses.replace(study.run, eval_batch_size=-(-batch // data) * data))


def run(workdir: str, *, command: str | None = None) -> dict | None:
  """Runs the analysis of the study in `workdir` (see the module docstring); returns the
  metrics.json content. `command` is recorded in the report. In a multi-process (multi-host)
  run it does nothing and says so: re-run it on one host."""
  if jax.process_count() > 1:
    # The logits of a multi-host run are sharded over hosts; the analysis gathers them on one.
    print("[analysis] skipped: run it on one host, e.g. on a copy of the workdir, with "
          "--config.stages=analysis", flush=True)
    return None
  start = time.perf_counter()
  # Laid out on the devices here (a study trained on a pod need not divide over this host).
  study = fit_to_devices(predictions_lib.load_study(workdir))
  if jax.device_count() > 1:
    replica, data = study.mesh
    groups = sorted({len(g.replicas) for s in (study.teacher, study.students) for g in s.groups})
    print(f"[analysis] mesh replica={replica} x data={data} on {jax.device_count()} "
          f"{jax.default_backend()} devices (the largest replica axis dividing every group's "
          f"replica count: {', '.join(map(str, groups))}; eval batch "
          f"{study.run.eval_batch_size})", flush=True)
  # Each stage's final checkpoint is restored once; the predictions and the sections run it.
  teachers = predictions_lib.restore(study, workdir, "teacher")
  students = predictions_lib.restore(study, workdir, "students")
  preds = predictions_lib.collect(study, teachers, students)
  student_reasons = divergence_reasons(preds.student_logits, preds.student_metadata)
  teacher_reasons = divergence_reasons(preds.teacher_logits, preds.teacher_metadata)
  student_diverged = np.array([bool(r) for r in student_reasons])
  teacher_diverged = np.array([bool(r) for r in teacher_reasons])
  replicas = study.students.replicas
  excluded, excluded_lines = exclusions(replicas, preds.compared_teacher, student_reasons,
                                        teacher_reasons)
  groups = statistics.make_groups(replicas, excluded)
  summaries = statistics.summarize_groups(groups, preds.student_metrics, METRICS,
                                         clusters=preds.compared_teacher)
  margins = statistics.equivalence_margins(study.config)
  tests = statistics.run_tests(
      groups, preds.student_metrics, METRICS, margins=margins, power=True,
      pair_keys=[(r.seed, int(preds.compared_teacher[r.index])) for r in replicas])
  results = build_results(study, preds, student_diverged, teacher_diverged, groups, tests,
                          summaries)
  # Issue 15: the tests' protocol, null references and the per-class numbers.
  results["protocol"].update(statistics.protocol(margins))
  results["null_reference"] = references_lib.null_references(
      groups, replicas, preds.student_logits, preds.labels, summaries,
      results.get("teacher_agreement"))
  results["classes"] = tables_lib.class_results(
      groups, preds.labels, preds.teacher_logits, preds.student_logits, preds.compared_teacher,
      study.dataset.num_classes)
  saved_curves = curves_lib.read(workdir, replicas)
  if saved_curves is not None:  # similarity over training (the students stage's curves.json)
    results["curves"] = curves_lib.build(saved_curves, groups)
  # Sections of their own where the study has what they describe: the teachers' calibration
  # (val_fraction > 0), mutual learning's cohorts, teachers of a class subset, CTKD's learned
  # temperatures.
  automatic = {}
  calibration = teacher_calibration_lib.read(workdir, study.teacher.replicas)
  if calibration is not None:
    automatic["teacher_calibration"] = teacher_calibration_lib.section(calibration)
  cohorts = cohorts_lib.measure(replicas, preds.student_logits, groups)
  if cohorts is not None:
    automatic["cohorts"] = cohorts_lib.section(cohorts, groups)
  known = known_classes_lib.measure(study, preds, groups)
  if known is not None:  # teachers of a class subset
    automatic["known_classes"] = known_classes_lib.section(known, groups)
  learned = learned_temperatures_lib.measure(study, students, groups)
  if learned is not None:  # CTKD students
    automatic["learned_temperatures"] = learned_temperatures_lib.section(learned, groups)
  results.update({name: section.results for name, section in automatic.items()})

  out_dir = workdir_lib.join(workdir, "analysis")
  with workdir_lib.staged_dir(out_dir) as local_dir:  # published whole when the block ends
    plot_dir = os.path.join(local_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    predictions_lib.save_npz(os.path.join(local_dir, "predictions.npz"), study, preds)
    tables_lib.write_csv(os.path.join(local_dir, "replicas.csv"), *tables_lib.replica_table(
        replicas, groups, preds.compared_teacher, student_diverged, excluded,
        preds.student_metrics, METRICS))
    tables_lib.write_csv(os.path.join(local_dir, "classes.csv"),
                         *tables_lib.class_table(results["classes"]))

    plots_lib.confidence_scatter(os.path.join(plot_dir, "confidence_scatter.png"), groups,
                                 preds.labels, preds.teacher_logits, preds.student_logits,
                                 preds.compared_teacher)
    pair_means = results.get("teacher_agreement", {}).get("mean")
    plots_lib.agreement_split(os.path.join(plot_dir, "agreement_split.png"), groups,
                              preds.student_metrics, summaries, pair_means)
    plots_lib.metric_strips(os.path.join(plot_dir, "metrics.png"), groups, preds.student_metrics,
                            METRICS)
    if "curves" in results:
      curves_lib.plot(os.path.join(plot_dir, "curves.png"), results["curves"], groups)
    context = sections_lib.Context(
        workdir=workdir, study=study, preds=preds, groups=groups,
        student_diverged=student_diverged, teacher_diverged=teacher_diverged, plot_dir=plot_dir,
        teachers=teachers, students=students)
    extra = {name: sections_lib.get(name)(context) for name in study.analyses}
    if extra:
      results["analyses"] = {name: section.results for name, section in extra.items()}
    with open(os.path.join(local_dir, "metrics.json"), "w") as f:
      json.dump(strict_json(results), f, indent=1, allow_nan=False)
      f.write("\n")
    text = report_lib.render(command=command, study=study, results=results, groups=groups,
                             metric_names=METRICS, exclusions=excluded_lines,
                             num_excluded=len(excluded), num_predictions=int(preds.labels.size))
    text += "".join("\n\n" + section.markdown.strip()
                    for section in (*automatic.values(), *extra.values()))
    with open(os.path.join(local_dir, "report.md"), "w") as f:
      f.write(text + "\n")
  print(f"[analysis] {len(replicas)} students ({len(excluded)} excluded), "
        f"{len(study.teacher.replicas)} teacher(s), {study.num_eval} eval examples: wrote "
        f"{out_dir}/ in {time.perf_counter() - start:.1f} s", flush=True)
  return results
