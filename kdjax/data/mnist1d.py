"""Dataset `mnist1d`: MNIST-1D (Greydanus and Kobak, "Scaling Down Deep Learning with MNIST-1D",
ICML 2024), generated offline, without TensorFlow.

10 classes of 40-sample 1-D signals: each of ten hand-made 12-point templates is padded,
dilated, scaled, translated, given correlated and i.i.d. noise and sheared, then resampled to 40
points. The data are made by the `mnist1d` package's own procedural generator,
`mnist1d.data.make_dataset(get_dataset_args())`, at the paper's default arguments (5,000
examples, `train_split` 0.8, seed 42): 4,000 train and 1,000 test examples, the split and order of
the generator. Its `get_dataset` downloads a pickled copy and is not used; nothing here touches
the network. The generator seeds NumPy's and Python's global random streams; kdjax restores both
afterwards, so loading the data changes no other random draw.

Stored form: `vector` float32 [N, 40] (the generator's output, centred and scaled to unit std over
the whole dataset, as the paper uses it), `label` int in 0..9. Models: `linear`, `mlp` and the
1-D CNN `cnn1d` (the paper's ConvBase) take the vector as it is. The TFDS builder of the same data
is `kdjax.data.builders.Mnist1d`.
"""

from __future__ import annotations

import functools
import random

import numpy as np

NUM_CLASSES = 10
LENGTH = 40
NUM_TRAIN = 4000
NUM_TEST = 1000
SEED = 42  # the paper's (and the package's) default


@functools.lru_cache(maxsize=1)
def _generated() -> dict[str, np.ndarray]:
  from mnist1d import data as mnist1d_data  # pylint: disable=g-import-not-at-top
  args = mnist1d_data.get_dataset_args()
  if args.seed != SEED or args.num_samples != NUM_TRAIN + NUM_TEST:
    raise RuntimeError(f"the installed mnist1d package's default arguments changed (seed "
                       f"{args.seed}, {args.num_samples} samples); kdjax's mnist1d expects the "
                       f"paper's (seed {SEED}, {NUM_TRAIN + NUM_TEST} samples)")
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    dataset = mnist1d_data.make_dataset(args)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  return {"train_x": dataset["x"], "train_y": dataset["y"],
          "test_x": dataset["x_test"], "test_y": dataset["y_test"]}


def arrays(split: str) -> dict[str, np.ndarray]:
  """The split as numpy arrays: `vector` float32 [N, 40], `label` int64 [N]."""
  d = _generated()
  return {"vector": np.asarray(d[f"{split}_x"], np.float32),
          "label": np.asarray(d[f"{split}_y"], np.int64)}
