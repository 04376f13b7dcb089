"""The replica engine: every replica of a group in one train state and one jitted step.

A stage's replicas are split into groups by model (kdjax.study.Group: one architecture, and for
students one teacher model); each group is one Engine, and kdjax.train steps a stage's engines
together. Within a group everything below holds.

Every leaf of `TrainState` except `step` has a leading replica axis R. One call of `train_step`
advances all replicas by one step: each replica reads its own batch (its own epoch order and
augmentation key, kdjax.data.pipeline), computes its own teacher signal on that same augmented
batch (kdjax.arms.TEACHER_SIGNALS: its teacher's logits, possibly corrected or calibrated, its
ensemble's members' logits, its cohort's logits, or RCD noise), its arm's loss with its own
hyperparameters (kdjax.arms) and its own optimiser update with its own learning rate
(kdjax.optim). Arms are per-replica data, so different arms share the program.

How the replica axis is executed is chosen per backend (`config.execution`), because the fast
path differs (README, "What a study costs"). In every case a step first builds all replicas'
batches in one program (`kdjax.data.train_batch`), then runs *block programs*: each slices rows
[offset, offset + size) of the stacked state, updates them, and writes them back in place (the
state is donated), so XLA compiles one block of rows, not the whole replica axis:
  * 'vmap'     (GPU/TPU default): one block of every replica; each run of consecutive replicas
               of one arm is `jax.vmap`ped on its own and computes only its arm's teacher signal
               and loss (a SIDDO replica runs no teacher). Where a row's arm differs between
               replica shards, that row computes every kind present and selects its own by code.
  * 'blocked'  (CPU default): blocks of `replicas_per_block` rows (0 = `block_size` chooses by
               the stage's length), each row unrolled with its arm static, e.g. a SIDDO row never
               runs a teacher. One program per distinct block pattern (arms of its rows), called
               for every block of that pattern: compile time depends on the kinds of replica,
               not their number. XLA:CPU turns a vmapped convolution into a grouped convolution
               that runs 4.4x slower than separate ones, so rows are unrolled, not vmapped.
  * 'unrolled' one block of every replica, unrolled: the fastest steps on CPU, but its compile
               time grows with the replica count.
The devices of all processes form a 2-D mesh ('replica', 'data') per group (`make_mesh`;
`config.mesh`, or by default the one that fits the group: `kdjax.study.auto_mesh`). Each row of
the mesh runs its share of the replicas (`jax.shard_map`), block by block at the same offsets. Within a row each replica's
batch is split over 'data': a shard's loss is its part of the whole batch's masked mean
(sum over its examples / count over all shards), so summing loss and gradients over 'data' gives
the whole batch's; BatchNorm averages its statistics over 'data' (the transpose of that average
carries the cross-shard gradient terms), and RCD noise is drawn for the whole batch and sliced.
The results therefore equal a single device's up to the order of reductions; only dropout draws
differ (each shard draws its own, with its index folded into the key).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax import arms as arms_lib
from kdjax import compilation
from kdjax import data as data_lib
from kdjax import distributed
from kdjax import losses
from kdjax import models as models_lib
from kdjax import optim
from kdjax import replicas as replicas_lib
from kdjax import teacher_signals
from kdjax.models import _common as models_common
from kdjax.study import MESH_AXES, Group, Study

TRAIN_STREAMS = ("data", "augment", "rcd", "dropout")
# The parameter (beside the model's) of loss kinds that learn a temperature (CTKD).
LEARNED_TEMPERATURE = "ctkd_temperature"


@flax.struct.dataclass
class TrainState:
  """The whole training state of a stage; all leaves but `step` have a leading replica axis.

  `keys` holds each replica's raw PRNG keys per named stream; with `step` they determine the
  data order, augmentation, RCD noise and dropout, so a restored state continues exactly.
  `diverged` [R] marks replicas whose loss or parameters became NaN/inf: they are frozen at
  their last finite state while the others train on.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  keys: dict[str, jax.Array]
  diverged: jax.Array

  def variables(self) -> dict[str, Any]:
    return _variables(self.params, self.batch_stats)


def _variables(params, batch_stats) -> dict[str, Any]:
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


@flax.struct.dataclass
class Teachers:
  """Trained teacher variables stacked over teachers [T, ...]: those of the teacher group a
  student group reads (`Group.teacher_indices`, in that order). `class_relations` [T, C, C]:
  each teacher's `losses.class_relation_matrix` on the train split (the fgcr arm; else None).
  `temperatures` [T]: each teacher's post-hoc temperature fitted on the validation split
  (kdjax.calibration; the calibrated_teacher signal; else None)."""
  variables: Any
  class_relations: Any = None
  temperatures: Any = None
  reliability: Any = None  # [T]: each teacher's reliability score (reliable_ensemble signal)


