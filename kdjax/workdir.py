"""Every access to a study's workdir, for local paths and object stores (gs://) alike.

A workdir is a local directory or an object-store prefix such as `gs://bucket/runs/x`; every
file kdjax writes or reads there (config.json, replicas.json, the Orbax checkpoints' listings
and renames, the analysis outputs, TensorBoard events, the lock) goes through this module, built
on `etils.epath`, the path library Orbax itself uses (for gs:// it uses `tf.io.gfile` when
TensorFlow is installed, else fsspec/gcsfs; `EPATH_USE_TF=false` picks gcsfs). Orbax writes the
array data itself, through TensorStore's `gcs` driver. Paths stay strings; a local path behaves
exactly as with `os` and `open`.

What differs on an object store:
  * writers that want a local file (matplotlib, numpy's savez, kdjax.summaries' TensorBoard
    event writer) write into a local staging directory that is copied into the workdir
    (`staged_dir`, `summary_writer`);
  * the lock: an fcntl lock on local disks; on an object store a lock object created only if
    absent (a conditional write, GCS `ifGenerationMatch`) and refreshed by a heartbeat
    (`ObjectLock`).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import glob
import json
import os
import posixpath
import shutil
import socket
import tempfile
import threading
import time
from typing import Iterator

from absl import logging
from etils import epath

LOCK_NAME = ".kdjax.lock"
# An object-store lock not refreshed for this long belongs to a run that ended without
# releasing it (kill -9, a lost VM): the next run takes it over.
STALE_AFTER_S = 300.0
HEARTBEAT_S = 30.0
# Staged TensorBoard events are copied into an object-store workdir at most this often while
# scalars arrive (and always on flush and close).
MIRROR_EVERY_S = 60.0


def is_local(path: str) -> bool:
  """True for a local path, False for a URI with a scheme (gs://bucket/...)."""
  return "://" not in os.fspath(path)


def _path(path: str) -> epath.Path:
  return epath.Path(path)


def join(base: str, *parts: str) -> str:
  """`os.path.join` for local paths, '/'-joined for URIs."""
  return os.path.join(base, *parts) if is_local(base) else posixpath.join(base, *parts)


def absolute(path: str) -> str:
  """The absolute form of a local path; a URI unchanged (`os.path.abspath` would mangle it)."""
  return os.path.abspath(path) if is_local(path) else os.fspath(path)


def parent(path: str) -> str:
  return os.path.dirname(path) if is_local(path) else posixpath.dirname(path.rstrip("/"))


def exists(path: str) -> bool:
  return _path(path).exists()


def is_dir(path: str) -> bool:
  return _path(path).is_dir()


def makedirs(path: str) -> None:
  """Creates the directory and its parents (on an object store: nothing is needed; epath
  writes a placeholder where the backend wants one)."""
  _path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
  return _path(path).read_text()


def read_json(path: str):
  return json.loads(read_text(path))


def write_text(path: str, text: str) -> None:
  """Writes the file whole or not at all (`write_bytes`)."""
  write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
  """Writes the file whole or not at all: locally into a temporary file beside it, renamed over
  it once written and synced (an object store replaces an object whole anyway). A failure (a
  full disk, a signal) leaves the previous file as it was."""
  if not is_local(path):
    _path(path).write_bytes(data)
    return
  directory, name = os.path.split(os.path.abspath(path))
  fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise


def check_usable(workdir: str) -> None:
  """Raises ValueError ('--workdir: ...', one line) when a local `workdir` cannot be used: an
  existing path that is not a directory, a path under a file, or a directory (the workdir or its
  nearest existing ancestor, where it would be created) in which this process cannot create
  files. Creates nothing. An object-store workdir is checked by `kvstore_spec`."""
  if not is_local(workdir):
    return
  path = os.path.abspath(workdir)
  if os.path.lexists(path) and not os.path.isdir(path):
    what = "a broken symbolic link" if not os.path.exists(path) else "a file"
    raise ValueError(f"--workdir: {workdir} is {what}, not a directory; give a new directory or "
                     "the workdir of this study")
  existing = path
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"--workdir: {workdir} cannot be created: {existing} is not a directory; "
                     "give a path under a directory")
  try:  # os.access does not know read-only mounts and the like: try it
    fd, probe = tempfile.mkstemp(prefix=".kdjax-probe-", dir=existing)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise ValueError(f"--workdir: cannot create files in {existing} ({e.strerror or e}); give "
                     "a directory you can write to") from None


