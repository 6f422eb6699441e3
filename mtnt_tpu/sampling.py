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


def choose_tokens(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """The next token of each row [B] from its logits [B, V]."""
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
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def generate(params, prompt_BP: jax.Array, length_B: jax.Array, rng: jax.Array, *,
             model, cache_constraint: Callable, compute_dtype, stop_ids: tuple[int, ...],
             max_decode_len: int, sampling: Sampling) -> tuple[jax.Array, jax.Array]:
  """New tokens [B, T] for left-padded prompts (PAD after each row's stop token),
  and the number of steps run []."""
  B, P = prompt_BP.shape
  T = max_decode_len
  prompts, cache = kv_cache.prefill(params, prompt_BP, length_B, model=model, C=P - 1 + T,
                                    compute_dtype=compute_dtype,
                                    cache_constraint=cache_constraint)
  stop_S = jnp.asarray(stop_ids, jnp.int32)
  tokens_BT = jnp.full((B, T), tokenizer_lib.PAD, jnp.int32)
  done_B = length_B == 0  # filler rows
  state = (jnp.int32(0), prompt_BP[:, -1], tokens_BT, done_B, cache)

  def cond(state):
    t, _, _, done_B, _ = state
    return (t < T) & ~jnp.all(done_B)

  def body(state):
    t, last_B, tokens_BT, done_B, cache = state
    logits_BV, cache = prompts.step(last_B, t, cache)
    next_B = choose_tokens(logits_BV, jax.random.fold_in(rng, t), sampling)
    next_B = jnp.where(done_B, tokenizer_lib.PAD, next_B)
    tokens_BT = jax.lax.dynamic_update_slice(tokens_BT, next_B[:, None], (0, t))
    done_B = done_B | jnp.isin(next_B, stop_S)
    return t + 1, next_B, tokens_BT, done_B, cache_constraint(cache)

  steps, _, tokens_BT, _, _ = jax.lax.while_loop(cond, body, state)
  return tokens_BT, steps
