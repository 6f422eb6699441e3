"""A batch of left-padded prompts in a KV cache: the prefill, then one token a step.

Prompts are left-padded to one length P, so the last prompt token of every row
sits in the same cache slot: gemma's attention writes the whole batch at one
shared cache index (`end_index[0]`), so rows must step in lock-step. Padding
is masked out of attention, and positions count from each row's first real
token, so padding changes nothing a row computes.

    prefill  prompt[:, :P-1] into the cache, PREFILL_CHUNK slots at a time,
             from the first chunk that holds any row's token: the slots
             before it are padding in every row, so a batch of short prompts
             in a long bucket pays for its longest prompt, not the bucket.
             No logits: no [B, P, V] array for a 256k vocabulary.
    step t   feed the token in slot P-1+t at position len-1+t; the logits of
             the next token

Sliding-window layers (Gemma 3) measure their window in cache slots, so left
padding widens a row's window by its padding: exact while P + T stays within
the window (512 tokens for Gemma 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mtnt_tpu import model as model_lib


@dataclasses.dataclass(frozen=True)
class Prompts:
  """A batch's left-padded prompts and what the steps need to know about them."""
  model: Any
  params: Any
  length_B: jax.Array  # real prompt tokens per row (0: a filler row)
  real_BC: jax.Array  # cache slots that hold this row's tokens (not left padding)
  P: int

  def step(self, last_B: jax.Array, t, cache, *, hidden: bool = False
           ) -> tuple[jax.Array, Any]:
    """Feeds each row's token for slot P-1+t; logits [B, V] of the next one (with
    hidden: the final-norm activations [B, D] they come from, for `screen`)."""
    C = self.real_BC.shape[1]
    positions_B1 = (self.length_B - 1 + t)[:, None]
    mask_B1C = ((jnp.arange(C) <= self.P - 1 + t)[None, :] & self.real_BC)[:, None, :]
    out_B1X, cache = self.model.apply({'params': self.params}, last_B[:, None], positions_B1,
                                      cache, mask_B1C,
                                      method=model_lib.final_hidden if hidden else None)
    return out_B1X[:, 0], cache

  def take(self, row_R: jax.Array, cache) -> tuple[Prompts, Any]:
    """Rows `row_R` of these prompts and of their cache (which may repeat rows)."""
    take = lambda x: jnp.take(x, row_R, axis=0)
    prompts = dataclasses.replace(self, length_B=take(self.length_B), real_BC=take(self.real_BC))
    return prompts, jax.tree.map(take, cache)


# Prompt slots per row that one prefill step feeds: B x 8 rows keep a CPU's
# matmuls as efficient as the whole prompt at once for B >= 64.
PREFILL_CHUNK = 8


def prefill(params, prompt_BP, length_B, *, model, C: int, compute_dtype,
            cache_constraint: Callable, chunk: int = PREFILL_CHUNK) -> tuple[Prompts, Any]:
  """The cache holding every prompt but its last token."""
  B, P = prompt_BP.shape
  pad_B = P - length_B
  slot_C = jnp.arange(C)
  real_BC = slot_C[None, :] >= pad_B[:, None]
  cache = cache_constraint(model_lib.network_config(model).init_cache(
      B, compute_dtype, cache_length=C))
  Q = P - 1  # the slots to fill
  c = min(chunk, Q)
  if c:
    # Chunks end at slot Q and start no earlier than needed to reach the first
    # real token (a filler row's pad is P); the first may start before slot 0,
    # so it starts at 0 and refills some of the next chunk's slots alike.
    n = (Q - jnp.minimum(jnp.min(pad_B), Q) + c - 1) // c

    def fill(i, cache):
      start = jnp.maximum(Q - (n - i) * c, 0)
      query_Q = start + jnp.arange(c)
      positions_BQ = jnp.maximum(query_Q[None, :] - pad_B[:, None], 0)
      mask_BQC = (slot_C[None, None, :] <= query_Q[None, :, None]) & real_BC[:, None, :]
      cache = _at_slot(cache, start)  # gemma writes a call's keys from end_index on
      _, cache = model.apply({'params': params}, jax.lax.dynamic_slice_in_dim(
          prompt_BP, start, c, axis=1), positions_BQ, cache, mask_BQC,
                             method=model_lib.final_hidden)
      return cache_constraint(cache)

    cache = jax.lax.fori_loop(0, n, fill, cache)
  return Prompts(model, params, length_B, real_BC, P), _at_slot(cache, Q)


def _at_slot(cache, slot):
  """The cache with every layer's next write at `slot`."""
  return {name: {**layer, 'end_index': jnp.full_like(layer['end_index'], slot)}
          for name, layer in cache.items()}
