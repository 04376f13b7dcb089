#!/usr/bin/env bash
# The prepared GPU check (issue 17 item 5): on a machine with one GPU and JAX, Flax, optax, Orbax
# and PyTorch (no TensorFlow needed), in at most 8 minutes it prints
#   * examples/s and compile seconds of the engine (execution=vmap) against a sequential loop of
#     single-replica jitted steps at R = 1, 8, 32, 128, for cnn on digits and resnet20 on random
#     32x32x3 data (benchmarks/replica_throughput.py), and the cnn engine at steps_per_call=8;
#   * the default study's cnn training as a PyTorch loop over the seeds on the same device
#     (benchmarks/pytorch_loop.py --device cuda), its students' examples/s;
#   * the achieved fraction of the device's peak FLOP/s: XLA's FLOPs per replica step
#     (benchmarks/cost_model.py --models) x replica steps/s measured / the peak of PEAKS below,
#     looked up by the device's name;
#   * the device's peak memory after each R (jax's memory_stats).
# It checks its imports first and names anything missing in one line (exit 2).
#
#   benchmarks/accelerator_check.sh [--python PY] [--torch-python PY] [--out DIR] [--cpu-smoke]
#
# --python: the Python with JAX and kdjax's dependencies (default .venv/bin/python, else python3);
# --torch-python: the one with torch and scikit-learn (default: the same); --out: where the JSON
# files go (default a temporary directory); --cpu-smoke: everything shrunk (R = 1, 2; a few
# steps; resnet8 for resnet20; PyTorch on CPU), to prove the script end to end without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

py="" torch_py="" out="" smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) py="$2"; shift 2 ;;
    --torch-python) torch_py="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --cpu-smoke) smoke=1; shift ;;
    *) echo "usage: $0 [--python PY] [--torch-python PY] [--out DIR] [--cpu-smoke]" >&2; exit 2 ;;
  esac
done
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
torch_py="${torch_py:-$py}"
out="${out:-$(mktemp -d)}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset JAX_COMPILATION_CACHE_DIR  # compile times must be compiles, not cache reads

# ---- 1. imports: one line naming whatever is missing.
check='import importlib.util as u, sys
print(" ".join(m for m in sys.argv[1:] if u.find_spec(m.split(".")[0]) is None or (
    "." in m and u.find_spec(m) is None)))'
missing_jax="$("$py" -c "$check" jax flax optax orbax.checkpoint ml_collections absl numpy 2>/dev/null || echo "python($py)")"
missing_torch="$("$torch_py" -c "$check" torch numpy sklearn 2>/dev/null || echo "python($torch_py)")"
if [ -z "$missing_jax" ]; then
  missing_jax="$("$py" -c 'import kdjax.train' 2>&1 | sed -n 's/.*No module named .\([A-Za-z0-9_.]*\).*/\1/p' | head -1)"
fi
if [ -n "$missing_jax$missing_torch" ]; then
  echo "accelerator_check: missing: ${missing_jax:+$missing_jax (for $py) }${missing_torch:+$missing_torch (for $torch_py)}" >&2
  exit 2
fi

backend="$("$py" -c 'import jax; d = jax.devices()[0]; print(jax.default_backend(), "|", d.device_kind, "|", jax.device_count())')"
echo "accelerator_check: jax backend | device | count: $backend; results in $out"
if [ "$smoke" = 0 ] && [ "${backend%% *}" = cpu ]; then
  echo "accelerator_check: no GPU/TPU (jax's backend is cpu); run with --cpu-smoke to test the script" >&2
  exit 2
fi

if [ "$smoke" = 1 ]; then
  replicas="1 2"; big_model=resnet8; steps=2; warmup=1; repeats=1; batch=16; num_train=256
  torch_args=(--device cpu --num-seeds 1 --epochs 1); per_call_replicas="2"
else
  replicas="1 8 32 128"; big_model=resnet20; steps=10; warmup=2; repeats=3; batch=128
  num_train=2048; torch_args=(--device cuda --num-seeds 8 --epochs 12); per_call_replicas="8 128"
fi
start=$SECONDS
run() {  # run LIMIT_SECONDS NAME COMMAND...: a step that overruns is reported, the rest goes on
  local limit="$1" name="$2"; shift 2
  echo; echo "== $name"
  if ! timeout "$limit" "$@"; then echo "accelerator_check: $name failed or ran past ${limit}s"; fi
}

# ---- 2. XLA's FLOPs per replica step (and memory fit) of both models at this batch.
run 120 "cost model (XLA cost_analysis)" "$py" benchmarks/cost_model.py --models "cnn,$big_model" \
  --batch "$batch" --num-train "$num_train" --json "$out/cost.json"
