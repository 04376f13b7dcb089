"""Runs a training stage: the engine's step in a loop, eval, logging and Orbax checkpoints.

A stage resumes from its latest checkpoint, so rerunning the same command after an interruption
continues where it stopped and ends with the parameters of an uninterrupted run. Eval accuracy and
loss of every replica go to TensorBoard event files in WORKDIR/<stage>/ (kdjax.summaries, no
TensorFlow); the console gets a progress line (step, steps/s, ETA) and per-arm means (absl INFO).

Similarity over training (students stage): at every eval, each student's `CURVE_METRICS`
against its own teacher on the eval split (kdjax.metrics.SimilarityMetrics over the same padded
eval batches as the analysis; the teachers' eval logits are computed once per stage, since they
do not change while students train) go to TensorBoard (`replica_003_kd_s3/agreement`, ...,
`arm_kd/agreement`) and to WORKDIR/students/curves.json (`CURVES_FILE`), which the analysis turns
into the `curves` of metrics.json and plots/curves.png. curves.json, not the event files, is the
record: it is rewritten whole (temporary file renamed over it) at every eval, so a kill leaves
the previous complete file, and on resume the points after the restored step are dropped and
recomputed (training is deterministic, so they come back the same); event files, in contrast,
get duplicate steps on resume and are copied to object stores only every 60 s.
"""

from __future__ import annotations

import collections
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kdjax import arms as arms_lib
from kdjax import calibration as calibration_lib
from kdjax import checkpoint as checkpoint_lib
from kdjax import data as data_lib
from kdjax import distributed
from kdjax import losses
from kdjax import metrics as metrics_lib
from kdjax import preemption
from kdjax import study as study_lib
from kdjax import workdir as workdir_lib
from kdjax.engine import Engine, Teachers
from kdjax.study import Study


# The similarity-over-training metrics (SimilarityMetrics names) recorded at every students eval.
CURVE_METRICS = ("accuracy", "agreement", "agree_when_teacher_correct",
                 "agree_when_teacher_incorrect", "js_divergence")
CURVES_FILE = "curves.json"


def stage_dir(workdir: str, stage: str) -> str:
  return workdir_lib.join(workdir, stage)


def checkpoints(workdir: str, stage: str, run: study_lib.RunSettings | None = None, *,
                read_only: bool = False):
  """A stage's checkpoints; `run` gives the save interval and how many to keep (None: read)."""
  return checkpoint_lib.StageCheckpoints(
      workdir_lib.join(stage_dir(workdir, stage), "checkpoints"),
      save_every_steps=None if run is None else run.checkpoint_every_steps,
      keep=None if run is None else run.keep_checkpoints, read_only=read_only)


def check_finished(study: Study, workdir: str, stage: str) -> None:
  """Raises RuntimeError unless `stage` has a checkpoint at its last step in `workdir`."""
  directory = workdir_lib.join(stage_dir(workdir, stage), "checkpoints")
  step = checkpoint_lib.latest_finished_step(directory)
  total = study.stage(stage).total_steps
  if step is None or step < total:
    raise RuntimeError(f"the {stage} stage has not finished in {workdir} (checkpoint step "
                       f"{step} of {total}); run it first with --config.stages={stage}")


def prerequisites(study: Study) -> tuple[str, ...]:
  """The earlier stages whose finished checkpoints the requested stages read."""
  needed = []
  if "students" in study.stages and "teacher" not in study.stages and arms_lib.uses_teacher(
      [r.arm for r in study.students.replicas]):
    needed.append("teacher")
  if "analysis" in study.stages:
    needed += [s for s in ("teacher", "students") if s not in study.stages]
  return tuple(dict.fromkeys(needed))


def engines(study: Study, stage: str) -> list[Engine]:
  """One engine (one stacked state and its programs) per group of the stage, in group order."""
  return [Engine(study, group) for group in study.stage(stage).groups]


