"""`python -m mtnt_tpu.serve` as a user runs it, on the shared tiny run: the API,
every bad request, batching, disconnects, and the page in a real headless Chromium.

One server for the module (loopback, a free port), with small limits so each
one is easy to cross.
"""

import concurrent.futures
import json
import os
import re
import socket
import threading
import time
import urllib.parse

import httpx
import pytest

from mtnt_tpu import evaluate
from mtnt_tpu.serve import app as app_lib
from mtnt_tpu.serve import harness
from mtnt_tpu.serve import translator as translator_lib
from tests import trained_run

pytestmark = pytest.mark.slow  # serves a model trained for it

MAX_TEXTS, MAX_CHARS, MAX_BODY, BUDGET = 8, 400, 8192, 64
FLAGS = ('--prompt_lens', f'32,{BUDGET}', '--batch_sizes', '8,16', '--beam_sizes', '1',
         '--max_texts', str(MAX_TEXTS), '--max_text_chars', str(MAX_CHARS),
         '--max_body_bytes', str(MAX_BODY), '--batch_window_ms', '50')
# About 90 tokens as a prompt, under MAX_CHARS: over the token budget only.
LONG = ('The young man in the blue shirt walks with his dog along the river, and the old '
        'woman on the green bench watches the children play with a red ball near the water, '
        'while two girls ride their bikes past the small white house by the bridge.')


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  wd = trained_run.workdir(tmp_path_factory)
  with harness.serve(wd, *FLAGS, ready_timeout_s=600) as s:
    yield wd, s


@pytest.fixture(scope='module')
def client(server):
  with httpx.Client(base_url=server[1].url, timeout=120) as c:
    yield c


@pytest.fixture(scope='module')
def samples(server):
  """The best checkpoint's step and its logged eval (source, reference, hypothesis)."""
  wd = server[0]
  (best,) = [int(p.name) for p in (wd / 'best').iterdir() if p.name.isdigit()]
  return best, evaluate.read_samples(wd / 'samples' / f'step_{best}.txt')


def _translate(client, texts, **options):
  r = client.post('/v1/translate', json={'texts': list(texts), **options})
  assert r.status_code == 200, r.text
  return r.json()


def test_health_and_model_name_the_checkpoint_served(server, client, samples):
  wd, _ = server
  best, _ = samples
  assert client.get('/healthz').json()['status'] == 'ok'
  m = client.get('/v1/model').json()
  assert (m['variant'], m['step'], m['origin'], m['workdir']) == ('tiny', best, 'best', wd.name)
  with open(wd / 'metrics.jsonl') as f:
    (row,) = [r for r in map(json.loads, f) if r.get('step') == best and 'eval_bleu' in r]
  assert m['metrics'] == {k: pytest.approx(row[k]) for k in translator_lib.EVAL_METRICS}
  assert (m['src_lang'], m['dst_lang']) == ('English', 'French')
  assert m['decoding']['beam_sizes'] == [1]
  assert m['limits'] == {'max_texts': MAX_TEXTS, 'max_text_chars': MAX_CHARS,
                         'max_body_bytes': MAX_BODY, 'max_prompt_tokens': BUDGET}
  assert m['buckets'] == {'prompt_lens': [32, BUDGET], 'batch_sizes': [8, 16]}


def test_translations_reproduce_the_eval_hypotheses_of_the_checkpoint(client, samples):
  best, logged = samples
  out = []
  for start in range(0, len(logged), MAX_TEXTS):
    body = _translate(client, [s.source for s in logged[start:start + MAX_TEXTS]])
    assert body['step'] == best and body['beam_size'] == 1
    assert not any(body['truncated']) and all(t > 0 for t in body['seconds'])
    out += body['translations']
  assert out == [s.hypothesis for s in logged]


