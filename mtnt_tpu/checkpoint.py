"""One orbax manager over {train state, data iterator}, and the resume order.

Resume order, decided once in `train.py` from these answers:
  1. this workdir's newest intact checkpoint (state and data iterator);
  2. else config.model.checkpoint, a Kaggle Flax checkpoint (weights only);
  3. else random init, for tiny variants or checkpoint='random' only.

Orbax writes each step into a temporary directory and renames it when every
process has finished, so a run killed mid-save leaves no step that looks
complete. A step damaged afterwards (a truncated file, a lost `_METADATA`)
is named, moved to WORKDIR/damaged/ (never deleted), and the next older one
is used. A state holding NaN or inf is never saved.
"""

from __future__ import annotations

import os

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mtnt_tpu import checks
from mtnt_tpu import sharding


class Damaged(Exception):
  """A checkpoint step that cannot be read back."""

  def __init__(self, step: int, path: str, reason: str):
    super().__init__(f'checkpoint step {step} at {path} is damaged ({reason})')
    self.step, self.path = step, path


class NonFinite(FloatingPointError):
  """The train state holds NaN or inf: it is not saved."""


# config.model.checkpoint values that mean 'no pretrained weights'.
_RANDOM_INIT = ('', 'random')


def pretrained_path(model_cfg) -> str | None:
  """config.model.checkpoint, or None for random init ('' or 'random')."""
  return None if model_cfg.checkpoint in _RANDOM_INIT else model_cfg.checkpoint


