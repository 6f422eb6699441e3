"""A trained workdir, reopened: its config, and its weights on this host's devices.

What `translate` and `export` share. WORKDIR/config.json is the config the run
trained with, so the workdir alone says which model, tokenizer and prompt
format to use. The weights are restored into a mesh over this process's own
devices (data=1, fsdp=all), whatever mesh trained them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from mtnt_tpu import checkpoint as checkpoint_lib
from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu import train


class WorkdirError(ValueError):
  """A workdir that cannot be used, with the fix in the message."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the workdir was trained with (WORKDIR/config.json)."""
  root = epath.Path(workdir)  # a local dir or a gs:// bucket
  if not root.is_dir():
    raise WorkdirError(f'--workdir {workdir} does not exist; pass the directory '
                       'python -m mtnt_tpu.main trained into')
  path = root / 'config.json'
  if not path.is_file():
    raise WorkdirError(f'{path} is missing; --workdir must be a directory written by '
                       'python -m mtnt_tpu.main (it records its config there)')
  return ml_collections.ConfigDict(_from_json(json.loads(path.read_text())))


def _from_json(value: Any) -> Any:
  # JSON has no tuples; configs hold fixed sequences as tuples, never lists.
  if isinstance(value, dict):
    return {k: _from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_from_json(v) for v in value)
  return value


def use_cpu_devices(config: ml_collections.ConfigDict) -> None:
  """Fakes config.runtime.cpu_devices CPU devices as training did; before any JAX use."""
  if config.runtime.get('cpu_devices', 0):
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', config.runtime.cpu_devices)


@dataclasses.dataclass(frozen=True)
class Trained:
  """A workdir's weights in a run built over this host's devices."""
  run: train.Run
  params: Any
  step: int
  origin: str  # 'best' or 'checkpoints': the WORKDIR subdirectory they came from
  adapters: Any = None  # a LoRA workdir's trained adapters (params has them folded in)


def restore(workdir: str, config: ml_collections.ConfigDict, step: int | None = None
            ) -> Trained:
  """The best checkpoint (or `step`), restored into shardings over the local devices.

  Without a best checkpoint (no eval has scored config.eval.best_metric yet),
  falls back to the latest step and says so.
  """
  config = _local_config(config)
  try:
    tok = tokenizer_lib.Tokenizer(config.tokenizer.path)
    # vocab_size: neither the data nor the pretrained weights are needed here.
    run = train.build(config, jax.local_devices(), vocab_size=tok.vocab_size)
  except (train.ConfigError, FileNotFoundError, ValueError) as e:
    raise WorkdirError(f'{workdir}/config.json: {e}') from e
  run = dataclasses.replace(run, tokenizer=tok)
  ckpts = checkpoint_lib.Checkpoints(workdir, config.train.keep_checkpoints,
                                     config.eval.best_metric, config.eval.best_mode,
                                     async_save=False, read_only=True)
  try:
    steps, best = ckpts.all_steps(), ckpts.best_step()
    if step is not None and step in steps:
      state, origin = ckpts.restore(step, run.abstract_state, None), 'checkpoints'
    elif step is not None and step == best:
      state, origin = ckpts.restore_best(run.abstract_state), 'best'
    elif step is not None:
      have = sorted(set(steps) | ({best} if best is not None else set()))
      raise WorkdirError(f'no checkpoint of step {step} in {workdir}/checkpoints or best '
                         f'(have: {", ".join(map(str, have)) or "none"}); pass one of those '
                         'to --step')
    elif best is not None:
      step, state, origin = best, ckpts.restore_best(run.abstract_state), 'best'
    elif steps:
      step = max(steps)
      logging.warning('%s/best is empty (no eval has scored %s yet): using the latest '
                      'checkpoint, step %d', workdir, config.eval.best_metric, step)
      state, origin = ckpts.restore(step, run.abstract_state, None), 'checkpoints'
    else:
      raise WorkdirError(f'{workdir} holds no checkpoint (best/ and checkpoints/ are empty); '
                         f'train first: python -m mtnt_tpu.main --config ... --workdir {workdir}')
  finally:
    ckpts.close()
  try:
    params = train.inference_fn(run)(state.params, train.frozen_base(run))
  except (FileNotFoundError, ValueError) as e:
    raise WorkdirError(f'{workdir} holds LoRA adapters whose base could not be loaded: '
                       f'{e}') from e
  return Trained(run=run, params=params, step=step, origin=origin,
                 adapters=state.params if run.lora else None)


def _local_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The training config with its mesh refitted to this process's devices."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.dcn_data, config.mesh.data, config.mesh.fsdp = 1, 1, -1
  # build() checks the training batch divides the mesh; nothing here trains.
  config.train.batch_size = jax.local_device_count() * config.optim.grad_accum_steps
  return config
