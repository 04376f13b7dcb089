"""Optimisers and learning-rate schedules from a config, with a per-replica learning rate.

The learning rate is an `optax.inject_hyperparams` hyperparameter: it lives in the optimiser
state (`opt_state.hyperparams['learning_rate']`), so every replica of a stacked train state
carries its own base value and a learning-rate grid becomes replicas of one program. The
schedule's shape (cosine, step decay, warm-up) is shared and multiplies the base value:

  lr_r(step) = base_lr_r * shape(step).

Config (`config.optimizer`):
  name            'sgd' (momentum, optional Nesterov, coupled L2 weight decay as in PyTorch's SGD,
                  the KD literature's setting) | 'adamw' (decoupled weight decay)
  learning_rate   one base value or a grid; each replica's value is injected (kdjax.replicas)
  momentum, nesterov, weight_decay
  schedule        'constant' | 'cosine' (to 0) | 'step' (x decay_factor at each fraction of
                  training in decay_boundaries, e.g. (0.5, 0.75))
  warmup_steps    linear warm-up from 0 (cosine and constant)
  grad_clip_norm  clip by global norm when > 0
"""

from __future__ import annotations

import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def schedule_shape(opt_config, total_steps: int) -> optax.Schedule:
  """The multiplier of the base learning rate over training, in [0, 1]."""
  warmup = int(opt_config.get("warmup_steps", 0))
  name = opt_config.schedule
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else 1.0, 1.0, warmup,
                                              max(total_steps, warmup + 1), 0.0)
  if name == "step":
    boundaries: dict[int, float] = {}
    for f in opt_config.decay_boundaries:  # boundaries that round to one step multiply
      step = int(round(f * total_steps))
      boundaries[step] = boundaries.get(step, 1.0) * float(opt_config.decay_factor)
    return optax.piecewise_constant_schedule(1.0, boundaries)
  if warmup:
    return optax.linear_schedule(0.0, 1.0, warmup)
  return optax.constant_schedule(1.0)


def make_optimizer(opt_config, total_steps: int, learning_rate: float
                   ) -> optax.GradientTransformation:
  """An optax optimiser whose base learning rate is an injected (per-replica) hyperparameter,
  initially `learning_rate` (`set_learning_rate` gives each replica its own)."""
  shape = schedule_shape(opt_config, total_steps)
  clip = float(opt_config.get("grad_clip_norm", 0.0))

  def factory(learning_rate):
    def lr(count):
      return learning_rate * shape(count)

    if opt_config.name == "adamw":
      core = optax.adamw(lr, weight_decay=float(opt_config.weight_decay))
    else:
      core = optax.chain(optax.add_decayed_weights(float(opt_config.weight_decay)),
                         optax.sgd(lr, momentum=float(opt_config.momentum) or None,
                                   nesterov=bool(opt_config.nesterov)))
    return optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core

  return optax.inject_hyperparams(factory)(learning_rate=float(learning_rate))


def set_learning_rate(opt_state, learning_rate):
  """The optimiser state with its injected base learning rate replaced (per replica under vmap)."""
  hyperparams = dict(opt_state.hyperparams)
  hyperparams["learning_rate"] = learning_rate
  return opt_state._replace(hyperparams=hyperparams)


def learning_rate(opt_state):
  """The injected base learning rate of an optimiser state."""
  return opt_state.hyperparams["learning_rate"]
