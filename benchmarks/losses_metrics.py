"""Throughput of kdjax.losses and kdjax.metrics under jit and vmap over a replica axis.

  ./kd bench losses_metrics --replicas 1 8 32 --batch 128 --classes 10 100

For each (R, C) it times, after warm-up, one jitted call that evaluates for R replicas at once
  * `kd`:      value and gradient of the mean KD loss (per-replica alpha and temperature),
  * `dkd`:     value and gradient of the mean DKD loss,
  * `metrics`: `SimilarityMetrics.from_batch` (all docs/design.md metrics of one eval batch),
and prints microseconds per call and examples (R x batch) per second, vmapped vs a Python loop of
single-replica jitted calls.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from kdjax import losses, metrics


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def _kd(s, t, y, alpha, temperature):
  return jax.value_and_grad(
      lambda s: losses.kd_loss(s, t, y, alpha=alpha, temperature=temperature).mean())(s)


def _dkd(s, t, y, alpha, temperature):
  del alpha
  return jax.value_and_grad(
      lambda s: losses.dkd_loss(s, t, y, temperature=temperature).mean())(s)


def _metrics(s, t, y, alpha, temperature):
  del alpha, temperature
  return metrics.SimilarityMetrics.from_batch(s, t, y)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--replicas", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()

  rows = []
  print(f"backend={jax.default_backend()} batch={args.batch}")
  print(f"{'fn':8s} {'R':>4s} {'C':>4s} {'vmap us':>10s} {'loop us':>10s} {'vmap ex/s':>12s}")
  for num_classes in args.classes:
    for num_replicas in args.replicas:
      keys = jax.random.split(jax.random.PRNGKey(0), 3)
      shape = (num_replicas, args.batch, num_classes)
      s = jax.random.normal(keys[0], shape) * 3
      t = jax.random.normal(keys[1], shape) * 3
      y = jax.random.randint(keys[2], shape[:-1], 0, num_classes)
      alpha = jnp.linspace(0.1, 0.9, num_replicas)
      temperature = jnp.linspace(1.0, 4.0, num_replicas)
      for name, fn in (("kd", _kd), ("dkd", _dkd), ("metrics", _metrics)):
        vmapped = jax.jit(jax.vmap(fn))
        single = jax.jit(fn)
        t_vmap = _time(vmapped, s, t, y, alpha, temperature, repeats=args.repeats)
        t_loop = _time(lambda *a: [single(*(x[r] for x in a)) for r in range(num_replicas)],
                       s, t, y, alpha, temperature, repeats=max(1, args.repeats // 5))
        examples = num_replicas * args.batch
        rows.append({"fn": name, "replicas": num_replicas, "classes": num_classes,
                     "vmap_us": t_vmap * 1e6, "loop_us": t_loop * 1e6,
                     "vmap_examples_per_sec": examples / t_vmap})
        print(f"{name:8s} {num_replicas:4d} {num_classes:4d} {t_vmap * 1e6:10.1f} "
              f"{t_loop * 1e6:10.1f} {examples / t_vmap:12.0f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"backend": jax.default_backend(), "batch": args.batch, "results": rows}, f,
                indent=1)


if __name__ == "__main__":
  main()
