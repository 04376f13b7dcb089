"""The bad-input table: every predictable mistake gets one line naming what is wrong and what is
allowed, and nothing is written (issue 19).

The cases run in this process against the validation layer the command runs before it writes
anything (`kdjax.main.validate`: the workdir's path, every config key, the data, what the workdir
holds; `kdjax.configfile.load_flag` for --config files; `kdjax.workdir.lock` for a busy workdir),
and assert a ValueError/RuntimeError whose message is one line naming the key (or file, or
workdir), and that the workdir was not created or changed. kdjax.main turns exactly these errors
into `kdjax: error: MESSAGE` and exit code 2; a representative few go through the command in
subprocesses (`test_representative_cases_through_the_command`), the rest of the command-line
cases are in test_cli.py and test_reliability.py.

The config-key cases are generated from the default config's schema: for every leaf key, values
of the wrong type, out of range, empty, NaN/inf where numbers are taken, and malformed lists and
grids (an empty entry, a trailing comma, a repeated entry, a non-number) where the key takes a
comma-separated list. A generated value that is valid for its key is listed in ACCEPTED with the
reason; every other one must be refused naming that key.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import math
import os
import pathlib
import socket
import zipfile

import _cli
import ml_collections
import numpy as np
import pytest

from kdjax import configfile
from kdjax import main as main_lib
from kdjax import replicas as replicas_lib
from kdjax import study as study_lib
from kdjax import workdir as workdir_lib
from kdjax.data import digits

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.py")
# The small study every case starts from (a 2-step MLP study: nothing here trains).
BASE = {"model": "mlp", "model_kwargs.width": 0.05, "num_seeds": 1, "num_epochs": 1,
        "teacher_num_epochs": 1, "execution": "vmap"}


def _set(config, key: str, value) -> None:
  *path, leaf = key.split(".")
  node = config
  for part in path:
    node = node[part]
  with node.ignore_type():  # a wrong type as a config.json or a Python caller could give it
    node[leaf] = value


def _config(**overrides) -> ml_collections.ConfigDict:
  config = study_lib.load_config(DEFAULT)
  for key, value in {**BASE, **overrides}.items():
    _set(config, key.replace("__", "."), value)
  return config


def _leaves(node, prefix=""):
  for key in sorted(node.keys()):
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _is_grid(value) -> bool:
  try:
    replicas_lib.parse_grid("x", value)
    return isinstance(value, str)
  except ValueError:
    return False


def _generated() -> dict[str, tuple[str, object]]:
  """{case name: (key, bad value)} from the default config's keys and their default values."""
  cases = {}
  for key, default in _leaves(_config()):
    if isinstance(default, bool):
      values = {"wrong_type": "yes", "int": 1}
    elif isinstance(default, int):
      values = {"wrong_type": "abc", "fraction": 2.5, "negative": -5, "none": None}
    elif isinstance(default, float):
      values = {"wrong_type": "abc", "nan": math.nan, "inf": math.inf, "negative": -5.0}
    elif isinstance(default, tuple):
      values = {"wrong_type": ("a",), "nan": (math.nan,), "above_1": (1.5,)}
    elif isinstance(default, str) and _is_grid(default):
      values = {"empty": "", "wrong_type": ["a"], "empty_entry": "0.1,,0.5",
                "trailing_comma": "0.5,", "repeated": "0.5,0.5", "not_a_number": "0.5,abc",
                "nan": "nan", "inf": "0.5,inf", "negative": "-5"}
    elif isinstance(default, str):
      values = {"empty": "", "wrong_type": 5, "unknown": "bogus"}
      if "," in default or key in ("arms", "stages", "model"):
        values.update(empty_entry=f"{default.split(',')[0]},,{default.split(',')[-1]}",
                      repeated=f"{default.split(',')[0]},{default.split(',')[0]}")
    else:
      continue
    for name, value in values.items():
      cases[f"{key}:{name}"] = (key, value)
  return cases


