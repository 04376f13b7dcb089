"""Streams the eval split through every teacher and student replica of a finished study.

`restore` reads each stage's final checkpoint once (a `RestoredStage`: its engines and final
variables); `collect` then takes each fixed-order, padded eval batch (kdjax.data.eval_batches):
the teachers' logits [T, B, C] and the students' logits [R, B, C] come from the stages' jitted
`Engine.predict` (`RestoredStage.logits`), and one jitted call adds the batch to the streaming
states:

  similarity [R + P]  `kdjax.metrics.SimilarityMetrics` of student r vs the teacher it is
                      compared with (`compared_teacher[r]`), then of teacher b vs teacher a for
                      every teacher pair a < b (P = T (T - 1) / 2): the seed-to-seed variation
                      that a student's similarity to its teacher is measured against;
  teachers [T]        `kdjax.metrics.calibration_bins` of each teacher (its accuracy and ECE).

The batch's logits are copied once into preallocated host arrays (the content of
predictions.npz); nothing else holds them, so memory is one copy of all logits plus one batch.
Labels may carry extra axes ([N, L] next-token targets): logits are then [.., N, L, C] and every
metric averages over all N * L positions.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import data as data_lib
from kdjax import metrics as metrics_lib
from kdjax import study as study_lib
from kdjax import train
from kdjax import workdir as workdir_lib

# The ten metrics of docs/design.md, in the order SimilarityMetrics defines them.
METRICS = tuple(metrics_lib.SimilarityMetrics.__annotations__)


@dataclasses.dataclass
class Predictions:
  """Every model's eval-split logits and streamed metrics (host numpy / Python values)."""
  labels: np.ndarray            # [N, ...] int
  teacher_logits: np.ndarray    # [T, N, ..., C] float32
  student_logits: np.ndarray    # [R, N, ..., C] float32
  compared_teacher: np.ndarray  # [R] int: the teacher each student is compared with
  student_metrics: list[dict[str, float]]   # R dicts, METRICS
  teacher_metrics: list[dict[str, float]]   # T dicts: accuracy, ece, num_incorrect
  pair_metrics: list[tuple[int, int, dict[str, float]]]  # (a, b, metrics of b vs a), a < b
  teacher_metadata: dict
  student_metadata: dict


def load_study(workdir: str) -> study_lib.Study:
  """The study recorded in WORKDIR/config.json (never the live command line's config), with
  its data (`kdjax.study.load_data`), not laid out on devices."""
  path = workdir_lib.join(workdir, "config.json")
  if not workdir_lib.exists(path):
    raise FileNotFoundError(f"{path} does not exist: the analysis needs a workdir written by "
                            "`python -m kdjax.main` (its config.json and checkpoints)")
  config = ml_collections.ConfigDict(workdir_lib.read_json(path))
  return study_lib.load_data(study_lib.resolve(config))


def compared_teachers(replicas, num_teachers: int) -> np.ndarray:
  """The teacher index each student is compared with: its own (`Replica.teacher`), or for arms
  without a teacher (teacher -1, e.g. onehot) teacher seed mod T, the one its seed would have."""
  return np.array([r.teacher if r.teacher >= 0 else r.seed % num_teachers for r in replicas],
                  np.int32)


def teacher_pairs(num_teachers: int) -> np.ndarray:
  """[P, 2] int32 (a, b) for all teacher pairs a < b (shape [0, 2] for one teacher)."""
  pairs = list(itertools.combinations(range(num_teachers), 2))
  return np.array(pairs, np.int32).reshape(-1, 2)


def _full_mask(mask, labels):
  """The per-example mask [B] broadcast over the label's extra axes ([B, L])."""
  mask = jnp.reshape(mask, mask.shape + (1,) * (labels.ndim - mask.ndim))
  return jnp.broadcast_to(mask, labels.shape)