def rename(source: str, target: str) -> None:
  """Renames a file or directory (on an object store: copies every object, then deletes)."""
  if is_local(source):
    os.rename(source, target)
  else:
    _path(source).rename(target)


def rmtree(path: str) -> None:
  """Deletes a directory tree; nothing if it does not exist."""
  if is_local(path):
    shutil.rmtree(path, ignore_errors=True)
  elif exists(path):
    _path(path).rmtree()


def copy_tree(source: str, target: str) -> list[str]:
  """Copies every file under the local directory `source` to the same relative path under
  `target` (a directory or object prefix), overwriting; returns the relative paths."""
  copied = []
  for root, _, files in os.walk(source):
    for name in sorted(files):
      local = os.path.join(root, name)
      relative = os.path.relpath(local, source)
      destination = join(target, *relative.split(os.sep))
      if is_local(destination):  # an object store has no directories to create
        os.makedirs(os.path.dirname(destination), exist_ok=True)
      with open(local, "rb") as f:
        write_bytes(destination, f.read())
      copied.append(relative)
  return copied


class OutputWriteError(RuntimeError):
  """Outputs that could not be written (a full disk, a lost mount): one line naming the path and
  the cause; the directory keeps its previous files."""


@contextlib.contextmanager
def staged_dir(directory: str) -> Iterator[str]:
  """A local directory to write `directory`'s files into, published when the block ends without
  an error, so that no half-written file is ever in place (a full disk, a kill or a signal while
  writing leave `directory` with its previous files):

  * local: a temporary sibling directory `.NAME.partial-XXXX` (same filesystem), whose files are
    then moved into `directory` one by one with an atomic rename; leftovers of a run killed
    while writing are deleted by the next one (the workdir lock makes it the only writer);
  * object store: a temporary local directory whose files are copied there (an object is
    replaced whole).

  An OSError inside the block or while publishing becomes OutputWriteError."""
  local_target = is_local(directory)
  if local_target:
    parent_dir, name = os.path.split(os.path.abspath(directory))
  try:
    if local_target:
      os.makedirs(parent_dir, exist_ok=True)
      for stale in glob.glob(os.path.join(parent_dir, f".{name}.partial-*")):
        shutil.rmtree(stale, ignore_errors=True)
      local = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent_dir)
    else:
      local = tempfile.mkdtemp(prefix="kdjax-stage-")
  except OSError as e:
    raise _output_error(directory, e) from e
  try:
    yield local
    if local_target:
      _publish(local, directory)
    else:
      copy_tree(local, directory)
  except OSError as e:
    raise _output_error(directory, e) from e
  finally:
    shutil.rmtree(local, ignore_errors=True)


def _output_error(directory: str, error: OSError) -> OutputWriteError:
  where = f": {error.filename}" if error.filename else ""
  return OutputWriteError(
      f"cannot write {directory} ({error.strerror or error}{where}); it keeps its previous "
      "files; free space and rerun the same command to write it again")


def _publish(local: str, directory: str) -> None:
  """Moves every file under `local` to the same place under `directory` (atomic renames, within
  one filesystem), subdirectories' files first, so that the top-level summaries (metrics.json,
  report.md) appear last."""
  files = []
  for root, _, names in os.walk(local):
    files += [os.path.relpath(os.path.join(root, n), local) for n in names]
  for relative in sorted(files, key=lambda p: (-p.count(os.sep), p)):
    target = os.path.join(directory, relative)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(os.path.join(local, relative), target)


# ---------------------------------------------------------------------------------- TensorBoard


