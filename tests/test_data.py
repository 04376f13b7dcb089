"""Tests of kdjax.data against independent numpy references; no network, no downloads.

The built-in datasets (digits, synthetic) and npz: load without TensorFlow; their tests run
where TFDS is not installed. The TFDS builders and TFDS names are tested where it is."""

from __future__ import annotations

import itertools
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import data
from kdjax.data import pipeline, synthetic

try:
  import tensorflow_datasets as tfds
except ImportError:  # the TF-free tests still run
  tfds = None
needs_tfds = pytest.mark.skipif(tfds is None, reason="tensorflow_datasets is not installed")


def _sk_digits():
  from sklearn.datasets import load_digits
  bunch = load_digits()
  return np.asarray(bunch.images), np.asarray(bunch.target)


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to open a connection or resolve a host fails the test loudly."""
  def refuse(*args, **kwargs):
    raise RuntimeError("kdjax touched the network")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ------------------------------------------------------------------------------------ digits


def _digits_reference() -> dict[str, dict[str, np.ndarray]]:
  """Independent reference: the documented split rule and rescaling, redone in numpy."""
  images, labels = _sk_digits()
  rng = np.random.RandomState(0)
  is_test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    is_test[idx[rng.permutation(len(idx))[:int(round(len(idx) / 3))]]] = True
  expected = np.round(images * 255 / 16).astype(np.uint8)[..., None]
  return {"train": {"image": expected[~is_test], "label": labels[~is_test]},
          "test": {"image": expected[is_test], "label": labels[is_test]}}


def test_digits_loads_as_numpy_without_tfds(tmp_path, monkeypatch, no_network):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  train, test = data.load("digits", "train"), data.load("digits", "test")
  assert list(tmp_path.iterdir()) == []  # nothing prepared: the built-in path has no TFDS
  assert set(train) == set(test) == {"image", "label"}
  assert train["image"].shape == (1198, 8, 8, 1) and test["image"].shape == (599, 8, 8, 1)
  assert train["image"].dtype == np.uint8 and train["label"].dtype == np.int32

  ref = _digits_reference()
  for split, got in (("train", train), ("test", test)):
    np.testing.assert_array_equal(got["image"], ref[split]["image"])
    np.testing.assert_array_equal(got["label"], ref[split]["label"])
  # Stratified: each class has round(n_c / 3) test examples.
  np.testing.assert_array_equal(np.bincount(test["label"], minlength=10),
                                np.round(np.bincount(_sk_digits()[1]) / 3).astype(int))

  # The documented normalisation constants are the train split's statistics.
  spec = data.spec("digits")
  x = train["image"] / 255.0
  np.testing.assert_allclose(spec.mean, [x.mean()], atol=1e-4)
  np.testing.assert_allclose(spec.std, [x.std()], atol=1e-4)
  assert not spec.flip and spec.crop_padding == 1
  with pytest.raises(ValueError, match="split must be one of 'train', 'test'"):
    data.load("digits", "validation")


# ----------------------------------------------------------------------------------- mnist1d


def _mnist1d_reference() -> dict[str, dict[str, np.ndarray]]:
  """Independent reference: the mnist1d package's own generator at its default arguments."""
  from mnist1d.data import get_dataset_args, make_dataset
  d = make_dataset(get_dataset_args())
  return {"train": {"vector": d["x"], "label": d["y"]},
          "test": {"vector": d["x_test"], "label": d["y_test"]}}


