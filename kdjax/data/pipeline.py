"""On-device, replica-aware input pipeline: epoch orders, batches, augmentation, normalisation.

Everything here is pure JAX on arrays that already live on the device(s) (`to_device`), so the
whole input path of a training step is computed inside the jitted step from the step counter and
per-replica keys: a resumed run reproduces the exact order and augmentations.

Order. Replica r's order in epoch e is `jax.random.permutation(fold_in(data_keys[r], e), N)`;
each replica draws its own (SIDDO, arXiv 2510.12615: same initialisation, different data order) or,
with `shared_order=True`, all replicas use replica 0's order (for arms that must see the same
batches). An epoch has steps_per_epoch = ceil(N / B) steps; step s reads positions
(s mod spe) * B + [0, B) of its epoch's order; positions >= N are padding: they point at real
examples (position mod N) so gathers stay valid, and carry mask 0. Within an epoch every example
therefore has mask-weight exactly 1. The order is a pure function of (data key, epoch), so it can
be recomputed from the step alone (`batch_indices`) or, faster, computed once per epoch
(`epoch_order`) and sliced per step (`order_batch`, `train_batch(order=...)`): a permutation costs
a sort of N per replica (about 35 ms for N = 50000 on XLA:CPU), a slice almost nothing.

Augmentation (images, float32 in [0, 1], before normalisation), each a function of (key, batch)
with independent per-example draws; `augment` applies a preset:
  'none'   identity
  'weak'   random crop with zero padding, then horizontal flip (where the dataset allows them)
  'strong' weak, then colour jitter (brightness, contrast, saturation 0.4 each), then random
           erasing (p = 0.5) — the augmentation-strength lever of Guo et al., arXiv 2405.00739.
Replica r's augmentation key at global step s is fold_in(aug_keys[r], s).

XLA:CPU note: per-example work is vectorised (a vmapped `dynamic_slice` for the crop, masks for
erasing); there is no `lax.scan` over examples, which XLA:CPU runs an order of magnitude slower.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks

if TYPE_CHECKING:
  from kdjax.data import DatasetSpec

AUGMENT_PRESETS = ("none", "weak", "strong")
# ITU-R BT.601 luma weights, the grey level used by torchvision's colour jitter.
_LUMA = (0.299, 0.587, 0.114)


def _check_count(name: str, value) -> None:
  """Sizes are static Python integers >= 1 (shapes depend on them)."""
  _checks.check_int(name, value, low=1)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """ceil(num_examples / batch_size): the last batch of an epoch is padded, never dropped."""
  _check_count("num_examples", num_examples)
  _check_count("batch_size", batch_size)
  return -(-num_examples // batch_size)


def epoch_order(data_keys: jax.Array, epoch, num_examples: int, *,
                shared_order: bool = False) -> jax.Array:
  """Per-replica example order of one epoch, int32 [R, N].

  order[r] = jax.random.permutation(jax.random.fold_in(data_keys[r], epoch), N); with
  shared_order every row is replica 0's. `data_keys` is a key array [R] (or raw uint32 [R, 2]);
  `epoch` may be traced.
  """
  _check_count("num_examples", num_examples)

  def one(key):
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples).astype(jnp.int32)

  if shared_order:
    return jnp.broadcast_to(one(data_keys[0]), (data_keys.shape[0], num_examples))
  return jax.vmap(one)(data_keys)


def order_batch(order: jax.Array, position, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Batch `position` (0 <= position < steps_per_epoch) of an epoch order [R, N].

  Returns (indices int32 [R, B], mask float32 [R, B]): indices = order[:, (position * B + j) mod N],
  mask = [position * B + j < N]. Lets an engine compute `epoch_order` once per epoch.
  """
  _check_count("batch_size", batch_size)
  n = order.shape[-1]
  slots = position * batch_size + jnp.arange(batch_size)
  mask = (slots < n).astype(jnp.float32)
  return order[:, slots % n], jnp.broadcast_to(mask, (order.shape[0], batch_size))


