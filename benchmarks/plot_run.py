"""Eval BLEU and loss of one or more runs against step and wall time, as a PNG.

    uv run --extra plot python benchmarks/plot_run.py WORKDIR [WORKDIR ...] --out run.png

Reads each WORKDIR/metrics.jsonl. Wall time counts from the command's start:
the first row's time less its `time_to_first_step`. Left: eval BLEU (and chrF,
dashed) by step; middle: the same by minutes since start; right: training loss
(thin) and eval loss (dots) by step. A run is labelled by its directory name.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def read(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def minutes_since_start(rows: list[dict]) -> list[float | None]:
  first = next((r for r in rows if 'time_to_first_step' in r and 'time' in r), None)
  if first is None:
    return [None] * len(rows)
  start = first['time'] - first['time_to_first_step']
  return [(r['time'] - start) / 60 if 'time' in r else None for r in rows]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('workdirs', nargs='+')
  ap.add_argument('--out', required=True)
  args = ap.parse_args()
  fig, (by_step, by_time, losses) = plt.subplots(1, 3, figsize=(14, 4))
  for workdir in args.workdirs:
    rows = read(workdir)
    name = os.path.basename(os.path.normpath(workdir))
    minutes = minutes_since_start(rows)
    evals = [(r, m) for r, m in zip(rows, minutes) if 'eval_bleu' in r]
    line, = by_step.plot([r['step'] for r, _ in evals], [r['eval_bleu'] for r, _ in evals],
                         'o-', label=f'{name} BLEU')
    by_step.plot([r['step'] for r, _ in evals], [r['eval_chrf'] for r, _ in evals], '--',
                 color=line.get_color(), label=f'{name} chrF')
    timed = [(r, m) for r, m in evals if m is not None]
    by_time.plot([m for _, m in timed], [r['eval_bleu'] for r, _ in timed], 'o-',
                 color=line.get_color(), label=name)
    train = [r for r in rows if 'loss' in r]
    losses.plot([r['step'] for r in train], [r['loss'] for r in train], '-', lw=0.8,
                color=line.get_color(), label=f'{name} train')
    ev = [r for r in rows if 'eval_loss' in r]
    if ev:  # config.eval.loss=False runs have none
      losses.plot([r['step'] for r in ev], [r['eval_loss'] for r in ev], 'o',
                  color=line.get_color(), label=f'{name} eval')
  by_step.set(xlabel='step', ylabel='score', title='eval BLEU / chrF by step')
  by_time.set(xlabel='minutes since the command started', ylabel='BLEU',
              title='eval BLEU by wall time')
  losses.set(xlabel='step', ylabel='loss (nats per target token)', title='loss')
  for ax in (by_step, by_time, losses):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out, dpi=90)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
