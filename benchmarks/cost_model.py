"""What XLA says a training step costs: FLOPs and bytes per replica step, and the work the vmap
program spends on teacher signals and losses that a replica's own arm does not need.

  ./kd bench cost_model                      # the default study's students (kd, rcd, siddo)
  ./kd bench cost_model --arms kd,siddo,ensemble_kd --num-teachers 2 --seeds 4

For the students stage of configs/default.py (or the arms given), the step is compiled three ways
and XLA's `cost_analysis()` of each compiled program is read (flops, bytes accessed):
  * vmap, every kind selected by code: one vmapped program in which every replica computes every
    teacher signal and loss kind present in the stage and keeps its own (kdjax before arm
    segments; forced here by giving the block a single segment of all rows);
  * vmap by arm segments (today's 'vmap'): each run of one arm's replicas vmapped on its own;
  * what the replicas' own arms need: the sum over replicas of the single-replica program of
    its arm ('blocked' with one row per block, one program per arm).
The batch-building program is the same for all three and not counted. `memory_analysis()` of
the vmap program gives its device memory (arguments, outputs, temporaries). Runs on CPU; the
counts are XLA's, not measured time.

  ./kd bench cost_model --models cnn,resnet20,resnet56,wrn_40_2 [--batch 128] [--json F]

With --models, per model instead (cnn on digits at the default study's width; any other on
random 32x32x3 `npz:` data, CIFAR size, as benchmarks/replica_throughput.py builds it), for a
teacher stage (labels only, no teacher pass) compiled as the engine compiles it:
  * FLOPs and bytes accessed per replica step: XLA's cost_analysis of the single-replica block
    program ('blocked', one row);
  * the FLOP overhead of the vmap program at R = 2 over 2 independent replicas;
  * device memory for R replicas: memory_analysis of the vmap block program (arguments +
    outputs - donated aliases + temporaries) plus the train split on the device, at R = 1 and
    R = 2; memory is linear in R (state, batches and activations all scale with R), so the fit
    a + b R gives the largest R that fits 80 GB (A100/H100) and 141 GB (H200).
The batch-building program is not counted (its FLOPs are nil; its memory is the batch, which
the block program's arguments already hold). On 2 CPU cores compiling the four models takes a
few minutes (resnet56 and wrn_40_2 most of it; the README gives the measured time).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from kdjax import data
from kdjax import study as study_lib
from kdjax.engine import Engine, Teachers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _study(args, execution: str) -> study_lib.Study:
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  config.arms, config.num_seeds, config.num_teachers = args.arms, args.seeds, args.num_teachers
  config.stages, config.execution, config.replicas_per_block = "students", execution, 1
  return study_lib.load_data(study_lib.resolve(config))


def _step_setup(engine: Engine, study) -> tuple:
  """(state, epoch order, arrays, teachers) of `engine`'s first step; teachers untrained."""
  teachers = None
  if engine.group.teacher_group is not None:
    teacher = Engine(study, study.teacher.groups[0])
    teachers = jax.device_put(Teachers(variables=teacher.init_state().variables()),
                              engine.replicated)
  arrays = data.to_device(study.data["train"], engine.replicated)
  state = engine.init_state()
  _, order = engine.order_for_step(state, study.num_train)
  return state, order, arrays, teachers


def _analysis(compiled) -> dict:
  """flops, bytes accessed and the memory plan of a compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory = compiled.memory_analysis()
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0)),
          "memory": memory}


def _costs(engine: Engine, study, pattern=None) -> list[dict]:
  """XLA's cost and memory analysis of each block program of one step (in block order)."""
  out = []
  for lowered in engine.lower_train_blocks(*_step_setup(engine, study), pattern=pattern):
    cost = _analysis(lowered.compile())
    memory = cost.pop("memory")
    cost["memory_bytes"] = None if memory is None else int(
        memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes)
    out.append(cost)
  return out


GB = 1e9
DEVICE_MEMORY_GB = (80, 141)  # A100/H100 80 GB; H200 141 GB


def _model_study(model: str, replicas: int, dataset: str, batch: int, execution: str):
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  if model != config.model:
    config.model_kwargs = {}
  config.model, config.dataset, config.batch_size = model, dataset, batch
  config.num_teachers, config.stages = replicas, "teacher"
  config.execution, config.replicas_per_block = execution, 1
  return study_lib.load_data(study_lib.resolve(config))


