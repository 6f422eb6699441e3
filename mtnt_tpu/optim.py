"""The optimizer: optax chain and learning-rate schedule from config.optim."""

from __future__ import annotations

import jax
import optax


def schedule(cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to peak * end ratio."""
  warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.end_learning_rate_ratio)


def _decay_mask(params):
  # Norm scales are not decayed: pulling them to 0 scales activations by 1.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, 'key', None) == 'scale' for k in path), params)


def make(cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(cfg, num_steps)
  if cfg.name == 'adamw':
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                      mask=_decay_mask)
  elif cfg.name == 'sgd':
    opt = optax.sgd(lr, momentum=cfg.momentum or None)
  else:
    raise ValueError(f"config.optim.name={cfg.name!r}: use 'adamw' or 'sgd'")
  # Always chained, an infinite norm when off: the optimizer state's tree
  # then does not depend on clip_norm, so a run resumes with another value.
  clip = optax.clip_by_global_norm(cfg.clip_norm or float('inf'))
  return optax.chain(clip, opt), lr
