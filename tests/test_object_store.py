"""A whole study with a gs:// workdir, against a local GCS emulator that the test starts.

The emulator is `gcp-storage-emulator` (pure Python, in memory); kdjax reaches it the way it
reaches Google Cloud Storage, through three clients, each pointed at it by its own variable:
  TensorStore (Orbax's array data)  TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  etils.epath (every other file)    EPATH_USE_TF=false (gcsfs instead of tf.io.gfile, whose GCS
                                    client has no emulator setting), STORAGE_EMULATOR_HOST
  TensorBoard events                written locally, copied through epath (kdjax.workdir)
The emulator omits the object generation on downloads (`x-goog-generation`), which TensorStore's
OCDBT manifest updates need ("Malformed StorageGeneration"); the server script below adds it.
It does not enforce `ifGenerationMatch`, so the lock's race is tested in test_workdir.py.

The study is stopped by SIGTERM in its students stage, then rerun (the lock object is released
at exit, so the rerun may start at once), and must end bitwise where the same uninterrupted
study on a local disk ends: checkpoints, metrics.json, predictions.npz, plots, TensorBoard
scalars. Skipped when the emulator or gcsfs is not installed (setup.py's test extras).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("gcp_storage_emulator", reason="the GCS emulator (pip install "
                    "gcp-storage-emulator) is not installed")
pytest.importorskip("gcsfs", reason="gcsfs (epath's gs:// backend without TensorFlow's GCS "
                    "client) is not installed")

import _cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

BUCKET = "kdjax-test"
# 10 teacher steps, 20 student steps (kd, rcd, siddo x 1 seed), a checkpoint every 5 steps.
STUDY = ["--config.num_seeds=1", "--config.num_epochs=2", "--config.teacher_num_epochs=1",
         "--config.model_kwargs.width=0.125", "--config.batch_size=128",
         "--config.checkpoint_every_steps=5", "--config.eval_every_steps=10",
         "--config.log_every_steps=1"]
STUDENT_STEPS = 20

SERVER = textwrap.dedent("""
    import sys, time
    from gcp_storage_emulator.handlers import objects

    _download = objects.download

    def download(request, response, storage, *args, **kwargs):
      try:  # what GCS sends with every object's bytes
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
      except Exception:
        pass
      return _download(request, response, storage, *args, **kwargs)

    objects.download = download  # before the server module builds its routes
    from gcp_storage_emulator.server import create_server
    server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True,
                           default_bucket=sys.argv[2])
    server.start()
    print("ready", flush=True)
    while True:
      time.sleep(3600)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The emulator's URL; this process's environment points epath and TensorStore at it
  (restored afterwards)."""
  base = tmp_path_factory.mktemp("gcs")
  (base / "server.py").write_text(SERVER)
  port = _free_port()
  proc = subprocess.Popen([sys.executable, str(base / "server.py"), str(port), BUCKET],
                          stdout=subprocess.PIPE, stderr=open(base / "server.log", "w"),
                          text=True)
  assert proc.stdout.readline().strip() == "ready", (base / "server.log").read_text()
  url = f"http://127.0.0.1:{port}"
  variables = {"EPATH_USE_TF": "false", "STORAGE_EMULATOR_HOST": url,
               "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
  saved = {k: os.environ.get(k) for k in variables}
  os.environ.update(variables)
  # epath decides once per process whether gs:// goes through TensorFlow (functools.cache); an
  # earlier test in this worker may have decided it before EPATH_USE_TF was set.
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  yield {"url": url, "variables": variables, "base": base}
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  proc.terminate()
  proc.wait(timeout=30)


def _env(emulator) -> dict[str, str]:
  return {**_cli.env(1, emulator["base"] / "xla_cache"), **emulator["variables"]}


@pytest.fixture(scope="module")
def local_reference(emulator, tmp_path_factory):
  """The uninterrupted study on a local disk (it also fills the compilation cache)."""
  workdir = tmp_path_factory.mktemp("local") / "run"
  proc = _cli.main(STUDY, workdir, _env(emulator))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _forget_listings() -> None:
  """Empties the listing cache of the gcsfs instance epath uses in this process: it does not
  see what the subprocesses wrote."""
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()


def _read(uri: str) -> bytes:
  from etils import epath  # pylint: disable=g-import-not-at-top
  _forget_listings()
  return epath.Path(uri).read_bytes()


def _files(uri: str) -> list[str]:
  """Relative paths of every object under `uri`."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  _forget_listings()
  root = uri.split("://", 1)[-1].rstrip("/") + "/"
  out = []
  for directory, _, files in epath.Path(uri).walk():
    relative = (str(directory).split("://", 1)[-1].rstrip("/") + "/")[len(root):]
    out += [relative + f for f in files]
  return sorted(out)


