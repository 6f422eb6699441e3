"""Metric writers: stdout, WORKDIR/metrics.jsonl and TensorBoard, from process 0."""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
from etils import epath
import jax


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
  """An append-only file; on object stores (gs://), which cannot append, the
  whole file is rewritten at each record (it stays small: one line a log)."""

  def __init__(self, path: epath.Path):
    self._path = path
    self._local = '://' not in str(path)
    self._lines: list[str] = []
    if not self._local and path.exists():
      self._lines = path.read_text().splitlines()

  def append(self, line: str) -> None:
    if self._local:
      with open(self._path, 'a', encoding='utf-8') as f:
        f.write(line + '\n')
    else:
      self._lines.append(line)
      self._path.write_text('\n'.join(self._lines) + '\n')

  def close(self) -> None:
    pass


def _fmt(v: float) -> str:
  return f'{v:.4g}' if abs(v) < 1e5 else f'{v:.3e}'


class StepLog:
  """Turns per-step device metrics into one logged record per interval.

  Device scalars are kept as they are until the next step has been
  dispatched, then fetched together ("one step behind"), so logging never
  stalls the device. A non-finite loss stops the run.
  """

  def __init__(self, writer: Writer, *, tokens_per_row_batch: int, schedule,
               flops_per_token: float, peak_flops: float):
    self._writer = writer
    self._all_tokens = tokens_per_row_batch  # batch_size x max_len
    self._schedule = schedule
    self._flops_per_token = flops_per_token
    self._peak = peak_flops  # all devices together
    self._interval: list = []
    self._input_s = 0.0
    self._pending = None
    self._clock = Stopwatch()
    self.last: dict[str, float] = {}

  def add(self, step: int, device_metrics, input_s: float, close_interval: bool) -> None:
    """Records a dispatched step; reports the previous interval if one is waiting."""
    self.flush()
    self._interval.append(device_metrics)
    self._input_s += input_s
    if close_interval:
      self._pending = (step, self._interval, self._clock.lap(), self._input_s)
      self._interval, self._input_s = [], 0.0

  def flush(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._report(*pending)

  def pause(self) -> None:
    """Time from here to the next interval (evals, saves) is not training."""
    self._clock.lap()

  def _report(self, step, device_metrics, elapsed, waited) -> None:
    ms = jax.device_get(device_metrics)
    loss = sum(float(m['loss']) for m in ms) / len(ms)
    if not math.isfinite(loss):
      raise FloatingPointError(
          f'loss is {loss} at step {step}; no checkpoint of it was written. Lower '
          'config.optim.learning_rate (or raise clip_norm) and rerun: it resumes '
          'from the last good checkpoint')
    real = sum(float(m['real_tokens']) for m in ms)
    n_all = self._all_tokens * len(ms)
    out = {
        'loss': loss,
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
    if self._peak:
      out['mfu'] = real / elapsed * self._flops_per_token / self._peak
    self._writer.write(step, out)
    self.last = out


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
