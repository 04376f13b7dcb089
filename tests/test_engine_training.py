"""Engine coverage beyond tests/test_engine.py: BatchNorm, dropout, augmentation, optimisers.

tests/test_engine.py checks the engine on the cnn (no BatchNorm, no dropout) with SGD + cosine and
no augmentation. Here each test trains a small stage with the engine for a few steps and compares
every replica with a plain single-model loop written in this file from the documented contracts:
  * stream keys fold_in(fold_in(fold_in(PRNGKey(config seed), STAGE), replica seed), STREAM)
    (kdjax/replicas.py), epoch orders permutation(fold_in(data key, epoch), N) and batch
    positions (kdjax/data/pipeline.py): imported from tests/test_engine.py;
  * augmentation key fold_in(augment key, step) (kdjax/data/pipeline.py), with the crop and flip
    re-implemented here in numpy;
  * dropout key fold_in(dropout key, step) (kdjax/engine.py, Engine._dropout_key);
  * the optimiser semantics of kdjax/optim.py's docstring, composed here from optax primitives
    (never kdjax.optim.make_optimizer).
Where a wrong reference could pass unnoticed, a test also checks that the engine ends far from
a plain loop that gets the dropout key, the augmentation, the learning rate or the clipping wrong.

Helpers are imported from tests/test_engine.py (pytest's default 'prepend' import mode puts tests/
on sys.path), and so is its module-scoped persistent compilation cache, through which a
reference's model init reuses the engine's compiled one.

Compiling, not running, is what these few-step tests spend their time on, so the module compiles
with `jax_disable_most_optimizations` (`fast_compilation` below; other test modules import it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import data
from kdjax import models
from kdjax import optim
from kdjax import study as study_lib
from test_engine import BATCH, NUM_TRAIN
from test_engine import _assert_trees_close as _close
from test_engine import _config, _digits_inputs, _drive, _engine, _key, _order, _placed, _row
from test_engine import compilation_cache  # noqa: F401  (its module-scoped autouse fixture)

MLP = {"hidden": (32,)}  # a 64-32-10 MLP: the cheapest model to compile besides `linear`
LR = 0.1  # the default config's learning rate (teachers use the first of the grid)


@contextlib.contextmanager
def optimizations_disabled():
  """`jax_disable_most_optimizations` inside the block (restored afterwards): XLA skips LLVM's
  optimisation passes, which halves XLA:CPU's compile time of small programs (a vgg8 gradient
  step: 5.4 s -> 2.8 s of CPU) at no cost that matters for a few steps. What the programs
  compute is unchanged: float32 results differ from an optimised build by rounding only, far
  inside the tests' tolerances. Subprocesses get the same from the environment variable
  JAX_DISABLE_MOST_OPTIMIZATIONS=1."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module", autouse=True)
def fast_compilation():
  """`optimizations_disabled` for the whole module."""
  with optimizations_disabled():
    yield


# ---------------------------------------------------------------------------------- reference