GENERATED = _generated()
# Generated values that are valid for their key (why), or that only the arms using the key
# read (and so are checked only when such an arm is in the study).
ACCEPTED = {
    "data_dir:empty": "the default: $TFDS_DATA_DIR, else ~/tensorflow_datasets",
    "data_dir:unknown": "a directory name; only TFDS datasets read it, digits does not",
    "teacher_model:empty": "the default: the students' model",
    "teacher_augment:empty": "the default: the teachers use `augment`",
    "ensembles:empty": "the default: every teacher is a member",
    "analyses:empty": "the default: no study-specific section",
    "teacher_classes:empty": "the default: the teachers see every class",
    "arm_options.hint_feature:unknown": "read by feature_hint only (checked when it is an arm)",
    "arm_options.at_features:unknown": "read by attention_transfer only (checked when it is an "
                                        "arm)",
    "arm_options.rcd_minval:negative": "the noise teachers' logits may start below 0",
    "arm_options.ctkd_init:negative": "CTKD's raw temperature parameter theta is any real",
    "analysis_options.equivalence_margins:empty": "the default margins",
}

def _validate(config, workdir: pathlib.Path):
  return main_lib.validate(config, str(workdir), num_devices=1)


def _assert_one_line(error: BaseException, *words: str) -> str:
  message = str(error)
  assert "\n" not in message and message.strip() == message and message, repr(message)
  for w in words:
    assert w in message, f"{w!r} not in {message!r}"
  assert "Traceback" not in message
  return message


def _refused(config, workdir: pathlib.Path, *words: str) -> str:
  """Validation refuses `config` with a one-line ValueError/RuntimeError containing `words`,
  and writes nothing into (or for) `workdir`."""
  before = _cli.digest(workdir) if workdir.is_dir() else None
  existed = os.path.lexists(workdir)
  with pytest.raises((ValueError, RuntimeError)) as info:
    _validate(config, workdir)
  assert os.path.lexists(workdir) == existed, "validation created the workdir"
  if before is not None:
    assert _cli.digest(workdir) == before, "validation changed the workdir"
  return _assert_one_line(info.value, *words)


# ---------------------------------------------------------------- config keys (generated)


@pytest.mark.parametrize("case", sorted(GENERATED))
def test_every_config_key_refuses_bad_values(case, tmp_path):
  key, value = GENERATED[case]
  config = _config()
  _set(config, key, value)
  if case in ACCEPTED:
    _validate(config, tmp_path / "workdir")  # no error
    return
  if key.startswith("model_kwargs."):  # a model's option: the line names model_kwargs and it
    named, words = "model_kwargs", [key.split(".")[1]]
  else:
    named, words = key, []
  message = _refused(config, tmp_path / "workdir", f"--config.{named}", *words)
  assert message.startswith(f"--config.{named}"), message


def test_the_generated_table_covers_every_key():
  keys = {key for key, _ in _leaves(_config())}
  assert keys == {key for key, _ in GENERATED.values()}
  assert len(GENERATED) > 150
  assert set(ACCEPTED) <= set(GENERATED)


# Keys whose values are mappings or arm-specific, written by hand.
HAND_WRITTEN = {
    "model_grid_empty_entry": ({"model_grid.width": "0.05,,0.1"}, "--config.model_grid"),
    "model_grid_repeated": ({"model_grid.width": "0.05,0.05"}, "--config.model_grid"),
    "model_list_empty_entry": ({"model": "mlp,,cnn"}, "--config.model"),
    "hint_feature_unknown": ({"arms": "kd,feature_hint", "model": "cnn",
                              "arm_options.hint_feature": "bogus"},
                             "--config.arm_options.hint_feature"),
    "ce_weight_empty_entry": ({"arm_options.ce_weight": "ats=0.5,,isats=0.5"},
                              "--config.arm_options.ce_weight"),
    "kd_windows_empty_entry": ({"kd_windows": "0-1,,0.5-1"}, "--config.kd_windows"),
    "teacher_augment_empty_entry": ({"teacher_augment": "weak,,strong"},
                                    "--config.teacher_augment"),
    "mesh_unknown_axis": ({"mesh": {"replica": 1, "data": 1, "model": 2}}, "--config.mesh.model"),
}


