"""kdjax's TFDS builders: `digits`, `mnist1d`, `synthetic` and `tiny_imagenet`. Imports TensorFlow Datasets.

kdjax.data imports this module only on a TFDS path (`tiny_imagenet`); `digits`, `mnist1d` and
`synthetic` load straight from `kdjax.data.digits.arrays` / `kdjax.data.mnist1d.arrays` /
`kdjax.data.synthetic.generate` without it. Import
it to register the builders with TFDS, e.g. to prepare them or read them as tf.data:

  import tensorflow_datasets as tfds
  import kdjax.data.builders  # registers digits, mnist1d, synthetic, tiny_imagenet
  ds = tfds.load("digits", split="test", data_dir=DIR)
  builder = kdjax.data.builders.Synthetic(data_dir=DIR, config=kdjax.data.builders.config_for(
      kdjax.data.synthetic.parse("classes=6,dim=12")))

The prepared examples equal the arrays of the TFDS-free path, example for example (the builders
generate them from the same functions and keep file order: `disable_shuffling`).
"""

from __future__ import annotations

import dataclasses

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from kdjax.data import digits, mnist1d, synthetic
from kdjax.data.sources import TINY_IMAGENET_DIR

# TFDS 4.9.10 finds a builder's source through `importlib_resources`, which it does not declare
# (tensorflow/datasets#11212); naming the file directly (`code_path`) avoids that import.
_CODE_PATH = epath.Path(__file__)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits with kdjax's fixed stratified split (see kdjax.data.digits)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn digits, uint8 0..255, stratified split with seed 0."}
  code_path = _CODE_PATH

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's 8x8 handwritten digits (UCI optdigits test set).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=digits.IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(num_classes=digits.NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        # Keep file order so the prepared split matches `digits.arrays(split)` example for example.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ship inside scikit-learn.
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split):
    data = digits.arrays(split)
    for i, (image, label) in enumerate(zip(data["image"], data["label"])):
      yield i, {"image": image, "label": int(label)}


class Mnist1d(tfds.core.GeneratorBasedBuilder):
  """MNIST-1D (Greydanus and Kobak, ICML 2024) from the mnist1d package's generator at the paper's
  default arguments (see kdjax.data.mnist1d); nothing is downloaded."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "mnist1d make_dataset(get_dataset_args()): seed 42, 4000/1000."}
  code_path = _CODE_PATH

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="MNIST-1D: 10 classes of procedurally generated 40-sample 1-D signals.",
        features=tfds.features.FeaturesDict({
            "vector": tfds.features.Tensor(shape=(mnist1d.LENGTH,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=mnist1d.NUM_CLASSES),
        }),
        supervised_keys=("vector", "label"),
        homepage="https://github.com/greydanus/mnist1d",
        disable_shuffling=True,  # the generator's order, as `mnist1d.arrays(split)`
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated locally (the package's get_dataset download is not used).
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split):
    data = mnist1d.arrays(split)
    for i, (vector, label) in enumerate(zip(data["vector"], data["label"])):
      yield i, {"vector": vector, "label": int(label)}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """A TFDS BuilderConfig carrying SyntheticParams; its name is `params.config_name`."""
  params: synthetic.SyntheticParams = dataclasses.field(
      default_factory=synthetic.SyntheticParams)


def config_for(params: synthetic.SyntheticParams) -> SyntheticConfig | str:
  """The config to pass to `Synthetic(config=...)`: the registered one's name, else a new config."""
  if params.config_name in Synthetic.builder_configs:
    return params.config_name
  return SyntheticConfig(name=params.config_name, params=params,
                         description="superclass Gaussian data (custom parameters)")


class Synthetic(tfds.core.GeneratorBasedBuilder):
  """Superclass Gaussian classification data (see kdjax.data.synthetic)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Superclass Gaussians with a power-law within-class spectrum."}
  BUILDER_CONFIGS = [SyntheticConfig(name=synthetic.SyntheticParams().config_name,
                                     description="superclass Gaussian data (defaults)")]
  code_path = _CODE_PATH

  def _info(self) -> tfds.core.DatasetInfo:
    p = self.builder_config.params
    return tfds.core.DatasetInfo(
        builder=self,
        description=synthetic.__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "vector": tfds.features.Tensor(shape=(p.dim,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=p.classes),
            "clean_label": tfds.features.ClassLabel(num_classes=p.classes),
            "superclass": tfds.features.ClassLabel(num_classes=p.superclasses),
        }),
        supervised_keys=("vector", "label"),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated locally.
    return {s: self._generate_examples(s) for s in ("train", "test")}

  def _generate_examples(self, split):
    data = synthetic.generate(self.builder_config.params, split)
    for i in range(len(data["label"])):
      yield i, {k: v[i] for k, v in data.items()}


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """TinyImageNet (200 classes, 64x64 RGB) from its standard `tiny-imagenet-200/` layout."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "train and val (as test) of tiny-imagenet-200."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Unzip http://cs231n.stanford.edu/tiny-imagenet-200.zip so that {TINY_IMAGENET_DIR}/ is in "
      "the manual directory (DATA_DIR/downloads/manual by default).")
  code_path = _CODE_PATH

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Tiny ImageNet: 200 ImageNet classes at 64x64; test is the labelled val set.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(64, 64, 3)),
            "label": tfds.features.ClassLabel(num_classes=200),
        }),
        supervised_keys=("image", "label"),
        homepage="http://cs231n.stanford.edu/",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = epath.Path(dl_manager.manual_dir) / TINY_IMAGENET_DIR
    wnids = sorted((root / "wnids.txt").read_text().split())
    label = {w: i for i, w in enumerate(wnids)}
    train = [(p, label[w]) for w in wnids
             for p in sorted((root / "train" / w / "images").glob("*.JPEG"))]
    test = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
      if line.strip():
        fname, wnid = line.split("\t")[:2]
        test.append((root / "val" / "images" / fname, label[wnid]))
    return {"train": self._generate_examples(train), "test": self._generate_examples(sorted(test))}

  def _generate_examples(self, items):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    for i, (path, label) in enumerate(items):
      with path.open("rb") as f:
        image = np.asarray(Image.open(f).convert("RGB"))
      yield i, {"image": image, "label": label}
