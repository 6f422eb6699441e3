"""One orbax manager over {train state, data iterator}, and the resume order.

Resume order, decided once in `train.py` from these answers:
  1. this workdir's latest complete checkpoint (state and data iterator);
  2. else config.model.checkpoint, a Kaggle Flax checkpoint (weights only);
  3. else random init, for tiny variants or checkpoint='random' only.

Orbax writes each step into a temporary directory and renames it when every
process has finished, so a run killed mid-save leaves no step that looks
complete; `latest_step` never returns one.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

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

  def best_step(self) -> int | None:
    return self._best.best_step()

  def best_value(self) -> float | None:
    step = self.best_step()
    if step is None:
      return None
    return (self._best.metrics(step) or {}).get(self._best_metric)

  def save_best(self, step: int, state, scores: dict[str, float]) -> bool:
    """Saves `state` as the best if `scores` beats the best so far."""
    value = scores.get(self._best_metric)
    if value is None:
      return False
    old = self.best_value()
    better = old is None or (value > old if self._best_mode == 'max' else value < old)
    if better:
      self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      metrics={k: float(v) for k, v in scores.items()}, force=True)
    return better

  def restore_best(self, abstract_state, step: int | None = None):
    """The best state (or the best dir's `step`), into `abstract_state`'s shardings."""
    step = self.best_step() if step is None else step
    restored = self._best.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored['state']

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iter: grain.DatasetIterator | None) -> None:
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      # Grain's handler writes the iterator state of this process synchronously,
      # at this call, so the saved position matches the saved state.
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iter: grain.DatasetIterator | None):
    """Restores into `abstract_state`'s shardings; `data_iter` is advanced in place."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()
    self._best.close()


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their target sharding, for restore and load."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
