"""The workdir: its path, its record of the config, and its weights reopened.

WORKDIR/config.json is the config the run trained with, written before the
first compile, so the workdir alone says which model, tokenizer and prompt
format `translate` and `export` use. They restore the weights (never the
optimizer state) into a mesh over this process's own devices (data=1,
fsdp=all), whatever mesh trained them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from mtnt_tpu import checkpoint as checkpoint_lib
from mtnt_tpu import checks
from mtnt_tpu import sharding
from mtnt_tpu import state as state_lib
from mtnt_tpu import tokenizer as tokenizer_lib


class WorkdirError(ValueError):
  """A workdir that cannot be used, with the fix in the message."""


def resolve(workdir: str | os.PathLike) -> str:
  """An absolute path (orbax refuses relative ones), or a gs:// URL as it is."""
  workdir = os.fspath(workdir)
  return workdir if '://' in workdir else os.path.abspath(os.path.expanduser(workdir))


def prepare(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Checks the workdir is readable, writable and of this model; records the config.

  Runs after every other check and before anything is compiled, so a bad
  config never leaves a workdir behind and a bucket without credentials or a
  read-only disk fails in seconds. A workdir that holds checkpoints but lost
  its config.json gets it back only once a checkpoint has restored with this
  config (`record_config`), never from a run that then fails.
  Raises checks.ConfigError.
  """
  root = epath.Path(workdir)
  path = root / 'config.json'
  try:
    old = json.loads(path.read_text()) if path.exists() else None
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f'.write_check.{jax.process_index()}'  # every process writes checkpoints
    probe.write_text('')
    probe.unlink()
    if old is None and not _has_checkpoints(root):
      record_config(workdir, config)
  except Exception as e:  # noqa: BLE001 - local, GCS and fsspec errors differ
    hint = ('give this VM\'s service account write access to the bucket, or run '
            '`gcloud auth application-default login`' if '://' in workdir
            else 'choose a --workdir you can write')
    raise checks.ConfigError(
        f'cannot use workdir {workdir} ({type(e).__name__}: {e}); {hint}') from e
  # What the checkpoints' tree depends on: another value could never restore.
  for section, field in (('model', 'variant'), ('lora', 'rank'), ('lora', 'targets'),
                         ('optim', 'name')):
    was = (old or {}).get(section, {}).get(field, config[section][field])
    if was != config[section][field]:
      raise checks.ConfigError(
          f'workdir {workdir} holds a run with config.{section}.{field}={was!r}, this config '
          f'has {config[section][field]!r}; use a new --workdir (or the old value)')


def record_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/config.json (process 0, temp file then rename) unless it exists."""
  root = epath.Path(workdir)
  if jax.process_index() == 0 and not (root / 'config.json').exists():
    tmp = root / 'config.json.tmp'
    tmp.write_text(config.to_json_best_effort(indent=2))
    tmp.rename(root / 'config.json')


def _has_checkpoints(root: epath.Path) -> bool:
  ckpts = root / 'checkpoints'
  return ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())


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
  """A workdir's plain Gemma weights, on this host's devices."""
  setup: state_lib.Setup
  params: state_lib.Params
  step: int
  origin: str  # 'best' or 'checkpoints': the WORKDIR subdirectory they came from
  adapters: Any = None  # a LoRA workdir's trained adapters (params has them folded in)


def restore(workdir: str, config: ml_collections.ConfigDict, step: int | None = None
            ) -> Trained:
  """The best checkpoint (or `step`), restored into shardings over the local devices.

  Without a best checkpoint (no eval has scored config.eval.best_metric yet),
  falls back to the latest step and says so.
  """
  workdir = resolve(workdir)
  try:
    setup = state_lib.setup(config, sharding.make_mesh(1, -1, jax.local_devices()),
                            tokenizer_lib.Tokenizer(config.tokenizer.path))
  except (FileNotFoundError, ValueError) as e:
    raise WorkdirError(f'{workdir}/config.json: {e}') from e
  ckpts = checkpoint_lib.Checkpoints(workdir, config.train.keep_checkpoints,
                                     config.eval.best_metric, config.eval.best_mode,
                                     async_save=False, read_only=True)
  try:
    step, origin = _choose(workdir, config, ckpts, step)
    trained = ckpts.restore_params(step, state_lib.abstract_trained(setup),
                                   best=origin == 'best')
  except checkpoint_lib.Damaged as e:
    others = sorted((set(ckpts.all_steps()) | {ckpts.best_step()}) - {None, step})
    raise WorkdirError(f'{e}; pass --step with an intact one (others: '
                       f'{", ".join(map(str, others)) or "none"})') from e
  finally:
    ckpts.close()
  try:
    params = state_lib.inference_fn(setup)(trained, state_lib.frozen_base(setup))
  except (FileNotFoundError, ValueError) as e:
    raise WorkdirError(f'{workdir} holds LoRA adapters whose base could not be loaded: '
                       f'{e}') from e
  return Trained(setup=setup, params=params, step=step, origin=origin,
                 adapters=trained if setup.lora else None)


def _choose(workdir: str, config: ml_collections.ConfigDict,
            ckpts: checkpoint_lib.Checkpoints, step: int | None) -> tuple[int, str]:
  """(step, 'best' or 'checkpoints'): `step` if given, else the best, else the latest."""
  steps, best = ckpts.all_steps(), ckpts.best_step()
  if step is not None and step in steps:
    return step, 'checkpoints'
  if step is not None and step == best:
    return step, 'best'
  if step is not None:
    have = sorted(set(steps) | ({best} if best is not None else set()))
    raise WorkdirError(f'no checkpoint of step {step} in {workdir}/checkpoints or best '
                       f'(have: {", ".join(map(str, have)) or "none"}); pass one of those '
                       'to --step')
  if best is not None:
    return best, 'best'
  if steps:
    logging.warning('%s/best is empty (no eval has scored %s yet): using the latest '
                    'checkpoint, step %d', workdir, config.eval.best_metric, max(steps))
    return max(steps), 'checkpoints'
  raise WorkdirError(f'{workdir} holds no checkpoint (best/ and checkpoints/ are empty); '
                     f'train first: python -m mtnt_tpu.main --config ... --workdir {workdir}')