def abstract_states(stage_engines) -> dict:
  """The restore target of a stage's checkpoint: {group key: abstract TrainState}."""
  return {e.group.key: e.abstract_state() for e in stage_engines}


def stage_values(stage, stage_engines, per_group) -> np.ndarray:
  """[R] stage-order array from per-group [R_g] arrays (aligned with `stage_engines`)."""
  out = np.zeros(len(stage.replicas), np.float64)
  for engine, values in zip(stage_engines, per_group):
    out[list(engine.group.indices)] = distributed.to_host(values)  # gathered across hosts
  return out


def load_final_state(study: Study, workdir: str, stage: str):
  """(engines, {group key: final TrainState}) of a finished stage, read from its checkpoints."""
  stage_engines = engines(study, stage)
  ckpt = checkpoints(workdir, stage, read_only=True)
  step = ckpt.latest_step()
  total = study.stage(stage).total_steps
  if step is None or step < total:
    raise RuntimeError(f"the {stage} stage has not finished (checkpoint step {step} of {total} "
                       f"in {ckpt.directory}); run it first with --config.stages={stage}")
  states, _ = ckpt.restore(abstract_states(stage_engines), step)
  ckpt.close()
  return stage_engines, states


def _arm_means(stage, values: np.ndarray) -> dict[str, float]:
  groups = collections.defaultdict(list)
  for replica, v in zip(stage.replicas, values):
    groups[replica.arm].append(v)
  return {arm: float(np.mean(v)) for arm, v in groups.items()}


def _replica_tag(replica) -> str:
  return f"replica_{replica.index:03d}_{replica.arm}_s{replica.seed}"


