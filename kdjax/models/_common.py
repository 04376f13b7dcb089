"""Pieces shared by the model families: feature sowing, BatchNorm, initialisers, width scaling.

Kept private: the public surface of kdjax.models is the registry and the feature/CAM helpers in
`kdjax/models/__init__.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax import _checks

Dtype = Any

# The collection every model sows its named intermediate features into.
FEATURES = "features"

# He et al. 2015 (arXiv 1502.01852) normal init with fan-out, N(0, 2 / (k*k*c_out)): what the
# PyTorch reference implementations of the KD literature (RepDistiller, torchvision) use for convs.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _keep_latest(_, value):
  return value


def sow_feature(module: nn.Module, name: str, value) -> None:
  """Stores `value` as `features/<name>` when the 'features' collection is mutable.

  The latest value is kept (not a tuple of every call), so `apply_with_features` returns plain
  arrays. Nothing is sown during `init`: `module.init(...)` must return only 'params' and
  'batch_stats', as the engine's contract says.
  """
  if module.is_initializing():
    return
  module.sow(FEATURES, name, value, reduce_fn=_keep_latest)


# The mapped axis (shard_map/pmap) over which BatchNorm averages its batch statistics; set by
# the engine while it traces a step whose batch is split over a 'data' mesh axis.
_BATCH_NORM_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kdjax_batch_norm_axis", default=None)


@contextlib.contextmanager
def batch_norm_axis(axis_name: str | None):
  """Within the block, models traced with train=True synchronise their BatchNorm statistics
  over the mapped axis `axis_name` (None: each device's batch alone), as SyncBatchNorm does."""
  token = _BATCH_NORM_AXIS.set(axis_name)
  try:
    yield
  finally:
    _BATCH_NORM_AXIS.reset(token)


def batch_norm(train: bool, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5).

  The KD literature's reference code is PyTorch; matching its running-average decay keeps
  published recipes (epochs, schedules) transferable. Statistics are reduced over every axis but
  the last, so under `jax.vmap` over a replica axis each replica keeps its own statistics; inside
  `batch_norm_axis(name)` they are also averaged over the mapped axis `name` (a batch split over
  devices normalises with the whole batch's mean and variance).
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      axis_name=_BATCH_NORM_AXIS.get(), name=name)


def head(num_classes: int, dtype: Dtype) -> nn.Dense:
  """The final classifier, always named 'head' (class_activation_map reads its kernel)."""
  return nn.Dense(num_classes, dtype=dtype, name="head")


def logits_f32(x) -> jnp.ndarray:
  """Logits leave the model in float32 whatever the compute dtype (losses need the precision)."""
  return jnp.asarray(x, jnp.float32)


def scale_channels(channels: int, width: float) -> int:
  """floor(channels * width), at least 1: RepDistiller's `int(c * width_mult)` rule.

  The tiny epsilon stops float error (0.29 * 100 = 28.999...) from dropping a channel.
  """
  return max(1, int(math.floor(channels * width + 1e-6)))


def check_width(width) -> None:
  _checks.check_range("width", width, low=0.0, low_inclusive=False)


def check_num_classes(num_classes) -> None:
  check_positive_int("num_classes", num_classes)


def check_positive_int(name: str, value) -> None:
  _checks.check_int(name, value, low=1)


def check_dropout(rate) -> None:
  _checks.check_range("dropout", rate, low=0.0, high=1.0, high_inclusive=False)


def pooled_head(module: nn.Module, x, spatial_axes: int) -> jnp.ndarray:
  """The ending every spatial model shares: sow `x` as 'cam', global-average-pool it, sow the
  pooled vector as 'pre_logits', and classify it with `head` (float32 logits). Call it inside
  the module's compact `__call__`."""
  sow_feature(module, "cam", x)
  x = global_avg_pool(x, spatial_axes)
  sow_feature(module, "pre_logits", x)
  return logits_f32(head(module.num_classes, module.dtype)(x))


def global_avg_pool(x, spatial_axes: int) -> jnp.ndarray:
  """Mean over the `spatial_axes` axes just before the channel axis."""
  return jnp.mean(x, axis=tuple(range(-1 - spatial_axes, -1)))