def test_concurrent_requests_are_batched_and_answer_as_each_alone(client, samples):
  sources = [s.source for s in samples[1]]
  requests = [sources[i:i + 1 + i % 2] for i in range(len(sources))]  # 1 or 2 texts each
  alone = [_translate(client, texts)['translations'] for texts in requests]
  calls = client.get('/healthz').json()['decoder_calls']
  start = threading.Barrier(len(requests))

  def send(texts):
    start.wait(30)
    return _translate(client, texts)

  with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
    together = list(pool.map(send, requests))
  assert [b['translations'] for b in together] == alone
  assert max(b['batched_requests'] for b in together) > 1
  assert client.get('/healthz').json()['decoder_calls'] - calls < len(requests)


BAD = [  # (body bytes, status, field, what the message says)
    (b'', 400, 'body', 'is empty'),
    (b'   \n', 400, 'body', 'is empty'),
    (b'{"texts": ["Hi."]', 400, 'body', 'is not JSON'),
    (b'texts=Hi.', 400, 'body', 'is not JSON'),
    (b'["Hi."]', 400, 'body', 'is a JSON array; send an object'),
    (b'"Hi."', 400, 'body', 'is a JSON string'),
    (b'{"texts": ["Hi.\xff"]}', 400, 'body', 'is not valid UTF-8 .byte 0xff at offset 15'),
    (b'{}', 400, 'texts', 'is missing'),
    (b'{"text": ["Hi."]}', 400, 'text', 'is not a field of this API'),
    (b'{"texts": ["Hi."], "workdir": "/etc"}', 400, 'workdir', 'is not a field'),
    (b'{"texts": ["Hi."], "path": "config.json"}', 400, 'path', 'is not a field'),
    (b'{"texts": "Hi."}', 400, 'texts', 'is a JSON string; send a list of strings'),
    (b'{"texts": null}', 400, 'texts', 'is a JSON null'),
    (b'{"texts": []}', 400, 'texts', 'is empty; send at least one sentence'),
    (b'{"texts": ["Hi.", 3]}', 400, 'texts[1]', 'is a JSON number; send a string'),
    (b'{"texts": [["Hi."]]}', 400, 'texts[0]', 'is a JSON array'),
    (b'{"texts": ["Hi.", ""]}', 400, 'texts[1]', 'is empty'),
    (b'{"texts": [" \\t "]}', 400, 'texts[0]', 'is empty'),
    (json.dumps({'texts': ['Hi.'] * (MAX_TEXTS + 1)}).encode(), 400, 'texts',
     f'has {MAX_TEXTS + 1} texts, over this server.s {MAX_TEXTS} .--max_texts.'),
    (json.dumps({'texts': ['a' * (MAX_CHARS + 1)]}).encode(), 400, 'texts[0]',
     f'is {MAX_CHARS + 1} characters, over this server.s {MAX_CHARS} .--max_text_chars.'),
    (json.dumps({'texts': [LONG]}).encode(), 400, 'texts[0]',
     f'tokens as a prompt, over this server.s budget of {BUDGET}.*"truncate": true'),
    (b'{"texts": ["One.\\nTwo."]}', 400, 'texts[0]', 'holds a line break'),
    (b'{"texts": ["Hi.\\u0000"]}', 400, 'texts[0]', 'control character U.0000'),
    (b'{"texts": ["Hi.\\ud800"]}', 400, 'texts[0]', 'lone surrogate U.D800'),
    (b'{"texts": ["Hi."], "beam_size": 4}', 400, 'beam_size', '4 is not offered'),
    (b'{"texts": ["Hi."], "beam_size": "1"}', 400, 'beam_size', 'is a JSON string'),
    (b'{"texts": ["Hi."], "beam_size": true}', 400, 'beam_size', 'is a JSON boolean'),
    (b'{"texts": ["Hi."], "truncate": "yes"}', 400, 'truncate', 'is a JSON string'),
]


@pytest.mark.parametrize('body,status,field,message', BAD,
                         ids=[f'{i}-{b[:24]!r}' for i, (b, *_) in enumerate(BAD)])