def batch_states(student_logits, teacher_logits, compared, pairs, labels, mask):
  """The streaming states of one eval batch: (similarity, teachers).

  similarity: SimilarityMetrics with a leading axis of R + P entries, student r vs teacher
    compared[r] for r < R, then teacher pairs[p, 1] vs teacher pairs[p, 0] (one vmapped
    program for both, so the metrics compile once);
  teachers: `kdjax.metrics.calibration_bins` of every teacher, {count, confidence_sum,
    correct_sum} each [T, 15] (accuracy = sum correct / sum count; ECE from the bins).
  student_logits [R, B, ..., C], teacher_logits [T, B, ..., C], compared [R] int, pairs [P, 2]
  int, labels [B, ...], mask [B] (0 = padding, whose logits may be garbage). jit-safe.
  """
  mask = _full_mask(mask, labels)
  s = jnp.concatenate([student_logits, teacher_logits[pairs[:, 1]]])
  t = jnp.concatenate([teacher_logits[compared], teacher_logits[pairs[:, 0]]])
  similarity = jax.vmap(
      lambda s, t: metrics_lib.SimilarityMetrics.from_batch(s, t, labels, mask))(s, t)
  teachers = jax.vmap(lambda t: metrics_lib.calibration_bins(
      t, labels, num_bins=metrics_lib.ECE_NUM_BINS, mask=mask))(teacher_logits)
  return similarity, teachers


@jax.jit
def _accumulate(states, student_logits, teacher_logits, compared, pairs, labels, mask):
  """`states` plus one batch (merge of the similarity states, sums of the bins)."""
  similarity, teachers = batch_states(student_logits, teacher_logits, compared, pairs, labels,
                                      mask)
  merged = jax.vmap(lambda a, b: a.merge(b))(states[0], similarity)
  return merged, jax.tree.map(jnp.add, states[1], teachers)


def _zeros_like_states(*args):
  """All-zero states (no example seen) with the shapes of one batch's states."""
  shapes = jax.eval_shape(batch_states, *args)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def teacher_quality(bins) -> list[dict[str, float]]:
  """[{accuracy, ece}] per teacher from the accumulated calibration bins [T, 15]."""
  bins = jax.device_get(bins)
  out = []
  for j in range(bins["count"].shape[0]):
    count = float(np.sum(bins["count"][j]))
    out.append({
        "accuracy": float(np.sum(bins["correct_sum"][j])) / count if count else math.nan,
        "ece": float(metrics_lib.ece_from_bins(bins["count"][j], bins["confidence_sum"][j],
                                               bins["correct_sum"][j]))})
  return out


def compute_each(states) -> list[dict[str, float]]:
  """`SimilarityMetrics.compute()` of every entry along the states' leading axis."""
  states = jax.device_get(states)
  size = jax.tree.leaves(states)[0].shape[0]
  return [jax.tree.map(lambda x: x[i], states).compute() for i in range(size)]


def _stage_metadata(workdir: str, stage: str) -> dict:
  """The replicas metadata saved with the stage's checkpoints (WORKDIR/<stage>/replicas.json,
  written beside every checkpoint save)."""
  path = workdir_lib.join(train.stage_dir(workdir, stage), "replicas.json")
  if not workdir_lib.exists(path):
    return {}
  return workdir_lib.read_json(path)


def _check_metadata(metadata: dict, replicas, stage: str) -> None:
  """The checkpoint's replicas must be the config's: same order and identity."""
  rows = metadata.get("replicas")
  if rows is None:
    return
  keys = ("index", "arm", "seed", "teacher", "alpha", "temperature")
  saved = [tuple(row.get(k) for k in keys) for row in rows]
  expected = [tuple(getattr(r, k) for k in keys) for r in replicas]
  if saved != expected:
    raise RuntimeError(f"the {stage} checkpoints hold other replicas than WORKDIR/config.json "
                       "describes; was config.json replaced after training?")


@dataclasses.dataclass(frozen=True)
class RestoredStage:
  """A finished stage's models, restored once per analysis: `engines`, one per group in group
  order (`kdjax.train.engines`); `variables`, {group key: the group's final {"params",
  "batch_stats"}, leading replica axis} (no optimiser state); `metadata`, the replicas.json
  saved with its checkpoints ({} where there is none)."""
  engines: list
  variables: dict
  metadata: dict

  def logits(self, x) -> jax.Array:
    """[R, B, ..., C] logits of every replica of the stage on the batch x, in stage order."""
    parts = [e.predict(self.variables[e.group.key], x) for e in self.engines]
    if len(parts) == 1:
      return parts[0]
    order = np.argsort(np.concatenate([e.group.indices for e in self.engines]))
    return jnp.take(jnp.concatenate(parts), jnp.asarray(order), axis=0)

  def engine_of(self, index: int):
    """The engine of the group that holds replica `index` (stage order)."""
    return next(e for e in self.engines if index in e.group.indices)

  def replica_variables(self, index: int):
    """The final variables of replica `index` (stage order) alone, without the replica axis."""
    group = self.engine_of(index).group
    position = list(group.indices).index(index)
    return jax.tree.map(lambda a: a[position], self.variables[group.key])


