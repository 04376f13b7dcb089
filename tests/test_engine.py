"""Tests of the replica engine (kdjax.engine, kdjax.train) against independent references.

The references are written here from the documented contracts, not taken from the engine: a plain
single-model optax loop, per-arm losses assembled from kdjax.losses, the documented key
derivation (kdjax/replicas.py) and epoch orders (kdjax/data/pipeline.py), and a forward pass of
the final parameters for the logged eval scalars.

Cost: compiling dominates (on 2 cores: the cnn init about 10 s because of threefry on XLA:CPU,
an unrolled step 1-3 s per replica). Engines built for equal programs, the reference init and the
2-device subprocesses share them through a persistent compilation cache in a temporary directory
for this module; the subprocesses run in the background while the in-process tests compute.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import stats as scipy_stats

import _cli

from kdjax import checkpoint as checkpoint_lib
from kdjax import data
from kdjax import engine as engine_lib
from kdjax import losses
from kdjax import models
from kdjax import study as study_lib
from kdjax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TRAIN, BATCH = 1198, 128           # digits: ceil(1198 / 128) = 10 steps, the last holds 46
STEPS_PER_EPOCH = 10
# The small study every test shares: 2 teachers (2 epochs), students kd,rcd,siddo x 2 seeds
# (1 epoch); student seed s learns from teacher s mod 2. Eval in 3 batches (599 = 256 + 256 + 87).
STUDY = {"num_teachers": 2, "num_seeds": 2, "num_epochs": 1, "teacher_num_epochs": 2,
         "batch_size": BATCH, "eval_batch_size": 256}
STUDENT_ROWS = [("kd", 0), ("kd", 1), ("rcd", 0), ("rcd", 1), ("siddo", 0), ("siddo", 1)]
# Documented stream codes (kdjax/replicas.py): stage teacher 1, students 2; streams init 1,
# data 2, augment 3, rcd 4, dropout 5.
STAGE_CODE = {"teacher": 1, "students": 2}
STREAM_CODE = {"init": 1, "data": 2, "augment": 3, "rcd": 4, "dropout": 5}


# ---------------------------------------------------------------------------------- helpers


def _default_config() -> ml_collections.ConfigDict:
  return study_lib.load_config(str(ROOT / "configs" / "default.py"))


def _config(**overrides) -> ml_collections.ConfigDict:
  """configs/default.py with STUDY and `overrides` (dotted keys written with '__')."""
  config = _default_config()
  for key, value in {**STUDY, **overrides}.items():
    *parents, leaf = key.split("__")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _cli_flags(**overrides) -> list[str]:
  return [f"--config.{k.replace('__', '.')}={v}" for k, v in {**STUDY, **overrides}.items()]


def _key(stage: str, seed: int, stream: str, config_seed: int = 0) -> jax.Array:
  """The documented derivation:
  fold_in(fold_in(fold_in(PRNGKey(config_seed), STAGE), seed), STREAM)."""
  root = jax.random.fold_in(jax.random.PRNGKey(config_seed), STAGE_CODE[stage])
  return jax.random.fold_in(jax.random.fold_in(root, seed), STREAM_CODE[stream])


def _order(stage: str, seed: int, epoch: int) -> np.ndarray:
  """The documented epoch order: permutation(fold_in(data_key, epoch), N)."""
  key = jax.random.fold_in(_key(stage, seed, "data"), epoch)
  return np.asarray(jax.random.permutation(key, NUM_TRAIN))


def _batch_positions(step: int) -> np.ndarray:
  """Positions of step `step` inside its epoch's order; the padded tail carries no weight."""
  p = step % STEPS_PER_EPOCH
  return np.arange(p * BATCH, min((p + 1) * BATCH, NUM_TRAIN))


def _digits_inputs(split: str, spec) -> tuple[np.ndarray, np.ndarray]:
  """A split's images as the model sees them, (x / 255 - mean) / std, and its labels."""
  arrays = data.load("digits", split)
  x = (arrays["image"].astype(np.float32) / 255.0 - np.float32(spec.mean[0])) / np.float32(
      spec.std[0])
  return x, arrays["label"]


def _row(tree, r: int):
  return jax.tree.map(lambda a: np.asarray(a)[r], tree)


def _assert_trees_close(actual, expected, *, rtol=1e-5, atol=1e-6, what=""):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  assert tree_a == tree_e, f"{what}: different structures"
  for (path, a), (_, e) in zip(flat_a, flat_e):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _assert_trees_equal(actual, expected, what=""):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  assert tree_a == tree_e, f"{what}: different structures"
  for (path, a), (_, e) in zip(flat_a, flat_e):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e),
                                  err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _trees_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _engine(study, stage: str) -> engine_lib.Engine:
  (group,) = study.stage(stage).groups  # these studies have one model per stage
  return engine_lib.Engine(study, group)


def _placed(engine, study, teachers=None):
  """The train arrays and teachers placed as kdjax.train.run_stage places them (replicated)."""
  arrays = data.to_device(study.data["train"], engine.replicated)
  if teachers is not None:
    teachers = jax.device_put(teachers, engine.replicated)
  return arrays, teachers


def _drive(engine, study, teachers=None, *, state=None, stop=None):
  """Steps a stage from `state` (default: fresh) to step `stop` (default: the end), the way
  kdjax.train.run_stage does, without checkpoints or logs."""
  arrays, teachers = _placed(engine, study, teachers)
  state = engine.init_state() if state is None else state
  stop = engine.group.total_steps if stop is None else stop
  while int(state.step) < stop:
    _, order = engine.order_for_step(state, study.num_train)
    state, _ = engine.train_step(state, order, arrays, teachers)
  return state


def _teachers(state) -> engine_lib.Teachers:
  return engine_lib.Teachers(variables=state.variables())


