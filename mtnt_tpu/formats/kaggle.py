"""Kaggle's Flax checkpoints: an orbax tree, restored straight into target shardings.

On disk (what `gemma.params.load_params` reads): a semi-flat orbax tree such
as {'transformer/layer_0/attn/q_einsum': {'w': ...},
    'transformer/layer_0/mlp/linear': {'w': ...}, ...}.
In memory: nested {'layer_0': {'attn': {'q_einsum': {'w': ...}},
                               'mlp': {'linear': ...}}}.
"""

from __future__ import annotations

from typing import Any

import flax
from gemma import params as gemma_params
import orbax.checkpoint as ocp

Params = Any


def to_kaggle_layout(params: Params) -> dict:
  """The on-disk tree for `params` (arrays or ShapeDtypeStructs)."""
  return gemma_params.flatten_and_remap_params({'transformer': params})


def from_kaggle_layout(tree: dict) -> Params:
  return gemma_params.nest_params(gemma_params.param_remapper(tree))['transformer']


def load(path: str, target: Params) -> Params:
  """Restores a Kaggle Flax checkpoint into `target`'s shapes, dtypes and shardings.

  Each device reads only its own shard; nothing is materialised whole on a
  host. A checkpoint of another variant stops with both shapes named.
  """
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    on_disk = checkpointer.metadata(path)
  except (FileNotFoundError, ValueError) as e:
    raise FileNotFoundError(
        f'config.model.checkpoint={path!r} is not an orbax checkpoint '
        f'(the Kaggle Flax dir holding _METADATA/checkpoint): {e}') from e
  on_disk = getattr(on_disk, 'item_metadata', on_disk)
  on_disk = getattr(on_disk, 'tree', on_disk)
  want = to_kaggle_layout(target)
  _check_same_tree(path, on_disk, want)
  restore_args = ocp.checkpoint_utils.construct_restore_args(want)
  tree = checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(item=want, restore_args=restore_args))
  return from_kaggle_layout(tree)


def _check_same_tree(path: str, on_disk: Any, want: dict) -> None:
  disk = flax.traverse_util.flatten_dict(dict(on_disk), sep='|')
  need = flax.traverse_util.flatten_dict(want, sep='|')
  missing = sorted(set(need) - set(disk))
  if missing:
    raise ValueError(
        f'checkpoint {path} lacks {len(missing)} parameters the variant needs '
        f'(first: {missing[0].replace("|", "/")}); is config.model.variant the '
        'checkpoint\'s variant?')
  for key, leaf in need.items():
    shape = tuple(getattr(disk[key], 'shape', ()))
    if shape != tuple(leaf.shape):
      raise ValueError(
          f'checkpoint {path} has {key.replace("|", "/")} of shape {shape}, '
          f'the configured variant expects {tuple(leaf.shape)}; set '
          'config.model.variant to the checkpoint\'s variant')


def save(params: Params, path: str) -> None:
  """Writes `params` (host arrays) as the Kaggle tree at `path` (must not exist)."""
  gemma_params.save_params(to_kaggle_layout(params), path)
