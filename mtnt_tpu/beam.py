"""Beam search that never returns worse than greedy, batched and sharded.

Beam search (beam_size K > 1) keeps B x K rows in the cache. Beam 0 follows
greedy's path (it always takes its own likeliest token); each step the other
K - 1 beams are the best of the prompt's other (beam, token) extensions by
total log-prob (per beam the top K of its V tokens, then the best of those
K x K). The cache rows of each survivor's parent are gathered, and an
extension that ends (a stop token) becomes the prompt's best finished
hypothesis if its length-normalised score beats it. A prompt is done once no
live beam can still beat that hypothesis. So greedy's translation is always
a candidate and the result never scores below it (plain beam search can
prune greedy's path and return worse); with K = 1 this is greedy decoding,
token for token. The score is GNMT's length penalty (Wu et al. 2016):
`log P(y) / ((5 + |y|) / 6) ** alpha` (`length_normalized`; |y| counts the
stop token; alpha = 0 is the plain log-probability, larger alpha favours
longer translations).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mtnt_tpu import kv_cache
from mtnt_tpu import sharding as sharding_lib
from mtnt_tpu import tokenizer as tokenizer_lib


def length_normalized(logprob_sum, length, alpha: float):
  """GNMT's length-penalised score: log P / ((5 + length) / 6) ** alpha."""
  return logprob_sum / ((5.0 + length) / 6.0) ** alpha