def run_stage(study: Study, stage: str, workdir: str) -> None:
  study = study_lib.load_data(study)  # the data step (kdjax.main has run it already)
  run = study.run
  spec_stage = study.stage(stage)
  stage_engines = engines(study, stage)
  first = stage_engines[0]
  teachers = {}
  teacher_eval = None
  uses_teacher = stage == "students" and arms_lib.uses_teacher(
      [r.arm for r in spec_stage.replicas])
  if stage == "students" and (uses_teacher or _teacher_finished(study, workdir)):
    teacher_list, teacher_states = load_final_state(study, workdir, "teacher")
    teacher_eval = teacher_eval_logits(study, teacher_list, teacher_states)
    teacher_engines = {e.group.key: e for e in teacher_list}
    calibration = None
    if study.num_val:  # the teachers' temperatures on the validation split, recorded
      calibration = teacher_calibration(study, teacher_list, teacher_states, teacher_eval)
      if distributed.is_primary():
        workdir_lib.makedirs(stage_dir(workdir, stage))
        workdir_lib.write_text(workdir_lib.join(stage_dir(workdir, stage), CALIBRATION_FILE),
                               json.dumps(calibration, indent=1) + "\n")
    for engine in stage_engines if uses_teacher else ():
      if engine.group.teacher_group is not None:
        variables = teacher_states[engine.group.teacher_group].variables()
        relations = temperatures = reliability = None
        if "class_relations" in engine.needs:
          relations = class_relations(teacher_engines[engine.group.teacher_group], variables,
                                      study.data["train"], run.eval_batch_size)
        if calibration is not None:
          records = [calibration["teachers"][i] for i in engine.group.teacher_indices]
          temperatures = np.array([r["temperature"] for r in records], np.float32)
          score = "val_" + study.loss_options.ensemble_reliability
          reliability = np.array([r[score] for r in records], np.float32)
        teachers[engine.group.key] = jax.device_put(Teachers(
            variables=variables, class_relations=relations, temperatures=temperatures,
            reliability=reliability), engine.replicated)
    del teacher_states, teacher_engines, teacher_list

  # The splits on every mesh of the stage's groups (one copy per distinct mesh).
  placed = {}
  for engine in stage_engines:
    if engine.mesh not in placed:
      placed[engine.mesh] = {split: data_lib.to_device(study.data[split], engine.replicated)
                             for split in (study.train_split(stage), "test")}
  train_arrays = {e.group.key: placed[e.mesh][study.train_split(stage)] for e in stage_engines}
  eval_arrays = {e.group.key: placed[e.mesh]["test"] for e in stage_engines}
  num_train = study.num_examples(study.train_split(stage))
  total = spec_stage.total_steps
  ckpt = checkpoints(workdir, stage, run)
  metadata = checkpoint_lib.replica_metadata(
      stage, spec_stage.replicas, total_steps=total,
      groups=[{"key": g.key, "model": g.model.name, "model_kwargs": dict(g.model.kwargs),
               "teacher_group": g.teacher_group, "replicas": list(g.indices)}
              for g in spec_stage.groups])
  latest = ckpt.latest_step()
  if latest is not None:  # the newest readable step: damaged newer ones are skipped, with a warning
    latest, restored, _ = ckpt.restore_latest(abstract_states(stage_engines))
    states = {e.group.key: e.place(restored[e.group.key]) for e in stage_engines}
    del restored
    logging.info("%s: resuming from checkpoint step %d of %d", stage, latest, total)
  else:
    states = {e.group.key: e.init_state() for e in stage_engines}
  _note_divergence(spec_stage, stage_engines, states, metadata, latest or 0)

  logdir = stage_dir(workdir, stage)
  # Several processes: every one computes (host reads are collectives), process 0 reports.
  primary = distributed.is_primary()
  tensorboard = workdir_lib.summary_writer(logdir) if primary else None
  curves = None
  if teacher_eval is not None:
    curves = Curves(workdir_lib.join(logdir, CURVES_FILE), spec_stage, primary, latest or 0)
  console = primary  # per-arm eval accuracy as absl INFO lines
  step = int(states[first.group.key].step)
  models = ", ".join(f"{len(e.group.replicas)} of {e.group.model.label}" for e in stage_engines)
  meshes = {f"replica={e.mesh.shape['replica']} x data={e.mesh.shape['data']}"
            for e in stage_engines}
  chosen = "" if study.mesh_request is not None else " (chosen per group: --config.mesh sets one)"
  where = "" if jax.device_count() == 1 else (
      f"; mesh {', '.join(sorted(meshes))}{chosen}" +
      (f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""))
  execution = first.execution if first.execution != "blocked" else \
      f"blocked, {first.replicas_per_block} per block"
  per_call_now = max(e.steps_per_call for e in stage_engines)
  if per_call_now > 1:
    execution += f", {per_call_now} steps per call"
  if first.compute_dtype != "float32":
    execution += f", {first.compute_dtype} compute"
  if primary:
    print(f"[{stage}] {len(spec_stage.replicas)} replicas ({models}; {execution}, "
          f"{jax.device_count()} {jax.default_backend()} device(s)), {total} steps{where}",
          flush=True)
  epoch, orders = -1, {}
  start_time, start_step = time.perf_counter(), step
  last_metrics = {}
  per_call = max(e.steps_per_call for e in stage_engines)
  every = [run.log_every_steps, run.eval_every_steps, run.checkpoint_every_steps]
  with preemption.StopRequests() as stop:
    while step < total:
      if step // spec_stage.steps_per_epoch != epoch:
        for engine in stage_engines:
          epoch, orders[engine.group.key] = engine.order_for_step(states[engine.group.key],
                                                                  num_train)
      n = steps_this_call(step, per_call, total, spec_stage.steps_per_epoch, every)
      for engine in stage_engines:
        key = engine.group.key
        states[key], last_metrics[key] = engine.train_steps(
            states[key], orders[key], train_arrays[key], teachers.get(key), n)
      step += n
      stopping = stop.poll(step)  # the same answer in every process (kdjax.preemption)
      if any(step % k == 0 for k in every) \
          or step == total or stopping:
        _note_divergence(spec_stage, stage_engines, states, metadata, step)
      if step % run.log_every_steps == 0 or step == total:
        _progress(stage, step, total, start_time, start_step, _stage_metrics(
            spec_stage, stage_engines, last_metrics))
      if step % run.eval_every_steps == 0 or step == total:
        _evaluate(spec_stage, stage_engines, states, eval_arrays, step, tensorboard, console,
                  _stage_metrics(spec_stage, stage_engines, last_metrics), teacher_eval, curves)
      if step % run.checkpoint_every_steps == 0 or step == total:
        ckpt.save(step, states, metadata, force=step == total)
      if stopping:  # SIGTERM/SIGINT: save this step and leave
        ckpt.save(step, states, metadata, force=True)
        ckpt.wait()
        if tensorboard is not None:
          tensorboard.flush()
        raise preemption.Preempted(stop.signum, stage, step, total)
  if latest is not None and latest >= total and primary:
    print(f"[{stage}] already finished (checkpoint step {latest})", flush=True)
  ckpt.wait()
  ckpt.close()
  if tensorboard is not None:
    tensorboard.flush()
    tensorboard.close()


