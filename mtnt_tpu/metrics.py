"""Metric writers: stdout, WORKDIR/metrics.jsonl and TensorBoard, from process 0."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

from absl import logging
from etils import epath
import jax

from mtnt_tpu import flops


class Writer:
  """Writes one record per logged step; a no-op on every process but 0."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      self._jsonl = _JsonLines(epath.Path(workdir) / 'metrics.jsonl')
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:  # TensorBoard is optional; jsonl is the record
        logging.warning('tensorboardX is not installed: no TensorBoard events')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    parts = ' '.join(f'{k}={_fmt(v)}' for k, v in clean.items())
    logging.info('step %d %s', step, parts)
    # Unix time, so a run's curves can be drawn against wall time too.
    self._jsonl.append(json.dumps({'step': step, 'time': round(time.time(), 3), **clean}))
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def text(self, step: int, name: str, value: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(name, value, step)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


class _JsonLines:
  """An append-only file. Object stores (gs://) cannot append, so there the
  whole file is rewritten, at most once every `rewrite_every_s` and at close:
  rewriting at every record would move O(records^2) bytes over a long run.
  A run killed outright, without reaching close, loses at most its last
  `rewrite_every_s` seconds of records."""

  def __init__(self, path: epath.Path, *, appendable: bool | None = None,
               rewrite_every_s: float = 60.0, clock=time.monotonic):
    self._path = path
    self._appendable = '://' not in str(path) if appendable is None else appendable
    self._rewrite_every_s, self._clock = rewrite_every_s, clock
    self._lines: list[str] = []
    self._pending = False
    self._rewritten_at = -math.inf
    if not self._appendable and path.exists():
      self._lines = path.read_text().splitlines()

  def append(self, line: str) -> None:
    if self._appendable:
      with open(self._path, 'a', encoding='utf-8') as f:
        f.write(line + '\n')
      return
    self._lines.append(line)
    self._pending = True
    if self._clock() - self._rewritten_at >= self._rewrite_every_s:
      self._rewrite()

  def _rewrite(self) -> None:
    self._path.write_text('\n'.join(self._lines) + '\n')
    self._pending, self._rewritten_at = False, self._clock()

  def close(self) -> None:
    if self._pending:
      self._rewrite()


def _fmt(v: float) -> str:
  return f'{v:.4g}' if abs(v) < 1e5 else f'{v:.3e}'


class StepLog:
  """Turns per-step device metrics into one logged record per interval.

  Steps are dispatched asynchronously, so the host runs ahead of the device.
  An interval's clock therefore stops only once its last step's outputs are
  ready (`close`), and `paused` blocks the same way before an eval or a save
  and restarts the clock after it, with the device idle. Every step of an
  interval thus runs inside the time it is charged with, and every input
  wait is part of that time: step_time is wall time, input_wait_frac and
  nonpad_fraction are at most 1, and MFU is at most the true utilisation.
  """

  def __init__(self, writer: Writer, *, tokens_per_step: int, schedule,
               budget: flops.Budget):
    self._writer = writer
    self._all_tokens = tokens_per_step  # batch_size x max_len, padding included
    self._schedule = schedule
    self._budget = budget
    self._steps: list = []
    self._active_s = 0.0
    self._input_s = 0.0
    self._clock = Stopwatch()

  def add(self, device_metrics, input_s: float) -> None:
    """Records a dispatched step and the host time spent fetching its batch."""
    self._steps.append(device_metrics)
    self._input_s += input_s

  def close(self, step: int) -> dict[str, float]:
    """Waits for the interval's steps, then writes and returns its record."""
    jax.block_until_ready(self._steps)
    self._active_s += self._clock.lap()
    out = self._record(step, jax.device_get(self._steps), self._active_s, self._input_s)
    self._steps, self._active_s, self._input_s = [], 0.0, 0.0
    self._writer.write(step, out)
    return out

  @contextlib.contextmanager
  def paused(self):
    """Time inside (evals, saves) is charged to no interval."""
    jax.block_until_ready(self._steps)
    lap = self._clock.lap()
    if self._steps:  # time with no step in flight (start-up, compiles) is nobody's
      self._active_s += lap
    try:
      yield
    finally:
      self._clock.lap()

  def _record(self, step, ms, elapsed, waited) -> dict[str, float]:
    real = sum(float(m['real_tokens']) for m in ms)
    n_all = self._all_tokens * len(ms)
    out = {
        'loss': sum(float(m['loss']) for m in ms) / len(ms),
        'accuracy': sum(float(m['accuracy']) for m in ms) / len(ms),
        'grad_norm': float(ms[-1]['grad_norm']),
        'learning_rate': float(self._schedule(step - 1)),
        'step_time': elapsed / len(ms),
        'tokens_per_sec': real / elapsed,  # non-pad tokens
        'all_tokens_per_sec': n_all / elapsed,  # rows x max_len, padding included
        'tokens_per_sec_per_device': real / elapsed / jax.device_count(),
        'nonpad_fraction': real / n_all,
        'input_wait_frac': waited / elapsed,
    }
    if self._budget.peak:
      out['mfu'] = real / elapsed * self._budget.per_token / self._budget.peak
    return out
class Stopwatch:
  """Wall time between `lap` calls."""

  def __init__(self):
    self._t = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    dt, self._t = now - self._t, now
    return dt


def read(workdir: str | os.PathLike) -> list[dict]:
  """WORKDIR/metrics.jsonl as written: one dict per logged step, in order."""
  with (epath.Path(workdir) / 'metrics.jsonl').open() as f:
    return [json.loads(line) for line in f]
