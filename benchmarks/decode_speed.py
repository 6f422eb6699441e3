"""Decoding speed: mtnt_tpu's Decoder vs gemma's classic Sampler, same sentences, same model.

    uv run python benchmarks/decode_speed.py --checkpoint DIR --tokenizer FILE \
        --source /work/shared/data/multi30k/val.en [--sentences 200] [--batch_size 64] \
        [--samplers 64,8+logits] [--before] [--unscreened] [--compilation_cache DIR]

Loads a Kaggle-layout Gemma checkpoint (--variant) on this host's devices,
takes the first --sentences lines of --source, and decodes them greedily (the
plain prompt, at most --max_decode_len new tokens), shortest prompts first, in
batches of --batch_size, with:

- `decode.Decoder` as evaluation and `translate` use it (prompt buckets,
  weights prepared once, stops when every row has ended);
- with --before, the Decoder with one prompt length (max_prompt_len) as it
  was before prompt buckets;
- with --unscreened, the Decoder without its bf16 argmax screen and loop
  layout (`decode.Decoder(screen=False, loop_layout=False)`);
- gemma's `gemma.sampler.Sampler` (gemma 2.0.8), fed the same prompt ids,
  once per --samplers entry: BATCH runs it in batches of BATCH with
  `return_logits=False`; BATCH+logits with the Sampler's own default,
  `return_logits=True`, which keeps a [B, L, vocab] fp32 buffer and copies
  each row's into Python lists (at 262k pieces about 0.5 GB a row for 64 new
  tokens): that is most of such a Sampler's time and memory, and bounds its
  batch. The default is --batch_size without logits.

The contenders take turns, a chunk of the largest batch size at a time (each
splits it into its own batches), so the machine's other load falls on each
alike. Times are wall-clock with compiles included (the Decoder's
compile time is also given alone). With --compilation_cache a second run
finds every program compiled, as `translate` does after training's evals
(both keep JAX's cache in the workdir). Answers are compared as text, each
cut at its first newline as `translate` writes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

import jax
from gemma import sampler as gemma_sampler
from gemma import transformer as gemma_transformer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (the repository root, for configs/)
from mtnt_tpu import decode as decode_lib
from mtnt_tpu import formats
from mtnt_tpu import runtime
from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu import train


def _load(args):
  tok = tokenizer_lib.Tokenizer(args.tokenizer)
  c = common.get_config()
  c.model.variant, c.model.checkpoint, c.tokenizer.path = args.variant, args.checkpoint, args.tokenizer
  c.train.batch_size = jax.local_device_count()
  run = train.build_without_files(c, jax.local_devices(), tok.vocab_size)
  run = dataclasses.replace(run, tokenizer=tok)
  return run, formats.load(args.checkpoint, run.abstract_params, args.variant)


@dataclasses.dataclass
class _Contender:
  name: str
  decode: Callable[[list[int]], list[str]]  # prompt indices -> answers
  seconds: float = 0.0  # compiles included
  compile_seconds: float | None = None
  answers: dict = dataclasses.field(default_factory=dict)
  steps: list = dataclasses.field(default_factory=lambda: [0, 0])  # Decoder: run, fell back


def _decoder(run, params, prompts, args, name, **options) -> _Contender:
  t0 = time.perf_counter()
  d = decode_lib.Decoder(run, run.tokenizer, max_prompt_len=args.max_prompt_len,
                         max_decode_len=args.max_decode_len, **options)
  d.compile_for(prompts)
  prepared = d.prepare(params)
  jax.block_until_ready(prepared)
  def decode(rows):
    answers = []
    for start in range(0, len(rows), d.batch_size):
      batch = d.run_batch(prepared, [prompts[i] for i in rows[start:start + d.batch_size]])
      answers += [d.detokenize(x) for x in batch.tokens]
      c.steps[0] += batch.steps
      c.steps[1] += batch.fallbacks
    return answers
  c = _Contender(name.format(batch=d.batch_size, buckets=d.buckets), decode)
  c.seconds = time.perf_counter() - t0
  c.compile_seconds = d.compile_seconds
  return c


def _sampler(run, params, prompts, args, batch_size: int, return_logits: bool) -> _Contender:
  """gemma's Sampler over the same prompts (it adds BOS to the text itself), batch by batch."""
  tok = run.tokenizer
  s = gemma_sampler.Sampler(gemma_transformer.Transformer(run.model_config), tok.processor,
                            params, cache_length=args.max_prompt_len + args.max_decode_len)
  texts = [tok.decode(p[1:]) for p in prompts]
  assert all(s.tokenize(t).tolist() == p for t, p in zip(texts, prompts)), 'the same prompt ids'
  def decode(rows):
    answers = []
    for start in range(0, len(rows), batch_size):
      result = s([texts[i] for i in rows[start:start + batch_size]],
                 total_generation_steps=args.max_decode_len, return_logits=return_logits)
      answers += [tokenizer_lib.cut_answer(t).strip() for t in result.text]
    return answers
  return _Contender(f'gemma.sampler.Sampler, batch {batch_size}, '
                    f'return_logits={return_logits}', decode)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--checkpoint', required=True, help='Kaggle-layout orbax checkpoint dir')
  ap.add_argument('--tokenizer', required=True)
  ap.add_argument('--variant', default='gemma3_270m')
  ap.add_argument('--source', required=True, help='one English sentence per line')
  ap.add_argument('--sentences', type=int, default=200)
  ap.add_argument('--batch_size', type=int, default=64)
  ap.add_argument('--max_prompt_len', type=int, default=128)
  ap.add_argument('--max_decode_len', type=int, default=64)
  ap.add_argument('--samplers', default='',
                  help='comma-separated BATCH or BATCH+logits (return_logits=True, the '
                  "Sampler's default); empty: --batch_size")
  ap.add_argument('--before', action='store_true', help='also time the Decoder as it was')
  ap.add_argument('--unscreened', action='store_true',
                  help='also time the Decoder with neither the bf16 argmax screen nor the '
                  'loop layout of the weights')
  ap.add_argument('--compilation_cache', default='',
                  help="a directory for JAX's persistent compilation cache, as training and "
                  'translate keep one in the workdir: run twice to time a warm start')
  args = ap.parse_args()
  if args.compilation_cache:
    runtime.enable_compilation_cache(args.compilation_cache, '')
  samplers = [(int(x.split('+')[0]), x.endswith('+logits'))
              for x in (args.samplers or str(args.batch_size)).split(',')]
  with open(args.source, encoding='utf-8') as f:
    sources = f.read().splitlines()[:args.sentences]
  run, params = _load(args)
  print(f'{len(sources)} sentences, {args.variant} ({jax.numpy.dtype(run.compute_dtype).name} '
        f'compute), {jax.local_device_count()} {jax.devices()[0].platform} device(s), greedy, '
        f'{args.max_decode_len} new tokens at most', flush=True)
  prompts = decode_lib.Decoder(run, run.tokenizer, batch_size=args.batch_size,
                               max_prompt_len=args.max_prompt_len,
                               max_decode_len=args.max_decode_len).encode_prompts(sources)
  contenders = [_decoder(run, params, prompts, args,
                         'mtnt_tpu Decoder, batch {batch}, prompt buckets {buckets}',
                         batch_size=args.batch_size)]
  if args.before:
    contenders.append(_decoder(
        run, params, prompts, args, 'mtnt_tpu Decoder as before: batch {batch}, one prompt '
        'length {buckets}', batch_size=args.batch_size, buckets=(args.max_prompt_len,)))
  if args.unscreened:
    contenders.append(_decoder(
        run, params, prompts, args, 'mtnt_tpu Decoder, batch {batch}, no screen, no loop layout',
        batch_size=args.batch_size, screen=False, loop_layout=False))
  contenders += [_sampler(run, params, prompts, args, b, logits) for b, logits in samplers]
  # Chunk by chunk in turn, so the machine's other load falls on every contender alike.
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  chunk = max(args.batch_size, *(b for b, _ in samplers))
  for start in range(0, len(order), chunk):
    rows = order[start:start + chunk]
    for c in contenders:
      t0 = time.perf_counter()
      c.answers.update(zip(rows, c.decode(rows)))
      c.seconds += time.perf_counter() - t0
    print(f'{start + len(rows)}/{len(prompts)} sentences: ' +
          ', '.join(f'{c.seconds:.1f}s' for c in contenders), flush=True)

  first = contenders[0]
  print('\n| decoder | seconds (compiles included) | of which compiling | sentences/s | '
        'its time / the Decoder\'s | answers equal to the Decoder\'s |')
  print('|---|---:|---:|---:|---:|---:|')
  for c in contenders:
    same = sum(c.answers[i] == first.answers[i] for i in range(len(prompts)))
    compile_s = '' if c.compile_seconds is None else f'{c.compile_seconds:.1f}'
    print(f'| {c.name} | {c.seconds:.1f} | {compile_s} | {len(prompts) / c.seconds:.2f} | '
          f'{c.seconds / first.seconds:.1f}x | {same}/{len(prompts)} |')
  print(f'\nThe Decoder ran {first.steps[0]} token steps; in {first.steps[1]} of them its bf16 '
        'screen could not prove some row\'s token and computed the fp32 logits.')
  for c in contenders[1:]:
    for i in range(len(prompts)):
      if first.answers[i] != c.answers[i]:
        print(f'differs, line {i + 1}:\n  Decoder: {first.answers[i]!r}\n'
              f'  {c.name}: {c.answers[i]!r}')

if __name__ == '__main__':
  main()
