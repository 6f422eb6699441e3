"""Metric writers: stdout, WORKDIR/metrics.jsonl and TensorBoard, from process 0."""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
import jax


class Writer:
  """Writes one record per logged step; a no-op on every process but 0."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
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
    self._jsonl.write(json.dumps({'step': step, **clean}) + '\n')
    self._jsonl.flush()
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


def _fmt(v: float) -> str:
  return f'{v:.4g}' if abs(v) < 1e5 else f'{v:.3e}'


class Stopwatch:
  """Wall time between `lap` calls."""

  def __init__(self):
    self._t = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    dt, self._t = now - self._t, now
    return dt
