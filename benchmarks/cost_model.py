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
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

import jax

from kdjax import data
from kdjax import study as study_lib
from kdjax.engine import Engine, Teachers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _study(args, execution: str) -> study_lib.Study:
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  config.arms, config.num_seeds, config.num_teachers = args.arms, args.seeds, args.num_teachers
  config.stages, config.execution, config.replicas_per_block = "students", execution, 1
  return study_lib.resolve(config)


def _costs(engine: Engine, study, pattern=None) -> list[dict]:
  """XLA's cost and memory analysis of each distinct block program of one step (one entry per
  block, in block order)."""
  teacher = Engine(study, study.teacher.groups[0])
  teachers = jax.device_put(Teachers(variables=teacher.init_state().variables()),
                            engine.replicated)
  arrays = data.to_device(study.data["train"], engine.replicated)
  state = engine.init_state()
  _, order = engine.order_for_step(state, study.num_train)
  inputs, metrics, _ = engine._step_inputs(state, order, arrays)  # pylint: disable=protected-access
  carry = (state.params, state.batch_stats, state.opt_state, state.diverged, metrics)
  per_replica = (state.keys, *engine._replica_constants, *inputs)  # pylint: disable=protected-access
  out = []
  for (offset, start), own in zip(engine._block_args, engine._train_patterns):  # pylint: disable=protected-access
    body = engine._train_rows  # pylint: disable=protected-access
    program = engine._block_program(body, pattern or own, jax.sharding.PartitionSpec("replica"),  # pylint: disable=protected-access
                                    None, None)
    compiled = jax.jit(program).lower(carry, per_replica, (state.step, teachers), offset,
                                      start).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    out.append({"flops": float(cost.get("flops", 0.0)),
                "bytes": float(cost.get("bytes accessed", 0.0)),
                "memory_bytes": None if memory is None else int(
                    memory.argument_size_in_bytes + memory.output_size_in_bytes +
                    memory.temp_size_in_bytes)})
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arms", default="kd,rcd,siddo")
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--num-teachers", type=int, default=1)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

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
