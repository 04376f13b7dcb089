"""kdjax.data: datasets as in-memory arrays, and the on-device replica-aware input pipeline.

  arrays = kdjax.data.load("digits", "train")   # {'image': uint8 [N,8,8,1], 'label': int32 [N]}
  spec = kdjax.data.spec("digits")              # DatasetSpec: classes, shapes, normalisation
  kdjax.data.available()                        # the names `load` understands

Names (see `available()`): kdjax's built-in offline datasets `digits`, `mnist1d`
(MNIST-1D from the mnist1d package's generator) and `synthetic[:key=value,...]` and bring-your-own `npz:PATH`, all loaded as numpy arrays without
TensorFlow; TFDS names (cifar10, cifar100, svhn_cropped, mnist, fashion_mnist, speech_commands,
tiny_shakespeare, imdb_reviews, ag_news_subset), `tiny_imagenet` (from a `tiny-imagenet-200/`
directory) and `image_folder:PATH`, read through TensorFlow Datasets. TFDS data live in
`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets. kdjax never downloads: a dataset that
is not prepared raises DatasetNotAvailableError with the command that prepares it, and a TFDS name
where tensorflow / tensorflow_datasets are not installed raises it saying what to install.

Importing this package is cheap, and TensorFlow/TFDS are imported only when a TFDS name is loaded
(`kdjax.data.builders` holds the TFDS builders of digits, mnist1d, synthetic and tiny_imagenet;
importing it registers them with TFDS). The pipeline functions (pure JAX, see kdjax.data.pipeline) are
re-exported here; a training loop:

  arrays = kdjax.data.to_device(kdjax.data.load(name, "train"))      # once
  order = kdjax.data.epoch_order(data_keys, epoch, n)                # once per epoch, [R, N]
  batch = kdjax.data.train_batch(arrays, spec, aug_keys, step, batch_size=128, order=order,
                                 augment_preset="weak")              # inside the jitted step
  for batch in kdjax.data.eval_batches(test_arrays, spec, 256):      # eval: fixed order + mask
    logits = predict(batch.x)                                        # batch.mask: 0 = padding
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kdjax.data.pipeline import (AUGMENT_PRESETS, EvalBatch, augment, batch_indices,
                                 color_jitter, epoch_order, eval_batch, eval_batch_jit,
                                 eval_batches, eval_indices, normalize, order_batch, random_crop,
                                 random_erasing, random_flip, steps_per_epoch, to_device,
                                 to_float, train_batch)


class DatasetNotAvailableError(ValueError):
  """A dataset that is not prepared locally and that kdjax will not download."""


MODALITIES = ("image", "audio", "text", "vector")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a model and the input pipeline need to know about a dataset.

  Attributes:
    name: the name given to `load`.
    num_classes: number of classes (the vocabulary size for next-character prediction).
    modality: 'image' | 'audio' | 'text' | 'vector'.
    input_key: key of the model input in `load`'s dict (equal to the modality).
    input_shape: shape of one input example, e.g. (32, 32, 3), (16000, 1), (L,), (D,).
    mean, std: per-channel normalisation of images after uint8 / 255, x_norm = (x - mean) / std;
      None where inputs are used as loaded (audio, text, vector).
    flip: whether a horizontal flip preserves the label (False for digits and text).
    crop_padding: zero padding of the random crop (0 disables cropping).
    vocab_size: number of token ids for text inputs, else None.
    sequence_labels: True when `label` is [N, L] (next-token targets) rather than [N].
    splits: the split names `load` accepts.
  """
  name: str
  num_classes: int
  modality: str
  input_key: str
  input_shape: tuple[int, ...]
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  flip: bool = False
  crop_padding: int = 0
  vocab_size: int | None = None
  sequence_labels: bool = False
  splits: tuple[str, ...] = ("train", "test")

  def example_input(self, batch: int = 1) -> np.ndarray:
    """Zeros shaped like a batch of `batch` model inputs, [batch, *input_shape], int32 token ids
    for text and float32 otherwise (what a model sees after `eval_batch`): the input to
    initialise a model or to trace it abstractly with."""
    dtype = np.int32 if self.modality == "text" else np.float32
    return np.zeros((batch,) + tuple(self.input_shape), dtype)


def load(name: str, split: str, *, data_dir: str | None = None) -> dict[str, np.ndarray]:
  """Loads a whole split into memory as numpy arrays.

  Returns a dict with the input under `spec(name).input_key` (`image` uint8 [N, H, W, C], `audio`
  float32 [N, 16000, 1] in [-1, 1], `text` int32 [N, L] or `vector` float32 [N, D]) and `label`
  int32 [N] ([N, L] for tiny_shakespeare); some datasets add keys (cifar100 `coarse_label`,
  synthetic `clean_label` and `superclass`). Raises DatasetNotAvailableError when the data are not
  prepared in the data directory, ValueError for an unknown name or option.
  """
  from kdjax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.load(name, split, data_dir=data_dir)


def spec(name: str, *, data_dir: str | None = None) -> DatasetSpec:
  """The DatasetSpec of `name` (for npz:/image_folder: computed from their train split). Needs
  TensorFlow only where `load(name, ...)` does (image_folder:)."""
  from kdjax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.spec(name, data_dir=data_dir)


def available() -> list[str]:
  """The names `load` understands; PATH and OPTIONS are placeholders."""
  from kdjax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.available()


__all__ = [
    "AUGMENT_PRESETS", "DatasetNotAvailableError", "DatasetSpec", "EvalBatch", "MODALITIES",
    "augment", "available", "batch_indices", "color_jitter", "epoch_order", "eval_batch",
    "eval_batch_jit", "eval_batches", "eval_indices", "load", "normalize", "order_batch",
    "random_crop", "random_erasing", "random_flip", "spec", "steps_per_epoch", "to_device",
    "to_float", "train_batch",
]
