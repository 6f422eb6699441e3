"""LoRA adapters as a PEFT adapter: what transformers + peft, and vLLM, load.

    OUT/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules
                                   (q_proj, k_proj, v_proj, o_proj, gate_proj,
                                   up_proj, down_proj), base_model_name_or_path
    OUT/adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in]
                                   base_model.model.<module>.lora_B.weight [out, r]

PEFT adds (lora_alpha / r) * B A to each [out, in] weight. gemma's adapter of
one einsum is A (input dims, r) and B (r, output dims); an einsum that holds
several Hugging Face projections (kv_einsum: k and v; gating_einsum: gate and
up) shares its A between them, each projection taking its slice of B.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import flax
import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from mtnt_tpu import model as model_lib
from mtnt_tpu.formats import layout

CONFIG = 'adapter_config.json'
WEIGHTS = 'adapter_model.safetensors'
# gemma einsum -> the layout roles (Hugging Face projections) it holds, in order.
ROLES = {'q_einsum': ('q',), 'kv_einsum': ('k', 'v'), 'qkv_einsum': ('q', 'k', 'v'),
         'attn_vec_einsum': ('o',), 'gating_einsum': ('gate', 'up'), 'linear': ('down',)}


def _einsum_of(adapter_path: str) -> tuple[str, str]:
  """'layer_3/attn/q_einsum/lora' -> ('layer_3', 'q_einsum'); mlp's 'lora_linear' too."""
  parts = adapter_path.split('/')
  name = parts[-2] if parts[-1] == 'lora' else parts[-1][len('lora_'):]
  return parts[0], name


def tensors(adapters: Any, cfg: model_lib.TransformerConfig, dtype: str
            ) -> Iterator[tuple[str, str, np.ndarray]]:
  """(HF module, 'lora_A' or 'lora_B', array) for every adapted projection."""
  table = layout.NAMES[layout.generation(cfg)]
  flat = flax.traverse_util.flatten_dict(adapters, sep='/')
  for path in sorted(p[:-len('/a')] for p in flat if p.endswith('/a')):
    a = np.asarray(jax.device_get(flat[path + '/a'])).astype(np.float32)
    b = np.asarray(jax.device_get(flat[path + '/b'])).astype(np.float32)
    layer, einsum = _einsum_of(path)
    roles = ROLES[einsum]
    rank = a.shape[-1]
    lora_a = a.reshape(-1, rank).T  # [r, in]
    parts = [b[:, k] for k in range(len(roles))] if len(roles) > 1 else [b]
    for role, part in zip(roles, parts):
      module = table[role][layout.HF].format(i=int(layer[len('layer_'):]))
      module = module[:-len('.weight')]
      yield module, 'lora_A', np.ascontiguousarray(lora_a).astype(dtype)
      yield module, 'lora_B', np.ascontiguousarray(part.reshape(rank, -1).T).astype(dtype)


def save(adapters: Any, cfg: model_lib.TransformerConfig, out: str, *, rank: int,
         alpha: float, base_model: str, dtype: str = 'float32') -> None:
  """Writes adapter_config.json and adapter_model.safetensors into `out` (exists)."""
  weights, modules = {}, set()
  for module, which, array in tensors(adapters, cfg, dtype):
    weights[f'base_model.model.{module}.{which}.weight'] = array
    modules.add(module.rsplit('.', 1)[-1])
  safetensors_numpy.save_file(weights, os.path.join(out, WEIGHTS), metadata={'format': 'pt'})
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': rank, 'lora_alpha': alpha,
      'target_modules': sorted(modules), 'lora_dropout': 0.0, 'bias': 'none',
      'fan_in_fan_out': False, 'inference_mode': True, 'init_lora_weights': True,
      'use_rslora': False, 'use_dora': False, 'modules_to_save': None,
      'layers_to_transform': None, 'base_model_name_or_path': base_model, 'revision': None,
  }
  with open(os.path.join(out, CONFIG), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)
    f.write('\n')