def test_every_bad_request_gets_a_4xx_json_error_naming_the_field(client, body, status, field,
                                                                  message):
  r = client.post('/v1/translate', content=body, headers={'content-type': 'application/json'})
  assert r.status_code == status, r.text
  err = r.json()
  assert err['field'] == field
  assert re.search(f'^{re.escape(field)}: .*{message}', err['error']), err['error']


def test_a_text_over_the_token_budget_is_cut_when_asked_and_flagged(client, samples):
  short = samples[1][0]
  body = _translate(client, [short.source, LONG], truncate=True)
  assert body['truncated'] == [False, True]
  assert body['translations'][0] == short.hypothesis
  assert body['translations'][1].strip()


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(client):
  big = json.dumps({'texts': ['Hi.' * 100] * 40}).encode()
  assert len(big) > MAX_BODY
  r = client.post('/v1/translate', content=big)
  assert r.status_code == 413 and 'max_body_bytes' in r.json()['error']
  r = client.post('/v1/translate', content=iter([big[:4000], big[4000:]]))  # chunked
  assert 'content-length' not in r.request.headers
  assert r.status_code == 413 and r.json()['field'] == 'body'


def test_no_route_serves_a_file_and_wrong_methods_are_json_errors(client):
  for path in ('/config.json', '/page.html', '/mtnt_tpu/serve/page.html', '/..%2fconfig.json',
               '/static/../config.json', '/v1/model/../../metrics.jsonl'):
    r = client.get(path)
    assert r.status_code == 404 and r.json()['field'] == 'path', path
  r = client.get('/v1/translate')
  assert r.status_code == 405 and 'POST /v1/translate' in r.json()['error']
  assert client.post('/healthz').status_code == 405


def _raw_request(url: str, body: bytes, declared: int) -> socket.socket:
  """A POST /v1/translate with `body` sent (of `declared` bytes), left open."""
  u = urllib.parse.urlsplit(url)
  s = socket.create_connection((u.hostname, u.port), timeout=30)
  s.sendall(b'POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
            b'Content-Length: %d\r\n\r\n%s' % (declared, body))
  return s


def test_a_client_that_disconnects_never_hurts_the_others(server, client, samples):
  _, srv = server
  logged = samples[1]
  requests = [[s.source for s in logged[i:i + MAX_TEXTS]] for i in (0, 8)]
  alone = [_translate(client, texts)['translations'] for texts in requests]
  body = json.dumps({'texts': [logged[0].source]}).encode()
  # Mid-body: the server reads 10 of 100 promised bytes, then the end of the stream.
  _raw_request(srv.url, body[:10], 100).close()
  with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
    answers = [pool.submit(_translate, client, texts) for texts in requests]
    time.sleep(0.02)  # the good requests hold the decoder
    # Whole request sent, then gone before the answer.
    _raw_request(srv.url, body, len(body)).close()
    assert [a.result()['translations'] for a in answers] == alone
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline and 'client left before its answer' not in srv.log():
    time.sleep(0.1)
  log = srv.log()
  assert 'client left while sending its request (499)' in log
  assert 'client left before its answer: 1 sentences withdrawn or dropped (499)' in log
  assert 'Traceback' not in log and srv.process.poll() is None
  assert _translate(client, requests[0])['translations'] == alone[0]


# --- the page, in a real browser ---------------------------------------------------


@pytest.fixture(scope='module')
def browser():
  try:
    with harness.chromium() as b:
      yield b
  except harness.BrowserMissing as e:
    if os.environ.get('CI') == 'true':
      pytest.fail(f'CI must run the browser test: {e}')
    pytest.skip(str(e))


def _wait(condition, timeout_s=60):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    value = condition()
    if value:
      return value
    time.sleep(0.1)
  raise AssertionError(f'timed out after {timeout_s}s')


