"""kdjax.arms' loss weights and DKD warm-up, and their config keys, against numpy references.

The weights follow mdistiller's convention (CE_WEIGHT * CE + KD_WEIGHT * KD; the
logit-standardisation authors train CIFAR-100 with CE 0.1, KD 9 at T = 2); the DKD warm-up
follows mdistiller's `min(epoch / WARMUP, 1)` with WARMUP = 20 epochs. The references below are
written from those formulas, never from kdjax's output."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from scipy import special

from kdjax import arms as arms_lib
from kdjax import losses
from kdjax import replicas as replicas_lib
from kdjax import study as study_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.py")


def _np_kl(p, q):
  return special.rel_entr(p, q).sum(-1)


def _np_zscore(z):
  """The authors' normalize(): (z - mean) / (1e-7 + std), torch's std being Bessel-corrected."""
  return (z - z.mean(-1, keepdims=True)) / (1e-7 + z.std(-1, ddof=1, keepdims=True))


def _data(seed=0, n=10, c=6):
  rng = np.random.default_rng(seed)
  s = rng.normal(0, 3, (n, c)).astype(np.float32)
  t = rng.normal(0, 3, (n, c)).astype(np.float32)
  return s, t, rng.integers(0, c, n)


def _hp(alpha=0.3, temperature=2.0, *, weights=None, kd_start=0, kd_stop=100):
  ce_w, kd_w = weights or (0.0, 0.0)
  return arms_lib.ReplicaHParams(
      alpha=alpha, temperature=temperature, label_smoothing=0.0, kd_start=kd_start,
      kd_stop=kd_stop, teacher_slot=0, member_slots=np.zeros(1, np.int32),
      member_weights=np.ones(1, np.float32), ce_weight=ce_w, kd_weight=kd_w,
      fixed_weights=float(weights is not None))


def _config(**overrides):
  config = study_lib.load_config(DEFAULT)
  for key, value in overrides.items():
    node = config
    *path, last = key.split("__")
    for part in path:
      node = node[part]
    node[last] = value
  return config


# ---------------------------------------------------------------- losses with explicit weights


def test_standardized_kd_loss_is_the_logit_standardisation_authors_recipe():
  """CE on the raw student logits (weight 0.1) + 9 T^2 KL between z-scored logits at T = 2
  (sunshangquan/logit-standardization-KD, KD with logit_stand on CIFAR-100)."""
  s, t, y = _data()
  got = losses.standardized_kd_loss(s, t, y, temperature=2.0, ce_weight=0.1, kd_weight=9.0)
  ce = -special.log_softmax(s.astype(np.float64), -1)[np.arange(10), y]
  kl = _np_kl(special.softmax(_np_zscore(t.astype(np.float64)) / 2, -1),
              special.softmax(_np_zscore(s.astype(np.float64)) / 2, -1))
  np.testing.assert_allclose(got, 0.1 * ce + 9.0 * 4.0 * kl, rtol=1e-4, atol=1e-5)
  # the (1 - alpha, alpha) default
  got = losses.standardized_kd_loss(s, t, y, alpha=0.25, temperature=2.0)
  np.testing.assert_allclose(got, 0.75 * ce + 0.25 * 4.0 * kl, rtol=1e-4, atol=1e-5)


def test_kd_loss_independent_weights_are_mdistillers():
  s, t, y = _data(1)
  got = losses.kd_loss(s, t, y, temperature=4.0, ce_weight=0.1, kd_weight=0.9)
  ce = -special.log_softmax(s.astype(np.float64), -1)[np.arange(10), y]
  kl = _np_kl(special.softmax(t / 4.0, -1), special.softmax(s / 4.0, -1))
  np.testing.assert_allclose(got, 0.1 * ce + 0.9 * 16.0 * kl, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["kd", "standardized_kd"])
def test_arm_weights_replace_alpha_and_respect_the_kd_window(kind):
  s, t, y = _data(2)
  ce = -special.log_softmax(s.astype(np.float64), -1)[np.arange(10), y]
  if kind == "kd":
    kl = _np_kl(special.softmax(t / 2.0, -1), special.softmax(s / 2.0, -1))
  else:
    kl = _np_kl(special.softmax(_np_zscore(t) / 2, -1), special.softmax(_np_zscore(s) / 2, -1))
  options = arms_lib.LossOptions()
  fixed = _hp(weights=(0.1, 9.0), kd_start=5, kd_stop=10)
  inside = arms_lib.kind_loss(kind, s, t, y, fixed, 7, options)
  np.testing.assert_allclose(inside, 0.1 * ce + 9.0 * 4.0 * kl, rtol=1e-4, atol=1e-4)
  outside = arms_lib.kind_loss(kind, s, t, y, fixed, 2, options)  # teacher term off, CE keeps 0.1
  np.testing.assert_allclose(outside, 0.1 * ce, rtol=1e-4, atol=1e-5)
  # the default form: (1 - alpha) CE + alpha T^2 KL inside, CE alone outside
  default = _hp(alpha=0.3, kd_start=5, kd_stop=10)
  np.testing.assert_allclose(arms_lib.kind_loss(kind, s, t, y, default, 7, options),
                             0.7 * ce + 0.3 * 4.0 * kl, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(arms_lib.kind_loss(kind, s, t, y, default, 2, options), ce,
                             rtol=1e-4, atol=1e-5)


def test_replicas_carry_their_arms_weights():
  config = _config(arms="kd,standardized_kd,ats,siddo",
                   arm_options__ce_weight="standardized_kd=0.1,ats=0.5",
                   arm_options__kd_weight="standardized_kd=9,ats=0.5")
  study = study_lib.resolve(config)
  by_arm = {r.arm: r for r in study.students.replicas}
  assert (by_arm["kd"].ce_weight, by_arm["kd"].kd_weight) == (None, None)
  assert (by_arm["standardized_kd"].ce_weight, by_arm["standardized_kd"].kd_weight) == (0.1, 9.0)
  assert (by_arm["ats"].ce_weight, by_arm["ats"].kd_weight) == (0.5, 0.5)
  hp = replicas_lib.hparams(study.students.replicas)
  arms = [r.arm for r in study.students.replicas]
  fixed = np.asarray(hp.fixed_weights)
  assert all(fixed[i] == (a in ("standardized_kd", "ats")) for i, a in enumerate(arms))
  np.testing.assert_allclose(np.asarray(hp.kd_weight)[arms.index("standardized_kd")], 9.0)
  assert by_arm["standardized_kd"].to_json()["kd_weight"] == 9.0


@pytest.mark.parametrize("key,value,match", [
    ("ce_weight", "nosuch=0.1", r"--config.arm_options.ce_weight: .*ARM one of kd, rcd"),
    ("ce_weight", "siddo=0.1", r"--config.arm_options.ce_weight: .*got 'siddo=0.1'"),
    ("kd_weight", "ats=-1", r"--config.arm_options.kd_weight: .*WEIGHT a number >= 0"),
    ("kd_weight", "ats=0.5,ats=1", r"--config.arm_options.kd_weight: .*lists ats twice"),
    ("kd_weight", "ats=0.5", r"--config.arm_options.kd_weight: must give a weight for every arm "
                             r"that arm_options.ce_weight lists .*missing isats"),
    ("ats_student_temperature", 0.0, r"--config.arm_options.ats_student_temperature: .*\(0, inf"),
    ("dkd_warmup_epochs", -1.0, r"--config.arm_options.dkd_warmup_epochs: .*\[0, inf"),
])
def test_bad_arm_options_are_one_clear_line(key, value, match):
  config = _config(**{f"arm_options__{key}": value})
  with pytest.raises(study_lib.ConfigError, match=match) as info:
    study_lib.resolve(config)
  assert "\n" not in str(info.value)


# ---------------------------------------------------------------- DKD warm-up


def test_dkd_warmup_is_in_epochs_and_follows_mdistiller():
  """Default 20 epochs, converted to steps; the DKD factor rises linearly to 1 at the end of
  epoch 20 (mdistiller's factor in epoch e is e / 20: kdjax's ramp reaches it at the end of
  epoch e)."""
  config = _config(arms="dkd", num_epochs=30)
  study = study_lib.resolve(config)
  spe = study.students.steps_per_epoch
  assert study.loss_options.dkd_warmup_steps == 20 * spe
  s, t, y = _data(3)
  options = study.loss_options
  hp = _hp(temperature=4.0, kd_stop=10**9)
  ce = -special.log_softmax(s.astype(np.float64), -1)[np.arange(10), y]
  dkd = np.asarray(losses.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0))
  for epoch in (1, 5, 20, 25):
    step = epoch * spe - 1  # the last step of the epoch
    got = arms_lib.kind_loss("dkd", s, t, y, hp, step, options)
    np.testing.assert_allclose(got, ce + min(epoch / 20, 1.0) * dkd, rtol=1e-4, atol=1e-4)
  half = _config(arms="dkd", arm_options__dkd_warmup_epochs=0.5)
  assert study_lib.resolve(half).loss_options.dkd_warmup_steps == round(0.5 * spe)


def test_configs_written_before_the_epoch_key_keep_their_steps():
  config = _config(arms="dkd")
  del config.arm_options["dkd_warmup_epochs"]
  config.arm_options.dkd_warmup_steps = 7
  assert study_lib.resolve(config).loss_options.dkd_warmup_steps == 7


def test_every_kind_is_differentiable_with_fixed_weights():
  s, t, y = _data(4)
  options = arms_lib.LossOptions()
  relations = np.full((6, 6), 1 / 6, np.float32)
  for kind in ("kd", "standardized_kd", "ats", "isats", "fgcr", "dkd"):
    grad = jax.grad(lambda s, k=kind: arms_lib.kind_loss(
        k, s, t, y, _hp(weights=(0.2, 3.0)), 0, options, class_relations=relations).sum())(s)
    assert np.all(np.isfinite(grad)), kind


def test_every_arm_names_a_recorded_signal_and_loss_kind_and_options_have_one_home():
  """Each arm's teacher signal and loss kind are records; every LossOptions field is read by a
  loss kind or teacher signal that lists it, except the teachers' loss (study-wide)."""
  import dataclasses as dc
  for arm in arms_lib.ARMS.values():
    assert arm.teacher_signal in arms_lib.TEACHER_SIGNALS, arm
    assert arm.loss in arms_lib.LOSS_KINDS, arm
  claimed = {o for kind in arms_lib.LOSS_KINDS.values() for o in kind.options}
  claimed |= {o for signal in arms_lib.TEACHER_SIGNALS.values() for o in signal.options}
  fields = {f.name for f in dc.fields(arms_lib.LossOptions)}
  assert claimed <= fields
  assert fields - claimed == {"teacher_loss"}
  assert arms_lib.needs(["kd", "fgcr", "feature_hint"]) == {"class_relations", "features"}
  assert arms_lib.needs(["ce", "kd"]) == frozenset()


