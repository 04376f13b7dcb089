"""Dataset names -> in-memory numpy arrays; never downloads.

Which names need TensorFlow: `digits`, `mnist1d` and `synthetic[:...]` load straight from
kdjax.data.digits / kdjax.data.mnist1d / kdjax.data.synthetic and `npz:` with numpy, none of them importing TensorFlow. TFDS catalogue
names, `tiny_imagenet` and `image_folder:` read through TensorFlow Datasets, imported on their
first use; where tensorflow or tensorflow_datasets is not installed they raise
DatasetNotAvailableError saying what to install (`TFDS_INSTALL`).

Data directory: the `data_dir` argument, else $TFDS_DATA_DIR (read at call time), else
~/tensorflow_datasets.

Per-dataset conversions (all documented choices):
  images (cifar10, cifar100, svhn_cropped, mnist, fashion_mnist, tiny_imagenet, digits):
    `image` uint8 [N, H, W, C] as stored; cifar100 also keeps `coarse_label` (20 superclasses).
  speech_commands: int16 waveforms -> `audio` float32 = int16 / 32768 in [-1, 1), zero-padded at
    the end or cut to the first 16000 samples (1 s at 16 kHz), shape [N, 16000, 1]; 12 classes.
  mnist1d: `vector` float32 [N, 40] as the mnist1d package's generator makes it (default
    arguments, seed 42; see kdjax.data.mnist1d), used as loaded; 10 classes.
  tiny_shakespeare[:length=L] (default L = 128): character-level language modelling. Token ids
    over the fixed vocabulary SHAKESPEARE_CHARS, the 65 characters of the tiny-shakespeare file
    (whose contiguous slices are the TFDS train/validation/test splits), sorted: id = 1 + position
    in SHAKESPEARE_CHARS, id 0 = any other byte (absent from the real data); vocab_size 66. The
    split's text is cut into non-overlapping windows: `text` = ids[i*L : (i+1)*L], `label` =
    ids[i*L+1 : (i+1)*L+1] (the next character), i < (len - 1) // L; a final partial window is
    dropped.
  imdb_reviews[:length=L] (default 512), ag_news_subset[:length=L] (default 256): byte-level tokens,
    `text` int32 [N, L] = the UTF-8 bytes (1..255) of the text, truncated to L and zero-padded
    (id 0 = padding; NUL never occurs in text), vocab_size 256. ag_news_subset's text is
    title + " " + description.
  tiny_imagenet: prepared from a `tiny-imagenet-200/` directory (the standard zip from
    http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzipped) found in DATA_DIR/ or
    DATA_DIR/downloads/manual/: train = train/<wnid>/images/*.JPEG, test = val/images/*.JPEG
    labelled by val/val_annotations.txt; label = position of the wnid in sorted(wnids.txt);
    images converted to RGB (a few originals are greyscale).
  npz:PATH: arrays x_train, y_train, x_test, y_test; uint8 x of rank 3 or 4 -> `image` (rank 3
    gains a channel axis), float x of rank 2 -> `vector`.
  image_folder:PATH: PATH/<split>/<class>/<image>, read by tfds.folder_dataset.ImageFolder
    (classes sorted by name, images decoded to RGB, all of one size), examples sorted by file name.
For npz and image_folder, `spec` computes num_classes = max train label + 1, per-channel mean/std
from the train split, flip = True and crop_padding = max(1, H // 8).
"""

from __future__ import annotations

import functools
import os
import zipfile
import zlib

from etils import epath
import numpy as np

from kdjax import _checks
from kdjax.data import DatasetNotAvailableError, DatasetSpec, digits, mnist1d, synthetic

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
AUDIO_SAMPLES = 16000
TEXT_LENGTH = {"tiny_shakespeare": 128, "imdb_reviews": 512, "ag_news_subset": 256}
TINY_IMAGENET_DIR = "tiny-imagenet-200"
TFDS_INSTALL = "pip install tensorflow-cpu tensorflow-datasets"

