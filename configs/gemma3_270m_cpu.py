"""The real Gemma 3 270M fine-tuned into an en->fr translator on a 2-core CPU.

One-time set-up (neither counts against the recipe's 25 minutes; README,
"A real Gemma that translates", has the commands):
    python -m mtnt_tpu.convert ... --variant gemma3_270m --out ~/models/gemma3-270m
    python -m mtnt_tpu.prepare ... --out_dir ~/data/multi30k   (Multi30k en-fr)

BENCHMARKS.md ("A real Gemma that translates") says what each choice here bought.
"""

import os

from configs import common


def get_config():
  c = common.get_config()
  home = os.path.expanduser('~')
  c.model.variant = 'gemma3_270m'
  c.model.checkpoint = os.path.join(home, 'models', 'gemma3-270m', 'gemma3_270m')
  c.tokenizer.path = ''  # the converted checkpoint's own, beside it
  c.data.dir = os.path.join(home, 'data', 'multi30k')
  c.data.max_len = 128
  c.train.batch_size = 4
  c.train.num_steps = 270
  c.train.log_every = 10
  c.train.eval_at_start = False
  c.train.eval_every = 100_000  # once, at the end
  c.train.checkpoint_every = 100_000
  c.train.keep_checkpoints = 1
  c.train.freeze = 'embedder/'
  c.model.loss_positions = 0.75
  c.eval.max_decode_len = 64
  c.eval.loss = False  # judged by BLEU and chrF; the eval loss would cost ~3 minutes
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  c.runtime.cpu_devices = 1
  c.mesh.data = 1
  c.mesh.fsdp = 1
  return c