def test_mnist1d_is_the_packages_generator_offline(tmp_path, monkeypatch, no_network):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  np.random.seed(123)
  before = np.random.get_state()[1].copy()
  train, test = data.load("mnist1d", "train"), data.load("mnist1d", "test")
  np.testing.assert_array_equal(np.random.get_state()[1], before)  # global stream untouched
  assert list(tmp_path.iterdir()) == []  # no TFDS, no download, no pickle written
  assert train["vector"].shape == (4000, 40) and test["vector"].shape == (1000, 40)
  assert train["vector"].dtype == np.float32 and train["label"].dtype == np.int32
  ref = _mnist1d_reference()
  for split, got in (("train", train), ("test", test)):
    np.testing.assert_array_equal(got["vector"], ref[split]["vector"].astype(np.float32))
    np.testing.assert_array_equal(got["label"], ref[split]["label"])
  # The paper's dataset: 10 balanced classes (500 each over 5,000), unit-std signals.
  np.testing.assert_array_equal(np.bincount(np.concatenate([train["label"], test["label"]])),
                                [500] * 10)
  x = np.concatenate([train["vector"], test["vector"]]).astype(np.float64)
  assert abs(x.mean()) < 1e-6 and abs(x.std() - 1) < 1e-6
  spec = data.spec("mnist1d")
  assert (spec.num_classes, spec.modality, spec.input_key, spec.input_shape) == (
      10, "vector", "vector", (40,))
  with pytest.raises(ValueError, match="split must be one of 'train', 'test'"):
    data.load("mnist1d", "validation")


@needs_tfds
def test_mnist1d_tfds_builder_prepares_offline_the_same_arrays(tmp_path, no_network):
  from kdjax.data import builders
  _prepare_offline(builders.Mnist1d(data_dir=str(tmp_path)))
  registered = tfds.builder("mnist1d", data_dir=str(tmp_path))
  assert isinstance(registered, builders.Mnist1d)
  ref = _mnist1d_reference()
  for split in ("train", "test"):
    got = _builder_arrays(registered, split)
    assert set(got) == {"vector", "label"} and got["vector"].dtype == np.float32
    np.testing.assert_array_equal(got["vector"], ref[split]["vector"].astype(np.float32))
    np.testing.assert_array_equal(got["label"], ref[split]["label"])


def _prepare_offline(builder):
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _builder_arrays(builder, split) -> dict[str, np.ndarray]:
  return tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False, batch_size=-1))


@needs_tfds
def test_digits_tfds_builder_prepares_offline_the_same_arrays(tmp_path, monkeypatch, no_network):
  from kdjax.data import builders, digits
  assert digits.Digits is builders.Digits  # the old name still resolves
  _prepare_offline(builders.Digits(data_dir=str(tmp_path)))
  assert (tmp_path / "digits" / "1.0.0" / "dataset_info.json").exists()
  ref = _digits_reference()
  # Registered under its TFDS name once kdjax.data.builders is imported.
  registered = tfds.builder("digits", data_dir=str(tmp_path))
  assert isinstance(registered, builders.Digits)
  for split in ("train", "test"):
    got = _builder_arrays(registered, split)
    assert set(got) == {"image", "label"} and got["image"].dtype == np.uint8
    np.testing.assert_array_equal(got["image"], ref[split]["image"])
    np.testing.assert_array_equal(got["label"], ref[split]["label"])

  # A second builder reuses the prepared files instead of preparing again.
  def fail(*args, **kwargs):
    raise AssertionError("digits was prepared twice")
  monkeypatch.setattr(builders.Digits, "_generate_examples", fail)
  again = builders.Digits(data_dir=str(tmp_path))
  assert again.is_prepared()
  _prepare_offline(again)
  np.testing.assert_array_equal(_builder_arrays(again, "test")["image"], ref["test"]["image"])


# --------------------------------------------------------------------------------- synthetic

PARAMS = synthetic.SyntheticParams(classes=6, superclasses=2, dim=12, n_train=3000, n_test=600,
                                   separation=6.0, class_separation=1.0, decay=1.0,
                                   label_noise=0.2, seed=3)