_SPECS = {
    # CIFAR/SVHN/MNIST statistics: per-channel mean and population std of the train split after
    # uint8 / 255, as commonly tabulated (e.g. CIFAR-10 std 0.2470, not the widespread 0.2023).
    "cifar10": DatasetSpec("cifar10", 10, "image", "image", (32, 32, 3),
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True, 4),
    "cifar100": DatasetSpec("cifar100", 100, "image", "image", (32, 32, 3),
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True, 4),
    # Flipping a digit changes its meaning (2 vs 5), so SVHN/MNIST get no flip.
    "svhn_cropped": DatasetSpec("svhn_cropped", 10, "image", "image", (32, 32, 3),
                                (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False, 4,
                                splits=("train", "test", "extra")),
    "mnist": DatasetSpec("mnist", 10, "image", "image", (28, 28, 1), (0.1307,), (0.3081,),
                         False, 2),
    "fashion_mnist": DatasetSpec("fashion_mnist", 10, "image", "image", (28, 28, 1), (0.2860,),
                                 (0.3530,), True, 2),
    # TinyImageNet: the per-channel train statistics commonly used with it (not recomputed here).
    "tiny_imagenet": DatasetSpec("tiny_imagenet", 200, "image", "image", (64, 64, 3),
                                 (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), True, 8),
    "digits": DatasetSpec("digits", digits.NUM_CLASSES, "image", "image", digits.IMAGE_SHAPE,
                          digits.MEAN, digits.STD, False, 1),
    "mnist1d": DatasetSpec("mnist1d", mnist1d.NUM_CLASSES, "vector", "vector", (mnist1d.LENGTH,)),
    "speech_commands": DatasetSpec("speech_commands", 12, "audio", "audio", (AUDIO_SAMPLES, 1),
                                   splits=("train", "validation", "test")),
}
_TEXT_CLASSES = {"imdb_reviews": 2, "ag_news_subset": 4}
_TEXT_SPLITS = {"tiny_shakespeare": ("train", "validation", "test"),
                "imdb_reviews": ("train", "test", "unsupervised"),
                "ag_news_subset": ("train", "test")}
_TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped", "mnist", "fashion_mnist", "speech_commands",
               "tiny_shakespeare", "imdb_reviews", "ag_news_subset")


def available() -> list[str]:
  """The names `load` understands; PATH and OPTIONS are placeholders."""
  names = sorted(set(_SPECS) | set(_TFDS_NAMES))
  return [f"{n}[:length=L]" if n in TEXT_LENGTH else n for n in names] + [
      "synthetic[:OPTIONS]", "npz:PATH", "image_folder:PATH"]


def resolve_data_dir(data_dir: str | None = None) -> str:
  """data_dir, else $TFDS_DATA_DIR (read now, not at import), else ~/tensorflow_datasets."""
  return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                            or "~/tensorflow_datasets")


def _split_name(name: str) -> tuple[str, str]:
  if not isinstance(name, str) or not name:
    raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
  base, _, arg = name.partition(":")
  _checks.check_choice("dataset", base, sorted(set(_SPECS) | set(_TFDS_NAMES) |
                                               {"synthetic", "npz", "image_folder"}))
  if base in ("npz", "image_folder") and not arg:
    raise ValueError(f"dataset {name!r} needs a path: {base}:PATH")
  if arg and base not in ("npz", "image_folder", "synthetic", *TEXT_LENGTH):
    raise ValueError(f"dataset {base!r} takes no options, got {name!r}")
  return base, arg


def _text_length(base: str, arg: str) -> int:
  if not arg:
    return TEXT_LENGTH[base]
  key, _, value = arg.partition("=")
  if key.strip() != "length" or not value.strip().isdigit() or int(value) < 1:
    raise ValueError(f"{base} option must be length=L with an integer L >= 1, got {arg!r}")
  return int(value)