def summary_writer(logdir: str):
  """A TensorBoard scalar writer for `logdir` (kdjax.summaries.SummaryWriter, no TensorFlow).
  For an object store the events are written to a local staging directory and copied into
  `logdir` on `flush`, `close` and at most every MIRROR_EVERY_S seconds while scalars arrive (an
  object cannot be appended to: TensorFlow's own GCS writer also uploads the whole file on each
  flush)."""
  from kdjax import summaries  # pylint: disable=g-import-not-at-top  (only stages that log)

  if is_local(logdir):
    return summaries.SummaryWriter(logdir)

  class MirroredSummaryWriter(summaries.SummaryWriter):
    """Events in a local directory, mirrored into the object-store `logdir`."""

    def __init__(self):
      self._local = tempfile.mkdtemp(prefix="kdjax-events-")
      self._last_mirror = time.monotonic()
      # Also when the process leaves without `close` (a stop on SIGTERM flushes, then exits).
      atexit.register(shutil.rmtree, self._local, True)
      super().__init__(self._local)

    def _mirror(self) -> None:
      copy_tree(self._local, logdir)
      self._last_mirror = time.monotonic()

    def write_scalars(self, step, scalars):
      super().write_scalars(step, scalars)
      if time.monotonic() - self._last_mirror >= MIRROR_EVERY_S:
        self.flush()

    def flush(self):
      super().flush()
      self._mirror()

    def close(self):
      super().close()
      self._mirror()
      shutil.rmtree(self._local, ignore_errors=True)

  return MirroredSummaryWriter()


# ---------------------------------------------------------------------------------- the lock


class WorkdirBusy(RuntimeError):
  """Another kdjax run holds the workdir."""


def lock(workdir: str):
  """Takes the workdir's lock for the rest of this process, or raises WorkdirBusy naming the
  holder. Local: `FileLock` (fcntl); object store: `ObjectLock` (released at exit)."""
  if is_local(workdir):
    return FileLock(workdir).acquire()
  return ObjectLock(workdir).acquire()


def _busy(workdir: str, who: str, extra: str = "") -> WorkdirBusy:
  return WorkdirBusy(f"--workdir: {workdir} is in use by another kdjax run ({who}); wait for "
                     f"it to end or use another --workdir{extra}")


class FileLock:
  """An exclusive fcntl lock on WORKDIR/.kdjax.lock (non-blocking), "PID HOST" written into the
  file. Held until the process ends: the kernel drops it however the process ends, so a kill -9
  leaves no stale lock."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.fd: int | None = None

  def acquire(self) -> FileLock:
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(os.path.join(self.workdir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").split()
      os.close(fd)
      raise _busy(self.workdir, f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2
                  else "another process") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    self.fd = fd  # never closed: closing would release the lock
    return self


def kvstore_spec(uri: str) -> dict:
  """The TensorStore kvstore of a directory: gs://B/P -> the `gcs` driver (as Orbax opens it),
  a local path -> `file`. Raises ValueError for other URIs: kdjax is tested with local paths
  and gs:// only (s3:// would need s3fs behind epath, and TensorFlow's gfile has no S3)."""
  if is_local(uri):
    return {"driver": "file", "path": os.path.abspath(uri) + "/"}
  scheme, _, rest = uri.partition("://")
  bucket, _, prefix = rest.partition("/")
  if scheme != "gs" or not bucket:
    raise ValueError(f"--workdir: {uri} is neither a local path nor gs://BUCKET/PATH")
  prefix = prefix.strip("/")
  return {"driver": "gcs", "bucket": bucket, "path": prefix + "/" if prefix else ""}