@pytest.mark.parametrize("case", sorted(HAND_WRITTEN))
def test_hand_written_config_cases(case, tmp_path):
  overrides, key = HAND_WRITTEN[case]
  config = _config()
  for k, v in overrides.items():
    _set(config, k, ml_collections.ConfigDict(v) if isinstance(v, dict) else v)
  _refused(config, tmp_path / "workdir", key)


# ---------------------------------------------------------------- dataset sources


def _digits_arrays():
  train, test = digits.arrays("train"), digits.arrays("test")
  return (train["image"][..., 0], train["label"], test["image"][..., 0], test["label"])


def _npz(path: pathlib.Path, **arrays) -> str:
  x_tr, y_tr, x_te, y_te = _digits_arrays()
  base = dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
  base.update(arrays)
  np.savez(path, **{k: v for k, v in base.items() if v is not None})
  return f"npz:{path}"


def _vectors(n: int, nan_at: int | None = None) -> np.ndarray:
  x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
  if nan_at is not None:
    x[nan_at, 2] = np.nan
  return x


def _dataset_cases(tmp: pathlib.Path) -> dict:
  """{case: (dataset name, words the line must hold)}; files written under `tmp`."""
  x_tr, y_tr, x_te, y_te = _digits_arrays()
  good = tmp / "good.npz"
  _npz(good)
  (tmp / "text.npz").write_text("these are not arrays\n")
  (tmp / "truncated.npz").write_bytes(good.read_bytes()[:300])
  with zipfile.ZipFile(tmp / "not_npy.npz", "w") as z:
    z.writestr("x_train.npy", b"garbage")
  np.savez(tmp / "objects.npz", x_train=np.array([x_tr[0], x_tr[1, :3]], dtype=object),
           y_train=y_tr[:2], x_test=x_te, y_test=y_te)
  (tmp / "a_directory.npz").mkdir()
  y_float = y_tr.astype(np.float32)
  y_neg = y_tr.copy()
  y_neg[5] = -1
  y_beyond = y_te.copy()
  y_beyond[3] = 10
  return {
      "npz_missing": (f"npz:{tmp / 'missing.npz'}", ["not found", "np.savez"]),
      "npz_directory": (f"npz:{tmp / 'a_directory.npz'}", ["not found"]),
      "npz_no_path": ("npz:", ["needs a path", "npz:PATH"]),
      "npz_not_an_archive": (f"npz:{tmp / 'text.npz'}", ["not a zip archive", "np.savez"]),
      "npz_truncated": (f"npz:{tmp / 'truncated.npz'}", ["damaged archive", "np.savez"]),
      "npz_member_not_npy": (f"npz:{tmp / 'not_npy.npz'}", ["cannot be read", "np.savez"]),
      "npz_object_arrays": (f"npz:{tmp / 'objects.npz'}", ["cannot be read", "np.savez"]),
      "npz_missing_split": (_npz(tmp / "no_test.npz", x_test=None, y_test=None),
                            ["lacks x_test, y_test", "x_train, y_train, x_test, y_test"]),
      "npz_mismatched_lengths": (_npz(tmp / "short_y.npz", y_train=y_tr[:-3]),
                                 ["y_train", f"[{len(y_tr)}]"]),
      "npz_float_labels": (_npz(tmp / "float_y.npz", y_train=y_float), ["integer labels"]),
      "npz_negative_label": (_npz(tmp / "neg.npz", y_train=y_neg),
                             ["label -1", "[0, 9]", "largest train label + 1"]),
      "npz_eval_label_beyond_classes": (_npz(tmp / "beyond.npz", y_test=y_beyond),
                                        ["test split", "label 10", "[0, 9]"]),
      "npz_single_class": (_npz(tmp / "one.npz", y_train=np.zeros_like(y_tr),
                                y_test=np.zeros_like(y_te)), ["1 class", "at least 2"]),
      "npz_image_shapes_differ": (_npz(tmp / "shapes.npz", x_test=x_te[:, :6, :6]),
                                  ["test split", "(6, 6, 1)", "(8, 8, 1)"]),
      "npz_wrong_rank": (_npz(tmp / "rank.npz", x_train=x_tr.reshape(len(x_tr), -1)),
                         ["uint8 images", "float vectors"]),
      "npz_empty_train": (_npz(tmp / "empty.npz", x_train=x_tr[:0], y_train=y_tr[:0]),
                          ["train split has no examples"]),
      "npz_nan_inputs": (_npz(tmp / "nan.npz", x_train=_vectors(40, nan_at=7),
                              y_train=np.arange(40) % 3, x_test=_vectors(9), y_test=np.arange(9) % 3),
                         ["NaN/inf", "example 7", "finite"]),
      "unknown_name": ("imagenet_xxl", ["imagenet_xxl", "digits", "npz"]),
      "empty_name": ("", ["non-empty"]),
      "builtin_with_option": ("digits:foo", ["takes no options"]),
      "synthetic_unknown_option": ("synthetic:colour=3", ["KEY=VALUE", "classes"]),
      "synthetic_bad_number": ("synthetic:classes=abc", ["classes", "integer"]),
      "synthetic_out_of_range": ("synthetic:label_noise=1.5", ["label_noise", "[0, 1]"]),
      "synthetic_nan": ("synthetic:separation=nan", ["separation", "finite"]),
      "text_bad_length": ("tiny_shakespeare:length=0", ["length=L", ">= 1"]),
      "image_folder_missing": (f"image_folder:{tmp / 'no_folder'}", ["not found",
                                                                      "<split>/<class>"]),
      "image_folder_missing_split": (_image_folder(tmp / "train_only", splits=("train",)),
                                     ["test not found"]),
  }


