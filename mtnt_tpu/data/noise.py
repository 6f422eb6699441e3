"""MTNT-style noise on source sentences: reproducible, for robustness tests and training.

MTNT (Michel & Neubig, 2018) is Reddit text, and its paper lists what makes it
hard for a translator trained on clean text: spelling and typing errors,
inconsistent capitalisation, missing punctuation, emoji and emoticons, internet
slang and abbreviations, dropped apostrophes and stretched words. `noise_text`
applies each kind at its own rate (`Noise`), drawing every choice from a
`random.Random` seeded by (seed, index), so the same example always gets the
same noise, on any machine, in any order:

    typos          10% of words of 3+ letters get one: two letters swapped, one
                   dropped, one doubled, or one replaced by a keyboard neighbour
    casing         the whole sentence lowercased (35%), or one word in capitals (10%)
    punctuation    the final . ! or ? dropped (60%)
    emoji          an emoji or emoticon at the end or after a word (25%)
    slang          a known word replaced by its chat form (you -> u, 50% each)
    apostrophes    removed from a contraction (don't -> dont, 50% each)
    stretching     one word's last vowel repeated (so -> sooo, 5%)

The same noise serves both uses: `python -m mtnt_tpu.data.noise` writes a
noised copy of a source file (a robustness test set, scored against the clean
references), and `config.data.noise` noises that fraction of training sources,
anew at every epoch (the index counts epochs too) and identically on resume, at the
rates of `config.data.noise_rates` (these defaults unless changed).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import sys

from absl import app
from absl import flags

from mtnt_tpu.data import records

_KEYBOARD = ('qwertyuiop', 'asdfghjkl', 'zxcvbnm')
_NEIGHBOURS = {}
for _r, _row in enumerate(_KEYBOARD):
  for _c, _ch in enumerate(_row):
    near = [_row[j] for j in (_c - 1, _c + 1) if 0 <= j < len(_row)]
    near += [_KEYBOARD[r][_c] for r in (_r - 1, _r + 1) if 0 <= r < 3 and _c < len(_KEYBOARD[r])]
    _NEIGHBOURS[_ch] = ''.join(near)

SLANG = {
    'you': 'u', 'your': 'ur', 'are': 'r', 'people': 'ppl', 'please': 'pls',
    'because': 'cuz', 'really': 'rly', 'though': 'tho', 'thanks': 'thx', 'okay': 'ok',
    'to': '2', 'for': '4', 'with': 'w/', 'and': '&', 'probably': 'prob', 'tonight': '2nite',
    'before': 'b4', 'great': 'gr8', 'something': 'smth', 'what': 'wut', 'about': 'abt',
}
EMOJI = ('😂', '😀', '👍', '🙄', '😍', '🔥', '😭', ':)', ':(', ':D', 'xD', ';)', 'lol', 'haha')
_WORD = re.compile(r"[A-Za-z][A-Za-z']*")


@dataclasses.dataclass(frozen=True)
class Noise:
  """Rates of each kind of noise (see the module docstring)."""
  typo: float = 0.10
  lowercase: float = 0.35
  shout: float = 0.10
  drop_final_punct: float = 0.60
  emoji: float = 0.25
  slang: float = 0.50
  apostrophe: float = 0.50
  stretch: float = 0.05


def _typo(word: str, rng: random.Random) -> str:
  i = rng.randrange(len(word) - 1)
  kind = rng.randrange(4)
  if kind == 0:  # swap two neighbours
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]
  if kind == 1:  # drop one
    return word[:i] + word[i + 1:]
  if kind == 2:  # double one
    return word[:i] + word[i] + word[i:]
  near = _NEIGHBOURS.get(word[i].lower())
  if not near:
    return word[:i] + word[i + 1:]
  sub = rng.choice(near)
  return word[:i] + (sub.upper() if word[i].isupper() else sub) + word[i + 1:]


def _match_case(new: str, old: str) -> str:
  return new[:1].upper() + new[1:] if old[:1].isupper() else new


def noise_text(text: str, rng: random.Random, noise: Noise = Noise()) -> str:
  """`text` with MTNT-style noise; every choice comes from `rng`."""
  if not text.strip():
    return text

  def word(m: re.Match) -> str:
    w = m.group(0)
    lower = w.lower()
    if lower in SLANG and rng.random() < noise.slang:
      return _match_case(SLANG[lower], w)
    if "'" in w and rng.random() < noise.apostrophe:
      return w.replace("'", '')
    if len(w) >= 3 and rng.random() < noise.typo:
      return _typo(w, rng)
    return w

  out = _WORD.sub(word, text)
  if rng.random() < noise.stretch:
    words = list(_WORD.finditer(out))
    if words:
      m = rng.choice(words)
      vowels = [i for i, ch in enumerate(m.group(0)) if ch in 'aeiouy']
      if vowels:
        j = m.start() + vowels[-1]
        out = out[:j] + out[j] * 3 + out[j:]
  if rng.random() < noise.drop_final_punct:
    out = re.sub(r'\s*[.!?]+\s*$', '', out)
  if rng.random() < noise.lowercase:
    out = out.lower()
  elif rng.random() < noise.shout:
    words = list(_WORD.finditer(out))
    if words:
      m = rng.choice(words)
      out = out[:m.start()] + m.group(0).upper() + out[m.end():]
  if rng.random() < noise.emoji:
    e = rng.choice(EMOJI)
    spaces = [m.start() for m in re.finditer(' ', out)]
    if spaces and rng.random() < 0.3:
      j = rng.choice(spaces)
      out = out[:j] + ' ' + e + out[j:]
    else:
      out = out.rstrip() + ' ' + e
  return out


def noisy(text: str, seed: int, index: int, noise: Noise = Noise()) -> str:
  """The noise of example `index` under `seed`: the same on every call and machine."""
  return noise_text(text, random.Random(f'{seed}:{index}'), noise)


def noisy_record(record: bytes, rate: float, seed: int, index: int,
                 noise: Noise = Noise()) -> bytes:
  """A training record whose source is noised with probability `rate` (config.data.noise)
  at the rates of `noise` (config.data.noise_rates)."""
  rng = random.Random(f'{seed}:{index}')
  if rng.random() >= rate:
    return record
  pair = records.decode(record)
  return records.encode(dataclasses.replace(pair, src=noise_text(pair.src, rng, noise)))


def from_rates(rates) -> Noise:
  """A `Noise` from config.data.noise_rates (a mapping of kind -> rate); a clear
  error for an unknown kind or a rate outside [0, 1]."""
  kinds = {f.name for f in dataclasses.fields(Noise)}
  for kind, rate in dict(rates).items():
    if kind not in kinds:
      raise ValueError(f'config.data.noise_rates.{kind}: not a kind of noise; use one of '
                       f'{", ".join(sorted(kinds))}')
    if not 0 <= rate <= 1:  # also catches NaN
      raise ValueError(f'config.data.noise_rates.{kind}={rate}: a probability, from 0 to 1')
  return Noise(**dict(rates))


def only(kinds) -> Noise:
  """`Noise` with just these kinds at their default rates (all of them when empty)."""
  if not kinds:
    return Noise()
  default = dataclasses.asdict(Noise())
  unknown = [k for k in kinds if k not in default]
  if unknown:
    raise ValueError(f'--only={",".join(kinds)}: {unknown[0]} is not a kind of noise; use '
                     f'some of {",".join(default)}')
  return Noise(**{k: (rate if k in kinds else 0.0) for k, rate in default.items()})


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; only when run as a program, so importing defines none."""
  flags.DEFINE_string('input', None, 'Source sentences, one per line (UTF-8).')
  flags.DEFINE_string('output', None, 'Where the noised lines go ("-": stdout).')
  flags.DEFINE_integer('seed', 0, 'Noise seed; line i is noised with (seed, i).')
  flags.DEFINE_list('only', [], 'Only these kinds of noise (Noise fields, e.g. typo), each '
                    'at its usual rate; the others off. Empty: every kind.')


def main(argv) -> None:
  """python -m mtnt_tpu.data.noise --input val.en --output val.noisy.en [--seed 0]"""
  del argv
  if not FLAGS.input or not FLAGS.output:
    raise app.UsageError('give --input FILE and --output FILE (or - for stdout)')
  try:
    kinds = only(FLAGS.only)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  try:
    with open(FLAGS.input, encoding='utf-8') as f:
      lines = f.read().split('\n')
  except (OSError, UnicodeDecodeError) as e:
    raise SystemExit(f'error: cannot read --input={FLAGS.input}: {e}') from None
  if lines and lines[-1] == '':
    lines.pop()
  out = '\n'.join(noisy(line, FLAGS.seed, i, kinds) for i, line in enumerate(lines)) + '\n'
  if FLAGS.output == '-':
    sys.stdout.write(out)
    return
  tmp = f'{FLAGS.output}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(out)
  os.replace(tmp, FLAGS.output)


if __name__ == '__main__':
  define_flags()
  app.run(main)