def steps_this_call(step: int, per_call: int, total: int, steps_per_epoch: int,
                    every: list[int]) -> int:
  """Steps the stage loop takes from `step` in one call: `per_call` (K) when no point where the
  loop must stop inside the call lies strictly between step and step + K (an epoch's end, where
  the order changes; a multiple of any of `every`, the log/eval/checkpoint intervals; the
  stage's end), else 1. So a stage compiles at most two step programs (K steps and one step),
  and evaluates, logs and saves at the same steps whatever K is; a stop request (preemption) is
  polled after each call, so it is answered within K steps."""
  if per_call <= 1:
    return 1
  end = min([total, (step // steps_per_epoch + 1) * steps_per_epoch] +
            [(step // e + 1) * e for e in every])
  return per_call if step + per_call <= end else 1


def class_relations(engine: Engine, variables, train: dict, batch_size: int) -> np.ndarray:
  """[T, C, C]: `losses.class_relation_matrix` (T = 1) of each replica of `engine` (a teacher
  group) from its logits on the un-augmented train split `train` (host arrays), the global class
  relations that the fgcr arm fuses in (arXiv 2405.13078). Computed once, before the students
  train; every example counts once (padded eval batches, padding cut off)."""
  logits = split_logits(engine, variables, train, batch_size)
  labels = np.asarray(train["label"])
  return np.stack([np.asarray(losses.class_relation_matrix(
      logits[j], labels, engine.dataset.num_classes)) for j in range(logits.shape[0])])


def split_logits(engine: Engine, variables, split: dict, batch_size: int) -> np.ndarray:
  """[R, N, ...]: every replica of `engine` on a whole split `split` (host arrays), in example
  order, un-augmented (padded eval batches, the padding cut off)."""
  arrays = data_lib.to_device(split, engine.replicated)
  parts = [distributed.to_host(engine.predict(variables, batch.x))
           for batch in data_lib.eval_batches(arrays, engine.dataset, batch_size)]
  return np.concatenate(parts, axis=1)[:, :len(split["label"])]  # slots in example order


CALIBRATION_FILE = "calibration.json"


def teacher_calibration(study: Study, teacher_engines, teacher_states,
                        teacher_eval: "TeacherEval") -> dict:
  """Post-hoc temperature scaling of every teacher on the validation split (Guo et al. 2017;
  kdjax.calibration.fit_temperature): {"temperatures": [T], "teachers": [{"index",
  "temperature", "val_accuracy", "val_confidence", "val": report, "test": report}]}, each
  report the ECE (15 bins) and NLL before and after scaling
  (`kdjax.calibration.calibration_report`); `val_confidence` is the mean top probability on the
  validation split after scaling. The test split only reports: the temperature never sees
  it; its logits are `teacher_eval`'s (the eval batches in example order, padding cut off)."""
  logits = {"val": np.empty((len(study.teacher.replicas), study.num_val) +
                            teacher_eval.logits[0].shape[2:], teacher_eval.logits[0].dtype),
            "test": np.concatenate(teacher_eval.logits, axis=1)[:, :study.num_eval]}
  for engine in teacher_engines:
    logits["val"][list(engine.group.indices)] = split_logits(
        engine, teacher_states[engine.group.key].variables(), study.data["val"],
        study.run.eval_batch_size)
  records = []
  val_labels = np.asarray(study.data["val"]["label"])
  for t in study.teacher.replicas:
    val = logits["val"][t.index]
    temperature = calibration_lib.fit_temperature(val, val_labels)
    scaled = jax.nn.softmax(jnp.asarray(val, jnp.float32) / temperature, axis=-1)
    records.append({
        "index": t.index, "temperature": temperature,
        # The reliability scores of reliability-weighted ensembles (arms_lib.TEACHER_SIGNALS).
        "val_accuracy": float(np.mean(np.argmax(val, -1) == val_labels)),
        "val_confidence": float(jnp.mean(jnp.max(scaled, -1))),
        **{split: calibration_lib.calibration_report(logits[split][t.index],
                                                     study.data[split]["label"], temperature)
           for split in ("val", "test")}})
  return {"temperatures": [r["temperature"] for r in records], "teachers": records,
          "num_val": study.num_val, "val_fraction": study.val_fraction}


def _note_divergence(stage, stage_engines, states, metadata: dict, step: int) -> None:
  """Marks replicas that diverged since the last call in the checkpoint metadata (their row's
  "diverged", read by the analysis) and warns once for each: it is frozen, the others go on."""
  flags = stage_values(stage, stage_engines,
                       [states[e.group.key].diverged for e in stage_engines]).astype(bool)
  for i in np.flatnonzero(flags):
    row = metadata["replicas"][i]
    if row.get("diverged"):
      continue
    row["diverged"] = True
    logging.warning("%s: replica %d (%s, seed %d, model %s, alpha %g, T %g, learning rate %g) "
                    "diverged (NaN/inf loss, gradient or parameters) by step %d; it is frozen at "
                    "its last finite parameters and marked diverged, the other replicas go on",
                    stage.name, i, row["arm"], row["seed"], row["model"], row["alpha"],
                    row["temperature"], row["learning_rate"], step)


def _stage_metrics(stage, stage_engines, per_group: dict) -> dict[str, np.ndarray]:
  """The last step's train metrics of every replica, in stage order."""
  return {name: stage_values(stage, stage_engines,
                             [per_group[e.group.key][name] for e in stage_engines])
          for name in ("loss", "accuracy")}


def _progress(stage, step, total, start_time, start_step, metrics) -> None:
  if not distributed.is_primary():
    return
  elapsed = time.perf_counter() - start_time
  rate = (step - start_step) / max(elapsed, 1e-9)
  eta = (total - step) / max(rate, 1e-9)
  loss = float(np.mean(np.asarray(metrics["loss"])))
  acc = float(np.mean(np.asarray(metrics["accuracy"])))
  print(f"[{stage}] step {step}/{total} ({100 * step / total:.0f}%)  train loss {loss:.4f}  "
        f"train acc {acc:.3f}  {rate:.1f} steps/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
        flush=True)


def _evaluate(stage, stage_engines, states, eval_arrays, step, tensorboard, console,
              train_metrics, teacher_eval=None, curves=None) -> None:
  """Eval of every replica (`eval_arrays`: {group key: the eval split on its mesh}), logged; with
  `teacher_eval` (students stage) also each student's CURVE_METRICS against its teacher."""
  batch_size = stage_engines[0].study.run.eval_batch_size
  per_group = [_evaluate_group(e, states[e.group.key].variables(), eval_arrays[e.group.key],
                               batch_size, teacher_eval) for e in stage_engines]
  results = {name: stage_values(stage, stage_engines, [r[name] for r in per_group])
             for name in ("accuracy", "loss")}
  similarity = None
  if teacher_eval is not None:
    similarity = {m: np.zeros(len(stage.replicas)) for m in CURVE_METRICS}
    for engine, r in zip(stage_engines, per_group):
      for m in CURVE_METRICS:
        similarity[m][list(engine.group.indices)] = r["curves"][m]
    if curves is not None:
      curves.record(step, similarity)
  arm_acc = _arm_means(stage, results["accuracy"])
  if console:  # "[STEP] STAGE/eval_accuracy/ARM=0.853088, ..." by arm, as clu's LoggingWriter
    logging.info("[%d] %s", step, ", ".join(f"{stage.name}/eval_accuracy/{arm}={v:.6g}"
                                            for arm, v in sorted(arm_acc.items())))
  if tensorboard is None:
    return
  scalars = {}
  train_loss = train_metrics["loss"]
  for i, replica in enumerate(stage.replicas):
    tag = _replica_tag(replica)
    scalars[f"{tag}/eval_accuracy"] = float(results["accuracy"][i])
    scalars[f"{tag}/eval_loss"] = float(results["loss"][i])
    scalars[f"{tag}/train_loss"] = float(train_loss[i])
    for m in CURVE_METRICS[1:] if similarity is not None else ():  # accuracy: eval_accuracy
      scalars[f"{tag}/{m}"] = float(similarity[m][i])
  for arm, value in arm_acc.items():
    scalars[f"arm_{arm}/eval_accuracy"] = value
  for arm, value in _arm_means(stage, results["loss"]).items():
    scalars[f"arm_{arm}/eval_loss"] = value
  for m in CURVE_METRICS[1:] if similarity is not None else ():
    for arm, value in _arm_nanmeans(stage, similarity[m]).items():
      scalars[f"arm_{arm}/{m}"] = value
  tensorboard.write_scalars(step, scalars)


def _arm_nanmeans(stage, values: np.ndarray) -> dict[str, float]:
  """Per-arm means over the replicas where the value is defined (NaN: no teacher error)."""
  groups = collections.defaultdict(list)
  for replica, v in zip(stage.replicas, values):
    groups[replica.arm].append(v)
  return {arm: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
          for arm, v in groups.items()}


def _evaluate_group(engine: Engine, variables, arrays, batch_size: int, teacher_eval) -> dict:
  """`Engine.evaluate`'s per-replica accuracy and cross-entropy, plus, with `teacher_eval`,
  "curves": {metric: [R_g]} of CURVE_METRICS of each replica against its teacher, from the same
  logits (one forward pass per eval batch)."""
  if teacher_eval is None:
    return engine.evaluate(variables, arrays, batch_size)
  compared = teacher_eval.compared[list(engine.group.indices)]
  states = []

  def add_batch(index, logits, mask):
    update = _curve_states(distributed.to_host(logits), teacher_eval.logits[index][compared],
                           teacher_eval.labels[index], mask)
    states[:] = [update if not states else _merge_states(states[0], update)]

  out = engine.evaluate(variables, arrays, batch_size, on_logits=add_batch)
  out["curves"] = {m: np.asarray(v, np.float64) for m, v in _compute_states(states[0]).items()}
  return out


@jax.jit
def _curve_states(student_logits, teacher_logits, labels, mask):
  """{metric: SimilarityMetrics state with a leading replica axis} of one eval batch, for
  CURVE_METRICS (the other metrics' computations are dead code and compiled away).
  student_logits, teacher_logits [R, B, ..., C]; labels [B, ...]; mask [B]."""
  mask = jnp.broadcast_to(jnp.reshape(mask, mask.shape + (1,) * (labels.ndim - mask.ndim)),
                          labels.shape)
  states = jax.vmap(lambda s, t: metrics_lib.SimilarityMetrics.from_batch(s, t, labels, mask))(
      student_logits, teacher_logits)
  return {m: getattr(states, m) for m in CURVE_METRICS}


@jax.jit
def _merge_states(a, b):
  return {m: a[m].merge(b[m]) for m in CURVE_METRICS}


@jax.jit
def _compute_states(state):
  return {m: state[m].compute() for m in CURVE_METRICS}


class TeacherEval:
  """The teachers' logits on the eval split, computed once per students stage: `logits`, one
  host array [T, B, ..., C] per padded eval batch (`data.eval_indices` at eval_batch_size);
  `labels` per batch; `compared` [R], the teacher each student is compared with (its own; for
  arms without one, teacher seed mod T, as the analysis)."""

  def __init__(self, logits, labels, compared):
    self.logits, self.labels, self.compared = logits, labels, compared


def _teacher_finished(study: Study, workdir: str) -> bool:
  directory = workdir_lib.join(stage_dir(workdir, "teacher"), "checkpoints")
  step = checkpoint_lib.latest_finished_step(directory)
  return step is not None and step >= study.teacher.total_steps


def teacher_eval_logits(study: Study, teacher_engines, teacher_states) -> TeacherEval:
  """Every teacher's logits on the eval split, per padded eval batch (see TeacherEval)."""
  test = study.data["test"]
  num_teachers = len(study.teacher.replicas)
  streams = {}  # the split streamed once per mesh the teachers are laid out on
  for engine in teacher_engines:
    if engine.mesh not in streams:
      streams[engine.mesh] = data_lib.eval_batches(
          data_lib.to_device(test, engine.replicated), study.dataset, study.run.eval_batch_size)
  logits, labels = [], []
  for batches in zip(*streams.values()):
    batch = dict(zip(streams, batches))
    out = None
    for engine in teacher_engines:
      part = distributed.to_host(engine.predict(teacher_states[engine.group.key].variables(),
                                                batch[engine.mesh].x))
      if out is None:
        out = np.empty((num_teachers,) + part.shape[1:], part.dtype)
      out[list(engine.group.indices)] = part
    logits.append(out)
    labels.append(np.asarray(test["label"])[batches[0].indices])
  replicas = study.students.replicas
  compared = np.array([r.teacher if r.teacher >= 0 else r.seed % num_teachers for r in replicas],
                      np.int32)
  return TeacherEval(logits, labels, compared)


class Curves:
  """WORKDIR/students/curves.json: {"metrics": CURVE_METRICS, "replicas": [{index, arm, seed}],
  "points": [{"step": S, METRIC: [R values, null where undefined]}]}, rewritten whole at every
  eval by process 0; on resume the points after the restored step are dropped."""

  def __init__(self, path: str, stage, primary: bool, resumed_step: int):
    self.path, self.primary = path, primary
    self.replicas = [{"index": r.index, "arm": r.arm, "seed": r.seed} for r in stage.replicas]
    self.points = []
    if primary and resumed_step > 0 and workdir_lib.exists(path):
      saved = workdir_lib.read_json(path)
      if saved.get("replicas") == self.replicas and saved.get("metrics") == list(CURVE_METRICS):
        self.points = [p for p in saved.get("points", []) if p["step"] <= resumed_step]

  def record(self, step: int, values: dict) -> None:
    if not self.primary:
      return
    point = {"step": int(step)}
    for m in CURVE_METRICS:
      point[m] = [float(v) if math.isfinite(v) else None for v in values[m]]
    self.points = [p for p in self.points if p["step"] < step] + [point]
    workdir_lib.write_text(self.path, json.dumps(
        {"metrics": list(CURVE_METRICS), "replicas": self.replicas, "points": self.points},
        allow_nan=False))
