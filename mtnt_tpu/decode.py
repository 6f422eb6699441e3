"""Batched translation with a KV cache, on the training mesh: greedy or sampled.

Prompts are left-padded to one length P, so the last prompt token of every row
sits in the same cache slot: gemma's attention writes the whole batch at one
shared cache index (`end_index[0]`), so rows must step in lock-step. Padding
is masked out of attention, and positions count from each row's first real
token, so padding changes nothing a row computes. The compiled shapes never
change (batch B, prompt P, T new tokens), so a sentence's translation does not
depend on its neighbours or on where it sits in the batch, bit for bit.

    prefill  prompt[:, :P-1] into the cache (its logits are unused, and
             compiled away: no [B, P, V] array for a 256k vocabulary)
    step t   feed the token in slot P-1+t at position len-1+t, choose the next
             token; stop when every row has produced a stop token, or at T

Parameters stay in their training shardings and rows are split over the batch
axes; the generated tokens come back replicated, so every process of a
multi-host run gets all of them. Every process must call `generate` with the
same prompts (it decodes global arrays).

Sliding-window layers (Gemma 3) measure their window in cache slots, so left
padding widens a row's window by its padding: exact while P + T stays within
the window (512 tokens for Gemma 3).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

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


def _generate(params, prompt_BP: jax.Array, length_B: jax.Array, rng: jax.Array, *,
              model, cache_constraint: Callable, compute_dtype, stop_ids: tuple[int, ...],
              max_decode_len: int, sampling: Sampling) -> jax.Array:
  """New tokens [B, T] for left-padded prompts; PAD after each row's stop token."""
  B, P = prompt_BP.shape
  T = max_decode_len
  C = P - 1 + T  # the last new token is never fed back
  params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
  pad_B = P - length_B
  slot_C = jnp.arange(C)
  # A cache slot is attendable once it holds this row's prompt or output.
  real_BC = slot_C[None, :] >= pad_B[:, None]

  cache = model.config.init_cache(B, compute_dtype, cache_length=C)
  cache = cache_constraint(cache)
  if P > 1:
    query_Q = jnp.arange(P - 1)
    positions_BQ = jnp.maximum(query_Q[None, :] - pad_B[:, None], 0)
    mask_BQC = (slot_C[None, None, :] <= query_Q[None, :, None]) & real_BC[:, None, :]
    _, cache = model.apply({'params': params}, prompt_BP[:, :-1], positions_BQ, cache, mask_BQC)

  stop_S = jnp.asarray(stop_ids, jnp.int32)
  tokens_BT = jnp.full((B, T), tokenizer_lib.PAD, jnp.int32)
  done_B = length_B == 0  # filler rows
  state = (jnp.int32(0), prompt_BP[:, -1], tokens_BT, done_B, cache)

  def cond(state):
    t, _, _, done_B, _ = state
    return (t < T) & ~jnp.all(done_B)

  def body(state):
    t, last_B, tokens_BT, done_B, cache = state
    slot = P - 1 + t
    positions_B1 = (length_B - 1 + t)[:, None]
    mask_B1C = ((slot_C <= slot)[None, :] & real_BC)[:, None, :]
    logits_B1V, cache = model.apply({'params': params}, last_B[:, None], positions_B1, cache,
                                    mask_B1C)
    next_B = choose_tokens(logits_B1V[:, 0], jax.random.fold_in(rng, t), sampling)
    next_B = jnp.where(done_B, tokenizer_lib.PAD, next_B)
    tokens_BT = jax.lax.dynamic_update_slice(tokens_BT, next_B[:, None], (0, t))
    done_B = done_B | jnp.isin(next_B, stop_S)
    return t + 1, next_B, tokens_BT, done_B, cache_constraint(cache)

  _, _, tokens_BT, _, _ = jax.lax.while_loop(cond, body, state)
  return tokens_BT


