"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from the environment.

kdjax runs one process per host (TPU VM worker, GPU node task, or local CPU process); every
process runs the same `python -m kdjax.main` command, JAX makes all their devices one global
device list, and the engine lays its ('replica', 'data') mesh over it. `initialize()` must run
before anything touches a device (kdjax.main calls it first). Which environment starts what:

  KDJAX_NUM_PROCESSES=N  KDJAX_PROCESS_ID=i  [JAX_COORDINATOR_ADDRESS=host:port]
      explicit processes (launch/multiprocess.sh: N local CPU processes, coordinator
      127.0.0.1:port, the default when JAX_COORDINATOR_ADDRESS is unset is 127.0.0.1:12355);
  KDJAX_DISTRIBUTED=auto
      `jax.distributed.initialize()` with JAX's own detection: Cloud TPU pods (every worker),
      SLURM (one task per GPU; launch/slurm.sbatch), Open MPI, Kubernetes;
  KDJAX_DISTRIBUTED=off, or none of the above: a single process, nothing is initialised.

`auto` is never guessed from the environment: a SLURM allocation or TPU VM where one plain
process runs must not wait for peers that never come.

JAX itself reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS but has no variables for the
process count and index, hence the two KDJAX_ ones. With several CPU processes the collectives
go through gloo (`jax_cpu_collectives_implementation`; XLA:CPU has no other cross-process
implementation); the setting does not affect GPU or TPU devices.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

DEFAULT_COORDINATOR = "127.0.0.1:12355"
MODES = ("", "auto", "off")


def settings(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """The keyword arguments of `jax.distributed.initialize` that `environ` (default os.environ)
  asks for, or None for a single process. Raises ValueError naming the variable when one is
  malformed. Pure: reads nothing but `environ`."""
  env = os.environ if environ is None else environ
  mode = env.get("KDJAX_DISTRIBUTED", "").strip().lower()
  if mode not in MODES:
    raise ValueError(f"KDJAX_DISTRIBUTED must be one of auto, off (or unset); got {mode!r}")
  if mode == "off":
    return None
  if "KDJAX_NUM_PROCESSES" in env or "KDJAX_PROCESS_ID" in env:
    num = _int_var(env, "KDJAX_NUM_PROCESSES", low=1)
    index = _int_var(env, "KDJAX_PROCESS_ID", low=0)
    if index >= num:
      raise ValueError(f"KDJAX_PROCESS_ID must lie in [0, {num - 1}] for "
                       f"KDJAX_NUM_PROCESSES={num}; got {index}")
    address = env.get("JAX_COORDINATOR_ADDRESS", "") or DEFAULT_COORDINATOR
    if ":" not in address:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS must be host:port; got {address!r}")
    # 'deactivate': explicit values win; no cluster probing (a SLURM job's variables, say).
    return {"coordinator_address": address, "num_processes": num, "process_id": index,
            "cluster_detection_method": "deactivate"}
  return {} if mode == "auto" else None


def _int_var(env: Mapping[str, str], name: str, *, low: int) -> int:
  raw = env.get(name)
  if raw is None:
    other = "KDJAX_PROCESS_ID" if name == "KDJAX_NUM_PROCESSES" else "KDJAX_NUM_PROCESSES"
    raise ValueError(f"{name} must be set together with {other}")
  try:
    value = int(raw)
  except ValueError:
    value = None
  if value is None or value < low:
    raise ValueError(f"{name} must be an integer >= {low}; got {raw!r}")
  return value


def initialize(environ: Mapping[str, str] | None = None) -> bool:
  """Joins the processes `settings(environ)` describes (`jax.distributed.initialize`); True if
  this is a multi-process run. Call once, before any device is used."""
  kwargs = settings(environ)
  if kwargs is None:
    return False
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return jax.process_count() > 1


def fitting_meshes(group_sizes: Sequence[int], num_devices: int,
                   batch_sizes: Sequence[int] = ()) -> list[tuple[int, int]]:
  """Every (replica, data) mesh over exactly `num_devices` devices on which each group's
  replicas divide over the replica axis and each batch size over the data axis, the largest
  replica axis first (whole replicas per device before split batches). With no batch sizes
  the list always ends with (1, num_devices)."""
  meshes = []
  for replica in range(num_devices, 0, -1):
    data = num_devices // replica
    if (num_devices % replica == 0 and all(int(n) % replica == 0 for n in group_sizes)
        and all(int(b) % data == 0 for b in batch_sizes)):
      meshes.append((replica, data))
  return meshes


def is_primary() -> bool:
  """True in the process that writes shared files and prints (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
  """A global array's full value as numpy in every process. Arrays sharded over other hosts'
  devices are all-gathered (`process_allgather`, a collective: every process must call it at
  the same point); local and fully replicated ones are read directly."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
