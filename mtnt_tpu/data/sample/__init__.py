"""A tiny English->French sample corpus and its SentencePiece tokenizer.

Made by `python -m mtnt_tpu.data.sample.make` from a small hand-written grammar
(see make.py), so a tiny Gemma-architecture model can visibly learn to translate
on a CPU in a minute or two. Files here: {train,valid,test}.tsv
(`id<TAB>source<TAB>target`), the same pairs as {train,valid,test}.array_record,
and tokenizer.model (Gemma's special ids: pad=0, eos=1, bos=2, unk=3).
"""
