"""Dataset `digits`: scikit-learn's bundled 8x8 handwritten digits, offline, without TensorFlow.

The data ship inside scikit-learn (`sklearn/datasets/data/digits.csv.gz`, the test set of the UCI
"Optical Recognition of Handwritten Digits" data, Alpaydin & Kaynak 1998): 1797 images of 8x8
pixels with integer intensities 0..16, 10 classes. Loading needs no network and no TensorFlow
(`kdjax.data.load("digits", split)` is `arrays(split)` with int32 labels), so kdjax's default study
runs anywhere. The TFDS builder of the same data is `kdjax.data.builders.Digits`.

Stored form: `image` uint8 [8, 8, 1] with value round(v * 255 / 16) for the sklearn intensity
v in 0..16 (so 16 -> 255, 1 -> 16), `label` int in 0..9.

Split (fixed, stratified, about one third test): for each class c = 0..9 in turn, the indices of
class c in sklearn's file order are permuted with one `np.random.RandomState(SPLIT_SEED)` stream
(legacy RandomState streams are frozen by NumPy's compatibility policy) and the first
round(n_c / 3) go to `test`. The split depends only on the label sequence of the bundled file, not
on any sklearn shuffling, so it is the same on every sklearn version that ships the same file:
599 test and 1198 train examples. Examples keep file order within a split.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

SPLIT_SEED = 0
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
NUM_TRAIN = 1198
NUM_TEST = 599

# sha256 of the uint8 intensities (0..16) followed by the uint8 labels of sklearn's bundled file
# (checked with scikit-learn 1.9.1); another hash means the split is not the documented one.
_SKLEARN_DIGITS_SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"

# Per-channel statistics of the train split after uint8 / 255, computed once with
# `x = load('digits', 'train')['image'] / 255; x.mean(), x.std()` (population std);
# tests/test_data.py recomputes them.
MEAN = (0.30583,)
STD = (0.37618,)


def split_indices() -> dict[str, np.ndarray]:
  """Indices into sklearn's `load_digits()` arrays for the fixed train/test split (sorted)."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  labels = np.asarray(load_digits().target)
  rng = np.random.RandomState(SPLIT_SEED)
  test = []
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(labels == c)
    perm = rng.permutation(len(idx))
    test.append(idx[perm[:int(round(len(idx) / 3))]])
  is_test = np.zeros(len(labels), bool)
  is_test[np.concatenate(test)] = True
  return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def arrays(split: str) -> dict[str, np.ndarray]:
  """The split as numpy arrays straight from sklearn (no TFDS): `image` uint8 [N,8,8,1], `label`."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  bunch = load_digits()
  raw = np.asarray(bunch.images)
  labels = np.asarray(bunch.target)
  digest = hashlib.sha256(raw.astype(np.uint8).tobytes() + labels.astype(np.uint8).tobytes())
  if digest.hexdigest() != _SKLEARN_DIGITS_SHA256:
    logging.warning("kdjax digits: scikit-learn's bundled digits differ from the documented file; "
                    "the train/test split is not the documented one.")
  idx = split_indices()[split]
  images = np.round(raw[idx] * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return {"image": images, "label": labels[idx].astype(np.int64)}


def __getattr__(name: str):
  """`digits.Digits`, the TFDS builder, now lives in kdjax.data.builders (imports TFDS)."""
  if name == "Digits":
    from kdjax.data import builders  # pylint: disable=g-import-not-at-top
    return builders.Digits
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
