"""Greedy and sampled decoding: how the next token is chosen, and the token loop.

The loop ends as soon as every row has ended (a stop token), or after
max_decode_len tokens; a row that has ended emits PAD while the others go on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from mtnt_tpu import kv_cache
from mtnt_tpu import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. The default is greedy."""
  temperature: float = 0.0  # 0: argmax
  top_k: int = 0  # > 0: only the k likeliest tokens
  top_p: float = 1.0  # < 1: the smallest set of tokens holding this much probability
  seed: int = 0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f'bad sampling options {self}: temperature >= 0, top_k >= 0, '
                       '0 < top_p <= 1')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def choose_tokens(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling,
                  row_B: jax.Array | None = None) -> jax.Array:
  """The next token of each row [B] from its logits [B, V]; row_B: each row's
  own sampling key is rng folded with it (default: its index)."""
  if sampling.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token while the mass before it is short of top_p: the likeliest
    # token is always kept.
    kept_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < sampling.top_p
    floor_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < floor_B1, -jnp.inf, logits_BV)
  if row_B is None:
    row_B = jnp.arange(logits_BV.shape[0])
  keys_B = jax.vmap(lambda row: jax.random.fold_in(rng, row))(row_B)
  return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


def generate(params, prompt_BP: jax.Array, length_B: jax.Array, rng: jax.Array, *,
             model, cache_constraint: Callable, compute_dtype, stop_ids: tuple[int, ...],
             max_decode_len: int, sampling: Sampling, compact_to: int = 0
             ) -> tuple[jax.Array, jax.Array]:
  """New tokens [B, T] for left-padded prompts (PAD after each row's stop token),
  and the number of steps run [].

  compact_to: with 0 < compact_to < B, once at most that many rows are still
  going they move (with their cache rows) into a batch of compact_to rows and
  the rest are dropped, so the remaining steps cost that batch, not B. Each row
  computes the same either way; a row's sampling key is its index in the batch.
  """
  B, P = prompt_BP.shape
  T = max_decode_len
  prompts, cache = kv_cache.prefill(params, prompt_BP, length_B, model=model, C=P - 1 + T,
                                    compute_dtype=compute_dtype,
                                    cache_constraint=cache_constraint)
  stop_S = jnp.asarray(stop_ids, jnp.int32)
  tokens_BT = jnp.full((B, T), tokenizer_lib.PAD, jnp.int32)

  def run(state, prompts, row_R, going_at_most: int):
    """Steps until at most `going_at_most` rows are still going (or T steps)."""

    def cond(state):
      t, _, _, done_R, _ = state
      return (t < T) & (jnp.sum(~done_R) > going_at_most)

    def body(state):
      t, last_R, tokens_RT, done_R, cache = state
      logits_RV, cache = prompts.step(last_R, t, cache)
      next_R = choose_tokens(logits_RV, jax.random.fold_in(rng, t), sampling, row_R)
      next_R = jnp.where(done_R, tokenizer_lib.PAD, next_R)
      tokens_RT = jax.lax.dynamic_update_slice(tokens_RT, next_R[:, None], (0, t))
      done_R = done_R | jnp.isin(next_R, stop_S)
      return t + 1, next_R, tokens_RT, done_R, cache_constraint(cache)

    return jax.lax.while_loop(cond, body, state)

  # R: the rows in the loop, B at first; row_R says which prompt each one is.
  row_R = jnp.arange(B)
  state = (jnp.int32(0), prompt_BP[:, -1], tokens_BT, length_B == 0, cache)
  if not 0 < compact_to < B:
    steps, _, tokens_BT, _, _ = run(state, prompts, row_R, 0)
    return tokens_BT, steps
  t, last_R, tokens_BT, done_R, cache = run(state, prompts, row_R, compact_to)
  # Rows still going first; the rows left behind have written all their tokens.
  # Gathers and the scatter back happen once, outside the token loops.
  keep_R = jnp.argsort(done_R, stable=True)[:compact_to]
  prompts, cache = prompts.take(keep_R, cache)
  state = (t, last_R[keep_R], tokens_BT[keep_R], done_R[keep_R], cache_constraint(cache))
  steps, _, tokens_RT, _, _ = run(state, prompts, keep_R, 0)
  tokens_BT = tokens_BT.at[keep_R].set(tokens_RT)
  return tokens_BT, steps
