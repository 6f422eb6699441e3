"""Every config value checked before anything is compiled or written.

Each bad value stops the run with one line naming the field and the fix.
`config` checks need only the config and the mesh (the fit check runs them
for a TPU it does not have); `files` checks read the data, tokenizer and
checkpoint paths.
"""

from __future__ import annotations


import jax
import ml_collections

from mtnt_tpu import checkpoint as checkpoint_lib
from mtnt_tpu import evaluate as evaluate_lib
from mtnt_tpu import formats
from mtnt_tpu import lora as lora_lib
from mtnt_tpu import model as model_lib
from mtnt_tpu import optim
from mtnt_tpu import runtime
from mtnt_tpu import sharding
from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu.data import noise
from mtnt_tpu.data import pipeline


class ConfigError(ValueError):
  """A bad config or input, found before anything is compiled or written."""


# (section, field, smallest allowed value, what the value means)
_AT_LEAST = (
    ('train', 'num_steps', 1, 'steps to train to'),
    ('train', 'batch_size', 1, 'global rows per step'),
    ('train', 'log_every', 1, 'steps between logged records'),
    ('train', 'eval_every', 1, 'steps between evals'),
    ('train', 'checkpoint_every', 1, 'steps between checkpoints'),
    ('train', 'keep_checkpoints', 1, 'checkpoints kept'),
    ('optim', 'grad_accum_steps', 1, 'micro-batches per step'),
    ('optim', 'learning_rate', 0, 'the peak learning rate'),
    ('optim', 'warmup_steps', 0, 'warmup steps'),
    ('optim', 'clip_norm', 0, 'the gradient clipping norm (0: off)'),
    ('optim', 'weight_decay', 0, 'the weight decay'),
    ('optim', 'end_learning_rate_ratio', 0, 'the final fraction of the learning rate'),
    ('eval', 'decode_examples', -1, 'eval examples to translate (-1: all, 0: none)'),
    ('eval', 'max_decode_len', 1, 'new tokens per translation'),
    ('eval', 'num_logged_examples', 0, 'translations written per eval'),
    ('lora', 'rank', 0, 'the LoRA rank (0: off)'),
)


def check_config(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError naming the field and the fix."""
  for section, name, least, meaning in _AT_LEAST:
    value = c[section][name]
    if not value >= least:  # also catches NaN
      raise ValueError(f'config.{section}.{name}={value} must be >= {least} ({meaning})')
  model_lib.check_variant(c.model.variant)
  runtime.parse_step_range(c.profile.steps)
  divisor = sharding.batch_divisor(mesh) * c.optim.grad_accum_steps
  if c.train.batch_size % divisor:
    raise ValueError(
        f'config.train.batch_size={c.train.batch_size} must be a multiple of '
        f'{divisor} (mesh batch axes {sharding.batch_divisor(mesh)} x '
        f'config.optim.grad_accum_steps={c.optim.grad_accum_steps})')
  pipeline.check_overlong(c.data.overlong)
  if not 0 <= c.data.noise <= 1:
    raise ValueError(f'config.data.noise={c.data.noise}: a fraction of training examples, '
                     'from 0 (clean) to 1')
  noise.from_rates(c.data.noise_rates)
  if c.model.loss_chunk < 0:
    raise ValueError(f'config.model.loss_chunk={c.model.loss_chunk}: use tokens per chunk '
                     '(> 0), or 0 for whole logits')
  if not 0 <= c.model.loss_positions <= 1 or (c.model.loss_positions and not c.model.loss_chunk):
    raise ValueError(f'config.model.loss_positions={c.model.loss_positions}: a fraction of '
                     'each row from 0 (off) to 1, and it needs config.model.loss_chunk > 0')
  if c.eval.best_mode not in ('max', 'min'):
    raise ValueError(f"config.eval.best_mode={c.eval.best_mode!r}: use 'max' or 'min'")
  for section, name in (('model', 'param_dtype'), ('model', 'compute_dtype'),
                        ('lora', 'base_dtype')):
    if c[section][name] not in ('float32', 'bfloat16'):
      raise ValueError(f"config.{section}.{name}={c[section][name]!r}: use 'float32' or "
                       "'bfloat16'")
  if lora_lib.LoraSpec.from_config(c.lora) and optim.Freeze.from_config(c.train.freeze):
    raise ValueError('config.train.freeze is for full fine-tuning; with config.lora.rank > 0 '
                     'only the adapters train already: set one of them')
  evaluate_lib.check_config(c)
  if c.model.checkpoint == '' and not c.model.variant.startswith('tiny'):
    raise ValueError(
        f'config.model.checkpoint is empty for {c.model.variant}: point it at a Kaggle '
        "Flax dir, a Hugging Face dir or a .gguf file, or set it to 'random' to train "
        'from scratch')


def check_files(c: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
  """Checks the data, tokenizer and checkpoint paths; returns the tokenizer."""
  if c.train.batch_size % jax.process_count():
    raise ValueError(f'config.train.batch_size={c.train.batch_size} must divide over '
                     f'{jax.process_count()} processes')
  for split in (c.data.train_split, c.data.eval_split):
    pipeline.split_paths(c.data.dir, split)
  shards = pipeline.num_data_shards(c.data, pipeline.HostShard.current())
  if c.train.batch_size % shards:
    raise ValueError(f'config.train.batch_size={c.train.batch_size} must be a multiple of '
                     f'config.data.num_shards={shards}')
  pretrained = checkpoint_lib.pretrained_path(c.model)
  if pretrained:
    formats.detect(pretrained)
  tok = tokenizer_lib.Tokenizer(c.tokenizer.path)
  # A row must hold the prompt of a one-token source and one target token,
  # or no token is ever trained on.
  least = len(tok.encode_prompt('x', c.data.dst_lang, c.model.chat_template)) + 1
  if c.data.max_len < least:
    raise ValueError(f'config.data.max_len={c.data.max_len} leaves no room for a '
                     f'translation (the prompt alone takes {least - 1} tokens); use at '
                     f'least {least}, e.g. 128')
  return tok
