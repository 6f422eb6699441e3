"""Tiny-config training speed on this machine, measured side by side.

    uv run python benchmarks/train_speed.py [--repeats 3] [--steps 80]

Runs `python -m mtnt_tpu.main --config configs/tiny_cpu.py` as a user would:
  * steps/s on 1 faked CPU device vs 8 faked devices (mesh 2 x 4), same batch;
  * time to the first step with a cold vs a warm persistent compilation cache.
The runs alternate within each repeat, so machine noise hits both sides alike;
the table reports medians and the ratios. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from mtnt_tpu import commands
from mtnt_tpu import metrics


def run(workdir: str, *flags: str) -> list[dict]:
  r = commands.run(commands.tiny_main(
      workdir, '--config.eval.decode_examples=0', '--config.train.eval_at_start=False',
      '--config.train.eval_every=100000', '--config.train.checkpoint_every=100000', *flags))
  if r.returncode:
    sys.exit(f'benchmark run failed:\n{r.stderr[-3000:]}')
  return metrics.read(workdir)


def steady_step_time(rows: list[dict]) -> float:
  times = [r['step_time'] for r in rows if 'step_time' in r]
  return statistics.median(times[1:])  # the first interval holds the first step's wait


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--steps', type=int, default=80)
  args = ap.parse_args()
  steps = (f'--config.train.num_steps={args.steps}', '--config.train.log_every=10')
  one, eight, cold, warm, cold_compile, warm_compile = [], [], [], [], [], []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.repeats):
      d = lambda name: os.path.join(tmp, f'{name}{i}')
      rows = run(d('one'), *steps, '--config.runtime.cpu_devices=1', '--config.mesh.data=1',
                 '--config.mesh.fsdp=1', '--config.runtime.compilation_cache=off')
      one.append(steady_step_time(rows))
      rows = run(d('eight'), *steps, '--config.runtime.compilation_cache=off')
      eight.append(steady_step_time(rows))
      cache = f'--config.runtime.compilation_cache={d("cache")}'
      for out, comp, name in ((cold, cold_compile, 'cold'), (warm, warm_compile, 'warm')):
        (start,) = [r for r in run(d(name), '--config.train.num_steps=1', cache)
                    if 'time_to_first_step' in r]
        out.append(start['time_to_first_step'])
        comp.append(start['compile_time'])
  med = statistics.median
  print(f'| measure | value (median of {args.repeats}) |')
  print('|---|---|')
  print(f'| steps/s, 1 faked CPU device (mesh 1x1) | {1 / med(one):.2f} |')
  print(f'| steps/s, 8 faked CPU devices (mesh 2x4) | {1 / med(eight):.2f} |')
  print(f'| ratio 8 / 1 devices | {med(one) / med(eight):.2f} |')
  print(f'| time to first step, cold cache (s) | {med(cold):.1f} (compile {med(cold_compile):.1f}) |')
  print(f'| time to first step, warm cache (s) | {med(warm):.1f} (compile {med(warm_compile):.1f}) |')
  print(f'| ratio cold / warm | {med(cold) / med(warm):.2f} |')


if __name__ == '__main__':
  main()
