"""SentencePiece with Gemma's special ids, and the translation prompt format.

An example becomes the prompt (no loss) followed by the target (loss on every
token). Plain format, for pretrained checkpoints:

    <bos>Translate this into French:\\n{src}\\n        {dst}<eos>

Chat format (config.model.chat_template), for instruction-tuned checkpoints:

    <bos><start_of_turn>user\\nTranslate this into French:\\n{src}<end_of_turn>\\n
    <start_of_turn>model\\n                             {dst}<end_of_turn><eos>

Training, evaluation and `translate` all format through `prompt_text` and
`target_text`, so the three can never drift apart.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
from typing import Iterable

import sentencepiece as spm

PAD, EOS, BOS = 0, 1, 2  # Gemma's ids; the project's tiny tokenizer keeps them
START_OF_TURN, END_OF_TURN = '<start_of_turn>', '<end_of_turn>'


def instruction(dst_lang: str = 'French') -> str:
  """The prompt's first line, 'Translate this into French:'."""
  return f'Translate this into {dst_lang}:'


def prompt_text(src: str, dst_lang: str = 'French', chat_template: bool = False) -> str:
  """What the model reads before it translates (BOS not included)."""
  turn = f'{instruction(dst_lang)}\n{src}'
  if chat_template:
    return (f'{START_OF_TURN}user\n{turn}{END_OF_TURN}\n'
            f'{START_OF_TURN}model\n')
  return turn + '\n'


def target_text(dst: str, chat_template: bool = False) -> str:
  """What the model learns to write after the prompt (EOS not included)."""
  return dst + END_OF_TURN if chat_template else dst


def stop_strings(chat_template: bool = False) -> tuple[str, ...]:
  """Where a generated answer ends, beside EOS.

  A translation is one line, so a newline ends it even though training never
  shows one after the target: a model that drifts keeps its first line.
  """
  return ('\n', END_OF_TURN) if chat_template else ('\n',)


def cut_answer(text: str, chat_template: bool = False) -> str:
  """`text` up to its first stop string."""
  for stop in stop_strings(chat_template):
    text = text.split(stop, 1)[0]
  return text


def train_model(texts: Iterable[str], vocab_size: int, num_threads: int = 1) -> bytes:
  """A SentencePiece BPE model of `texts` with Gemma's special ids; its bytes.

  Byte fallback and digit splitting, no normalisation, '\\n' a piece of its own
  (prompts end lines with it). The instruction is repeated so its words become
  whole pieces, as they are in every example.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=itertools.chain([instruction()] * 500, texts),
      model_writer=model,
      model_type='bpe',  # unigram tops out near 600 pieces on the sample, with worse splits
      vocab_size=vocab_size,
      pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=3,
      pad_piece='<pad>', eos_piece='<eos>', bos_piece='<bos>', unk_piece='<unk>',
      user_defined_symbols=['\n'],
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      split_digits=True,
      character_coverage=1.0,
      byte_fallback=True,
      num_threads=num_threads,
      shuffle_input_sentence=False,
      input_sentence_size=0,
      minloglevel=2,
  )
  return model.getvalue()


class Tokenizer:
  """Pickles by path, so Grain worker processes load their own copy."""

  def __init__(self, path: str):
    if not path or not os.path.isfile(path):
      raise FileNotFoundError(
          f'config.tokenizer.path={path!r} is not a file; point it at a '
          'SentencePiece model (tokenizer.model)')
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    if self._sp.bos_id() != BOS or self._sp.eos_id() != EOS:
      raise ValueError(
          f'tokenizer {path} has bos={self._sp.bos_id()} eos={self._sp.eos_id()}; '
          f'mtnt_tpu needs Gemma\'s bos={BOS} eos={EOS}')

  def __getstate__(self):
    return {'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['path'])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    """The SentencePiece processor itself (what gemma.sampler.Sampler takes)."""
    return self._sp

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def encode_prompt(self, src: str, dst_lang: str, chat_template: bool = False) -> list[int]:
    """Prompt ids with BOS: what a translation is generated from."""
    return [BOS] + self.encode(prompt_text(src, dst_lang, chat_template))

  def encode_example(self, src: str, dst: str, dst_lang: str,
                     chat_template: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids with BOS, target ids with EOS)."""
    return (self.encode_prompt(src, dst_lang, chat_template),
            self.encode(target_text(dst, chat_template)) + [EOS])

  def stop_ids(self, chat_template: bool = False) -> tuple[int, ...]:
    """Single tokens that end generation: EOS, any piece holding a newline,
    and `<end_of_turn>` where the vocabulary has it as one piece (Gemma's does).

    Where `<end_of_turn>` is several pieces (the tiny tokenizer), generation
    runs on to the EOS that training puts after it, and `cut_answer` drops it.
    """
    ids = {EOS, *self._newline_ids}
    if chat_template:
      end_of_turn = self.encode(END_OF_TURN)
      if len(end_of_turn) == 1:
        ids.add(end_of_turn[0])
    return tuple(sorted(ids))

  @functools.cached_property
  def _newline_ids(self) -> tuple[int, ...]:
    # Byte-fallback vocabularies also spell a newline as the piece <0x0A>.
    return tuple(i for i in range(self.vocab_size)
                 if '\n' in self._sp.id_to_piece(i) or self._sp.id_to_piece(i) == '<0x0A>')
