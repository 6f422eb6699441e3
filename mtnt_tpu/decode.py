"""Translating sentences on the training mesh: buckets, batches, compiled programs, text.

The token loops live beside it: `sampling` (greedy or sampled) and `beam`
(beam search), both over `kv_cache`'s left-padded prompts.

Speed. Each batch is padded to the smallest of a few bucket lengths
(`prompt_buckets`: 16, 32, 64, ... up to max_prompt_len) that holds its
longest prompt, and prompts are batched shortest first, so a batch of short
sentences neither prefills nor attends over padding. A batch of fewer
prompts than batch_size (the last one) runs in the smallest of batch_size,
batch_size / 2, ... (`row_counts`) that holds them, not among filler rows.
Inside a batch, once a quarter of the rows are still going (`compact`) they
move to a batch a quarter the size (MIN_ROWS or more): answers differ in
length, and every step of the longest one would otherwise cost the whole
batch. One program is
compiled per (prompt bucket, row count) used, lazily or all at once
(`compile_for`), and kept. The weights are cast to the compute dtype
and, when a copy fits (`replicate_params`), gathered onto every device once
per `generate`/`translate_batches` call by a separate jitted reshard: the
token loop then holds them whole and runs no all-gather (the training
shardings would re-gather every layer at every token). On a CPU they are
also laid out for the loop's matmuls (`loop_layout`), and greedy decoding in
float32 finds each token with a bf16 screen proven equal to the fp32 argmax
(`sampling.screened_argmax`). Rows stay split over
the batch axes; the generated tokens come back replicated, so every process
of a multi-host run gets all of them. Every process must call `generate` with
the same prompts (it decodes global arrays).

Whether a sentence is decoded alone or with others changes only the bucket
and the rows beside it; each row's computation is its own, so results agree
up to float rounding (the tests check they are equal).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import time
from typing import Any, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from mtnt_tpu import beam as beam_lib
from mtnt_tpu import loop_layout as loop_layout_lib
from mtnt_tpu import model as model_lib
from mtnt_tpu import sampling as sampling_lib
from mtnt_tpu import sharding as sharding_lib
from mtnt_tpu import tokenizer as tokenizer_lib

# A replicated copy of the weights may take at most this share of a device's memory.
REPLICATE_MEMORY_FRACTION = 0.25
# The fewest rows a batch runs in, alone or compacted: below it a step costs
# about the same whatever its rows (it reads every weight once), so another
# compiled program would buy nothing.
MIN_ROWS = 8


def prompt_buckets(max_prompt_len: int) -> tuple[int, ...]:
  """The prompt lengths compiled for: 16, 32, 64, ... below max_prompt_len, and it."""
  out, b = [], 16
  while b < max_prompt_len:
    out.append(b)
    b *= 2
  return (*out, max_prompt_len)


@dataclasses.dataclass(frozen=True)
class Batch:
  """What one compiled batch returned: tokens per prompt (cut before the stop
  token), beam scores per prompt (None unless beam search), steps run, and how
  many of them the greedy screen left to the full fp32 logits."""
  tokens: list[list[int]]
  scores: list[float] | None
  steps: int
  fallbacks: int = 0


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
    length_penalty: beam search's alpha in `beam.length_normalized`.
    replicate_params: gather the weights onto every device once per call
      (None: when a copy takes at most REPLICATE_MEMORY_FRACTION of a device's
      memory; always on CPUs). False keeps the training shardings.
    buckets: the compiled prompt lengths (default `prompt_buckets`).
    compact: once 1/compact of a batch's rows are still going, they finish in a
      batch 1/compact the size, if that is MIN_ROWS or more (greedy and sampled
      decoding; 1: never).
    screen: greedy tokens from a bf16 pass over the vocabulary, proven equal to
      the fp32 argmax (`sampling.screened_argmax`). None: on for greedy
      decoding in float32 with replicated weights, where the unembedding is
      about half a step on a CPU (in bfloat16 there is nothing to save).
    loop_layout: lay each einsum weight out as the decoder's matmuls read it,
      once per call (`loop_layout`). None: on CPUs, where XLA would otherwise
      copy every weight at every token.
  """

  def __init__(self, run, tokenizer: tokenizer_lib.Tokenizer, *, batch_size: int,
               max_prompt_len: int, max_decode_len: int, dst_lang: str = 'French',
               chat_template: bool = False,
               sampling: sampling_lib.Sampling = sampling_lib.Sampling(),
               beam_size: int = 1, length_penalty: float = 0.6,
               replicate_params: bool | None = None,
               buckets: Sequence[int] | None = None, compact: int = 4,
               screen: bool | None = None, loop_layout: bool | None = None):
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
    if compact < 1:
      raise ValueError(f'compact={compact}: use 1 (never) or a factor such as 4')
    greedy_fp32 = (beam_size == 1 and sampling.greedy
                   and jnp.dtype(run.compute_dtype) == jnp.float32)
    if screen and not greedy_fp32:
      raise ValueError('screen=True needs greedy decoding (beam_size=1, temperature=0) '
                       'in float32 compute')
    divisor = sharding_lib.batch_divisor(run.mesh)
    self.batch_size = -(-batch_size // divisor) * divisor
    self.row_counts = _row_counts(self.batch_size, divisor)
    self.compact, self._divisor = compact, divisor
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
    # Each device screens its rows against the whole table: only when it holds one.
    self.screen = greedy_fp32 and replicate_params if screen is None else screen
    model = model_lib.make_model(run.model_config)
    if loop_layout is None:
      loop_layout = mesh.devices.flat[0].platform == 'cpu'
    if loop_layout:  # weights transposed once per call, not copied at every token
      layout = loop_layout_lib.LoopLayout.of(run.model_config)
      model, to_loop_layout = layout.wrap(model), layout.params
    else:
      to_loop_layout = lambda tree: tree
    self.loop_layout = loop_layout
    self.model = model  # as the programs run it, on `prepare`d weights
    param_shardings = to_loop_layout(
        jax.tree.map(lambda _: replicated, run.params_shardings) if replicate_params
        else run.params_shardings)
    if self.screen:  # the screen's bf16 table and bound, beside the table, made once per call
      add_screen = sampling_lib.with_screen_tables
      embedder = param_shardings['embedder']
      param_shardings = {**param_shardings, 'embedder': {
          **embedder, **sampling_lib.screen_tables_like(embedder['input_embedding'], replicated)}}
    else:
      add_screen = lambda tree: tree
    self._param_shardings = param_shardings
    # The one reshard per call: cast, lay out for the loop, then (when replicating) gather.
    def prepare(params):
      return add_screen(to_loop_layout(jax.tree.map(lambda x: x.astype(compute_dtype), params)))
    self._prepare = jax.jit(prepare, in_shardings=(run.params_shardings,),
                            out_shardings=param_shardings)
    self._abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(prepare, run.abstract_params), param_shardings)

    def cache_constraint(cache):
      # Rows over the batch axes like the batch; the shared write index everywhere.
      return {name: {k: jax.lax.with_sharding_constraint(
                  v, replicated if k == 'end_index' else rows) for k, v in layer.items()}
              for name, layer in cache.items()}

    common = dict(model=model,
                  cache_constraint=cache_constraint, compute_dtype=compute_dtype,
                  stop_ids=self.stop_ids, max_decode_len=max_decode_len)
    if beam_size > 1:
      self._fn = functools.partial(beam_lib.search, beam_size=beam_size,
                                   length_penalty=length_penalty, mesh=mesh, **common)
    else:
      self._fn = functools.partial(sampling_lib.generate, sampling=sampling,
                                   screen=self.screen, mesh=mesh, **common)
    self._compiled: dict[tuple[int, int], Any] = {}
    # On a CPU, XLA's copy insertion with region analysis copies each KV-cache
    # array three times a step, not four (it is updated in place, then read
    # whole): about 4% of a decode step at batch 64 on Gemma 3 270M.
    self._compiler_options = ({'xla_cpu_copy_insertion_use_region_analysis': True}
                              if mesh.devices.flat[0].platform == 'cpu' else None)

  # --- compiled programs -----------------------------------------------------

  def bucket(self, longest_prompt: int) -> int:
    """The compiled prompt length a batch whose longest prompt has this many tokens uses."""
    return next(b for b in self.buckets if b >= longest_prompt)

  def rows_for(self, prompts: int) -> int:
    """The compiled row count a batch of this many prompts runs in."""
    return next(b for b in self.row_counts if b >= prompts)

  def compact_to(self, B: int) -> int:
    """The rows a batch of B moves to when that few are still going (0: never)."""
    if self.beam_size > 1 or self.compact == 1:
      return 0
    small = B // self.compact
    return small if small >= MIN_ROWS and small % self._divisor == 0 else 0

  def executable(self, P: int, B: int | None = None):
    """The program for prompt length P (a bucket) and B rows (default batch_size),
    compiled on first use and kept."""
    B = B or self.batch_size
    if (P, B) not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[P, B] = self._compile(P, B)
      self.compile_seconds += time.perf_counter() - t0
      logging.info('compiled the decoder for prompts of %d tokens (batch %d, beam %d, '
                   'new tokens %d) in %.1fs', P, B, self.beam_size, self.max_decode_len,
                   time.perf_counter() - t0)
    return self._compiled[P, B]

  def _compile(self, P: int, B: int):
    return self._lower(P, B).compile(self._compiler_options)

  def _lower(self, P: int, B: int):
    rep = self._replicated
    rng = jax.random.key_data(jax.random.key(0))
    fn = self._fn if self.beam_size > 1 else functools.partial(
        self._fn, compact_to=self.compact_to(B))
    jitted = jax.jit(fn, in_shardings=(self._param_shardings, self._prompt_sharding,
                                       self._length_sharding, rep),
                     out_shardings=(rep,) * 3)
    return jitted.lower(
        self._abstract_params,
        jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=self._prompt_sharding),
        jax.ShapeDtypeStruct((B,), jnp.int32, sharding=self._length_sharding),
        jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep))

  def compile_for(self, prompts: Sequence[Sequence[int]]) -> None:
    """Compiles, now, every program `generate(params, prompts)` will use.

    Each program starts compiling in a thread (XLA releases the GIL) as soon
    as it is lowered, so the next one lowers in Python meanwhile, and cores a
    single compile leaves idle are used. Most rows first: those compile longest.
    """
    keys = {(self.bucket(max(len(prompts[i]) for i in batch)), self.rows_for(len(batch)))
            for batch in self.batch_order(prompts)}
    todo = sorted(keys - set(self._compiled), key=lambda PB: PB[::-1], reverse=True)
    if not todo:
      return
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(todo)) as pool:
      compiling = [pool.submit(self._lower(P, B).compile, self._compiler_options)
                   for P, B in todo]
      self._compiled.update(zip(todo, (c.result() for c in compiling)))
    self.compile_seconds += time.perf_counter() - t0
    logging.info('compiled the decoder for %s (prompt tokens, rows) side by side in %.1fs',
                 todo, time.perf_counter() - t0)

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
    outputs = self.executable(*prompt_BP.shape[::-1])(
        prepared, _global(prompt_BP, self._prompt_sharding),
        _global(length_B, self._length_sharding), _global(np.asarray(rng), self._replicated))
    # Replicated: every process holds the whole array on each of its devices.
    outputs = [np.asarray(x.addressable_data(0)) for x in outputs]
    tokens_BT = outputs[0]
    steps, fallbacks = (int(outputs[2]), 0) if self.beam_size > 1 else map(int, outputs[1:])
    stops = set(self.stop_ids)
    tokens = []
    for r in range(len(prompts)):
      row = tokens_BT[r].tolist()
      end = next((i for i, t in enumerate(row) if t in stops), len(row))
      tokens.append(row[:end])
    scores = outputs[1][:len(prompts)].tolist() if self.beam_size > 1 else None
    return Batch(tokens, scores, steps, fallbacks)

  def layout(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts left-padded to their bucket [B, P] (filler rows empty) in the
    smallest row count that holds them, and lengths [B]."""
    if not 0 < len(prompts) <= self.batch_size:
      raise ValueError(f'{len(prompts)} prompts for a batch of {self.batch_size}')
    B = self.rows_for(len(prompts))
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

  def translate_batches(self, params, sources: Sequence[str], first_line: int = 1,
                        window: int = 8) -> Iterator[list[str]]:
    """Translations of `sources` in input order, `window` batches' worth at a time.

    Within each window prompts are batched shortest first (`batch_order`), so
    a batch's rows end at similar steps; a window's lines come out together.
    An empty (or blank) source gives an empty translation without decoding.
    """
    prepared, batch_index = None, 0
    size = self.batch_size * window
    for start in range(0, len(sources), size):
      chunk = sources[start:start + size]
      todo = [i for i, s in enumerate(chunk) if s.strip()]
      prompts = [self._encode_prompt(chunk[i], first_line + start + i) for i in todo]
      out = [''] * len(chunk)
      if prompts:
        prepared = self.prepare(params) if prepared is None else prepared
        for rows in self.batch_order(prompts):
          result = self.run_batch(prepared, [prompts[r] for r in rows], batch_index)
          batch_index += 1
          for r, ids in zip(rows, result.tokens):
            out[todo[r]] = self.detokenize(ids)
      yield out

  def translate(self, params, sources: Sequence[str]) -> list[str]:
    return [t for batch in self.translate_batches(params, sources) for t in batch]

  def detokenize(self, ids: Sequence[int]) -> str:
    """Generated ids -> the answer text, cut at its first stop string."""
    return tokenizer_lib.cut_answer(self.tokenizer.decode(ids), self.chat_template).strip()


def _row_counts(batch_size: int, divisor: int) -> tuple[int, ...]:
  """batch_size and its halves down to MIN_ROWS that split over the batch axes, ascending."""
  out = [batch_size]
  while out[-1] % 2 == 0 and out[-1] // 2 >= MIN_ROWS and (out[-1] // 2) % divisor == 0:
    out.append(out[-1] // 2)
  return tuple(reversed(out))


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
