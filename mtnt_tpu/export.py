"""python -m mtnt_tpu.export --workdir DIR --out OUT [--format kaggle|hf|peft] [--step N] ...

Writes a workdir's fine-tuned weights (DIR may be a gs:// bucket; OUT is local):

  --format kaggle (default), as Kaggle ships Gemma for Flax:
    OUT/NAME/             orbax checkpoint, the tree gemma.params.load_and_format_params reads
  --format hf, as Hugging Face ships Gemma (transformers, vLLM, llama.cpp's converter):
    OUT/config.json, OUT/generation_config.json, OUT/model*.safetensors (bf16 by default)
  --format peft, a LoRA workdir's adapters alone (transformers + peft, vLLM --lora-modules):
    OUT/adapter_config.json, OUT/adapter_model.safetensors
  and with each
    OUT/tokenizer.model   the SentencePiece model the run trained with
    OUT/mtnt_export.json  where the weights came from, and the prompt format they expect

gemma's own code runs a kaggle export:

    params = gemma.params.load_and_format_params('OUT/NAME')
    sampler = gemma.sampler.Sampler(
        transformer=gemma.transformer.Transformer(config),  # the variant's config
        vocab=spm.SentencePieceProcessor(model_file='OUT/tokenizer.model'),
        params=params['transformer'], cache_length=...)

A LoRA workdir holds only adapters; `--merge` folds them into the base
weights (W + alpha/rank * A B) for kaggle and hf, which hold plain weights;
`--format peft` writes the adapters unfolded.

The model answers the prompt it was fine-tuned on (`tokenizer.prompt_text`,
recorded in mtnt_export.json). One process; the weights pass through host
memory. OUT must not exist: nothing is ever overwritten, and OUT appears
complete or not at all.
"""

from __future__ import annotations

import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from mtnt_tpu import formats
from mtnt_tpu import runtime
from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu import workdir as workdir_lib

FLAGS = flags.FLAGS
MANIFEST = 'mtnt_export.json'


def define_flags() -> None:
  """The command's flags; only when run as a program, so importing defines none."""
  flags.DEFINE_string('workdir', None, 'A training workdir (holds config.json).', required=True)
  flags.DEFINE_string('out', None, 'New directory to write; must not exist.', required=True)
  flags.DEFINE_enum('format', formats.KAGGLE, [formats.KAGGLE, formats.HF, formats.PEFT],
                    'kaggle: orbax Flax tree; hf: transformers safetensors; peft: LoRA adapters.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the best checkpoint.')
  flags.DEFINE_string('name', None, 'Checkpoint subdirectory; default: the last part of '
                      'config.model.checkpoint (e.g. 2b), else the variant.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                    'Weight dtype on disk; default: as trained (kaggle), bfloat16 (hf), '
                    'float32 (peft).')
  flags.DEFINE_bool('merge', False, 'LoRA workdirs, kaggle and hf: fold the adapters into the '
                    'base weights (required for them: those formats hold plain weights).')


def default_name(config: ml_collections.ConfigDict) -> str:
  checkpoint = config.model.checkpoint.rstrip('/')
  if checkpoint not in ('', 'random'):
    return os.path.basename(checkpoint)
  return config.model.variant


def export(workdir: str, out: str, *, fmt: str = formats.KAGGLE, step: int | None = None,
           name: str | None = None, dtype: str | None = None, merge: bool = False) -> str:
  """Writes OUT (see the module doc); returns the path a loader takes (OUT/NAME or OUT)."""
  if os.path.exists(out):
    raise workdir_lib.WorkdirError(f'--out {out} already exists; export never overwrites, '
                                 'pass a new directory')
  config = workdir_lib.load_config(workdir)
  if fmt == formats.PEFT and not config.lora.rank:
    raise workdir_lib.WorkdirError(
        f'{workdir} trained all weights (config.lora.rank=0); --format peft writes LoRA '
        'adapters: use --format hf or kaggle')
  if fmt != formats.PEFT and config.lora.rank and not merge:
    raise workdir_lib.WorkdirError(
        f'{workdir} trained LoRA adapters (rank {config.lora.rank}) on '
        f'{config.model.checkpoint or "a random base"}; pass --merge to fold them into '
        'the base weights, or --format peft to write the adapters')
  # restore() hands back plain weights (LoRA adapters folded in) and the adapters.
  trained = workdir_lib.restore(workdir, config, step)
  params = trained.adapters if fmt == formats.PEFT else trained.params
  name = name or default_name(config)
  return formats.save(
      fmt, params, trained.setup.model_config, out, tokenizer=trained.setup.tokenizer.path,
      dtype=dtype, name=name,
      lora=(dict(rank=config.lora.rank, alpha=config.lora.alpha,
                 base_model=config.model.checkpoint or config.model.variant)
            if fmt == formats.PEFT else None),
      manifest=(MANIFEST, {
          'workdir': workdir if '://' in workdir else os.path.abspath(workdir),
          'step': trained.step, 'origin': trained.origin, 'format': fmt,
          'lora_merged': bool(config.lora.rank) and fmt != formats.PEFT,
          'variant': config.model.variant,
          'checkpoint_dir': name if fmt == formats.KAGGLE else '.',
          'dtype': str(dtype or jax.tree.leaves(params)[0].dtype),
          'chat_template': bool(config.model.chat_template),
          'dst_lang': config.data.dst_lang,
          'prompt_example': tokenizer_lib.prompt_text('{source}', config.data.dst_lang,
                                                      config.model.chat_template),
      }))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  # orbax's notes (read-only managers, finalize threads) stay off a CLI's stderr.
  runtime.quiet_libraries(logging_std.ERROR)
  try:
    workdir = workdir_lib.resolve(FLAGS.workdir)
    workdir_lib.use_cpu_devices(workdir_lib.load_config(workdir))
    path = export(workdir, FLAGS.out, fmt=FLAGS.format, step=FLAGS.step, name=FLAGS.name,
                  dtype=FLAGS.dtype, merge=FLAGS.merge)
  except (ValueError, OSError) as e:  # WorkdirError among them
    raise SystemExit(f'error: {e}') from None
  print(f'wrote {path} and {os.path.join(FLAGS.out, "tokenizer.model")}', file=sys.stderr)


if __name__ == '__main__':
  define_flags()
  app.run(main)
