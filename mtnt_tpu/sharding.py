"""The device mesh and the sharding rules, as data, in one place.

Every array the trainer keeps is sharded by the first rule whose pattern
matches its path ('layer_3/attn/q_einsum/w', 'opt_state/0/mu/embedder/...').
Optimizer moments share their parameter's path suffix, so they land beside the
parameter they update. Anything no rule names is replicated.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Mesh axes, outermost first. Batches are split over all of them; parameters
# and optimizer state over 'fsdp' only (ZeRO-3 style: gathered per layer in the
# forward pass, gradients reduce-scattered back). 'dcn_data' spans slices of a
# multislice run, so only gradient all-reduces cross the slow network.
AXES = ('dcn_data', 'data', 'fsdp')
BATCH_AXES = ('dcn_data', 'data', 'fsdp')

# (regex over the parameter path, spec per array dimension). Shapes from
# gemma.modules: D embed, F hidden, N heads, K kv heads, H head dim, V vocab.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r'embedder/input_embedding$', ('fsdp', None)),        # [V, D]
    (r'attn/q_einsum/w$', (None, 'fsdp', None)),           # [N, D, H]
    (r'attn/kv_einsum/w$', (None, None, 'fsdp', None)),    # [2, K, D, H]
    (r'attn/qkv_einsum/w$', (None, None, 'fsdp', None)),   # [3, N, D, H]
    (r'attn/attn_vec_einsum/w$', (None, None, 'fsdp')),    # [N, H, D]
    (r'mlp/gating_einsum$', (None, 'fsdp', None)),         # [2, D, F] or [2, F, D]
    (r'mlp/linear$', ('fsdp', None)),                      # [F, D]
    # Norm scales ([D]) and step counters stay replicated: tiny, and read
    # by every device.
)


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None,
              dcn_data: int = 1) -> Mesh:
  """A ('dcn_data', 'data', 'fsdp') mesh over `devices` (default: all).

  One of data/fsdp may be -1 (the rest of a slice's devices).
  """
  devices = list(jax.devices() if devices is None else devices)
  if dcn_data < 1 or len(devices) % dcn_data:
    raise ValueError(f'config.mesh.dcn_data={dcn_data} must divide the {len(devices)} devices')
  per_slice = len(devices) // dcn_data
  sizes = resolve_axis_sizes({'data': data, 'fsdp': fsdp}, per_slice)
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  if dcn_data > 1 and len(slices) == dcn_data:
    # Real multislice: keep each slice's devices together on the inner axes.
    grid = mesh_utils.create_hybrid_device_mesh(
        (1, sizes['data'], sizes['fsdp']), (dcn_data, 1, 1), devices)
  elif len(slices) > 1:
    # Otherwise fsdp's all-gathers would cross the slow network between slices.
    raise ValueError(f'config.mesh.dcn_data={dcn_data} but the devices span '
                     f'{len(slices)} slices; set it to {len(slices)}')
  else:
    grid = mesh_utils.create_device_mesh(
        (dcn_data, sizes['data'], sizes['fsdp']), devices, allow_split_physical_axes=True)
  return Mesh(grid, AXES)


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {sizes}')
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f'config.mesh.{bad[0]}={sizes[bad[0]]}: use a positive size or -1')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f'config.mesh {sizes} cannot cover {num_devices} devices: the fixed axes '
          f'({fixed}) must divide the device count')
    sizes = {**sizes, free[0]: num_devices // fixed}
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
        f'config.mesh {sizes} multiplies to {math.prod(sizes.values())} but there '
        f'are {num_devices} devices; set config.mesh.fsdp=-1 to take the rest')
  return sizes


def path_str(path: tuple) -> str:
  """'layer_0/attn/q_einsum/w': the form the rules' regexes match."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh,
             rules=PARAM_RULES) -> P:
  """The first matching rule's spec, with axes that do not divide dropped."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      if len(spec) != len(shape):
        raise ValueError(
            f'sharding rule {pattern!r} has {len(spec)} dims but {path} has '
            f'shape {shape}; fix PARAM_RULES in mtnt_tpu/sharding.py')
      return P(*(a if a is None or dim % mesh.shape[a] == 0 else None
                 for a, dim in zip(spec, shape)))
  return P()


def tree_shardings(tree: Any, mesh: Mesh, rules=PARAM_RULES) -> Any:
  """NamedShardings for every leaf of an (abstract) tree, by path rules."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path_str(path), x.shape, mesh, rules)),
      tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over every batch axis; the length axis whole."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def describe(tree: Any, shardings: Any) -> str:
  """A table of path, shape and spec, printed at start-up."""
  rows = []
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  for (path, leaf), sharding in zip(flat, specs):
    rows.append((path_str(path), str(tuple(leaf.shape)), str(sharding.spec)))
  # One line per distinct layer pattern keeps an 18-layer model's table short.
  seen, out = set(), []
  for name, shape, spec in rows:
    key = (re.sub(r'layer_\d+', 'layer_*', name), shape, spec)
    if key not in seen:
      seen.add(key)
      out.append(key)
  w = max(len(r[0]) for r in out)
  return '\n'.join(f'  {n:<{w}}  {s:<22} {p}' for n, s, p in out)
