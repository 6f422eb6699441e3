"""Batched translation with a KV cache, on the training mesh: greedy, sampled or beam.

Prompts are left-padded to one length P, so the last prompt token of every row
sits in the same cache slot: gemma's attention writes the whole batch at one
shared cache index (`end_index[0]`), so rows must step in lock-step. Padding
is masked out of attention, and positions count from each row's first real
token, so padding changes nothing a row computes.

    prefill  prompt[:, :P-1] into the cache (its logits are unused, and
             compiled away: no [B, P, V] array for a 256k vocabulary)
    step t   feed the token in slot P-1+t at position len-1+t, choose the next
             token; the loop ends as soon as every row has ended, or at T

Speed. P is not one fixed length: each batch is padded to the smallest of a
few bucket lengths (`prompt_buckets`: 16, 32, 64, ... up to max_prompt_len)
that holds its longest prompt, and prompts are batched shortest first, so a
batch of short sentences neither prefills nor attends over padding. One
program is compiled per bucket used, lazily, and kept. The weights are cast to
the compute dtype and, when a copy fits (`replicate_params`), gathered onto
every device once per `generate`/`translate_batches` call by a separate jitted
reshard: the token loop then holds them whole and runs no all-gather (the
training shardings would re-gather every layer at every token). Rows stay
split over the batch axes; the generated tokens come back replicated, so every
process of a multi-host run gets all of them. Every process must call
`generate` with the same prompts (it decodes global arrays).

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

Whether a sentence is decoded alone or with others changes only the bucket
and the rows beside it; each row's computation is its own, so results agree
up to float rounding (the tests check they are equal).

Sliding-window layers (Gemma 3) measure their window in cache slots, so left
padding widens a row's window by its padding: exact while P + T stays within
the window (512 tokens for Gemma 3).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from mtnt_tpu import model as model_lib
from mtnt_tpu import sharding as sharding_lib
from mtnt_tpu import tokenizer as tokenizer_lib

# A replicated copy of the weights may take at most this share of a device's memory.
REPLICATE_MEMORY_FRACTION = 0.25


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


def length_normalized(logprob_sum, length, alpha: float):
  """GNMT's length-penalised score: log P / ((5 + length) / 6) ** alpha."""
  return logprob_sum / ((5.0 + length) / 6.0) ** alpha


def prompt_buckets(max_prompt_len: int) -> tuple[int, ...]:
  """The prompt lengths compiled for: 16, 32, 64, ... below max_prompt_len, and it."""
  out, b = [], 16
  while b < max_prompt_len:
    out.append(b)
    b *= 2
  return (*out, max_prompt_len)


@dataclasses.dataclass(frozen=True)
class _Prompts:
  """A batch's left-padded prompts and what the steps need to know about them."""
  model: Any
  params: Any
  length_B: jax.Array  # real prompt tokens per row (0: a filler row)
  real_BC: jax.Array  # cache slots that hold this row's tokens (not left padding)
  P: int

  def step(self, last_B: jax.Array, t, cache) -> tuple[jax.Array, Any]:
    """Feeds each row's token for slot P-1+t; logits [B, V] of the next one."""
    C = self.real_BC.shape[1]
    positions_B1 = (self.length_B - 1 + t)[:, None]
    mask_B1C = ((jnp.arange(C) <= self.P - 1 + t)[None, :] & self.real_BC)[:, None, :]
    logits_B1V, cache = self.model.apply({'params': self.params}, last_B[:, None],
                                         positions_B1, cache, mask_B1C)
    return logits_B1V[:, 0], cache


def _prefill(params, prompt_BP, length_B, *, model, C: int, compute_dtype,
             cache_constraint: Callable) -> tuple[_Prompts, Any]:
  """The cache holding every prompt but its last token."""
  B, P = prompt_BP.shape
  pad_B = P - length_B
  slot_C = jnp.arange(C)
  real_BC = slot_C[None, :] >= pad_B[:, None]
  cache = cache_constraint(model.config.init_cache(B, compute_dtype, cache_length=C))
  if P > 1:
    query_Q = jnp.arange(P - 1)
    positions_BQ = jnp.maximum(query_Q[None, :] - pad_B[:, None], 0)
    mask_BQC = (slot_C[None, None, :] <= query_Q[None, :, None]) & real_BC[:, None, :]
    _, cache = model.apply({'params': params}, prompt_BP[:, :-1], positions_BQ, cache, mask_BQC)
  return _Prompts(model, params, length_B, real_BC, P), cache_constraint(cache)


