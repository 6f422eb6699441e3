"""Pure train and eval steps: masked next-token loss over every example. No I/O.

The loss is summed over every target token of every example in the batch, not
only the first row's, and divided by the number of target tokens. With
gradient accumulation the division is by the whole batch's count, so
accumulating never changes the result.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mtnt_tpu import lora as lora_lib
from mtnt_tpu import model as model_lib
from mtnt_tpu import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: Any
  opt_state: Any


def token_sums(model, params, batch: dict, compute_dtype, loss_chunk: int = 0,
               loss_positions: float = 0.0) -> dict[str, jax.Array]:
  """Loss and counts summed over the batch's target tokens, each [].

  `loss_chunk` (config.model.loss_chunk) > 0: the logits are formed this many
  tokens (of the global batch) at a time, never all [B, L, V] at once, with the
  same sums and gradients; 0 computes them whole, as gemma's Transformer does.
  `loss_positions` (config.model.loss_positions, with loss_chunk) > 0: they are
  formed only where a target is (see `target_sums`).
  """
  # The unembedding's gradient accumulates over chunks in the master dtype.
  table_VD = params['embedder']['input_embedding']
  params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
  args = (model, params, batch['inputs'], batch['positions'], batch['segment_ids'])
  mask_BL = batch['mask'].astype(jnp.float32)
  if loss_chunk:
    sums = functools.partial(chunked_sums, model_lib.network_config(model), compute_dtype,
                             loss_chunk)
    x_BLD = model_lib.hidden_states(*args)
    if loss_positions:
      loss_sum, correct = target_sums(sums, loss_positions, x_BLD, table_VD, batch['targets'],
                                      mask_BL)
    else:
      loss_sum, correct = sums(x_BLD, table_VD, batch['targets'], mask_BL)
  else:
    loss_sum, correct = _logit_sums(model_lib.forward(*args), batch['targets'], mask_BL)
  return {
      'loss_sum': loss_sum,
      'correct': correct,
      'target_tokens': jnp.sum(mask_BL),
      'real_tokens': jnp.sum((batch['segment_ids'] > 0).astype(jnp.float32)),
  }


def _logit_sums(logits_TV, targets_T, mask_T) -> tuple[jax.Array, jax.Array]:
  """(summed masked negative log-likelihood, correct argmax count), over any leading dims."""
  logp_TV = jax.nn.log_softmax(logits_TV.astype(jnp.float32))
  nll_T = -jnp.take_along_axis(logp_TV, targets_T[..., None], axis=-1)[..., 0]
  correct_T = (jnp.argmax(logits_TV, axis=-1) == targets_T).astype(jnp.float32)
  return jnp.sum(nll_T * mask_T), jnp.sum(correct_T * mask_T)


def target_capacity(length: int, loss_positions: float) -> int:
  """Positions per row that get logits: the fraction, rounded up to a multiple of 8."""
  return min(length, -(-int(math.ceil(loss_positions * length)) // 8) * 8)


def target_sums(sums, loss_positions: float, x_BLD, table_VD, targets_BL, mask_BL):
  """`sums` over only the positions of each row that hold a target.

  Only targets need logits, and in a translation example the prompt (the
  instruction and the source) is about half the tokens: each row's target
  positions are gathered, in order, into K = `target_capacity` slots, and the
  logits formed there alone. A batch with a row of more than K targets takes
  every position instead (`lax.cond` runs one branch), so the sums are always
  exactly those of every position. Rows stay whole, so the batch's sharding holds.
  """
  B, L, _ = x_BLD.shape
  K = target_capacity(L, loss_positions)
  # A stable sort on "not a target" puts a row's targets first, in position order.
  order_BK = jnp.argsort(mask_BL == 0, axis=-1, stable=True)[:, :K]
  take = lambda a_BL: jnp.take_along_axis(a_BL, order_BK, axis=1)
  fits = jnp.all(jnp.sum(mask_BL, axis=-1) <= K)
  return jax.lax.cond(
      fits,
      lambda: sums(jnp.take_along_axis(x_BLD, order_BK[..., None], axis=1), table_VD,
                   take(targets_BL), take(mask_BL)),
      lambda: sums(x_BLD, table_VD, targets_BL, mask_BL))


def num_loss_chunks(batch: int, length: int, loss_chunk: int) -> int:
  """The fewest chunks, a divisor of `length`, holding <= loss_chunk tokens each."""
  for n in range(1, length + 1):
    if length % n == 0 and batch * (length // n) <= loss_chunk:
      return n
  return length  # one position of every row per chunk: the finest this split goes


def chunked_sums(cfg, compute_dtype, loss_chunk: int, x_BLD, table_VD, targets_BL, mask_BL):
  """`_logit_sums` of the logits of `x_BLD`, formed one chunk of tokens at a time.

  Chunk j holds positions j, j + n, j + 2n, ... of every row, so each keeps
  the batch's sharding. The forward pass also forms each chunk's gradient
  (the loss is a plain sum, so its cotangent only scales it): the backward
  pass needs neither the logits nor a second pass over them.
  """
  B, L, D = x_BLD.shape
  n = num_loss_chunks(B, L, loss_chunk)

  def split(a):  # [B, L, ...] -> [n, B * L / n, ...]
    a = a.reshape(B, L // n, n, *a.shape[2:])
    return jnp.moveaxis(a, 2, 0).reshape(n, B * (L // n), *a.shape[3:])

  def chunk(x_CD, w_VD, t_C, m_C):
    return _logit_sums(model_lib.output_logits(cfg, w_VD.astype(compute_dtype), x_CD), t_C, m_C)

  # Made inside each function, not closed over: a custom_vjp must not capture
  # a tracer of an enclosing trace (target_sums calls this under lax.cond).
  zero = lambda: jnp.zeros((), jnp.float32)

  @jax.custom_vjp
  def sums(x_nCD, w_VD, t_nC, m_nC):
    def body(acc, xs):
      loss, correct = chunk(xs[0], w_VD, *xs[1:])
      return (acc[0] + loss, acc[1] + correct), None
    return jax.lax.scan(body, (zero(), zero()), (x_nCD, t_nC, m_nC))[0]

  def sums_fwd(x_nCD, w_VD, t_nC, m_nC):
    # A frozen table (config.train.freeze) is not perturbed: its [V, D]
    # gradient, a third of the unembedding's work, is then never formed.
    table_grad = w_VD.perturbed
    x_nCD, w_VD, t_nC, m_nC = x_nCD.value, w_VD.value, t_nC.value, m_nC.value

    def body(acc, xs):
      x_CD, t_C, m_C = xs
      if table_grad:
        loss, pullback, correct = jax.vjp(lambda x, w: chunk(x, w, t_C, m_C), x_CD, w_VD,
                                          has_aux=True)
        dx_CD, dw_VD = pullback(jnp.ones_like(loss))
        return (acc[0] + loss, acc[1] + correct, acc[2] + dw_VD), dx_CD
      loss, pullback, correct = jax.vjp(lambda x: chunk(x, w_VD, t_C, m_C), x_CD,
                                        has_aux=True)
      (dx_CD,) = pullback(jnp.ones_like(loss))
      return (acc[0] + loss, acc[1] + correct, acc[2]), dx_CD
    dw0 = jnp.zeros_like(w_VD) if table_grad else zero()
    (loss, correct, dw_VD), dx_nCD = jax.lax.scan(body, (zero(), zero(), dw0),
                                                  (x_nCD, t_nC, m_nC))
    return (loss, correct), (dx_nCD, dw_VD if table_grad else None)

  def sums_bwd(res, cotangents):
    dx_nCD, dw_VD = res
    g = cotangents[0]  # the correct count has no gradient
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
      return None, None, None, None
    return (dx_nCD * g.astype(dx_nCD.dtype),
            None if dw_VD is None else dw_VD * g.astype(dw_VD.dtype), None, None)

  sums.defvjp(sums_fwd, sums_bwd, symbolic_zeros=True)
  return sums(split(x_BLD), table_VD, split(targets_BL), split(mask_BL))


def _grads_and_sums(model, params, frozen, batch, compute_dtype, accum_steps: int,
                    loss_chunk: int, loss_positions: float):
  def f(p, b):
    # Gradients reach only `p`; the LoRA base or frozen parameters join here.
    full = lora_lib.merge(frozen, p) if frozen else p
    sums = token_sums(model, full, b, compute_dtype, loss_chunk, loss_positions)
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
               accum_steps: int = 1, loss_chunk: int = 0, loss_positions: float = 0.0,
               freeze: optim.Freeze = optim.Freeze()) -> tuple[TrainState, dict]:
  """One optimizer step. `frozen`: the LoRA base weights (empty or None otherwise);
  `freeze`: parameters of `state.params` that get no gradient and no update."""
  trainable, fixed = freeze.split(state.params) if freeze else (state.params, {})
  constant = frozen or fixed  # never both: train.build refuses freeze with LoRA
  grads_sum, sums = _grads_and_sums(model, trainable, constant, batch, compute_dtype,
                                    accum_steps, loss_chunk, loss_positions)
  n = jnp.maximum(sums['target_tokens'], 1.0)
  grads = jax.tree.map(lambda g: g / n, grads_sum)
  updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
  params = optax.apply_updates(trainable, updates)
  if freeze:
    params = freeze.merge(params, fixed)
  metrics = {
      'loss': sums['loss_sum'] / n,
      'accuracy': sums['correct'] / n,
      'grad_norm': optax.tree.norm(grads),
      'target_tokens': sums['target_tokens'],
      'real_tokens': sums['real_tokens'],
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, model, compute_dtype=jnp.float32,
              loss_chunk: int = 0, loss_positions: float = 0.0) -> dict:
  """Sums, not means: the caller adds them over the whole split, then divides."""
  return token_sums(model, params, batch, compute_dtype, loss_chunk, loss_positions)