def _program_costs(model: str, replicas: int, dataset: str, batch: int, execution: str) -> dict:
  """XLA's cost and memory analysis of the (first) block program of a teacher stage of
  `replicas` replicas of `model`, and its compile time."""
  study = _model_study(model, replicas, dataset, batch, execution)
  engine = Engine(study, study.teacher.groups[0])
  (lowered, *_) = engine.lower_train_blocks(*_step_setup(engine, study))
  begin = time.perf_counter()
  cost = _analysis(lowered.compile())
  seconds = time.perf_counter() - begin
  memory = cost.pop("memory")
  dataset_bytes = sum(int(np.asarray(a).nbytes) for a in jax.tree.leaves(study.data["train"]))
  program_bytes = None if memory is None else int(
      memory.argument_size_in_bytes + memory.output_size_in_bytes -
      memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return {**cost, "program_memory_bytes": program_bytes, "dataset_bytes": dataset_bytes,
          "compile_sec": seconds, "replicas_per_block": engine.replicas_per_block}


def model_costs(model: str, dataset: str, batch: int) -> dict:
  """Per replica step FLOPs and bytes, the vmap FLOP overhead at R = 2, and the memory fit."""
  single = _program_costs(model, 1, dataset, batch, "blocked")
  vmaps = {r: _program_costs(model, r, dataset, batch, "vmap") for r in (1, 2)}
  out = {"model": model, "batch": batch, "flops_per_replica_step": single["flops"],
         "bytes_per_replica_step": single["bytes"],
         "vmap_flop_overhead": vmaps[2]["flops"] / (2 * single["flops"]),
         "vmap_bytes_overhead": vmaps[2]["bytes"] / (2 * single["bytes"]),
         "compile_sec": {"single": single["compile_sec"],
                         **{f"vmap_r{r}": v["compile_sec"] for r, v in vmaps.items()}}}
  if vmaps[1]["program_memory_bytes"] is not None:
    total = {r: v["program_memory_bytes"] + v["dataset_bytes"] for r, v in vmaps.items()}
    per_replica = total[2] - total[1]
    fixed = total[1] - per_replica
    out.update(memory_bytes={str(r): b for r, b in total.items()},
               memory_per_replica_bytes=per_replica, memory_fixed_bytes=fixed,
               max_replicas={str(gb): int((gb * GB - fixed) // max(per_replica, 1))
                             for gb in DEVICE_MEMORY_GB})
  return out


def models_main(args) -> list[dict]:
  sys.path.insert(0, str(ROOT / "benchmarks"))
  from replica_throughput import _synthetic32  # pylint: disable=g-import-not-at-top
  results = []
  begin = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    cifar = _synthetic32(tmp, args.num_train)
    print(f"XLA cost and memory analysis per model ({jax.default_backend()}, batch {args.batch} "
          f"per replica; teacher stage, labels only):", flush=True)
    header = (f"{'model':10s} {'data':8s} {'GFLOP/replica-step':>18s} {'GB accessed':>11s} "
              f"{'vmap FLOPs x':>12s} {'MiB at R=1':>10s} {'MiB/replica':>11s} "
              f"{'R fits 80GB':>11s} {'141GB':>7s} {'compile s':>9s}")
    print(header, flush=True)
    for model in args.models.split(","):
      dataset = "digits" if model == "cnn" else cifar
      r = model_costs(model, dataset, args.batch)
      r["data"] = "digits" if model == "cnn" else "32x32x3"
      results.append(r)
      mem = r.get("memory_bytes", {})
      print(f"{model:10s} {r['data']:8s} {r['flops_per_replica_step'] / 1e9:18.3f} "
            f"{r['bytes_per_replica_step'] / 1e9:11.3f} {r['vmap_flop_overhead']:12.3f} "
            f"{mem.get('1', 0) / 2**20:10.1f} {r.get('memory_per_replica_bytes', 0) / 2**20:11.1f} "
            f"{r.get('max_replicas', {}).get('80', 0):11d} "
            f"{r.get('max_replicas', {}).get('141', 0):7d} "
            f"{sum(r['compile_sec'].values()):9.1f}", flush=True)
  print(f"({time.perf_counter() - begin:.0f} s in all)", flush=True)
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arms", default="kd,rcd,siddo")
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--num-teachers", type=int, default=1)
  parser.add_argument("--models", default=None,
                      help="comma-separated models: per-model costs and memory fit instead")
  parser.add_argument("--batch", type=int, default=128, help="--models: batch per replica")
  parser.add_argument("--num-train", type=int, default=2048,
                      help="--models: examples of the random 32x32x3 data")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  if args.models:
    results = models_main(args)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"backend": jax.default_backend(), "results": results}, f, indent=1)
    return

  vmap_study = _study(args, "vmap")
  engine = Engine(vmap_study, vmap_study.students.groups[0])
  replicas = engine.num_replicas
  segments = _costs(engine, vmap_study)[0]
  every_kind = _costs(engine, vmap_study, pattern=((replicas, engine.kinds, engine.signals),))[0]

  blocked_study = _study(args, "blocked")
  one_row = Engine(blocked_study, blocked_study.students.groups[0])
  per_block = _costs(one_row, blocked_study)
  need = collections.Counter()
  for block in per_block:
    need["flops"] += block["flops"]
    need["bytes"] += block["bytes"]

  print(f"students of {args.arms} x {args.seeds} seeds ({replicas} replicas), cnn on digits, "
        f"batch {int(vmap_study.config.batch_size)}; XLA cost_analysis per step:")
  print(f"{'program':34s} {'GFLOP':>9s} {'x need':>7s} {'GB accessed':>12s} {'x need':>7s}")
  rows = [("vmap, every kind selected by code", every_kind),
          ("vmap by arm segments (today)", segments),
          ("each replica's own arm (sum)", need)]
  for name, cost in rows:
    print(f"{name:34s} {cost['flops'] / 1e9:9.3f} {cost['flops'] / need['flops']:7.2f} "
          f"{cost['bytes'] / 1e9:12.3f} {cost['bytes'] / need['bytes']:7.2f}")
  if segments.get("memory_bytes"):
    print(f"vmap program's device memory (arguments + outputs + temporaries): "
          f"{segments['memory_bytes'] / 2**20:.1f} MiB for {replicas} replicas")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"arms": args.arms, "replicas": replicas, "every_kind": every_kind,
                 "segments": segments, "need": dict(need)}, f, indent=1)


if __name__ == "__main__":
  main()