def _code(table: Mapping, name: str) -> int:
  """A loss kind's or teacher signal's code: its position in its table (arms_lib.LOSS_KINDS,
  arms_lib.TEACHER_SIGNALS)."""
  return list(table).index(name)


def _select(codes_and_values, code):
  """The value whose code equals `code` (traced), from a static list of (code, value)."""
  (_, out), *rest = codes_and_values
  for c, value in rest:
    out = jnp.where(code == c, value, out)
  return out


def _masked_mean(per_example, mask, axis_name: str | None = None):
  """sum(l * m) / max(sum(m), 1); with `axis_name` the count is summed over that mapped axis, so
  the value is this shard's part of the mean over all shards' examples."""
  mask = jnp.reshape(mask, mask.shape + (1,) * (per_example.ndim - mask.ndim))
  mask = jnp.broadcast_to(mask, per_example.shape)
  count = jnp.sum(mask)
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
  return jnp.sum(per_example * mask) / jnp.maximum(count, 1.0)


def make_mesh(shape: tuple[int, int], devices) -> Mesh:
  """The ('replica', 'data') mesh of `shape` over the first replica x data of `devices`.

  Devices are laid out row-major in `jax.devices()` order, which lists each process's devices
  together: a replica's 'data' shards sit on neighbouring devices of one host (the gradient sum
  stays inside the host whenever data divides the devices per host) and hosts split 'replica'.
  """
  replica, data = shape
  return Mesh(np.array(list(devices)[:replica * data]).reshape(replica, data), MESH_AXES)


def backend_execution(requested: str) -> str:
  if requested != "auto":
    return requested
  return "blocked" if jax.default_backend() == "cpu" else "vmap"


# `execution='blocked'` with `replicas_per_block` 0 (auto): rows per block chosen to minimise
# compile + training time with an empty compilation cache, from the replica steps each block
# program will run. Measured on 2 CPU cores (benchmarks/end_to_end.py and the README's table: the
# default cnn on digits, 24 students of 3 arms, batch 64, compiled at kdjax.compilation's level):
# a block program compiles in about 1.3, 1.7, 2.8 and 5.6 s at 1, 2, 4 and 8 rows, and a replica
# step then costs 1.15, 0.98, 0.82 and 0.72 ms (unrolled rows keep both cores busy). More rows pay
# back after about 2.5k (1 -> 2), 7k (2 -> 4) and 28k (4 -> 8) replica steps per program.
AUTO_BLOCKS = ((28_000, 8), (7_000, 4), (2_500, 2), (0, 1))  # (replica steps per program, rows)


# `steps_per_call` 0 (auto) on GPU/TPU under 'vmap': K steps per jitted call, so that Python's
# dispatch (two programs per step) is paid once per K steps; small models on a GPU are dominated
# by it. Not measured on a GPU yet (benchmarks/accelerator_check.sh measures the step rate).
AUTO_STEPS_PER_CALL = 8


def steps_per_call(execution: str, requested: int) -> int:
  """Training steps per jitted call: `requested` (0 = 1 on CPU, AUTO_STEPS_PER_CALL on GPU/TPU)
  under 'vmap'; always 1 under 'blocked' and 'unrolled' (a `lax.scan` over convolutions runs
  about 10x slower on XLA:CPU, and 'blocked' runs several block programs per step)."""
  if execution != "vmap":
    return 1
  if not requested:
    return 1 if jax.default_backend() == "cpu" else AUTO_STEPS_PER_CALL
  return requested


COMPUTE_DTYPES = ("float32", "bfloat16")


def with_dtype(module, dtype: str):
  """`module` computing in `dtype` (every kdjax model has a `dtype` field; parameters stay
  float32, logits are cast to float32)."""
  if dtype == "float32":
    return module
  return module.clone(dtype=jnp.dtype(dtype))


def block_size(execution: str, local_replicas: int, requested: int = 0, *,
               replica_steps_per_program: float = 0.0) -> int:
  """Rows (replicas) per compiled block: every replica of a shard for 'vmap' and 'unrolled' (one
  block); for 'blocked' `requested`, or with 0 the AUTO_BLOCKS choice for the replica steps that
  each program will run; at most the shard's replicas."""
  if execution != "blocked":
    return local_replicas
  if not requested:
    requested = next(rows for steps, rows in AUTO_BLOCKS if replica_steps_per_program >= steps)
  return min(requested, local_replicas)


def block_layout(local_replicas: int, size: int) -> list[tuple[int, int]]:
  """(offset, start) of each block over a shard's `local_replicas` rows: consecutive blocks of
  `size` rows from offset 0; when `size` does not divide the rows, one more block ends at the
  last row, overlapping the one before it, and writes only its rows from `start` on."""
  offsets = list(range(0, local_replicas - size + 1, size))
  blocks = [(o, o) for o in offsets]
  if local_replicas % size:
    blocks.append((local_replicas - size, offsets[-1] + size))
  return blocks