@dataclasses.dataclass(frozen=True)
class _Opt:
  """kdjax/optim.py's documented optimiser, written from its docstring with optax primitives:

    sgd:   g <- clip(g); g <- g + wd * p (coupled L2); trace with momentum (optionally Nesterov);
           p <- p - lr(t) * trace
    adamw: g <- clip(g); u <- adam(g) + wd * p (decoupled, Loshchilov & Hutter arXiv 1711.05101,
           scaled by the learning rate as PyTorch's AdamW and optax.adamw); p <- p - lr(t) * u
    lr(t) = base_lr * shape(t); shape: 'cosine' 0.5 (1 + cos(pi (t - w) / (T - w))) after a linear
    warm-up t / w over w = warmup_steps; 'constant' min(t / w, 1); 'step' decay_factor ** (number
    of boundaries round(f * T) <= t); clip = scale by min(1, c / ||g||_2) when c > 0.
  """
  name: str = "sgd"
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 5e-4
  schedule: str = "cosine"
  total_steps: int = 20
  warmup_steps: int = 0
  decay_boundaries: tuple[float, ...] = ()
  decay_factor: float = 0.1
  grad_clip_norm: float = 0.0

  def shape(self, count):
    t = jnp.asarray(count, jnp.float32)
    w, total = self.warmup_steps, self.total_steps
    if self.schedule == "step":
      passed = sum((t >= round(f * total)).astype(jnp.float32) for f in self.decay_boundaries)
      return jnp.float32(self.decay_factor) ** passed
    ramp = jnp.minimum(t / w, 1.0) if w else jnp.float32(1.0)
    if self.schedule == "constant":
      return ramp
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip((t - w) / (total - w), 0.0, 1.0)))
    return jnp.where(t < w, ramp, cosine)

  def tx(self, learning_rate) -> optax.GradientTransformation:
    lr = lambda count: learning_rate * self.shape(count)
    if self.name == "adamw":
      core = [optax.scale_by_adam(), optax.add_decayed_weights(self.weight_decay),
              optax.scale_by_learning_rate(lr)]
    else:
      core = [optax.add_decayed_weights(self.weight_decay),
              optax.trace(decay=self.momentum, nesterov=self.nesterov),
              optax.scale_by_learning_rate(lr)]
    clip = [optax.clip_by_global_norm(self.grad_clip_norm)] if self.grad_clip_norm > 0 else []
    return optax.chain(*clip, *core)