# ---- 3. engine (vmap) against the sequential loop.
run 120 "cnn on digits: engine (vmap) vs sequential" "$py" benchmarks/replica_throughput.py \
  --model cnn --replicas $replicas --execution vmap --batch "$batch" --steps "$steps" \
  --warmup "$warmup" --repeats "$repeats" --json "$out/cnn.json"
run 60 "cnn on digits: engine at steps_per_call=8" "$py" benchmarks/replica_throughput.py \
  --model cnn --replicas $per_call_replicas --execution vmap --steps-per-call 8 --batch "$batch" \
  --steps $((steps * 8)) --warmup 1 --repeats "$repeats" --json "$out/cnn_k8.json"
run 240 "$big_model on random 32x32x3: engine (vmap) vs sequential" "$py" \
  benchmarks/replica_throughput.py --model "$big_model" --data synthetic32 --num-train "$num_train" \
  --replicas $replicas --execution vmap --batch "$batch" --steps "$steps" --warmup "$warmup" \
  --repeats "$repeats" --json "$out/big.json"
# ---- 4. the default study's cnn training as a PyTorch loop over the seeds.
run 90 "PyTorch loop (default study's cnn, ${torch_args[*]})" "$torch_py" benchmarks/pytorch_loop.py \
  "${torch_args[@]}" --json "$out/torch.json"

# ---- 5. the summary: achieved fraction of peak FLOP/s and peak memory.
echo; echo "== summary ($((SECONDS - start)) s)"
"$py" - "$out" "${backend#*| }" <<'EOF'
import json, os, sys
out, device = sys.argv[1], sys.argv[2].split(" |")[0].strip()
# Dense peak TFLOP/s by device name (vendor data sheets; no sparsity). float32 matmuls and convs
# run as TF32 on tensor cores under JAX's default precision on A100/H100/H200, so 'float32' is the
# TF32 peak there. Matched by the first key contained in the lower-cased device_kind.
PEAKS = {  # name: (float32 default precision, bfloat16)
    "h200": (494.0, 989.0), "h100 pcie": (378.0, 756.0), "h100": (494.0, 989.0),
    "a100": (156.0, 312.0), "l40s": (183.0, 362.0), "l4": (60.0, 121.0), "a10": (62.5, 125.0),
    "v100": (15.7, None), "tpu v5p": (None, 459.0), "tpu v5 lite": (None, 197.0),
    "tpu v5e": (None, 197.0), "tpu v4": (None, 275.0),
}
peak = next((v for k, v in PEAKS.items() if k in device.lower()), None)
def load(name):
  path = os.path.join(out, name)
  return json.load(open(path)) if os.path.exists(path) else None
cost = {r["model"]: r for r in (load("cost.json") or {}).get("results", [])}
print(f"device {device}: peak {'unknown (not in PEAKS)' if peak is None else f'{peak[0]} TFLOP/s float32 (TF32), {peak[1]} bf16'}")
print(f"{'model':9s} {'K':>2s} {'R':>4s} {'engine ex/s':>12s} {'seq. ex/s':>10s} {'x seq':>6s} "
      f"{'compile s eng/seq':>17s} {'TFLOP/s':>8s} {'of peak':>8s} {'peak mem GiB':>12s}")
for name in ("cnn.json", "cnn_k8.json", "big.json"):
  res = load(name)
  if not res:
    continue
  flops = cost.get(res["model"], {}).get("flops_per_replica_step")
  for r in res["results"]:
    rate = r["engine_examples_per_sec"] / res["batch"]  # replica steps/s
    tflops = None if flops is None else flops * rate / 1e12
    frac = "n/a" if tflops is None or peak is None or peak[0] is None else f"{tflops / peak[0]:.1%}"
    mem = r.get("peak_memory_bytes")
    print(f"{res['model']:9s} {r.get('steps_per_call', 1):2d} {r['replicas']:4d} "
          f"{r['engine_examples_per_sec']:12.0f} {r['sequential_examples_per_sec']:10.0f} "
          f"{r['engine_examples_per_sec'] / r['sequential_examples_per_sec']:6.2f} "
          f"{r['engine_compile_sec']:8.1f}/{r['sequential_compile_sec']:<8.1f} "
          f"{'n/a' if tflops is None else f'{tflops:.3f}':>8s} {frac:>8s} "
          f"{'n/a' if mem is None else f'{mem / 2**30:.2f}':>12s}")
torch = load("torch.json")
if torch:
  print(f"PyTorch loop ({torch['device']}): {torch['num_students']} cnn students, "
        f"{torch['students_examples_per_sec']:.0f} examples/s (batch 64; the engine rows above "
        f"use the batch of the cost model)")
EOF
