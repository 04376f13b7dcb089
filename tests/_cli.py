"""Helpers of the tests that run `python -m kdjax.main` in subprocesses (test_cli and
test_reliability, test_engine, test_multihost).

Every run is the real command, on CPU, from the repository root; each pays the Python/JAX/TF
imports (a few seconds).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"--config={ROOT / 'configs' / 'default.py'}"


def env(devices: int = 1, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
  """CPU with `devices` forced host devices; `cache_dir`: a persistent compilation cache, so
  later runs of the same study reuse the first one's programs."""
  out = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices > 1:
    out["XLA_FLAGS"] = (out.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
  if cache_dir:
    out.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return out


def command(args: list[str], workdir: pathlib.Path | None, config: str = CONFIG) -> list[str]:
  """The kdjax.main command line (no --workdir flag when `workdir` is None); `config` is the
  --config flag (default: configs/default.py)."""
  workdir_flag = [] if workdir is None else [f"--workdir={workdir}"]
  return [sys.executable, "-m", "kdjax.main", config, *workdir_flag, *args]


def main(args: list[str], workdir: pathlib.Path | None, environ: dict[str, str],
         timeout: float = 600, config: str = CONFIG) -> subprocess.CompletedProcess:
  """Runs the command to its end; stdout and stderr captured as text."""
  return subprocess.run(command(args, workdir, config), cwd=ROOT, env=environ, capture_output=True,
                        text=True, timeout=timeout)


def start(args: list[str], workdir: pathlib.Path, environ: dict[str, str],
          logs: pathlib.Path) -> subprocess.Popen:
  """Starts the command in the background (to be signalled), its stdout and stderr going to
  logs/stdout.txt and logs/stderr.txt (files, not pipes: nobody reads while it runs)."""
  logs.mkdir(parents=True, exist_ok=True)
  with open(logs / "stdout.txt", "w") as out, open(logs / "stderr.txt", "w") as err:
    return subprocess.Popen(command(args, workdir), cwd=ROOT, env=environ, stdout=out,
                            stderr=err)


def digest(directory: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory`."""
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  """The single stderr line of a run refused with exit code 2 (asserts both)."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, f"stderr must be one line, got {len(lines)}:\n{proc.stderr[-3000:]}"
  return lines[0]


class BackgroundJobs:
  """Commands run one after another in a thread (so they overlap the in-process tests), each
  with its output in a log file and in a session of its own, so `close` also ends a launcher's
  child processes. `jobs`: {name: (command, log path)}; extra keyword arguments become
  attributes (e.g. the jobs' workdirs)."""

  def __init__(self, jobs: dict[str, tuple[list[str], pathlib.Path]], env: dict[str, str],
               **attributes):
    self.jobs, self.env = jobs, env
    self.__dict__.update(attributes)
    self.returncodes: dict[str, int] = {}
    self._proc: subprocess.Popen | None = None
    self._started = self._closed = False
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    for name, (command, log) in self.jobs.items():
      if self._closed:
        return
      with open(log, "w") as out:
        self._proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.returncodes[name] = self._proc.wait()

  def start(self) -> None:
    if not self._started:
      self._started = True
      self._thread.start()

  def wait(self, timeout: float) -> dict[str, int]:
    """{name: exit code} of the jobs finished within `timeout` seconds."""
    self.start()
    self._thread.join(timeout)
    return dict(self.returncodes)

  def result(self, name: str, timeout: float = 900) -> str:
    """The job's log once it has finished; fails the test if it exited non-zero."""
    self.wait(timeout)
    log = self.jobs[name][1]
    output = log.read_text() if log.exists() else "(not started)"
    assert self.returncodes.get(name) == 0, output[-4000:]
    return output

  def close(self) -> None:
    self._closed = True
    if self._proc is not None and self._proc.poll() is None:
      os.killpg(self._proc.pid, signal.SIGKILL)  # the job's own session: it and its children
    if self._thread.is_alive():
      self._thread.join()