def test_synthetic_generate_structure_noise_and_spectrum():
  tr, te = synthetic.generate(PARAMS, "train"), synthetic.generate(PARAMS, "test")
  assert tr["vector"].shape == (3000, 12) and tr["vector"].dtype == np.float32
  assert te["vector"].shape == (600, 12)
  np.testing.assert_array_equal(np.bincount(tr["clean_label"]), np.full(6, 500))
  np.testing.assert_array_equal(tr["superclass"], tr["clean_label"] * 2 // 6)

  # Label noise: exactly round(0.2 * n) train labels differ from the clean ones; none on test.
  assert (tr["label"] != tr["clean_label"]).sum() == 600
  np.testing.assert_array_equal(te["label"], te["clean_label"])

  # Superclass structure: empirical class means closer within a superclass than across.
  means = np.stack([tr["vector"][tr["clean_label"] == c].mean(0) for c in range(6)])
  dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
  sup = np.arange(6) * 2 // 6
  same = (sup[:, None] == sup[None]) & ~np.eye(6, dtype=bool)
  assert dist[same].max() < dist[sup[:, None] != sup[None]].min()

  # Within-class covariance spectrum ~ i ** -decay (pooled over classes).
  centred = tr["vector"] - means[tr["clean_label"]]
  eig = np.sort(np.linalg.eigvalsh(np.cov(centred.T)))[::-1]
  np.testing.assert_allclose(eig, 1.0 / np.arange(1, 13), rtol=0.15)

  # Seeded: same parameters, same data; another seed, other data.
  np.testing.assert_array_equal(synthetic.generate(PARAMS, "train")["vector"], tr["vector"])
  other = synthetic.generate(synthetic.SyntheticParams(**{**PARAMS.__dict__, "seed": 4}), "train")
  assert not np.allclose(other["vector"], tr["vector"])


SYNTHETIC_NAME = ("synthetic:classes=6,superclasses=2,dim=12,n_train=3000,n_test=600,"
                  "separation=6,class_separation=1,decay=1,label_noise=0.2,seed=3")


def test_synthetic_name_syntax_load_and_errors(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert synthetic.parse(SYNTHETIC_NAME.split(":", 1)[1]) == PARAMS
  for split, n in (("train", 3000), ("test", 600)):
    loaded = data.load(SYNTHETIC_NAME, split)
    assert set(loaded) == {"vector", "label", "clean_label", "superclass"}
    assert loaded["vector"].dtype == np.float32 and loaded["vector"].shape == (n, 12)
    assert all(loaded[k].dtype == np.int32 for k in ("label", "clean_label", "superclass"))
    ref = synthetic.generate(PARAMS, split)  # checked against the model above
    for k in ref:
      np.testing.assert_array_equal(loaded[k], ref[k])
  assert list(tmp_path.iterdir()) == []  # nothing prepared: the built-in path has no TFDS
  spec = data.spec(SYNTHETIC_NAME)
  assert (spec.num_classes, spec.modality, spec.input_shape) == (6, "vector", (12,))
  with pytest.raises(ValueError, match="KEY one of"):
    synthetic.parse("clases=3")
  with pytest.raises(ValueError, match="superclasses"):
    synthetic.parse("classes=3,superclasses=4")
  with pytest.raises(ValueError, match="label_noise"):
    synthetic.parse("label_noise=1.5")
  with pytest.raises(ValueError, match="dim must be an integer"):
    synthetic.parse("dim=2.5")
  with pytest.raises(ValueError, match="split must be one of 'train', 'test'"):
    data.load(SYNTHETIC_NAME, "validation")


@needs_tfds
def test_synthetic_tfds_builder_prepares_offline_the_same_arrays(tmp_path, monkeypatch,
                                                                  no_network):
  from kdjax.data import builders
  assert synthetic.Synthetic is builders.Synthetic  # the old names still resolve
  assert synthetic.config_for is builders.config_for
  for params in (PARAMS, synthetic.SyntheticParams(n_train=50, n_test=20)):
    builder = builders.Synthetic(data_dir=str(tmp_path), config=builders.config_for(params))
    _prepare_offline(builder)
    assert (tmp_path / "synthetic" / params.config_name / "1.0.0").is_dir()
    for split in ("train", "test"):
      got = _builder_arrays(builder, split)
      want = data.load(f"synthetic:{','.join(f'{k}={v}' for k, v in vars(params).items())}",
                       split)
      assert set(got) == set(want)
      for k in want:  # same values; TFDS keeps int64 labels where kdjax.data gives int32
        np.testing.assert_array_equal(got[k], want[k])
      assert got["vector"].dtype == np.float32
  # The default parameters are the registered config.
  assert builders.config_for(synthetic.SyntheticParams()) == \
      synthetic.SyntheticParams().config_name

  def fail(*args, **kwargs):
    raise AssertionError("synthetic was prepared twice")
  monkeypatch.setattr(builders.Synthetic, "_generate_examples", fail)
  again = builders.Synthetic(data_dir=str(tmp_path), config=builders.config_for(PARAMS))
  assert again.is_prepared()
  _prepare_offline(again)
  np.testing.assert_array_equal(_builder_arrays(again, "test")["label"],
                                data.load(SYNTHETIC_NAME, "test")["label"])


# ------------------------------------------------------------------------ bring your own data


def test_npz_images_and_vectors(tmp_path):
  rng = np.random.default_rng(0)
  x_tr = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
  y_tr = np.array([0, 1, 2, 0, 1, 2, 3])
  np.savez(tmp_path / "img.npz", x_train=x_tr, y_train=y_tr, x_test=x_tr[:2], y_test=y_tr[:2])
  out = data.load(f"npz:{tmp_path / 'img.npz'}", "train")
  np.testing.assert_array_equal(out["image"], x_tr[..., None])
  np.testing.assert_array_equal(out["label"], y_tr)
  assert out["label"].dtype == np.int32
  spec = data.spec(f"npz:{tmp_path / 'img.npz'}")
  assert (spec.num_classes, spec.input_shape, spec.crop_padding) == (4, (5, 6, 1), 1)
  np.testing.assert_allclose(spec.mean, [x_tr.mean() / 255], rtol=1e-6)
  np.testing.assert_allclose(spec.std, [x_tr.std() / 255], rtol=1e-6)

  v = rng.normal(size=(4, 3))
  np.savez(tmp_path / "vec.npz", x_train=v, y_train=np.arange(4), x_test=v, y_test=np.arange(4))
  out = data.load(f"npz:{tmp_path / 'vec.npz'}", "test")
  np.testing.assert_allclose(out["vector"], v.astype(np.float32))
  with pytest.raises(data.DatasetNotAvailableError, match="not found"):
    data.load(f"npz:{tmp_path / 'missing.npz'}", "train")
  np.savez(tmp_path / "bad.npz", x_train=v.astype(np.float32)[:, :, None], y_train=np.arange(4),
           x_test=v, y_test=np.arange(4))
  with pytest.raises(ValueError, match="uint8 images"):
    data.load(f"npz:{tmp_path / 'bad.npz'}", "train")


@needs_tfds
def test_image_folder(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(1)
  written = {}
  for split, cls, i in itertools.product(("train", "test"), ("ant", "bee"), range(3)):
    path = tmp_path / split / cls / f"{cls}{i}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    written[str(path)] = (rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), cls)
    Image.fromarray(written[str(path)][0]).save(path)
  out = data.load(f"image_folder:{tmp_path}", "train")
  files = sorted(p for p in written if "/train/" in p)
  np.testing.assert_array_equal(out["image"], np.stack([written[p][0] for p in files]))
  np.testing.assert_array_equal(out["label"], [["ant", "bee"].index(written[p][1]) for p in files])
  assert data.spec(f"image_folder:{tmp_path}").num_classes == 2


# ----------------------------------------------------------------- TFDS catalogue (mocked data)

IMAGE_CASES = {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
               "svhn_cropped": ((32, 32, 3), 10), "mnist": ((28, 28, 1), 10),
               "fashion_mnist": ((28, 28, 1), 10)}


@needs_tfds
@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_mocked_image_datasets(name, no_network):
  shape, classes = IMAGE_CASES[name]
  with tfds.testing.mock_data(num_examples=6):
    out = data.load(name, "train")
  expected_keys = {"image", "label"} | ({"coarse_label"} if name == "cifar100" else set())
  assert set(out) == expected_keys
  assert out["image"].shape == (6, *shape) and out["image"].dtype == np.uint8
  assert out["label"].dtype == np.int32 and out["label"].max() < classes
  spec = data.spec(name)
  assert (spec.input_shape, spec.num_classes, len(spec.mean)) == (shape, classes, shape[-1])


def _mock_examples(name, n):
  """The raw mocked examples, read with plain TFDS: the reference for kdjax's conversions."""
  with tfds.testing.mock_data(num_examples=n):
    return list(tfds.as_numpy(tfds.load(name, split="train")))


@needs_tfds
def test_mocked_speech_commands(no_network):
  with tfds.testing.mock_data(num_examples=4):
    out = data.load("speech_commands", "train")
  raw = _mock_examples("speech_commands", 4)
  assert out["audio"].shape == (4, 16000, 1) and out["audio"].dtype == np.float32
  for got, ex in zip(out["audio"][:, :, 0], raw):
    ref = np.zeros(16000, np.float32)
    ref[:len(ex["audio"])] = ex["audio"][:16000] / 32768.0
    np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(out["label"], [ex["label"] for ex in raw])
  assert data.spec("speech_commands").input_shape == (16000, 1)


@needs_tfds
def test_mocked_tiny_shakespeare_windows(no_network):
  with tfds.testing.mock_data(num_examples=3):
    out = data.load("tiny_shakespeare:length=7", "train")
  text = "".join(ex["text"].decode() for ex in _mock_examples("tiny_shakespeare", 3))
  vocab = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
  ids = np.array([vocab.index(ch) + 1 if ch in vocab else 0 for ch in text])
  n = (len(ids) - 1) // 7
  assert n > 0 and out["text"].shape == (n, 7) and out["text"].dtype == np.int32
  np.testing.assert_array_equal(out["text"].ravel(), ids[:7 * n])
  np.testing.assert_array_equal(out["label"].ravel(), ids[1:7 * n + 1])
  spec = data.spec("tiny_shakespeare:length=7")
  assert spec.sequence_labels and spec.num_classes == spec.vocab_size == 66


@needs_tfds
@pytest.mark.parametrize("name,length", [("imdb_reviews", 12), ("ag_news_subset", 40)])
def test_mocked_byte_level_text(name, length, no_network):
  with tfds.testing.mock_data(num_examples=5):
    out = data.load(f"{name}:length={length}", "train")
  for got, ex in zip(out["text"], _mock_examples(name, 5)):
    raw = ex["text"] if name == "imdb_reviews" else ex["title"] + b" " + ex["description"]
    ref = np.zeros(length, np.int32)
    ref[:min(len(raw), length)] = np.frombuffer(raw[:length], np.uint8)
    np.testing.assert_array_equal(got, ref)
  assert out["text"].dtype == np.int32 and out["label"].shape == (5,)
  assert data.spec(name).vocab_size == 256


@needs_tfds
def test_tiny_imagenet_directory(tmp_path, no_network):
  from PIL import Image
  root = tmp_path / "downloads" / "manual" / "tiny-imagenet-200"
  wnids = ["n02", "n01"]  # labels follow sorted order: n01 -> 0, n02 -> 1
  (root / "val" / "images").mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
  colours = {}
  for k, w in enumerate(wnids):
    (root / "train" / w / "images").mkdir(parents=True)
    for i in range(2):
      colours[(w, i)] = np.full((64, 64, 3), 40 * (2 * k + i) + 20, np.uint8)
      Image.fromarray(colours[(w, i)]).save(root / "train" / w / "images" / f"{w}_{i}.JPEG")
  lines = []
  for j, w in enumerate(["n01", "n02", "n02"]):
    grey = Image.fromarray(np.full((64, 64), 200, np.uint8))
    grey.save(root / "val" / "images" / f"val_{j}.JPEG")
    lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
  (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

  train = data.load("tiny_imagenet", "train", data_dir=str(tmp_path))
  assert train["image"].shape == (4, 64, 64, 3) and train["image"].dtype == np.uint8
  np.testing.assert_array_equal(train["label"], [0, 0, 1, 1])
  ref = np.stack([colours[("n01", 0)], colours[("n01", 1)], colours[("n02", 0)],
                  colours[("n02", 1)]])
  assert np.abs(train["image"].astype(int) - ref).max() <= 2  # JPEG round trip of flat colours
  test = data.load("tiny_imagenet", "test", data_dir=str(tmp_path))
  np.testing.assert_array_equal(test["label"], [0, 1, 1])
  assert np.abs(test["image"].astype(int) - 200).max() <= 2  # greyscale JPEG -> RGB

  with pytest.raises(data.DatasetNotAvailableError, match="tiny-imagenet-200"):
    data.load("tiny_imagenet", "train", data_dir=str(tmp_path / "empty"))


@needs_tfds
def test_unprepared_dataset_fails_fast_with_the_command(tmp_path, monkeypatch, no_network):
  start = time.perf_counter()
  with pytest.raises(data.DatasetNotAvailableError) as err:
    data.load("cifar10", "train", data_dir=str(tmp_path))
  assert f"tfds build cifar10 --data_dir={tmp_path}" in str(err.value)
  assert "\n" not in str(err.value)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
  with pytest.raises(data.DatasetNotAvailableError, match=f"--data_dir={tmp_path / 'env'}"):
    data.load("speech_commands", "test")
  assert time.perf_counter() - start < 20  # includes TensorFlow's first import when run alone
  assert isinstance(err.value, ValueError)
  with pytest.raises(ValueError, match="dataset must be one of"):
    data.load("cifar11", "train")


# -------------------------------------------------------------------------------------- order


def _keys(seeds):
  return jnp.stack([jax.random.key(s) for s in seeds])


def test_order_every_example_once_per_epoch_with_padding():
  n, b = 10, 4
  spe = data.steps_per_epoch(n, b)
  assert spe == 3
  keys = _keys([0, 1, 2])
  step_fn = jax.jit(lambda s: data.batch_indices(keys, s, num_examples=n, batch_size=b))
  for epoch in range(2):
    counts = np.zeros((3, n))
    batches = [step_fn(epoch * spe + p) for p in range(spe)]
    for idx, mask in batches:
      for r in range(3):
        np.add.at(counts[r], np.asarray(idx[r]), np.asarray(mask[r]))
    np.testing.assert_array_equal(counts, 1.0)  # masked padding never double-counts
    np.testing.assert_array_equal(np.asarray(batches[-1][1][0]), [1, 1, 0, 0])
    # The documented formula, straight from jax.random.
    for r, seed in enumerate([0, 1, 2]):
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), n))
      got = np.concatenate([np.asarray(i[r]) for i, _ in batches])[:n]
      np.testing.assert_array_equal(got, perm)


def test_order_seeds_epochs_and_shared_order():
  n = 50
  a = np.asarray(data.epoch_order(_keys([7, 7, 8]), 0, n))
  assert (a[0] == a[1]).all() and not (a[0] == a[2]).all()
  np.testing.assert_array_equal(np.sort(a, axis=1), np.tile(np.arange(n), (3, 1)))
  assert not (a[0] == np.asarray(data.epoch_order(_keys([7]), 1, n))[0]).all()
  shared = np.asarray(data.epoch_order(_keys([7, 8, 9]), 0, n, shared_order=True))
  np.testing.assert_array_equal(shared, np.tile(a[0], (3, 1)))
  # The cached path (order once per epoch) gives the same batches as the per-step path.
  keys = _keys([3, 4])
  for step in (0, 4, 5, 13):
    ref = data.batch_indices(keys, step, num_examples=n, batch_size=12)
    got = data.order_batch(data.epoch_order(keys, step // 5, n), step % 5, 12)
    for x, y in zip(ref, got):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="batch_size"):
    data.steps_per_epoch(10, 0)


def test_eval_indices_cover_each_example_once():
  idx, mask = data.eval_indices(11, 4)
  assert idx.shape == mask.shape == (3, 4)
  counts = np.zeros(11)
  np.add.at(counts, idx.ravel(), mask.ravel())
  np.testing.assert_array_equal(counts, 1.0)
  np.testing.assert_array_equal(idx[mask > 0], np.arange(11))  # fixed order


def test_eval_batches_stream_the_split_in_eval_indices_order():
  """kdjax.data.eval_batches: the padded batches of `eval_indices`, each the `eval_batch` of its
  rows (images normalised), with the host mask, the number of real examples and the rows."""
  spec = data.DatasetSpec(name="tiny", num_classes=3, modality="image", input_key="image",
                          input_shape=(2, 2, 1), mean=(0.5,), std=(0.25,))
  rng = np.random.default_rng(0)
  split = {"image": rng.integers(0, 256, (11, 2, 2, 1), dtype=np.uint8),
           "label": rng.integers(0, 3, 11).astype(np.int32)}
  arrays = data.to_device(split)
  batches = list(data.eval_batches(arrays, spec, 4))
  idx, mask = data.eval_indices(11, 4)
  assert [b.index for b in batches] == [0, 1, 2] and [b.num_valid for b in batches] == [4, 4, 3]
  for b in batches:
    ref = data.eval_batch(arrays, spec, idx[b.index], mask[b.index])
    np.testing.assert_array_equal(b.indices, idx[b.index])
    np.testing.assert_array_equal(b.mask, mask[b.index])
    np.testing.assert_allclose(np.asarray(b.x), np.asarray(ref["image"]), rtol=1e-6)  # jitted
    np.testing.assert_array_equal(np.asarray(b.labels), split["label"][idx[b.index]])
  x = np.concatenate([np.asarray(b.x)[:b.num_valid] for b in batches])
  np.testing.assert_allclose(x, (split["image"] / 255.0 - 0.5) / 0.25, atol=1e-6)  # float32
  assert spec.example_input(2).shape == (2, 2, 2, 1) and spec.example_input().dtype == np.float32
  text = data.DatasetSpec(name="t", num_classes=5, modality="text", input_key="text",
                          input_shape=(7,), vocab_size=5)
  assert text.example_input().shape == (1, 7) and text.example_input().dtype == np.int32


# ------------------------------------------------------------------------------- augmentation


def _images(b=16, h=8, w=8, c=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((b, h, w, c)), jnp.float32)


def test_crop_is_a_shifted_window_of_the_padded_image():
  x, p = _images(), 2
  out = np.asarray(pipeline.random_crop(jax.random.key(0), x, p))
  padded = np.pad(np.asarray(x), ((0, 0), (p, p), (p, p), (0, 0)))
  offsets = []
  for i in range(x.shape[0]):
    hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
            if np.array_equal(out[i], padded[i, dy:dy + 8, dx:dx + 8])]
    assert len(hits) == 1
    offsets.append(hits[0])
  assert len(set(offsets)) > 3  # per-example offsets
  np.testing.assert_array_equal(pipeline.random_crop(jax.random.key(0), x, p), out)
  assert not np.array_equal(pipeline.random_crop(jax.random.key(1), x, p), out)


def test_flip_is_an_exact_mirror_and_none_is_identity():
  x = _images(b=32)
  out = np.asarray(pipeline.random_flip(jax.random.key(0), x))
  mirrored = [np.array_equal(o, np.flip(np.asarray(xi), axis=1)) for o, xi in zip(out, x)]
  kept = [np.array_equal(o, np.asarray(xi)) for o, xi in zip(out, x)]
  assert all(m != k for m, k in zip(mirrored, kept)) and 0 < sum(mirrored) < 32
  np.testing.assert_array_equal(
      data.augment(jax.random.key(0), x, preset="none", crop_padding=4, flip=True), x)
  with pytest.raises(ValueError, match="augment preset"):
    data.augment(jax.random.key(0), x, preset="medium")


def test_random_erasing_fills_one_rectangle():
  h = w = 16
  x = jnp.full((24, h, w, 3), 2.0)  # outside [0, 1]: any erased pixel is visible
  out = np.asarray(pipeline.random_erasing(jax.random.key(0), x, probability=1.0))
  for o in out:
    erased = o < 1.5
    assert (erased == erased[..., :1]).all()  # all channels together
    rows, cols = np.flatnonzero(erased[..., 0].any(1)), np.flatnonzero(erased[..., 0].any(0))
    assert erased[..., 0].sum() == len(rows) * len(cols)  # a full rectangle
    assert np.ptp(rows) + 1 == len(rows) and np.ptp(cols) + 1 == len(cols)
    assert 0.01 * h * w <= len(rows) * len(cols) <= 0.5 * h * w
    assert (o[erased] >= 0).all() and (o[erased] <= 1).all()
  np.testing.assert_array_equal(pipeline.random_erasing(jax.random.key(0), x, probability=0.0), x)


def test_color_jitter_factors():
  x = 0.4 + 0.2 * _images(b=8)  # mid-range: no clipping for factors in [0.6, 1.4]
  xb = np.asarray(pipeline.color_jitter(jax.random.key(0), x, contrast=0, saturation=0))
  ratio = xb / np.asarray(x)
  assert np.allclose(ratio, ratio[:, :1, :1, :1], atol=1e-5)  # one brightness factor per image
  assert ((ratio >= 0.6 - 1e-6) & (ratio <= 1.4 + 1e-6)).all() and ratio.std() > 0.01
  xc = np.asarray(pipeline.color_jitter(jax.random.key(1), x, brightness=0, saturation=0))
  grey = np.asarray(x) @ np.array([0.299, 0.587, 0.114])
  m = grey.mean(axis=(1, 2))[:, None, None, None]
  f = (xc - m) / (np.asarray(x) - m)
  assert np.allclose(f, f[:, :1, :1, :1], atol=1e-3)
  grey_img = jnp.repeat(x[..., :1], 3, axis=-1)  # saturation cannot change a grey image
  np.testing.assert_allclose(
      pipeline.color_jitter(jax.random.key(2), grey_img, brightness=0, contrast=0), grey_img,
      atol=1e-6)


def test_strong_augmentation_deterministic_per_key_and_in_range():
  x = _images()
  strong = jax.jit(lambda k: data.augment(k, x, preset="strong", crop_padding=2, flip=True))
  a = strong(jax.random.key(5))
  np.testing.assert_array_equal(a, strong(jax.random.key(5)))
  assert not np.array_equal(a, strong(jax.random.key(6)))
  assert float(a.min()) >= 0 and float(a.max()) <= 1
  assert not np.array_equal(a, data.augment(jax.random.key(5), x, preset="weak", crop_padding=2,
                                            flip=True))


def test_train_and_eval_batches():
  spec = data.spec("cifar10")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(10, dtype=np.int32)
  arrays = data.to_device({"image": images, "label": labels})
  keys, aug = _keys([0, 1]), _keys([10, 11])
  fn = jax.jit(lambda step, preset: data.train_batch(
      arrays, spec, aug, step, batch_size=4, data_keys=keys, augment_preset=preset),
      static_argnums=1)
  out = fn(2, "none")
  idx, mask = data.batch_indices(keys, 2, num_examples=10, batch_size=4)
  ref = (images[np.asarray(idx)] / 255.0 - np.array(spec.mean)) / np.array(spec.std)
  np.testing.assert_allclose(out["image"], ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["label"], labels[np.asarray(idx)])
  np.testing.assert_array_equal(out["mask"], mask)
  weak = fn(2, "weak")
  assert weak["image"].shape == (2, 4, 32, 32, 3)
  np.testing.assert_array_equal(weak["image"], fn(2, "weak")["image"])
  assert not np.array_equal(weak["image"], out["image"])
  # Same order for both replicas and the same augmentation key -> identical batches.
  same = jax.jit(lambda: data.train_batch(arrays, spec, _keys([9, 9]), 1, batch_size=4,
                                          data_keys=keys, shared_order=True))()
  np.testing.assert_array_equal(same["image"][0], same["image"][1])
  # Evaluation: fixed order, normalised, mask carried through.
  e_idx, e_mask = data.eval_indices(10, 4)
  ev = data.eval_batch(arrays, spec, e_idx[2], e_mask[2])
  np.testing.assert_allclose(
      ev["image"], (images[e_idx[2]] / 255.0 - np.array(spec.mean)) / np.array(spec.std),
      rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ev["mask"], [1, 1, 0, 0])
  with pytest.raises(ValueError, match="augment_preset must be 'none'"):
    data.train_batch({"text": jnp.zeros((4, 3), jnp.int32), "label": jnp.zeros(4, jnp.int32)},
                     data.spec("imdb_reviews"), aug, 0, batch_size=2, data_keys=keys)
  with pytest.raises(ValueError, match="exactly one of data_keys and order"):
    data.train_batch(arrays, spec, aug, 0, batch_size=2)