class Decoder:
  """Translates sentences with `run`'s model on `run`'s mesh; compiled once.

  Args:
    run: the built run (mesh, model config, parameter shardings, batch sharding).
    tokenizer: the run's tokenizer.
    batch_size: rows per compiled batch, rounded up to the mesh's batch axes.
    max_prompt_len: P, tokens of prompt per row (BOS included); a longer prompt
      has its source cut to fit, with a warning naming the line.
    max_decode_len: T, new tokens per translation at most.
    dst_lang, chat_template: the prompt format (tokenizer.prompt_text).
    sampling: greedy by default.
  """

  def __init__(self, run, tokenizer: tokenizer_lib.Tokenizer, *, batch_size: int,
               max_prompt_len: int, max_decode_len: int, dst_lang: str = 'French',
               chat_template: bool = False, sampling: Sampling = Sampling()):
    if max_prompt_len < 2 or max_decode_len < 1:
      raise ValueError(f'max_prompt_len={max_prompt_len} must be >= 2 and '
                       f'max_decode_len={max_decode_len} >= 1')
    divisor = sharding_lib.batch_divisor(run.mesh)
    self.batch_size = -(-batch_size // divisor) * divisor
    self.max_prompt_len, self.max_decode_len = max_prompt_len, max_decode_len
    self.tokenizer = tokenizer
    self.dst_lang, self.chat_template = dst_lang, chat_template
    self.sampling = sampling
    self.stop_ids = tokenizer.stop_ids(chat_template)
    mesh = run.mesh
    rows = NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES))
    self._prompt_sharding = run.batch_sharding
    self._length_sharding = rows
    replicated = NamedSharding(mesh, PartitionSpec())

    def cache_constraint(cache):
      # Rows over the batch axes like the batch; the shared write index everywhere.
      return {name: {k: jax.lax.with_sharding_constraint(
                  v, replicated if k == 'end_index' else rows) for k, v in layer.items()}
              for name, layer in cache.items()}

    fn = functools.partial(
        _generate, model=model_lib.make_model(run.model_config),
        cache_constraint=cache_constraint, compute_dtype=run.compute_dtype,
        stop_ids=self.stop_ids, max_decode_len=max_decode_len, sampling=sampling)
    B, P = self.batch_size, max_prompt_len
    jitted = jax.jit(fn, in_shardings=(run.params_shardings, run.batch_sharding, rows,
                                       replicated),
                     out_shardings=replicated)
    rng = jax.random.key_data(jax.random.key(0))
    self._compiled = jitted.lower(
        run.abstract_params,
        jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=run.batch_sharding),
        jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)).compile()
    self._replicated = replicated

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

  def generate(self, params, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The new tokens of each prompt, up to (not including) its stop token.

    Prompts are decoded shortest first: a batch runs until its longest answer
    ends, and answers grow with their sources, so similar lengths together
    waste fewer steps. Greedy results do not depend on the grouping.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for batch_index, start in enumerate(range(0, len(prompts), self.batch_size)):
      rows = order[start:start + self.batch_size]
      for i, ids in zip(rows, self._generate_batch(params, [prompts[i] for i in rows],
                                                   batch_index)):
        out[i] = ids
    return out

  def _generate_batch(self, params, prompts, batch_index: int) -> list[list[int]]:
    B, P = self.batch_size, self.max_prompt_len
    prompt_BP = np.full((B, P), tokenizer_lib.PAD, np.int32)
    length_B = np.zeros((B,), np.int32)
    for r, ids in enumerate(prompts):
      if len(ids) > P:
        raise ValueError(f'a prompt of {len(ids)} tokens exceeds max_prompt_len={P}; '
                         'encode it with Decoder.encode_prompts')
      if ids:
        prompt_BP[r, P - len(ids):] = ids
      length_B[r] = len(ids)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(self.sampling.seed),
                                                 batch_index))
    tokens_BT = self._compiled(
        params, _global(prompt_BP, self._prompt_sharding),
        _global(length_B, self._length_sharding), _global(np.asarray(rng), self._replicated))
    # Replicated: every process holds the whole array on each of its devices.
    tokens_BT = np.asarray(tokens_BT.addressable_data(0))
    stops = set(self.stop_ids)
    out = []
    for r in range(len(prompts)):
      row = tokens_BT[r].tolist()
      end = next((i for i, t in enumerate(row) if t in stops), len(row))
      out.append(row[:end])
    return out

  # --- text ------------------------------------------------------------------

  def translate_batches(self, params, sources: Sequence[str], first_line: int = 1
                        ) -> Iterator[list[str]]:
    """Translations of `sources`, one compiled batch at a time (for progress).

    An empty (or blank) source gives an empty translation without decoding.
    """
    for start in range(0, len(sources), self.batch_size):
      chunk = sources[start:start + self.batch_size]
      todo = [i for i, s in enumerate(chunk) if s.strip()]
      prompts = [self._encode_prompt(chunk[i], first_line + start + i) for i in todo]
      out = [''] * len(chunk)
      if prompts:
        for i, ids in zip(todo, self._generate_batch(params, prompts,
                                                     start // self.batch_size)):
          out[i] = self.detokenize(ids)
      yield out

  def translate(self, params, sources: Sequence[str]) -> list[str]:
    return [t for batch in self.translate_batches(params, sources) for t in batch]

  def detokenize(self, ids: Sequence[int]) -> str:
    """Generated ids -> the answer text, cut at its first stop string."""
    return tokenizer_lib.cut_answer(self.tokenizer.decode(ids), self.chat_template).strip()


def _global(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The same host array on every process -> one global array (multi-host safe)."""
  return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])
