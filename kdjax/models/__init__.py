"""Model zoo: a registry of Flax Linen classifiers and one mechanism for features and CAMs.

  model = kdjax.models.get("resnet20", num_classes=100, width=0.5)
  variables = model.init(key, x, train=False)            # {'params', ['batch_stats']}
  logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"],
                              rngs={"dropout": key})     # logits [..., num_classes] float32
  logits, feats, state = apply_with_features(model, variables, x)
  cams = class_activation_map(model, variables, x, labels)

Every model takes `__call__(x, *, train)`, images NHWC float32, and names its final Dense
classifier `head`. Conv and MLP families take `width` (a float channel multiplier, default 1.0,
for capacity sweeps: student width in arXiv 2510.12615, teacher capacity in arXiv 2405.13078) and
`dtype` (computation dtype; parameters stay float32; logits are always float32).

Features: every model sows named intermediate values into the 'features' collection (only when
that collection is mutable, so a plain apply pays nothing): 'stem', 'block1', 'block2', ...,
'pre_logits' (the vector fed to `head`) and, for models that end in global average pooling +
`head`, 'cam' (the last feature map before pooling). `feature_names(model, x)` lists them.

Replicas: `jax.vmap` over a leading replica axis of the variables (and of the data and dropout
keys) gives every replica its own BatchNorm statistics and its own dropout draws, equal to
separate runs. Dropout reads the rng stream 'dropout'. Use threefry keys (JAX's default) for
per-replica streams: 'rbg' keys draw different numbers under vmap than in separate runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models._common import FEATURES
from kdjax.models.audio_m5 import M5
from kdjax.models.char_transformer import CharTransformer
from kdjax.models.mobilenet_v2 import MobileNetV2
from kdjax.models.resnet import ResNet
from kdjax.models.resnet_cifar import FILTERS, FILTERS_X4, CifarResNet
from kdjax.models.simple import CNN, CNN1D, MLP, Linear
from kdjax.models.vgg import VGG, VGG8, VGG13
from kdjax.models.wide_resnet import NAME_PATTERN as _WRN_PATTERN
from kdjax.models.wide_resnet import WideResNet

__all__ = [
    "get", "available", "apply_with_features", "class_activation_map", "cam_from_features",
    "feature_names", "num_params", "FEATURES",
    "CifarResNet", "ResNet", "WideResNet", "VGG", "MobileNetV2", "CNN", "CNN1D", "MLP", "Linear",
    "CharTransformer", "M5",
]

# name -> (module class, the fields the name fixes).
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    **{f"resnet{d}": (CifarResNet, dict(depth=d, filters=FILTERS)) for d in (8, 20, 32, 56, 110)},
    "resnet8x4": (CifarResNet, dict(depth=8, filters=FILTERS_X4)),
    "resnet32x4": (CifarResNet, dict(depth=32, filters=FILTERS_X4)),
    "resnet18": (ResNet, dict(stage_sizes=(2, 2, 2, 2), block="basic")),
    "resnet34": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="basic")),
    "resnet50": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck")),
    **{f"wrn_{d}_{k}": (WideResNet, dict(depth=d, widen_factor=k))
       for d, k in ((16, 2), (40, 1), (40, 2))},
    "vgg8": (VGG, dict(blocks=VGG8)),
    "vgg13": (VGG, dict(blocks=VGG13)),
    "mobilenet_v2": (MobileNetV2, {}),
    "cnn": (CNN, {}),
    "cnn1d": (CNN1D, {}),
    "mlp": (MLP, {}),
    "linear": (Linear, {}),
    "char_transformer": (CharTransformer, {}),
    "audio_m5": (M5, {}),
}


def available() -> list[str]:
  """The registered names, sorted. Any `wrn_<depth>_<widen>` (depth = 6n + 4) also works."""
  return sorted(_REGISTRY)


def _lookup(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
  if name in _REGISTRY:
    return _REGISTRY[name]
  match = _WRN_PATTERN.match(name) if isinstance(name, str) else None
  if match:
    return WideResNet, dict(depth=int(match.group(1)), widen_factor=int(match.group(2)))
  raise ValueError(f"unknown model {name!r}; allowed: {', '.join(available())}, or "
                   f"wrn_<depth>_<widen> (depth = 6n + 4, e.g. wrn_28_10)")


def _fields(cls: type[nn.Module]) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}


def get(name: str, num_classes: int, **kw) -> nn.Module:
  """Returns the `flax.linen.Module` registered as `name`, for `num_classes` classes.

  `kw` sets the model's other fields (e.g. width, dtype, dropout; see each class). A keyword the
  model does not have, or one the name already fixes (the depth of 'resnet20'), is a ValueError
  naming the allowed keywords; so is an unknown name.
  """
  cls, fixed = _lookup(name)
  clash = sorted(set(kw) & set(fixed))
  if clash:
    raise ValueError(f"model {name!r} fixes {', '.join(clash)}; choose another name or build "
                     f"{cls.__name__} directly")
  allowed = _fields(cls) - {"num_classes"} - set(fixed)
  unknown = sorted(set(kw) - allowed)
  if unknown:
    raise ValueError(f"unknown keyword(s) {', '.join(unknown)} for model {name!r}; allowed: "
                     f"{', '.join(sorted(allowed))}")
  return cls(num_classes=num_classes, **fixed, **kw)


def apply_with_features(module: nn.Module, variables, x, *, train: bool = False, rngs=None,
                        mutable: Sequence[str] = ()):
  """Runs `module` and returns (logits, features, updated_collections).

  features: dict name -> array of everything the model sowed into 'features', in forward order
  (see `feature_names`). updated_collections: the other collections named in `mutable` (e.g.
  ['batch_stats'] in train mode), as `module.apply(..., mutable=...)` returns them. Works under
  jit, vmap and grad: the features are ordinary outputs.
  """
  mutable = [mutable] if isinstance(mutable, str) else [c for c in mutable if c != FEATURES]
  logits, state = module.apply(variables, x, train=train, rngs=rngs,
                               mutable=[*mutable, FEATURES])
  state = dict(state)
  features = dict(state.pop(FEATURES, {}))
  return logits, features, state


def cam_from_features(feature_map, head_kernel, classes) -> jax.Array:
  """CAM_c(h, w) = sum_k W[k, c] * F[..., h, w, k] for class c = `classes` per example.

  Zhou et al. 2016, "Learning Deep Features for Discriminative Localization" (arXiv 1512.04150),
  Eq. 2: for a model logits = mean_{h,w} F[h, w, :] @ W + b, the CAM averaged over space equals
  logit_c - b_c. feature_map [*batch, *spatial, K] (any number of spatial axes: 2 for images,
  1 for audio); head_kernel [K, C]; classes int [*batch]. Returns [*batch, *spatial] float32.
  """
  feature_map = jnp.asarray(feature_map, jnp.float32)
  head_kernel = jnp.asarray(head_kernel, jnp.float32)
  classes = jnp.asarray(classes)
  batch = classes.shape
  if feature_map.shape[:len(batch)] != batch or feature_map.ndim < len(batch) + 2:
    raise ValueError(f"classes must have the feature map's batch shape: feature map "
                     f"{feature_map.shape} (batch..., spatial..., channels), classes {batch}")
  if head_kernel.ndim != 2 or head_kernel.shape[0] != feature_map.shape[-1]:
    raise ValueError(f"head kernel must be [channels={feature_map.shape[-1]}, classes], got "
                     f"{head_kernel.shape}")
  if not isinstance(classes, jax.core.Tracer):
    values = np.asarray(classes)
    if values.size and (values.min() < 0 or values.max() >= head_kernel.shape[1]):
      raise ValueError(f"classes must lie in [0, {head_kernel.shape[1]}), got values in "
                       f"[{values.min()}, {values.max()}]")
  weights = jnp.moveaxis(jnp.take(head_kernel, classes, axis=1), 0, -1)   # [*batch, K]
  spatial = feature_map.ndim - len(batch) - 1
  weights = jnp.reshape(weights, batch + (1,) * spatial + weights.shape[-1:])
  return jnp.sum(feature_map * weights, axis=-1)


def class_activation_map(module: nn.Module, variables, x, classes) -> jax.Array:
  """Class activation maps [*batch, H, W] of `module` (eval mode) for `classes` [*batch].

  CAM_c(h, w) = sum_k W_head[k, c] * F_cam[..., h, w, k] (Zhou et al. 2016, arXiv 1512.04150),
  with F_cam the model's 'cam' feature (the map before global average pooling) and c the given
  class per example (e.g. the label or the predicted class). Used for the attention-map IoU of
  Guo et al. (arXiv 2405.00739). Models without a spatial map (mlp, linear, char_transformer)
  raise a ValueError.
  """
  _, features, _ = apply_with_features(module, variables, x, train=False)
  if "cam" not in features:
    raise ValueError(f"{type(module).__name__} has no spatial feature map, so no class "
                     f"activation map (it sows {', '.join(features)}); CAMs need a model that "
                     f"ends in global average pooling + Dense")
  return cam_from_features(features["cam"], variables["params"]["head"]["kernel"], classes)


def feature_names(module: nn.Module, x) -> tuple[str, ...]:
  """The names `module` sows for input `x` (an array or jax.ShapeDtypeStruct), in forward order.

  Abstract evaluation only (jax.eval_shape): nothing is computed or allocated.
  """
  names: list[str] = []

  def run(x):
    variables = module.init(jax.random.key(0), x, train=False)
    _, features, _ = apply_with_features(module, variables, x)
    names.extend(features)

  jax.eval_shape(run, x)
  return tuple(names)


def num_params(module: nn.Module, x) -> int:
  """Number of trainable parameters (the 'params' collection; BN statistics excluded, as
  PyTorch's buffers are), from abstract evaluation only."""
  shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  return int(sum(np.prod(leaf.shape, dtype=np.int64)
                 for leaf in jax.tree_util.tree_leaves(shapes["params"])))
