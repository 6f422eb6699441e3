"""One-GPU train-step benchmark: Gemma full fine-tuning, random weights, bf16 compute.

    uv sync --extra cuda && uv run python benchmarks/gpu_step.py \
        [--variant gemma_2b] [--shapes 8x1024,16x1024] [--loss_chunk 0,8192] [--steps 10]

For each batch x length and each config.model.loss_chunk (0: whole logits),
builds the trainer's own run (`train.build` on configs/common.py: AdamW, fp32
master weights and optimizer state, bf16 compute, one device), compiles its
train step and times --steps steps after --warmup, each blocked on its result.
Rows are full (one example per row, every token a target), so every token is
real work. Reports per shape:

  step time    median of the blocked steps; the loop's wall clock is checked
               against their sum (a mismatch means the timing is not honest)
  tokens/s     batch x length / step time
  MFU          tokens/s x model FLOPs per token (mtnt_tpu.flops: 6 x params +
               attention) / the device's dense bf16 peak (flops.PEAK_TFLOPS;
               a CPU uses a measured matmul)
  peak memory  the device's peak_bytes_in_use (memory_stats) where the backend
               keeps it, else XLA's compiled estimate (arguments + temporaries)

A shape that does not fit is reported as such and the next one runs. On a CPU,
`--variant tiny` checks the script itself (tests/test_gpu_step.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Result:
  batch: int
  length: int
  loss_chunk: int
  fits: bool
  step_s: float = math.nan
  wall_vs_sum: float = math.nan  # the timed loop's wall clock / the sum of its steps
  tokens_per_s: float = math.nan
  mfu: float = math.nan
  peak_gib: float = math.nan
  peak_source: str = ''
  compile_s: float = math.nan
  first_loss: float = math.nan
  error: str = ''


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--variant', default='gemma_2b', help='mtnt_tpu.model.VARIANTS key')
  p.add_argument('--vocab', type=int, default=32_000,
                 help='vocabulary for variants that take it from a tokenizer (tiny)')
  p.add_argument('--shapes', default='8x1024,16x1024', help='BATCHxLENGTH, comma-separated')
  p.add_argument('--loss_chunk', default='0,8192',
                 help='config.model.loss_chunk values to compare (0: whole logits)')
  p.add_argument('--remat', default='none', help='config.model.remat')
  p.add_argument('--steps', type=int, default=10, help='timed steps per shape')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after the compile')
  p.add_argument('--json', help='also write the results here')
  args = p.parse_args(argv)
  try:
    args.shape_list = [tuple(int(x) for x in s.lower().split('x')) for s in args.shapes.split(',')]
    args.chunk_list = [int(c) for c in args.loss_chunk.split(',')]
  except ValueError:
    p.error(f'--shapes {args.shapes!r} / --loss_chunk {args.loss_chunk!r}: use e.g. '
            '--shapes 8x1024,16x1024 --loss_chunk 0,8192')
  if args.steps < 1 or any(len(s) != 2 or min(s) < 1 for s in args.shape_list):
    p.error('--steps must be >= 1 and every shape BATCHxLENGTH positive')
  return args


def make_config(args, batch: int, length: int, loss_chunk: int):
  sys.path.insert(0, REPO)  # configs/
  from configs import common
  c = common.get_config()
  c.model.variant = args.variant
  c.model.checkpoint = 'random'
  c.model.compute_dtype = 'bfloat16'
  c.model.remat = args.remat
  c.model.loss_chunk = loss_chunk
  c.data.max_len = length
  c.train.batch_size = batch
  c.mesh.data, c.mesh.fsdp = 1, 1
  return c


def full_batch(batch: int, length: int, vocab: int, sharding) -> dict:
  """Random tokens, one example filling each row: every token real and a target."""
  import jax
  import jax.numpy as jnp
  from mtnt_tpu.data import pipeline
  k1, k2 = jax.random.split(jax.random.key(1))
  rows = {'inputs': jax.random.randint(k1, (batch, length), 0, vocab, jnp.int32),
          'targets': jax.random.randint(k2, (batch, length), 0, vocab, jnp.int32),
          'mask': jnp.ones((batch, length), jnp.int32),
          'positions': jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
          'segment_ids': jnp.ones((batch, length), jnp.int32)}
  return {k: jax.device_put(rows[k], sharding) for k in pipeline.MODEL_KEYS}


def measure(args, batch: int, length: int, loss_chunk: int, device,
            peak_flops: float) -> Result:
  import jax
  from mtnt_tpu import flops
  from mtnt_tpu import train
  from mtnt_tpu import state as state_lib
  config = make_config(args, batch, length, loss_chunk)
  run = train.build_without_files(config, [device], args.vocab)
  t0 = time.perf_counter()
  step = train.lower_steps(run).train.compile()
  compile_s = time.perf_counter() - t0
  state = state_lib.init_state(run, jax.random.key(0))
  data = full_batch(batch, length, run.model_config.num_embed, run.batch_sharding)
  state, m = step(state, data, {})
  first_loss = float(m['loss'])
  for _ in range(args.warmup):
    state, m = step(state, data, {})
  jax.block_until_ready(state)
  times = []
  t_loop = time.perf_counter()
  for _ in range(args.steps):
    t = time.perf_counter()
    state, m = step(state, data, {})
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  wall = time.perf_counter() - t_loop
  if not math.isfinite(float(m['loss'])):
    raise FloatingPointError(f'loss {float(m["loss"])} after {args.steps} steps')
  step_s = statistics.median(times)
  cfg = run.model_config
  params = sum(math.prod(p.shape) for p in jax.tree.leaves(run.abstract_params))
  per_token = flops.per_token(params, cfg.num_layers, cfg.num_heads, cfg.head_dim, length)
  tokens_per_s = batch * length / step_s
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    peak, source = stats['peak_bytes_in_use'], 'device'
  else:
    mem = step.memory_analysis()
    peak, source = mem.argument_size_in_bytes + mem.temp_size_in_bytes, 'compiled'
  return Result(batch=batch, length=length, loss_chunk=loss_chunk, fits=True, step_s=step_s,
                wall_vs_sum=wall / sum(times), tokens_per_s=tokens_per_s,
                mfu=tokens_per_s * per_token / peak_flops if peak_flops else math.nan,
                peak_gib=peak / GIB, peak_source=source, compile_s=compile_s,
                first_loss=first_loss)


def _out_of_memory(e: Exception) -> bool:
  return 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower()


def table(results: list[Result], device_kind: str) -> str:
  out = ['| batch x length (tokens) | loss_chunk | step time (s) | tokens/s | MFU | '
         'peak memory (GiB) | compile (s) | first loss |',
         '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in results:
    shape = f'{r.batch} x {r.length} ({r.batch * r.length})'
    if not r.fits:
      out.append(f'| {shape} | {r.loss_chunk} | does not fit on {device_kind} | | | | | |')
      continue
    out.append(f'| {shape} | {r.loss_chunk} | {r.step_s:.4f} | {r.tokens_per_s:,.0f} | '
               f'{r.mfu:.1%} | {r.peak_gib:.2f} ({r.peak_source}) | {r.compile_s:.0f} | '
               f'{r.first_loss:.4f} |')
  return '\n'.join(out)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  device = jax.devices()[0]
  if device.platform != 'gpu':
    print(f'note: no GPU here; timing {device.device_kind} ({device.platform}) instead',
          file=sys.stderr)
  from mtnt_tpu import flops
  peak_flops, peak_source = flops.peak_per_device(device)  # once: a CPU's is measured
  results = []
  for batch, length in args.shape_list:
    for chunk in args.chunk_list:
      try:
        r = measure(args, batch, length, chunk, device, peak_flops)
      except Exception as e:  # pylint: disable=broad-except
        if not _out_of_memory(e):
          raise
        r = Result(batch=batch, length=length, loss_chunk=chunk, fits=False,
                   error=str(e).splitlines()[0][:300])
      results.append(r)
      print(f'{batch}x{length} loss_chunk={chunk}: ' + (
          f'{r.step_s:.4f} s/step, {r.tokens_per_s:,.0f} tokens/s, MFU {r.mfu:.1%}, '
          f'peak {r.peak_gib:.2f} GiB ({r.peak_source}), wall/sum {r.wall_vs_sum:.3f}'
          if r.fits else f'does not fit ({r.error})'), flush=True)
      if r.fits and abs(r.wall_vs_sum - 1) > 0.1:
        print(f'  warning: the timed loop took {r.wall_vs_sum:.2f}x the sum of its steps',
              file=sys.stderr)
  print(f'\n{args.variant}, {device.device_kind} x 1, bf16 compute, AdamW, remat={args.remat}, '
        f'median of {args.steps} steps after {args.warmup} warm-up, jax {jax.__version__}; '
        f'peak {peak_flops / 1e12:.1f} TFLOP/s ({peak_source})\n')
  print(table(results, device.device_kind))
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'device_kind': device.device_kind, 'platform': device.platform,
                 'variant': args.variant, 'results': [dataclasses.asdict(r) for r in results]},
                f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