def _final_state(checkpoints: str) -> dict[str, bytes]:
  """{leaf path: bytes} of the newest step's train state, read with Orbax alone (gs:// too)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _forget_listings()
  step = max(ocp.path.step.checkpoint_steps(checkpoints))
  tree = ocp.StandardCheckpointer().restore(f"{checkpoints}/{step}/state")
  return {jax.tree_util.keystr(p): np.asarray(v).tobytes()
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _scalars(event_file: bytes, tmp_path, name: str) -> dict[tuple[str, int], float]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = tmp_path / name
  path.write_bytes(event_file)
  out = {}
  for event in tf.compat.v1.train.summary_iterator(str(path)):
    for value in event.summary.value:
      number = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
      out[(value.tag, event.step)] = float(number)
  return out


def test_a_study_on_gs_stopped_and_resumed_equals_one_on_a_local_disk(emulator, local_reference,
                                                                       tmp_path):
  workdir = f"gs://{BUCKET}/study"
  env = _env(emulator)
  logs = tmp_path / "logs"
  proc = _cli.start(STUDY, workdir, env, logs)
  deadline = time.monotonic() + 400
  while "[students] step 7/" not in (logs / "stdout.txt").read_text():
    assert proc.poll() is None, (logs / "stderr.txt").read_text()[-3000:]
    assert time.monotonic() < deadline, "the students stage did not start"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 143, (logs / "stderr.txt").read_text()[-3000:]
  stderr = (logs / "stderr.txt").read_text()
  stopped = re.search(rf"^kdjax: stopped by SIGTERM at step (\d+) of {STUDENT_STEPS} of the "
                      "students stage", stderr, re.MULTILINE)
  assert stopped and "Traceback" not in stderr, stderr[-3000:]
  step = int(stopped[1])
  assert 7 <= step < STUDENT_STEPS
  files = _files(workdir)
  assert ".kdjax.lock" not in files  # released at exit: the rerun need not wait
  assert f"students/checkpoints/{step}/commit_success.txt" in files
  assert not any(f.startswith("analysis/") for f in files)

  rerun = _cli.main(STUDY, workdir, env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"students: resuming from checkpoint step {step} of {STUDENT_STEPS}" in rerun.stderr
  assert f"wrote {workdir}/analysis/ in" in rerun.stdout

  local = local_reference
  for stage in ("teacher", "students"):
    ours = _final_state(f"{workdir}/{stage}/checkpoints")
    theirs = _final_state(str(local / stage / "checkpoints"))
    assert ours.keys() == theirs.keys() and len(ours) > 5
    assert [k for k in ours if ours[k] != theirs[k]] == [], stage
    assert (_read(f"{workdir}/{stage}/replicas.json") ==
            (local / stage / "replicas.json").read_bytes())
  assert _read(f"{workdir}/config.json") == (local / "config.json").read_bytes()
  for name in ("metrics.json", "plots/confidence_scatter.png", "plots/agreement_split.png",
               "plots/metrics.png"):
    assert _read(f"{workdir}/analysis/{name}") == (local / "analysis" / name).read_bytes(), name
  ours = np.load(io.BytesIO(_read(f"{workdir}/analysis/predictions.npz")))
  theirs = np.load(local / "analysis" / "predictions.npz")
  assert sorted(ours.files) == sorted(theirs.files)
  for key in theirs.files:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  report = _read(f"{workdir}/analysis/report.md").decode()
  assert report == (local / "analysis" / "report.md").read_text().replace(str(local), workdir)

  # TensorBoard: each stage has two event files on gs:// (the stopped run's, the rerun's);
  # together they hold the uninterrupted local run's scalars.
  for stage in ("teacher", "students"):
    events = [f for f in _files(f"{workdir}/{stage}") if f.startswith("events.out.tfevents")]
    assert len(events) == 2, events
    ours = {}
    for i, name in enumerate(events):
      ours.update(_scalars(_read(f"{workdir}/{stage}/{name}"), tmp_path, f"{stage}{i}"))
    (local_events,) = (local / stage).glob("events.out.tfevents*")
    theirs = _scalars(local_events.read_bytes(), tmp_path, f"{stage}_local")
    assert ours == theirs and len(theirs) >= 5, stage


def test_a_second_run_on_a_gs_workdir_in_use_is_refused(emulator, local_reference):
  """A live lock object (fresh heartbeat) refuses another run with one line and exit 2 before
  anything is written."""
  from kdjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = f"gs://{BUCKET}/busy"
  held = workdir_lib.ObjectLock(workdir, heartbeat=3600).acquire()
  try:
    before = _files(workdir)
    proc = _cli.main([*STUDY, "--config.stages=teacher"], workdir, _env(emulator))
  finally:
    held.release()
  line = _cli.one_error_line(proc)
  assert line.startswith(f"kdjax: error: --workdir: {workdir} is in use by another kdjax run "
                         f"(pid {os.getpid()} on {socket.gethostname()}, last seen "), line
  assert before == [".kdjax.lock"] and _files(workdir) == []  # nothing written; released
  del local_reference  # only orders it: its compiled programs keep this run to the imports
