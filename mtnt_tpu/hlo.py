"""What a compiled program's HLO text says about its communication.

A static read of `compiled.as_text()`: each collective's count and the bytes
of its results per device, for the fit check's report.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Collective:
  count: int
  bytes: int  # sum of result sizes per device


_COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all',
                'collective-permute')
# '%x = TYPE op(' or '%x = TYPE op-done(' (the async pair's result is the done's;
# the matching '-start' carries operand and result both, so it is skipped).
_OP_RE = re.compile(r'^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+(' + '|'.join(_COLLECTIVES)
                    + r')(-done)?\(', re.MULTILINE)
_SHAPE_RE = re.compile(r'\b([a-z]+\d*)\[([\d,]*)\]')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 'bf16': 2, 'f16': 2,
                's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8,
                'u64': 8, 'c64': 8, 'c128': 16}


def collectives(hlo_text: str) -> dict[str, Collective]:
  """Count and result bytes of each collective in compiled HLO text.

  A static count: an op inside a loop body (gradient accumulation) counts once.
  """
  count: collections.Counter = collections.Counter()
  size: collections.Counter = collections.Counter()
  for m in _OP_RE.finditer(hlo_text):
    result_type, op = m.group(1), m.group(2)
    count[op] += 1
    for dtype, dims in _SHAPE_RE.findall(result_type):
      n = math.prod(int(d) for d in dims.split(',') if d)
      size[op] += n * _DTYPE_BYTES.get(dtype, 4)
  return {op: Collective(count[op], size[op]) for op in _COLLECTIVES if count[op]}
