"""Reliability of runs: preemption, kill -9 and resume, damaged checkpoints, the workdir lock,
determinism (kdjax.preemption, kdjax.checkpoint, kdjax.main).

The scenarios run the real `python -m kdjax.main` in subprocesses (tests/_cli.py) on a tiny study
(digits, cnn width 0.125, kd/rcd/siddo x 1 seed: a 10-step teacher stage and a 40-step students
stage, checkpoints every 5 steps) and compare with one uninterrupted reference run of the same
command, bitwise: metrics.json byte for byte, the final train states (params, optimiser state,
batch statistics, PRNG keys) read back with Orbax alone. The reference is computed once per
session, by whichever pytest worker asks first (an fcntl lock in the shared temporary
directory), and before the other runs: it fills the persistent compilation cache they share,
which keeps each of them to a few seconds of CPU (a cold run compiles for about 30 s).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import re
import shutil
import signal
import socket
import time

import _cli
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import checkpoint as checkpoint_lib
from kdjax import preemption

STUDY = ["--config.num_seeds=1", "--config.num_epochs=4", "--config.teacher_num_epochs=1",
         "--config.model_kwargs.width=0.125", "--config.batch_size=128",
         "--config.checkpoint_every_steps=5", "--config.eval_every_steps=1000",
         "--config.log_every_steps=1000"]
TRAIN_ONLY = [*STUDY, "--config.stages=teacher,students"]  # what needs no analysis skips it
STUDENT_STEPS = 40  # 4 epochs x ceil(1198 / 128) steps


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def shared(tmp_path_factory, worker_id) -> pathlib.Path:
  """A directory every pytest worker of this session sees (xdist's documented pattern)."""
  base = tmp_path_factory.getbasetemp()
  return base if worker_id == "master" else base.parent


def _env(shared: pathlib.Path) -> dict[str, str]:
  return _cli.env(1, shared / "reliability_xla_cache")


@pytest.fixture(scope="session")
def reference(shared) -> pathlib.Path:
  """The workdir of one uninterrupted run of STUDY (all stages)."""
  workdir = shared / "reliability_reference"
  with open(shared / "reliability_reference.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "analysis" / "metrics.json").exists():
      shutil.rmtree(workdir, ignore_errors=True)
      proc = _cli.main(STUDY, workdir, _env(shared))
      assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _checkpoints(workdir: pathlib.Path, stage: str = "students") -> pathlib.Path:
  return workdir / stage / "checkpoints"


def _steps(directory: pathlib.Path) -> list[int]:
  """Complete steps: Orbax renames a step's temporary directory to its bare number when done."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _final_state(workdir: pathlib.Path, stage: str) -> dict:
  """{path: bytes} of the newest checkpoint's whole train state, read with Orbax alone."""
  directory = _checkpoints(workdir, stage)
  tree = ocp.StandardCheckpointer().restore(directory / str(_steps(directory)[-1]) / "state")
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf).tobytes() for path, leaf in leaves}


def _assert_same_results(workdir: pathlib.Path, expected: pathlib.Path, *,
                         metrics: bool) -> None:
  for stage in ("teacher", "students"):
    ours, theirs = _final_state(workdir, stage), _final_state(expected, stage)
    assert ours.keys() == theirs.keys() and len(ours) > 5, stage
    differ = [k for k in ours if ours[k] != theirs[k]]
    assert not differ, f"{stage}: {len(differ)} of {len(ours)} leaves differ, e.g. {differ[:3]}"
  if metrics:
    assert ((workdir / "analysis" / "metrics.json").read_bytes() ==
            (expected / "analysis" / "metrics.json").read_bytes())


