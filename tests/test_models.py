"""Tests for kdjax.models: registry, published parameter counts, shapes, features, CAMs, replicas.

References are independent of the code under test: parameter counts published in the literature
and closed-form counts written out here, numpy re-implementations of the small models, and the
closed forms of global-average-pooling classifiers. Shapes and counts use jax.eval_shape (no
compilation); only the small models run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models

IMG32 = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
# The configurations of the models that actually run, shared by the tests so that each init and
# apply compiles once (the jitted functions are cached per model; equal configs are equal models).
RESNET8 = dict(num_classes=5, width=0.5)
RESNET8_X = (4, 8, 8, 3)
MLP = dict(num_classes=5, hidden=(16,), dropout=0.5)
TINY_TRANSFORMER = dict(max_len=16, num_layers=1, num_heads=2, dim=16, dropout=0.1)


def _key(seed: int) -> jax.Array:
  """An init key. 'rbg' because XLA:CPU here takes ~3.5 s to compile each threefry draw (one per
  parameter tensor) and ~0.5 s for rbg; initial values do not matter to these tests. Not for
  dropout under vmap: rbg draws change under vmap, threefry draws do not."""
  return jax.random.key(seed, impl="rbg")


@functools.lru_cache(maxsize=None)
def _init_fn(model):
  return jax.jit(lambda key, x: model.init(key, x, train=False))


def _init(model, x, seed: int = 0):
  """Jitted init: one compilation, several times cheaper here than op-by-op eager init."""
  return _init_fn(model)(_key(seed), x)


@functools.lru_cache(maxsize=None)
def _apply_fn(model, train: bool, mutable: tuple[str, ...]):
  return jax.jit(lambda v, x, rngs: model.apply(v, x, train=train, rngs=rngs,
                                                mutable=list(mutable) if mutable else False))


def _run(model, variables, x, *, train: bool, mutable=(), rngs=None):
  """Jitted model.apply(variables, x, train=train, mutable=mutable, rngs=rngs)."""
  return _apply_fn(model, train, tuple(mutable))(variables, x, rngs)


def _data(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _abstract(name, num_classes, x_shape=(2, 32, 32, 3), x_dtype="float32", **kw):
  """Abstract (variables, logits, features) of one model, from a single eval_shape trace."""
  return _abstract_cached(name, num_classes, tuple(x_shape), x_dtype, tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _abstract_cached(name, num_classes, x_shape, x_dtype, kw):
  model = models.get(name, num_classes=num_classes, **dict(kw))
  x = jax.ShapeDtypeStruct(x_shape, jnp.dtype(x_dtype))

  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)
    logits, features, _ = models.apply_with_features(model, variables, x)
    return variables, logits, features

  return jax.eval_shape(run, x)


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Registry and validation.

def test_available_lists_the_design_names():
  design = ("resnet8 resnet20 resnet32 resnet56 resnet110 resnet8x4 resnet32x4 resnet18 resnet34 "
            "resnet50 wrn_16_2 wrn_40_1 wrn_40_2 vgg8 vgg13 mobilenet_v2 cnn cnn1d mlp linear "
            "char_transformer audio_m5").split()
  assert models.available() == sorted(design)


def test_unknown_name_and_keywords_raise_value_error():
  with pytest.raises(ValueError, match="resnet20.*wrn_<depth>_<widen>"):
    models.get("resnet21", num_classes=10)
  with pytest.raises(ValueError, match="unknown keyword.*widht.*allowed:.*width"):
    models.get("resnet20", num_classes=10, widht=2.0)
  with pytest.raises(ValueError, match="fixes depth"):
    models.get("resnet20", num_classes=10, depth=32)


@pytest.mark.parametrize("name, kw, match", [
    ("resnet20", dict(width=0.0), "width"),
    ("cnn", dict(width=-1.0), "width"),
    ("mlp", dict(dropout=1.0), "dropout"),
    ("wrn_17_2", {}, "depth must be 6n \\+ 4"),
    ("vgg8", dict(num_classes=0), "num_classes"),
    ("char_transformer", dict(dim=30, num_heads=4), "divisible by num_heads"),
    ("char_transformer", dict(task="translate"), "task"),
    ("char_transformer", dict(vocab_size=50), "vocab_size must equal num_classes"),
])
def test_hyperparameters_validated_eagerly(name, kw, match):
  kw = dict(kw)
  num_classes = kw.pop("num_classes", 10)
  with pytest.raises(ValueError, match=match):
    models.get(name, num_classes=num_classes, **kw)


def test_input_validation():
  m5 = models.get("audio_m5", num_classes=4)
  with pytest.raises(ValueError, match="too short.*1021"):
    jax.eval_shape(lambda x: m5.init(jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((1, 1020, 1), jnp.float32))
  _, logits, features = _abstract("audio_m5", 4, x_shape=(1, 1021, 1))   # ceil(1021/4) = 4**4
  assert features["cam"].shape == (1, 1, 512) and logits.shape == (1, 4)
  tr = models.get("char_transformer", num_classes=11, max_len=8)
  with pytest.raises(ValueError, match="exceeds max_len"):
    jax.eval_shape(lambda x: tr.init(jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((1, 9), jnp.int32))


# ----------------------------------------------------------------------------------------------
# Parameter counts against published tables (trainable parameters; BN running statistics are
# PyTorch buffers, not parameters). Tolerance: one unit of the table's last digit, because the
# tables round or truncate (e.g. vgg8 = 3,965,028 is printed 3.96M).

# CIFAR-100 counts of the RepDistiller models (github.com/HobbitLong/RepDistiller, the code of
# CRD, Tian et al. ICLR 2020, arXiv 1910.10699) as printed in the CIFAR-100 tables of the KD
# literature that uses them.
CRD_TABLE_M = {
    "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.26, "wrn_16_2": 0.70, "wrn_40_1": 0.57,
    "resnet56": 0.86, "resnet110": 1.74, "resnet20": 0.28, "resnet32": 0.47, "vgg13": 9.46,
    "vgg8": 3.96,
}


@pytest.mark.parametrize("name", sorted(CRD_TABLE_M))
def test_param_count_matches_crd_cifar100_table(name):
  variables, _, _ = _abstract(name, 100)
  assert abs(_count(variables["params"]) / 1e6 - CRD_TABLE_M[name]) <= 0.01


def test_param_count_mobilenet_v2_half_width_is_crd_mobilenetv2():
  # RepDistiller's "MobileNetV2" (mobile_half = width 0.5, expansion 6): 0.81M at 100 classes.
  variables, _, _ = _abstract("mobilenet_v2", 100, width=0.5)
  assert abs(_count(variables["params"]) / 1e6 - 0.81) <= 0.01


@pytest.mark.parametrize("name, published_m", [("resnet18", 11.2), ("resnet34", 21.3),
                                               ("resnet50", 23.7)])
def test_param_count_small_image_resnets(name, published_m):
  # CIFAR-100 table of github.com/weiaicunzai/pytorch-cifar100 (issue #59): 3x3 stem, no pool.
  variables, _, _ = _abstract(name, 100)
  assert abs(_count(variables["params"]) / 1e6 - published_m) <= 0.1


def _wrn_closed_form(depth, k, num_classes, width=1.0):
  """Parameters of WRN-depth-k (pre-activation blocks, 1x1 projection when the shape changes)."""
  n = (depth - 4) // 6
  c = [int(np.floor(v * width + 1e-6)) for v in (16, 16 * k, 32 * k, 64 * k)]
  total = 3 * 9 * c[0]                                   # stem conv, no bias
  for g in range(3):
    cin, cout = c[g], c[g + 1]
    for b in range(n):
      i = cin if b == 0 else cout
      total += 2 * i + 9 * i * cout + 2 * cout + 9 * cout * cout   # bn1, conv1, bn2, conv2
      if i != cout:
        total += i * cout                                # 1x1 projection shortcut
  return total + 2 * c[3] + c[3] * num_classes + num_classes       # final BN, Dense head


@pytest.mark.parametrize("depth, k, num_classes, width", [
    (16, 2, 100, 1.0), (40, 1, 100, 1.0), (28, 10, 10, 1.0), (22, 3, 7, 0.5), (10, 1, 5, 2.0)])
def test_wrn_param_count_closed_form_any_depth_width(depth, k, num_classes, width):
  variables, logits, _ = _abstract(f"wrn_{depth}_{k}", num_classes, width=width)
  assert _count(variables["params"]) == _wrn_closed_form(depth, k, num_classes, width)
  assert logits.shape == (2, num_classes)


def _cifar_resnet_closed_form(depth, filters, num_classes, width=1.0):
  """Parameters of a CIFAR ResNet (basic blocks, 1x1 conv + BN projection when the shape
  changes), split into (total, projection-shortcut parameters)."""
  n = (depth - 2) // 6
  c = [int(np.floor(v * width + 1e-6)) for v in filters]
  total = 3 * 9 * c[0] + 2 * c[0]                        # stem conv + BN
  shortcuts = 0
  for g in range(3):
    cin, cout = c[g], c[g + 1]
    for b in range(n):
      i = cin if b == 0 else cout
      total += 9 * i * cout + 2 * cout + 9 * cout * cout + 2 * cout
      if b == 0 and (g > 0 or i != cout):
        shortcuts += i * cout + 2 * cout
  return total + shortcuts + c[3] * num_classes + num_classes, shortcuts


@pytest.mark.parametrize("name, depth, filters, num_classes, width", [
    ("resnet20", 20, (16, 16, 32, 64), 10, 1.0), ("resnet110", 110, (16, 16, 32, 64), 100, 1.0),
    ("resnet8x4", 8, (32, 64, 128, 256), 100, 1.0), ("resnet56", 56, (16, 16, 32, 64), 7, 0.5)])
def test_cifar_resnet_param_count_closed_form(name, depth, filters, num_classes, width):
  variables, _, _ = _abstract(name, num_classes, width=width)
  total, _ = _cifar_resnet_closed_form(depth, filters, num_classes, width)
  assert _count(variables["params"]) == total


def test_cifar_resnets_match_he_et_al_table_without_projections():
  # He et al. 2016 (arXiv 1512.03385), Table 6 (CIFAR-10) counts use parameter-free (option A)
  # shortcuts: 0.27M, 0.46M, 0.85M, 1.7M. RepDistiller's models add the 1x1 projections.
  for depth, published_m, tol in ((20, 0.27, 0.01), (32, 0.46, 0.01), (56, 0.85, 0.01),
                                  (110, 1.7, 0.1)):
    variables, _, _ = _abstract(f"resnet{depth}", 10)
    _, shortcuts = _cifar_resnet_closed_form(depth, (16, 16, 32, 64), 10)
    assert abs((_count(variables["params"]) - shortcuts) / 1e6 - published_m) <= tol


def test_wrn_28_10_matches_zagoruyko_table():
  # Zagoruyko & Komodakis 2016 (arXiv 1605.07146), Table 4: WRN-28-10 has 36.5M parameters.
  assert abs(_wrn_closed_form(28, 10, 10) / 1e6 - 36.5) <= 0.1


def test_audio_m5_param_count_dai_et_al():
  # Dai et al. 2017 (arXiv 1610.00087), Table 1, M5: conv [80/4, 128], [3, 128], [3, 256],
  # [3, 512], each + BN, then a Dense softmax layer; "0.5M" parameters.
  variables, logits, features = _abstract("audio_m5", 35, x_shape=(2, 16000, 1))
  convs = 80 * 1 * 128 + 3 * 128 * 128 + 3 * 128 * 256 + 3 * 256 * 512
  bns = 2 * (128 + 128 + 256 + 512)
  assert _count(variables["params"]) == convs + bns + 512 * 35 + 35
  assert 0.5e6 <= _count(variables["params"]) < 0.6e6
  assert logits.shape == (2, 35)
  # 16000 samples: SAME stem stride 4 -> 4000, then /4 per pool: 1000, 250, 62, 15.
  assert features["stem"].shape == (2, 1000, 128)
  assert features["cam"].shape == (2, 15, 512)


# ----------------------------------------------------------------------------------------------
# Shapes, collections and features of every registered model (abstract evaluation).

# name -> (num_classes, x_shape, x_dtype, kw, expected cam shape or None, has batch_stats)
SHAPE_CASES = {
    "resnet8": (100, (2, 32, 32, 3), "float32", {}, (2, 8, 8, 64), True),
    "resnet20": (100, (2, 32, 32, 3), "float32", {}, (2, 8, 8, 64), True),
    "resnet32": (100, (2, 32, 32, 3), "float32", {}, (2, 8, 8, 64), True),
    "resnet56": (100, (2, 32, 32, 3), "float32", {}, (2, 8, 8, 64), True),
    "resnet110": (100, (2, 32, 32, 3), "float32", {}, (2, 8, 8, 64), True),
    "resnet8x4": (100, (2, 32, 32, 3), "float32", {}, (2, 8, 8, 256), True),
    "resnet32x4": (100, (2, 32, 32, 3), "float32", {}, (2, 8, 8, 256), True),
    "resnet18": (100, (2, 32, 32, 3), "float32", {}, (2, 4, 4, 512), True),
    "resnet34": (100, (2, 32, 32, 3), "float32", {}, (2, 4, 4, 512), True),
    "resnet50": (100, (2, 32, 32, 3), "float32", {}, (2, 4, 4, 2048), True),
    "wrn_16_2": (100, (2, 32, 32, 3), "float32", {}, (2, 8, 8, 128), True),
    "wrn_40_1": (100, (2, 32, 32, 3), "float32", {}, (2, 8, 8, 64), True),
    "wrn_40_2": (100, (2, 32, 32, 3), "float32", {}, (2, 8, 8, 128), True),
    "vgg8": (100, (2, 32, 32, 3), "float32", {}, (2, 4, 4, 512), True),
    "vgg13": (100, (2, 32, 32, 3), "float32", {}, (2, 4, 4, 512), True),
    "mobilenet_v2": (100, (2, 32, 32, 3), "float32", {}, (2, 2, 2, 1280), True),
    "cnn": (10, (2, 8, 8, 1), "float32", {}, (2, 4, 4, 64), False),
    "cnn1d": (10, (2, 40), "float32", {}, None, False),
    "mlp": (10, (2, 8, 8, 1), "float32", {}, None, False),
    "linear": (10, (2, 8, 8, 1), "float32", {}, None, False),
    "char_transformer": (65, (2, 32), "int32", {}, None, False),
    "audio_m5": (35, (2, 16000, 1), "float32", {}, (2, 15, 512), True),
}


def test_shape_cases_cover_the_registry():
  assert sorted(SHAPE_CASES) == models.available()


@pytest.mark.parametrize("name", sorted(SHAPE_CASES))
def test_shapes_collections_and_features(name):
  num_classes, x_shape, x_dtype, kw, cam_shape, has_bn = SHAPE_CASES[name]
  variables, logits, features = _abstract(name, num_classes, x_shape, x_dtype, **kw)
  expected_logits = (2, 32, 65) if name == "char_transformer" else (2, num_classes)
  assert logits.shape == expected_logits and logits.dtype == jnp.float32
  # init returns only the contract's collections (features are not sown at init).
  assert set(variables) == ({"params", "batch_stats"} if has_bn else {"params"})
  assert "head" in variables["params"]
  assert "pre_logits" in features
  if cam_shape is None:
    assert "cam" not in features
  else:
    assert features["cam"].shape == cam_shape
    # The head reads the spatially pooled cam map.
    assert features["pre_logits"].shape == (2, cam_shape[-1])
    assert variables["params"]["head"]["kernel"].shape == (cam_shape[-1], num_classes)


def test_feature_names_in_forward_order():
  assert models.feature_names(models.get("resnet20", num_classes=10), IMG32) == (
      "stem", "block1", "block2", "block3", "cam", "pre_logits")
  assert models.feature_names(models.get("mlp", num_classes=3, hidden=(5, 6, 7)),
                              jax.ShapeDtypeStruct((2, 4), jnp.float32)) == (
      "block1", "block2", "block3", "pre_logits")


def test_width_multiplier_scales_every_stage():
  _, _, features = _abstract("resnet20", 10, width=0.5)
  assert [features[k].shape[-1] for k in ("stem", "block1", "block2", "block3")] == [8, 8, 16, 32]
  assert features["block2"].shape[1:3] == (16, 16)
  _, _, features = _abstract("mobilenet_v2", 10, width=2.0)
  assert features["stem"].shape[-1] == 64 and features["cam"].shape[-1] == 2560
  _, _, features = _abstract("vgg8", 10, width=0.25)
  assert features["cam"].shape[-1] == 128
  variables, _, _ = _abstract("char_transformer", 11, x_shape=(2, 8), x_dtype="int32", width=0.5)
  assert variables["params"]["token_embed"]["embedding"].shape == (11, 64)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  variables, logits, features = _abstract("resnet8", 10, dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype("float32")}
  assert logits.dtype == jnp.float32
  assert features["block1"].dtype == jnp.bfloat16


# Every family of the registry with its dtype threaded (one architecture each; the input shapes
# of SHAPE_CASES).
BF16_CASES = ("cnn", "mlp", "resnet20", "resnet56", "resnet18", "wrn_40_2", "vgg8",
              "mobilenet_v2", "char_transformer", "audio_m5")


@pytest.mark.parametrize("name", BF16_CASES)
def test_bfloat16_compute_in_every_family(name):
  """dtype=bfloat16 (the engine's compute_dtype): parameters and BatchNorm statistics float32,
  the vector fed to the head computed in bf16, the logits float32."""
  num_classes, x_shape, x_dtype, kw, _, _ = SHAPE_CASES[name]
  variables, logits, features = _abstract(name, num_classes, x_shape, x_dtype,
                                          dtype=jnp.bfloat16, **kw)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype("float32")}
  assert logits.dtype == jnp.float32
  assert features["pre_logits"].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------
# Features and class activation maps on actual numbers.

@pytest.fixture(scope="module")
def resnet8_run():
  """resnet8 after one train-mode step (non-trivial BN statistics), then run in eval mode."""
  model = models.get("resnet8", **RESNET8)
  x = _data(1, RESNET8_X)
  variables = _init(model, x)
  _, state = _run(model, variables, 2.0 * x + 1.0, train=True, mutable=["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": state["batch_stats"]}
  logits, features, _ = jax.jit(
      lambda v, x: models.apply_with_features(model, v, x))(variables, x)
  return model, variables, x, np.asarray(logits), jax.tree.map(np.asarray, features)


def test_features_match_the_forward_pass(resnet8_run):
  _, variables, _, logits, features = resnet8_run
  assert features["stem"].shape == (4, 8, 8, 8)            # width 0.5: 8, 8, 16, 32 channels
  assert features["block1"].shape == (4, 8, 8, 8)
  assert features["block2"].shape == (4, 4, 4, 16)
  assert features["block3"].shape == (4, 2, 2, 32)
  np.testing.assert_array_equal(features["cam"], features["block3"])
  assert (features["block3"] >= 0).all()                 # post-ReLU, as RepDistiller's f3
  np.testing.assert_allclose(features["pre_logits"], features["cam"].mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  w = np.asarray(variables["params"]["head"]["kernel"])
  b = np.asarray(variables["params"]["head"]["bias"])
  np.testing.assert_allclose(logits, features["pre_logits"] @ w + b, rtol=1e-5, atol=1e-5)


def test_cam_equals_einsum_and_averages_to_logit_minus_bias(resnet8_run):
  model, variables, x, logits, features = resnet8_run
  classes = np.array([0, 4, 2, 2])
  cam = np.asarray(jax.jit(lambda v, x, c: models.class_activation_map(model, v, x, c))(
      variables, x, classes))
  w = np.asarray(variables["params"]["head"]["kernel"])
  b = np.asarray(variables["params"]["head"]["bias"])
  expected = np.einsum("bhwk,kb->bhw", features["cam"], w[:, classes])
  assert cam.shape == (4, 2, 2)
  np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-5)
  # Zhou et al. 2016: for GAP + Dense, mean_{h,w} CAM_c = logit_c - b_c.
  rows = np.arange(4)
  np.testing.assert_allclose(cam.mean(axis=(1, 2)), logits[rows, classes] - b[classes],
                             rtol=1e-5, atol=1e-5)


def test_cam_errors():
  mlp = models.get("mlp", **MLP)
  x = _data(4, (8, 10))
  variables = _init(mlp, x)
  with pytest.raises(ValueError, match="no spatial feature map"):
    models.class_activation_map(mlp, variables, x, jnp.zeros(8, jnp.int32))
  with pytest.raises(ValueError, match="classes must lie in"):
    models.cam_from_features(np.ones((2, 3, 3, 4)), np.ones((4, 5)), np.array([0, 5]))
  with pytest.raises(ValueError, match="batch shape"):
    models.cam_from_features(np.ones((2, 3, 3, 4)), np.ones((4, 5)), np.array([0, 1, 2]))


def test_batchnorm_running_mean_uses_pytorch_momentum():
  # Train mode updates mean_run <- 0.9 mean_run + 0.1 mean(batch) (PyTorch's momentum=0.1); the
  # stem BN sees conv3x3(x), computed here in numpy.
  model = models.get("resnet8", **RESNET8)
  x = _data(2, RESNET8_X)
  variables = _init(model, x)
  _, state = _run(model, variables, x, train=True, mutable=["batch_stats"])
  kernel = np.asarray(variables["params"]["stem_conv"]["kernel"])       # [3, 3, 3, 8]
  conv = _np_conv(x, kernel, np.zeros(8), stride=1)
  np.testing.assert_allclose(state["batch_stats"]["stem_bn"]["mean"],
                             0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["stem_bn"]["var"],
                             0.9 + 0.1 * conv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Replicas: jit + vmap over two replicas equals two separate runs.

def _stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def test_vmap_two_replicas_keep_their_own_batch_stats():
  model = models.get("resnet8", **RESNET8)
  xs = _data(3, (2,) + RESNET8_X) * np.array([1.0, 3.0], np.float32)[:, None, None, None, None]
  per_replica = [_init(model, xs[0], seed) for seed in (0, 1)]

  def train_apply(v, x):
    return model.apply(v, x, train=True, mutable=["batch_stats"])

  logits, state = jax.jit(jax.vmap(train_apply))(_stack(per_replica), xs)
  for r in range(2):
    ref_logits, ref_state = _run(model, per_replica[r], xs[r], train=True,
                                 mutable=["batch_stats"])
    np.testing.assert_allclose(logits[r], ref_logits, rtol=2e-4, atol=2e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[r], b, rtol=2e-4, atol=2e-5),
                 state["batch_stats"], ref_state["batch_stats"])
  # The replicas' statistics are their own (different inputs, different values).
  means = state["batch_stats"]["stem_bn"]["mean"]
  assert not np.allclose(means[0], means[1])


def test_dropout_key_comes_from_each_replica_stream():
  model = models.get("mlp", **MLP)
  x = _data(4, (8, 10))
  variables = _init(model, x)
  keys = jax.random.split(jax.random.key(7), 2)   # threefry: the engine's per-replica streams

  def train_apply(key):
    return model.apply(variables, x, train=True, rngs={"dropout": key})

  batched = jax.jit(jax.vmap(train_apply))(keys)
  for r in range(2):
    np.testing.assert_allclose(batched[r], _run(model, variables, x, train=True,
                                                rngs={"dropout": keys[r]}), rtol=1e-5, atol=1e-6)
  assert not np.allclose(batched[0], batched[1])
  eval_logits = _run(model, variables, x, train=False)
  np.testing.assert_allclose(eval_logits, _run(model, variables, x, train=False,
                                               rngs={"dropout": keys[0]}))


# ----------------------------------------------------------------------------------------------
# Small models against numpy re-implementations.

def _np_conv(x, kernel, bias, stride):
  """3x3 conv with padding 1 (PyTorch's padding=1), NHWC, kernel [3, 3, Cin, Cout]."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1], x.shape[2]
  oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, kernel.shape[-1]))
  for i in range(3):
    for j in range(3):
      patch = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out += patch @ kernel[i, j]
  return out + bias


