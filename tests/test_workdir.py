"""Tests of kdjax.workdir: path helpers, local I/O as with os/open, staging, the object-store lock.

The object-store lock runs against TensorStore's `file` kvstore, which implements the same
conditional writes (generation match) as its `gcs` driver; tests/test_object_store.py runs a
whole study against a GCS emulator. References: os/posixpath, direct matplotlib/numpy writes,
and the lock object's JSON read back with the standard library.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time

import numpy as np
import pytest
import tensorstore as ts
from matplotlib.figure import Figure

from kdjax import workdir as workdir_lib
from kdjax.analysis import plots


def test_paths_of_local_directories_and_object_stores():
  assert workdir_lib.is_local("runs/x") and workdir_lib.is_local("/abs/x")
  assert not workdir_lib.is_local("gs://bucket/run")
  assert workdir_lib.join("runs/x", "teacher", "checkpoints") == os.path.join(
      "runs/x", "teacher", "checkpoints")
  assert workdir_lib.join("gs://b/run", "teacher") == "gs://b/run/teacher"
  assert workdir_lib.join("gs://b/run/", "analysis") == "gs://b/run/analysis"
  assert workdir_lib.absolute("runs/x") == os.path.abspath("runs/x")
  assert workdir_lib.absolute("gs://b/run") == "gs://b/run"  # abspath would give CWD/gs:/b/run
  assert workdir_lib.parent("gs://b/run/teacher/checkpoints") == "gs://b/run/teacher"
  assert workdir_lib.parent("/a/b/c") == "/a/b"


@pytest.mark.parametrize("uri,spec", [
    ("gs://bucket/runs/x", {"driver": "gcs", "bucket": "bucket", "path": "runs/x/"}),
    ("gs://bucket/runs/x/", {"driver": "gcs", "bucket": "bucket", "path": "runs/x/"}),
    ("gs://bucket", {"driver": "gcs", "bucket": "bucket", "path": ""}),
    ("runs/x", {"driver": "file", "path": os.path.abspath("runs/x") + "/"})])
def test_kvstore_spec_of_object_store_workdirs(uri, spec):
  assert workdir_lib.kvstore_spec(uri) == spec


@pytest.mark.parametrize("uri", ["hf://org/model", "gs://", "s3://b/p"])
def test_kvstore_spec_rejects_other_stores(uri):
  with pytest.raises(ValueError, match=r"^--workdir: .* gs://BUCKET/PATH"):
    workdir_lib.kvstore_spec(uri)


def test_local_files_are_written_as_with_open(tmp_path):
  base = str(tmp_path / "w")
  workdir_lib.makedirs(workdir_lib.join(base, "teacher", "checkpoints"))
  assert os.path.isdir(os.path.join(base, "teacher", "checkpoints"))
  assert workdir_lib.is_dir(base) and not workdir_lib.exists(os.path.join(base, "config.json"))
  workdir_lib.write_text(os.path.join(base, "config.json"), '{"a": [1, 2]}')
  with open(os.path.join(base, "config.json")) as f:
    assert f.read() == '{"a": [1, 2]}'
  assert workdir_lib.read_json(os.path.join(base, "config.json")) == {"a": [1, 2]}
  workdir_lib.write_bytes(os.path.join(base, "x.bin"), b"\x00\xff")
  assert (tmp_path / "w" / "x.bin").read_bytes() == b"\x00\xff"
  step = os.path.join(base, "teacher", "checkpoints", "4")
  os.makedirs(os.path.join(step, "state"))
  workdir_lib.rename(step, step + ".unreadable-1")
  assert sorted(os.listdir(os.path.dirname(step))) == ["4.unreadable-1"]
  workdir_lib.rmtree(os.path.join(base, "teacher"))
  workdir_lib.rmtree(os.path.join(base, "no_such_dir"))  # nothing to delete: no error
  assert sorted(os.listdir(base)) == ["config.json", "x.bin"]


def test_staged_dir_publishes_whole_files_only_and_copy_tree_copies_every_file(tmp_path):
  """Locally the files are written into a sibling directory and renamed into place when the
  block ends; a block that fails (here: a full disk) leaves the previous files and no staging
  directory, and a staging directory left by a killed run is removed by the next."""
  target = str(tmp_path / "analysis")
  os.makedirs(target)
  with open(os.path.join(target, "metrics.json"), "w") as f:
    f.write("old")
  (tmp_path / ".analysis.partial-killed").mkdir()  # a run killed while writing
  with pytest.raises(workdir_lib.OutputWriteError, match=r"^cannot write .*analysis \(No space "
                     r"left on device: .*report.md\); it keeps its previous files"):
    with workdir_lib.staged_dir(target) as local:
      assert os.path.dirname(local) == str(tmp_path) and local != target
      assert not (tmp_path / ".analysis.partial-killed").exists()
      with open(os.path.join(local, "metrics.json"), "w") as f:
        f.write("new")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(local, "report.md"))
  assert os.listdir(target) == ["metrics.json"] and open(os.path.join(target, "metrics.json")
                                                         ).read() == "old"
  with workdir_lib.staged_dir(target) as local:
    os.makedirs(os.path.join(local, "plots"))
    for name in ("metrics.json", os.path.join("plots", "a.png")):
      with open(os.path.join(local, name), "w") as f:
        f.write("new")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]  # no staging left
  assert open(os.path.join(target, "metrics.json")).read() == "new"
  assert open(os.path.join(target, "plots", "a.png")).read() == "new"
  source = tmp_path / "src"
  (source / "plots").mkdir(parents=True)
  (source / "metrics.json").write_text("{}")
  (source / "plots" / "a.png").write_bytes(b"png")
  copied = workdir_lib.copy_tree(str(source), str(tmp_path / "copy"))
  assert sorted(copied) == ["metrics.json", os.path.join("plots", "a.png")]
  assert (tmp_path / "copy" / "plots" / "a.png").read_bytes() == b"png"
  assert (tmp_path / "copy" / "metrics.json").read_text() == "{}"


def test_plots_write_the_bytes_of_a_direct_savefig(tmp_path):
  """Through a buffer (the object-store path) the PNG is the one matplotlib writes to a local
  path itself."""
  fig = Figure(figsize=(2, 2))
  fig.add_subplot().plot([0, 1], [1, 0])
  # pylint: disable=protected-access
  plots._save(fig, str(tmp_path / "ours.png"))
  fig.savefig(tmp_path / "direct.png", dpi=plots._DPI, metadata={"Software": None})
  assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "direct.png").read_bytes()


# ---------------------------------------------------------------------------------- the lock


def _lock(tmp_path, **kw) -> workdir_lib.ObjectLock:
  return workdir_lib.ObjectLock("gs://bucket/run", directory=str(tmp_path), **kw)


def _record(tmp_path) -> dict:
  return json.loads((tmp_path / workdir_lib.LOCK_NAME).read_text())


def test_object_lock_is_exclusive_names_its_holder_and_is_deleted_on_release(tmp_path):
  first = _lock(tmp_path, heartbeat=3600).acquire()
  record = _record(tmp_path)
  assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
  assert abs(record["heartbeat"] - time.time()) < 60 and record["started"] == record["heartbeat"]
  with pytest.raises(workdir_lib.WorkdirBusy) as info:
    _lock(tmp_path).acquire()
  message = str(info.value)
  assert message.startswith(f"--workdir: gs://bucket/run is in use by another kdjax run (pid "
                            f"{os.getpid()} on {socket.gethostname()}, last seen ")
  assert "\n" not in message and "300 s" in message
  first.release()
  assert not (tmp_path / workdir_lib.LOCK_NAME).exists()
  first.release()  # twice: nothing more
  _lock(tmp_path, heartbeat=3600).acquire().release()  # free again


def test_object_lock_heartbeat_keeps_it_fresh_and_a_stale_one_is_taken_over(tmp_path, caplog):
  held = _lock(tmp_path, heartbeat=0.05).acquire()
  first_beat = _record(tmp_path)["heartbeat"]
  time.sleep(0.5)
  assert _record(tmp_path)["heartbeat"] > first_beat  # refreshed by the heartbeat thread
  held._stop.set()  # pylint: disable=protected-access  (as if the process had been killed)
  held._thread.join()  # pylint: disable=protected-access
  time.sleep(0.3)
  with caplog.at_level("WARNING"):
    taker = _lock(tmp_path, stale_after=0.2, heartbeat=3600).acquire()
  assert any("taking over the lock" in r.getMessage() for r in caplog.records)
  assert _record(tmp_path)["heartbeat"] > first_beat
  held.release()  # the old holder's release must not delete the new holder's lock
  assert (tmp_path / workdir_lib.LOCK_NAME).exists()
  taker.release()
  assert not (tmp_path / workdir_lib.LOCK_NAME).exists()


def test_of_two_runs_that_find_the_lock_absent_only_one_gets_it(tmp_path):
  """Run A reads "absent" (TensorStore's read, whose generation conditions the write); before
  A writes, run B takes the lock; A's conditional write fails and A is refused naming B,
  instead of both believing they hold it."""
  a, b = _lock(tmp_path, heartbeat=3600), _lock(tmp_path, heartbeat=3600)
  store = ts.KvStore.open({"driver": "file", "path": str(tmp_path) + "/"}).result()

  class Done:
    def __init__(self, value):
      self.value = value

    def result(self):
      return self.value

  class Interleaved:
    def read(self, key):
      result = store.read(key).result()
      if not b.generation:
        b.acquire()  # B wins the race between A's read and A's write
      return Done(result)

    def write(self, *args, **kwargs):
      return store.write(*args, **kwargs)

  a._store = Interleaved()  # pylint: disable=protected-access
  with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {os.getpid()} on ") as info:
    a.acquire()
  assert "last seen" not in str(info.value)  # refused by the failed conditional write
  assert a.generation is None and b.generation is not None
  b.release()
