"""SentencePiece with Gemma's special ids, and the translation prompt format.

An example becomes `<bos>Translate this into French:\\n{src}\\n` (the prompt,
no loss) followed by `{dst}<eos>` (the target, loss on every token).
"""

from __future__ import annotations

import os

import sentencepiece as spm

PAD, EOS, BOS = 0, 1, 2  # Gemma's ids; the project's tiny tokenizer keeps them


def prompt_text(src: str, dst_lang: str = 'French') -> str:
  return f'Translate this into {dst_lang}:\n{src}\n'


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

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def encode_example(self, src: str, dst: str, dst_lang: str) -> tuple[list[int], list[int]]:
    """(prompt ids with BOS, target ids with EOS)."""
    return [BOS] + self.encode(prompt_text(src, dst_lang)), self.encode(dst) + [EOS]
