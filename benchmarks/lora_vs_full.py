"""Full fine-tuning vs LoRA from the same base, on the tiny config: eval BLEU.

    uv run python benchmarks/lora_vs_full.py [--base_steps 100] [--steps 200] [--rank 8]

1. Trains a base: `configs/tiny_cpu.py` for --base_steps steps, exported with
   `python -m mtnt_tpu.export` (the Kaggle Flax layout).
2. From that base, fine-tunes --steps more steps twice, with the same data,
   schedule and seed: all weights (AdamW), and LoRA adapters only.
3. Prints a markdown table: eval loss and BLEU/chrF at the end, trained
   parameters and checkpoint size. Per-chip memory of Gemma 2B LoRA vs full
   comes from the fit check (benchmarks/fit_check.py), not from this script.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from mtnt_tpu import commands
from mtnt_tpu import metrics


def _run(cmd: list[str]) -> None:
  r = commands.run(cmd)
  if r.returncode:
    sys.exit(f'{" ".join(cmd[1:4])} failed:\n{r.stderr[-3000:]}')


def _train(workdir: str, *flags: str) -> list[dict]:
  _run(commands.tiny_main(workdir, *flags))
  return metrics.read(workdir)


def _size_mb(path: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--base_steps', type=int, default=100)
  ap.add_argument('--steps', type=int, default=200)
  ap.add_argument('--rank', type=int, default=8)
  ap.add_argument('--lora_lr', type=float, default=3e-3)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    base_wd = os.path.join(tmp, 'base')
    base_rows = _train(base_wd, f'--config.train.num_steps={args.base_steps}')
    _run(commands.command('export', '--workdir', base_wd, '--out', os.path.join(tmp, 'export')))
    base = os.path.join(tmp, 'export', 'tiny')
    common = (f'--config.model.checkpoint={base}', f'--config.train.num_steps={args.steps}',
              f'--config.train.eval_every={args.steps}')
    results = {}
    for name, flags in (('full fine-tune', ('--config.optim.learning_rate=1e-3',)),
                        (f'LoRA rank {args.rank}', (f'--config.lora.rank={args.rank}',
                                                    f'--config.optim.learning_rate={args.lora_lr}'))):
      wd = os.path.join(tmp, name.replace(' ', '_'))
      rows = _train(wd, *common, *flags)
      evals = [r for r in rows if 'eval_bleu' in r]
      last_ckpt = os.path.join(wd, 'checkpoints', str(args.steps), 'state')
      results[name] = (evals[0], evals[-1], _size_mb(last_ckpt))
    base_eval = [r for r in base_rows if 'eval_bleu' in r][-1]
  print(f'Base: {args.base_steps} steps of configs/tiny_cpu.py, eval BLEU '
        f'{base_eval["eval_bleu"]:.1f}, eval loss {base_eval["eval_loss"]:.3f}. '
        f'Then {args.steps} steps from it:\n')
  print('| run | eval loss start -> end | eval BLEU start -> end | eval chrF end | '
        'checkpoint of the trained state (MiB) |')
  print('|---|---|---|---|---|')
  for name, (first, last, mb) in results.items():
    print(f'| {name} | {first["eval_loss"]:.3f} -> {last["eval_loss"]:.3f} | '
          f'{first["eval_bleu"]:.1f} -> {last["eval_bleu"]:.1f} | {last["eval_chrf"]:.1f} | '
          f'{mb:.2f} |')


if __name__ == '__main__':
  main()
