"""Seconds per train step of the real-model recipe under each speed lever.

    uv run python benchmarks/recipe_levers.py [--steps 6] [--repeats 2] [LEVER ...]

Builds `configs/gemma3_270m_cpu.py` with each lever's overrides, compiles its
train step and times `--steps` steps on real Multi30k batches (each blocked on
its result, the first step after compile excluded), in rounds so machine noise
hits every lever alike. Weights are random (speed does not depend on their
values); the tokenizer is the converted checkpoint's. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LEVERS = {
    'baseline': {'train.freeze': '', 'model.loss_chunk': 0, 'model.loss_positions': 0.0},
    'chunked_loss': {'train.freeze': '', 'model.loss_positions': 0.0},
    'freeze_embedding': {'train.freeze': 'embedder/', 'model.loss_chunk': 0,
                         'model.loss_positions': 0.0},
    'freeze_embedding_bf16': {'train.freeze': 'embedder/', 'model.loss_chunk': 0,
                              'model.loss_positions': 0.0, 'model.compute_dtype': 'bfloat16'},
    'freeze_chunked': {'train.freeze': 'embedder/', 'model.loss_positions': 0.0},
    'freeze_chunked_targets': {'train.freeze': 'embedder/', 'model.loss_positions': 0.75},
    'freeze_chunked_targets_bf16': {'train.freeze': 'embedder/', 'model.loss_positions': 0.75,
                                    'model.compute_dtype': 'bfloat16'},
    'lora8_targets': {'train.freeze': '', 'lora.rank': 8, 'model.loss_positions': 0.75},
}


def _config(overrides: dict):
  from configs import gemma3_270m_cpu
  from mtnt_tpu import formats
  c = gemma3_270m_cpu.get_config()
  # Random weights of the same shapes (speed does not depend on their values),
  # with the converted checkpoint's tokenizer.
  c.tokenizer.path = formats.tokenizer_path('', c.model.checkpoint)
  c.model.checkpoint = 'random'
  c.update_from_flattened_dict(overrides)
  return c


def time_lever(overrides: dict, steps: int, data_dir: str) -> float:
  import jax
  from mtnt_tpu import train
  from mtnt_tpu import state as state_lib
  from mtnt_tpu.data import pipeline
  c = _config(overrides)
  c.data.dir = data_dir
  run = train.build(c)
  state = state_lib.init_state(run, jax.random.key(0))
  frozen = state_lib.frozen_base(run)  # the LoRA base; {} otherwise
  train_step = train.compile_steps(run).train
  it = iter(pipeline.train_dataset(c.data, c.tokenizer.path, c.train.batch_size,
                                   pipeline.HostShard(0, 1)))
  batches = [pipeline.to_global(next(it), run.batch_sharding) for _ in range(steps + 1)]
  state, m = train_step(state, batches[0], frozen)
  jax.block_until_ready(m)
  times = []
  for b in batches[1:]:
    t0 = time.perf_counter()
    state, m = train_step(state, b, frozen)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  del state, frozen
  gc.collect()
  return statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('levers', nargs='*', default=list(LEVERS))
  ap.add_argument('--steps', type=int, default=6)
  ap.add_argument('--repeats', type=int, default=2)
  ap.add_argument('--data_dir', default=os.path.expanduser('~/data/multi30k'))
  args = ap.parse_args()
  from mtnt_tpu import runtime
  runtime.start(1, runtime.Cluster(None, None, None, 60))
  results = {name: [] for name in args.levers}
  for _ in range(args.repeats):
    for name in args.levers:
      results[name].append(time_lever(LEVERS[name], args.steps, args.data_dir))
      print(f'{name}: {results[name][-1]:.2f} s/step', flush=True)
  base = statistics.median(results[args.levers[0]])
  print(f'| lever | s/step (median of {args.repeats} x {args.steps}) | vs {args.levers[0]} |')
  print('|---|---|---|')
  for name, times in results.items():
    print(f'| {name} | {statistics.median(times):.2f} | {base / statistics.median(times):.2f}x |')


if __name__ == '__main__':
  main()
