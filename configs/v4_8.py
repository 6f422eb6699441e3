"""Gemma 2B full fine-tune with AdamW on a whole TPU v4-8 (4 chips, 8 TensorCores).

Download the Kaggle Flax checkpoint (google/gemma/flax/2b) to ~/gemma-2b and
prepare MTNT with `python -m mtnt_tpu.prepare --mtnt_dir ... --out ~/data`.
"""

import os

from configs import common


def get_config():
  c = common.get_config()
  home = os.path.expanduser('~')
  c.model.variant = 'gemma_2b'
  c.model.checkpoint = os.path.join(home, 'gemma-2b', '2b')
  c.model.compute_dtype = 'bfloat16'
  c.tokenizer.path = os.path.join(home, 'gemma-2b', 'tokenizer.model')
  c.data.dir = os.path.join(home, 'data')
  c.train.batch_size = 64
  c.train.num_steps = 2000
  c.optim.learning_rate = 1e-5
  c.mesh.data = 1
  c.mesh.fsdp = -1  # all 8 TensorCores
  return c