def test_page_in_headless_chromium_translates_what_the_api_does(server, client, browser,
                                                                samples):
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  best, logged = samples
  m = client.get('/v1/model').json()
  browser.get(server[1].url)
  facts = _wait(lambda: 'step' in (t := browser.find_element(By.ID, 'model').text) and t)
  assert f'step {best} (best)' in facts
  assert f'eval BLEU {m["metrics"]["eval_bleu"]:.1f}' in facts
  two = [logged[0].source, logged[5].source]
  area = browser.find_element(By.ID, 'source')
  area.send_keys(two[0] + '\n\n' + two[1])  # a blank line between them is dropped
  browser.find_element(By.ID, 'translate').click()
  rows = _wait(lambda: len(r := browser.find_elements(By.CSS_SELECTOR, '#results .row')) == 2
               and r)
  api = _translate(client, two, truncate=True)['translations']
  assert [r.find_element(By.CLASS_NAME, 'src').text for r in rows] == two
  assert [r.find_element(By.CLASS_NAME, 'dst').text for r in rows] == api
  assert api == [logged[0].hypothesis, logged[5].hypothesis]
  for r in rows:
    assert re.fullmatch(r'\d+ ms', r.find_element(By.CLASS_NAME, 'ms').text)
  assert browser.find_element(By.ID, 'status').text.startswith('Done in')


def test_page_fits_a_phone_and_shows_api_errors(server, browser):
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  browser.set_window_size(390, 844)
  try:
    browser.get(server[1].url)
    _wait(lambda: 'step' in browser.find_element(By.ID, 'model').text)
    browser.find_element(By.ID, 'source').send_keys('A dog runs. ' + 'x' * (MAX_CHARS + 1))
    browser.find_element(By.ID, 'translate').click()
    status = _wait(lambda: 'max_text_chars' in (t := browser.find_element(By.ID, 'status').text)
                   and t)
    assert '(sentence 2)' in status
    browser.find_element(By.ID, 'source').clear()
    browser.find_element(By.ID, 'source').send_keys('A dog runs in the park.')
    browser.find_element(By.ID, 'translate').click()
    row = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, '#results .row'))[0]
    overflow = browser.execute_script(
        'return document.documentElement.scrollWidth - window.innerWidth')
    assert overflow <= 0
    src, dst = row.find_element(By.CLASS_NAME, 'src'), row.find_element(By.CLASS_NAME, 'dst')
    assert src.rect['y'] < dst.rect['y'], 'source above translation on a phone'
    assert src.rect['width'] > 250
  finally:
    browser.set_window_size(1100, 800)


# --- the command line ----------------------------------------------------------------


def test_missing_workdir_and_a_taken_port_are_one_clear_line(server, tmp_path):
  r = trained_run.run_module('serve', '--workdir', str(tmp_path / 'nope'), '--port', '0')
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1] == (
      f'error: --workdir {tmp_path / "nope"} does not exist; pass the directory '
      'python -m mtnt_tpu.main trained into')
  port = urllib.parse.urlsplit(server[1].url).port
  r = trained_run.run_module('serve', '--workdir', str(server[0]), '--port', str(port))
  assert r.returncode != 0
  assert re.match(rf'error: cannot listen on 127\.0\.0\.1:{port} \(.*\); pass another --port',
                  r.stderr.strip().splitlines()[-1])


def test_bad_settings_name_the_flag():
  with pytest.raises(ValueError, match='--batch_sizes=32,8: give distinct positive'):
    translator_lib.Buckets(prompt_lens=(64,), batch_sizes=(32, 8))
  with pytest.raises(ValueError, match='--beam_sizes=4 must include 1'):
    translator_lib.Buckets(prompt_lens=(64,), batch_sizes=(8,), beam_sizes=(4,))
  with pytest.raises(ValueError, match='--max_texts=0 must be >= 1'):
    app_lib.Limits(max_texts=0)
  assert translator_lib.default_prompt_lens(64) == (32, 64)
  assert translator_lib.default_prompt_lens(200) == (32, 64, 128, 200)
  if not translator_lib.decoder_has_beam_search():
    with pytest.raises(ValueError, match='no beam search; pass --beam_sizes=1'):
      translator_lib.Translator(None, None, translator_lib.Buckets(
          prompt_lens=(64,), batch_sizes=(8,), beam_sizes=(1, 4)))
