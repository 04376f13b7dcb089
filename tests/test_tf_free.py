"""kdjax without TensorFlow, TFDS or clu: a study on the built-in digits data runs end to end in a
subprocess where importing `tensorflow`, `tensorflow_datasets` or `clu` fails (stub packages
first on PYTHONPATH whose `__init__` records the attempt and raises ImportError), and the core
modules never import TensorFlow even where it is installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import _cli

BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")
TINY = ["--config.model=mlp", "--config.num_seeds=1", "--config.num_epochs=1",
        "--config.teacher_num_epochs=1"]


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
  """(environment, log file): CPU JAX, and stub packages that fail to import, each attempt
  written to the log with the importing stack."""
  base = tmp_path_factory.mktemp("tf_free")
  for name in BLOCKED:
    (base / "stubs" / name).mkdir(parents=True)
    (base / "stubs" / name / "__init__.py").write_text(textwrap.dedent("""\
        import os, traceback
        with open(os.environ["KDJAX_TEST_STUB_LOG"], "a") as f:
          f.write(f"=== import {__name__}\\n" + "".join(traceback.format_stack()))
        raise ImportError(f"No module named {__name__!r} (test stub)")
        """))
  log = base / "attempts.txt"
  env = _cli.env(1, base / "xla_cache")
  env.update(PYTHONPATH=os.pathsep.join([str(base / "stubs"), env.get("PYTHONPATH", "")]),
             KDJAX_TEST_STUB_LOG=str(log))
  return env, log


@pytest.fixture
def blocked(stubs):
  """The stub environment with an empty attempts log."""
  stubs[1].write_text("")
  return stubs


def _python(code: str, env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=_cli.ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_the_stubs_block_the_imports(blocked):
  env, log = blocked
  proc = _python("import tensorflow", env)
  assert proc.returncode == 1 and "ImportError: No module named 'tensorflow' (test stub)" in \
      proc.stderr
  assert "=== import tensorflow" in log.read_text()


def test_core_imports_do_not_load_tensorflow():
  """With TensorFlow installed (the normal environment), importing kdjax's entry points loads
  none of TensorFlow, TFDS, clu or keras."""
  proc = _python("import sys, kdjax.main, kdjax.train, kdjax.analysis.stage, kdjax.data, "
                 "kdjax.metrics, kdjax.summaries, kdjax.workdir\n"
                 "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                 "('tensorflow', 'tensorflow_datasets', 'clu', 'keras')))",
                 _cli.env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]"


def _digits_reference(split):
  """The documented split and rescaling of kdjax.data.digits, redone in numpy."""
  from sklearn.datasets import load_digits
  bunch = load_digits()
  labels = np.asarray(bunch.target)
  rng = np.random.RandomState(0)
  is_test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    is_test[idx[rng.permutation(len(idx))[:int(round(len(idx) / 3))]]] = True
  keep = is_test if split == "test" else ~is_test
  return np.round(np.asarray(bunch.images)[keep] * 255 / 16).astype(np.uint8)[..., None], \
      labels[keep]


def test_builtin_datasets_load_and_tfds_names_say_what_to_install(blocked, tmp_path):
  env, log = blocked
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
  np.savez(tmp_path / "own.npz", x_train=x, y_train=np.arange(5), x_test=x, y_test=np.arange(5))
  (tmp_path / "folder" / "train" / "a").mkdir(parents=True)
  code = f"""if True:
    import json, sys
    import numpy as np
    from kdjax import data
    out = {{}}
    digits = data.load("digits", "test")
    np.savez({str(tmp_path / "digits.npz")!r}, **digits)
    out["digits_spec"] = data.spec("digits").input_shape
    syn = data.load("synthetic:n_train=40,n_test=10,dim=3", "train")
    out["synthetic"] = {{k: [str(v.dtype), v.shape] for k, v in syn.items()}}
    out["npz"] = data.load("npz:{tmp_path / 'own.npz'}", "train")["image"].shape
    for name in ("cifar10", "tiny_imagenet", "image_folder:{tmp_path / 'folder'}"):
      try:
        data.load(name, "train", data_dir={str(tmp_path)!r})
      except data.DatasetNotAvailableError as e:
        out[name.split(":")[0]] = str(e)
    out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in
                            ("tensorflow", "tensorflow_datasets", "clu", "keras"))
    print(json.dumps(out))
    """
  proc = _python(code, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  with np.load(tmp_path / "digits.npz") as got:
    image, label = _digits_reference("test")
    np.testing.assert_array_equal(got["image"], image)
    np.testing.assert_array_equal(got["label"], label)
    assert got["label"].dtype == np.int32
  assert out["digits_spec"] == [8, 8, 1]
  assert out["synthetic"] == {"vector": ["float32", [40, 3]], "label": ["int32", [40]],
                              "clean_label": ["int32", [40]], "superclass": ["int32", [40]]}
  assert out["npz"] == [5, 4, 4, 1]
  for name in ("cifar10", "tiny_imagenet", "image_folder"):
    message = out[name]
    assert "\n" not in message and f"dataset '{name}" in message, message
    assert message.endswith("install it with: pip install tensorflow-cpu tensorflow-datasets")
  assert out["modules"] == []
  # Only the TFDS names tried to import TFDS; nothing tried clu.
  attempts = re.findall(r"^=== import (\S+)$", log.read_text(), re.MULTILINE)
  assert attempts and set(attempts) == {"tensorflow_datasets"}, attempts


def test_a_tfds_dataset_without_tfds_is_one_error_line(blocked, tmp_path):
  env, log = blocked
  proc = _cli.main(["--config.dataset=cifar10", *TINY], tmp_path / "w", env, timeout=300)
  line = _cli.one_error_line(proc)
  assert line.startswith("kdjax: error: --config.dataset: dataset 'cifar10' is read through "
                         "TensorFlow Datasets"), line
  assert line.endswith("pip install tensorflow-cpu tensorflow-datasets")
  assert not (tmp_path / "w").exists()


def _tensorboard_scalars(stage_dir) -> dict[str, dict[int, float]]:
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(str(stage_dir))
  acc.Reload()
  return {tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
          for tag in acc.Tags()["tensors"]}


def test_a_study_runs_end_to_end_without_tensorflow_tfds_or_clu(blocked, tmp_path):
  env, log = blocked
  workdir = tmp_path / "study"
  proc = _cli.main(TINY, workdir, env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  # No module so much as tried to import TensorFlow, TFDS or clu.
  assert log.read_text() == "", log.read_text()[-3000:]

  metrics = json.loads((workdir / "analysis" / "metrics.json").read_text())
  assert (workdir / "analysis" / "report.md").exists()
  final = math.ceil(1198 / 64)  # one epoch of the 1198 digits train examples, batch 64
  teacher_accuracy = metrics["teachers"][0]["metrics"]["accuracy"]
  expected = {("teacher", f"replica_000_teacher_s{metrics['teachers'][0]['seed']}"):
              teacher_accuracy}
  assert sorted(r["arm"] for r in metrics["replicas"]) == ["kd", "rcd", "siddo"]
  for r in metrics["replicas"]:
    expected[("students", f"replica_{r['index']:03d}_{r['arm']}_s{r['seed']}")] = \
        r["metrics"]["accuracy"]

  for stage in ("teacher", "students"):
    assert len(list((workdir / stage).glob("events.out.tfevents.*"))) == 1
    scalars = _tensorboard_scalars(workdir / stage)
    tags = [tag for s, tag in expected if s == stage]
    for tag in tags:
      assert {f"{tag}/eval_accuracy", f"{tag}/eval_loss", f"{tag}/train_loss"} <= set(scalars)
      # The final eval accuracy logged in training is the analysis stage's accuracy of the
      # final checkpoint (computed apart, from the restored parameters).
      assert max(scalars[f"{tag}/eval_accuracy"]) == final
      assert scalars[f"{tag}/eval_accuracy"][final] == pytest.approx(expected[(stage, tag)],
                                                                     rel=1e-6)
      assert all(np.isfinite(v) and v > 0 for v in scalars[f"{tag}/train_loss"].values())
    # The console line of the per-arm eval accuracy (absl INFO, as clu's LoggingWriter wrote it).
    logged = re.findall(rf"\] \[{final}\] ({stage}/eval_accuracy/\S+=[0-9.]+(?:, \S+=[0-9.]+)*)$",
                        proc.stderr, re.MULTILINE)
    assert len(logged) == 1, proc.stderr[-3000:]
    values = dict(item.rsplit("=", 1) for item in logged[0].split(", "))
    arms = sorted(tag.split("_", 2)[2].rsplit("_s", 1)[0] for tag in tags)
    assert list(values) == [f"{stage}/eval_accuracy/{arm}" for arm in arms]
    for arm, text in values.items():
      tb = scalars[f"arm_{arm.rsplit('/', 1)[1]}/eval_accuracy"][final]
      assert float(text) == pytest.approx(tb, abs=1e-6), (arm, text, tb)  # printed with .6g
