"""What a user waits for: the default study end to end, and a stage's compile time against R.

  ./kd bench end_to_end                              # both parts, table + end_to_end.json
  ./kd bench end_to_end --part study --runs 2        # the default study only, twice each way
  ./kd bench end_to_end --part replicas --replicas 8 24 --executions blocked:1 blocked:4 unrolled
  ./kd bench end_to_end --part replicas --stage students --batch 64 --replicas 24 \
      --executions blocked:1 blocked:2 blocked:4 blocked:8 unrolled      # the README's table

Part `study`: `python -m kdjax.main --config=configs/default.py` (all three stages: 1 teacher,
24 students, the analysis) in a new process, as `./kd run` starts it, once with an empty
persistent compilation cache (cold) and once more with the cache the cold run filled (warm),
each in a fresh workdir; `--runs` repeats the pair. The process is the real command; this script
only wraps it to take times (`--child`): `import` is the time to import kdjax.main, kdjax.train
and kdjax.analysis (JAX, and whatever else they load); `data` is `kdjax.study.resolve` (the
config checked and the dataset loaded); per stage, `compile` is what JAX reports through
`jax.monitoring` for tracing, lowering, XLA compilation and persistent-cache reads, and `run` the
rest of the stage (steps, eval, checkpoints, for the analysis its metrics, report and plots).
`wall` is the whole process from the parent's fork to its exit, what a user waits for.

Part `replicas`: a stage of R replicas (the default cnn on digits) built with `execution` and
stepped in this process: `--stage teacher` (batch 128 by default; every replica the same arm, so
one block pattern) or `--stage students` (kd, rcd and siddo students, R / 3 seeds each, three
patterns, as in the default study: `--stage students --batch 64 --replicas 24`). `compile` is
the first step (tracing + compilation + one step), then ms per step and examples/s over --steps
steps after 3 warm-up steps (median of 3 runs). The persistent cache is off here. Targets:
compile at R = 96 at most 2x compile at R = 8 for the default execution.

--json FILE (default end_to_end.json) writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"--config={ROOT / 'configs' / 'default.py'}"
# jax.monitoring duration events that are compilation work (JAX 0.10): tracing to a jaxpr,
# lowering to StableHLO, XLA's compile, and reading a compiled program from the persistent cache.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration",
                  "/jax/compilation_cache/cache_retrieval_time_sec")


# ------------------------------------------------------------------------ the study (child side)


def _child(out_path: str, argv: list[str]) -> None:
  """Runs kdjax.main with `argv`, writing the phase times to `out_path` at exit."""
  times: dict = {"stages": {}}
  start = time.perf_counter()
  import kdjax.analysis  # pylint: disable=g-import-not-at-top,unused-import
  import kdjax.main  # pylint: disable=g-import-not-at-top
  import kdjax.train  # pylint: disable=g-import-not-at-top
  times["import"] = time.perf_counter() - start
  import jax  # pylint: disable=g-import-not-at-top
  from kdjax import study as study_lib  # pylint: disable=g-import-not-at-top

  compile_seconds = [0.0]

  def on_duration(event: str, seconds: float, **kwargs) -> None:
    del kwargs
    if event in COMPILE_EVENTS:
      compile_seconds[0] += seconds

  jax.monitoring.register_event_duration_secs_listener(on_duration)

  in_stage = [False]

  def timed(name, fn):
    def wrapper(*args, **kwargs):
      if name == "data" and in_stage[0]:  # the analysis resolves the study again: its own time
        return fn(*args, **kwargs)
      before, t0 = compile_seconds[0], time.perf_counter()
      in_stage[0] = name != "data"
      try:
        return fn(*args, **kwargs)
      finally:
        in_stage[0] = False
        wall = time.perf_counter() - t0
        compiled = compile_seconds[0] - before
        if name == "data":
          times["data"] = times.get("data", 0.0) + wall
        else:
          stage = name if name == "analysis" else args[1]
          times["stages"][stage] = {"compile": compiled, "run": wall - compiled}
    return wrapper

  study_lib.resolve = timed("data", study_lib.resolve)
  kdjax.train.run_stage = timed("stage", kdjax.train.run_stage)
  kdjax.analysis.run = timed("analysis", kdjax.analysis.run)
  sys.argv = ["kdjax.main", *argv]
  try:
    kdjax.main.run()
  finally:
    with open(out_path, "w") as f:
      json.dump(times, f)


def _study_run(cache_dir: str, workdir: str) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  env = dict(os.environ, JAX_PLATFORMS="cpu", KDJAX_COMPILATION_CACHE=cache_dir)
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, __file__, "--child", out, "--", CONFIG,
                         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                        text=True)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"the study failed:\n{proc.stderr[-3000:]}")
  with open(out) as f:
    times = json.load(f)
  os.unlink(out)
  times["wall"] = wall
  return times


def study_part(runs: int) -> list[dict]:
  print("default study, all stages (python -m kdjax.main --config=configs/default.py):")
  print(f"{'run':9s} {'wall s':>7s} {'import':>7s} {'data':>6s} "
        f"{'teacher c/r':>12s} {'students c/r':>13s} {'analysis c/r':>13s}", flush=True)
  results = []
  for i in range(runs):
    with tempfile.TemporaryDirectory() as tmp:
      cache = os.path.join(tmp, "cache")
      for name in ("cold", "warm"):
        times = _study_run(cache, os.path.join(tmp, f"workdir_{name}"))
        times["run"], times["cache"] = i, name
        results.append(times)
        stages = times["stages"]
        cells = " ".join(
            f"{stages[s]['compile']:6.1f}/{stages[s]['run']:<5.1f}" if s in stages else "-"
            for s in ("teacher", "students", "analysis"))
        print(f"{name:9s} {times['wall']:7.1f} {times['import']:7.1f} {times['data']:6.1f} "
              f"{cells}", flush=True)
  return results


# -------------------------------------------------------------------------- compile time vs R


def _stage_engine(stage: str, replicas: int, execution: str, rows: int, batch: int):
  """(study, engine, teachers) of a stage of `replicas` default-cnn replicas on digits: the
  teacher stage (every replica the same arm: one block pattern), or the students stage of the
  default arms kd, rcd, siddo (replicas // 3 seeds each: three patterns) distilled from an
  untrained teacher (the work is the same)."""
  import jax  # pylint: disable=g-import-not-at-top
  from kdjax import study as study_lib  # pylint: disable=g-import-not-at-top
  from kdjax.engine import Engine, Teachers  # pylint: disable=g-import-not-at-top
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  config.batch_size, config.stages = batch, stage
  config.execution, config.replicas_per_block = execution, rows
  if stage == "teacher":
    config.num_teachers = replicas
  else:
    config.num_seeds = max(1, replicas // 3)
  study = study_lib.load_data(study_lib.resolve(config))
  engine = Engine(study, study.stage(stage).groups[0])
  teachers = None
  if stage == "students":
    teacher = Engine(study, study.teacher.groups[0])
    teachers = jax.device_put(Teachers(variables=teacher.init_state().variables()),
                              engine.replicated)
  return study, engine, teachers


def replicas_part(replicas: list[int], executions: list[str], steps: int, stage: str,
                  batch: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  from kdjax import data  # pylint: disable=g-import-not-at-top

  what = ("teacher stage of R" if stage == "teacher" else
          "students stage (kd, rcd, siddo: R / 3 seeds each) of R")
  print(f"\n{what} cnn replicas on digits, batch {batch} ({jax.default_backend()}):")
  print(f"{'execution':10s} {'R':>4s} {'rows/block':>10s} {'compile s':>10s} {'ms/step':>8s} "
        f"{'examples/s':>11s}", flush=True)
  results = []
  for choice in executions:
    execution, _, rows = choice.partition(":")
    for r in replicas:
      study, engine, teachers = _stage_engine(stage, r, execution, int(rows or 0), batch)
      r = engine.num_replicas
      arrays = data.to_device(study.data["train"], engine.replicated)
      state = engine.init_state()
      _, order = engine.order_for_step(state, study.num_train)
      jax.block_until_ready(order)
      start = time.perf_counter()
      state, _ = engine.train_step(state, order, arrays, teachers)
      jax.block_until_ready(state)
      compile_s = time.perf_counter() - start
      for _ in range(3):
        state, _ = engine.train_step(state, order, arrays, teachers)
      jax.block_until_ready(state)
      seconds = []
      for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
          state, _ = engine.train_step(state, order, arrays, teachers)
        jax.block_until_ready(state)
        seconds.append((time.perf_counter() - start) / steps)
      per_step = statistics.median(seconds)
      row = {"stage": stage, "execution": engine.execution, "replicas": r,
             "replicas_per_block": engine.replicas_per_block, "compile_sec": compile_s,
             "ms_per_step": per_step * 1e3, "examples_per_sec": r * batch / per_step}
      results.append(row)
      print(f"{choice:10s} {r:4d} {row['replicas_per_block']:10d} {compile_s:10.1f} "
            f"{row['ms_per_step']:8.1f} {row['examples_per_sec']:11.0f}", flush=True)
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=("study", "replicas", "both"), default="both")
  parser.add_argument("--runs", type=int, default=1, help="cold/warm pairs of the study")
  parser.add_argument("--replicas", type=int, nargs="+", default=[1, 8, 24, 96])
  parser.add_argument("--executions", nargs="+", default=["auto"],
                      help="auto, unrolled, vmap, blocked, or blocked:ROWS (rows per block)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per run (replicas)")
  parser.add_argument("--stage", choices=("teacher", "students"), default="teacher",
                      help="replicas part: which stage of R replicas")
  parser.add_argument("--batch", type=int, default=128, help="replicas part: batch size")
  parser.add_argument("--json", default="end_to_end.json")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  out = {"cpu_count": os.cpu_count()}
  if args.part in ("study", "both"):
    out["study"] = study_part(args.runs)
  if args.part in ("replicas", "both"):
    os.environ["KDJAX_COMPILATION_CACHE"] = "off"
    out["replicas"] = replicas_part(args.replicas, args.executions, args.steps, args.stage,
                                    args.batch)
  with open(args.json, "w") as f:
    json.dump(out, f, indent=1)
  print(f"\nwrote {args.json}")


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "--child":
    _child(sys.argv[2], sys.argv[4:])
  else:
    main()