def _init_params(module, key):
  """module.init on the key, compiled the way the engine compiles it (the cache shares it)."""
  x = jnp.zeros((1, 8, 8, 1), jnp.float32)
  return jax.jit(lambda k: module.init(k, x, train=False))(key)["params"]


def _files_digest(directory) -> dict[str, str]:
  out = {}
  for path in sorted(pathlib.Path(directory).rglob("*")):
    if path.is_file():
      out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


# ------------------------------------------------------------------------- block layout


@pytest.mark.parametrize("local,size,expected", [
    (6, 2, [(0, 0), (2, 2), (4, 4)]), (5, 2, [(0, 0), (2, 2), (3, 4)]),
    (8, 3, [(0, 0), (3, 3), (5, 6)]), (4, 4, [(0, 0)]), (1, 1, [(0, 0)])])
def test_blocks_cover_every_row_once(local, size, expected):
  """(offset, start) of each block: consecutive blocks, the last one ending at the last row and
  writing only the rows no earlier block wrote; every row is written by exactly one block."""
  blocks = engine_lib.block_layout(local, size)
  assert blocks == expected
  written = [row for offset, start in blocks for row in range(start, offset + size)]
  assert sorted(written) == list(range(local))


@pytest.mark.parametrize("execution,local,requested,steps,expected", [
    ("vmap", 24, 0, 1e6, 24), ("unrolled", 24, 3, 1e6, 24), ("blocked", 24, 3, 0, 3),
    ("blocked", 24, 0, 1824, 1), ("blocked", 24, 0, 5000, 2), ("blocked", 24, 0, 10_000, 4),
    ("blocked", 24, 0, 50_000, 8), ("blocked", 3, 0, 50_000, 3), ("blocked", 2, 5, 0, 2)])
def test_rows_per_block(execution, local, requested, steps, expected):
  """One block of every row for vmap and unrolled; for blocked the requested rows, or by
  default the documented thresholds (engine.AUTO_BLOCKS), never more than the shard's rows."""
  assert engine_lib.block_size(execution, local, requested,
                               replica_steps_per_program=steps) == expected


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA compilation cache for this module (restored afterwards): equal programs
  built by different Engines, the reference and the subprocesses are compiled once."""
  from jax.experimental.compilation_cache import compilation_cache as cache
  path = str(tmp_path_factory.mktemp("xla_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cache.reset_cache()
  yield path
  for n, v in old.items():
    jax.config.update(n, v)
  cache.reset_cache()


@pytest.fixture(scope="module")
def two_device_jobs(tmp_path_factory, compilation_cache):
  """`python -m kdjax.main` for the shared study on 2 forced CPU devices, once per execution
  (started by `workdir_a` once the model init is compiled, so they find it in the cache)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=2").strip())
  jobs, workdirs = {}, {}
  # 'blocked' with 2 rows per block over a shard's 3 students: a second block that overlaps the
  # first, and rows whose arm differs between the shards (selected by code).
  for execution, more in (("blocked", ["--config.replicas_per_block=2"]), ("vmap", [])):
    base = tmp_path_factory.mktemp(f"two_devices_{execution}")
    workdirs[execution] = str(base / "workdir")
    jobs[execution] = (
        [sys.executable, "-m", "kdjax.main", f"--config={ROOT / 'configs' / 'default.py'}",
         f"--workdir={workdirs[execution]}", "--config.stages=teacher,students",
         f"--config.execution={execution}", *more, *_cli_flags()],
        base / "log.txt")
  background = _cli.BackgroundJobs(jobs, env, workdirs=workdirs)
  yield background
  background.close()


@pytest.fixture(scope="module")
def two_device_runs(two_device_jobs):
  """{execution: workdir} of the finished 2-device runs."""
  returncodes = two_device_jobs.wait(timeout=900)
  for execution, (_, log) in two_device_jobs.jobs.items():
    output = log.read_text() if log.exists() else "(not started)"
    assert returncodes.get(execution) == 0, output[-3000:]
    assert f"; {execution}" in output and "2 cpu device(s))" in output, output[-3000:]
  return two_device_jobs.workdirs


@pytest.fixture(scope="module")
def study():
  return study_lib.load_data(study_lib.resolve(_config()))


@pytest.fixture(scope="module")
def workdir_a(study, tmp_path_factory, two_device_jobs):
  """The shared study trained once in-process with kdjax.train.run_stage (default execution)."""
  # The model init is the costliest compile (threefry on XLA:CPU): compile it once, then let the
  # 2-device runs start and find it in the cache.
  _init_params(models.get("cnn", num_classes=10, width=0.25), _key("teacher", 0, "init"))
  two_device_jobs.start()
  workdir = str(tmp_path_factory.mktemp("workdir_a"))
  with contextlib.redirect_stdout(io.StringIO()):
    train.run_stage(study, "teacher", workdir)
    train.run_stage(study, "students", workdir)
  return workdir


@pytest.fixture(scope="module")
def teacher_final(study, workdir_a):
  return train.load_final_state(study, workdir_a, "teacher")[1]["group0"]


@pytest.fixture(scope="module")
def students_final(study, workdir_a):
  return train.load_final_state(study, workdir_a, "students")[1]["group0"]


@pytest.fixture(scope="module")
def teachers(teacher_final):
  return _teachers(teacher_final)


# ---------------------------------------------------------------- 1. plain single-model loop


