"""python -m mtnt_tpu.translate --workdir DIR [--input FILE] [--output FILE] [--reference FILE]

Translates one sentence per line with a trained workdir's best checkpoint (or
`--step N`), on this host's devices. The workdir is all it needs: config.json
names the model, tokenizer and prompt format. Translations go to stdout or
--output as each batch finishes, line for line with the input (an empty line
gives an empty line); progress, warnings and scores go to stderr.
"""

from __future__ import annotations

import logging as logging_std
import os
import sys
import time
from typing import TextIO

from absl import app
from absl import flags
from absl import logging
from sacrebleu.metrics import BLEU, CHRF

from mtnt_tpu import decode as decode_lib
from mtnt_tpu import runtime
from mtnt_tpu import sampling as sampling_lib
from mtnt_tpu import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; only when run as a program, so importing defines none."""
  flags.DEFINE_string('workdir', None, 'A training workdir (holds config.json).', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the best checkpoint.')
  flags.DEFINE_string('input', None, 'Sentences, one per line; default: stdin.')
  flags.DEFINE_string('output', None, 'Translations, one per line; default: stdout.')
  flags.DEFINE_string('reference', None,
                      'Reference translations, line for line: print BLEU and chrF.')
  flags.DEFINE_integer('batch_size', None, 'Sentences per decoded batch (rounded up to a '
                       'multiple of the local device count). Default: '
                       'config.eval.decode_batch_size.')
  flags.DEFINE_integer('beam_size', None, '1: greedy (or sampled); K > 1: beam search over K '
                       'hypotheses per line. Default: config.eval.beam_size.')
  flags.DEFINE_float('length_penalty', None, 'Beam search scores log P / ((5 + len) / 6) ** '
                     'this (0: none). Default: config.eval.length_penalty.')
  flags.DEFINE_integer('max_decode_len', None,
                       'New tokens per line; default: config.eval.max_decode_len.')
  flags.DEFINE_integer('max_prompt_len', None, 'Prompt tokens per line; a longer source is '
                       'cut, with a warning. Default: config.data.max_len.')
  flags.DEFINE_float('temperature', 0.0, '0: greedy decoding.')
  flags.DEFINE_integer('top_k', 0, 'Sample from the k likeliest tokens (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set of tokens holding this mass.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def read_lines(path: str | None) -> list[str]:
  """The lines of `path` (stdin when None); a line that is not UTF-8 is named."""
  if path is None:
    data, where = sys.stdin.buffer.read(), 'stdin'
  else:
    with open(path, 'rb') as f:
      data, where = f.read(), path
  lines = []
  for n, raw in enumerate(data.splitlines(), 1):
    try:
      lines.append(raw.decode('utf-8'))
    except UnicodeDecodeError as e:
      raise ValueError(f'{where} line {n} is not UTF-8 ({e.reason} at byte {e.start} of the '
                       'line); convert the file, e.g. iconv -f latin1 -t utf-8') from None
  return lines


class _Progress:
  """`translated 96/200 lines (41.3 lines/s)` on stderr, rewritten in place."""

  def __init__(self, total: int, stream: TextIO = sys.stderr):
    self._total, self._stream, self._done = total, stream, 0
    self._t0 = time.perf_counter()

  def update(self, n: int) -> None:
    self._done += n
    rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
    self._stream.write(f'\rtranslated {self._done}/{self._total} lines ({rate:.1f} lines/s)')
    self._stream.flush()

  def close(self) -> None:
    self._stream.write('\n')
    self._stream.flush()


def translate_lines(trained: workdir_lib.Trained, lines: list[str], out: TextIO, *,
                    batch_size: int, max_prompt_len: int, max_decode_len: int,
                    sampling: sampling_lib.Sampling, beam_size: int = 1,
                    length_penalty: float = 0.6) -> list[str]:
  """Writes one translation per line to `out` as each batch finishes; returns them."""
  c = trained.setup.config
  decoder = decode_lib.Decoder(
      trained.setup, trained.setup.tokenizer, batch_size=batch_size,
      max_prompt_len=max_prompt_len, max_decode_len=max_decode_len, dst_lang=c.data.dst_lang,
      chat_template=c.model.chat_template, sampling=sampling, beam_size=beam_size,
      length_penalty=length_penalty)
  progress = _Progress(len(lines))
  hypotheses = []
  for batch in decoder.translate_batches(trained.params, lines):
    out.writelines(h + '\n' for h in batch)
    out.flush()
    hypotheses += batch
    progress.update(len(batch))
  progress.close()
  return hypotheses


def _decoding_options(config) -> dict:
  """batch_size, beam_size, length_penalty: the flag, else the workdir's config.eval
  (a workdir trained before these fields existed gets today's defaults)."""
  out = {}
  for name, field, default in (('batch_size', 'decode_batch_size', 64),
                               ('beam_size', 'beam_size', 1),
                               ('length_penalty', 'length_penalty', 0.6)):
    flag = getattr(FLAGS, name)
    out[name] = flag if flag is not None else config.eval.get(field, default)
  if out['batch_size'] < 1 or out['beam_size'] < 1 or out['length_penalty'] < 0:
    raise ValueError(f'--batch_size={out["batch_size"]}, --beam_size={out["beam_size"]}, '
                     f'--length_penalty={out["length_penalty"]}: use a batch and a beam of '
                     'at least 1 and a penalty >= 0')
  if out['beam_size'] > 1 and FLAGS.temperature > 0:
    raise ValueError(f'--beam_size={out["beam_size"]} with --temperature={FLAGS.temperature}: '
                     'beam search is deterministic; pass one of them')
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # stderr is for progress and problems
  # orbax's notes (read-only managers, finalize threads) stay off a CLI's stderr.
  runtime.quiet_libraries(logging_std.ERROR)
  workdir = workdir_lib.resolve(FLAGS.workdir)
  try:
    config = workdir_lib.load_config(workdir)
    workdir_lib.use_cpu_devices(config)
    sampling = sampling_lib.Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.seed)
    decoding = _decoding_options(config)
    lines = read_lines(FLAGS.input)
    references = read_lines(FLAGS.reference) if FLAGS.reference else None
    if references is not None and len(references) != len(lines):
      raise ValueError(f'--reference {FLAGS.reference} has {len(references)} lines, the '
                       f'input {len(lines)}; pass the references of these sentences')
    trained = workdir_lib.restore(workdir, config, FLAGS.step)
    # --output appears only once every line is translated: an existing file
    # is never truncated by a run that fails.
    partial = f'{FLAGS.output}.partial-{os.getpid()}' if FLAGS.output else None
    out = open(partial, 'w', encoding='utf-8') if partial else sys.stdout
  except (ValueError, OSError) as e:  # WorkdirError among them
    raise SystemExit(f'error: {e}') from None
  print(f'translating {len(lines)} lines with step {trained.step} from '
        f'{os.path.join(workdir, trained.origin)}', file=sys.stderr)
  try:
    hypotheses = translate_lines(
        trained, lines, out, max_prompt_len=FLAGS.max_prompt_len or config.data.max_len,
        max_decode_len=FLAGS.max_decode_len or config.eval.max_decode_len, sampling=sampling,
        **decoding)
  except BaseException:
    if partial:
      out.close()
      os.remove(partial)
    raise
  if partial:
    out.close()
    os.replace(partial, FLAGS.output)
  if references is not None:
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hypotheses, [references]), chrf.corpus_score(hypotheses,
                                                                           [references])
    print(f'BLEU {b.score:.2f} ({bleu.get_signature()})', file=sys.stderr)
    print(f'chrF {c.score:.2f} ({chrf.get_signature()})', file=sys.stderr)


if __name__ == '__main__':
  define_flags()
  app.run(main)
