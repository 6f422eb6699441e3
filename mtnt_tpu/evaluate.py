"""Evaluation over the whole eval split: loss and token accuracy.

Eval batches are tokenized once and cached on the host; each eval runs the
jitted eval step over all of them and adds up sums, so the figure is exact for
the split whatever the batch size or host count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtnt_tpu.data import pipeline


class Evaluator:
  """Eval loss over the whole eval split; batches tokenized once and cached."""

  def __init__(self, run, eval_step, workdir: str):
    shard = pipeline.HostShard.current()
    self._batches = list(pipeline.eval_batches(run.config.data, run.tokenizer,
                                               run.local_batch, shard))
    self._run = run
    self._workdir = workdir
    self._step = eval_step

  def __call__(self, params, step: int) -> dict[str, float]:
    totals = None
    for local in self._batches:
      sums = self._step(params, pipeline.to_global(local, self._run.batch_sharding))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    t = jax.device_get(totals)
    n = max(float(t['target_tokens']), 1.0)
    return {'eval_loss': float(t['loss_sum']) / n, 'eval_accuracy': float(t['correct']) / n,
            'eval_target_tokens': float(t['target_tokens'])}
