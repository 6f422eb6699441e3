"""A trained workdir behind compiled decoders, one per (beam, prompt length, batch) bucket.

Every decoder is compiled when the server starts, so no request waits on a
compile. The sentences of whatever requests the batcher collected are packed
into batches, each padded to the shortest compiled prompt length and the
smallest compiled batch size that hold it. Prompts are left-padded and
padding is masked (decode.py), so a sentence translates the same in any
bucket and beside any neighbours (tests/test_serve.py checks concurrent
requests against each alone).

Encoding (`encode`) runs on the server's event loop and checks each text
against the prompt budget before anything is queued; decoding (`translate`)
runs on the one thread that makes JAX calls.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
from typing import Any, Sequence

from absl import logging

from mtnt_tpu import decode as decode_lib
from mtnt_tpu import sharding as sharding_lib
from mtnt_tpu import workdir as workdir_lib

# What /v1/model reports of the checkpoint's eval (metrics.jsonl).
EVAL_METRICS = ('eval_bleu', 'eval_chrf', 'eval_loss')


def decoder_has_beam_search() -> bool:
  """Whether the installed decode.Decoder takes a `beam_size` option."""
  return 'beam_size' in inspect.signature(decode_lib.Decoder).parameters


@dataclasses.dataclass(frozen=True)
class Buckets:
  """The compiled shapes: every (beam size, prompt length, batch size) combination."""
  prompt_lens: tuple[int, ...]  # ascending; the last is the prompt budget
  batch_sizes: tuple[int, ...]  # ascending; Translator rounds them up to the mesh's batch axes
  beam_sizes: tuple[int, ...] = (1,)  # 1: greedy
  max_decode_len: int = 64

  def __post_init__(self):
    for name in ('prompt_lens', 'batch_sizes', 'beam_sizes'):
      values = getattr(self, name)
      if not values or list(values) != sorted(set(values)) or values[0] < 1:
        raise ValueError(f'--{name}={",".join(map(str, values))}: give distinct positive '
                         'sizes in ascending order')
    if self.prompt_lens[0] < 2:
      raise ValueError(f'--prompt_lens={self.prompt_lens[0]} is too short: a prompt has '
                       'at least BOS and one token')
    if 1 not in self.beam_sizes:
      raise ValueError(f'--beam_sizes={",".join(map(str, self.beam_sizes))} must include 1 '
                       '(greedy), the default decoding')
    if self.max_decode_len < 1:
      raise ValueError(f'--max_decode_len={self.max_decode_len} must be >= 1')

  @property
  def prompt_budget(self) -> int:
    return self.prompt_lens[-1]

  def prompt_len_for(self, n_tokens: int) -> int:
    return next(p for p in self.prompt_lens if p >= n_tokens)


def default_prompt_lens(budget: int) -> tuple[int, ...]:
  """Powers of two from 32 below `budget`, then `budget` itself."""
  lens, p = [], 32
  while p < budget:
    lens.append(p)
    p *= 2
  return (*lens, budget)


class TextError(ValueError):
  """A text this server cannot translate; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One sentence, encoded and checked against the budget."""
  ids: tuple[int, ...]
  truncated: bool  # the source was cut to fit the prompt budget
  beam_size: int = 1


@dataclasses.dataclass(frozen=True)
class Translation:
  text: str
  seconds: float  # wall time of the compiled batch it was decoded in
  batch_rows: int  # sentences in that batch (the rest of its rows were padding)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the page and GET /v1/model show about the checkpoint being served."""
  workdir: str  # the directory's name only: a request never learns server paths
  variant: str
  step: int
  origin: str  # 'best' or 'checkpoints'
  metrics: dict[str, float]  # the eval of that step, where metrics.jsonl has one
  src_lang: str
  dst_lang: str


