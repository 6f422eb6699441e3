"""The on-disk record: one translation pair as UTF-8 JSON in an ArrayRecord file.

A record keeps the original text and its id, never tokens, so a new tokenizer
or prompt format never needs a new `prepare`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable

from array_record.python import array_record_module


@dataclasses.dataclass(frozen=True)
class Pair:
  id: str
  src: str
  dst: str


def encode(pair: Pair) -> bytes:
  return json.dumps(dataclasses.asdict(pair), ensure_ascii=False).encode('utf-8')


def decode(record: bytes) -> Pair:
  return Pair(**json.loads(record.decode('utf-8')))


def write(path: str | os.PathLike, pairs: Iterable[Pair]) -> int:
  """Writes pairs to one ArrayRecord file; returns how many were written."""
  # group_size:1 keeps random access cheap: Grain reads one record at a time.
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), 'group_size:1')
  n = 0
  try:
    for pair in pairs:
      writer.write(encode(pair))
      n += 1
  finally:
    writer.close()
  return n


def read_all(path: str | os.PathLike) -> list[Pair]:
  reader = array_record_module.ArrayRecordReader(os.fspath(path))
  try:
    return [decode(r) for r in reader.read_all()]
  finally:
    reader.close()
