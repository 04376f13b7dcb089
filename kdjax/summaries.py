"""TensorBoard scalar event files written without TensorFlow.

Why: TensorFlow's summary writer (and clu's `SummaryWriter`, built on it) costs seconds of import
in every process, and GPU images often lack TensorFlow altogether. TensorBoard ships what an event
file needs without it: the record framing (`tensorboard.summary.writer.record_writer`) and the
protocol buffers (`tensorboard.compat.proto`). TensorBoard's own `EventFileWriter` is not used: it
goes through `tensorboard.compat.tf`, which imports TensorFlow whenever it is installed.

Format (what TensorFlow 2's `tf.summary` writes, and what TensorBoard and
`tf.compat.v1.train.summary_iterator` read):
  * file `LOGDIR/events.out.tfevents.<%010d Unix seconds>.<hostname>.<pid>.<counter>`, one per
    writer (the counter numbers this process's writers, so two writers never share a file);
  * a sequence of TFRecords: uint64 length (little-endian), uint32 masked CRC32C of the length,
    the bytes of one serialized `Event` proto, uint32 masked CRC32C of the bytes;
  * the first Event has `wall_time` and `file_version = "brain.Event:2"`;
  * each `write_scalars(step, {tag: value})` appends one Event with `step`, `wall_time` and a
    `Summary` holding one value per tag: a float32 scalar `tensor` with `metadata.plugin_data.
    plugin_name = "scalars"` (the form of TensorFlow 2's `tf.summary.scalar` and TensorBoard's
    `scalar_pb`; TensorBoard's scalar dashboard reads it, as does `tf.make_ndarray`).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from typing import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, \
    types_pb2
from tensorboard.summary.writer import record_writer

FILE_VERSION = "brain.Event:2"
SCALARS_PLUGIN = "scalars"

_writer_ids = itertools.count()
_writer_ids_lock = threading.Lock()


def event_file_name(now: float | None = None) -> str:
  """`events.out.tfevents.<time>.<hostname>.<pid>.<counter>`, as TensorFlow names them."""
  with _writer_ids_lock:
    counter = next(_writer_ids)
  now = time.time() if now is None else now
  return f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.{counter}"


def scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
  """One scalar summary value: a float32 rank-0 tensor tagged for TensorBoard's scalars plugin."""
  metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=SCALARS_PLUGIN))
  tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT,
                                  tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                  float_val=[float(value)])
  return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)


class SummaryWriter:
  """Scalars into one new TensorBoard event file in the local directory `logdir`.

  The interface kdjax's training uses (that of clu's SummaryWriter): `write_scalars(step,
  {tag: value})`, `flush()`, `close()`. Not thread-safe; one writer per process and logdir.
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, event_file_name())
    self._file = open(self.path, "wb")  # pylint: disable=consider-using-with
    self._records = record_writer.RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version=FILE_VERSION))
    self._records.flush()

  def _write(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One Event at `step` holding every (tag, value) of `scalars`."""
    if self._file.closed:
      raise ValueError(f"write_scalars on the closed summary writer of {self.path}")
    summary = summary_pb2.Summary(value=[scalar_value(tag, v) for tag, v in scalars.items()])
    self._write(event_pb2.Event(step=int(step), wall_time=time.time(), summary=summary))

  def flush(self) -> None:
    if not self._file.closed:
      self._records.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._records.close()  # flushes and closes the file