def restore(study: study_lib.Study, workdir: str, stage: str) -> RestoredStage:
  """`stage`'s final checkpoint (`kdjax.train.load_final_state`) and replicas metadata, checked
  against the study's replicas: what `collect` and the sections (kdjax.analysis.sections.Context)
  run."""
  stage_engines, states = train.load_final_state(study, workdir, stage)
  metadata = _stage_metadata(workdir, stage)
  _check_metadata(metadata, study.stage(stage).replicas, stage)
  return RestoredStage(engines=stage_engines, metadata=metadata,
                       variables={k: state.variables() for k, state in states.items()})


def collect(study: study_lib.Study, teachers: RestoredStage,
            students: RestoredStage) -> Predictions:
  """Runs every teacher and student (`restore`) on the eval split of `study` (see the module
  docstring)."""
  test = study.data["test"]
  num_examples = len(test["label"])
  eval_arrays = data_lib.to_device(test, students.engines[0].replicated)
  num_teachers, num_students = len(study.teacher.replicas), len(study.students.replicas)
  compared = compared_teachers(study.students.replicas, num_teachers)
  pairs = teacher_pairs(num_teachers)

  labels = np.asarray(test["label"])
  teacher_logits = student_logits = None
  states = None
  for batch in data_lib.eval_batches(eval_arrays, study.dataset, study.run.eval_batch_size):
    t_logits = teachers.logits(batch.x)
    s_logits = students.logits(batch.x)
    args = (s_logits, t_logits, compared, pairs, batch.labels, batch.mask)
    if states is None:
      states = _zeros_like_states(*args)
      teacher_logits = np.empty((num_teachers, num_examples) + t_logits.shape[2:], np.float32)
      student_logits = np.empty((num_students, num_examples) + s_logits.shape[2:], np.float32)
    states = _accumulate(states, *args)
    start, valid = batch.index * batch.mask.shape[0], batch.num_valid
    teacher_logits[:, start:start + valid] = np.asarray(t_logits[:, :valid], np.float32)
    student_logits[:, start:start + valid] = np.asarray(s_logits[:, :valid], np.float32)

  similarity, teacher_bins = states
  computed = compute_each(similarity)
  teacher_metrics = teacher_quality(teacher_bins)
  teacher_predictions = np.argmax(teacher_logits, -1)
  for j, record in enumerate(teacher_metrics):
    record["num_incorrect"] = int(np.sum(teacher_predictions[j] != labels))
  pair_metrics = [(int(a), int(b), m) for (a, b), m in zip(pairs, computed[num_students:])]
  return Predictions(
      labels=labels, teacher_logits=teacher_logits, student_logits=student_logits,
      compared_teacher=compared, student_metrics=computed[:num_students],
      teacher_metrics=teacher_metrics, pair_metrics=pair_metrics,
      teacher_metadata=teachers.metadata, student_metadata=students.metadata)


def save_npz(path: str, study: study_lib.Study, preds: Predictions) -> None:
  """WORKDIR/analysis/predictions.npz with exactly the docs/design.md keys (a local path or gs://)."""
  replicas = study.students.replicas
  arrays = {
      "labels": preds.labels,
      "teacher_logits": preds.teacher_logits,
      "student_logits": preds.student_logits,
      "replica_arm": np.array([r.arm for r in replicas], dtype=str),
      "replica_seed": np.array([r.seed for r in replicas], np.int32),
      "replica_teacher": preds.compared_teacher.astype(np.int32),
      "replica_alpha": np.array([r.alpha for r in replicas], np.float32),
      "replica_temperature": np.array([r.temperature for r in replicas], np.float32),
      "replica_model": np.array([r.model for r in replicas], dtype=str),
      "teacher_model": np.array([t.model for t in study.teacher.replicas], dtype=str),
  }
  buffer = io.BytesIO()  # numpy writes zip archives to local files or file objects only
  np.savez(buffer, **arrays)
  workdir_lib.write_bytes(path, buffer.getvalue())
