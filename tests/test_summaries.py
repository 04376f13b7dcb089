"""kdjax.summaries: TensorBoard event files without TensorFlow, read back with an independent
TFRecord parser (CRC32C written out here), TensorBoard's own readers and, where installed,
TensorFlow's; and the object-store mirroring of kdjax.workdir.summary_writer."""

from __future__ import annotations

import os
import re
import socket
import struct

import numpy as np
import pytest

from kdjax import summaries
from kdjax import workdir as workdir_lib


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  """TFRecord's masking of a CRC: rotate right by 15 bits and add a constant."""
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path) -> list[bytes]:
  """The payloads of a TFRecord file, each length and payload CRC checked."""
  data, out = open(path, "rb").read(), []
  while data:
    header = data[:8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[8:12])[0] == _masked(_crc32c(header))
    payload = data[12:12 + length]
    assert struct.unpack("<I", data[12 + length:16 + length])[0] == _masked(_crc32c(payload))
    out.append(payload)
    data = data[16 + length:]
  return out


SCALARS = {0: {"replica_000_kd_s0/eval_accuracy": 0.125, "arm_kd/eval_loss": 2.5},
           7: {"replica_000_kd_s0/eval_accuracy": 0.8530884, "arm_kd/eval_loss": 0.25,
               "integer": 3}}


def _write(logdir) -> str:
  writer = summaries.SummaryWriter(str(logdir))
  for step, scalars in SCALARS.items():
    writer.write_scalars(step, scalars)
  writer.flush()
  writer.close()
  writer.close()  # closing twice is harmless
  return writer.path


def _expected() -> dict[str, dict[int, float]]:
  """Every (tag, step) -> the value as float32, the precision TensorBoard stores."""
  out = {}
  for step, scalars in SCALARS.items():
    for tag, value in scalars.items():
      out.setdefault(tag, {})[step] = float(np.float32(value))
  return out


def test_crc32c_reference():
  assert _crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C


def test_event_file_name_framing_and_events(tmp_path):
  from tensorboard.compat.proto import event_pb2  # the schema only; parsing is ours

  path = _write(tmp_path)
  name = os.path.basename(path)
  assert os.path.dirname(path) == str(tmp_path)
  match = re.fullmatch(r"events\.out\.tfevents\.(\d{10})\.(.+)\.(\d+)\.(\d+)", name)
  assert match and match[2] == socket.gethostname() and int(match[3]) == os.getpid(), name

  events = [event_pb2.Event.FromString(r) for r in _records(path)]
  assert events[0].file_version == "brain.Event:2" and events[0].wall_time > 0
  got = {}
  for event in events[1:]:
    assert event.wall_time >= events[0].wall_time
    for value in event.summary.value:
      assert value.metadata.plugin_data.plugin_name == "scalars"
      assert value.tensor.dtype == 1 and not value.tensor.tensor_shape.dim  # DT_FLOAT, rank 0
      got.setdefault(value.tag, {})[event.step] = value.tensor.float_val[0]
  assert [e.step for e in events[1:]] == list(SCALARS)
  assert got == _expected()


def test_tensorboard_reads_tags_steps_and_values(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
  from tensorboard.util import tensor_util

  _write(tmp_path)
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert sorted(acc.Tags()["tensors"]) == sorted(_expected())
  got = {tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
         for tag in acc.Tags()["tensors"]}
  assert got == _expected()
  # What TensorBoard's scalar dashboard lists: every tag under the scalars plugin.
  plugin = plugin_event_accumulator.EventAccumulator(str(tmp_path))
  plugin.Reload()
  assert sorted(plugin.PluginTagToContent("scalars")) == sorted(_expected())


def test_tensorflow_summary_iterator_reads_them(tmp_path):
  tf = pytest.importorskip("tensorflow")
  path = _write(tmp_path)
  got = {}
  for event in tf.compat.v1.train.summary_iterator(path):
    for value in event.summary.value:
      got.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  assert got == _expected()


def test_two_writers_two_files_and_no_writes_after_close(tmp_path):
  first, second = summaries.SummaryWriter(str(tmp_path)), summaries.SummaryWriter(str(tmp_path))
  assert first.path != second.path
  first.close(), second.close()
  assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p)
                                                for p in (first.path, second.path))
  with pytest.raises(ValueError, match="closed summary writer"):
    first.write_scalars(1, {"a": 1.0})


def test_object_store_writer_mirrors_on_flush_close_and_every_interval(tmp_path, monkeypatch):
  """summary_writer for a gs:// logdir stages locally and copies the files into the logdir
  (copy_tree, pointed here at a local directory standing in for the bucket)."""
  bucket = tmp_path / "bucket"
  copies = []

  def copy_tree(source, target):
    assert target == "gs://b/run/teacher"
    copies.append(sorted(os.listdir(source)))
    bucket.mkdir(exist_ok=True)
    for name in os.listdir(source):
      (bucket / name).write_bytes(open(os.path.join(source, name), "rb").read())

  monkeypatch.setattr(workdir_lib, "copy_tree", copy_tree)
  monkeypatch.setattr(workdir_lib, "MIRROR_EVERY_S", 3600.0)
  writer = workdir_lib.summary_writer("gs://b/run/teacher")
  assert isinstance(writer, summaries.SummaryWriter) and copies == []
  staging = os.path.dirname(writer.path)
  writer.write_scalars(0, SCALARS[0])
  assert copies == []  # within the interval: nothing copied yet
  writer.flush()
  assert len(copies) == 1
  monkeypatch.setattr(workdir_lib, "MIRROR_EVERY_S", 0.0)
  writer.write_scalars(7, SCALARS[7])  # the interval has passed: copied at once
  assert len(copies) == 2
  writer.close()
  assert len(copies) == 3 and not os.path.exists(staging)
  (mirrored,) = bucket.iterdir()
  assert mirrored.name == os.path.basename(writer.path)
  from tensorboard.compat.proto import event_pb2
  steps = [event_pb2.Event.FromString(r).step for r in _records(mirrored)[1:]]
  assert steps == list(SCALARS)
