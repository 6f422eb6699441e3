"""Sampled decoding through the whole Decoder (not only choose_tokens), on the shared run."""

import pytest

from mtnt_tpu import decode
from mtnt_tpu import evaluate
from mtnt_tpu import sampling as sampling_lib
from mtnt_tpu import workdir as workdir_lib
from tests import trained_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  wd = trained_run.workdir(tmp_path_factory)
  tr = workdir_lib.restore(wd, workdir_lib.load_config(wd))
  sources = [p.src for p in evaluate.eval_pairs(tr.setup.config.data, 8)]

  def generate(sampling: sampling_lib.Sampling) -> list[list[int]]:
    decoder = decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=8, max_prompt_len=40,
                             max_decode_len=16, sampling=sampling)
    return decoder.generate(tr.params, decoder.encode_prompts(sources))

  return generate, tr.setup.tokenizer


def test_sampling_from_the_top_token_alone_is_greedy(setup):
  generate, _ = setup
  assert generate(sampling_lib.Sampling(temperature=1.0, top_k=1, seed=5)) == generate(
      sampling_lib.Sampling())


def test_sampling_is_seeded_and_draws_other_tokens(setup):
  generate, tok = setup
  hot = sampling_lib.Sampling(temperature=3.0, seed=0)
  first = generate(hot)
  assert generate(hot) == first  # the same seed, the same draws
  assert generate(sampling_lib.Sampling(temperature=3.0, seed=1)) != first
  assert first != generate(sampling_lib.Sampling())
  stops = set(tok.stop_ids())
  assert all(0 <= t < tok.vocab_size and t not in stops for row in first for t in row)