def test_cnn_matches_numpy():
  model = models.get("cnn", num_classes=5)
  x = np.abs(_data(5, (8, 8, 8, 1)))
  variables = _init(model, x)
  p = jax.tree.map(np.asarray, variables["params"])
  h = x
  for name, stride in (("stem", 1), ("block1", 2), ("block2", 1)):
    h = np.maximum(_np_conv(h, p[f"{name}_conv"]["kernel"], p[f"{name}_conv"]["bias"], stride), 0)
  expected = h.mean(axis=(1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(_run(model, variables, x, train=False), expected,
                             rtol=1e-4, atol=1e-5)


def test_cnn1d_matches_numpy_and_the_papers_sizes():
  """MNIST-1D's ConvBase in numpy: Conv1d(k, stride 2, padding 1) + ReLU x3, flatten, linear."""
  model = models.get("cnn1d", num_classes=10)
  x = _data(7, (3, 40))
  variables = _init(model, x)
  p = jax.tree.map(np.asarray, variables["params"])
  h = x[..., None].astype(np.float64)
  lengths = []
  for name in ("stem", "block1", "block2"):
    kernel, bias = p[f"{name}_conv"]["kernel"], p[f"{name}_conv"]["bias"]  # [k, Cin, Cout]
    k = kernel.shape[0]
    hp = np.pad(h, ((0, 0), (1, 1), (0, 0)))
    out_len = (h.shape[1] + 2 - k) // 2 + 1  # PyTorch's Conv1d length formula
    h = np.stack([np.einsum("bkc,kcd->bd", hp[:, 2 * t:2 * t + k], kernel) + bias
                  for t in range(out_len)], axis=1)
    h = np.maximum(h, 0)
    lengths.append(out_len)
  assert lengths == [19, 10, 5]
  expected = h.reshape(3, -1) @ p["head"]["kernel"] + p["head"]["bias"]
  assert p["head"]["kernel"].shape == (125, 10)  # the paper's linear_in = 125
  np.testing.assert_allclose(_run(model, variables, x, train=False), expected,
                             rtol=1e-4, atol=1e-5)
  # [B, L, 1] gives the same logits as [B, L].
  np.testing.assert_allclose(_run(model, variables, x[..., None], train=False), expected,
                             rtol=1e-4, atol=1e-5)
  # Parameters of ConvBase(channels=25): 25*5+25 + 2*(25*25*3+25) + 125*10+10.
  assert models.num_params(model, x) == 150 + 2 * 1900 + 1260


def test_mlp_matches_numpy():
  model = models.get("mlp", num_classes=4, hidden=(7, 5), width=2.0)
  x = _data(6, (3, 2, 3))
  variables = _init(model, x)
  p = jax.tree.map(np.asarray, variables["params"])
  h = x.reshape(3, -1)
  assert p["dense1"]["kernel"].shape == (6, 14) and p["dense2"]["kernel"].shape == (14, 10)
  for layer in ("dense1", "dense2"):
    h = np.maximum(h @ p[layer]["kernel"] + p[layer]["bias"], 0)
  np.testing.assert_allclose(_run(model, variables, x, train=False),
                             h @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-5, atol=1e-6)


def test_linear_logits_and_cross_entropy_gradient_closed_form():
  # logits = X W + b; d mean CE / dW = X^T (P - Y) / B, d/db = mean(P - Y) (softmax regression).
  model = models.get("linear", num_classes=5)
  x = _data(8, (8, 2, 5))
  y = np.array([0, 2, 1, 1, 0, 4, 3, 3])
  variables = _init(model, x)
  w = np.asarray(variables["params"]["head"]["kernel"])
  b = np.asarray(variables["params"]["head"]["bias"])
  xf = x.reshape(8, -1)
  np.testing.assert_allclose(_run(model, variables, x, train=False), xf @ w + b, rtol=1e-5,
                             atol=1e-6)

  def loss(params):
    logits = model.apply({"params": params}, x, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  grads = jax.jit(jax.grad(loss))(variables["params"])
  z = xf @ w + b
  prob = np.exp(z - z.max(axis=1, keepdims=True))
  prob /= prob.sum(axis=1, keepdims=True)
  delta = (prob - np.eye(5)[y]) / 8
  np.testing.assert_allclose(grads["head"]["kernel"], xf.T @ delta, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads["head"]["bias"], delta.sum(axis=0), rtol=1e-4, atol=1e-6)
  no_bias = models.get("linear", num_classes=5, use_bias=False)
  variables = jax.eval_shape(lambda x: no_bias.init(_key(0), x, train=False), x)
  assert set(variables["params"]["head"]) == {"kernel"}


# ----------------------------------------------------------------------------------------------
# char_transformer behaviour.

def test_char_transformer_lm_is_causal():
  model = models.get("char_transformer", num_classes=11, **TINY_TRANSFORMER)
  tokens = np.random.default_rng(9).integers(0, 11, (4, 12))
  changed = tokens.copy()
  changed[:, 7:] = (changed[:, 7:] + 3) % 11
  variables = _init(model, tokens)
  a = _run(model, variables, tokens, train=False)
  b = _run(model, variables, changed, train=False)
  assert a.shape == (4, 12, 11)
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-6)
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_char_transformer_classify_pools_and_ignores_right_padding():
  tokens = np.array([[3, 5, 7, 2, 9]])
  padded = np.array([[3, 5, 7, 2, 9, 0, 0, 0]])
  variables = None
  for pool in ("mean", "last"):
    model = models.get("char_transformer", num_classes=4, task="classify", vocab_size=11,
                       pool=pool, pad_id=0, **TINY_TRANSFORMER)
    variables = variables or _init(model, padded)      # `pool` does not change the parameters
    run = jax.jit(lambda v, x, model=model: models.apply_with_features(model, v, x))
    logits, features, _ = run(variables, padded)
    ref_logits, ref_features, _ = run(variables, tokens)
    assert logits.shape == (1, 4)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # Independent pooling: LayerNorm (eps 1e-6) of the unpadded trunk output, then mean or last.
    block = np.asarray(ref_features["block1"])[0]                     # [5, 16]
    ln = variables["params"]["final_ln"]
    normed = (block - block.mean(-1, keepdims=True)) / np.sqrt(block.var(-1, keepdims=True)
                                                               + 1e-6)
    normed = normed * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
    expected = normed.mean(axis=0) if pool == "mean" else normed[-1]
    np.testing.assert_allclose(features["pre_logits"][0], expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Actual forward + backward passes: a few SGD steps on one batch lower the loss.

def _ce(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None],
                                       axis=-1))


TRAIN_CASES = {
    "cnn": (dict(), (8, 8, 8, 1), "float32", 5),
    "cnn1d": (dict(channels=6), (8, 40), "float32", 5),
    "resnet8": (dict(width=RESNET8["width"]), RESNET8_X, "float32", RESNET8["num_classes"]),
    "mlp": (dict(hidden=MLP["hidden"], dropout=MLP["dropout"]), (8, 10), "float32", 5),
    "linear": (dict(), (8, 2, 5), "float32", 5),
    "char_transformer": (TINY_TRANSFORMER, (4, 12), "int32", 11),
    "audio_m5": (dict(width=0.125), (4, 1100, 1), "float32", 5),
}


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_forward_backward_lowers_the_loss(name):
  kw, x_shape, x_dtype, num_classes = TRAIN_CASES[name]
  model = models.get(name, num_classes=num_classes, **kw)
  rng = np.random.default_rng(10)
  if x_dtype == "int32":
    x = rng.integers(0, num_classes, x_shape)
    labels = np.roll(x, -1, axis=1)                  # next-character targets
  else:
    x = _data(10, x_shape)
    labels = rng.integers(0, num_classes, x_shape[:1])
  variables = _init(model, x)
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  @jax.jit
  def step(params, state, key):
    def loss_fn(params):
      logits, new_state = model.apply({"params": params, **state}, x, train=True,
                                      mutable=list(state), rngs={"dropout": key})
      return _ce(logits, labels), new_state
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    return params, dict(new_state), loss, grads

  # One dropout key for every step: the objective is then a fixed function of the parameters
  # (train-mode BN normalises with the batch's own statistics), so its decrease is meaningful.
  key = jax.random.key(11)
  losses = []
  for _ in range(6):
    params, state, loss, grads = step(params, state, key)
    losses.append(float(loss))
    assert all(np.isfinite(g).all() and np.abs(g).sum() > 0
               for g in jax.tree_util.tree_leaves(grads))
  assert losses[-1] < losses[0]
  logits = _run(model, {"params": params, **state}, x, train=False)
  assert np.isfinite(np.asarray(logits)).all()