def _wait_for_step(proc, directory: pathlib.Path, timeout: float = 300, after: int = 0) -> int:
  """Polls until `directory` holds a complete step > `after`; fails if the process ends first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if (steps := _steps(directory)) and steps[-1] > after:
      return steps[-1]
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before a checkpoint"
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f"no checkpoint in {directory} after {timeout} s")


def _damage(step_dir: pathlib.Path) -> pathlib.Path:
  """Truncates the largest array file of a checkpoint step to half its size (a write cut off)."""
  path = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  return path


# ---------------------------------------------------------------- in-process units
# (first in the file: they need no reference run, so a worker has work while another computes it)


@pytest.fixture
def restore_signals():
  saved = {s: signal.getsignal(s) for s in preemption.SIGNALS}
  yield
  for s, handler in saved.items():
    signal.signal(s, handler)


def _recorder(calls: list):
  return lambda signum, frame: calls.append(signum)


def _deliver(signum: int) -> None:
  signal.raise_signal(signum)
  time.sleep(0.01)  # Python runs the handler at the next bytecode boundary


def test_stop_requests_record_the_first_signal_and_restore_the_handlers(restore_signals):
  calls = []
  for s in preemption.SIGNALS:
    signal.signal(s, _recorder(calls))
  with pytest.raises(preemption.Preempted):
    with preemption.StopRequests() as stop:
      assert not stop.requested and not stop.poll(1)
      _deliver(signal.SIGTERM)
      assert stop.requested and stop.poll(2) and stop.signum == signal.SIGTERM
      assert calls == []  # the previous handler did not run: the process goes on to save
      raise preemption.Preempted(stop.signum, "students", 2, 10)
  assert calls == []  # answered by Preempted: not re-sent
  for s in preemption.SIGNALS:
    assert signal.getsignal(s) is not stop._handle  # pylint: disable=protected-access
  _deliver(signal.SIGTERM)
  assert calls == [signal.SIGTERM]  # the previous handler is back


def test_a_second_signal_and_an_unanswered_request_reach_the_previous_handler(restore_signals):
  calls = []
  signal.signal(signal.SIGINT, _recorder(calls))
  with preemption.StopRequests() as stop:
    _deliver(signal.SIGINT)
    assert stop.signum == signal.SIGINT and calls == []
    _deliver(signal.SIGINT)  # the way out of a hung save
    assert calls == [signal.SIGINT]
  calls.clear()
  with preemption.StopRequests() as stop:
    _deliver(signal.SIGINT)
  assert calls == [signal.SIGINT]  # arrived after the last poll: re-sent on exit, not swallowed


def test_preempted_message_and_exit_code():
  e = preemption.Preempted(signal.SIGTERM, "students", 120, 456)
  assert str(e) == ("stopped by SIGTERM at step 120 of 456 of the students stage; checkpoint "
                    "saved; rerun the same command to resume")
  assert e.exit_code == 143
  assert preemption.Preempted(signal.SIGINT, "teacher", 1, 2).exit_code == 130


def _tree(seed: int) -> dict:
  """A small train-state-like tree; random, so its array file is the step's largest file."""
  rng = np.random.default_rng(seed)
  return {"w": rng.standard_normal((64, 33)).astype(np.float32), "b": np.arange(7, dtype=np.int32)}


def test_restore_latest_skips_damaged_steps_and_sets_them_aside(tmp_path, caplog):
  """Three kinds of damage (an array file truncated, the JSON item overwritten with garbage, an
  item deleted); a step left half-written by a killed save (a temporary directory) is no step."""
  tmp_path = tmp_path / "checkpoints"  # replicas.json goes beside it
  ckpt = checkpoint_lib.StageCheckpoints(str(tmp_path), save_every_steps=1)
  for step in (1, 2, 3, 4):
    ckpt.save(step, _tree(step), {"step": step})
  ckpt.wait()
  ckpt.close()
  _damage(tmp_path / "4")
  (tmp_path / "3" / "replicas" / "metadata").write_text("{not json")
  shutil.rmtree(tmp_path / "2" / "state")
  (tmp_path / "5.orbax-checkpoint-tmp-1234").mkdir()
  assert checkpoint_lib.latest_finished_step(str(tmp_path)) == 4

  reader = checkpoint_lib.StageCheckpoints(str(tmp_path), read_only=True)
  with pytest.raises(checkpoint_lib.UnreadableCheckpointError, match="checkpoint step 4 in"):
    reader.restore(_tree(0), 4)
  ckpt = checkpoint_lib.StageCheckpoints(str(tmp_path), save_every_steps=1)
  with caplog.at_level("WARNING"):
    step, state, metadata = ckpt.restore_latest(_tree(0))
  assert step == 1 and metadata == {"step": 1}
  np.testing.assert_array_equal(state["w"], _tree(1)["w"])
  warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint step 4, 3, 2 in" in warnings[0]
  assert "restored step 1 instead" in warnings[0]
  assert sorted(p.name.split(".")[0] for p in tmp_path.glob("*.unreadable-*")) == ["2", "3", "4"]
  assert checkpoint_lib.latest_finished_step(str(tmp_path)) == 1 == ckpt.latest_step()
  assert ckpt.save(2, _tree(2), {"step": 2})  # the set-aside steps can be written again
  ckpt.wait()
  ckpt.close()
  assert checkpoint_lib.latest_finished_step(str(tmp_path)) == 2


