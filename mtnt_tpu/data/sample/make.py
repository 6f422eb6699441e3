"""Makes the tiny English->French sample corpus and its SentencePiece tokenizer.

    python -m mtnt_tpu.data.sample.make [--out DIR]

Sentence pairs come from a small hand-written grammar with real French
agreement: noun gender and number, articles (le/la/l'/les, un/une/des, du/des
after "de"), adjectives that agree and mostly follow the noun (but petit, grand,
bon, joli, vieux/vieil come first), present-tense conjugation, ne...pas with
"pas de" for indefinite objects, elision (j'ai, n'aime, l'arbre, d'une) and
quoted speech (« ... »). Everything is drawn from one seeded random.Random over
lists, so the output never depends on hash randomisation or dict order.

Writes into DIR (default: this folder):
  {train,valid,test}.tsv          id<TAB>source<TAB>target, UTF-8, no header
  {train,valid,test}.array_record the same pairs, via mtnt_tpu.data.records
  tokenizer.model                 SentencePiece, Gemma's ids: pad 0 eos 1 bos 2 unk 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
from typing import Sequence

from mtnt_tpu import tokenizer
from mtnt_tpu.data import records

SEED = 20240611
SPLITS = (('train', 4000), ('valid', 200), ('test', 200))
VOCAB_SIZE = 800  # 256 byte pieces + 4 special + '\n' + 539 learned (BPE) pieces
MIN_WORDS, MAX_WORDS = 4, 12
HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------
# Lexicon.

PERSON, ANIMAL, FOOD, TEXT, THING, PLACE = 'person', 'animal', 'food', 'text', 'thing', 'place'
ANIMATE = (PERSON, ANIMAL)
ANY = (PERSON, ANIMAL, FOOD, TEXT, THING, PLACE)
NOT_PERSON = (ANIMAL, FOOD, TEXT, THING, PLACE)


@dataclasses.dataclass(frozen=True)
class Noun:
  en: str
  en_pl: str
  fr: str
  fr_pl: str
  fem: bool
  kind: str
  preps: tuple[str, ...] = ()  # English prepositions that may take this noun as object


@dataclasses.dataclass(frozen=True)
class Adj:
  en: str
  forms: tuple[str, str, str, str]  # masc sg, fem sg, masc pl, fem pl
  before: bool  # goes before the noun in French
  kinds: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Verb:
  en: str  # base form ("look at")
  en_3sg: str  # "looks at"
  fr: tuple[str, str, str, str, str, str]  # je tu il nous vous ils
  subj: tuple[str, ...]
  obj: tuple[str, ...] = ()  # empty: intransitive


NEAR_THINGS = ('near', 'behind', 'in front of')
NOUNS = (
    Noun('cat', 'cats', 'chat', 'chats', False, ANIMAL),
    Noun('dog', 'dogs', 'chien', 'chiens', False, ANIMAL),
    Noun('horse', 'horses', 'cheval', 'chevaux', False, ANIMAL),
    Noun('bird', 'birds', 'oiseau', 'oiseaux', False, ANIMAL),
    Noun('mouse', 'mice', 'souris', 'souris', True, ANIMAL),
    Noun('boy', 'boys', 'garçon', 'garçons', False, PERSON),
    Noun('girl', 'girls', 'fille', 'filles', True, PERSON),
    Noun('man', 'men', 'homme', 'hommes', False, PERSON),
    Noun('woman', 'women', 'femme', 'femmes', True, PERSON),
    Noun('book', 'books', 'livre', 'livres', False, TEXT),
    Noun('letter', 'letters', 'lettre', 'lettres', True, TEXT),
    Noun('newspaper', 'newspapers', 'journal', 'journaux', False, TEXT),
    Noun('apple', 'apples', 'pomme', 'pommes', True, FOOD),
    Noun('cake', 'cakes', 'gâteau', 'gâteaux', False, FOOD),
    Noun('orange', 'oranges', 'orange', 'oranges', True, FOOD),
    Noun('flower', 'flowers', 'fleur', 'fleurs', True, THING),
    Noun('hat', 'hats', 'chapeau', 'chapeaux', False, THING),
    Noun('house', 'houses', 'maison', 'maisons', True, PLACE, ('in',) + NEAR_THINGS),
    Noun('car', 'cars', 'voiture', 'voitures', True, PLACE, ('in', 'under') + NEAR_THINGS),
    Noun('garden', 'gardens', 'jardin', 'jardins', False, PLACE, ('in',)),
    Noun('table', 'tables', 'table', 'tables', True, PLACE, ('on', 'under') + NEAR_THINGS),
    Noun('bed', 'beds', 'lit', 'lits', False, PLACE, ('on', 'under') + NEAR_THINGS),
    Noun('chair', 'chairs', 'chaise', 'chaises', True, PLACE, ('on', 'under') + NEAR_THINGS),
    Noun('tree', 'trees', 'arbre', 'arbres', False, PLACE, ('under',) + NEAR_THINGS),
)

COLOURED = (ANIMAL, FOOD, TEXT, THING, PLACE)
ADJS = (
    Adj('small', ('petit', 'petite', 'petits', 'petites'), True, ANY),
    Adj('big', ('grand', 'grande', 'grands', 'grandes'), True, ANY),
    Adj('good', ('bon', 'bonne', 'bons', 'bonnes'), True, ANY),
    Adj('pretty', ('joli', 'jolie', 'jolis', 'jolies'), True, ANY),
    Adj('old', ('vieux', 'vieille', 'vieux', 'vieilles'), True, ANY),
    Adj('black', ('noir', 'noire', 'noirs', 'noires'), False, COLOURED),
    Adj('white', ('blanc', 'blanche', 'blancs', 'blanches'), False, COLOURED),
    Adj('red', ('rouge', 'rouge', 'rouges', 'rouges'), False, COLOURED),
    Adj('green', ('vert', 'verte', 'verts', 'vertes'), False, COLOURED),
    Adj('blue', ('bleu', 'bleue', 'bleus', 'bleues'), False, COLOURED),
    Adj('happy', ('heureux', 'heureuse', 'heureux', 'heureuses'), False, ANIMATE),
    Adj('tired', ('fatigué', 'fatiguée', 'fatigués', 'fatiguées'), False, ANIMATE),
)

VERBS = (
    Verb('see', 'sees', ('vois', 'vois', 'voit', 'voyons', 'voyez', 'voient'), ANIMATE, ANY),
    Verb('look at', 'looks at',
         ('regarde', 'regardes', 'regarde', 'regardons', 'regardez', 'regardent'), ANIMATE, ANY),
    Verb('like', 'likes', ('aime', 'aimes', 'aime', 'aimons', 'aimez', 'aiment'), ANIMATE, ANY),
    Verb('eat', 'eats', ('mange', 'manges', 'mange', 'mangeons', 'mangez', 'mangent'),
         ANIMATE, (FOOD,)),
    Verb('have', 'has', ('ai', 'as', 'a', 'avons', 'avez', 'ont'), ANIMATE, NOT_PERSON),
    Verb('want', 'wants', ('veux', 'veux', 'veut', 'voulons', 'voulez', 'veulent'),
         ANIMATE, (ANIMAL, FOOD, TEXT, THING)),
    Verb('read', 'reads', ('lis', 'lis', 'lit', 'lisons', 'lisez', 'lisent'), (PERSON,), (TEXT,)),
    Verb('sleep', 'sleeps', ('dors', 'dors', 'dort', 'dormons', 'dormez', 'dorment'), ANIMATE),
    Verb('run', 'runs', ('cours', 'cours', 'court', 'courons', 'courez', 'courent'), ANIMATE),
)
SAY = Verb('say', 'says', ('dis', 'dis', 'dit', 'disons', 'dites', 'disent'), ANIMATE)
BE_EN = ('am', 'are', 'is', 'are', 'are', 'are')
BE_FR = ('suis', 'es', 'est', 'sommes', 'êtes', 'sont')

PREPS = (
    ('on', ('sur',)), ('under', ('sous',)), ('in', ('dans',)), ('near', ('près', 'de')),
    ('behind', ('derrière',)), ('in front of', ('devant',)),
)

# (English, French) quoted utterances.
QUOTES = (
    ('hello', 'bonjour'), ('goodbye', 'au revoir'), ('thank you', 'merci'),
    ('good night', 'bonne nuit'), ('yes', 'oui'), ('no', 'non'), ('I am hungry', "j'ai faim"),
    ('where is my cat?', 'où est mon chat ?'), ('I like cake', "j'aime le gâteau"),
)


@dataclasses.dataclass(frozen=True)
class Pronoun:
  en: str
  fr: str
  person: int  # index into the conjugation tables
  fem: bool
  plural: bool


PRONOUNS = (
    Pronoun('I', 'je', 0, False, False), Pronoun('you', 'tu', 1, False, False),
    Pronoun('he', 'il', 2, False, False), Pronoun('she', 'elle', 2, True, False),
    Pronoun('we', 'nous', 3, False, True), Pronoun('they', 'ils', 5, False, True),
)

# Determiners: name -> (English sg, English pl, French masc sg, fem sg, pl); None: not allowed.
DETS = {
    'the': ('the', 'the', 'le', 'la', 'les'),
    'a': ('a', None, 'un', 'une', None),
    'bare': (None, '', None, None, 'des'),  # "cats" -> "des chats"
    'my': ('my', 'my', 'mon', 'ma', 'mes'),
    'your': ('your', 'your', 'ton', 'ta', 'tes'),
    'two': (None, 'two', None, None, 'deux'),
    'three': (None, 'three', None, None, 'trois'),
}
INDEFINITE = ('a', 'bare')

# ---------------------------------------------------------------------------
# Phrases. A phrase is a pair of word lists; French spelling rules (elision,
# du/des) are applied once on the whole sentence by _french().


@dataclasses.dataclass
class NP:
  en: list[str]
  fr: list[str]
  fem: bool
  plural: bool
  noun: Noun | None = None


def _vowel(word: str) -> bool:
  # Every h-word in this lexicon (homme, heureux) has a mute h.
  return word[:1].lower() in 'aeiouyhàâéèêîôû'


def _noun_phrase(rng: random.Random, nouns: Sequence[Noun], dets: Sequence[str],
                 plural: bool | None = None, negated: bool = False,
                 max_adjs: int = 2) -> NP:
  noun = rng.choice(nouns)
  if plural is None:
    plural = rng.random() < 0.35
  dets = [d for d in dets if DETS[d][1 if plural else 0] is not None]
  det = rng.choice(dets)
  en_det, fr_det = DETS[det][1 if plural else 0], DETS[det][4 if plural else 3 if noun.fem else 2]
  fits = [a for a in ADJS if noun.kind in a.kinds]
  pre = [a for a in fits if a.before]
  post = [a for a in fits if not a.before]
  r = rng.random()
  adjs: list[Adj] = []
  if max_adjs >= 1 and r < 0.35:
    adjs = [rng.choice(fits)]
  elif max_adjs >= 2 and r < 0.45 and post:
    adjs = [rng.choice(pre), rng.choice(post)]  # English order: size/age before colour
  form = 2 * plural + noun.fem
  fr_pre = [a.forms[form] for a in adjs if a.before]
  fr_post = [a.forms[form] for a in adjs if not a.before]
  if fr_pre == ['vieux'] and not plural and _vowel(noun.fr):
    fr_pre = ['vieil']  # un vieil arbre
  if det in INDEFINITE and negated:
    fr_det = 'de'  # je n'ai pas de chat
  elif det == 'bare' and fr_pre:
    fr_det = 'de'  # de petits chats
  en_words = [a.en for a in adjs] + [noun.en_pl if plural else noun.en]
  if en_det == 'a' and en_words[0][0] in 'aeiou':
    en_det = 'an'
  en = ([en_det] if en_det else []) + en_words
  fr = [fr_det] + fr_pre + [noun.fr_pl if plural else noun.fr] + fr_post
  return NP(en, fr, noun.fem, plural, noun)


def _subject(rng: random.Random, kinds: Sequence[str]) -> tuple[NP, int]:
  """A subject and its person (index into the conjugation tables)."""
  r = rng.random()
  if r < 0.3:
    p = rng.choice(PRONOUNS)
    return NP([p.en], [p.fr], p.fem, p.plural), p.person
  nouns = [n for n in NOUNS if n.kind in kinds]
  dets = ('the', 'the', 'a', 'my', 'your', 'two', 'three')
  if r < 0.4:  # "the cat and the dog": plural, feminine only if both are
    a = _noun_phrase(rng, nouns, ('the', 'a', 'my', 'your'), plural=False, max_adjs=1)
    same_kind = [n for n in nouns if n.kind == a.noun.kind and n != a.noun]
    b = _noun_phrase(rng, same_kind, ('the', 'a', 'my', 'your'), plural=False, max_adjs=0)
    return NP(a.en + ['and'] + b.en, a.fr + ['et'] + b.fr, a.fem and b.fem, True, a.noun), 5
  np = _noun_phrase(rng, nouns, dets)
  return np, 5 if np.plural else 2


def _prep_phrase(rng: random.Random, preps: Sequence[str] | None = None,
                 avoid: Noun | None = None) -> tuple[list[str], list[str]]:
  choices = [p for p in PREPS if preps is None or p[0] in preps]
  en_prep, fr_prep = rng.choice(choices)
  places = [n for n in NOUNS if en_prep in n.preps and n != avoid]
  np = _noun_phrase(rng, places, ('the', 'the', 'a', 'my', 'your'), plural=rng.random() < 0.15,
                    max_adjs=1)
  return en_prep.split() + np.en, list(fr_prep) + np.fr


def _negate_en(person: int, verb: Verb) -> list[str]:
  return ['does' if person == 2 else 'do', 'not'] + verb.en.split()


def _transitive(rng: random.Random) -> tuple[list[str], list[str]]:
  verb = rng.choice([v for v in VERBS if v.obj])
  subj, person = _subject(rng, verb.subj)
  neg = rng.random() < 0.25
  obj = _noun_phrase(rng, [n for n in NOUNS if n.kind in verb.obj],
                     ('the', 'the', 'a', 'bare', 'my', 'your', 'two', 'three'), negated=neg)
  en = subj.en + (_negate_en(person, verb) if neg else
                  (verb.en_3sg if person == 2 else verb.en).split()) + obj.en
  fr = subj.fr + (['ne', verb.fr[person], 'pas'] if neg else [verb.fr[person]]) + obj.fr
  if rng.random() < 0.3:
    pp_en, pp_fr = _prep_phrase(rng, avoid=obj.noun)
    en, fr = en + pp_en, fr + pp_fr
  return en, fr


def _intransitive(rng: random.Random) -> tuple[list[str], list[str]]:
  verb = rng.choice([v for v in VERBS if not v.obj])
  subj, person = _subject(rng, verb.subj)
  neg = rng.random() < 0.2
  en = subj.en + (_negate_en(person, verb) if neg else
                  [verb.en_3sg if person == 2 else verb.en])
  fr = subj.fr + (['ne', verb.fr[person], 'pas'] if neg else [verb.fr[person]])
  if rng.random() < 0.7:
    pp_en, pp_fr = _prep_phrase(rng)
    en, fr = en + pp_en, fr + pp_fr
  return en, fr


def _copula(rng: random.Random) -> tuple[list[str], list[str]]:
  subj, person = _subject(rng, ANY)
  kind = subj.noun.kind if subj.noun else PERSON
  adj = rng.choice([a for a in ADJS if kind in a.kinds])
  neg = rng.random() < 0.25
  very = rng.random() < 0.2
  en = subj.en + [BE_EN[person]] + (['not'] if neg else []) + (['very'] if very else []) + [adj.en]
  fr = (subj.fr + (['ne', BE_FR[person], 'pas'] if neg else [BE_FR[person]]) +
        (['très'] if very else []) + [adj.forms[2 * subj.plural + subj.fem]])
  return en, fr


def _there_is(rng: random.Random) -> tuple[list[str], list[str]]:
  neg = rng.random() < 0.3
  plural = rng.random() < 0.4
  dets = ('a', 'bare') if neg else ('a', 'bare', 'two', 'three')
  thing = _noun_phrase(rng, NOUNS, dets, plural=plural, negated=neg, max_adjs=1)
  en_thing = thing.en
  if neg:  # "a cat" -> "no cat", "cats" -> "no cats"
    en_thing = ['no'] + (en_thing[1:] if not plural else en_thing)
  pp_en, pp_fr = _prep_phrase(rng, avoid=thing.noun)
  en = ['there', 'are' if plural else 'is'] + en_thing + pp_en
  fr = ['il'] + (['ne', 'y', 'a', 'pas'] if neg else ['y', 'a']) + thing.fr + pp_fr
  return en, fr


def _quote(rng: random.Random) -> tuple[list[str], list[str]]:
  q_en, q_fr = rng.choice(QUOTES)
  q_en, q_fr = _cap(q_en), _cap(q_fr)
  if rng.random() < 0.35:  # "Hello," says the boy. -> « Bonjour », dit le garçon.
    subj = _noun_phrase(rng, [n for n in NOUNS if n.kind in ANIMATE], ('the', 'a', 'my', 'your'),
                        plural=False, max_adjs=1)
    comma = '' if q_en.endswith('?') else ','
    return ([f'"{q_en}{comma}"', 'says'] + subj.en,
            ['«', q_fr, '»' + ('' if q_fr.endswith('?') else ','), 'dit'] + subj.fr)
  subj, person = _subject(rng, ANIMATE)
  return (subj.en + [SAY.en_3sg if person == 2 else SAY.en, f'"{q_en}"'],
          subj.fr + [SAY.fr[person], '«', q_fr, '»'])


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


_ELIDE = {'le': "l'", 'la': "l'", 'de': "d'", 'ne': "n'", 'je': "j'"}
_POSSESSIVE_BEFORE_VOWEL = {'ma': 'mon', 'ta': 'ton'}


def _french(words: list[str]) -> str:
  """Joins French words, applying du/des contraction, elision and mon/ton."""
  merged: list[str] = []
  i = 0
  while i < len(words):
    w, nxt = words[i], words[i + 1] if i + 1 < len(words) else ''
    after = words[i + 2] if i + 2 < len(words) else ''
    if w == 'de' and nxt == 'le' and not _vowel(after):
      merged.append('du')
      i += 2
    elif w == 'de' and nxt == 'les':
      merged.append('des')
      i += 2
    else:
      merged.append(w)
      i += 1
  out = ''
  for i, w in enumerate(merged):
    nxt = merged[i + 1] if i + 1 < len(merged) else ''
    if nxt and _vowel(nxt) and w in _ELIDE:
      out += _ELIDE[w]
      continue
    if nxt and _vowel(nxt) and w in _POSSESSIVE_BEFORE_VOWEL:
      w = _POSSESSIVE_BEFORE_VOWEL[w]
    out += w + (' ' if nxt else '')
  return out


def _sentence(rng: random.Random) -> tuple[str, str]:
  r = rng.random()
  if r < 0.38:
    en, fr = _transitive(rng)
  elif r < 0.56:
    en, fr = _intransitive(rng)
  elif r < 0.72:
    en, fr = _copula(rng)
  elif r < 0.85:
    en, fr = _there_is(rng)
  else:
    en, fr = _quote(rng)
  return _cap(' '.join(en)) + '.', _cap(_french(fr)) + '.'


def generate(seed: int = SEED) -> dict[str, list[records.Pair]]:
  """Draws unique pairs from the grammar and splits them; sources never repeat."""
  rng = random.Random(seed)
  total = sum(n for _, n in SPLITS)
  pairs: list[tuple[str, str]] = []
  seen_src: set[str] = set()
  seen_dst: set[str] = set()
  while len(pairs) < total:
    src, dst = _sentence(rng)
    if not MIN_WORDS <= len(src.split()) <= MAX_WORDS:
      continue
    if src in seen_src or dst in seen_dst:
      continue
    seen_src.add(src)
    seen_dst.add(dst)
    pairs.append((src, dst))
  out: dict[str, list[records.Pair]] = {}
  start = 0
  for split, n in SPLITS:
    out[split] = [records.Pair(id=f'sample-{split}-{i + 1:06d}', src=s, dst=d)
                  for i, (s, d) in enumerate(pairs[start:start + n])]
    start += n
  return out


# ---------------------------------------------------------------------------
# Files.


def tsv_bytes(pairs: Sequence[records.Pair]) -> bytes:
  lines = []
  for p in pairs:
    for field in (p.id, p.src, p.dst):
      assert not any(c in field for c in '\t\n\r'), field
    lines.append(f'{p.id}\t{p.src}\t{p.dst}\n')
  return ''.join(lines).encode('utf-8')


def read_tsv(path: str | os.PathLike) -> list[records.Pair]:
  with open(path, encoding='utf-8', newline='') as f:
    text = f.read()
  return [records.Pair(*line.split('\t')) for line in text.split('\n') if line]


def train_tokenizer(train: Sequence[records.Pair]) -> bytes:
  """Trains the SentencePiece model in memory; returns its serialized bytes."""
  return tokenizer.train_model((s for p in train for s in (p.src, p.dst)), VOCAB_SIZE)


def build(out_dir: str | os.PathLike = HERE) -> dict[str, list[records.Pair]]:
  """Writes every sample file into out_dir; returns the pairs by split."""
  os.makedirs(out_dir, exist_ok=True)
  splits = generate()
  for split, pairs in splits.items():
    with open(os.path.join(out_dir, f'{split}.tsv'), 'wb') as f:
      f.write(tsv_bytes(pairs))
    records.write(os.path.join(out_dir, f'{split}.array_record'), pairs)
  with open(os.path.join(out_dir, 'tokenizer.model'), 'wb') as f:
    f.write(train_tokenizer(splits['train']))
  return splits


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=HERE, help='output folder (default: %(default)s)')
  args = parser.parse_args(argv)
  splits = build(args.out)
  print(f'wrote {", ".join(f"{len(p)} {s}" for s, p in splits.items())} pairs and '
        f'tokenizer.model to {args.out}')


if __name__ == '__main__':
  main()
