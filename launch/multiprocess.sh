#!/usr/bin/env bash
# Runs kdjax as N local CPU processes that JAX joins into one multi-process (multi-host) run, to
# exercise the multi-host code path on one machine: each process gets D forced CPU devices
# (--xla_force_host_platform_device_count), the processes meet at a coordinator on 127.0.0.1
# and exchange data through gloo collectives (kdjax/distributed.py).
#
# usage: launch/multiprocess.sh --processes N --devices-per-process D [--port PORT]
#                               [--log-dir DIR] -- <kdjax.main arguments>
#
#   launch/multiprocess.sh --processes 2 --devices-per-process 2 -- \
#       --config=configs/default.py --workdir=runs/mp --config.mesh.data=2
#
# Process 0 writes to this terminal; with --log-dir, process i>0 writes to DIR/process_<i>.log
# (default: this terminal too; kdjax prints only on process 0). The exit status is the first
# non-zero status of the processes (0 if all succeed); when one process fails the others are
# sent SIGTERM rather than left waiting for it. Ctrl-C or SIGTERM is passed on to every process.
# Environment: PYTHON (default: .venv/bin/python of this checkout if present, else python3).
set -euo pipefail

usage() {  # the comment block at the top of this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() {
  echo "multiprocess.sh: $*" >&2
  echo "run 'launch/multiprocess.sh --help' for the usage" >&2
  exit 2
}

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

processes="" devices="" port="" log_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --processes) [ $# -ge 2 ] || die "--processes needs a value"; processes="$2"; shift 2 ;;
    --processes=*) processes="${1#*=}"; shift ;;
    --devices-per-process) [ $# -ge 2 ] || die "--devices-per-process needs a value"
                           devices="$2"; shift 2 ;;
    --devices-per-process=*) devices="${1#*=}"; shift ;;
    --port) [ $# -ge 2 ] || die "--port needs a value"; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --log-dir) [ $# -ge 2 ] || die "--log-dir needs a value"; log_dir="$2"; shift 2 ;;
    --log-dir=*) log_dir="${1#*=}"; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (kdjax.main arguments go after --)" ;;
  esac
done
is_count "$processes" || die "--processes must be an integer >= 1, got '${processes}'"
is_count "$devices" || die "--devices-per-process must be an integer >= 1, got '${devices}'"
[ $# -gt 0 ] || die "no kdjax.main arguments after -- (e.g. -- --config=configs/default.py --workdir=runs/mp)"

root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "$port" ]; then  # a free port, chosen by the kernel
  port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] \
  || die "--port must be an integer in [1, 65535], got '${port}'"
[ -z "$log_dir" ] || mkdir -p "$log_dir"

pids=()
forward() {  # pass a signal on to every process still running
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

# Device flags of the caller's XLA_FLAGS are replaced; other flags are kept.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g')"
run_process() {  # run_process INDEX ARGS...
  local index="$1"
  shift
  env JAX_PLATFORMS=cpu \
      XLA_FLAGS="${xla_flags} --xla_force_host_platform_device_count=${devices}" \
      JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" \
      KDJAX_NUM_PROCESSES="$processes" KDJAX_PROCESS_ID="$index" \
      "$PYTHON" -m kdjax.main "$@"
}
for ((i = 0; i < processes; i++)); do
  if [ -n "$log_dir" ] && [ "$i" -gt 0 ]; then
    run_process "$i" "$@" > "$log_dir/process_$i.log" 2>&1 &
  else
    run_process "$i" "$@" &
  fi
  pids+=("$!")
done

# Poll rather than `wait -n` (bash >= 4.3): when one process fails, the others would wait for
# it in their next collective until JAX's heartbeat timeout; stop them at once instead.
status=0
running=${#pids[@]}
declare -A done_pids=()
while [ "$running" -gt 0 ]; do
  for pid in "${pids[@]}"; do
    [ -z "${done_pids[$pid]:-}" ] || continue
    kill -0 "$pid" 2>/dev/null && continue
    if wait "$pid"; then code=0; else code=$?; fi
    done_pids[$pid]=1
    running=$((running - 1))
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$code
      forward TERM
    fi
  done
  [ "$running" -eq 0 ] || sleep 0.5
done
exit "$status"