class Engine:
  """Builds and runs the jitted programs of one group of a stage (one model; kdjax.study.Group):
  `teacher_module` is the model of the teachers it reads."""

  def __init__(self, study: Study, group: Group, *, devices=None, mesh: Mesh | None = None):
    self.study = study
    self.config = study.config
    self.group: Group = group
    self.dataset = study.dataset
    # `config.compute_dtype`: the models compute in it (parameters, BatchNorm statistics and
    # logits stay float32; the losses upcast), teachers' forward passes too.
    self.run = study.run
    self.compute_dtype = self.run.compute_dtype
    self.module = with_dtype(group.module(self.dataset.num_classes), self.compute_dtype)
    self.teacher_module = None if group.teacher_model is None else with_dtype(
        group.teacher_model.module(self.dataset.num_classes), self.compute_dtype)
    self.tx = optim.make_optimizer(self.config.optimizer, self.group.total_steps,
                                   self.group.replicas[0].learning_rate)
    self.arms = self.group.arms()
    self.num_replicas = len(self.group.replicas)
    self.hp = replicas_lib.hparams(self.group.replicas, self.group.teacher_indices)
    self.kinds = tuple(sorted({a.loss for a in self.arms}))
    self.signals = tuple(sorted({a.teacher_signal for a in self.arms}))
    self._pairs = frozenset((a.teacher_signal, a.loss) for a in self.arms)
    # Each replica's loss kind and teacher signal as codes (positions in arms_lib.LOSS_KINDS
    # and TEACHER_SIGNALS), for rows whose arm differs between replica shards.
    self.kind_codes = np.array([_code(arms_lib.LOSS_KINDS, a.loss) for a in self.arms], np.int32)
    self.signal_codes = np.array([_code(arms_lib.TEACHER_SIGNALS, a.teacher_signal)
                                  for a in self.arms], np.int32)
    self.execution = backend_execution(self.run.execution)
    # `mesh` (a ('replica', 'data') Mesh) overrides the study's mesh for this group over
    # `devices` (default: every process's devices): `config.mesh`, or one that fits the group.
    if mesh is None:
      devices = jax.devices() if devices is None else list(devices)
      mesh = make_mesh(study.group_mesh(group, len(devices)), devices)
    self.mesh = mesh
    self.data_size = int(self.mesh.shape["data"])
    self._data_axis = "data" if self.data_size > 1 else None  # None: no collective at all
    self.replica_sharding = NamedSharding(self.mesh, P("replica"))
    self.replicated = NamedSharding(self.mesh, P())
    self.options = study.loss_options
    # What the group's loss kinds need beyond logits and labels (arms_lib.LossKind.needs).
    self.needs = arms_lib.needs(self.kinds)
    self.feature_names = arms_lib.feature_names(self.kinds, study.loss_options)
    # Mutual learning: each step first computes every replica's logits on its batch (`peers`),
    # which the cohorts' losses read.
    self.reads_peers = any(arms_lib.TEACHER_SIGNALS[s].source == "peers" for s in self.signals)
    self._dummy_input = self.dataset.example_input()
    self._init_variables = compilation.jit(
        lambda key: self.module.init(key, self._dummy_input, train=False))
    self._init_optimizer = compilation.jit(lambda params, lrs: optim.set_learning_rate(
        jax.vmap(self.tx.init)(params), lrs))
    self.replica_shards = int(self.mesh.shape["replica"])
    # Per-replica constants, placed once: sliced block by block inside the programs.
    self._replica_constants = jax.device_put(
        {"hp": self.hp, "kind_code": self.kind_codes, "signal_code": self.signal_codes},
        self.replica_sharding)
    # Replica steps each program of this group runs on a device: one program per arm (at one row
    # per block) over the device's share of the replicas.
    local = self.num_replicas // self.replica_shards
    steps_per_program = local * group.total_steps / len(self._pairs)
    self.replicas_per_block = block_size(
        self.execution, local,
        self.run.replicas_per_block,
        replica_steps_per_program=steps_per_program)
    self._blocks = block_layout(self.num_replicas // self.replica_shards,
                                self.replicas_per_block)
    self._step_inputs = compilation.jit(self._make_step_inputs)
    # Training steps per jitted call (`train_steps`): K under 'vmap' (one block), else 1.
    self.steps_per_call = steps_per_call(self.execution, self.run.steps_per_call)
    self._programs: dict = {}  # (what, pattern) -> jitted block program
    # Each block's (offset, start) as device scalars (traced: one program per pattern).
    self._block_args = [jax.device_put((np.int32(o), np.int32(s)), self.replicated)
                        for o, s in self._blocks]
    self._train_patterns = [self._block_pattern(o, arms=True) for o, _ in self._blocks]
    self._predict_patterns = [self._block_pattern(o, arms=False) for o, _ in self._blocks]
    self.epoch_order = compilation.jit(functools.partial(
        data_lib.epoch_order, shared_order=self.run.shared_order),
        static_argnums=(2,))

  # ---------------------------------------------------------------- state

  def init_state(self) -> TrainState:
    """Fresh replicas: each from its `init` stream (a student initialised from its teacher uses
    the teacher's stream, so it starts from exactly the teacher's initial parameters)."""
    seed = self.run.seed
    init_keys = replicas_lib.stream_keys(seed, self.group.replicas, "init",
                                         teachers=self.study.teacher.replicas)
    keys = {s: replicas_lib.stream_keys(seed, self.group.replicas, s) for s in TRAIN_STREAMS}
    lrs = jnp.array([r.learning_rate for r in self.group.replicas], jnp.float32)
    # One compiled init called per replica, not a vmapped one: XLA:CPU compiles the vmapped
    # threefry draws of a model init about 15x slower (49 s against 3 s for the default cnn),
    # and the numbers are the same (threefry bits depend only on the key).
    per_replica = [self._init_variables(k) for k in init_keys]
    variables = jax.tree.map(lambda *a: jnp.stack(a), *per_replica)
    params = variables["params"]
    if "learned_temperature" in self.needs:
      # CTKD's trainable temperature parameter theta, one per replica, beside the model's
      # (models ignore parameters they do not use; the optimiser updates it with the rest).
      params = {**params, LEARNED_TEMPERATURE: jnp.full((self.num_replicas,),
                                                        self.options.ctkd_init, jnp.float32)}
    opt_state = self._init_optimizer(params, lrs)
    batch_stats = variables.get("batch_stats", {})
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=opt_state, keys=keys,
                       diverged=jnp.zeros((self.num_replicas,), bool))
    return self.place(state)

  def place(self, state: TrainState) -> TrainState:
    """Puts a state on the mesh: replica axis sharded, step replicated."""
    return TrainState(
        step=jax.device_put(state.step, self.replicated),
        params=jax.device_put(state.params, self.replica_sharding),
        batch_stats=jax.device_put(state.batch_stats, self.replica_sharding),
        opt_state=jax.device_put(state.opt_state, self.replica_sharding),
        keys=jax.device_put(state.keys, self.replica_sharding),
        diverged=jax.device_put(state.diverged, self.replica_sharding))

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and this engine's shardings of the state: the restore target, so a
    checkpoint written on any device count loads onto this engine's mesh."""
    shapes = jax.eval_shape(self.init_state)

    def on(sharding):
      return lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return TrainState(
        step=on(self.replicated)(shapes.step),
        params=jax.tree.map(on(self.replica_sharding), shapes.params),
        batch_stats=jax.tree.map(on(self.replica_sharding), shapes.batch_stats),
        opt_state=jax.tree.map(on(self.replica_sharding), shapes.opt_state),
        keys=jax.tree.map(on(self.replica_sharding), shapes.keys),
        diverged=on(self.replica_sharding)(shapes.diverged))

  # ---------------------------------------------------------------- one replica

  def _teacher_signal(self, signal: str, teachers: Teachers | None, peers, x, labels,
                      student_logits, keys, hp: arms_lib.ReplicaHParams, step):
    """(teacher logits, teacher features {name: map}) of one replica for one signal kind (see
    arms_lib.TEACHER_SIGNALS); for a signal with `members` (ensembles) the logits are
    [M, B, ...], one per member."""
    record = arms_lib.TEACHER_SIGNALS[signal]
    if record.source == "noise":
      shape = student_logits.shape
      # The whole batch's noise, then this data shard's rows: the draws of a data=1 run.
      noise = losses.random_control_logits(
          jax.random.fold_in(keys["rcd"], step), (shape[0] * self.data_size,) + shape[1:],
          minval=self.options.rcd_minval, maxval=self.options.rcd_maxval)
      if self._data_axis is not None:
        noise = jax.lax.dynamic_slice_in_dim(
            noise, jax.lax.axis_index(self._data_axis) * shape[0], shape[0])
      return noise, None
    if record.source == "peers":  # [M, B, ...]: the cohort's logits (this data shard's examples)
      return peers[hp.member_slots], None
    if record.source == "ensemble":
      # [M, B, C]: the members one after another, not vmapped (a vmapped conv is slow on
      # XLA:CPU); the loss averages over them (kdjax/arms.py, "Ensembles").
      return jnp.stack([
          self.teacher_module.apply(
              jax.tree.map(lambda a, j=j: a[hp.member_slots[j]], teachers.variables), x,
              train=False) for j in range(hp.member_slots.shape[-1])]), None
    if record.source == "teacher":
      variables = jax.tree.map(lambda a: a[hp.teacher_slot], teachers.variables)
      features = None
      if self.feature_names:
        logits, all_features, _ = models_lib.apply_with_features(self.teacher_module, variables,
                                                                 x)
        features = {n: all_features[n] for n in self.feature_names}
      else:
        logits = self.teacher_module.apply(variables, x, train=False)
      if record.transform is not None:
        logits = record.transform(logits, labels, teachers, hp)
      return logits, features
    return jnp.zeros_like(student_logits), None

  def _replica_update(self, carry: dict, row: dict, batch: dict, step, teachers, peers, *,
                      kinds, signals) -> dict:
    """One optimiser step of one replica: `carry` {params, batch_stats, opt_state, diverged,
    metrics}, `row` its constants {keys, hp, kind_code, signal_code}, `batch` {x, labels, mask}
    (this data shard's part); returns the new carry. `kinds`/`signals` are the loss kinds and
    teacher signals this replica may have (one each when its arm is static).

    Divergence isolation: when the loss, the gradients' norm or a new parameter is NaN/inf, or
    the replica had diverged before, its parameters, batch statistics and optimiser state stay
    as they were and it is marked diverged; replicas never mix, so the others are untouched."""
    params, batch_stats, opt_state = carry["params"], carry["batch_stats"], carry["opt_state"]
    hp, x, labels, mask = row["hp"], batch["x"], batch["labels"], batch["mask"]
    mutable = (["batch_stats"] if batch_stats else []) + \
        (["features"] if self.feature_names else [])
    rngs = {"dropout": self._dropout_key(row["keys"]["dropout"], step)}
    group_needs = arms_lib.needs(kinds)

    def loss_fn(params):
      out, new_state = self.module.apply(_variables(params, batch_stats), x, train=True,
                                         mutable=mutable, rngs=rngs)
      sown = new_state.get("features", {})
      inputs = arms_lib.LossInputs(
          student_logits=out, labels=labels, mask=mask, data_axis=self._data_axis,
          learned_temperature=params.get(LEARNED_TEMPERATURE),
          student_features={n: sown[n] for n in self.feature_names} or None,
          class_relations=teachers.class_relations[hp.teacher_slot]
          if "class_relations" in group_needs else None)

      def loss_of(kind, teacher_logits, teacher_features=None):
        return arms_lib.LOSS_KINDS[kind].loss(
            inputs.replace(teacher_logits=teacher_logits, teacher_features=teacher_features),
            hp, step, self.options)

      # Each (signal, kind) pair of the group's arms that this replica may have; with a signal
      # of several members the loss is the weighted mean of the kind's loss against each.
      per_signal = []
      for signal in signals:
        teacher_logits, teacher_features = jax.lax.stop_gradient(
            self._teacher_signal(signal, teachers, peers, x, labels, out, row["keys"], hp, step))
        values = []
        for kind in (k for k in kinds if (signal, k) in self._pairs):
          if arms_lib.TEACHER_SIGNALS[signal].members:
            weights = hp.member_weights
            if arms_lib.TEACHER_SIGNALS[signal].reliability_weighted:
              # Padding members (weight 0) get score 0, so they keep weight 0.
              weights = teacher_signals.reliability_weights(
                  teachers.reliability[hp.member_slots] * (hp.member_weights > 0),
                  mode="accuracy")
            value = sum(weights[j] * loss_of(kind, teacher_logits[j])
                        for j in range(teacher_logits.shape[0]))
          else:
            value = loss_of(kind, teacher_logits, teacher_features)
          values.append((_code(arms_lib.LOSS_KINDS, kind), value))
        per_signal.append((_code(arms_lib.TEACHER_SIGNALS, signal),
                           _select(values, row["kind_code"])))
      per_example = _select(per_signal, row["signal_code"])
      return _masked_mean(per_example, mask, self._data_axis), \
          (out, new_state.get("batch_stats", {}))

    (loss, (logits, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    loss, grads = self._data_sum((loss, grads))  # the data shards' parts of the batch mean
    updates, new_opt_state = self.tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads)) & \
        jnp.isfinite(optax.global_norm(new_params))
    if new_batch_stats:
      finite &= jnp.isfinite(optax.global_norm(new_batch_stats))
    diverged = carry["diverged"] | ~finite
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(diverged, o, n), new, old)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    metrics = {"loss": loss,
               "accuracy": self._data_sum(_masked_mean(correct, mask, self._data_axis))}
    return {"params": keep(new_params, params), "batch_stats": keep(new_batch_stats, batch_stats),
            "opt_state": keep(new_opt_state, opt_state), "diverged": diverged,
            "metrics": metrics}

  def _data_sum(self, tree):
    """Sum over the 'data' mesh axis (the identity without one)."""
    if self._data_axis is None:
      return tree
    return jax.lax.psum(tree, self._data_axis)

  def _dropout_key(self, key, step):
    """fold_in(key, step); with a data axis also the shard's index, so shards draw their own."""
    key = jax.random.fold_in(key, step)
    if self._data_axis is None:
      return key
    return jax.random.fold_in(key, jax.lax.axis_index(self._data_axis))

  # ---------------------------------------------------------------- all replicas, by blocks

  def _block_pattern(self, offset: int, *, arms: bool) -> tuple:
    """The static shape of the block at local row `offset`: its segments, consecutive runs of
    rows (length, loss kinds, teacher signals) that run as one, vmapped ('vmap') or each row on
    its own (unrolled). A row's arm is static (one kind, one signal) when the replica at that
    row has the same arm in every replica shard; else the row selects its arm by code among all
    of the group's. Under 'vmap' consecutive rows of one static arm form one segment, so each
    arm's rows compute only their own teacher signal and loss. `arms=False` (inference): one
    kind of row."""
    local = self.num_replicas // self.replica_shards
    rows = []
    for j in range(self.replicas_per_block):
      present = {(self.arms[d * local + offset + j].loss,
                  self.arms[d * local + offset + j].teacher_signal)
                 for d in range(self.replica_shards)}
      if not arms:
        rows.append(((), ()))
      elif len(present) == 1:
        ((kind, signal),) = present
        rows.append(((kind,), (signal,)))
      else:
        rows.append((self.kinds, self.signals))
    if self.execution != "vmap":
      return tuple((1, kinds, signals) for kinds, signals in rows)
    segments = []
    for kinds, signals in rows:
      if segments and segments[-1][1:] == (kinds, signals):
        segments[-1] = (segments[-1][0] + 1, kinds, signals)
      else:
        segments.append((1, kinds, signals))
    return tuple(segments)

  def _program(self, what: str, pattern):
    """The jitted block program of `what` ('train' or 'predict') for one block pattern, built
    on first use: programs are shared by every block of the same pattern."""
    key = (what, pattern)
    if key not in self._programs:
      # Specs are pytree prefixes of the arguments: a replica's state and constants are
      # sharded over 'replica', its batch over 'replica' and 'data'.
      per_batch = P("replica", "data")
      body, carry_spec, per_replica_specs, shared_specs = {
          # carry {params, batch_stats, opt_state, diverged, metrics}; per replica {"row":
          # {keys, hp, kind_code, signal_code}, "batch": {x, labels, mask}}; shared (step,
          # teachers).
          "train": (self._train_rows, P("replica"),
                    {"row": P("replica"), "batch": per_batch}, (P(), P(), P(None, "data"))),
          # carry: the peers' logits [R, B, ...]; per replica: its state and batch; shared: step.
          "peers": (self._peer_rows, per_batch,
                    {"state": P("replica"), "batch": per_batch}, (P(),)),
          # carry: logits [R, B, ...]; per replica: variables; shared: the input batch x.
          "predict": (self._predict_rows, per_batch, P("replica"), (P("data"),)),
      }[what]
      self._programs[key] = self._block_program(body, pattern, carry_spec, per_replica_specs,
                                                shared_specs)
    return self._programs[key]

  def _block_program(self, body: Callable, pattern, carry_spec, per_replica_specs,
                     shared_specs):
    """jit(program(carry, per_replica, shared, offset, start) -> carry), carry donated: rows
    [offset, offset + size) of every carry and per-replica leaf (in each replica shard) are
    sliced out, `body(carry_row, per_replica_row, *shared, kinds=, signals=)` gives each row's
    new carry (per segment of `pattern`: vmapped under 'vmap', else row by row), and the rows
    are written back in place. Rows below `start` (the last block of a shard overlapping the one before it) keep
    their carry. What XLA compiles is one block of rows, whatever the replica count."""
    size = self.replicas_per_block
    masked = any(offset != start for offset, start in self._blocks)
    vmapped = self.execution == "vmap"

    def local(carry, per_replica, shared, offset, start):
      take = lambda a: jax.lax.dynamic_slice_in_dim(a, offset, size)
      old, rows = jax.tree.map(take, carry), jax.tree.map(take, per_replica)
      parts, begin = [], 0
      with models_common.batch_norm_axis(self._data_axis):
        for length, kinds, signals in pattern:
          part = lambda tree: jax.tree.map(lambda a: a[begin:begin + length], tree)
          apply = functools.partial(lambda c, r, k, s: body(c, r, *shared, kinds=k, signals=s),
                                    k=kinds, s=signals)
          if vmapped:
            parts.append(jax.vmap(apply)(part(old), part(rows)))
          else:  # one row (XLA:CPU runs a vmapped convolution as a slow grouped one)
            row = lambda tree: jax.tree.map(lambda a: a[begin], tree)
            parts.append(jax.tree.map(lambda a: a[None], apply(row(old), row(rows))))
          begin += length
      new = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
      if masked:
        fresh = offset + jnp.arange(size) >= start
        new = jax.tree.map(
            lambda n, o: jnp.where(fresh.reshape((size,) + (1,) * (n.ndim - 1)), n, o), new, old)
      return jax.tree.map(lambda a, n: jax.lax.dynamic_update_slice_in_dim(a, n, offset, 0),
                          carry, new)

    if self.mesh.devices.size > 1:
      # check_vma=False: psum's transpose is then a psum, which sums every shard's loss terms
      # into the cotangents of the BatchNorm statistics (the whole batch's gradient).
      local = jax.shard_map(local, mesh=self.mesh, in_specs=(
          carry_spec, per_replica_specs, shared_specs, P(), P()), out_specs=carry_spec,
                            check_vma=False)
    return compilation.jit(local, donate_argnums=(0,))

  def _train_rows(self, carry, rows, step, teachers, peers, *, kinds, signals):
    return self._replica_update(carry, rows["row"], rows["batch"], step, teachers, peers,
                                kinds=kinds, signals=signals)

  def _peer_rows(self, carry, rows, step, *, kinds, signals):
    """One replica's logits on its batch as its update computes them (train mode, its dropout
    draw of this step, the batch statistics of the batch), for its cohort's peers."""
    del carry, kinds, signals
    state, x = rows["state"], rows["batch"]["x"]
    mutable = ["batch_stats"] if state["batch_stats"] else []
    out, _ = self.module.apply(_variables(state["params"], state["batch_stats"]), x, train=True,
                               mutable=mutable,
                               rngs={"dropout": self._dropout_key(state["keys"]["dropout"], step)})
    return out

  def _predict_rows(self, carry, variables, x, *, kinds, signals):
    del carry, kinds, signals
    return self.module.apply(variables, x, train=False)

  def _make_step_inputs(self, state: TrainState, order, arrays: Mapping[str, jax.Array]):
    """This step's batch of every replica (`kdjax.data.train_batch`: its own order and
    augmentation), a zeroed metrics buffer [R] and the next step number."""
    batch = data_lib.train_batch(
        arrays, self.dataset, state.keys["augment"], state.step,
        batch_size=self.run.batch_size, order=order,
        augment_preset=tuple(r.augment for r in self.group.replicas))
    metrics = {name: jnp.zeros((self.num_replicas,), jnp.float32)
               for name in ("loss", "accuracy")}
    inputs = {"x": batch[self.dataset.input_key], "labels": batch["label"], "mask": batch["mask"]}
    # The peers' logits buffer [R, B, ..., C] of a group with mutual learning (else None).
    peers = jnp.zeros(batch["label"].shape + (self.dataset.num_classes,), jnp.float32) \
        if self.reads_peers else None
    if self.mesh.devices.size > 1:  # laid out as the block programs read them
      inputs, peers = jax.lax.with_sharding_constraint(
          (inputs, peers), NamedSharding(self.mesh, P("replica", "data")))
      metrics = jax.lax.with_sharding_constraint(metrics, self.replica_sharding)
    return inputs, metrics, state.step + 1, peers

  def train_step(self, state: TrainState, order, arrays: Mapping[str, jax.Array],
                 teachers: Teachers | None):
    """One step of every replica: this step's batches, then each block's program in turn,
    each updating its rows of the state in place. `order` [R, N] is this epoch's order
    (`epoch_order`). The state's parameters, batch statistics and optimiser state are donated.
    Returns (the new state, {"loss", "accuracy"} [R] of this step)."""
    carry, per_replica, shared, next_step = self._block_inputs(state, order, arrays, teachers)
    for (offset, start), pattern in zip(self._block_args, self._train_patterns):
      carry = self._program("train", pattern)(carry, per_replica, shared, offset, start)
    metrics = carry.pop("metrics")
    return state.replace(step=next_step, **carry), metrics

  def _block_inputs(self, state: TrainState, order, arrays, teachers):
    """(carry, per-replica inputs, shared inputs, next step) of the training block programs of
    one step from `state`: this step's batches (`_step_inputs`), the state's rows, the replica
    constants, and shared (step, teachers, peers): with mutual learning `peers` [R, B, ..., C]
    is every replica's logits on its batch from the state before the step (its own forward
    pass of the update, computed first by the 'peers' block programs), else None."""
    batch, metrics, next_step, peers = self._step_inputs(state, order, arrays)
    carry = {"params": state.params, "batch_stats": state.batch_stats,
             "opt_state": state.opt_state, "diverged": state.diverged, "metrics": metrics}
    per_replica = {"row": {"keys": state.keys, **self._replica_constants}, "batch": batch}
    if peers is not None:  # every replica's logits on its batch, before any update
      rows = {"state": {"params": state.params, "batch_stats": state.batch_stats,
                        "keys": state.keys}, "batch": batch}
      for (offset, start), pattern in zip(self._block_args, self._predict_patterns):
        peers = self._program("peers", pattern)(peers, rows, (state.step,), offset, start)
    return carry, per_replica, (state.step, teachers, peers), next_step

  def train_steps(self, state: TrainState, order, arrays: Mapping[str, jax.Array],
                  teachers: Teachers | None, n: int):
    """`n` steps of every replica within one epoch (`order` is its order). With
    `steps_per_call` K > 1 and n == K, one jitted call: a `lax.scan` over K copies of
    `train_step` (the batch-building program and the block program, traced into one program),
    equal to K calls of `train_step`; otherwise n calls of `train_step`. Returns (the new state,
    the metrics of the last step)."""
    if n > 1 and n == self.steps_per_call:
      key = ("steps", n)
      if key not in self._programs:
        def run(state, order, arrays, teachers):
          state, metrics = jax.lax.scan(
              lambda s, _: self.train_step(s, order, arrays, teachers), state, None, length=n)
          return state, jax.tree.map(lambda m: m[-1], metrics)
        self._programs[key] = compilation.jit(run, donate_argnums=(0,))
      return self._programs[key](state, order, arrays, teachers)
    metrics = None
    for _ in range(n):
      state, metrics = self.train_step(state, order, arrays, teachers)
    return state, metrics

  def lower_train_blocks(self, state: TrainState, order, arrays: Mapping[str, jax.Array],
                         teachers: Teachers | None, pattern=None) -> list:
    """The block programs of one `train_step` from `state`, lowered (`jax.stages.Lowered`), one
    per block in block order, donated as `train_step` donates them: for XLA's cost and memory
    analysis (benchmarks/cost_model.py). `pattern` replaces every block's own (e.g. one vmapped
    segment of all rows that computes every kind present). Runs the step's batch building."""
    carry, per_replica, shared, _ = self._block_inputs(state, order, arrays, teachers)
    return [jax.jit(self._program("train", pattern or own), donate_argnums=(0,)).lower(
        carry, per_replica, shared, offset, start)
            for (offset, start), own in zip(self._block_args, self._train_patterns)]

  def predict(self, variables, x):
    """Logits of every replica on one shared input batch x: [R, B, ...classes]."""
    out = self._empty_logits(variables, x)
    for (offset, start), pattern in zip(self._block_args, self._predict_patterns):
      out = self._program("predict", pattern)(out, variables, (x,), offset, start)
    return out

  def _empty_logits(self, variables, x):
    """A zeroed [R, B, ...classes] buffer laid out as `predict` writes it."""
    key = ("empty", x.shape, x.dtype)
    if key not in self._programs:
      one = jax.eval_shape(lambda v, x: self.module.apply(
          jax.tree.map(lambda a: a[0], v), x, train=False), variables, x)
      self._programs[key] = compilation.jit(
          lambda: jnp.zeros((self.num_replicas,) + one.shape, one.dtype),
          out_shardings=NamedSharding(self.mesh, P("replica", "data")))
    return self._programs[key]()

  # ---------------------------------------------------------------- host-side helpers

  def order_for_step(self, state: TrainState, num_examples: int):
    """This step's epoch order [R, N] (computed once per epoch by the caller)."""
    spe = self.group.steps_per_epoch
    epoch = int(state.step) // spe
    return epoch, self.epoch_order(state.keys["data"], epoch, num_examples)

  def evaluate(self, variables, eval_arrays: Mapping[str, jax.Array], batch_size: int,
               on_logits: Callable | None = None):
    """Per-replica eval accuracy and cross-entropy over the whole eval split (each example
    exactly once; padded last batch masked). `on_logits(index, logits, mask)`, if given, also
    sees every eval batch's logits [R, B, ...] and its mask (kdjax.train's similarity curves):
    one forward pass serves both."""
    totals = np.zeros((3, self.num_replicas))
    for batch in data_lib.eval_batches(eval_arrays, self.dataset, batch_size):
      logits = self.predict(variables, batch.x)
      correct, ce, count = _eval_sums(logits, batch.labels, batch.mask)
      totals += np.stack([distributed.to_host(v) for v in (correct, ce, count)])
      if on_logits is not None:
        on_logits(batch.index, logits, batch.mask)
    return {"accuracy": totals[0] / totals[2], "loss": totals[1] / totals[2]}




@jax.jit
def _eval_sums(logits, labels, mask):
  """Per replica: number correct, summed cross-entropy, number of (unmasked) predictions."""
  labels = jnp.broadcast_to(labels, logits.shape[:-1])
  mask = jnp.reshape(mask, mask.shape + (1,) * (labels.ndim - 1 - mask.ndim))
  mask = jnp.broadcast_to(mask, labels.shape)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  ce = losses.softmax_cross_entropy(logits, labels)
  axes = tuple(range(1, labels.ndim))
  return (jnp.sum(correct * mask, axes), jnp.sum(ce * mask, axes), jnp.sum(mask, axes))