@pytest.mark.parametrize("overrides,key,words", [
    (dict(arms="attention_transfer", arm_options__at_features="block1,bogus"),
     "arm_options.at_features", ["bogus", "the features"]),
    (dict(arms="kd_calibrated"), "val_fraction", ["kd_calibrated", "> 0"]),
    (dict(arms="kd", val_fraction=0.6), "val_fraction", ["0.5"]),
    (dict(arms="mutual", num_seeds=3), "num_seeds", ["mutual_cohort=2"]),
    (dict(arms="mutual", num_seeds=4, arm_options__mutual_cohort=1),
     "arm_options.mutual_cohort", [">= 2"]),
])
def test_issue16_arms_refuse_what_they_cannot_run(overrides, key, words):
  with pytest.raises(study_lib.ConfigError) as info:
    study_lib.resolve(_config(**overrides))
  assert info.value.key == key and "\n" not in str(info.value)
  for w in words:
    assert w in str(info.value), str(info.value)


def test_validation_split_is_carved_from_train_the_same_for_every_run():
  """val_fraction 0.1 of digits' 1198 training examples: 120 held out by the documented fixed
  permutation (numpy RandomState(0)), the rest trains; the eval split is untouched."""
  study = study_lib.load_data(study_lib.resolve(_config(arms="kd_calibrated,kd",
                                                        val_fraction=0.1)))
  full = study_lib.load_data(study_lib.resolve(_config(arms="kd")))
  assert (study.num_val, study.num_train) == (120, 1078) and full.num_train == 1198
  held = np.sort(np.random.RandomState(0).permutation(1198)[:120])
  rest = np.setdiff1d(np.arange(1198), held)
  for key in ("image", "label"):
    np.testing.assert_array_equal(study.data["val"][key], full.data["train"][key][held])
    np.testing.assert_array_equal(study.data["train"][key], full.data["train"][key][rest])
    np.testing.assert_array_equal(study.data["test"][key], full.data["test"][key])
  assert study.students.steps_per_epoch == -(-1078 // study.run.batch_size)


def _kind_inputs(kind_name, seed=5):
  """Inputs every kind can run on: logits, labels, features, relations, a mask, theta."""
  s, t, y = _data(seed, n=8, c=6)
  rng = np.random.default_rng(seed)
  features = {n: rng.normal(size=(8, 4, 4, 3)).astype(np.float32) for n in ("block1", "block2")}
  return arms_lib.LossInputs(
      student_logits=s, labels=y, teacher_logits=t, student_features=features,
      teacher_features={n: f[::-1] for n, f in features.items()},
      class_relations=np.full((6, 6), 1 / 6, np.float32), mask=np.ones(8, np.float32),
      learned_temperature=np.float32(0.3))


@pytest.mark.parametrize("kind", sorted(arms_lib.LOSS_KINDS))
def test_a_kinds_grid_names_exactly_the_study_axes_its_loss_reads(kind):
  """Changing hp.alpha (alpha form, no fixed weights) or hp.temperature changes a kind's loss
  exactly when its record's `grid` names that axis, which is what the replica table expands."""
  options = arms_lib.LossOptions(known_classes=(0, 1, 2), ctkd_steps_per_epoch=10)
  inputs = _kind_inputs(kind)
  loss = lambda hp: np.asarray(arms_lib.LOSS_KINDS[kind].loss(inputs, hp, 3, options))
  base = loss(_hp(alpha=0.3, temperature=2.0))
  for axis, changed in (("alpha", _hp(alpha=0.7, temperature=2.0)),
                        ("temperature", _hp(alpha=0.3, temperature=5.0))):
    reads = not np.allclose(loss(changed), base, rtol=1e-6, atol=1e-7)
    assert reads == (axis in arms_lib.LOSS_KINDS[kind].grid), (kind, axis)


def test_a_grid_expands_each_arm_only_over_the_axes_its_loss_reads():
  """alpha x temperature = 3 x 2 points: kd trains 6, ats (the default config's fixed weights)
  and nkd and mutual 1, dkd 2 (temperature only), ats without fixed weights 3 (alpha only);
  arms trained once carry the grids' first values."""
  config = _config(arms="kd,ats,nkd,dkd,mutual", alpha="0.1,0.5,0.9", temperature="1,4",
                   num_seeds=2)
  rows = study_lib.resolve(config).students.replicas
  points = lambda arm: sorted({(r.alpha, r.temperature) for r in rows if r.arm == arm})
  assert len(points("kd")) == 6 and points("dkd") == [(0.1, 1.0), (0.1, 4.0)]
  for arm in ("ats", "nkd", "mutual"):
    assert points(arm) == [(0.1, 1.0)], arm
  unweighted = _config(arms="ats", alpha="0.1,0.5,0.9", temperature="1,4", num_seeds=2,
                       arm_options__ce_weight="", arm_options__kd_weight="")
  assert sorted({r.alpha for r in study_lib.resolve(unweighted).students.replicas}) == \
      [0.1, 0.5, 0.9]