@functools.lru_cache(maxsize=None)
def _reference_step(module, opt: _Opt):
  """One jitted plain step of `module` under `opt`; the base learning rate is an argument (the
  optimiser state does not depend on it), so one compile serves every replica."""

  @jax.jit
  def step(params, batch_stats, opt_state, x, y, weight, dropout_key, learning_rate):
    def loss_fn(p):
      variables = {"params": p, **({"batch_stats": batch_stats} if batch_stats else {})}
      logits, state = module.apply(variables, x, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": dropout_key})
      ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
      return jnp.sum(weight * ce) / jnp.sum(weight), state.get("batch_stats", {})

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.tx(learning_rate).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, optax.global_norm(grads)

  return step


def _plain_loop(module, opt: _Opt, *, init_key, learning_rate: float, batches,
                dropout_keys=None) -> dict:
  """Trains one model from module.init(init_key) on `batches` [(x, y, weight)], the weights
  marking the real examples of a padded batch; returns its initial and final variables and the
  gradient norms (before clipping) of every step."""
  x0 = jnp.zeros((1,) + batches[0][0].shape[1:], jnp.float32)
  # Compiled as the engine compiles its init, so the persistent cache serves it.
  init = jax.jit(lambda key: module.init(key, x0, train=False))(init_key)
  params, batch_stats = init["params"], init.get("batch_stats", {})
  opt_state = opt.tx(learning_rate).init(params)
  step = _reference_step(module, opt)
  norms = []
  for s, (x, y, weight) in enumerate(batches):
    key = jax.random.PRNGKey(0) if dropout_keys is None else dropout_keys[s]
    params, batch_stats, opt_state, norm = step(params, batch_stats, opt_state, x, y, weight,
                                                key, jnp.float32(learning_rate))
    norms.append(float(norm))
  return {"init": init, "params": params, "batch_stats": batch_stats, "grad_norms": norms}


def _positions(stage: str, seed: int, step: int, batch_size: int):
  """(indices, weight) of a replica's batch at `step`: positions (step mod spe) * B + [0, B) of its
  epoch's order; positions past N wrap around (mod N) and weigh 0."""
  spe = -(-NUM_TRAIN // batch_size)
  slots = (step % spe) * batch_size + np.arange(batch_size)
  order = _order(stage, seed, step // spe)
  return order[slots % NUM_TRAIN], (slots < NUM_TRAIN).astype(np.float32)


def _batches(stage: str, seed: int, steps: int, x_all, y_all, batch_size: int = BATCH):
  out = []
  for s in range(steps):
    idx, weight = _positions(stage, seed, s, batch_size)
    out.append((x_all[idx], y_all[idx], weight))
  return out


def _study(**overrides) -> study_lib.Study:
  return study_lib.load_data(study_lib.resolve(_config(**overrides)))


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------- 1. BatchNorm


def _first_conv_statistics(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and biased variance over (batch, H, W) of a 3x3 'same' convolution,
  x [B, H, W, 1], kernel [3, 3, 1, C]: out = sum_ij pad(x)[:, i:i+H, j:j+W] kernel[i, j] + bias."""
  b, h, w, _ = x.shape
  padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(padded[:, i:i + h, j:j + w, :] * kernel[i, j].astype(np.float64)
            for i in range(3) for j in range(3)) + bias
  return out.mean((0, 1, 2)), out.var((0, 1, 2))


def test_batch_norm_replicas_equal_plain_loops():
  """vgg8 (conv + BatchNorm + ReLU blocks; its init compiles in about half of resnet8's time)
  at width 0.25, 2 teacher replicas, 3 steps of the default SGD + cosine: each replica's
  parameters AND batch statistics equal a plain loop that applies the model with train=True and
  mutable batch_stats. After the first step the first BatchNorm's running statistics are, by
  hand, 0.9 * (0, 1) + 0.1 * (mean, biased variance) of that replica's first convolution over its
  own batch (PyTorch's momentum 0.1, kdjax/models/_common.py)."""
  study = _study(model="vgg8", model_kwargs={"width": 0.25})
  engine = _engine(study, "teacher")
  assert engine.num_replicas == 2 and study.teacher.total_steps == 20
  module = models.get("vgg8", num_classes=10, width=0.25)
  x_all, y_all = _digits_inputs("train", study.dataset)

  state = _drive(engine, study, stop=1)
  stats_after_one = jax.tree.map(np.asarray, state.batch_stats)
  state = _drive(engine, study, state=state, stop=3)
  assert len(state.batch_stats) == 5  # one BatchNorm per conv block

  for j in range(2):
    batches = _batches("teacher", j, 3, x_all, y_all)
    ref = _plain_loop(module, _Opt(), init_key=_key("teacher", j, "init"),
                      learning_rate=LR, batches=batches)
    _close(_row(state.params, j), ref["params"], rtol=1e-5, atol=1e-6, what=f"params {j}")
    _close(_row(state.batch_stats, j), ref["batch_stats"], rtol=1e-5, atol=1e-6,
           what=f"batch_stats {j}")
    conv = jax.tree.map(np.asarray, ref["init"]["params"]["block0_conv0"])
    mean, var = _first_conv_statistics(batches[0][0], conv["kernel"], conv["bias"])
    first = _row(stats_after_one, j)["block0_bn0"]
    np.testing.assert_allclose(first["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(first["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)
  # Each replica keeps its own statistics.
  assert _max_diff(_row(state.batch_stats, 0), _row(state.batch_stats, 1)) > 1e-2


# ---------------------------------------------------------------- 2. dropout


@pytest.mark.parametrize("execution", ["unrolled", "vmap"])
def test_dropout_draws_follow_each_replicas_dropout_stream(execution):
  """An MLP with dropout 0.5, 2 teacher replicas, 3 steps: replica j equals a plain loop whose
  dropout key at step s is fold_in(dropout stream of teacher j, s), under either execution
  (threefry draws inside a vmap equal separate draws). The reference distinguishes: the same
  loop without dropout, with the other replica's stream, or with one key for every step ends far
  from the engine."""
  study = _study(model="mlp", model_kwargs={**MLP, "dropout": 0.5}, execution=execution)
  engine = _engine(study, "teacher")
  assert engine.execution == execution
  state = _drive(engine, study, stop=3)
  module = models.get("mlp", num_classes=10, dropout=0.5, **MLP)
  no_dropout = models.get("mlp", num_classes=10, **MLP)
  x_all, y_all = _digits_inputs("train", study.dataset)

  def dropout_keys(j, fold_step=True):
    stream = _key("teacher", j, "dropout")
    return [jax.random.fold_in(stream, s if fold_step else 0) for s in range(3)]

  for j in range(2):
    loop = functools.partial(_plain_loop, opt=_Opt(), init_key=_key("teacher", j, "init"),
                             learning_rate=LR, batches=_batches("teacher", j, 3, x_all, y_all))
    ours = _row(state.params, j)
    _close(ours, loop(module, dropout_keys=dropout_keys(j))["params"], rtol=1e-5, atol=1e-6,
           what=f"{execution} replica {j}")
    wrong = {"no dropout": loop(no_dropout),
             "the other replica's stream": loop(module, dropout_keys=dropout_keys(1 - j)),
             "one key for every step": loop(module, dropout_keys=dropout_keys(j, False))}
    for what, ref in wrong.items():
      assert _max_diff(ours, ref["params"]) > 1e-3, f"{execution} replica {j}: {what}"


# ---------------------------------------------------------------- 3. augmentation


def _weak_augment(images: np.ndarray, key, padding: int) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
  """The 'weak' preset in numpy on uint8 images [B, H, W, C]: x / 255, zero-pad by `padding`,
  crop H x W at offsets (dy, dx) in {0..2 padding}, then mirror horizontally with probability
  1/2. The draws follow kdjax/data/pipeline.py: sub-keys (crop, flip, jitter, erase) =
  split(key, 4); offsets = randint(crop key, [B, 2]); flips = bernoulli(flip key, 1/2).
  Returns (augmented float32, offsets, flips)."""
  k_crop, k_flip, _, _ = jax.random.split(key, 4)
  b, h, w, _ = images.shape
  offsets = np.asarray(jax.random.randint(k_crop, (b, 2), 0, 2 * padding + 1))
  flips = np.asarray(jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))).reshape(b)
  x = images.astype(np.float32) / np.float32(255.0)
  padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out = np.stack([padded[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
  out[flips] = out[flips][:, :, ::-1]
  return out, offsets, flips


def test_weak_augmentation_with_per_replica_presets(tmp_path):
  """The digits as a bring-your-own npz dataset (so flips are allowed: flip=True,
  crop_padding=1), teacher_augment='none,weak' with 2 seeds: replicas (none, 0), (none, 1),
  (weak, 0), (weak, 1) in one program, 3 steps. The engine's batches equal the numpy reference
  (crop + flip with replica r's key fold_in(augment stream, step), then (x - mean) / std with the
  train split's mean and population std), and every replica's parameters equal a plain loop on
  those batches. The reference does something: it crops off-centre and flips some images, and
  weak replicas end far from their 'none' twins (same seed: same init and order). The batches
  are built before the replica axis is mapped, so vmapped replicas (one MLP step to compile
  instead of four) check the same augmentation."""
  raw, test = data.load("digits", "train"), data.load("digits", "test")
  path = tmp_path / "digits.npz"
  np.savez(path, x_train=raw["image"][..., 0], y_train=raw["label"], x_test=test["image"][..., 0],
           y_test=test["label"])
  study = _study(dataset=f"npz:{path}", model="mlp", model_kwargs=MLP, augment="weak",
                 teacher_augment="none,weak", execution="vmap")
  spec = study.dataset
  assert (spec.flip, spec.crop_padding, spec.input_shape) == (True, 1, (8, 8, 1))
  pixels = raw["image"].astype(np.float64) / 255.0
  np.testing.assert_allclose([spec.mean[0], spec.std[0]], [pixels.mean(), pixels.std()],
                             rtol=1e-6)
  mean, std = np.float32(spec.mean[0]), np.float32(spec.std[0])
  rows = [(r.augment, r.seed) for r in study.teacher.replicas]
  assert rows == [("none", 0), ("none", 1), ("weak", 0), ("weak", 1)]
  engine = _engine(study, "teacher")

  def reference_batch(preset, seed, step):
    idx, weight = _positions("teacher", seed, step, BATCH)
    images = raw["image"][idx]
    if preset == "none":
      return (images.astype(np.float32) / np.float32(255.0) - mean) / std, raw["label"][idx], \
          weight
    key = jax.random.fold_in(_key("teacher", seed, "augment"), step)
    x, offsets, flips = _weak_augment(images, key, spec.crop_padding)
    # The reference must do something on these examples: off-centre crops and some flips.
    assert np.any(offsets != 1) and 0 < flips.sum() < len(flips)
    assert not np.allclose(x, images / 255.0)
    return (x - mean) / std, raw["label"][idx], weight

  batches = {r: [reference_batch(p, s, step) for step in range(3)] for r, (p, s) in
             enumerate(rows)}
  # The input of step 0, built by the call Engine._train_step makes: a failure here points at
  # the pipeline's augmentation rather than at the training step.
  state = engine.init_state()
  arrays, _ = _placed(engine, study)
  _, order = engine.order_for_step(state, study.num_train)
  got = data.train_batch(arrays, spec, state.keys["augment"], 0, batch_size=BATCH,
                         order=order, augment_preset=tuple(p for p, _ in rows))
  for r in range(4):
    np.testing.assert_allclose(np.asarray(got["image"])[r], batches[r][0][0], rtol=1e-6,
                               atol=1e-6, err_msg=f"replica {rows[r]} batch at step 0")

  state = _drive(engine, study, state=state, stop=3)
  module = models.get("mlp", num_classes=10, **MLP)
  for r, (preset, seed) in enumerate(rows):
    ref = _plain_loop(module, _Opt(), init_key=_key("teacher", seed, "init"),
                      learning_rate=LR, batches=batches[r])
    _close(_row(state.params, r), ref["params"], rtol=1e-5, atol=1e-6,
           what=f"replica {preset} seed {seed}")
  for seed in range(2):
    assert _max_diff(_row(state.params, seed), _row(state.params, 2 + seed)) > 1e-3


# ---------------------------------------------------------------- 4. optimisers

# 1198 examples in batches of 256: 5 steps per epoch, one epoch; step 4 holds 174 real examples.
OPT_BATCH, OPT_STEPS = 256, 5
OPTIMIZERS = {
    # Warm-up over steps 0, 1 (lr 0, lr/2), then cosine to 0 at step 5; clipping at 1.0, which
    # the gradient norms (about 0.75 to 1.9) straddle, so that it changes Adam's updates.
    "adamw_cosine_warmup_clip": dict(name="adamw", weight_decay=0.05, schedule="cosine",
                                     warmup_steps=2, grad_clip_norm=1.0),
    # Linear warm-up over 3 steps, then constant.
    "adamw_constant_warmup": dict(name="adamw", weight_decay=0.05, schedule="constant",
                                  warmup_steps=3),
    # x 0.1 from step round(0.4 * 5) = 2 and again from step 4; Nesterov; clipping at 0.5.
    "sgd_nesterov_step_decay_clip": dict(name="sgd", momentum=0.9, nesterov=True,
                                         weight_decay=5e-4, schedule="step",
                                         decay_boundaries=(0.4, 0.8), decay_factor=0.1,
                                         grad_clip_norm=0.5),
}


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_optimizers_with_a_per_replica_learning_rate(case):
  """The learning-rate grid 0.05,0.1 gives two onehot students of seed 0 (same init, same
  batches) that differ only in their injected base learning rate. Over a whole epoch of 5 steps
  (the last batch padded) each equals a plain loop with the optimiser of kdjax/optim.py's
  docstring composed here from optax primitives, with its own learning rate. The reference
  distinguishes: the swapped learning rates, and where clipping is on the same loop without it,
  end far from the engine. Each replica's optimiser update is the same code under either
  execution; vmapped replicas compile one MLP step instead of two."""
  settings = OPTIMIZERS[case]
  study = _study(model="mlp", model_kwargs=MLP, arms="onehot", num_seeds=1,
                 batch_size=OPT_BATCH, num_epochs=1, execution="vmap",
                 optimizer__learning_rate="0.05,0.1",
                 **{f"optimizer__{k}": v for k, v in settings.items()})
  engine = _engine(study, "students")
  lrs = [r.learning_rate for r in study.students.replicas]
  assert lrs == [0.05, 0.1] and {r.seed for r in study.students.replicas} == {0}
  assert engine.group.total_steps == OPT_STEPS
  state = engine.init_state()
  np.testing.assert_allclose(np.asarray(optim.learning_rate(state.opt_state)), lrs)
  state = _drive(engine, study, state=state)
  assert int(state.step) == OPT_STEPS

  module = models.get("mlp", num_classes=10, **MLP)
  x_all, y_all = _digits_inputs("train", study.dataset)
  batches = _batches("students", 0, OPT_STEPS, x_all, y_all, OPT_BATCH)
  assert batches[-1][2].sum() == NUM_TRAIN - 4 * OPT_BATCH
  opt = _Opt(total_steps=OPT_STEPS, **settings)
  loop = functools.partial(_plain_loop, module, opt=opt, batches=batches,
                           init_key=_key("students", 0, "init"))
  refs = {lr: loop(learning_rate=lr) for lr in lrs}
  # Adam divides by sqrt(v): float32 rounding differences of the batch mean grow by about 10x.
  tolerance = dict(rtol=1e-4, atol=1e-5) if opt.name == "adamw" else dict(rtol=1e-5, atol=1e-6)
  for r, lr in enumerate(lrs):
    ours = _row(state.params, r)
    _close(ours, refs[lr]["params"], **tolerance, what=f"{case} lr {lr}")
    assert _max_diff(ours, refs[lrs[1 - r]]["params"]) > 1e-3, f"{case} lr {lr}: swapped"
    if opt.grad_clip_norm > 0:
      unclipped = loop(learning_rate=lr, opt=dataclasses.replace(opt, grad_clip_norm=0.0))
      assert _max_diff(ours, unclipped["params"]) > 1e-3, (f"{case} lr {lr}: without clipping",
                                                           refs[lr]["grad_norms"])


# ---------------------------------------------------------------- steps per call, bf16 compute


def _run_students(workdir, *, stop_at=None, monkeypatch=None, **overrides):
  """The students stage of a 2-replica onehot MLP study (vmap, 2 epochs of 10 steps) through
  kdjax.train.run_stage in `workdir`; with `stop_at` a stop request is answered at the first
  poll at or after that step (preemption: checkpoint, then Preempted). Returns the final params
  read back from the checkpoints, or None when stopped."""
  import signal as signal_lib
  from kdjax import preemption
  from kdjax import train
  study = _study(model="mlp", model_kwargs=MLP, arms="onehot", num_seeds=2, num_epochs=2,
                 execution="vmap", stages="students", log_every_steps=5, eval_every_steps=10,
                 checkpoint_every_steps=7, **overrides)
  if stop_at is not None:
    def poll(self, step):
      if step >= stop_at:
        self.signum = signal_lib.SIGTERM
      return self.signum is not None
    monkeypatch.setattr(preemption.StopRequests, "poll", poll)
    with pytest.raises(preemption.Preempted):
      train.run_stage(study, "students", str(workdir))
    monkeypatch.undo()
    return None
  train.run_stage(study, "students", str(workdir))
  _, states = train.load_final_state(study, str(workdir), "students")
  return study, states["group0"].params


def test_stage_loop_takes_one_or_k_steps_per_call_between_its_stopping_points():
  """K steps only where no epoch end, log/eval/checkpoint multiple or stage end lies strictly
  inside the call; 1 step otherwise (reference: the boundaries listed by hand)."""
  from kdjax import train
  every = [5, 10, 7]  # log, eval, checkpoint; 10 steps per epoch, 20 in all
  calls, step = [], 0
  while step < 20:
    n = train.steps_this_call(step, 4, 20, 10, every)
    calls.append((step, n))
    step += n
  assert calls == [(0, 4), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1), (9, 1), (10, 4), (14, 1),
                   (15, 4), (19, 1)]
  assert [train.steps_this_call(s, 1, 20, 10, every) for s in (0, 10, 15)] == [1, 1, 1]


def test_steps_per_call_equals_single_calls_and_a_resume_is_exact(tmp_path, monkeypatch):
  """steps_per_call=4 under 'vmap' (scanned K-step calls at steps 0, 10 and 15, single steps at
  the log/eval/checkpoint/epoch boundaries between) ends where steps_per_call=1 ends, and both
  where a plain per-replica loop over the documented batches ends (the reference; it crosses the
  epoch boundary, where the order changes). Stopped by a stop request at step 14 (a checkpoint
  mid-stage) and rerun, the K=4 run ends bitwise where the uninterrupted K=4 run ends."""
  study, one = _run_students(tmp_path / "k1", steps_per_call=1)
  _, four = _run_students(tmp_path / "k4", steps_per_call=4)
  assert _run_students(tmp_path / "k4_resumed", stop_at=12, monkeypatch=monkeypatch,
                       steps_per_call=4) is None
  from kdjax import train
  ckpt = train.checkpoints(str(tmp_path / "k4_resumed"), "students", read_only=True)
  assert ckpt.latest_step() == 14  # the first poll at or after step 12 ends the call 10 -> 14
  ckpt.close()
  _, resumed = _run_students(tmp_path / "k4_resumed", steps_per_call=4)
  _close(four, one, rtol=1e-5, atol=1e-6, what="K=4 against K=1")
  np.testing.assert_equal(jax.tree.map(np.asarray, resumed), jax.tree.map(np.asarray, four))

  total = study.students.total_steps
  assert total == 20
  module = models.get("mlp", num_classes=10, **MLP)
  x_all, y_all = _digits_inputs("train", study.dataset)
  for r, replica in enumerate(study.students.replicas):
    ref = _plain_loop(module, _Opt(total_steps=total), init_key=_key("students", replica.seed,
                                                                     "init"),
                      learning_rate=LR, batches=_batches("students", replica.seed, total,
                                                         x_all, y_all))
    _close(_row(four, r), ref["params"], rtol=1e-5, atol=1e-6, what=f"K=4 replica {r}")


def test_bfloat16_compute_keeps_float32_parameters_and_a_close_loss():
  """compute_dtype='bfloat16': a training step of two cnn students runs, the parameters and
  optimiser state stay float32 and the loss float32, and each replica's loss is within bf16
  tolerance of the float32 step's (the reference) without being equal to it (the convs did
  compute in bf16). Every model family's bf16 dtype threading: tests/test_models.py."""
  losses_by_dtype = {}
  for dtype in ("float32", "bfloat16"):
    study = _study(model="cnn", model_kwargs={"width": 0.25}, arms="onehot", num_seeds=2,
                   execution="vmap", compute_dtype=dtype)
    engine = _engine(study, "students")
    assert engine.module.dtype == jnp.dtype(dtype)
    arrays, _ = _placed(engine, study)
    state = engine.init_state()
    _, order = engine.order_for_step(state, study.num_train)
    state, metrics = engine.train_step(state, order, arrays, None)
    leaves = jax.tree.leaves((state.params, state.opt_state, state.batch_stats))
    assert {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)} == \
        {jnp.dtype("float32")}
    assert metrics["loss"].dtype == jnp.float32
    losses_by_dtype[dtype] = np.asarray(metrics["loss"])
  np.testing.assert_allclose(losses_by_dtype["bfloat16"], losses_by_dtype["float32"],
                             rtol=2e-2)
  assert np.any(losses_by_dtype["bfloat16"] != losses_by_dtype["float32"])