def search(params, prompt_BP: jax.Array, length_B: jax.Array, rng: jax.Array, *,
           model, cache_constraint: Callable, compute_dtype, stop_ids: tuple[int, ...],
           max_decode_len: int, beam_size: int, length_penalty: float,
           mesh: jax.sharding.Mesh | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The best hypothesis [B, T] per prompt (PAD after its stop token), its
  length-normalised score [B], and the number of steps run []."""
  del rng  # beam search is deterministic
  B, P = prompt_BP.shape
  T, K = max_decode_len, beam_size
  alpha = length_penalty
  prompts, cache = kv_cache.prefill(params, prompt_BP, length_B, model=model, C=P - 1 + T,
                                    compute_dtype=compute_dtype,
                                    cache_constraint=cache_constraint)
  # Each prompt's cache rows, copied to its K beams: rows R = B x K, b-major.
  rows = lambda x: jnp.repeat(x, K, axis=0)
  prompts, cache = prompts.take(rows(jnp.arange(B)), cache)
  cache = cache_constraint(cache)
  stop_S = jnp.asarray(stop_ids, jnp.int32)
  # One live beam per real prompt at first (the K copies are the same hypothesis).
  first_K = jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf)
  alive_BK = jnp.where((length_B > 0)[:, None], first_K[None, :], -jnp.inf)
  tokens_BKT = jnp.full((B, K, T), tokenizer_lib.PAD, jnp.int32)
  best_B = jnp.full((B,), -jnp.inf)
  best_BT = jnp.full((B, T), tokenizer_lib.PAD, jnp.int32)
  state = (jnp.int32(0), rows(prompt_BP[:, -1]), alive_BK, tokens_BKT, best_B, best_BT, cache)

  def extend(logits_BKV, alive_BK):
    # The K best extensions of each beam (ranked by its logits, as greedy
    # ranks them), then the K best of those K x K by total log-prob.
    b = logits_BKV.shape[0]
    top_BKK, token_BKK = jax.lax.top_k(logits_BKV, K)
    logz_BK1 = jax.nn.logsumexp(logits_BKV.astype(jnp.float32), axis=-1, keepdims=True)
    total_BKM = (alive_BK[:, :, None] + (top_BKK.astype(jnp.float32) - logz_BK1))
    total_BM = total_BKM.reshape(b, K * K)
    # Beam 0 is greedy's path: it always takes its own likeliest token, so
    # greedy's translation is always a candidate and the result never scores
    # below it. The other K - 1 beams are the best of the other extensions.
    score_BK, pick_BK = total_BM[:, :1], jnp.zeros((b, 1), jnp.int32)
    if K > 1:
      rest_score, rest_pick = jax.lax.top_k(total_BM.at[:, 0].set(-jnp.inf), K - 1)
      score_BK = jnp.concatenate([score_BK, rest_score], axis=1)
      pick_BK = jnp.concatenate([pick_BK, rest_pick.astype(jnp.int32)], axis=1)
    token_BK = jnp.take_along_axis(token_BKK.reshape(b, K * K), pick_BK, axis=1)
    return score_BK, pick_BK // K, token_BK

  # Each prompt's choice is its own: on its rows' devices (XLA would gather
  # the logits of every row to partition top_k).
  rows_spec = PartitionSpec(sharding_lib.BATCH_AXES)
  select = extend if mesh is None else jax.shard_map(
      extend, mesh=mesh, in_specs=(rows_spec, rows_spec), out_specs=rows_spec)

  def follow(parent_BK, tokens_RT, kv):
    # Row (b, k) takes row (b, parent[b, k]): a gather within each prompt's K rows.
    b = parent_BK.shape[0]
    def take(x):
      x_BK = x.reshape(b, K, *x.shape[1:])
      index = parent_BK.reshape(b, K, *(1,) * (x_BK.ndim - 2))
      return jnp.take_along_axis(x_BK, index, axis=1).reshape(x.shape)
    return take(tokens_RT), jax.tree.map(take, kv)

  reorder = follow if mesh is None else jax.shard_map(
      follow, mesh=mesh, in_specs=rows_spec, out_specs=rows_spec)

  def cond(state):
    t, _, alive_BK, _, best_B, _, _ = state
    # No live beam can beat the best finished one: log-probs only fall, and a
    # longer hypothesis is divided by at most the penalty at length T.
    reachable_B = jnp.max(alive_BK, axis=1)
    if alpha > 0:
      reachable_B = length_normalized(reachable_B, T, alpha)
    return (t < T) & ~jnp.all(best_B >= reachable_B)

  def body(state):
    t, last_R, alive_BK, tokens_BKT, best_B, best_BT, cache = state
    logits_RV, cache = prompts.step(last_R, t, cache)
    score_BK, parent_BK, token_BK = select(logits_RV.reshape(B, K, -1), alive_BK)
    # The keys and values follow their beams; every row's write index is the same.
    kv = {name: {k: v for k, v in layer.items() if k != 'end_index'}
          for name, layer in cache.items()}
    tokens_RT, kv = reorder(parent_BK, tokens_BKT.reshape(B * K, T), kv)
    tokens_BKT = tokens_RT.reshape(B, K, T)
    cache = cache_constraint({name: {**kv[name], 'end_index': layer['end_index']}
                              for name, layer in cache.items()})
    tokens_BKT = jax.lax.dynamic_update_slice(tokens_BKT, token_BK[:, :, None], (0, 0, t))
    ended_BK = jnp.isin(token_BK, stop_S) & (score_BK > -jnp.inf)
    finished_BK = jnp.where(ended_BK, length_normalized(score_BK, t + 1, alpha), -jnp.inf)
    best_B, best_BT = _keep_better(best_B, best_BT, finished_BK, tokens_BKT)
    alive_BK = jnp.where(ended_BK, -jnp.inf, score_BK)
    return t + 1, token_BK.reshape(B * K), alive_BK, tokens_BKT, best_B, best_BT, cache

  steps, _, alive_BK, tokens_BKT, best_B, best_BT, _ = jax.lax.while_loop(cond, body, state)
  # Hypotheses still live at T compete unfinished, scored at length T.
  unfinished_BK = length_normalized(alive_BK, T, alpha)
  best_B, best_BT = _keep_better(best_B, best_BT, unfinished_BK, tokens_BKT)
  return best_BT, best_B, steps


def _keep_better(best_B, best_BT, score_BK, tokens_BKT):
  """Each prompt's best hypothesis so far, or its highest-scoring beam if that scores more."""
  k_B = jnp.argmax(score_BK, axis=1)
  top_B = jnp.max(score_BK, axis=1)
  better_B = top_B > best_B
  chosen_BT = jnp.take_along_axis(tokens_BKT, k_B[:, None, None], axis=1)[:, 0]
  return jnp.where(better_B, top_B, best_B), jnp.where(better_B[:, None], chosen_BT, best_BT)
