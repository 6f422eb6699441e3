"""Pure train and eval steps: masked next-token loss over every example. No I/O.

The loss is summed over every target token of every example in the batch, not
only the first row's, and divided by the number of target tokens. With
gradient accumulation the division is by the whole batch's count, so
accumulating never changes the result.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mtnt_tpu import lora as lora_lib
from mtnt_tpu import model as model_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: Any
  opt_state: Any


def token_sums(model, params, batch: dict, compute_dtype) -> dict[str, jax.Array]:
  """Loss and counts summed over the batch's target tokens, each []."""
  params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
  logits_BLV = model_lib.forward(model, params, batch['inputs'], batch['positions'],
                                 batch['segment_ids'])
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32))
  nll_BL = -jnp.take_along_axis(logp_BLV, batch['targets'][..., None], axis=-1)[..., 0]
  mask_BL = batch['mask'].astype(jnp.float32)
  correct_BL = (jnp.argmax(logits_BLV, axis=-1) == batch['targets']).astype(jnp.float32)
  return {
      'loss_sum': jnp.sum(nll_BL * mask_BL),
      'correct': jnp.sum(correct_BL * mask_BL),
      'target_tokens': jnp.sum(mask_BL),
      'real_tokens': jnp.sum((batch['segment_ids'] > 0).astype(jnp.float32)),
  }


def _grads_and_sums(model, params, frozen, batch, compute_dtype, accum_steps: int):
  def f(p, b):
    # LoRA: gradients reach only the adapters; the frozen base joins here.
    full = lora_lib.merge(frozen, p) if frozen else p
    sums = token_sums(model, full, b, compute_dtype)
    return sums['loss_sum'], sums

  grad_fn = jax.grad(f, has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, batch)

  # Row r goes to micro-batch r % A: each device keeps its own rows.
  micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
      batch)

  def body(carry, mb):
    g_acc, s_acc = carry
    g, s = grad_fn(params, mb)
    return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

  zeros_g = jax.tree.map(jnp.zeros_like, params)
  zeros_s = jax.eval_shape(lambda: f(params, jax.tree.map(lambda x: x[0], micro))[1])
  zeros_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros_s)
  (g, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), micro)
  return g, sums


def train_step(state: TrainState, batch: dict, frozen=None, *, model,
               optimizer: optax.GradientTransformation, compute_dtype=jnp.float32,
               accum_steps: int = 1) -> tuple[TrainState, dict]:
  """One optimizer step. `frozen`: the LoRA base weights (empty or None otherwise)."""
  grads_sum, sums = _grads_and_sums(model, state.params, frozen, batch, compute_dtype,
                                    accum_steps)
  n = jnp.maximum(sums['target_tokens'], 1.0)
  grads = jax.tree.map(lambda g: g / n, grads_sum)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': sums['loss_sum'] / n,
      'accuracy': sums['correct'] / n,
      'grad_norm': optax.tree.norm(grads),
      'target_tokens': sums['target_tokens'],
      'real_tokens': sums['real_tokens'],
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, model, compute_dtype=jnp.float32) -> dict:
  """Sums, not means: the caller adds them over the whole split, then divides."""
  return token_sums(model, params, batch, compute_dtype)