def test_restore_latest_raises_when_no_step_can_be_read(tmp_path):
  tmp_path = tmp_path / "checkpoints"
  ckpt = checkpoint_lib.StageCheckpoints(str(tmp_path), save_every_steps=1)
  for step in (1, 2):
    ckpt.save(step, _tree(step), {"step": step})
  ckpt.wait()
  for step in (1, 2):
    _damage(tmp_path / str(step))
  ckpt = checkpoint_lib.StageCheckpoints(str(tmp_path), save_every_steps=1)
  expected = rf"no checkpoint in {re.escape(str(tmp_path))} can be read \(steps 2, 1"
  with pytest.raises(checkpoint_lib.UnreadableCheckpointError, match=expected):
    ckpt.restore_latest(_tree(0))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # nothing renamed


# ---------------------------------------------------------------- the workdir lock


@pytest.mark.parametrize("stages", ["teacher,students,analysis", "analysis"])
def test_a_second_run_in_a_busy_workdir_is_refused_and_writes_nothing(stages, shared, tmp_path,
                                                                       request):
  """The lock is held here, by this process, as a running kdjax would hold it. The analysis-only
  run needs finished stages, so it gets a copy of the reference workdir."""
  workdir = tmp_path / "run"
  if stages == "analysis":
    shutil.copytree(request.getfixturevalue("reference"), workdir)
  else:
    workdir.mkdir()
  fd = os.open(workdir / ".kdjax.lock", os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    before = _cli.digest(workdir)
    proc = _cli.main([*STUDY, f"--config.stages={stages}"], workdir, _env(shared))
  finally:
    os.close(fd)
  line = _cli.one_error_line(proc)
  assert line.startswith(f"kdjax: error: --workdir: {workdir} is in use by another kdjax run "
                         f"(pid {os.getpid()} on {socket.gethostname()})"), line
  assert _cli.digest(workdir) == before


# ---------------------------------------------------------------- runs stopped and resumed


def test_sigterm_then_kill_9_mid_students_stage_then_rerun_equals_an_uninterrupted_run(
    shared, reference, tmp_path):
  """One study interrupted twice in its students stage, each time once a new checkpoint is
  there. SIGTERM saves the current step (also off the 5-step interval) and exits 143 with one
  line; the same command resumes from that step; SIGKILL then loses the steps since the last
  checkpoint and leaves no lock behind; the third run resumes from that checkpoint and ends
  bitwise where the uninterrupted reference ends (final states, metrics.json byte for byte).
  The first run starts fresh and its teacher stage is kept, so this also checks that two fresh
  runs give the same bits (determinism)."""
  workdir, env = tmp_path / "run", _env(shared)
  proc = _cli.start(STUDY, workdir, env, tmp_path / "term")
  _wait_for_step(proc, _checkpoints(workdir))
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 143
  stderr = (tmp_path / "term" / "stderr.txt").read_text()
  match = re.search(rf"^kdjax: stopped by SIGTERM at step (\d+) of {STUDENT_STEPS} of the "
                    r"students stage; checkpoint saved; rerun the same command to resume$",
                    stderr, re.MULTILINE)
  assert match and "Traceback" not in stderr, stderr[-3000:]
  stopped_at = int(match[1])
  assert 5 <= stopped_at < STUDENT_STEPS
  assert _steps(_checkpoints(workdir))[-1] == stopped_at  # saved off the 5-step interval too

  proc = _cli.start(STUDY, workdir, env, tmp_path / "kill")
  _wait_for_step(proc, _checkpoints(workdir), after=stopped_at)
  assert (workdir / ".kdjax.lock").read_text().split() == [str(proc.pid), socket.gethostname()]
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert (f"students: resuming from checkpoint step {stopped_at} of {STUDENT_STEPS}" in
          (tmp_path / "kill" / "stderr.txt").read_text())
  killed_at = _steps(_checkpoints(workdir))[-1]
  assert stopped_at < killed_at < STUDENT_STEPS, "the run finished before it was killed"

  rerun = _cli.main(STUDY, workdir, env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"students: resuming from checkpoint step {killed_at} of {STUDENT_STEPS}" in rerun.stderr
  _assert_same_results(workdir, reference, metrics=True)


# ---------------------------------------------------------------- damaged checkpoints


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_step(shared, reference,
                                                                        tmp_path):
  """The final checkpoints of both stages damaged: the teacher stage goes back to step 5 and
  trains again to 10, the students stage goes back to 35; the results are the reference's."""
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  for stage, steps in (("teacher", [5, 10]), ("students", [35, 40])):
    assert _steps(_checkpoints(workdir, stage)) == steps
    _damage(_checkpoints(workdir, stage) / str(steps[-1]))

  rerun = _cli.main(TRAIN_ONLY, workdir, _env(shared))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
  warnings = [line for line in rerun.stderr.splitlines() if "cannot be read" in line]
  assert len(warnings) == 2 and all(w.startswith("W") for w in warnings), rerun.stderr[-3000:]
  for warning, (stage, bad, used) in zip(warnings, (("teacher", 10, 5), ("students", 40, 35))):
    directory = _checkpoints(workdir, stage)
    assert f"checkpoint step {bad} in {directory} cannot be read" in warning
    assert f"restored step {used} instead" in warning
    assert f"{stage}: resuming from checkpoint step {used} of {bad}" in rerun.stderr
    assert len(list(directory.glob(f"{bad}.unreadable-*"))) == 1  # set aside, not deleted
    assert _steps(directory) == [used, bad]  # the final step written again
  _assert_same_results(workdir, reference, metrics=False)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(shared, reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  directory = _checkpoints(workdir)
  for step in (35, 40):
    _damage(directory / str(step))
  before = sorted(p.name for p in directory.iterdir())

  rerun = _cli.main(TRAIN_ONLY, workdir, _env(shared))
  assert rerun.returncode == 2, rerun.stderr[-3000:]
  errors = [line for line in rerun.stderr.splitlines() if line.startswith("kdjax: error:")]
  assert len(errors) == 1, rerun.stderr[-3000:]
  assert errors[0].startswith(
      f"kdjax: error: no checkpoint in {directory} can be read (steps 40, 35;"), errors[0]
  assert "move the directory away" in errors[0]
  assert "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
  assert sorted(p.name for p in directory.iterdir()) == before
  assert "[students] step" not in rerun.stdout


# ---------------------------------------------------------------- faults while writing


def _fault_study(tmp_path: pathlib.Path):
  """A tiny in-process study (vmapped MLPs, kd/rcd/siddo x 1 seed; 9 teacher steps, 18 student
  steps, checkpoints every 5) on digits without any training example of class 3: a class
  with no training example trains and is analysed like the others (issue 19, item 3)."""
  import test_groups  # pylint: disable=g-import-not-at-top  (its run_in_process)
  from kdjax import study as study_lib  # pylint: disable=g-import-not-at-top
  from kdjax.data import digits  # pylint: disable=g-import-not-at-top
  train, test = digits.arrays("train"), digits.arrays("test")
  keep = train["label"] != 3
  np.savez(tmp_path / "no_class_3.npz", x_train=train["image"][keep], y_train=train["label"][keep],
           x_test=test["image"], y_test=test["label"])
  config = study_lib.load_config(str(_cli.ROOT / "configs" / "default.py"))
  config.dataset = f"npz:{tmp_path / 'no_class_3.npz'}"
  config.model, config.model_kwargs.width, config.execution = "mlp", 0.05, "vmap"
  config.num_seeds, config.num_epochs, config.teacher_num_epochs = 1, 2, 1
  config.batch_size, config.checkpoint_every_steps = 128, 5
  config.eval_every_steps = config.log_every_steps = 1000
  return config, test_groups.run_in_process


def test_a_full_disk_stops_with_one_line_and_loses_nothing(tmp_path, monkeypatch):
  """ENOSPC injected into the Orbax checkpoint writer at students step 15, then into the
  analysis' report.md: each stops with one line naming the path and the cause; the earlier
  checkpoint (step 10) stays readable and the analysis directory keeps its previous files; the
  reruns after 'space is freed' resume and end bitwise where an uninterrupted run ends."""
  from kdjax import analysis as analysis_lib  # pylint: disable=g-import-not-at-top
  from kdjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from kdjax.analysis import stage as analysis_stage  # pylint: disable=g-import-not-at-top
  config, run_in_process = _fault_study(tmp_path)
  reference, workdir = tmp_path / "reference", tmp_path / "run"
  run_in_process(config, reference)

  full = os.strerror(errno.ENOSPC)
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 15 and "students" in str(self.directory):
      raise OSError(errno.ENOSPC, full, f"{self.directory}/{step}.orbax-checkpoint-tmp-1")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as info:
    run_in_process(config, workdir)
  monkeypatch.undo()
  line = str(info.value)
  directory = _checkpoints(workdir)
  assert "\n" not in line and line.startswith(f"cannot write checkpoint step 15 in {directory}")
  assert f"OSError: [Errno {errno.ENOSPC}] {full}" in line and "step 10 is kept" in line, line
  assert _steps(directory) == [5, 10]
  assert len(_final_state(workdir, "students")) > 5  # step 10 reads back
  run_in_process(config, workdir)  # space freed: resumes from step 10
  _assert_same_results(workdir, reference, metrics=True)

  outputs = workdir / "analysis"
  for name in ("metrics.json", "report.md"):
    (outputs / name).write_text("previous\n")

  def open_on_a_full_disk(path, mode="r", *args, **kwargs):
    f = open(path, mode, *args, **kwargs)  # pylint: disable=unspecified-encoding
    if str(path).endswith("report.md") and "w" in mode:
      f.write("# half a rep")
      f.close()
      raise OSError(errno.ENOSPC, full, path)
    return f

  monkeypatch.setattr(analysis_stage, "open", open_on_a_full_disk, raising=False)
  with pytest.raises(workdir_lib.OutputWriteError) as info:
    analysis_lib.run(str(workdir))
  monkeypatch.undo()
  line = str(info.value)
  assert "\n" not in line and line.startswith(f"cannot write {outputs} ({full}: "), line
  assert "report.md" in line and "keeps its previous files" in line
  for name in ("metrics.json", "report.md"):
    assert (outputs / name).read_text() == "previous\n", name
  assert not list(workdir.glob(".analysis.partial-*"))
  analysis_lib.run(str(workdir))
  for name in ("metrics.json", "report.md"):
    assert (outputs / name).read_bytes() == (reference / "analysis" / name).read_bytes(), name


def test_sigterm_during_the_analysis_leaves_no_half_written_output(shared, reference, tmp_path):
  """SIGTERM once the analysis is writing its outputs (into its staging directory): nothing of
  it is in WORKDIR/analysis; the rerun writes everything again, metrics.json byte for byte the
  uninterrupted run's, and removes the staging directory the killed run left."""
  workdir, env = tmp_path / "run", _env(shared)
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("analysis"))
  analysis_only = [*STUDY, "--config.stages=analysis"]
  proc = _cli.start(analysis_only, workdir, env, tmp_path / "term")
  deadline = time.monotonic() + 300
  while not list(workdir.glob(".analysis.partial-*/predictions.npz")):
    assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == -signal.SIGTERM, "the analysis ended before the signal"
  assert not (workdir / "analysis" / "metrics.json").exists()
  assert not (workdir / "analysis" / "report.md").exists()
  rerun = _cli.main(analysis_only, workdir, env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert ((workdir / "analysis" / "metrics.json").read_bytes() ==
          (reference / "analysis" / "metrics.json").read_bytes())
  assert (workdir / "analysis" / "report.md").read_text().endswith("\n")
  assert not list(workdir.glob(".analysis.partial-*"))
