"""The optimizer: optax chain and learning-rate schedule from config.optim, and
which parameters it trains (config.train.freeze)."""

from __future__ import annotations

import dataclasses
import re

import flax
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


@dataclasses.dataclass(frozen=True)
class Freeze:
  """Parameters whose path ('embedder/input_embedding', 'layer_3/attn/q_einsum/w')
  matches any of `patterns` (regexes, searched) are held fixed: no gradient is
  computed for them, the optimizer keeps no state for them, and they never change.

  Freezing Gemma's tied embedding skips its weight gradient (a [tokens, vocab]
  x [tokens, width] matmul) and its Adam update, most of a step for Gemma 3 270M.
  """
  patterns: tuple[str, ...] = ()

  @classmethod
  def from_config(cls, text: str) -> 'Freeze':
    patterns = tuple(p.strip() for p in text.split(',') if p.strip())
    for p in patterns:
      try:
        re.compile(p)
      except re.error as e:
        raise ValueError(f'config.train.freeze: {p!r} is not a regex ({e}); use e.g. '
                         "'embedder/' or 'layer_(0|1)/'") from e
    return cls(patterns)

  def __bool__(self) -> bool:
    return bool(self.patterns)

  def is_frozen(self, path: str) -> bool:
    return any(re.search(p, path) for p in self.patterns)

  def split(self, params: dict) -> tuple[dict, dict]:
    """(trainable, fixed): two nested dicts whose merge is `params`."""
    flat = flax.traverse_util.flatten_dict(params, sep='/')
    fixed = {k: v for k, v in flat.items() if self.is_frozen(k)}
    trainable = {k: v for k, v in flat.items() if k not in fixed}
    unflat = lambda d: flax.traverse_util.unflatten_dict(d, sep='/')
    return unflat(trainable), unflat(fixed)

  @staticmethod
  def merge(trainable: dict, fixed: dict) -> dict:
    flat = flax.traverse_util.flatten_dict(trainable, sep='/')
    flat.update(flax.traverse_util.flatten_dict(fixed, sep='/'))
    return flax.traverse_util.unflatten_dict(flat, sep='/')

  def count(self, params) -> int:
    """How many parameter values `params` holds frozen."""
    return sum(x.size for x in jax.tree.leaves(self.split(params)[1])) if self else 0

  def check(self, params) -> None:
    """Every pattern must freeze something, and something must stay trainable."""
    paths = list(flax.traverse_util.flatten_dict(params, sep='/'))
    for p in self.patterns:
      if not any(re.search(p, path) for path in paths):
        raise ValueError(f'config.train.freeze: {p!r} matches no parameter (paths look '
                         f'like {paths[0]!r}, {paths[-1]!r})')
    if paths and all(self.is_frozen(path) for path in paths):
      raise ValueError(f'config.train.freeze={",".join(self.patterns)!r} freezes every '
                       'parameter; nothing would train')


def make(cfg, num_steps: int, freeze: Freeze = Freeze()
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and its schedule.

  With `freeze`, `init` takes the whole parameter tree (as a fresh or restored
  state has it) and keeps state for the trainable part only; `update` takes
  the trainable part's gradients and parameters (steps.train_step splits them).
  """
  opt, lr = _make(cfg, num_steps)
  if not freeze:
    return opt, lr
  return optax.GradientTransformation(lambda params: opt.init(freeze.split(params)[0]),
                                      opt.update), lr


def _make(cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
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
