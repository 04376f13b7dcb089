"""Examples/s of the replica engine against a sequential loop of single-model jitted steps.

  ./kd bench replica_throughput --replicas 1 4 8 16 --json replica_throughput.json
  ./kd bench replica_throughput --model resnet8 --data synthetic32 --replicas 1 4

What is compared, for each R: the engine's teacher stage of a study with num_teachers = R (every
replica trains on labels with its own init and data order and no teacher forward pass, so one
engine step does exactly the work of R single-model steps; a students stage would add teacher
passes that the baseline would have to copy), against the same model, optimiser (the engine's
optax transformation), loss (masked mean cross-entropy) and input pipeline
(`kdjax.data.train_batch` on on-device arrays, one replica's row of the same epoch order) as one
jitted single-replica step, called R times per step from Python. Both start from the engine's
initial state.

Timing: the first call of each program (tracing + XLA compilation + one step) is reported apart
as the compile time; then --warmup steps each, then --repeats runs of --steps steps, engine and
sequential alternating run by run (a shared machine's load changes hit both alike), each run
synchronised with block_until_ready; the median run counts. examples/s = R * batch / (seconds
per step). The epoch order is computed once, outside the timing (kdjax.train.run_stage computes
it once per epoch). Leave JAX's persistent compilation cache off (JAX_COMPILATION_CACHE_DIR
unset), or the compile times are cache reads.

Models: --model cnn on digits (the default study's model and width, configs/default.py), or any
image model of kdjax.models (resnet8, resnet20, ...) on --data synthetic32: random uint8 32x32x3
images with 10 classes written to a temporary `npz:` dataset (speed does not depend on pixel
values).

--json FILE writes {"backend", "model", "results": [{"replicas", "engine_examples_per_sec",
"sequential_examples_per_sec", "engine_compile_sec", "sequential_compile_sec"}], ...}. Target on
CPU: engine >= sequential at every R.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import data
from kdjax import losses
from kdjax import study as study_lib
from kdjax.engine import Engine

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _synthetic32(directory: str, num_train: int) -> str:
  """A random 32x32x3, 10-class npz dataset; returns its kdjax.data name."""
  rng = np.random.default_rng(0)
  path = os.path.join(directory, "synthetic32.npz")
  np.savez(path, x_train=rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
           y_train=np.arange(num_train, dtype=np.int32) % 10,
           x_test=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),
           y_test=np.arange(100, dtype=np.int32) % 10)
  return f"npz:{path}"


def _study(args, replicas: int, dataset: str) -> study_lib.Study:
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  config.dataset = dataset
  config.model = args.model
  kwargs = dict(config.model_kwargs) if args.model == config.model else {}
  if args.width is not None:
    kwargs["width"] = args.width
  config.model_kwargs = ml_collections.ConfigDict(kwargs)
  config.num_teachers = replicas
  config.batch_size = args.batch
  config.execution = args.execution
  config.replicas_per_block = args.replicas_per_block
  config.stages = "teacher"
  config.steps_per_call = args.steps_per_call
  config.compute_dtype = args.compute_dtype
  return study_lib.load_data(study_lib.resolve(config))


def _time(run_steps, steps: int) -> float:
  start = time.perf_counter()
  run_steps(steps)
  return time.perf_counter() - start


def _single_step_fn(engine: Engine, arrays, batch_size: int):
  """One replica's training step, jitted: the engine's model, optimiser, loss and pipeline."""
  module, tx, spec = engine.module, engine.tx, engine.dataset
  aug_key = jnp.zeros((1, 2), jnp.uint32)  # augment 'none': the key is not used

  @jax.jit
  def step(params, batch_stats, opt_state, order_row, step):
    batch = data.train_batch(arrays, spec, aug_key, step, batch_size=batch_size,
                             order=order_row[None], augment_preset="none")
    x, labels, mask = batch[spec.input_key][0], batch["label"][0], batch["mask"][0]

    def loss_fn(params):
      variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
      if batch_stats:
        logits, new_state = module.apply(variables, x, train=True, mutable=["batch_stats"])
        new_stats = new_state["batch_stats"]
      else:
        logits, new_stats = module.apply(variables, x, train=True), batch_stats
      ce = losses.softmax_cross_entropy(logits, labels)
      return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), new_stats

    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state

  return step


def measure(args, replicas: int, dataset: str) -> dict:
  study = _study(args, replicas, dataset)
  engine = Engine(study, study.teacher.groups[0])
  arrays = data.to_device(study.data["train"], engine.replicated)
  state = engine.init_state()
  _, order = engine.order_for_step(state, study.num_train)
  jax.block_until_ready(order)

  # Sequential replicas: the engine's initial state, one slice per replica, on one device.
  device = jax.devices()[0]
  rows = [jax.device_put(jax.tree.map(lambda a, r=r: a[r], (
      state.params, state.batch_stats, state.opt_state, order)), device)
          for r in range(replicas)]
  single_arrays = data.to_device(study.data["train"], device)
  single_step = _single_step_fn(engine, single_arrays, args.batch)
  counter = {"sequential": 0}

  per_call = engine.steps_per_call  # --steps-per-call: each engine call takes K steps

  def engine_steps(n):
    nonlocal state
    for _ in range(n):
      state, _ = engine.train_steps(state, order, arrays, None, per_call)
    jax.block_until_ready(state)

  def sequential_steps(n):
    for _ in range(n):
      step = jnp.int32(counter["sequential"])
      for r in range(replicas):
        params, stats, opt_state, order_row = rows[r]
        rows[r] = (*single_step(params, stats, opt_state, order_row, step), order_row)
      counter["sequential"] += 1
    jax.block_until_ready(rows)

  # First calls (compile + one step), warm-up, then the two alternate run by run, so a change
  # in the machine's load hits both alike.
  engine_compile, seq_compile = _time(engine_steps, 1), _time(sequential_steps, 1)
  engine_steps(args.warmup)
  sequential_steps(args.warmup)
  engine_times, seq_times = [], []
  calls = max(1, args.steps // per_call)
  for _ in range(args.repeats):
    engine_times.append(_time(engine_steps, calls) / (calls * per_call))
    seq_times.append(_time(sequential_steps, args.steps) / args.steps)
  engine_dt, seq_dt = statistics.median(engine_times), statistics.median(seq_times)
  examples = replicas * args.batch
  return {"replicas": replicas, "execution": engine.execution,
          "replicas_per_block": engine.replicas_per_block,
          "engine_examples_per_sec": examples / engine_dt,
          "sequential_examples_per_sec": examples / seq_dt,
          "engine_ms_per_step": engine_dt * 1e3, "sequential_ms_per_step": seq_dt * 1e3,
          "engine_compile_sec": engine_compile, "sequential_compile_sec": seq_compile,
          "steps_per_call": per_call, "compute_dtype": engine.compute_dtype,
          # The device's peak allocation so far in this process (None where the backend does
          # not report it, e.g. CPU): after the largest R, the peak of that R's run.
          "peak_memory_bytes": (device.memory_stats() or {}).get("peak_bytes_in_use")}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 8, 16])
  parser.add_argument("--model", default="cnn", help="a kdjax.models image model")
  parser.add_argument("--width", type=float, default=None,
                      help="width multiplier (default: the config's for cnn, the model's else)")
  parser.add_argument("--data", choices=("digits", "synthetic32"), default=None,
                      help="default: digits for cnn, synthetic32 otherwise")
  parser.add_argument("--num-train", type=int, default=2048, help="synthetic32 examples")
  parser.add_argument("--batch", type=int, default=128, help="per replica")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--execution", choices=study_lib.EXECUTIONS, default="auto")
  parser.add_argument("--replicas-per-block", type=int, default=0,
                      help="execution 'blocked': rows per block (0: the engine's choice)")
  parser.add_argument("--steps-per-call", type=int, default=1,
                      help="engine training steps per jitted call ('vmap' only; 0 = auto)")
  parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--json", default=None, help="write the results to this file")
  args = parser.parse_args(argv)
  data_name = args.data or ("digits" if args.model == "cnn" else "synthetic32")

  with tempfile.TemporaryDirectory() as tmp:
    dataset = "digits" if data_name == "digits" else _synthetic32(tmp, args.num_train)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} "
          f"device(s); {args.model} on {data_name}, batch {args.batch} per replica", flush=True)
    print(f"{'R':>3s} {'execution':9s} {'engine ex/s':>12s} {'seq. ex/s':>12s} {'ratio':>6s} "
          f"{'engine ms':>10s} {'seq. ms':>8s} {'compile s (engine/seq.)':>24s}", flush=True)
    results = []
    for replicas in args.replicas:
      r = measure(args, replicas, dataset)
      results.append(r)
      ratio = r["engine_examples_per_sec"] / r["sequential_examples_per_sec"]
      print(f"{replicas:3d} {r['execution']:9s} {r['engine_examples_per_sec']:12.0f} "
            f"{r['sequential_examples_per_sec']:12.0f} {ratio:6.2f} "
            f"{r['engine_ms_per_step']:10.2f} {r['sequential_ms_per_step']:8.2f} "
            f"{r['engine_compile_sec']:15.1f} / {r['sequential_compile_sec']:.1f}", flush=True)
    # What a user waits for is both: the steps' speed and the compile before the first step.
    for r in results:
      print(f"R={r['replicas']}: {r['execution']} engine {r['engine_examples_per_sec']:.0f} "
            f"examples/s ({r['engine_examples_per_sec'] / r['sequential_examples_per_sec']:.2f}x "
            f"the sequential loop) after compiling for {r['engine_compile_sec']:.1f} s "
            f"(sequential: {r['sequential_compile_sec']:.1f} s)", flush=True)

  if args.json:
    with open(args.json, "w") as f:
      json.dump({"backend": jax.default_backend(), "model": args.model, "data": data_name,
                 "width": args.width, "batch": args.batch, "steps": args.steps,
                 "device_count": jax.device_count(), "jax": jax.__version__,
                 "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