def _image_folder(root: pathlib.Path, splits=("train", "test"), sizes=((6, 5),),
                  corrupt: bool = False) -> str:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  for split in splits:
    for c, cls in enumerate(("ant", "bee")):
      for i in range(3):
        path = root / split / cls / f"{cls}{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = sizes[(c + i) % len(sizes)]
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
  if corrupt:
    (root / "train" / "ant" / "ant0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
  return f"image_folder:{root}"


@pytest.fixture(scope="module")
def dataset_cases(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("datasets")
  return tmp, _dataset_cases(tmp)


DATASET_CASES = [
    "npz_missing", "npz_directory", "npz_no_path", "npz_not_an_archive", "npz_truncated",
    "npz_member_not_npy", "npz_object_arrays", "npz_missing_split", "npz_mismatched_lengths",
    "npz_float_labels", "npz_negative_label", "npz_eval_label_beyond_classes",
    "npz_single_class", "npz_image_shapes_differ", "npz_wrong_rank", "npz_empty_train",
    "npz_nan_inputs", "unknown_name", "empty_name", "builtin_with_option",
    "synthetic_unknown_option", "synthetic_bad_number", "synthetic_out_of_range",
    "synthetic_nan", "text_bad_length", "image_folder_missing", "image_folder_missing_split"]


@pytest.mark.parametrize("case", DATASET_CASES)
def test_bad_datasets(case, dataset_cases, tmp_path):
  _, cases = dataset_cases
  name, words = cases[case]
  config = _config(dataset=name, batch_size=2)
  _refused(config, tmp_path / "workdir", "--config.dataset", *words)


def test_the_dataset_table_is_complete(dataset_cases):
  assert sorted(dataset_cases[1]) == sorted(DATASET_CASES)


try:
  import tensorflow_datasets  # noqa: F401  pylint: disable=unused-import
  HAVE_TFDS = True
except ImportError:
  HAVE_TFDS = False


@pytest.mark.skipif(not HAVE_TFDS, reason="tensorflow_datasets is not installed")
@pytest.mark.parametrize("case", ["corrupt_image", "image_sizes_differ", "tfds_not_prepared"])
def test_bad_datasets_read_through_tfds(case, tmp_path):
  if case == "tfds_not_prepared":
    config = _config(dataset="mnist", data_dir=str(tmp_path / "no_data"))
    words = ["mnist", "not prepared", "tfds build"]
  else:
    name = _image_folder(tmp_path / "images", corrupt=case == "corrupt_image",
                         sizes=((6, 5), (7, 5)) if case == "image_sizes_differ" else ((6, 5),))
    config = _config(dataset=name, batch_size=2)
    words = ["cannot be read", "decodable images of one size"]
  _refused(config, tmp_path / "workdir", "--config.dataset", *words)


# ---------------------------------------------------------------- hostile but valid data


def test_a_class_without_training_examples_is_kept(tmp_path):
  """Class 3 only in the test split: num_classes is still 10 (the largest train label + 1),
  the class is never predicted from data and counts like any other in the metrics (its test
  examples are errors of every model). The fault tests of test_reliability train on it."""
  x_tr, y_tr, _, _ = _digits_arrays()
  keep = y_tr != 3
  name = _npz(tmp_path / "no3.npz", x_train=x_tr[keep], y_train=y_tr[keep])
  study, replace = _validate(_config(dataset=name), tmp_path / "workdir")
  assert study.dataset.num_classes == 10 and not replace
  assert 3 not in study.data["train"]["label"] and 3 in study.data["test"]["label"]


# ---------------------------------------------------------------- the workdir


def _unwritable_dir(tmp_path: pathlib.Path) -> pathlib.Path:
  """A directory this process cannot create files in: a read-only one, or where root ignores
  permissions, sysfs (no regular files can be created there)."""
  if os.geteuid() != 0:
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o555)
    return path
  return pathlib.Path("/sys")


def test_workdir_cases(tmp_path):
  config = _config()
  a_file = tmp_path / "a_file"
  a_file.write_text("not a workdir\n")
  _refused(config, a_file, "--workdir", "is a file, not a directory")
  assert a_file.read_text() == "not a workdir\n"
  _refused(config, a_file / "run", "--workdir", f"{a_file} is not a directory")
  dangling = tmp_path / "dangling"
  dangling.symlink_to(tmp_path / "nowhere")
  _refused(config, dangling, "--workdir", "broken symbolic link")
  unwritable = _unwritable_dir(tmp_path)
  _refused(config, unwritable / "kdjax-run", "--workdir", "cannot create files in",
           str(unwritable))

  other = tmp_path / "other_study"
  other.mkdir()
  (other / "config.json").write_text(_config(num_seeds=4).to_json_best_effort())
  _refused(config, other, "--config.overwrite", "num_seeds", "--config.overwrite=True")
  (other / "config.json").write_text('{"num_seeds": 4, "alph')  # cut off
  _refused(config, other, "--config.overwrite", "cannot be read", "--config.overwrite=True")


def test_a_busy_workdir_is_refused(tmp_path):
  workdir = tmp_path / "busy"
  workdir.mkdir()
  fd = os.open(workdir / workdir_lib.LOCK_NAME, os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"4242 {socket.gethostname()}\n".encode())
    before = _cli.digest(workdir)
    with pytest.raises(workdir_lib.WorkdirBusy) as info:
      workdir_lib.lock(str(workdir))
  finally:
    os.close(fd)
  _assert_one_line(info.value, "--workdir", "in use by another kdjax run", "pid 4242",
                   "another --workdir")
  assert _cli.digest(workdir) == before


# ---------------------------------------------------------------- config files

CONFIG_FILES = {
    "syntax_error": ("def get_config(:\n", ["line 1", "SyntaxError", "get_config(arg=None)"]),
    "import_fails": ("import kdjax_no_such_module\n", ["importing", "ModuleNotFoundError",
                                                      "kdjax_no_such_module"]),
    "raises_at_import": ("raise RuntimeError('boom')\n", ["RuntimeError: boom"]),
    "no_get_config": ("x = 1\n", ["defines no get_config()", "ml_collections.ConfigDict"]),
    "get_config_not_callable": ("get_config = 5\n", ["defines no get_config()"]),
    "returns_none": ("def get_config(arg=None):\n  pass\n", ["returned NoneType",
                                                              "ml_collections.ConfigDict"]),
    "returns_dict": ("def get_config(arg=None):\n  return {'alpha': 0.5}\n",
                     ["returned dict", "ml_collections.ConfigDict"]),
    "get_config_raises": ("def get_config(arg=None):\n  raise ValueError('ARG must be smoke')\n",
                          ["get_config() of", "ValueError: ARG must be smoke"]),
    "takes_no_arg": ("import ml_collections\ndef get_config():\n"
                     "  return ml_collections.ConfigDict()\n", ["get_config('x')", "TypeError"]),
    "missing": (None, ["does not exist", "get_config(arg=None)"]),
    "directory": ("/", ["is a directory"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_bad_config_files(case, tmp_path):
  text, words = CONFIG_FILES[case]
  path = tmp_path / "configs" / f"{case}.py"
  if text == "/":
    path.mkdir(parents=True)
  elif text is not None:
    path.parent.mkdir()
    path.write_text(text)
  with pytest.raises(configfile.ConfigFileError) as info:
    configfile.load_flag(f"{path}:x" if case == "takes_no_arg" else str(path))
  message = _assert_one_line(info.value, "--config:", *words)
  assert str(path) in message


def test_config_file_helpers_parse_arg_and_base_config(tmp_path):
  """kdjax.configfile.parse_arg reads DATASET[,VARIANT]-style ARGs (the default when empty) and
  names the form and the choices when a value is not allowed; base_config loads default.py
  beside a config file."""
  parse = lambda arg: configfile.parse_arg(arg, "configs/x.py", "smoke", dataset=("smoke", "c10"),
                                           variant=("", "wide"))
  assert parse(None) == parse("") == ("smoke", "") and parse("c10,wide") == ("c10", "wide")
  for bad in ("c100", "smoke,deep", "smoke,wide,more", ","):
    with pytest.raises(ValueError) as info:
      parse(bad)
    assert str(info.value) == ("configs/x.py takes DATASET[,VARIANT] with DATASET one of smoke, "
                               f"c10 and VARIANT one of wide; got {bad!r}")
  (tmp_path / "default.py").write_text(
      "import ml_collections\ndef get_config(arg=None):\n"
      "  return ml_collections.ConfigDict({'arg': arg})\n")
  assert configfile.base_config(str(tmp_path / "study.py")).to_dict() == {"arg": None}


# ---------------------------------------------------------------- through the command


def _cli_cases(tmp: pathlib.Path) -> dict:
  """The issue's four mistakes that ended in a traceback or started a study, as typed."""
  (tmp / "bad_config.py").write_text("def get_config(arg=None):\n  return {\n")
  (tmp / "a_file").write_text("x\n")
  good = tmp / "good.npz"
  _npz(good)
  (tmp / "cut.npz").write_bytes(good.read_bytes()[:300])
  tiny = [f"--config.{k.replace('__', '.')}={v}" for k, v in BASE.items()]
  return {
      "grid_empty_entry": ([*tiny, "--config.alpha=0.1,,0.5"], tmp / "w1", _cli.CONFIG,
                           ["--config.alpha", "empty entry", "'0.1,,0.5'"]),
      "npz_not_a_zip": ([*tiny, f"--config.dataset=npz:{tmp / 'cut.npz'}"], tmp / "w2",
                        _cli.CONFIG, ["--config.dataset", "cut.npz", "np.savez"]),
      "config_syntax_error": ([], tmp / "w3", f"--config={tmp / 'bad_config.py'}",
                              ["--config:", "bad_config.py", "SyntaxError", "get_config"]),
      "workdir_is_a_file": (tiny, tmp / "a_file", _cli.CONFIG,
                            ["--workdir", "a_file", "not a directory"]),
  }


def test_representative_cases_through_the_command(tmp_path):
  cases = _cli_cases(tmp_path)
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    procs = {name: pool.submit(_cli.main, args, workdir, _cli.env(), 300, config)
             for name, (args, workdir, config, _) in cases.items()}
    procs = {name: f.result() for name, f in procs.items()}
  for name, (_, workdir, _, words) in cases.items():
    line = _cli.one_error_line(procs[name])
    assert line.startswith("kdjax: error: "), line
    for w in words:
      assert w in line, f"{name}: {w!r} not in {line!r}"
    assert "Traceback" not in procs[name].stderr and not procs[name].stdout.strip()
    if name == "workdir_is_a_file":
      assert workdir.read_text() == "x\n"
    else:
      assert not workdir.exists(), name