class Checkpoints:
  """Saves and restores {'state': TrainState, 'data': Grain iterator} per step.

  Beside the last `keep` steps in WORKDIR/checkpoints, WORKDIR/best holds the
  state of the step with the best `best_metric` so far (written only when it
  improves), for `translate` and `export`.
  """

  def __init__(self, workdir: str, keep: int, best_metric: str = 'eval_bleu',
               best_mode: str = 'max', async_save: bool = True, read_only: bool = False):
    if best_mode not in ('max', 'min'):
      raise ValueError(f"config.eval.best_mode={best_mode!r}: use 'max' or 'min'")
    self.directory = os.path.join(workdir, 'checkpoints')
    self.best_directory = os.path.join(workdir, 'best')
    self.damaged_directory = os.path.join(workdir, 'damaged')
    self._best_metric, self._best_mode = best_metric, best_mode
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only),
        item_names=('state', 'data'))
    self._best = ocp.CheckpointManager(
        self.best_directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only, best_fn=lambda m: m[best_metric], best_mode=best_mode,
            keep_checkpoints_without_metrics=False),
        item_names=('state',))

  # --- best ------------------------------------------------------------------

  def best_step(self) -> int | None:
    return self._best.best_step()

  def best_value(self) -> float | None:
    step = self.best_step()
    if step is None:
      return None
    return (self._best.metrics(step) or {}).get(self._best_metric)

  def save_best(self, step: int, state, scores: dict[str, float]) -> bool:
    """Saves `state` as the best if `scores` beats the best so far.

    Compared here, not left to orbax's best_fn: orbax would write every
    eval's state and then delete the worse one.
    """
    value = scores.get(self._best_metric)
    if value is None:
      return False
    old = self.best_value()
    better = old is None or (value > old if self._best_mode == 'max' else value < old)
    if better:
      self.check_finite(step, state)
      self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      metrics={k: float(v) for k, v in scores.items()}, force=True)
    return better

  # --- steps -----------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iter: grain.DatasetIterator | None) -> None:
    self.check_finite(step, state)
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      # Grain's handler writes the iterator state of this process synchronously,
      # at this call, so the saved position matches the saved state.
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iter: grain.DatasetIterator | None):
    """Restores into `abstract_state`'s shardings; `data_iter` is advanced in place.

    Raises Damaged for a step that cannot be read back, checks.ConfigError
    for one whose state has another shape than this config's.
    """
    self._check_fits(step, abstract_state, self.directory, partial=False)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    state = self._read(step, self.directory, lambda: self._manager.restore(
        step, args=ocp.args.Composite(**items)))['state']
    if not finite(state):
      raise Damaged(step, self._step_path(step), 'it holds NaN or inf')
    return state

  def restore_newest(self, abstract_state, data_iter: grain.DatasetIterator):
    """(step, state) of the newest intact checkpoint, or None when there is none.

    Each damaged newer step is named in one line and moved to
    WORKDIR/damaged/STEP, so no later run trips over it again.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return step, self.restore(step, abstract_state, data_iter)
      except Damaged as e:
        logging.warning('%s; moving it to %s and trying the one before', e,
                        self.damaged_directory)
        self._move_aside(step)
    return None

  def restore_params(self, step: int, abstract_params, best: bool = False):
    """Only the trained params of `step` (of WORKDIR/best with `best`): no
    optimizer state is read, so inference needs neither its memory nor the
    optimizer config. Raises Damaged or checks.ConfigError like `restore`."""
    directory = self.best_directory if best else self.directory
    self._check_fits(step, {'params': abstract_params}, directory, partial=True)
    item = {'params': abstract_params}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)
    path = os.path.join(self._step_path(step, directory), 'state')
    with ocp.PyTreeCheckpointer() as checkpointer:
      params = self._read(step, directory,
                          lambda: checkpointer.restore(path, args=args))['params']
    if not finite(params):
      raise Damaged(step, self._step_path(step, directory), 'it holds NaN or inf')
    return params

  def check_finite(self, step: int, state, loss: float = 0.0) -> None:
    """Raises NonFinite, saying truly where a rerun resumes, unless all is finite."""
    if np.isfinite(loss) and finite(state):
      return
    self._manager.wait_until_finished()
    latest = self.latest_step()
    where = (f'a rerun resumes from step {latest}, the newest checkpoint in {self.directory}'
             if latest is not None else
             'no checkpoint was saved before it: a rerun starts from the beginning')
    raise NonFinite(
        f'the train state holds NaN or inf at step {step} (loss {loss}) and was not saved; '
        f'{where}. Lower config.optim.learning_rate (or set config.optim.clip_norm) '
        'before rerunning')

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()
    self._best.close()

  # --- damage ----------------------------------------------------------------

  def _step_path(self, step: int, directory: str | None = None) -> str:
    return os.path.join(directory or self.directory, str(step))

  def _check_fits(self, step: int, abstract_tree, directory: str, partial: bool) -> None:
    """Damaged when the step's state metadata is unreadable; ConfigError when it
    describes arrays other than `abstract_tree`'s (a config change); with
    `partial`, arrays `abstract_tree` does not ask for are fine."""
    path = epath.Path(self._step_path(step, directory)) / 'state'
    if not (path / '_METADATA').exists():
      raise Damaged(step, str(path.parent), f'{path.name}/_METADATA is missing'
                    if path.exists() else f'{path.name}/ is missing')
    try:
      meta = ocp.PyTreeCheckpointer().metadata(path)
    except Exception as e:  # noqa: BLE001 - orbax raises several kinds
      raise Damaged(step, str(path.parent), f'unreadable metadata: {type(e).__name__}') from e
    meta = getattr(getattr(meta, 'item_metadata', meta), 'tree', meta)
    stored, wanted = _shapes(meta), _shapes(abstract_tree)
    missing = sorted(set(wanted) - set(stored))
    extra = [] if partial else sorted(set(stored) - set(wanted))
    differ = [k for k in wanted if k in stored and stored[k] != wanted[k]]
    if missing or extra or differ:
      what = (f'it lacks {missing[0]}' if missing else f'it holds {extra[0]}, this config not'
              if extra else f'{differ[0]} is {stored[differ[0]]}, not {wanted[differ[0]]}')
      raise checks.ConfigError(
          f'checkpoint step {step} in {directory} was trained with another config ({what}): '
          'a field that shapes the state (model.*, lora.*, optim.name, optim.momentum) '
          'differs from the workdir\'s config.json; use its value or a new --workdir')

  def _read(self, step: int, directory: str, restore):
    try:
      return restore()
    except Exception as e:  # noqa: BLE001 - tensorstore, orbax and grain errors differ
      first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ''
      raise Damaged(step, self._step_path(step, directory),
                    f'{type(e).__name__}: {first}') from e

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      target = epath.Path(self.damaged_directory)
      target.mkdir(parents=True, exist_ok=True)
      dest, n = target / str(step), 1
      while dest.exists():
        dest, n = target / f'{step}.{n}', n + 1
      epath.Path(self._step_path(step)).rename(dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moved damaged checkpoint {step}')
    self._manager.reload()


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """'params/layer_0/attn/q_einsum/w' -> shape, for every array of a (metadata) tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {sharding.path_str(p): tuple(x.shape) for p, x in flat if hasattr(x, 'shape')}


@jax.jit
def _all_finite(tree) -> jax.Array:
  ok = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(ok)) if ok else jnp.array(True)


def finite(tree) -> bool:
  """True when no float array of `tree` holds NaN or inf; one jitted reduction on device."""
  out = _all_finite(tree)
  return bool(np.asarray(out.addressable_shards[0].data))

