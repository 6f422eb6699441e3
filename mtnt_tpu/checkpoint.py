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


class Checkpoints:
  """Saves and restores {'state': TrainState, 'data': Grain iterator} per step."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.join(workdir, 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_names=('state', 'data'))

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

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their target sharding, for restore and load."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
