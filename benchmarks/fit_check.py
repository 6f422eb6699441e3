"""Fit-check table: Gemma 2B and 7B full fine-tuning (AdamW) on TPU v4 slices, compiled here.

    uv run --extra test python benchmarks/fit_check.py [--rows 2b-v4-8,...] [--jobs 2]

Each row runs `python -m mtnt_tpu.aot` (libtpu's compile-only TPU topology, on
this CPU machine) on configs/v4_8.py with random weights and max_len 128: once
at the base batch (--base_batch rows, 64 as in configs/v4_8.py), then a search
for the largest global batch that fits. The search is capped at a few compiles
per row (each Gemma 2B compile takes minutes on 2 cores; see ROWS): per-chip
memory is close to linear in the batch, so each next batch is predicted from
the compiles so far (the first guess, from one point, takes all temporaries as
per-row and so undershoots), rounded down to a multiple of the mesh's batch
divisor. A row whose search did not close its bracket reports the largest
batch verified to fit, as '>= N'.

Rows start in priority order, --jobs at a time, and BENCHMARKS.md's fit-check
section is rewritten as each finishes, so an interrupted run keeps what it
measured. Every aot report (stdout and JSON) is kept under --out_dir, and a
rerun reuses the compiles already logged there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.metadata
import json
import math
import os
import re
import shlex
import sys
import threading
import time
from typing import Callable

from mtnt_tpu import commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO, 'BENCHMARKS.md')
BEGIN = '<!-- fit_check:begin (benchmarks/fit_check.py writes this section) -->'
END = '<!-- fit_check:end -->'
INTRO = 'Measured performance and capacity figures for mtnt_tpu, one section per benchmark script.\n'
GIB = 1 << 30
# Predictions aim a little under the chip's HBM: the TPU compiler keeps some for
# itself (on a v4 it refuses above 30.75 of the 32 GiB).
TARGET_FRACTION = 0.95
MAX_LEN = 128
LOSS_CHUNK = 8192  # tokens of logits at a time (config.model.loss_chunk; 0 = whole)


@dataclasses.dataclass(frozen=True)
class Row:
  key: str
  variant: str
  topology: str
  remat: str = 'none'
  compiles: int = 2  # the search's cap, the base included

  @property
  def model(self) -> str:
    return {'gemma_2b': 'Gemma 2B', 'gemma_7b': 'Gemma 7B'}[self.variant]


# Priority order: the row first, then remat, then larger slices, then 7B.
# Compile caps keep the whole table near an hour on 2 busy cores (a Gemma 2B
# compile took 2 to 5 minutes here, 7B longer).
ROWS = (
    Row('2b-v4-8', 'gemma_2b', 'v4-8', compiles=3),
    Row('2b-v4-8-block', 'gemma_2b', 'v4-8', 'block'),
    Row('2b-v4-8-matmuls', 'gemma_2b', 'v4-8', 'matmuls'),
    Row('2b-v4-32', 'gemma_2b', 'v4-32'),
    Row('2b-v4-128', 'gemma_2b', 'v4-128'),
    Row('7b-v4-8', 'gemma_7b', 'v4-8'),
    Row('7b-v4-32', 'gemma_7b', 'v4-32'),
    Row('7b-v4-128', 'gemma_7b', 'v4-128', compiles=1),
)
DEVICES = {'v4-8': 4, 'v4-32': 16, 'v4-128': 64}  # megacore: one device per chip


@dataclasses.dataclass(frozen=True)
class Compile:
  batch: int
  fits: bool
  total: float | None  # bytes per chip; None when the compiler itself gave up
  report: dict
  seconds: float
  command: str


@dataclasses.dataclass(frozen=True)
class Result:
  row: Row
  base: Compile
  largest: int | None  # rows per step verified to fit
  closed: bool  # the next multiple of the divisor was seen not to fit
  compiles: int


def aot_command(row: Row, batch: int, json_path: str) -> list[str]:
  return ['python', '-m', 'mtnt_tpu.aot', '--config', 'configs/v4_8.py',
          '--topology', row.topology, f'--config.model.variant={row.variant}',
          '--config.model.checkpoint=random', f'--config.model.remat={row.remat}',
          f'--config.model.loss_chunk={LOSS_CHUNK}',
          f'--config.data.max_len={MAX_LEN}', f'--config.train.batch_size={batch}',
          '--json', json_path]


def run_aot(row: Row, batch: int, out_dir: str, timeout_s: int,
            may_compile: Callable[[], bool]) -> Compile | None:
  """One fit check, or its logged result from an earlier run; None if neither may be had."""
  stem = os.path.join(out_dir, f'{row.key}-b{batch}')
  cmd = aot_command(row, batch, stem + '.json')
  rc = _logged_rc(stem + '.log', cmd)
  seconds = 0.0
  if rc is None and not may_compile():
    return None
  if rc is None:  # not compiled by an earlier run of this script
    t0 = time.perf_counter()
    proc = commands.run([sys.executable, *cmd[1:]], timeout=timeout_s)
    seconds = time.perf_counter() - t0
    rc = proc.returncode
    if rc not in (0, 1) or (rc == 1 and not os.path.exists(stem + '.json')):
      raise RuntimeError(f'{shlex.join(cmd)} exited {rc}: {proc.stderr[-2000:]}')
    with open(stem + '.log', 'w', encoding='utf-8') as f:
      f.write(f'$ {shlex.join(cmd)}\nrc={rc}\nseconds={seconds:.0f}\n{proc.stdout}\n'
              f'{proc.stderr}')
  report = {}
  if os.path.exists(stem + '.json'):
    with open(stem + '.json', encoding='utf-8') as f:
      report = json.load(f)
  total = report.get('memory', {}).get('total')
  print(f'  {row.key} batch {batch}: {"fits" if rc == 0 else "does not fit"}'
        f'{f", {total / GIB:.2f} GiB/chip" if total else ""} '
        f'({f"{seconds:.0f}s" if seconds else "from an earlier run"})', flush=True)
  return Compile(batch=batch, fits=rc == 0, total=total, report=report,
                 seconds=seconds, command=shlex.join(cmd[:-2]))


def _logged_rc(log_path: str, cmd: list[str]) -> int | None:
  """The exit code an earlier run logged for this exact command, so a rerun resumes."""
  if not os.path.exists(log_path):
    return None
  with open(log_path, encoding='utf-8') as f:
    head = f.read(4096).splitlines()
  if len(head) < 2 or head[0] != f'$ {shlex.join(cmd)}' or not head[1].startswith('rc='):
    return None
  return int(head[1][3:])


def _round_down(x: float, divisor: int) -> int:
  return int(x // divisor) * divisor


def next_batch(done: list[Compile], divisor: int, limit: float) -> int | None:
  """The next batch to try, or None when the search cannot improve."""
  fits = [c for c in done if c.fits]
  fails = [c for c in done if not c.fits]
  lo = max((c.batch for c in fits), default=0)
  hi = min((c.batch for c in fails), default=math.inf)
  if hi - lo <= divisor:
    return None
  measured = sorted((c for c in done if c.total), key=lambda c: c.batch)
  if len(measured) >= 2:
    # A line through the two measurements nearest the limit.
    a, b = sorted(measured, key=lambda c: abs(c.total - limit))[:2]
    slope = (b.total - a.total) / (b.batch - a.batch) if b.batch != a.batch else 0
    guess = a.batch + (limit - a.total) / slope if slope > 0 else 2 * lo
  elif measured:
    # One point: every temporary counted as per-row, an underestimate of the
    # largest batch (weight gathers and gradients do not grow with it).
    c = measured[0]
    per_row = c.report['memory']['temporaries'] / c.batch
    guess = c.batch + (limit - c.total) / per_row
  else:  # only compiler refusals (no sizes) or nothing yet
    guess = lo * 2 if lo else divisor
  guess = _round_down(guess, divisor)
  if guess <= lo:
    guess = lo + divisor
  if guess >= hi:  # the model overshot a known failure: split the bracket
    guess = _round_down((lo + hi) / 2, divisor)
  return guess if lo < guess < hi and guess >= divisor else None


def search(row: Row, base_batch: int, out_dir: str, max_compiles: int | None, timeout_s: int,
           may_compile: Callable[[], bool]) -> Result | None:
  divisor = DEVICES[row.topology]
  limit = TARGET_FRACTION * 32 * GIB  # v4: 32 GiB per chip
  cap = max_compiles or row.compiles
  base = run_aot(row, base_batch, out_dir, timeout_s, may_compile)
  if base is None:
    return None
  done = [base]
  while len(done) < cap:
    batch = next_batch(done, divisor, limit)
    if batch is None or any(c.batch == batch for c in done):
      break
    c = run_aot(row, batch, out_dir, timeout_s, may_compile)
    if c is None:
      break
    done.append(c)
  fits = [c.batch for c in done if c.fits]
  largest = max(fits) if fits else None
  closed = (largest is not None and any(not c.fits and c.batch == largest + divisor
                                        for c in done)) or (
      largest is None and any(not c.fits and c.batch == divisor for c in done))
  return Result(row=row, base=done[0], largest=largest, closed=closed, compiles=len(done))


def _table(results: list[Result], base_batch: int, max_compiles: int | None, argv: str) -> str:
  caps = max_compiles or '/'.join(str(r.row.compiles) for r in results)
  lines = [
      '## Fit check: Gemma full fine-tuning on TPU v4 (compiled ahead of time on a CPU)',
      '',
      f'`{argv}` ran `python -m mtnt_tpu.aot` (the real train step compiled by libtpu '
      f'{_version("libtpu")} with jax {_version("jax")} for the topology, on the 2-vCPU '
      'development machine, no TPU) for each row: configs/v4_8.py (AdamW, fp32 master weights and '
      'optimizer state, bf16 compute, the whole slice in `fsdp`, the loss\'s logits formed '
      f'config.model.loss_chunk = {LOSS_CHUNK} tokens at a time), random weights, '
      f'max_len {MAX_LEN}. Per-chip memory is XLA\'s buffer assignment (arguments + outputs '
      '- donated aliases + temporaries + code) against 32 GiB HBM per v4 chip, at the base '
      f'batch of {base_batch} rows ({base_batch * MAX_LEN} tokens). The largest batch is a '
      f'search capped at {caps} compiles per row (predicting each next batch from '
      'the memory of the compiles so far), in multiples of the batch divisor (the chip '
      'count); `>=` marks a row whose search stopped before the next multiple was seen to '
      'fail. FLOPs per token are XLA\'s count for the compiled step at the base batch, all '
      'chips; 6 x params would be 15.0e9 for Gemma 2B and 51.2e9 for Gemma 7B. XLA counts a '
      'loop body once, so where the compiler turns matmuls into loops over shards '
      '(collective matmuls: the hundreds of collective-permutes on v4-32) the count falls '
      'below 6 x params. Reproduce a row with its command; append '
      '`--config.train.batch_size=N` for another batch.',
      '',
      '| topology | model | remat | compute dtype | GiB/chip at base batch | largest global '
      'batch that fits (tokens) | compiled FLOPs/token | command |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    b = r.base
    if b.total is not None:
      gib = f'{b.total / GIB:.2f}' + ('' if b.fits else ' (does not fit)')
    else:
      needed = re.search(r'HLO temporaries \(([\d.]+G)\)', b.report.get('error', ''))
      gib = f'out of HBM{f" (temporaries alone {needed.group(1)})" if needed else ""}'
    if r.largest is None:
      largest = 'none' if r.closed else f'none found ({r.compiles} compiles)'
    else:
      largest = (f'{"" if r.closed else ">= "}{r.largest * MAX_LEN} '
                 f'({r.largest} rows)')
    rep = b.report if 'flops_per_step' in b.report else {}
    flops = f'{rep["flops_per_token"] / 1e9:.1f}e9' if rep else 'n/a'
    cmd = b.command
    lines.append(f'| {r.row.topology} | {r.row.model} | {r.row.remat} | bfloat16 | {gib} | '
                 f'{largest} | {flops} | `{cmd}` |')
  return '\n'.join(lines) + '\n'


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return '(not installed)'


def write_section(section: str) -> None:
  """Replaces only this script's section of BENCHMARKS.md (others own the rest)."""
  text = INTRO
  if os.path.exists(BENCHMARKS_MD):
    with open(BENCHMARKS_MD, encoding='utf-8') as f:
      text = f.read()
  block = f'{BEGIN}\n{section}{END}\n'
  if BEGIN in text and END in text:
    text = re.sub(re.escape(BEGIN) + r'.*?' + re.escape(END) + r'\n?', lambda _: block, text,
                  flags=re.DOTALL)
  else:
    text = text.rstrip('\n') + '\n\n' + block
  tmp = BENCHMARKS_MD + '.fit_check.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, BENCHMARKS_MD)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rows', default=','.join(r.key for r in ROWS),
                 help='comma-separated row keys, in order: ' + ', '.join(r.key for r in ROWS))
  p.add_argument('--base_batch', type=int, default=64)
  p.add_argument('--max_compiles', type=int, default=None,
                 help="per row, the base included (default: each row's own cap)")
  p.add_argument('--jobs', type=int, default=2, help='rows compiled at once')
  p.add_argument('--timeout_s', type=int, default=1800, help='per compile')
  p.add_argument('--deadline_min', type=float, default=55,
                 help='start no compile after this many minutes (logged ones are still used)')
  p.add_argument('--no_compile', action='store_true',
                 help='rebuild the table from the compiles logged in --out_dir only')
  p.add_argument('--out_dir', default='/tmp/mtnt_fit_check')
  p.add_argument('--no_write', action='store_true', help='print the table, leave BENCHMARKS.md')
  args = p.parse_args()
  by_key = {r.key: r for r in ROWS}
  unknown = [k for k in args.rows.split(',') if k not in by_key]
  if unknown:
    print(f'error: unknown rows {unknown}; known: {", ".join(by_key)}', file=sys.stderr)
    return 2
  os.makedirs(args.out_dir, exist_ok=True)
  argv = shlex.join(['python', 'benchmarks/fit_check.py',
                     *(a for a in sys.argv[1:] if a != '--no_compile')])
  deadline = time.time() + 60 * args.deadline_min
  may_compile = lambda: not args.no_compile and time.time() < deadline
  keys = args.rows.split(',')
  results: dict[str, Result] = {}
  lock = threading.Lock()

  def one(key: str) -> None:
    print(f'{key}: started', flush=True)
    result = search(by_key[key], args.base_batch, args.out_dir, args.max_compiles,
                    args.timeout_s, may_compile)
    if result is None:
      print(f'{key}: not run (past --deadline_min or --no_compile)', flush=True)
      return
    with lock:  # rows finish out of order; the table keeps priority order
      results[key] = result
      section = _table([results[k] for k in keys if k in results], args.base_batch,
                       args.max_compiles, argv)
      if not args.no_write:
        write_section(section)

  # Rows are independent; a compile is mostly one thread, so two at once use both cores.
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for future in [pool.submit(one, k) for k in keys]:
      future.result()
  print(_table([results[k] for k in keys if k in results], args.base_batch, args.max_compiles,
               argv))
  missing = [k for k in keys if k not in results]
  if missing:
    print(f'not run: {", ".join(missing)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