class Translator:
  """Compiles the decoders of `buckets` for `trained`; then encodes and translates."""

  def __init__(self, trained: workdir_lib.Trained, info: ModelInfo, buckets: Buckets):
    if max(buckets.beam_sizes) > 1 and not decoder_has_beam_search():
      raise ValueError(f'--beam_sizes={",".join(map(str, buckets.beam_sizes))}: this '
                       'decoder has no beam search; pass --beam_sizes=1')
    self.info, self.buckets = info, buckets
    self._params = trained.params
    c = trained.setup.config
    self._tokenizer = trained.setup.tokenizer
    self._dst_lang, self._chat_template = c.data.dst_lang, c.model.chat_template
    # Batches are split over the mesh's batch axes: round sizes up as Decoder would.
    divisor = sharding_lib.batch_divisor(trained.setup.mesh)
    self.batch_sizes = tuple(sorted({-(-b // divisor) * divisor for b in buckets.batch_sizes}))
    t0 = time.perf_counter()
    self._decoders: dict[tuple[int, int, int], decode_lib.Decoder] = {}
    for beam in buckets.beam_sizes:
      for p in buckets.prompt_lens:
        for smaller, b in zip((0, *self.batch_sizes), self.batch_sizes):
          options = {'beam_size': beam} if beam > 1 else {}
          d = self._decoders[beam, p, b] = decode_lib.Decoder(
              trained.setup, self._tokenizer, batch_size=b, max_prompt_len=p,
              max_decode_len=buckets.max_decode_len, dst_lang=self._dst_lang,
              chat_template=self._chat_template, buckets=(p,), **options)
          # translate() gives this decoder batches of smaller+1 .. b prompts.
          for rows in sorted({d.rows_for(n) for n in range(smaller + 1, b + 1)}):
            d.executable(p, rows)
    self.compile_seconds = time.perf_counter() - t0
    logging.info('compiled %d decoders in %.1fs', len(self._decoders), self.compile_seconds)

  # --- on the event loop -------------------------------------------------------

  def encode(self, text: str, *, truncate: bool, beam_size: int = 1) -> Prompt:
    """The prompt of one text; over the budget: cut it (`truncate`) or TextError."""
    tok, budget = self._tokenizer, self.buckets.prompt_budget
    ids = tok.encode_prompt(text, self._dst_lang, self._chat_template)
    if len(ids) <= budget:
      return Prompt(tuple(ids), False, beam_size)
    if not truncate:
      raise TextError(f'is {len(ids)} tokens as a prompt, over this server\'s budget of '
                      f'{budget} (--prompt_lens); split it, or send "truncate": true to cut it')
    # The decoder's own cut (shrinks the source until the prompt fits, with a warning).
    decoder = self._decoders[beam_size, budget, self.batch_sizes[0]]
    return Prompt(tuple(decoder.encode_prompts([text])[0]), True, beam_size)

  # --- on the JAX thread -------------------------------------------------------

  def translate(self, prompts: Sequence[Prompt]) -> list[Translation]:
    """Translations of `prompts`, in order, in as few compiled batches as hold them.

    Prompts are grouped by beam size and sorted by length (similar lengths
    finish together); each batch runs in the shortest compiled prompt length
    and the smallest compiled batch size that hold it.
    """
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
      groups.setdefault(p.beam_size, []).append(i)
    out: list[Translation | None] = [None] * len(prompts)
    largest = self.batch_sizes[-1]
    for beam, rows in groups.items():
      rows.sort(key=lambda i: len(prompts[i].ids))
      for start in range(0, len(rows), largest):
        chunk = rows[start:start + largest]
        plen = self.buckets.prompt_len_for(len(prompts[chunk[-1]].ids))
        batch = next(b for b in self.batch_sizes if b >= len(chunk))
        decoder = self._decoders[beam, plen, batch]
        t0 = time.perf_counter()
        ids = decoder.generate(self._params, [prompts[i].ids for i in chunk])
        texts = [decoder.detokenize(x) for x in ids]
        seconds = time.perf_counter() - t0
        for i, text in zip(chunk, texts):
          out[i] = Translation(text, seconds, len(chunk))
    return out


def model_info(workdir: str, trained: workdir_lib.Trained) -> ModelInfo:
  """The served checkpoint's facts, with its eval metrics from WORKDIR/metrics.jsonl."""
  c = trained.setup.config
  return ModelInfo(workdir=os.path.basename(os.path.normpath(workdir)),
                   variant=c.model.variant, step=trained.step, origin=trained.origin,
                   metrics=_eval_metrics(os.path.join(workdir, 'metrics.jsonl'), trained.step),
                   src_lang=c.data.get('src_lang', 'English'), dst_lang=c.data.dst_lang)


def _eval_metrics(path: str, step: int) -> dict[str, float]:
  """The last eval row of `step` (a resumed run may have logged it twice)."""
  found: dict[str, Any] = {}
  try:
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a killed run
        if isinstance(row, dict) and row.get('step') == step and 'eval_bleu' in row:
          found = row
  except OSError:
    logging.warning('%s is unreadable: the page shows no eval metrics', path)
  return {k: float(found[k]) for k in EVAL_METRICS if isinstance(found.get(k), (int, float))}
