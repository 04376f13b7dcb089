"""Small models: `cnn` (digits, smoke tests), `cnn1d` (1-D signals, MNIST-1D), `mlp` and `linear`
(the linear-model theory).

`linear` is the model of the linear-model analysis of Nagarajan et al., "On student-teacher
deviations in distillation: does it pay to disobey?" (arXiv 2301.12923): logits = x W (+ b) on
the flattened input, so gradient descent's bias toward the top eigendirections of the data can
be studied exactly.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import _common
from kdjax.models._common import Dtype


def _flatten(x):
  """[B, ...] -> [B, prod(...)]: every axis after the batch axis is a feature axis."""
  return jnp.reshape(x, (x.shape[0], -1))


class CNN(nn.Module):
  """Three 3x3 conv + ReLU layers, global average pooling, a Dense `head`.

  Channels floor((32, 64, 64) * width); the second conv has stride 2, so 8x8 digits give a 4x4
  map. No BatchNorm, so the model is a pure function of its parameters (quick tests, digits demo).
  Input [B, H, W, C] NHWC; output [B, num_classes] float32. Sown features: 'stem', 'block1',
  'block2' (the three conv outputs), 'cam' (= block2, the map that is pooled), 'pre_logits'.
  """
  num_classes: int
  width: float = 1.0
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    _common.check_num_classes(self.num_classes)
    _common.check_width(self.width)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train  # no BatchNorm or dropout; the argument keeps the registry's one signature
    names = ("stem", "block1", "block2")
    for channels, strides, name in zip((32, 64, 64), (1, 2, 1), names):
      x = nn.Conv(_common.scale_channels(channels, self.width), (3, 3), strides=strides,
                  padding=1, kernel_init=_common.conv_init, dtype=self.dtype,
                  name=f"{name}_conv")(x)
      x = nn.relu(x)
      _common.sow_feature(self, name, x)
    return _common.pooled_head(self, x, 2)


class MLP(nn.Module):
  """Flatten, then Dense + ReLU (+ dropout) per hidden layer, then a Dense `head`.

  Hidden sizes floor(hidden * width). `dropout` is applied after each hidden activation in train
  mode, with keys from the 'dropout' rng stream. Input [B, ...]; output [B, num_classes] float32.
  Sown features: 'block1'..'blockN' (hidden activations, before dropout), 'pre_logits' (the
  vector fed to `head`).
  """
  num_classes: int
  hidden: Sequence[int] = (256, 256)
  width: float = 1.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    _common.check_num_classes(self.num_classes)
    _common.check_width(self.width)
    _common.check_dropout(self.dropout)
    for size in self.hidden:
      _common.check_positive_int("hidden sizes", size)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = _flatten(x)
    for i, size in enumerate(self.hidden):
      x = nn.relu(nn.Dense(_common.scale_channels(size, self.width), dtype=self.dtype,
                           name=f"dense{i + 1}")(x))
      _common.sow_feature(self, f"block{i + 1}", x)
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    _common.sow_feature(self, "pre_logits", x)
    return _common.logits_f32(_common.head(self.num_classes, self.dtype)(x))


class Linear(nn.Module):
  """logits = flatten(x) W + b (b omitted when use_bias=False); W is the Dense `head`.

  Input [B, ...]; output [B, num_classes] float32. Sown features: 'pre_logits' (the flattened
  input).
  """
  num_classes: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    _common.check_num_classes(self.num_classes)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    x = _flatten(x)
    _common.sow_feature(self, "pre_logits", x)
    return _common.logits_f32(nn.Dense(self.num_classes, use_bias=self.use_bias, dtype=self.dtype,
                                       name="head")(x))


class CNN1D(nn.Module):
  """The 1-D CNN of MNIST-1D (Greydanus and Kobak, ICML 2024; the `ConvBase` of their code).

  Three Conv1D + ReLU layers of floor(`channels` * width) channels (kernel 5, 3, 3; stride 2;
  padding 1 on each side), the map flattened, a Dense `head`. On 40-sample signals the map is
  40 -> 19 -> 10 -> 5 long, so the head sees 5 x 25 = 125 features, as in the paper's model.
  Input [B, L] (a signal, e.g. the `vector` of mnist1d) or [B, L, C]; output [B, num_classes]
  float32. No BatchNorm or dropout. Sown features: 'stem', 'block1', 'block2' (the conv
  outputs), 'pre_logits' (the flattened map). No 'cam': the head reads positions, not a pool.
  """
  num_classes: int
  channels: int = 25
  width: float = 1.0
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    _common.check_num_classes(self.num_classes)
    _common.check_width(self.width)
    _common.check_positive_int("channels", self.channels)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    if x.ndim == 2:
      x = x[..., None]
    for kernel, name in zip((5, 3, 3), ("stem", "block1", "block2")):
      x = nn.Conv(_common.scale_channels(self.channels, self.width), (kernel,), strides=2,
                  padding=((1, 1),), dtype=self.dtype, name=f"{name}_conv")(x)
      x = nn.relu(x)
      _common.sow_feature(self, name, x)
    x = _flatten(x)
    _common.sow_feature(self, "pre_logits", x)
    return _common.logits_f32(_common.head(self.num_classes, self.dtype)(x))
