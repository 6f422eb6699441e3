"""Val BLEU/chrF of a trained workdir on clean and MTNT-noised sources, greedy and beam.

    uv run python benchmarks/recipe_quality.py WORKDIR [--beam_sizes 1,4] [--lines N]
        [--val_dir ../shared/data/multi30k] [--noisy both|clean|noisy] [--kinds typo,emoji]

For each beam size, `python -m mtnt_tpu.translate` (a user's command) translates
val.en and a noised copy of it (`python -m mtnt_tpu.data.noise --seed 0`, the
same every time), both scored against val.fr; its own wall time is the decoding
cost. --kinds adds one copy per kind of noise with only that kind (`--only`),
to say which kinds make up a gap. Prints a markdown table: source, beam, BLEU,
chrF, seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str]) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                     text=True)
  if r.returncode:
    sys.exit(f'{" ".join(args[:1])} failed:\n{r.stderr[-3000:]}')
  return r


def score(workdir: str, src: str, ref: str, out: str, beam: int) -> tuple[float, float, float]:
  t0 = time.perf_counter()
  r = _run(['mtnt_tpu.translate', '--workdir', workdir, '--input', src, '--output', out,
            '--reference', ref, '--beam_size', str(beam)])
  seconds = time.perf_counter() - t0
  bleu = float(re.search(r'^BLEU ([\d.]+)', r.stderr, re.M).group(1))
  chrf = float(re.search(r'^chrF ([\d.]+)', r.stderr, re.M).group(1))
  return bleu, chrf, seconds


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('workdir')
  ap.add_argument('--beam_sizes', default='1,4')
  ap.add_argument('--lines', type=int, default=0, help='the first N val lines (0: all)')
  ap.add_argument('--val_dir', default=os.path.join(os.path.dirname(ROOT), 'shared', 'data',
                                                     'multi30k'))
  ap.add_argument('--noisy', default='both', choices=('both', 'clean', 'noisy', 'none'))
  ap.add_argument('--kinds', default='', help='kinds of noise to score one at a time')
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    src, ref = os.path.join(tmp, 'val.en'), os.path.join(tmp, 'val.fr')
    for name, path in (('val.en', src), ('val.fr', ref)):
      with open(os.path.join(args.val_dir, name), encoding='utf-8') as f:
        lines = f.read().splitlines()
      with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines[:args.lines or None]) + '\n')
    noisy = os.path.join(tmp, 'val.noisy.en')
    _run(['mtnt_tpu.data.noise', '--input', src, '--output', noisy, '--seed', '0'])
    sources = {'clean': [('clean', src)], 'noisy': [('noisy', noisy)],
               'both': [('clean', src), ('noisy', noisy)], 'none': []}[args.noisy]
    for kind in filter(None, args.kinds.split(',')):
      path = os.path.join(tmp, f'val.{kind}.en')
      _run(['mtnt_tpu.data.noise', '--input', src, '--output', path, '--seed', '0',
            '--only', kind])
      sources.append((f'{kind} only', path))
    rows = []
    for beam in (int(b) for b in args.beam_sizes.split(',')):
      for name, path in sources:
        bleu, chrf, seconds = score(args.workdir, path, ref, os.path.join(tmp, 'hyp'), beam)
        rows.append((name, beam, bleu, chrf, seconds))
        print(f'{name} beam {beam}: BLEU {bleu:.2f} chrF {chrf:.2f} ({seconds:.0f} s)',
              file=sys.stderr, flush=True)
  n = args.lines or 'all'
  print(f'| val sources ({n} lines) | beam | BLEU | chrF | translate wall time (s) |')
  print('|---|---|---|---|---|')
  for name, beam, bleu, chrf, seconds in rows:
    print(f'| {name} | {beam} | {bleu:.1f} | {chrf:.1f} | {seconds:.0f} |')


if __name__ == '__main__':
  main()