class ObjectLock:
  """WORKDIR/.kdjax.lock as an object: {"host", "pid", "started", "heartbeat"} (Unix times).

  Acquire: read it; when it is absent, or its heartbeat is older than `stale_after` seconds (a
  run that died without releasing it), write ours conditionally on the generation just read
  (TensorStore `if_equal`, which GCS enforces with ifGenerationMatch), so of two runs starting
  at once exactly one wins; a live holder gets WorkdirBusy naming it. While held, a daemon
  thread rewrites it every `heartbeat` seconds (again conditionally: a run whose lock was taken
  over, after a pause longer than `stale_after`, warns instead of writing). `release` (also at
  interpreter exit, e.g. after SIGTERM's exit 143) deletes it if it is still ours.

  A live holder is first looked for through epath, so a refused run never opens TensorStore,
  whose C++ log line about the credentials it uses would precede the one error line.
  `directory`: where the object lives (default: `workdir`, which names it in messages).
  """

  def __init__(self, workdir: str, *, stale_after: float = STALE_AFTER_S,
               heartbeat: float = HEARTBEAT_S, directory: str | None = None):
    self.workdir = workdir
    self.directory = workdir if directory is None else directory
    self.stale_after, self.heartbeat = float(stale_after), float(heartbeat)
    self._spec = kvstore_spec(self.directory)
    self._store = None
    self.generation: bytes | None = None
    self.record: dict = {}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._mutex = threading.Lock()

  @property
  def store(self):
    if self._store is None:
      import tensorstore as ts  # pylint: disable=g-import-not-at-top
      self._store = ts.KvStore.open(self._spec).result()
    return self._store

  def _holder(self, value: bytes) -> tuple[str, float]:
    """("pid P on HOST", seconds since its heartbeat) of a lock object's content."""
    try:
      record = json.loads(value)
      return (f"pid {record['pid']} on {record['host']}",
              time.time() - float(record["heartbeat"]))
    except (ValueError, KeyError, TypeError):
      return "unreadable lock object", float("inf")

  def _refuse_if_live(self, value: bytes) -> None:
    who, age = self._holder(value)
    if age < self.stale_after:
      raise _busy(self.workdir, f"{who}, last seen {max(age, 0):.0f} s ago",
                  f" (a run that died holds it for at most {self.stale_after:.0f} s)")

  def acquire(self) -> ObjectLock:
    path = join(self.directory, LOCK_NAME)
    if exists(path):
      try:
        self._refuse_if_live(_path(path).read_bytes())
      except FileNotFoundError:  # released meanwhile
        pass
    current = self.store.read(LOCK_NAME).result()
    if current.state == "value":
      self._refuse_if_live(current.value)
      who, age = self._holder(current.value)
      logging.warning("%s: taking over the lock of a run that has not been seen for %.0f s (%s)",
                      self.workdir, age, who)
    now = time.time()
    self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
                   "heartbeat": now}
    written = self.store.write(LOCK_NAME, json.dumps(self.record).encode(),
                               if_equal=current.stamp.generation).result()
    if not written.generation:  # the condition failed: another run wrote it since our read
      raced = self.store.read(LOCK_NAME).result()
      who = self._holder(raced.value)[0] if raced.state == "value" else "another process"
      raise _busy(self.workdir, who)
    self.generation = written.generation
    self._thread = threading.Thread(target=self._beat, name="kdjax-workdir-lock", daemon=True)
    self._thread.start()
    atexit.register(self.release)
    return self

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat):
      with self._mutex:
        if self.generation is None:
          return
        self.record["heartbeat"] = time.time()
        try:
          written = self.store.write(LOCK_NAME, json.dumps(self.record).encode(),
                                     if_equal=self.generation).result()
        except Exception as e:  # pylint: disable=broad-except  (a network error: try again)
          logging.warning("%s: cannot refresh the workdir lock (%s)", self.workdir, e)
          continue
        if not written.generation:
          logging.warning("%s: the workdir lock was taken over by another run (this run was "
                          "not seen for more than %.0f s)", self.workdir, self.stale_after)
          self.generation = None
          return
        self.generation = written.generation

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock object if it is still this run's."""
    self._stop.set()
    with self._mutex:
      if self.generation is None:
        return
      generation, self.generation = self.generation, None
      try:
        self.store.write(LOCK_NAME, None, if_equal=generation).result()
      except Exception as e:  # pylint: disable=broad-except  (at exit: say it, do not raise)
        logging.warning("%s: cannot delete the workdir lock (%s); the next run takes it over "
                        "after %.0f s", self.workdir, e, self.stale_after)
