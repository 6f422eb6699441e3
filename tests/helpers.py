"""Shared builders for tests: the tiny config, its run, and real batches."""

from __future__ import annotations

import subprocess

import jax
import numpy as np

from configs import tiny_cpu
from mtnt_tpu import commands
from mtnt_tpu.data import pipeline

ROOT = commands.ROOT


def tiny_config(**overrides):
  """configs/tiny_cpu.py with dotted-key overrides, e.g. {'train.batch_size': 8}."""
  c = tiny_cpu.get_config()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def train_batches(config, n: int, local_batch: int | None = None) -> list[dict]:
  it = iter(pipeline.train_dataset(config.data, config.tokenizer.path,
                                   local_batch or config.train.batch_size,
                                   pipeline.HostShard(0, 1)))
  return [next(it) for _ in range(n)]


def run_main(workdir, *flags, timeout=600, env=None) -> subprocess.CompletedProcess:
  """`python -m mtnt_tpu.main --config configs/tiny_cpu.py` as a user runs it."""
  return commands.run(commands.tiny_main(workdir, *flags), extra_env=env, timeout=timeout)


def restore_numpy(path):
  """An orbax pytree checkpoint as numpy arrays, whatever mesh wrote it."""
  import orbax.checkpoint as ocp
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  meta = getattr(meta, 'tree', meta)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))
