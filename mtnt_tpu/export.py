"""python -m mtnt_tpu.export --workdir DIR --out OUT [--step N] [--name NAME] [--dtype D] [--merge]

Writes a workdir's fine-tuned weights as Kaggle ships Gemma for Flax:

    OUT/NAME/             orbax checkpoint, the tree gemma.params.load_and_format_params reads
    OUT/tokenizer.model   the SentencePiece model the run trained with
    OUT/mtnt_export.json  where the weights came from, and the prompt format they expect

so gemma's own code runs them:

    params = gemma.params.load_and_format_params('OUT/NAME')
    sampler = gemma.sampler.Sampler(
        transformer=gemma.transformer.Transformer(config),  # the variant's config
        vocab=spm.SentencePieceProcessor(model_file='OUT/tokenizer.model'),
        params=params['transformer'], cache_length=...)

A LoRA workdir holds only adapters; `--merge` folds them into the base
weights (W + alpha/rank * A B), since gemma's loader reads plain weights only.

The model answers the prompt it was fine-tuned on (`tokenizer.prompt_text`,
recorded in mtnt_export.json). One process; the weights pass through host
memory. OUT must not exist: nothing is ever overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
from gemma import params as gemma_params
import jax
import ml_collections
import numpy as np

from mtnt_tpu import model as model_lib
from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu import workdir as workdir_lib

FLAGS = flags.FLAGS
MANIFEST = 'mtnt_export.json'


def define_flags() -> None:
  """The command's flags; only when run as a program, so importing defines none."""
  flags.DEFINE_string('workdir', None, 'A training workdir (holds config.json).', required=True)
  flags.DEFINE_string('out', None, 'New directory to write; must not exist.', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the best checkpoint.')
  flags.DEFINE_string('name', None, 'Checkpoint subdirectory; default: the last part of '
                      'config.model.checkpoint (e.g. 2b), else the variant.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                    'Weight dtype on disk; default: as trained (config.model.param_dtype).')
  flags.DEFINE_bool('merge', False, 'LoRA workdirs: fold the adapters into the base weights '
                    '(required for them: gemma loads plain weights only).')


def default_name(config: ml_collections.ConfigDict) -> str:
  checkpoint = config.model.checkpoint.rstrip('/')
  if checkpoint not in ('', 'random'):
    return os.path.basename(checkpoint)
  return config.model.variant


def export(workdir: str, out: str, *, step: int | None = None, name: str | None = None,
           dtype: str | None = None, merge: bool = False) -> str:
  """Writes OUT (see the module doc); returns the checkpoint dir OUT/NAME."""
  if os.path.exists(out):
    raise workdir_lib.WorkdirError(f'--out {out} already exists; export never overwrites, '
                                 'pass a new directory')
  config = workdir_lib.load_config(workdir)
  if config.lora.rank and not merge:
    raise workdir_lib.WorkdirError(
        f'{workdir} trained LoRA adapters (rank {config.lora.rank}) on '
        f'{config.model.checkpoint or "a random base"}; pass --merge to fold them into '
        'the base weights')
  # restore() hands back plain weights: LoRA adapters already folded in.
  trained = workdir_lib.restore(workdir, config, step)
  params = trained.params
  # Host numpy arrays: the checkpoint then carries no device layout, and loads
  # anywhere (one device, another topology, no mesh at all).
  params = jax.tree.map(lambda p: np.asarray(jax.device_get(p)), params)
  if dtype:
    params = jax.tree.map(lambda p: p.astype(dtype), params)
  name = name or default_name(config)
  partial = out.rstrip('/') + '.partial'
  if os.path.exists(partial):
    shutil.rmtree(partial)  # a previous export that died half-way
  os.makedirs(partial)
  gemma_params.save_params(model_lib.to_kaggle_layout(params), os.path.join(partial, name))
  shutil.copyfile(config.tokenizer.path, os.path.join(partial, 'tokenizer.model'))
  with open(os.path.join(partial, MANIFEST), 'w', encoding='utf-8') as f:
    json.dump({
        'workdir': os.path.abspath(workdir), 'step': trained.step, 'origin': trained.origin,
        'lora_merged': bool(config.lora.rank),
        'variant': config.model.variant, 'checkpoint_dir': name,
        'dtype': str(jax.tree.leaves(params)[0].dtype),
        'chat_template': bool(config.model.chat_template),
        'dst_lang': config.data.dst_lang,
        'prompt_example': tokenizer_lib.prompt_text('{source}', config.data.dst_lang,
                                                    config.model.chat_template),
    }, f, indent=2)
  os.replace(partial, out)  # OUT appears complete or not at all
  return os.path.join(out, name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  workdir_lib.quiet_libraries()
  try:
    workdir = workdir_lib.resolve(FLAGS.workdir)
    workdir_lib.use_cpu_devices(workdir_lib.load_config(workdir))
    path = export(workdir, FLAGS.out, step=FLAGS.step, name=FLAGS.name,
                  dtype=FLAGS.dtype, merge=FLAGS.merge)
  except (ValueError, OSError) as e:  # WorkdirError among them
    raise SystemExit(f'error: {e}') from None
  print(f'wrote {path} and {os.path.join(FLAGS.out, "tokenizer.model")}', file=sys.stderr)


if __name__ == '__main__':
  define_flags()
  app.run(main)
