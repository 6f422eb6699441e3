"""Evaluation over the eval split: loss and token accuracy, BLEU and chrF.

Eval rows are tokenized once, packed as training packs them (several
examples per row when config.data.packing), and cached on the host; each eval
runs the jitted eval step over all of them and adds up sums, so the loss is
exact for the split whatever the packing, batch size or host count.

Translation quality (config.eval.decode_examples != 0): the split's sources
(all, or the first N) are decoded with `decode.Decoder` on the training mesh
(greedy, or beam search with config.eval.beam_size > 1), in batches of
config.eval.decode_batch_size, and scored with sacrebleu's corpus BLEU and
chrF. The prompt-length buckets the split needs are compiled at start-up.
Every process decodes the same global batches and receives every hypothesis,
so every process computes the same scores (the best-checkpoint decision in
train.py must agree across processes); only process 0 writes
WORKDIR/samples/step_N.txt.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from sacrebleu.metrics import BLEU, CHRF

from mtnt_tpu import decode as decode_lib
from mtnt_tpu.data import pipeline
from mtnt_tpu.data import records

SAMPLE_FIELDS = ('source', 'reference', 'hypothesis')


@dataclasses.dataclass(frozen=True)
class Sample:
  source: str
  reference: str
  hypothesis: str


class Evaluator:
  """Eval loss over the whole eval split, and BLEU/chrF of greedy translations."""

  def __init__(self, run, eval_step, workdir: str):
    c = run.config
    check_config(c)
    shard = pipeline.HostShard.current()
    self._batches = list(pipeline.eval_batches(c.data, run.tokenizer, run.local_batch, shard,
                                               chat_template=c.model.chat_template))
    self._run = run
    self._workdir = workdir
    self._step = eval_step
    self._decoder = None
    if c.eval.decode_examples != 0:
      pairs = eval_pairs(c.data, c.eval.decode_examples)
      self._sources = [p.src for p in pairs]
      self._references = [p.dst for p in pairs]
      self._decoder = decode_lib.Decoder(
          run, run.tokenizer, batch_size=c.eval.decode_batch_size,
          max_prompt_len=c.data.max_len, max_decode_len=c.eval.max_decode_len,
          dst_lang=c.data.dst_lang, chat_template=c.model.chat_template,
          beam_size=c.eval.beam_size, length_penalty=c.eval.length_penalty)
      self._prompts = self._decoder.encode_prompts(self._sources)
      self._decoder.compile_for(self._prompts)
      d = self._decoder
      logging.info('compiled the decoder (batch %d, beam %d, prompt buckets %s, new tokens %d, '
                   'weights %s) in %.1fs; %d eval examples to translate', d.batch_size,
                   d.beam_size, d.buckets, c.eval.max_decode_len,
                   'replicated' if d.replicate_params else 'sharded', d.compile_seconds,
                   len(self._sources))
      self._bleu, self._chrf = BLEU(), CHRF()
      self._signatures_logged = False

  def __call__(self, params, step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    scores = {}
    if self._run.config.eval.get('loss', True):
      scores = self._loss(params)
      scores['eval_loss_seconds'] = time.perf_counter() - t0
    if self._decoder is not None:
      scores.update(self._quality(params, step))
    scores['eval_seconds'] = time.perf_counter() - t0
    return scores

  def _loss(self, params) -> dict[str, float]:
    totals = None
    for local in self._batches:
      sums = self._step(params, pipeline.to_global(local, self._run.batch_sharding))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    t = jax.device_get(totals)
    n = max(float(t['target_tokens']), 1.0)
    return {'eval_loss': float(t['loss_sum']) / n, 'eval_accuracy': float(t['correct']) / n,
            'eval_target_tokens': float(t['target_tokens'])}

  def _quality(self, params, step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    ids = self._decoder.generate(params, self._prompts)
    hypotheses = [self._decoder.detokenize(x) for x in ids]
    decode_s = time.perf_counter() - t0
    bleu = self._bleu.corpus_score(hypotheses, [self._references])
    chrf = self._chrf.corpus_score(hypotheses, [self._references])
    if not self._signatures_logged and jax.process_index() == 0:
      logging.info('eval_bleu is sacrebleu %s; eval_chrf is sacrebleu %s',
                   self._bleu.get_signature(), self._chrf.get_signature())
      self._signatures_logged = True
    n = self._run.config.eval.num_logged_examples
    if jax.process_index() == 0 and n > 0:
      write_samples(os.path.join(self._workdir, 'samples', f'step_{step}.txt'),
                    [Sample(*x) for x in zip(self._sources[:n], self._references[:n],
                                             hypotheses[:n])])
    return {'eval_bleu': bleu.score, 'eval_chrf': chrf.score, 'eval_decode_seconds': decode_s}


def check_config(c) -> None:
  """config.eval's decoding fields, checked before anything compiles."""
  # .get: a workdir's config.json from before these fields existed still loads.
  e = c.eval
  if e.get('decode_batch_size', 1) < 1:
    raise ValueError(f'config.eval.decode_batch_size={e.decode_batch_size}: use 1 or more '
                     'sentences per decoded batch')
  if e.get('beam_size', 1) < 1:
    raise ValueError(f'config.eval.beam_size={e.beam_size}: use 1 (greedy) or more beams')
  if e.get('length_penalty', 0) < 0:
    raise ValueError(f'config.eval.length_penalty={e.length_penalty}: use alpha >= 0 '
                     '(0: no length penalty)')


def eval_pairs(data_cfg, num_examples: int) -> list[records.Pair]:
  """The eval split's pairs in order: all when num_examples is -1, else the first N."""
  src = pipeline.source(data_cfg.dir, data_cfg.eval_split)
  n = len(src) if num_examples < 0 else min(num_examples, len(src))
  return [records.decode(src[i]) for i in range(n)]


def write_samples(path: str, samples: Sequence[Sample]) -> None:
  """`source: ...`, `reference: ...`, `hypothesis: ...` and a blank line, per sample.

  Through epath, so a gs:// workdir works too.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(
      ''.join(f'{field}: {_one_line(getattr(s, field))}\n' for field in SAMPLE_FIELDS) + '\n'
      for s in samples))


def read_samples(path: str) -> list[Sample]:
  """The samples `write_samples` wrote."""
  with open(path, encoding='utf-8') as f:
    blocks = f.read().split('\n\n')
  out = []
  for block in blocks:
    if not block.strip():
      continue
    fields = dict(line.split(': ', 1) if ': ' in line else (line.rstrip(':'), '')
                  for line in block.split('\n'))
    out.append(Sample(*(fields[k] for k in SAMPLE_FIELDS)))
  return out


def _one_line(text: str) -> str:
  # Sources and references come from one-line records, hypotheses are cut at
  # the first newline; this only guards the file format.
  return text.replace('\n', ' ')