def _generate(params, prompt_BP: jax.Array, length_B: jax.Array, rng: jax.Array, *,
              model, cache_constraint: Callable, compute_dtype, stop_ids: tuple[int, ...],
              max_decode_len: int, sampling: Sampling) -> tuple[jax.Array, jax.Array]:
  """New tokens [B, T] for left-padded prompts (PAD after each row's stop token),
  and the number of steps run []."""
  B, P = prompt_BP.shape
  T = max_decode_len
  prompts, cache = _prefill(params, prompt_BP, length_B, model=model, C=P - 1 + T,
                            compute_dtype=compute_dtype, cache_constraint=cache_constraint)
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


def _beam_search(params, prompt_BP: jax.Array, length_B: jax.Array, rng: jax.Array, *,
                 model, cache_constraint: Callable, compute_dtype, stop_ids: tuple[int, ...],
                 max_decode_len: int, beam_size: int, length_penalty: float,
                 mesh: jax.sharding.Mesh | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The best hypothesis [B, T] per prompt (PAD after its stop token), its
  length-normalised score [B], and the number of steps run []."""
  del rng  # beam search is deterministic
  B, P = prompt_BP.shape
  T, K = max_decode_len, beam_size
  alpha = length_penalty
  prompts, cache = _prefill(params, prompt_BP, length_B, model=model, C=P - 1 + T,
                            compute_dtype=compute_dtype, cache_constraint=cache_constraint)
  # Each prompt's cache rows, copied to its K beams: rows R = B x K, b-major.
  rows = lambda x: jnp.repeat(x, K, axis=0)
  prompts = dataclasses.replace(prompts, length_B=rows(prompts.length_B),
                                real_BC=rows(prompts.real_BC))
  cache = cache_constraint(jax.tree.map(rows, cache))
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
    k_B = jnp.argmax(finished_BK, axis=1)
    better_B = jnp.max(finished_BK, axis=1) > best_B
    best_B = jnp.where(better_B, jnp.max(finished_BK, axis=1), best_B)
    chosen_BT = jnp.take_along_axis(tokens_BKT, k_B[:, None, None], axis=1)[:, 0]
    best_BT = jnp.where(better_B[:, None], chosen_BT, best_BT)
    alive_BK = jnp.where(ended_BK, -jnp.inf, score_BK)
    return t + 1, token_BK.reshape(B * K), alive_BK, tokens_BKT, best_B, best_BT, cache

  steps, _, alive_BK, tokens_BKT, best_B, best_BT, _ = jax.lax.while_loop(cond, body, state)
  # Hypotheses still live at T compete unfinished, scored at length T.
  unfinished_BK = length_normalized(alive_BK, T, alpha)
  k_B = jnp.argmax(unfinished_BK, axis=1)
  better_B = jnp.max(unfinished_BK, axis=1) > best_B
  best_B = jnp.where(better_B, jnp.max(unfinished_BK, axis=1), best_B)
  chosen_BT = jnp.take_along_axis(tokens_BKT, k_B[:, None, None], axis=1)[:, 0]
  best_BT = jnp.where(better_B[:, None], chosen_BT, best_BT)
  return best_BT, best_B, steps


@dataclasses.dataclass(frozen=True)
class Batch:
  """What one compiled batch returned: tokens per prompt (cut before the stop
  token), beam scores per prompt (None unless beam search), steps run."""
  tokens: list[list[int]]
  scores: list[float] | None
  steps: int


class Decoder:
  """Translates sentences with `run`'s model on `run`'s mesh.

  Args:
    run: the built run (mesh, model config, parameter shardings, batch sharding).
    tokenizer: the run's tokenizer.
    batch_size: prompts per compiled batch, rounded up to the mesh's batch axes.
    max_prompt_len: tokens of prompt per row at most (BOS included); a longer
      prompt has its source cut to fit, with a warning naming the line.
    max_decode_len: T, new tokens per translation at most.
    dst_lang, chat_template: the prompt format (tokenizer.prompt_text).
    sampling: greedy by default.
    beam_size: K > 1 decodes by beam search (greedy sampling only); K rows per prompt.
    length_penalty: beam search's alpha in `length_normalized`.
    replicate_params: gather the weights onto every device once per call
      (None: when a copy takes at most REPLICATE_MEMORY_FRACTION of a device's
      memory; always on CPUs). False keeps the training shardings.
    buckets: the compiled prompt lengths (default `prompt_buckets`).
  """

  def __init__(self, run, tokenizer: tokenizer_lib.Tokenizer, *, batch_size: int,
               max_prompt_len: int, max_decode_len: int, dst_lang: str = 'French',
               chat_template: bool = False, sampling: Sampling = Sampling(),
               beam_size: int = 1, length_penalty: float = 0.6,
               replicate_params: bool | None = None,
               buckets: Sequence[int] | None = None):
    if max_prompt_len < 2 or max_decode_len < 1:
      raise ValueError(f'max_prompt_len={max_prompt_len} must be >= 2 and '
                       f'max_decode_len={max_decode_len} >= 1')
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size}: decode at least 1 sentence per batch')
    if beam_size < 1:
      raise ValueError(f'beam_size={beam_size}: use 1 (greedy) or more beams')
    if beam_size > 1 and not sampling.greedy:
      raise ValueError(f'beam_size={beam_size} with temperature={sampling.temperature}: '
                       'beam search is deterministic; set temperature=0 or beam_size=1')
    if length_penalty < 0:
      raise ValueError(f'length_penalty={length_penalty}: use alpha >= 0 (0: none)')
    divisor = sharding_lib.batch_divisor(run.mesh)
    self.batch_size = -(-batch_size // divisor) * divisor
    self.max_prompt_len, self.max_decode_len = max_prompt_len, max_decode_len
    self.buckets = tuple(sorted(buckets)) if buckets else prompt_buckets(max_prompt_len)
    if self.buckets[-1] != max_prompt_len or self.buckets[0] < 1:
      raise ValueError(f'buckets={self.buckets}: prompt lengths from 1 up to '
                       f'max_prompt_len={max_prompt_len}, which must be the last')
    self.tokenizer = tokenizer
    self.dst_lang, self.chat_template = dst_lang, chat_template
    self.sampling = sampling
    self.beam_size, self.length_penalty = beam_size, length_penalty
    self.stop_ids = tokenizer.stop_ids(chat_template)
    self.compile_seconds = 0.0  # spent so far compiling buckets
    mesh = run.mesh
    rows = NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES))
    self._prompt_sharding = run.batch_sharding
    self._length_sharding = rows
    self._replicated = replicated = NamedSharding(mesh, PartitionSpec())

    compute_dtype = run.compute_dtype
    if replicate_params is None:
      replicate_params = _copy_fits(run.abstract_params, compute_dtype, mesh)
    self.replicate_params = replicate_params
    self._param_shardings = (jax.tree.map(lambda _: replicated, run.params_shardings)
                             if replicate_params else run.params_shardings)
    # The one reshard per call: cast, then (when replicating) gather.
    self._prepare = jax.jit(
        lambda p: jax.tree.map(lambda x: x.astype(compute_dtype), p),
        in_shardings=(run.params_shardings,), out_shardings=self._param_shardings)
    self._abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, compute_dtype, sharding=s),
        run.abstract_params, self._param_shardings)

    def cache_constraint(cache):
      # Rows over the batch axes like the batch; the shared write index everywhere.
      return {name: {k: jax.lax.with_sharding_constraint(
                  v, replicated if k == 'end_index' else rows) for k, v in layer.items()}
              for name, layer in cache.items()}

    common = dict(model=model_lib.make_model(run.model_config),
                  cache_constraint=cache_constraint, compute_dtype=compute_dtype,
                  stop_ids=self.stop_ids, max_decode_len=max_decode_len)
    if beam_size > 1:
      self._fn = functools.partial(_beam_search, beam_size=beam_size,
                                   length_penalty=length_penalty, mesh=mesh, **common)
    else:
      self._fn = functools.partial(_generate, sampling=sampling, **common)
    self._compiled: dict[int, Any] = {}

  # --- compiled programs -----------------------------------------------------

  def bucket(self, longest_prompt: int) -> int:
    """The compiled prompt length a batch whose longest prompt has this many tokens uses."""
    return next(b for b in self.buckets if b >= longest_prompt)

  def executable(self, P: int):
    """The program for prompt length P (a bucket), compiled on first use and kept."""
    if P not in self._compiled:
      t0 = time.perf_counter()
      B, rep = self.batch_size, self._replicated
      rng = jax.random.key_data(jax.random.key(0))
      n_out = 3 if self.beam_size > 1 else 2
      jitted = jax.jit(self._fn, in_shardings=(self._param_shardings, self._prompt_sharding,
                                               self._length_sharding, rep),
                       out_shardings=(rep,) * n_out)
      self._compiled[P] = jitted.lower(
          self._abstract_params,
          jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=self._prompt_sharding),
          jax.ShapeDtypeStruct((B,), jnp.int32, sharding=self._length_sharding),
          jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep)).compile()
      self.compile_seconds += time.perf_counter() - t0
      logging.info('compiled the decoder for prompts of %d tokens (batch %d, beam %d, '
                   'new tokens %d) in %.1fs', P, B, self.beam_size, self.max_decode_len,
                   time.perf_counter() - t0)
    return self._compiled[P]

  def compile_for(self, prompts: Sequence[Sequence[int]]) -> None:
    """Compiles, now, every bucket `generate(params, prompts)` will use."""
    for batch in self.batch_order(prompts):
      self.executable(self.bucket(max(len(prompts[i]) for i in batch)))

  def prepare(self, params):
    """The weights as the token loop reads them (compute dtype; replicated if it fits)."""
    return self._prepare(params)

  # --- ids -------------------------------------------------------------------

  def encode_prompts(self, sources: Sequence[str], first_line: int = 1) -> list[list[int]]:
    """Prompt ids per source; an overlong source is cut to fit, with a warning."""
    return [self._encode_prompt(src, first_line + i) for i, src in enumerate(sources)]

  def _encode_prompt(self, src: str, line: int) -> list[int]:
    tok = self.tokenizer
    ids = tok.encode_prompt(src, self.dst_lang, self.chat_template)
    if len(ids) <= self.max_prompt_len:
      return ids
    src_ids = tok.encode(src)
    keep = max(len(src_ids) - (len(ids) - self.max_prompt_len), 0)
    while True:  # re-encoding can merge pieces differently: shrink until it fits
      cut = tok.encode_prompt(tok.decode(src_ids[:keep]), self.dst_lang, self.chat_template)
      if len(cut) <= self.max_prompt_len or keep == 0:
        break
      keep -= 1
    logging.warning('line %d: the prompt is %d tokens, more than the decoder\'s %d '
                    '(max_prompt_len); its source is cut to the first %d of %d tokens',
                    line, len(ids), self.max_prompt_len, keep, len(src_ids))
    return cut[-self.max_prompt_len:]  # only if even the bare template is too long

  def batch_order(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The prompt indices of each batch `generate` decodes."""
    # Shortest first: a batch runs until its longest answer ends and pads to
    # its longest prompt's bucket, and answers grow with their sources.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

  def generate(self, params, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The new tokens of each prompt, up to (not including) its stop token."""
    return self.generate_batches(params, prompts)[0]

  def generate_batches(self, params, prompts: Sequence[Sequence[int]]
                       ) -> tuple[list[list[int]], list[Batch]]:
    """`generate`'s tokens, and each compiled batch's result (scores, steps)."""
    prepared = self.prepare(params)
    out: list[list[int]] = [[] for _ in prompts]
    results = []
    for batch_index, rows in enumerate(self.batch_order(prompts)):
      result = self.run_batch(prepared, [prompts[i] for i in rows], batch_index)
      for i, ids in zip(rows, result.tokens):
        out[i] = ids
      results.append(result)
    return out, results

  def run_batch(self, prepared, prompts: Sequence[Sequence[int]], batch_index: int = 0
                ) -> Batch:
    """Decodes up to batch_size prompts with `prepare`d weights."""
    prompt_BP, length_B = self.layout(prompts)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(self.sampling.seed),
                                                 batch_index))
    outputs = self.executable(prompt_BP.shape[1])(
        prepared, _global(prompt_BP, self._prompt_sharding),
        _global(length_B, self._length_sharding), _global(np.asarray(rng), self._replicated))
    # Replicated: every process holds the whole array on each of its devices.
    outputs = [np.asarray(x.addressable_data(0)) for x in outputs]
    tokens_BT, steps = outputs[0], int(outputs[-1])
    stops = set(self.stop_ids)
    tokens = []
    for r in range(len(prompts)):
      row = tokens_BT[r].tolist()
      end = next((i for i, t in enumerate(row) if t in stops), len(row))
      tokens.append(row[:end])
    scores = outputs[1][:len(prompts)].tolist() if self.beam_size > 1 else None
    return Batch(tokens, scores, steps)

  def layout(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts left-padded to their bucket [B, P] (filler rows empty), and lengths [B]."""
    B = self.batch_size
    if not 0 < len(prompts) <= B:
      raise ValueError(f'{len(prompts)} prompts for a batch of {B}')
    longest = max(len(ids) for ids in prompts)
    if longest > self.max_prompt_len:
      raise ValueError(f'a prompt of {longest} tokens exceeds max_prompt_len='
                       f'{self.max_prompt_len}; encode it with Decoder.encode_prompts')
    P = self.bucket(longest)
    prompt_BP = np.full((B, P), tokenizer_lib.PAD, np.int32)
    length_B = np.zeros((B,), np.int32)
    for r, ids in enumerate(prompts):
      if ids:
        prompt_BP[r, P - len(ids):] = ids
      length_B[r] = len(ids)
    return prompt_BP, length_B

  # --- text ------------------------------------------------------------------

  def translate_batches(self, params, sources: Sequence[str], first_line: int = 1
                        ) -> Iterator[list[str]]:
    """Translations of `sources`, one compiled batch at a time, in input order.

    An empty (or blank) source gives an empty translation without decoding.
    """
    prepared = None
    for start in range(0, len(sources), self.batch_size):
      chunk = sources[start:start + self.batch_size]
      todo = [i for i, s in enumerate(chunk) if s.strip()]
      prompts = [self._encode_prompt(chunk[i], first_line + start + i) for i in todo]
      out = [''] * len(chunk)
      if prompts:
        prepared = self.prepare(params) if prepared is None else prepared
        result = self.run_batch(prepared, prompts, start // self.batch_size)
        for i, ids in zip(todo, result.tokens):
          out[i] = self.detokenize(ids)
      yield out

  def translate(self, params, sources: Sequence[str]) -> list[str]:
    return [t for batch in self.translate_batches(params, sources) for t in batch]

  def detokenize(self, ids: Sequence[int]) -> str:
    """Generated ids -> the answer text, cut at its first stop string."""
    return tokenizer_lib.cut_answer(self.tokenizer.decode(ids), self.chat_template).strip()


def _copy_fits(abstract_params, dtype, mesh) -> bool:
  """Whether a whole copy of the weights in `dtype` fits a device comfortably."""
  need = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
  need *= jnp.dtype(dtype).itemsize
  stats = mesh.devices.flat[0].memory_stats() or {}
  limit = stats.get('bytes_limit')
  if not limit:  # CPU: host memory, no per-device limit to respect
    return True
  fits = need <= REPLICATE_MEMORY_FRACTION * limit
  if not fits:
    logging.warning('decoding keeps the weights sharded (a copy needs %.1f GiB of the '
                    'device\'s %.1f GiB): they are re-gathered at every token',
                    need / 2**30, limit / 2**30)
  return fits


def _global(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The same host array on every process -> one global array (multi-host safe)."""
  return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])
