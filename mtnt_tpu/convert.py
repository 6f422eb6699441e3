"""python -m mtnt_tpu.convert --checkpoint PATH --variant V --out DIR [--to kaggle|hf] [--dtype D]

Converts a checkpoint of any format mtnt_tpu reads (Kaggle Flax dir, Hugging
Face dir, .gguf file) into a Kaggle Flax or Hugging Face checkpoint, with its
tokenizer, once, so later runs load it fast:

    uv run --extra real python -m mtnt_tpu.convert \\
        --checkpoint /work/models/gemma-3-270m-q4_k_m.gguf --variant gemma3_270m \\
        --out /work/models/gemma3-270m        # -> DIR/gemma3_270m/, DIR/tokenizer.model

then `--config.model.checkpoint=DIR/gemma3_270m` (the tokenizer is found beside
it). A GGUF's quantised weights are dequantised; its tokenizer is rebuilt as a
SentencePiece model. DIR must not exist; it appears complete or not at all.
"""

from __future__ import annotations

import sys
import time

from absl import app
from absl import flags
from absl import logging

from mtnt_tpu import formats
from mtnt_tpu import model as model_lib
from mtnt_tpu import tokenizer as tokenizer_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; only when run as a program, so importing defines none."""
  flags.DEFINE_string('checkpoint', None, 'Kaggle Flax dir, Hugging Face dir or .gguf file.',
                      required=True)
  flags.DEFINE_string('variant', None, 'The checkpoint\'s variant (mtnt_tpu.model.VARIANTS).',
                      required=True)
  flags.DEFINE_string('out', None, 'New directory to write; must not exist.', required=True)
  flags.DEFINE_enum('to', formats.KAGGLE, [formats.KAGGLE, formats.HF], 'Format to write.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                    'Weight dtype on disk; default float32 (kaggle), bfloat16 (hf).')
  flags.DEFINE_string('tokenizer', '', 'SentencePiece model; default: the checkpoint\'s own.')


def convert(checkpoint: str, variant: str, out: str, *, to: str = formats.KAGGLE,
            dtype: str | None = None, tokenizer: str = '') -> str:
  """Writes OUT; returns the path to point config.model.checkpoint at."""
  model_lib.check_variant(variant)
  tok = tokenizer_lib.Tokenizer(formats.tokenizer_path(tokenizer, checkpoint))
  cfg = model_lib.build_config(variant, tok.vocab_size)
  target = model_lib.abstract_params(model_lib.make_model(cfg), dtype or 'float32')
  params = formats.load(checkpoint, target, variant)
  return formats.save(to, params, cfg, out, tokenizer=tok.path, dtype=dtype, name=variant)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  t0 = time.perf_counter()
  try:
    path = convert(FLAGS.checkpoint, FLAGS.variant, FLAGS.out, to=FLAGS.to, dtype=FLAGS.dtype,
                   tokenizer=FLAGS.tokenizer)
  except (ValueError, OSError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'wrote {path} in {time.perf_counter() - t0:.0f}s; use '
        f'--config.model.checkpoint={path}', file=sys.stderr)


if __name__ == '__main__':
  define_flags()
  app.run(main)
