"""Stopping a training stage on a signal: save a checkpoint, then exit cleanly.

Preemptible VMs, Kubernetes and SLURM send SIGTERM and, after a grace period (often 30 s),
SIGKILL. While a training loop runs inside `StopRequests`, the first SIGTERM or SIGINT (Ctrl-C)
only records a request; the loop polls `requested` after each step, saves a checkpoint at that
step, waits for it and raises `Preempted`; `kdjax.main` turns that into one line on stderr and
exit code 128 + signal (143 for SIGTERM, 130 for SIGINT), what schedulers and shells expect.

  with preemption.StopRequests() as stop:
    while step < total:
      ...one step...
      if stop.poll(step):
        save(step); wait()
        raise preemption.Preempted(stop.signum, stage, step, total)

Why both signals: SIGTERM is what preemption sends; Ctrl-C on a workstation means the same
("stop now, I will rerun later"), and saving first loses nothing for the price of one checkpoint
write. A second signal of the same kind goes to the handler that was there before (SIGINT:
KeyboardInterrupt; SIGTERM: the default, which ends the process), so a hung save can still be
interrupted. Outside the loop the previous handlers are in place: a SIGTERM while a stage
compiles ends the process at once, which loses no more than a kill -9 does (the work since the
last checkpoint, which a rerun of the same command redoes).

The handler only sets an attribute: no I/O, no locks, nothing that could re-enter code the
signal interrupted. Python runs signal handlers in the main thread only, so in another thread
`StopRequests` installs nothing and never reports a request.

Several processes (kdjax.distributed) must stop at the same step, or one would save (a
collective) while the others step. There JAX's preemption service already owns SIGTERM (its
notifier is installed by `jax.distributed.initialize`) and agrees on a step: `poll` asks
`multihost_utils.reached_preemption_sync_point`, and no Python handler is installed (it would
replace the service's, which Python cannot reinstall afterwards). Ctrl-C keeps its usual
meaning there. The service's safe step is the largest step id any process has reported, plus
one, so the ids must grow over the whole run: `poll` reports its own call count (the same in
every process, which all poll every step of the same stages), not the stage's step, which
restarts with each stage (a SIGTERM arriving while the students stage compiles would otherwise
get the safe step "teacher's last step + 1", which a stage of no more steps never reaches).
"""

from __future__ import annotations

import itertools
import signal
import threading
from typing import Sequence

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The step ids this process reports to JAX's preemption sync: one per `poll`, over all stages.
_SYNC_IDS = itertools.count(1)


class Preempted(Exception):
  """A training stage stopped on `signum` after saving a checkpoint at `step` of `total`."""

  def __init__(self, signum: int, stage: str, step: int, total: int):
    self.signum, self.stage, self.step, self.total = int(signum), stage, int(step), int(total)
    super().__init__(f"stopped by {self.signal_name} at step {self.step} of {self.total} of the "
                     f"{stage} stage; checkpoint saved; rerun the same command to resume")

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name

  @property
  def exit_code(self) -> int:
    """128 + the signal number: the status a shell reports for a process ended by it."""
    return 128 + self.signum


class StopRequests:
  """While active, the first of `signals` sets `signum` instead of ending the process.

  Contexts nest (an inner one's previous handler is the outer one's handler). On exit the
  previous handlers are restored; a request that arrived after the loop's last poll and that no
  `Preempted` answered is re-sent to them, so a signal is never swallowed.
  """

  def __init__(self, signals: Sequence[int] = SIGNALS):
    self._signals = tuple(signals)
    self._previous: dict[int, object] = {}
    self._multiprocess = False
    self.signum: int | None = None

  @property
  def requested(self) -> bool:
    """Whether this process has received one of the signals (one-process runs)."""
    return self.signum is not None

  def poll(self, step: int) -> bool:
    """Whether to stop after `step`. One process: `requested`. Several: True on every process at
    the step JAX's preemption service agreed on after a SIGTERM reached any of them; every
    process must call this at every step (kdjax's loop does). The id given to the service is
    this process's number of polls so far (see the module docstring)."""
    del step  # the stage's step: the service needs ids that grow across stages
    if not self._multiprocess:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if multihost_utils.reached_preemption_sync_point(next(_SYNC_IDS)):
      self.signum = signal.SIGTERM
      return True
    return False

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.signum is None:
      self.signum = signum
      return
    # A second signal: the behaviour the user had before (the way out of a hung save).
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
    signal.raise_signal(signum)

  def __enter__(self) -> StopRequests:
    self.signum = None
    self._multiprocess = jax.process_count() > 1
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      for signum in self._signals:
        previous = signal.signal(signum, self._handle)
        # None: a handler installed from C, which Python cannot reinstall; use the default.
        self._previous[signum] = signal.SIG_DFL if previous is None else previous
    return self

  def __exit__(self, exc_type, exc, traceback) -> bool:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    if self.signum is not None and exc_type is None and not self._multiprocess:
      signal.raise_signal(self.signum)
    return False
