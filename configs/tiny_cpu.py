"""README's first command: a tiny Gemma-architecture model, random init, on the
project's own en-fr sample, on a CPU with 8 faked devices (mesh 2 x 4)."""

import os

from configs import common
import mtnt_tpu.data.sample

SAMPLE = os.path.dirname(mtnt_tpu.data.sample.__file__)


def get_config():
  c = common.get_config()
  c.model.variant = 'tiny'
  c.model.checkpoint = ''
  c.tokenizer.path = os.path.join(SAMPLE, 'tokenizer.model')
  c.data.dir = SAMPLE
  c.data.max_len = 64
  c.train.batch_size = 16
  c.train.num_steps = 300
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.01
  c.runtime.cpu_devices = 8
  c.mesh.data = 2
  c.mesh.fsdp = 4
  return c