def test_teacher_stage_equals_plain_single_model_loop(study, teacher_final):
  """Each teacher equals a minimal optax loop written here: its init key, the epoch orders, the
  padded last batch (only its real examples count), SGD with momentum, coupled weight decay and
  the cosine schedule over the stage's 2 epochs."""
  opt = study.config.optimizer
  assert (opt.name, opt.schedule, opt.warmup_steps, opt.grad_clip_norm) == ("sgd", "cosine", 0, 0)
  module = models.get("cnn", num_classes=10, width=0.25)
  x_all, y_all = _digits_inputs("train", study.dataset)
  total = 2 * STEPS_PER_EPOCH
  tx = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                   optax.sgd(optax.cosine_decay_schedule(0.1, total), momentum=opt.momentum))

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      log_p = jax.nn.log_softmax(module.apply({"params": p}, x, train=True))
      return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))
    updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  assert [r.seed for r in study.teacher.replicas] == [0, 1]
  for j in range(2):
    params = _init_params(module, _key("teacher", j, "init"))
    opt_state = tx.init(params)
    for s in range(total):
      idx = _order("teacher", j, s // STEPS_PER_EPOCH)[_batch_positions(s)]
      params, opt_state = step(params, opt_state, x_all[idx], y_all[idx])
    _assert_trees_close(_row(teacher_final.params, j), params, rtol=1e-5, atol=1e-6,
                        what=f"teacher {j}")
  assert int(teacher_final.step) == total


# ---------------------------------------------------------------- 2. alone = in a batch


def _replica_rows(stage) -> dict[tuple, int]:
  """(arm, seed, teacher, alpha, temperature, learning rate, init) -> replica index."""
  return {(r.arm, r.seed, r.teacher, r.alpha, r.temperature, r.learning_rate, r.init): r.index
          for r in stage.replicas}


def test_replica_alone_equals_the_same_replica_in_a_batch(study, teachers, students_final):
  """rcd and kd replicas trained in a stage of their own (other slots, no siddo) end where they
  end inside the kd,rcd,siddo stage: a replica is its identity, not its slot. On the way, the
  first step's losses show each replica's own signal: kd seed 1 distils from teacher 1, the two
  rcd seeds from their own noise."""
  alone = study_lib.load_data(study_lib.resolve(_config(arms="rcd,kd")))
  rows, batch_rows = _replica_rows(alone.students), _replica_rows(study.students)
  assert [(r.arm, r.seed) for r in study.students.replicas] == STUDENT_ROWS
  assert [(r.arm, r.seed, r.teacher) for r in alone.students.replicas] == [
      ("rcd", 0, 0), ("rcd", 1, 1), ("kd", 0, 0), ("kd", 1, 1)]
  engine = _engine(alone, "students")
  state = engine.init_state()
  params0 = jax.tree.map(np.asarray, state.params)
  _, order = engine.order_for_step(state, alone.num_train)
  state, metrics = engine.train_step(state, order, *_placed(engine, alone, teachers))
  x_all, y_all = _digits_inputs("train", alone.dataset)
  teacher_vars = _teacher_variables(teachers)
  for r, replica in enumerate(alone.students.replicas):
    x, y, num_real = _batch(replica.seed, 0, x_all, y_all)
    loss = functools.partial(_reference_loss, replica.arm, _row(params0, r), teacher_vars, x, y,
                             step=0, seed=replica.seed, num_real=num_real, alpha=0.5,
                             temperature=1.0, rcd_range=(0.0, 1.0))
    np.testing.assert_allclose(np.asarray(metrics["loss"])[r], loss(teacher=replica.teacher),
                               rtol=1e-5, err_msg=f"{replica}")
    if replica.arm == "kd":  # the other teacher's loss lies well outside the tolerance
      right, wrong = loss(teacher=replica.teacher), loss(teacher=1 - replica.teacher)
      assert abs(wrong - right) > 10 * 1e-5 * abs(right)

  final = _drive(engine, alone, teachers, state=state)
  for identity, i in rows.items():
    j = batch_rows[identity]
    assert i != j
    _assert_trees_close(_row(final.params, i), _row(students_final.params, j), rtol=1e-5,
                        atol=1e-6, what=f"replica {identity}")


def test_learning_rate_grid_and_kd_window_are_per_replica(teachers):
  """A learning-rate grid and a grid of KD start points become replicas of one program: each
  replica steps with its own base learning rate, and a replica whose KD window opens at half of
  training (step 5 of 10) trains on labels alone before it (one-hot -> KD switching, arXiv
  2301.12923). Run with 'vmap' (the hyperparameters are per-replica data either way; a vmapped
  step of 4 replicas compiles in half the time of the unrolled one)."""
  grid = study_lib.load_data(study_lib.resolve(_config(
      arms="kd", num_seeds=1, optimizer__learning_rate="0.1,0.02", kd_windows="0-1,0.5-1",
      execution="vmap")))
  replicas = grid.students.replicas
  assert [(r.learning_rate, r.kd_start, r.kd_stop) for r in replicas] == [
      (0.1, 0, 10), (0.1, 5, 10), (0.02, 0, 10), (0.02, 5, 10)]
  engine = _engine(grid, "students")
  arrays, placed_teachers = _placed(engine, grid, teachers)
  x_all, y_all = _digits_inputs("train", grid.dataset)
  teacher_vars = _teacher_variables(teachers)
  wd = grid.config.optimizer.weight_decay
  state = engine.init_state()
  for step in range(6):
    before = jax.tree.map(np.asarray, state.params)
    _, order = engine.order_for_step(state, grid.num_train)
    state, metrics = engine.train_step(state, order, arrays, placed_teachers)
    if step not in (0, 4, 5):
      continue
    x, y, num_real = _batch(0, step, x_all, y_all)
    for r, replica in enumerate(replicas):
      alpha = 0.5 if step >= replica.kd_start else 0.0
      loss_fn = functools.partial(_reference_loss, "kd", teacher_vars=teacher_vars, x=x, y=y,
                                  step=step, seed=0, teacher=0, num_real=num_real, alpha=alpha,
                                  temperature=1.0)
      loss, grads = jax.value_and_grad(loss_fn)(_row(before, r))
      np.testing.assert_allclose(np.asarray(metrics["loss"])[r], loss, rtol=1e-5,
                                 err_msg=f"{replica} at step {step}")
      if step == 0:
        lr = replica.learning_rate
        expected = jax.tree.map(lambda p, g: p - lr * (g + wd * p), _row(before, r), grads)
        _assert_trees_close(_row(state.params, r), expected, rtol=1e-5, atol=1e-6,
                            what=f"{replica} after step 0")


# ---------------------------------------------------------------- 3. each arm's loss

ALL_ARMS = ("kd", "rcd", "siddo", "onehot", "label_smoothing", "ensemble_kd",
            "ensemble_standardized_kd", "standardized_kd", "ats", "isats", "dkd", "feature_hint")
# The unrolled path of kd and rcd is checked in test_replica_alone_..., that of the 'ce' kind
# (siddo, onehot) by the teachers' plain loop; an unrolled step compiles per replica, so the
# unrolled run here takes only the other arms.
UNROLLED_ARMS = ("label_smoothing", "ensemble_kd", "ensemble_standardized_kd", "standardized_kd",
                 "ats", "isats", "dkd", "feature_hint")
# Issue 16's arms: the logit baselines at their authors' defaults and the teacher-error controls.
NEW_ARMS = ("nkd", "dist", "ttm", "wttm", "attention_transfer", "kd_correct_only",
            "kd_corrected", "kd_known", "ctkd")
KNOWN_CLASSES = "0-4"  # kd_known's study: teachers of classes 0-4 (config teacher_classes)
ALPHA, TEMPERATURE, RCD_RANGE = 0.3, 2.0, (-1.0, 2.0)
# arm_options.dkd_warmup_epochs = 0.5 of 10 steps: the DKD term at 1/5 of its strength at step 0
# and in full from step 4.
DKD_WARMUP_EPOCHS, DKD_WARMUP_STEPS = 0.5, 5


def _arms_study(execution: str = "auto", arms=ALL_ARMS, **overrides):
  """Each arm once (seed 0, so teacher 0), alpha 0.3, T = 2, noise in U[-1, 2)."""
  return study_lib.load_data(study_lib.resolve(_config(
      arms=",".join(arms), num_seeds=1, alpha=str(ALPHA), temperature=str(TEMPERATURE),
      arm_options__rcd_minval=RCD_RANGE[0], arm_options__rcd_maxval=RCD_RANGE[1],
      arm_options__dkd_warmup_epochs=DKD_WARMUP_EPOCHS, execution=execution, **overrides)))


def _reference_loss(arm: str, params, teacher_vars, x, y, *, step: int, seed: int, teacher: int,
                    num_real: int, alpha: float = ALPHA, temperature: float = TEMPERATURE,
                    rcd_range=RCD_RANGE):
  """The arm's loss as kdjax.losses defines it (the table of kdjax/arms.py), averaged over the
  batch's real examples: `x`, `y` hold the whole padded batch, real examples first."""
  module = models.get("cnn", num_classes=10, width=0.25)
  logits, feats, _ = models.apply_with_features(module, {"params": params}, x, train=True)
  t_out = [models.apply_with_features(module, v, x) for v in teacher_vars]
  teacher_logits, teacher_feats = t_out[teacher][0], t_out[teacher][1]
  ce = losses.softmax_cross_entropy(logits, y)
  a, t = alpha, temperature
  def standardized_kd(teacher_logits):
    kl = losses.kl_divergence(losses.standardize_logits(teacher_logits),
                              losses.standardize_logits(logits), temperature=t)
    return (1 - a) * ce + a * t**2 * kl

  if arm == "ensemble_kd":  # the mean of the kd loss against each member (every teacher here)
    per_example = sum(losses.kd_loss(logits, o[0], y, alpha=a, temperature=t)
                      for o in t_out) / len(t_out)
  elif arm == "ensemble_standardized_kd":
    per_example = sum(standardized_kd(o[0]) for o in t_out) / len(t_out)
  elif arm in ("kd", "rcd"):
    if arm == "rcd":
      key = jax.random.fold_in(_key("students", seed, "rcd"), step)
      teacher_logits = losses.random_control_logits(key, logits.shape, minval=rcd_range[0],
                                                    maxval=rcd_range[1])
    per_example = losses.kd_loss(logits, teacher_logits, y, alpha=a, temperature=t)
  elif arm in ("siddo", "onehot"):
    per_example = ce
  elif arm == "label_smoothing":
    per_example = losses.softmax_cross_entropy(logits, y, label_smoothing=0.1)
  elif arm == "standardized_kd":
    per_example = standardized_kd(teacher_logits)
  elif arm == "ats":  # the ATS authors' form: student at T = 1, weights 0.5 / 0.5, no alpha
    per_example = losses.ats_kd_loss(logits, teacher_logits, y, target_temperature=4.0,
                                     nontarget_temperature=2.0, temperature=1.0, ce_weight=0.5,
                                     kd_weight=0.5)
  elif arm == "isats":
    per_example = losses.isats_kd_loss(logits, teacher_logits, y, target_temperature=4.0,
                                       temperature=1.0, ce_weight=0.5, kd_weight=0.5)
  elif arm == "dkd":  # the DKD term ramps up linearly over DKD_WARMUP_STEPS steps
    warmup = min(1.0, (step + 1) / DKD_WARMUP_STEPS)
    per_example = ce + warmup * losses.dkd_loss(logits, teacher_logits, y, alpha=1.0, beta=8.0,
                                                temperature=t)
  elif arm == "feature_hint":
    per_example = ce + 1.0 * losses.feature_hint_loss(feats["block1"], teacher_feats["block1"])
  elif arm == "nkd":  # the authors' CE + NKD at temp 1, gamma 1.5
    per_example = ce + losses.nkd_loss(logits, teacher_logits, y, temperature=1.0, gamma=1.5)
  elif arm == "dist":  # CE + 2 DIST over the batch's real examples (T = 1, beta = gamma = 1)
    per_example = ce + 2.0 * losses.dist_loss(logits[:num_real], teacher_logits[:num_real])
  elif arm == "ttm":
    per_example = ce + 45.0 * losses.ttm_loss(logits, teacher_logits, gamma=0.1)
  elif arm == "wttm":
    per_example = ce + 4.0 * losses.wttm_loss(logits, teacher_logits, gamma=0.2)
  elif arm == "attention_transfer":  # beta = 1e3 times the sum over block1 and block2
    per_example = ce + 1000.0 * sum(losses.attention_transfer_loss(feats[n], teacher_feats[n])
                                    for n in ("block1", "block2"))
  elif arm == "kd_correct_only":  # the KD term only where the teacher's top class is the label
    correct = (jnp.argmax(teacher_logits, -1) == y).astype(jnp.float32)
    kl = losses.kl_divergence(teacher_logits, logits, temperature=t)
    per_example = (1 - a) * ce + a * t**2 * kl * correct
  elif arm == "kd_corrected":  # where the teacher is wrong, the label's and the top logit swap
    top = jnp.argmax(teacher_logits, -1)
    rows = jnp.arange(y.shape[0])
    at_top, at_label = teacher_logits[rows, top], teacher_logits[rows, y]
    corrected = teacher_logits.at[rows, top].set(at_label).at[rows, y].set(at_top)
    assert bool(jnp.any(top != y))  # the untrained teacher is wrong on some examples
    per_example = losses.kd_loss(logits, corrected, y, alpha=a, temperature=t)
  elif arm == "kd_known":  # KD renormalised over classes 0-4 on their examples, CE elsewhere
    known = jnp.arange(10) < 5
    log_p = lambda z: jax.nn.log_softmax(jnp.where(known, z / t, -1e30), -1)
    log_t, log_s = log_p(teacher_logits), log_p(logits)
    kl = jnp.sum(jnp.where(known, jnp.exp(log_t) * (log_t - log_s), 0.0), -1)
    per_example = jnp.where(y < 5, (1 - a) * ce + a * t**2 * kl, ce)
  elif arm == "ctkd":  # T = 1 + 20 sigmoid(theta), theta's gradient reversed with lambda
    lam = (1 - np.cos(np.pi * (step // STEPS_PER_EPOCH + 1) / 10)) / 2  # epoch 1 of the ramp
    theta = params["ctkd_temperature"]
    reversed_theta = jax.lax.stop_gradient(theta) * (1 + lam) - lam * theta  # value theta
    temperature = 1.0 + 20.0 * jax.nn.sigmoid(reversed_theta)
    per_example = losses.kd_loss(logits, teacher_logits, y, alpha=a, temperature=temperature)
  else:
    raise AssertionError(arm)
  return jnp.mean(per_example[:num_real])


def _batch(seed: int, step: int, x_all, y_all):
  """(x, y, number of real examples) of a student seed's batch at `step` (padded like the
  pipeline: positions past N wrap around and come last)."""
  slots = (step % STEPS_PER_EPOCH) * BATCH + np.arange(BATCH)
  idx = _order("students", seed, step // STEPS_PER_EPOCH)[slots % NUM_TRAIN]
  return x_all[idx], y_all[idx], int(np.sum(slots < NUM_TRAIN))


def _teacher_variables(teachers) -> list[dict]:
  return [{"params": _row(teachers.variables["params"], j)} for j in range(2)]


@pytest.mark.parametrize("execution,arms", [("blocked", UNROLLED_ARMS), ("vmap", ALL_ARMS),
                                            ("blocked", NEW_ARMS), ("vmap", NEW_ARMS)],
                         ids=["blocked", "vmap", "blocked-issue16", "vmap-issue16"])
def test_each_arm_trains_on_the_loss_kdjax_losses_defines(execution, arms, teachers):
  """One engine step per arm against a manual step on the same batch: the logged loss and the
  updated parameters (p - lr (grad + wd p): the first SGD-momentum step, cosine factor 1) at
  step 0, and the loss at step 9, whose batch is padded (46 real examples of 128). Both
  executions meet the same reference, so 'vmap' (every loss kind and teacher signal computed,
  one selected per replica) and 'blocked' (each replica's arm static; 3 rows per block over 8
  replicas, so the last block overlaps the one before it) agree."""
  extra = {"teacher_classes": KNOWN_CLASSES} if "kd_known" in arms else {}
  study = _arms_study(execution, arms, replicas_per_block=3, **extra)
  engine = _engine(study, "students")
  assert engine.execution == execution
  assert [r.arm for r in study.students.replicas] == list(arms)
  x_all, y_all = _digits_inputs("train", study.dataset)
  teacher_vars = _teacher_variables(teachers)
  arrays, placed_teachers = _placed(engine, study, teachers)
  assert study.config.optimizer.learning_rate == "0.1"
  lr, wd = 0.1, study.config.optimizer.weight_decay

  state = engine.init_state()
  for step in range(STEPS_PER_EPOCH):
    before = jax.tree.map(np.asarray, state.params)
    _, order = engine.order_for_step(state, study.num_train)
    state, metrics = engine.train_step(state, order, arrays, placed_teachers)
    if step not in (0, STEPS_PER_EPOCH - 1):
      continue
    x, y, num_real = _batch(0, step, x_all, y_all)
    assert num_real == (BATCH if step == 0 else NUM_TRAIN - 9 * BATCH)
    for r, arm in enumerate(arms):
      params = _row(before, r)
      loss_fn = functools.partial(_reference_loss, arm, teacher_vars=teacher_vars, x=x, y=y,
                                  step=step, seed=0, teacher=0, num_real=num_real)
      if step == 0:
        loss, grads = jax.value_and_grad(loss_fn)(params)
        expected = jax.tree.map(lambda p, g: p - lr * (g + wd * p), params, grads)
        _assert_trees_close(_row(state.params, r), expected, rtol=1e-5, atol=1e-6,
                            what=f"{execution} {arm} params after step 0")
      else:
        loss = loss_fn(params)
      np.testing.assert_allclose(np.asarray(metrics["loss"])[r], loss, rtol=1e-5,
                                 err_msg=f"{execution} {arm} loss at step {step}")


@pytest.mark.parametrize("execution", ["blocked", "vmap"])
def test_mutual_learning_cohorts_share_batches_and_learn_from_each_other(execution):
  """Deep mutual learning (Zhang et al. 2018), cohorts of 2: seeds 0 and 1 see seed 0's batches;
  each replica's first step equals a manual step of CE + KL(p_peer || p_self) at T = 1 with the
  peer's logits on the same batch as constants; seeds 2 and 3 form the second cohort on seed
  2's batches (the last step's batch is padded: only real examples count)."""
  study = study_lib.load_data(study_lib.resolve(_config(
      arms="mutual", num_seeds=4, execution=execution, replicas_per_block=3)))
  assert [r.cohort for r in study.students.replicas] == [(0, 1), (0, 1), (2, 3), (2, 3)]
  engine = _engine(study, "students")
  arrays, _ = _placed(engine, study)
  x_all, y_all = _digits_inputs("train", study.dataset)
  module = models.get("cnn", num_classes=10, width=0.25)
  lr, wd = 0.1, study.config.optimizer.weight_decay
  state = engine.init_state()
  for step in range(STEPS_PER_EPOCH):
    before = jax.tree.map(np.asarray, state.params)
    _, order = engine.order_for_step(state, study.num_train)
    np.testing.assert_array_equal(np.asarray(order)[1], np.asarray(order)[0])
    state, metrics = engine.train_step(state, order, arrays, None)
    if step not in (0, STEPS_PER_EPOCH - 1):
      continue
    for r in range(4):
      peer = r + 1 if r % 2 == 0 else r - 1
      x, y, num_real = _batch(r - r % 2, step, x_all, y_all)
      peer_logits = module.apply({"params": _row(before, peer)}, x, train=True)

      def loss_fn(params, x=x, y=y, num_real=num_real, peer_logits=peer_logits):
        logits = module.apply({"params": params}, x, train=True)
        per_example = losses.softmax_cross_entropy(logits, y) + losses.kl_divergence(
            jax.lax.stop_gradient(peer_logits), logits)
        return jnp.mean(per_example[:num_real])

      loss, grads = jax.value_and_grad(loss_fn)(_row(before, r))
      np.testing.assert_allclose(np.asarray(metrics["loss"])[r], loss, rtol=1e-5,
                                 err_msg=f"{execution} replica {r} loss at step {step}")
      if step == 0:
        expected = jax.tree.map(lambda p, g: p - lr * (g + wd * p), _row(before, r), grads)
        _assert_trees_close(_row(state.params, r), expected, rtol=1e-5, atol=1e-6,
                            what=f"{execution} replica {r} after step 0")


def test_reliability_weighted_ensemble_weighs_members_by_their_scores(teachers):
  """ensemble_kd_reliable's loss is the reliability-weighted mean of the kd loss against each
  member: with scores (1, 0) it is kd from teacher 0 alone, with equal scores the plain
  ensemble_kd; the three arms share seed 0's batches and teacher 0's initialisation."""
  study = _arms_study("vmap", ("kd", "ensemble_kd", "ensemble_kd_reliable"), val_fraction=0.1)
  engine = _engine(study, "students")
  arrays, _ = _placed(engine, study)
  for scores, same_as in (((1.0, 0.0), 0), ((0.7, 0.7), 1)):
    placed = jax.device_put(engine_lib.Teachers(
        variables=teachers.variables, reliability=np.array(scores, np.float32)),
        engine.replicated)
    state = engine.init_state()
    _, order = engine.order_for_step(state, study.num_train)
    state, metrics = engine.train_step(state, order, arrays, placed)
    loss = np.asarray(metrics["loss"])
    np.testing.assert_allclose(loss[2], loss[same_as], rtol=1e-6, err_msg=str(scores))
    _assert_trees_close(_row(state.params, 2), _row(state.params, same_as), rtol=1e-5,
                        atol=1e-7, what=f"reliable vs {same_as} with scores {scores}")
    assert not np.allclose(loss[2], loss[1 - same_as])


def test_calibrated_teacher_is_the_teacher_with_its_head_scaled_by_one_over_t(teachers):
  """kd_calibrated distils from logits / T_j: it equals kd from a teacher whose output layer
  (the cnn's 'head', logits = W h + b) is multiplied by 1/T_j, for T = (2.5, 0.5); with T = 1
  it is kd itself."""
  study = _arms_study("vmap", ("kd", "kd_calibrated"), val_fraction=0.1)
  engine = _engine(study, "students")
  arrays, _ = _placed(engine, study)
  for temperatures in ((2.5, 0.5), (1.0, 1.0)):
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, a: a / np.array(temperatures, np.float32).reshape((2,) + (1,) * (a.ndim - 1))
        if "head" in jax.tree_util.keystr(path) else a, teachers.variables)
    losses_of = []
    for variables, temps, row in ((teachers.variables, temperatures, 1),
                                  (scaled, (1.0, 1.0), 0)):
      placed = jax.device_put(engine_lib.Teachers(
          variables=variables, temperatures=np.array(temps, np.float32)), engine.replicated)
      state = engine.init_state()
      _, order = engine.order_for_step(state, study.num_train)
      state, metrics = engine.train_step(state, order, arrays, placed)
      losses_of.append((np.asarray(metrics["loss"])[row], _row(state.params, row)))
    (calibrated, params_c), (kd_scaled, params_k) = losses_of
    np.testing.assert_allclose(calibrated, kd_scaled, rtol=1e-5, err_msg=str(temperatures))
    _assert_trees_close(params_c, params_k, rtol=1e-4, atol=1e-6,
                        what=f"kd_calibrated vs kd from the scaled head, T = {temperatures}")


# ---------------------------------------------------------------- 4. noise and orders


def test_rcd_replicas_see_fresh_uniform_noise(study):
  """The RCD teacher signal is U[rcd_minval, rcd_maxval), redrawn every step, per replica."""
  engine = _engine(study, "students")
  state = engine.init_state()
  rcd = [r.index for r in study.students.replicas if r.arm == "rcd"]
  assert len(rcd) == 2
  draws = {}
  for r in rcd:
    keys = jax.tree.map(lambda a: a[r], state.keys)
    hp = jax.tree.map(lambda a: a[r], engine.hp)
    for step in (0, 1):
      noise, features = engine._teacher_signal(  # pylint: disable=protected-access
          "noise", None, None, None, None, jnp.zeros((BATCH, 10)), keys, hp, jnp.int32(step))
      assert features is None and noise.shape == (BATCH, 10)
      draws[r, step] = np.asarray(noise).ravel()
  for (r, step), values in draws.items():
    assert 0.0 <= values.min() and values.max() < 1.0, (r, step)
    assert scipy_stats.kstest(values, "uniform").pvalue > 1e-4, (r, step)
  keys = list(draws)
  for i, a in enumerate(keys):
    for b in keys[i + 1:]:
      assert not np.allclose(draws[a], draws[b]), (a, b)


def test_epoch_orders_follow_the_documented_streams(study):
  """Every replica visits every example once per epoch in the order permutation(fold_in(data
  key, epoch)); students of one seed share it across arms (paired arms); SIDDO's order differs
  from its teacher's and from other seeds'; a new epoch reshuffles; shared_order=True gives
  every replica replica 0's order."""
  engine = _engine(study, "students")
  state = engine.init_state()
  for epoch in (0, 1):
    got_epoch, order = engine.order_for_step(
        state.replace(step=jnp.int32(epoch * STEPS_PER_EPOCH + 3)), NUM_TRAIN)
    order = np.asarray(order)
    assert got_epoch == epoch and order.shape == (6, NUM_TRAIN)
    for r, (arm, seed) in enumerate(STUDENT_ROWS):
      np.testing.assert_array_equal(np.sort(order[r]), np.arange(NUM_TRAIN))
      np.testing.assert_array_equal(order[r], _order("students", seed, epoch), err_msg=arm)
    siddo = [order[r] for r, (arm, _) in enumerate(STUDENT_ROWS) if arm == "siddo"]
    assert not np.array_equal(siddo[0], siddo[1])
    for seed in (0, 1):
      assert not np.array_equal(siddo[seed], _order("teacher", seed, epoch))
  assert not np.array_equal(_order("students", 0, 0), _order("students", 0, 1))

  shared = study_lib.load_data(study_lib.resolve(_config(shared_order=True)))
  shared_engine = _engine(shared, "students")
  _, order = shared_engine.order_for_step(shared_engine.init_state(), NUM_TRAIN)
  order = np.asarray(order)
  for r in range(6):
    np.testing.assert_array_equal(order[r], _order("students", 0, 0))


# ---------------------------------------------------------------- 5. initialisation


def test_students_start_from_their_teachers_initial_parameters(study):
  """kd, rcd and siddo replicas of seed s start exactly at teacher (s mod 2)'s initial
  parameters, the documented teacher init stream; the arms' 'config' inits follow
  student_init='teacher'; onehot and label_smoothing start from their own fresh stream."""
  module = models.get("cnn", num_classes=10, width=0.25)
  teacher_init = [_init_params(module, _key("teacher", j, "init")) for j in range(2)]
  fresh = _init_params(module, _key("students", 0, "init"))
  state = _engine(study, "students").init_state()
  for r, (arm, seed) in enumerate(STUDENT_ROWS):
    _assert_trees_equal(_row(state.params, r), teacher_init[seed % 2], what=f"{arm} s{seed}")
  teacher_state = _engine(study, "teacher").init_state()
  for j in range(2):
    _assert_trees_equal(_row(teacher_state.params, j), teacher_init[j], what=f"teacher {j}")

  arms = _arms_study()
  state = _engine(arms, "students").init_state()
  for r, arm in enumerate(ALL_ARMS):
    expected = fresh if arm in ("onehot", "label_smoothing") else teacher_init[0]
    _assert_trees_equal(_row(state.params, r), expected, what=arm)
    if arm in ("onehot", "label_smoothing"):
      assert not _trees_equal(_row(state.params, r), teacher_init[0])


# ---------------------------------------------------------------- 6. checkpoint and restart


def test_checkpoint_restart_gives_the_same_final_state(study, workdir_a, teachers,
                                                       students_final, tmp_path, capsys):
  """Stop the students stage after 4 steps and save; then (a) a new Engine restores and steps to
  the end, (b) kdjax.train.run_stage resumes: both end bitwise at the uninterrupted run's state.
  A third run finds the stage finished and leaves the checkpoints untouched."""
  workdir_b = tmp_path / "b"
  shutil.copytree(pathlib.Path(workdir_a) / "teacher", workdir_b / "teacher")
  engine = _engine(study, "students")
  state = _drive(engine, study, teachers, stop=4)
  ckpt = train.checkpoints(str(workdir_b), "students", study.run)
  metadata = checkpoint_lib.replica_metadata("students", engine.group.replicas)
  assert ckpt.save(4, {"group0": state}, metadata, force=True)
  ckpt.wait()
  ckpt.close()

  resumed_engine = _engine(study, "students")
  ckpt = train.checkpoints(str(workdir_b), "students", read_only=True)
  restored, restored_metadata = ckpt.restore({"group0": resumed_engine.abstract_state()}, 4)
  restored = restored["group0"]
  ckpt.close()
  assert int(restored.step) == 4 and restored_metadata == metadata
  final = _drive(resumed_engine, study, teachers, state=resumed_engine.place(restored))
  _assert_trees_equal(final, students_final, what="manual restart")

  train.run_stage(study, "students", str(workdir_b))
  resumed = train.load_final_state(study, str(workdir_b), "students")[1]["group0"]
  _assert_trees_equal(resumed, students_final, what="run_stage resume")
  capsys.readouterr()

  checkpoints_dir = workdir_b / "students" / "checkpoints"
  before = _files_digest(checkpoints_dir)
  train.run_stage(study, "students", str(workdir_b))
  assert "already finished" in capsys.readouterr().out
  assert _files_digest(checkpoints_dir) == before


# ---------------------------------------------------------------- 7. two devices


@pytest.mark.parametrize("execution", ["blocked", "vmap"])
def test_two_devices_give_the_results_of_one(execution, study, workdir_a, two_device_runs,
                                             teacher_final, students_final):
  """`python -m kdjax.main` on 2 CPU devices (replica axis sharded with shard_map) ends where
  the 1-device in-process run ends, with either execution; its checkpoints load in this
  1-device process (train on several accelerators, analyse on one)."""
  workdir = two_device_runs[execution]
  for stage, expected in (("teacher", teacher_final), ("students", students_final)):
    state = train.load_final_state(study, workdir, stage)[1]["group0"]
    assert int(state.step) == int(expected.step)
    _assert_trees_close(state.params, expected.params, rtol=1e-5, atol=1e-6,
                        what=f"2 devices {execution} {stage}")
    # The sharded eval logs what the 1-device eval logs.
    ours = _event_scalars(pathlib.Path(workdir_a) / stage)
    theirs = _event_scalars(pathlib.Path(workdir) / stage)
    evals = [tag for tag in ours if tag.endswith(("eval_accuracy", "eval_loss"))]
    assert evals and sorted(evals) == sorted(t for t in theirs if t.endswith(
        ("eval_accuracy", "eval_loss")))
    for tag in evals:
      final = int(expected.step)
      assert theirs[tag][final] == pytest.approx(ours[tag][final], rel=1e-4, abs=1e-6), tag
  with open(os.path.join(workdir, "config.json")) as f:
    written = json.load(f)
  assert written["execution"] == execution
  assert {k: written[k] for k in STUDY} == STUDY


# ---------------------------------------------------------------- 8. logs and metadata


def _event_scalars(stage_dir) -> dict[str, dict[int, float]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  scalars: dict[str, dict[int, float]] = {}
  files = sorted(pathlib.Path(stage_dir).glob("events.out.tfevents.*"))
  assert files, f"no TensorBoard event file in {stage_dir}"
  for path in files:
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        number = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
        scalars.setdefault(value.tag, {})[event.step] = float(number)
  return scalars


def test_tensorboard_events_and_replica_metadata(study, workdir_a, teacher_final,
                                                 students_final):
  """Each stage directory holds event files whose final eval accuracy and loss per replica equal
  a forward pass of the final parameters over the test split, and replicas.json naming every
  replica."""
  module = models.get("cnn", num_classes=10, width=0.25)
  x_test, y_test = _digits_inputs("test", study.dataset)
  apply = jax.jit(lambda p: module.apply({"params": p}, x_test, train=False))
  for stage, state in (("teacher", teacher_final), ("students", students_final)):
    stage_dir = pathlib.Path(workdir_a) / stage
    scalars = _event_scalars(stage_dir)
    replicas = study.stage(stage).replicas
    final_step = int(state.step)
    for r in replicas:
      tag = f"replica_{r.index:03d}_{r.arm}_s{r.seed}"
      log_p = np.asarray(jax.nn.log_softmax(apply(_row(state.params, r.index))))
      accuracy = np.mean(np.argmax(log_p, -1) == y_test)
      cross_entropy = -np.mean(log_p[np.arange(len(y_test)), y_test])
      assert scalars[f"{tag}/eval_accuracy"][final_step] == pytest.approx(accuracy, abs=1e-6)
      assert scalars[f"{tag}/eval_loss"][final_step] == pytest.approx(cross_entropy, rel=1e-4)
    for arm in {r.arm for r in replicas}:
      members = [scalars[f"replica_{r.index:03d}_{r.arm}_s{r.seed}/eval_accuracy"][final_step]
                 for r in replicas if r.arm == arm]
      assert scalars[f"arm_{arm}/eval_accuracy"][final_step] == pytest.approx(np.mean(members))

    with open(stage_dir / "replicas.json") as f:
      metadata = json.load(f)
    assert metadata["stage"] == stage
    named = [(m["index"], m["arm"], m["seed"], m["teacher"], m["alpha"], m["temperature"])
             for m in metadata["replicas"]]
    if stage == "teacher":
      assert named == [(j, "teacher", j, -1, 0.0, 1.0) for j in range(2)]
    else:
      assert named == [(i, arm, seed, seed % 2, 0.0 if arm == "siddo" else 0.5, 1.0)
                       for i, (arm, seed) in enumerate(STUDENT_ROWS)]
