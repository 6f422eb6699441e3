"""Greedy and sampled decoding: how the next token is chosen, and the token loop.

The loop ends as soon as every row has ended (a stop token), or after
max_decode_len tokens; a row that has ended emits PAD while the others go on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mtnt_tpu import kv_cache
from mtnt_tpu import model as model_lib
from mtnt_tpu import sharding as sharding_lib
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


# Greedy decoding's screen (`screened_argmax`): how many tokens a bf16 pass
# proposes per row, found a block of the vocabulary at a time.
SCREEN_CANDIDATES = 16
_SCREEN_BLOCK = 128


def screen_bound(D: int) -> float:
  """Bounds |bf16-screened logit - fp32 logit| as a multiple of |x| * |e|.

  Rounding x and a table row e to bf16 changes each product x_i e_i by at most
  (2u + u^2)|x_i e_i| (u = 2^-8); their product is exact in fp32, and summing D
  terms in fp32, in any order, adds at most D 2^-24 of sum |x_i e_i| (counted
  twice more for the fp32 logits compared against, whatever their order), and
  sum |x_i e_i| <= |x| |e| (Cauchy-Schwarz).
  """
  u = 2.0**-8
  return 2 * u + u * u + 4.1 * D * 2.0**-24


def with_screen_tables(params):
  """`params` with what `screened_argmax` reads beside the table, made once per
  decoding call: the table in bf16, and its largest row norm for the bound
  (extra entries of 'embedder', which gemma's modules do not read)."""
  embedder = params['embedder']
  table_VD = embedder['input_embedding']
  return {**params, 'embedder': {
      **embedder, 'screen_bf16': table_VD.astype(jnp.bfloat16),
      'screen_max_norm': jnp.max(jnp.linalg.norm(table_VD, axis=-1))}}


def screen_tables_like(table_sharding, scalar_sharding) -> dict:
  """The shardings of `with_screen_tables`' entries: the bf16 table as the table."""
  return {'screen_bf16': table_sharding, 'screen_max_norm': scalar_sharding}


def screened_argmax(x_BD: jax.Array, table_VD: jax.Array, table_bf16_VD: jax.Array,
                    max_row_norm: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
  """The greedy token [B] of the fp32 logits `model.output_logits(cfg, table_VD,
  x_BD)` without computing them all, and whether it had to after all [].

  On a CPU the fp32 [B, D] x [D, V] unembedding is about half a decode step at
  Gemma's 262k vocabulary, and bf16 runs it about twice as fast. So a bf16 pass
  proposes each row's SCREEN_CANDIDATES likeliest tokens, they are scored
  exactly in fp32, and a bound on bf16's error (`screen_bound`) proves that no
  other token can beat the best of them. In the rare step where the bound
  cannot prove it for some row (its next likeliest token by bf16 within
  bf16's error of the best), the whole step computes the fp32 logits instead,
  so the answer is always the plain argmax (ties to the lowest id, as
  jnp.argmax).
  """
  B, D = x_BD.shape
  V = table_VD.shape[0]
  k = min(SCREEN_CANDIDATES, V - 1)
  approx_BV = jnp.einsum('bd,vd->bv', x_BD.astype(jnp.bfloat16), table_bf16_VD,
                         preferred_element_type=jnp.float32)
  value_BK, token_BK = _top_k_blocked(approx_BV, k + 1)
  cand_BK = token_BK[:, :k]
  # A multiply and sum, not a dot: XLA rewrites dot(x, gather(table)) as
  # gather(dot(x, table)), the very [B, V] product being saved.
  exact_BK = jnp.sum(x_BD[:, None, :] * jnp.take(table_VD, cand_BK, axis=0), axis=-1)
  bound_B = screen_bound(D) * jnp.linalg.norm(x_BD, axis=-1) * max_row_norm
  # top_k's values descend, so their min is the (k+1)-th. Not value_BK[:, k]: XLA
  # folds that slice into top_k's own, and a top_k not sliced from its first
  # value is a full sort on a CPU, not its TopK kernel (a tenth of a step).
  runner_up_B = jnp.min(value_BK, axis=-1)
  proven = jnp.all(jnp.max(exact_BK, axis=-1) > runner_up_B + bound_B)
  # The soft-cap is monotone but can round neighbours to one value: then the lowest id wins.
  capped_BK = _soft_cap(exact_BK, cfg.final_logit_softcap)
  best_B1 = jnp.max(capped_BK, axis=-1, keepdims=True)
  screened_B = jnp.min(jnp.where(capped_BK == best_B1, cand_BK, V), axis=-1)
  token_B = jax.lax.cond(proven, lambda: screened_B.astype(jnp.int32),
                         lambda: jnp.argmax(model_lib.output_logits(cfg, table_VD, x_BD),
                                            axis=-1).astype(jnp.int32))
  return token_B, ~proven


def _soft_cap(logits, cap: float | None):
  # As gemma's Transformer applies it (2.0.8), op for op.
  return logits if cap is None else jnp.tanh(logits / cap) * cap


def _top_k_blocked(v_BV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """lax.top_k(v_BV, k), in two small steps: the k blocks with the largest
  maxima hold the k largest values. A top_k over 262k values is a sort-like
  pass as costly as a quarter of the bf16 unembedding on a CPU."""
  B, V = v_BV.shape
  n = -(-V // _SCREEN_BLOCK)
  if n * _SCREEN_BLOCK != V:
    v_BV = jnp.pad(v_BV, ((0, 0), (0, n * _SCREEN_BLOCK - V)), constant_values=-jnp.inf)
  v_BNK = v_BV.reshape(B, n, _SCREEN_BLOCK)
  _, block_BM = jax.lax.top_k(jnp.max(v_BNK, axis=-1), min(k, n))
  pool_BMK = jnp.take_along_axis(v_BNK, block_BM[:, :, None], axis=1)
  id_BMK = block_BM[:, :, None] * _SCREEN_BLOCK + jnp.arange(_SCREEN_BLOCK)[None, None, :]
  value_Bk, at_Bk = jax.lax.top_k(pool_BMK.reshape(B, -1), k)
  return value_Bk, jnp.take_along_axis(id_BMK.reshape(B, -1), at_Bk, axis=1)


def generate(params, prompt_BP: jax.Array, length_B: jax.Array, rng: jax.Array, *,
             model, cache_constraint: Callable, compute_dtype, stop_ids: tuple[int, ...],
             max_decode_len: int, sampling: Sampling, compact_to: int = 0,
             screen: bool = False, mesh: jax.sharding.Mesh | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """New tokens [B, T] for left-padded prompts (PAD after each row's stop token),
  the number of steps run [], and of those, in how many the screen left some
  device's rows to the full fp32 logits [].

  compact_to: with 0 < compact_to < B, once at most that many rows are still
  going they move (with their cache rows) into a batch of compact_to rows and
  the rest are dropped, so the remaining steps cost that batch, not B. Each row
  computes the same either way; a row's sampling key is its index in the batch.
  screen: greedy tokens by `screened_argmax` (the same tokens, fewer fp32
    FLOPs) from params `with_screen_tables`, each device screening its own
    rows of `mesh` (XLA would gather every row's candidates to partition
    top_k, at every token).
  """
  if screen and not sampling.greedy:
    raise ValueError('the argmax screen is for greedy decoding (temperature=0)')
  B, P = prompt_BP.shape
  T = max_decode_len
  prompts, cache = kv_cache.prefill(params, prompt_BP, length_B, model=model, C=P - 1 + T,
                                    compute_dtype=compute_dtype,
                                    cache_constraint=cache_constraint)
  stop_S = jnp.asarray(stop_ids, jnp.int32)
  tokens_BT = jnp.full((B, T), tokenizer_lib.PAD, jnp.int32)
  if screen:
    embedder = params['embedder']
    screen_args = (embedder['input_embedding'], embedder['screen_bf16'],
                   embedder['screen_max_norm'])
    cfg = model_lib.network_config(model)

    def screen_rows(x_RD, *table):
      token_R, fell_back = screened_argmax(x_RD, *table, cfg)
      return token_R, fell_back[None]

    if mesh is not None:
      rows, whole = PartitionSpec(sharding_lib.BATCH_AXES), PartitionSpec()
      screen_rows = jax.shard_map(screen_rows, mesh=mesh, in_specs=(rows, whole, whole, whole),
                                  out_specs=(rows, rows))

  def run(state, prompts, row_R, going_at_most: int):
    """Steps until at most `going_at_most` rows are still going (or T steps)."""

    def cond(state):
      t, _, _, done_R, _, _ = state
      return (t < T) & (jnp.sum(~done_R) > going_at_most)

    def body(state):
      t, last_R, tokens_RT, done_R, cache, fallbacks = state
      if screen:
        x_RD, cache = prompts.step(last_R, t, cache, hidden=True)
        next_R, fell_back = screen_rows(x_RD, *screen_args)
        fallbacks += jnp.any(fell_back).astype(jnp.int32)
      else:
        logits_RV, cache = prompts.step(last_R, t, cache)
        next_R = choose_tokens(logits_RV, jax.random.fold_in(rng, t), sampling, row_R)
      next_R = jnp.where(done_R, tokenizer_lib.PAD, next_R)
      tokens_RT = jax.lax.dynamic_update_slice(tokens_RT, next_R[:, None], (0, t))
      done_R = done_R | jnp.isin(next_R, stop_S)
      return t + 1, next_R, tokens_RT, done_R, cache_constraint(cache), fallbacks

    return jax.lax.while_loop(cond, body, state)

  # R: the rows in the loop, B at first; row_R says which prompt each one is.
  row_R = jnp.arange(B)
  state = (jnp.int32(0), prompt_BP[:, -1], tokens_BT, length_B == 0, cache, jnp.int32(0))
  if not 0 < compact_to < B:
    steps, _, tokens_BT, _, _, fallbacks = run(state, prompts, row_R, 0)
    return tokens_BT, steps, fallbacks
  t, last_R, tokens_BT, done_R, cache, fallbacks = run(state, prompts, row_R, compact_to)
  # Rows still going first; the rows left behind have written all their tokens.
  # Gathers and the scatter back happen once, outside the token loops.
  keep_R = jnp.argsort(done_R, stable=True)[:compact_to]
  prompts, cache = prompts.take(keep_R, cache)
  state = (t, last_R[keep_R], tokens_BT[keep_R], done_R[keep_R], cache_constraint(cache),
           fallbacks)
  steps, _, tokens_RT, _, _, fallbacks = run(state, prompts, keep_R, 0)
  tokens_BT = tokens_BT.at[keep_R].set(tokens_RT)
  return tokens_BT, steps, fallbacks