def batch_indices(data_keys: jax.Array, step, *, num_examples: int, batch_size: int,
                  shared_order: bool = False) -> tuple[jax.Array, jax.Array]:
  """(indices int32 [R, B], mask float32 [R, B]) of global step `step` (may be traced).

  epoch = step // spe, position = step mod spe with spe = steps_per_epoch(N, B); the batch is
  `order_batch(epoch_order(data_keys, epoch, N), position, B)`.
  """
  spe = steps_per_epoch(num_examples, batch_size)
  order = epoch_order(data_keys, step // spe, num_examples, shared_order=shared_order)
  return order_batch(order, step % spe, batch_size)


def eval_indices(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Fixed-order eval batches: (indices int32 [S, B], mask float32 [S, B]), S = ceil(N / B).

  indices[s, j] = (s * B + j) mod N, mask[s, j] = [s * B + j < N], so every example counts once.
  """
  s = steps_per_epoch(num_examples, batch_size)
  slots = np.arange(s * batch_size).reshape(s, batch_size)
  return (slots % num_examples).astype(np.int32), (slots < num_examples).astype(np.float32)


def to_device(arrays: Mapping[str, Any], sharding=None) -> dict[str, jax.Array]:
  """Puts a dataset's arrays on device (`sharding`, e.g. replicated over a mesh; default device)."""
  return jax.device_put(dict(arrays), sharding)


def to_float(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1]: x / 255."""
  return images.astype(jnp.float32) / 255.0


def normalize(x: jax.Array, mean, std) -> jax.Array:
  """Per-channel (x - mean) / std over the last axis; identity when mean is None."""
  if mean is None:
    return x
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
  """Random crop with zero padding, images [B, H, W, C].

  out[b] = pad(images[b], padding)[dy_b : dy_b + H, dx_b : dx_b + W] with dy_b, dx_b uniform in
  {0, ..., 2 * padding} (the standard CIFAR augmentation; He et al. 2016, arXiv 1512.03385).
  """
  _checks.check_range("padding", padding, low=0)
  if padding == 0:
    return images
  b, h, w, c = images.shape
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(
      padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Horizontal mirror images[b, :, ::-1] with probability 1/2 per example, images [B, H, W, C]."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1], images)


def _grey(x: jax.Array) -> jax.Array:
  if x.shape[-1] == 1:
    return x
  return jnp.tensordot(x, jnp.asarray(_LUMA, x.dtype), axes=[[-1], [0]])[..., None]


def color_jitter(key: jax.Array, images: jax.Array, *, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4) -> jax.Array:
  """Brightness, contrast and saturation jitter of images [B, H, W, C] in [0, 1].

  Per example, with factors f ~ U[1 - s, 1 + s] for each strength s and clipping to [0, 1] after
  each step, in this fixed order (torchvision's ColorJitter, as in the SimCLR recipe, arXiv
  2002.05709): x <- f_b * x;  x <- f_c * (x - mean(grey(x))) + mean(grey(x));
  x <- f_s * (x - grey(x)) + grey(x), with grey = 0.299 R + 0.587 G + 0.114 B (x itself for one
  channel, where saturation is the identity).
  """
  for name, value in (("brightness", brightness), ("contrast", contrast),
                      ("saturation", saturation)):
    _checks.check_range(name, value, low=0, high=1)
  kb, kc, ks = jax.random.split(key, 3)
  shape = (images.shape[0], 1, 1, 1)

  def factor(k, s):
    return jax.random.uniform(k, shape, images.dtype, 1.0 - s, 1.0 + s)

  x = jnp.clip(images * factor(kb, brightness), 0.0, 1.0)
  m = jnp.mean(_grey(x), axis=(1, 2, 3), keepdims=True)
  x = jnp.clip(factor(kc, contrast) * (x - m) + m, 0.0, 1.0)
  g = _grey(x)
  return jnp.clip(factor(ks, saturation) * (x - g) + g, 0.0, 1.0)


def random_erasing(key: jax.Array, images: jax.Array, *, probability: float = 0.5,
                   area: tuple[float, float] = (0.02, 0.4),
                   aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> jax.Array:
  """Random erasing (Zhong et al., AAAI 2020, arXiv 1708.04896) of images [B, H, W, C] in [0, 1].

  With probability p per example: target area S_e = s * H * W, s ~ U(area), aspect r_e with
  log r_e ~ U(log aspect) (torchvision's symmetric variant of the paper's r_e ~ U(r_1, 1/r_1)),
  h = clip(round(sqrt(S_e r_e)), 1, H), w = clip(round(sqrt(S_e / r_e)), 1, W) (the paper redraws
  oversized rectangles; clipping keeps this branch-free), top-left corner uniform among the
  positions where the h x w rectangle fits; the rectangle is filled with random pixel values
  uniform on {0, 1/255, ..., 1} (RE-R; 8-bit levels, four per 32-bit random word, because
  threefry on XLA:CPU is the bottleneck of this augmentation).
  """
  _checks.check_range("probability", probability, low=0, high=1)
  _checks.check_range("area[0]", area[0], low=0, high=area[1])
  _checks.check_range("area[1]", area[1], low=area[0], high=1)
  _checks.check_range("aspect[0]", aspect[0], low=0, high=aspect[1], low_inclusive=False)
  b, h, w, _ = images.shape
  kp, ka, kr, ky, kx, kn = jax.random.split(key, 6)
  apply = jax.random.bernoulli(kp, probability, (b,))
  target = jax.random.uniform(ka, (b,), minval=area[0], maxval=area[1]) * (h * w)
  ratio = jnp.exp(jax.random.uniform(kr, (b,), minval=math.log(aspect[0]),
                                     maxval=math.log(aspect[1])))
  eh = jnp.clip(jnp.round(jnp.sqrt(target * ratio)), 1, h).astype(jnp.int32)
  ew = jnp.clip(jnp.round(jnp.sqrt(target / ratio)), 1, w).astype(jnp.int32)
  y0 = jnp.floor(jax.random.uniform(ky, (b,)) * (h - eh + 1)).astype(jnp.int32)
  x0 = jnp.floor(jax.random.uniform(kx, (b,)) * (w - ew + 1)).astype(jnp.int32)
  rows, cols = jnp.arange(h), jnp.arange(w)
  in_rows = (rows >= y0[:, None]) & (rows < (y0 + eh)[:, None])
  in_cols = (cols >= x0[:, None]) & (cols < (x0 + ew)[:, None])
  erase = in_rows[:, :, None, None] & in_cols[:, None, :, None] & apply[:, None, None, None]
  return jnp.where(erase, _random_pixels(kn, images.shape, images.dtype), images)


def _random_pixels(key: jax.Array, shape, dtype) -> jax.Array:
  """Uniform on {0, 1/255, ..., 1}: each 32-bit random word yields four 8-bit pixels."""
  n = math.prod(shape)
  words = jax.random.bits(key, (-(-n // 4),), jnp.uint32)
  levels = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:n].reshape(shape)
  return levels.astype(dtype) / 255.0


def augment(key: jax.Array, images: jax.Array, *, preset: str, crop_padding: int = 0,
            flip: bool = False) -> jax.Array:
  """Applies a preset ('none' | 'weak' | 'strong', see the module docstring) to [B, H, W, C].

  `crop_padding` = 0 skips the crop and `flip` = False the mirror (the dataset's legality,
  DatasetSpec.crop_padding / .flip); the four steps use independent sub-keys of `key`.
  """
  _checks.check_choice("augment preset", preset, AUGMENT_PRESETS)
  if preset == "none":
    return images
  k_crop, k_flip, k_jitter, k_erase = jax.random.split(key, 4)
  x = random_crop(k_crop, images, crop_padding)
  if flip:
    x = random_flip(k_flip, x)
  if preset == "strong":
    x = random_erasing(k_erase, color_jitter(k_jitter, x))
  return x


def train_batch(arrays: Mapping[str, jax.Array], spec: DatasetSpec, aug_keys: jax.Array, step,
                *, batch_size: int, data_keys: jax.Array | None = None,
                order: jax.Array | None = None,
                augment_preset: str | Sequence[str] = "weak",
                shared_order: bool = False) -> dict[str, jax.Array]:
  """The training batch of global step `step` for R replicas, jit-able (spec etc. static).

  The order comes from exactly one of: `data_keys` (key array [R]; the epoch permutation is
  recomputed from the step, `batch_indices`), or `order` = epoch_order(data_keys, step // spe, N)
  computed by the caller once per epoch (`order_batch`; the fast path: a permutation of N costs a
  sort, about 40 ms for N = 50000 on XLA:CPU, see benchmarks/input_pipeline.py).
  Returns {spec.input_key: [R, B, ...], 'label': [R, B(, L)], 'mask': float32 [R, B]}; images
  are converted to float, augmented with replica r's key fold_in(aug_keys[r], step) and
  normalised with the spec's mean/std; other inputs are gathered as stored.
  `augment_preset` is one preset for all replicas or one per replica (e.g. teachers trained with
  weak and with strong augmentation in one program, arXiv 2405.00739).
  """
  num_replicas = aug_keys.shape[0]
  presets = ((augment_preset,) * num_replicas if isinstance(augment_preset, str)
             else tuple(augment_preset))
  if len(presets) != num_replicas:
    raise ValueError(f"augment_preset needs one preset per replica ({num_replicas}), got "
                     f"{len(presets)}")
  for preset in presets:
    _checks.check_choice("augment_preset", preset, AUGMENT_PRESETS)
    if preset != "none" and spec.modality != "image":
      raise ValueError(f"augment_preset must be 'none' for {spec.modality} data ({spec.name}), "
                       f"got {preset!r}")
  if (data_keys is None) == (order is None):
    raise ValueError("train_batch needs exactly one of data_keys and order")
  x_all = arrays[spec.input_key]
  if order is None:
    idx, mask = batch_indices(data_keys, step, num_examples=x_all.shape[0],
                              batch_size=batch_size, shared_order=shared_order)
  else:
    idx, mask = order_batch(order, step % steps_per_epoch(order.shape[-1], batch_size),
                            batch_size)
  x = x_all[idx]
  if spec.modality == "image":
    x = to_float(x)
    x = _augment_replicas(aug_keys, x, step, presets, spec)
    x = normalize(x, spec.mean, spec.std)
  return {spec.input_key: x, "label": arrays["label"][idx], "mask": mask}


def _augment_replicas(aug_keys, x, step, presets: tuple[str, ...], spec) -> jax.Array:
  """Replica r's batch augmented with presets[r] and key fold_in(aug_keys[r], step). With mixed
  presets each one present is computed for all replicas and selected per replica: the image ops
  are cheap next to a training step, and the program stays one vmap."""
  outputs = {}
  for preset in sorted(set(presets)):
    outputs[preset] = x if preset == "none" else jax.vmap(
        lambda k, xb, p=preset: augment(jax.random.fold_in(k, step), xb, preset=p,
                                        crop_padding=spec.crop_padding, flip=spec.flip))(
                                            aug_keys, x)
  out = outputs[presets[0]]
  for preset, value in outputs.items():
    chosen = np.array([p == preset for p in presets]).reshape((-1,) + (1,) * (x.ndim - 1))
    out = jnp.where(chosen, value, out)
  return out


def eval_batch(arrays: Mapping[str, jax.Array], spec: DatasetSpec, indices, mask
               ) -> dict[str, jax.Array]:
  """An eval batch from `eval_indices` rows: inputs gathered, images to float and normalised."""
  x = arrays[spec.input_key][indices]
  if spec.modality == "image":
    x = normalize(to_float(x), spec.mean, spec.std)
  return {spec.input_key: x, "label": arrays["label"][indices], "mask": jnp.asarray(mask)}


@functools.partial(jax.jit, static_argnums=(1,))
def eval_batch_jit(arrays: Mapping[str, jax.Array], spec: DatasetSpec, indices, mask
                   ) -> dict[str, jax.Array]:
  """`eval_batch`, jitted (`spec` static): one program per split shape and batch size."""
  return eval_batch(arrays, spec, indices, mask)


class EvalBatch(NamedTuple):
  """One fixed-order, padded eval batch of a split (`eval_batches`)."""
  index: int            # s: the batch's position; its slots are examples s * B + [0, B)
  x: jax.Array          # [B, ...] model inputs (`eval_batch`: images as float, normalised)
  labels: jax.Array     # [B, ...]
  mask: np.ndarray      # [B] float32 host array: 1 for a real example, 0 for padding
  num_valid: int        # the real examples: the first num_valid slots (sum of mask)
  indices: np.ndarray   # [B] int32 host array: each slot's example (padding repeats 0, 1, ..)


def eval_batches(arrays: Mapping[str, jax.Array], spec: DatasetSpec, batch_size: int
                 ) -> Iterator[EvalBatch]:
  """Streams a split through `eval_indices` order: every eval batch of `arrays` (the split on
  device, `to_device`), in order, each example in exactly one batch with mask 1. The loop of
  every full pass over a split (eval, the analysis, a teacher's logits on the train split)."""
  indices, masks = eval_indices(int(arrays["label"].shape[0]), batch_size)
  for index, (idx, mask) in enumerate(zip(indices, masks)):
    batch = eval_batch_jit(arrays, spec, idx, mask)
    yield EvalBatch(index=index, x=batch[spec.input_key], labels=batch["label"], mask=mask,
                    num_valid=int(mask.sum()), indices=idx)