def spec(name: str, *, data_dir: str | None = None) -> DatasetSpec:
  """The DatasetSpec of `name` (see kdjax.data.DatasetSpec)."""
  base, arg = _split_name(name)
  if base in _SPECS:
    return _SPECS[base]
  if base == "synthetic":
    p = synthetic.parse(arg)
    return DatasetSpec(name, p.classes, "vector", "vector", (p.dim,))
  if base == "tiny_shakespeare":
    vocab = len(SHAKESPEARE_CHARS) + 1
    return DatasetSpec(name, vocab, "text", "text", (_text_length(base, arg),), vocab_size=vocab,
                       sequence_labels=True, splits=_TEXT_SPLITS[base])
  if base in _TEXT_CLASSES:
    return DatasetSpec(name, _TEXT_CLASSES[base], "text", "text", (_text_length(base, arg),),
                       vocab_size=256, splits=_TEXT_SPLITS[base])
  return _computed_spec(name, load(name, "train", data_dir=data_dir))


def _computed_spec(name: str, train: dict[str, np.ndarray]) -> DatasetSpec:
  if not len(train["label"]):
    raise ValueError(f"dataset {name}: the train split has no examples")
  num_classes = int(train["label"].max()) + 1
  if "vector" in train:
    return DatasetSpec(name, num_classes, "vector", "vector", train["vector"].shape[1:])
  x = train["image"]
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes, dtype=np.float64) / 255.0
  std = x.std(axes, dtype=np.float64) / 255.0
  return DatasetSpec(name, num_classes, "image", "image", x.shape[1:],
                     tuple(float(v) for v in mean), tuple(float(v) for v in std),
                     True, max(1, x.shape[1] // 8))


def load(name: str, split: str, *, data_dir: str | None = None) -> dict[str, np.ndarray]:
  """See kdjax.data.load."""
  base, arg = _split_name(name)
  if not isinstance(split, str) or not split:
    raise ValueError(f"split must be a non-empty string such as 'train' or 'test', got {split!r}")
  if base == "npz":
    out = _load_npz(arg, split)
  elif base == "digits":
    _checks.check_choice("split", split, ("train", "test"))
    out = digits.arrays(split)
  elif base == "mnist1d":
    _checks.check_choice("split", split, ("train", "test"))
    out = mnist1d.arrays(split)
  elif base == "synthetic":
    params = synthetic.parse(arg)
    out = synthetic.generate(params, split)
  elif base == "image_folder":
    out = _load_image_folder(name, arg, split)
  else:
    data_dir = resolve_data_dir(data_dir)
    if base == "tiny_imagenet":
      out = _load_tiny_imagenet(data_dir, split)
    else:
      out = _load_tfds(base, arg, split, data_dir)
  return {k: v.astype(np.int32) if "label" in k or k in ("text", "superclass") else v
          for k, v in out.items()}


def tfds_module(name: str):
  """tensorflow_datasets, imported now (seconds: it loads TensorFlow), with TensorFlow kept off
  the accelerators; DatasetNotAvailableError naming `name` and what to install if either is
  missing."""
  # TensorFlow's C++ start-up lines (oneDNN notice, CPU features) would break kdjax's one-line
  # errors on stderr; oneDNN's reordered float sums do not matter to data loading. A user's
  # own settings win.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    _hide_gpus_from_tensorflow()
  except ImportError as e:
    raise DatasetNotAvailableError(
        f"dataset {name!r} is read through TensorFlow Datasets, which is not installed here "
        f"({e}); install it with: {TFDS_INSTALL}") from None
  return tfds


@functools.cache
def _hide_gpus_from_tensorflow() -> None:
  """TF must not grab accelerator memory that JAX needs; data loading is CPU work."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF initialised its devices before kdjax ran; too late to change.
    pass


def _not_available(name: str, data_dir: str) -> DatasetNotAvailableError:
  return DatasetNotAvailableError(
      f"dataset {name!r} is not prepared in {data_dir} and kdjax never downloads; prepare it "
      f"where there is network with: tfds build {name} --data_dir={data_dir}")


def _as_numpy(dataset, keys=None) -> dict[str, np.ndarray]:
  """A tf.data pipeline of examples as one dict of numpy arrays (optionally only `keys`).

  Batches of 4096 are concatenated instead of TFDS's `batch_size=-1`, which batches by
  `info.splits.total_num_examples or sys.maxsize` and so aborts TF 2.21 under
  `tfds.testing.mock_data` (no split metadata).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (tfds_module ran)
  if keys is not None:
    dataset = dataset.map(lambda ex: {k: ex[k] for k in keys if k in ex})
  parts = list(tfds.as_numpy(dataset.batch(4096)))
  if not parts:
    raise ValueError("the split is empty")
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _load_tfds(base: str, arg: str, split: str, data_dir: str) -> dict[str, np.ndarray]:
  """Loads a catalogue TFDS dataset that must already be prepared in data_dir."""
  tfds = tfds_module(base)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(base, data_dir=data_dir)
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError:  # TFDS's way of saying "not prepared".
    if builder.is_prepared():
      raise
    raise _not_available(base, data_dir) from None
  try:
    return _tfds_arrays(base, arg, ds, tfds, tf)
  except Exception as e:  # pylint: disable=broad-except  (TF's errors: damaged record files)
    raise ValueError(f"dataset {base!r} in {data_dir} cannot be read ({_cause(e)}); prepare it "
                     f"again with: tfds build {base} --data_dir={data_dir}") from None


def _cause(error: BaseException) -> str:
  """An error's first line (TensorFlow's messages run on with a stack of ops)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  first = lines[0] if lines else ""
  return f"{type(error).__name__}: {first[:200]}{'...' if len(first) > 200 else ''}"


def _tfds_arrays(base: str, arg: str, ds, tfds, tf) -> dict[str, np.ndarray]:
  if base not in ("speech_commands", *TEXT_LENGTH):
    return _as_numpy(ds, keys=("image", "label", "coarse_label"))
  if base == "tiny_shakespeare":
    text = b"".join(ex["text"] for ex in tfds.as_numpy(ds))
    return shakespeare_windows(text, _text_length(base, arg))

  if base == "speech_commands":
    def convert(ex):
      audio = tf.cast(ex["audio"][:AUDIO_SAMPLES], tf.float32) / 32768.0
      audio = tf.pad(audio, [[0, AUDIO_SAMPLES - tf.shape(audio)[0]]])
      return {"audio": audio[:, None], "label": ex["label"]}
  else:
    length = _text_length(base, arg)

    def convert(ex):
      text = ex["text"] if base == "imdb_reviews" else \
          tf.strings.join([ex["title"], ex["description"]], separator=" ")
      tokens = tf.io.decode_raw(tf.strings.substr(text, 0, length), tf.uint8)
      tokens = tf.pad(tf.cast(tokens, tf.int32), [[0, length - tf.shape(tokens)[0]]])
      return {"text": tokens, "label": ex["label"]}
  return _as_numpy(ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE))


def shakespeare_windows(text: bytes, length: int) -> dict[str, np.ndarray]:
  """Character ids in non-overlapping next-character windows (see the module docstring)."""
  table = np.zeros(256, np.int32)
  table[np.frombuffer(SHAKESPEARE_CHARS.encode(), np.uint8)] = np.arange(
      1, len(SHAKESPEARE_CHARS) + 1)
  ids = table[np.frombuffer(text, np.uint8)]
  n = max(len(ids) - 1, 0) // length
  return {"text": ids[:n * length].reshape(n, length),
          "label": ids[1:n * length + 1].reshape(n, length)}


NPZ_USAGE = "write it with np.savez(PATH, x_train=..., y_train=..., x_test=..., y_test=...)"


def _load_npz(path: str, split: str) -> dict[str, np.ndarray]:
  """One split of an npz archive. Whatever is wrong with the file (missing, not an npz archive,
  truncated, object arrays, missing or mismatched arrays) raises a ValueError naming the file
  and what it must hold (DatasetNotAvailableError when it is not there)."""
  _checks.check_choice("split", split, ("train", "test"))
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise DatasetNotAvailableError(f"npz file {path} not found; {NPZ_USAGE}")
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
    # np.load reads anything that is not a zip archive as a pickle or a bare .npy array.
    if magic != b"PK\x03\x04":
      raise ValueError("not a zip archive")
    with np.load(path, allow_pickle=False) as f:
      missing = {f"x_{split}", f"y_{split}"} - set(f.files)
      if missing:
        raise ValueError(f"it lacks {', '.join(sorted(missing))}; it needs x_train, y_train, "
                         "x_test, y_test")
      x, y = f[f"x_{split}"], f[f"y_{split}"]
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
    cause = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, (zipfile.BadZipFile, zlib.error, EOFError)):
      cause = f"damaged archive: {cause}"
    raise ValueError(f"npz file {path} cannot be read as an npz archive ({cause}); "
                     f"{NPZ_USAGE}") from None
  if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"npz file {path}: y_{split} must be integer labels of shape [{len(x)}] "
                     f"(one per example of x_{split}), got {y.dtype} {y.shape}")
  if x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
    return {"vector": x.astype(np.float32), "label": y}
  if x.ndim in (3, 4) and x.dtype == np.uint8:
    return {"image": x[..., None] if x.ndim == 3 else x, "label": y}
  raise ValueError(f"npz file {path}: x_{split} must be uint8 images [N, H, W(, C)] or float "
                   f"vectors [N, D], got {x.dtype} {x.shape}")


def _load_image_folder(name: str, path: str, split: str) -> dict[str, np.ndarray]:
  root = os.path.expanduser(path)
  if not os.path.isdir(os.path.join(root, split)):
    raise DatasetNotAvailableError(f"image folder {os.path.join(root, split)} not found; "
                                   f"expected {root}/<split>/<class>/<image files>")
  tfds = tfds_module(name)
  try:
    builder = tfds.folder_dataset.ImageFolder(root)
    out = _as_numpy(builder.as_dataset(split=split, shuffle_files=False))
  except Exception as e:  # pylint: disable=broad-except  (TF's errors: undecodable, mixed sizes)
    raise ValueError(f"image folder {os.path.join(root, split)} cannot be read ({_cause(e)}); "
                     f"it must hold {root}/<split>/<class>/<image files>, decodable images of "
                     "one size") from None
  order = np.argsort(out["image/filename"])  # ImageFolder shuffles; file order is reproducible.
  return {"image": out["image"][order], "label": out["label"][order]}


def tiny_imagenet_root(data_dir: str) -> epath.Path | None:
  """The first existing DATA_DIR/tiny-imagenet-200, DATA_DIR/downloads/manual/tiny-imagenet-200."""
  for parent in (epath.Path(data_dir), epath.Path(data_dir) / "downloads" / "manual"):
    if (parent / TINY_IMAGENET_DIR).is_dir():
      return parent / TINY_IMAGENET_DIR
  return None


def _load_tiny_imagenet(data_dir: str, split: str) -> dict[str, np.ndarray]:
  tfds = tfds_module("tiny_imagenet")
  from kdjax.data import builders  # pylint: disable=g-import-not-at-top  (registers, needs tfds)
  builder = builders.TinyImagenet(data_dir=data_dir)
  if not builder.is_prepared():
    root = tiny_imagenet_root(data_dir)
    if root is None:
      manual = os.path.join(data_dir, "downloads", "manual")
      raise DatasetNotAvailableError(
          f"dataset 'tiny_imagenet' is not prepared in {data_dir} and {TINY_IMAGENET_DIR}/ is "
          f"not in {data_dir} or {manual}; unzip http://cs231n.stanford.edu/tiny-imagenet-200.zip "
          f"into {manual}")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(root.parent), try_download_gcs=False))
  return _as_numpy(builder.as_dataset(split=split, shuffle_files=False))
