"""The ASGI app: the page at /, GET /healthz, GET /v1/model, POST /v1/translate.

    POST /v1/translate  {"texts": ["The cat sleeps.", ...],      1..max_texts sentences
                         "beam_size": 1,                         optional; 1 is greedy
                         "truncate": false}                      optional; see below
    200  {"translations": [...], "truncated": [...], "seconds": [...],
          "beam_size": 1, "step": 300, "batched_requests": 3, "queued_seconds": 0.01}

`seconds[i]` is the wall time of the compiled batch that decoded text i, and
`batched_requests` how many requests shared its decoder call. A text whose
prompt is over the server's token budget is an error, unless the request sets
"truncate": true: then its source is cut to fit and `truncated[i]` is true.

Every bad request gets a 4xx JSON body {"error": "...", "field": "..."}
naming the field and the fix, before anything is queued, so it never touches
another request's batch: 400 for a body that is not UTF-8 JSON of that shape,
an empty or over-long text, too many texts, an unknown field, or a decoding
option this server does not offer; 413 for a body over max_body_bytes; 404
and 405 for other routes and methods. A client that disconnects before its
answer has its sentences withdrawn (or its answer dropped) and is logged as
499. No request names a file: the page is packaged with the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import json
import unicodedata
from typing import Any

from absl import logging
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mtnt_tpu.serve import batcher as batcher_lib
from mtnt_tpu.serve import translator as translator_lib

CLIENT_CLOSED = 499  # nginx's code for a client that left before its answer

FIELDS = ('texts', 'beam_size', 'truncate')


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may hold (server flags)."""
  max_texts: int = 64
  max_text_chars: int = 1000
  max_body_bytes: int = 1 << 20
  batch_window_s: float = 0.01

  def __post_init__(self):
    for name in ('max_texts', 'max_text_chars', 'max_body_bytes'):
      if getattr(self, name) < 1:
        raise ValueError(f'--{name}={getattr(self, name)} must be >= 1')
    if self.batch_window_s < 0:
      raise ValueError(f'--batch_window_ms={self.batch_window_s * 1e3:g} must be >= 0')


class RequestError(Exception):
  """A bad request: its status, the field at fault, and the fix."""

  def __init__(self, status: int, field: str, message: str):
    super().__init__(message)
    self.status, self.field, self.message = status, field, message

  def response(self) -> JSONResponse:
    return JSONResponse({'error': f'{self.field}: {self.message}', 'field': self.field},
                        status_code=self.status)


@dataclasses.dataclass(frozen=True)
class TranslateRequest:
  texts: tuple[str, ...]
  beam_size: int
  truncate: bool


def parse_request(body: bytes, limits: Limits, beam_sizes: tuple[int, ...]
                  ) -> TranslateRequest:
  """The request in `body`, or RequestError naming the first thing wrong with it."""
  try:
    text = body.decode('utf-8')
  except UnicodeDecodeError as e:
    raise RequestError(400, 'body', f'is not valid UTF-8 (byte 0x{body[e.start]:02x} at '
                       f'offset {e.start}); send UTF-8 JSON') from None
  if not text.strip():
    raise RequestError(400, 'body', 'is empty; send {"texts": ["a sentence", ...]}')
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise RequestError(400, 'body', f'is not JSON ({e.msg} at line {e.lineno} column '
                       f'{e.colno}); send {{"texts": ["a sentence", ...]}}') from None
  if not isinstance(data, dict):
    raise RequestError(400, 'body', f'is a JSON {_json_type(data)}; send an object: '
                       '{"texts": ["a sentence", ...]}')
  unknown = sorted(set(data) - set(FIELDS))
  if unknown:
    raise RequestError(400, unknown[0], f'is not a field of this API; the fields are '
                       f'{", ".join(FIELDS)}')
  if 'texts' not in data:
    raise RequestError(400, 'texts', 'is missing; send {"texts": ["a sentence", ...]}')
  texts = data['texts']
  if not isinstance(texts, list):
    raise RequestError(400, 'texts', f'is a JSON {_json_type(texts)}; send a list of strings')
  if not texts:
    raise RequestError(400, 'texts', 'is empty; send at least one sentence')
  if len(texts) > limits.max_texts:
    raise RequestError(400, 'texts', f'has {len(texts)} texts, over this server\'s '
                       f'{limits.max_texts} (--max_texts); send them in several requests')
  for i, t in enumerate(texts):
    _check_text(f'texts[{i}]', t, limits)
  beam_size = data.get('beam_size', 1)
  if not isinstance(beam_size, int) or isinstance(beam_size, bool):
    raise RequestError(400, 'beam_size', f'is a JSON {_json_type(beam_size)}; send an '
                       'integer (1: greedy)')
  if beam_size not in beam_sizes:
    if not translator_lib.decoder_has_beam_search():
      offered = 'this decoder has no beam search; send 1 (greedy) or leave it out'
    else:
      offered = (f'this server decodes with beam sizes {", ".join(map(str, beam_sizes))} '
                 '(--beam_sizes)')
    raise RequestError(400, 'beam_size', f'{beam_size} is not offered: {offered}')
  truncate = data.get('truncate', False)
  if not isinstance(truncate, bool):
    raise RequestError(400, 'truncate', f'is a JSON {_json_type(truncate)}; send true or '
                       'false')
  return TranslateRequest(tuple(texts), beam_size, truncate)


def _check_text(field: str, t: Any, limits: Limits) -> None:
  if not isinstance(t, str):
    raise RequestError(400, field, f'is a JSON {_json_type(t)}; send a string')
  if not t.strip():
    raise RequestError(400, field, 'is empty; send a sentence (leave blank lines out)')
  if len(t) > limits.max_text_chars:
    raise RequestError(400, field, f'is {len(t)} characters, over this server\'s '
                       f'{limits.max_text_chars} (--max_text_chars); split it into sentences')
  for ch in t:
    if ch in '\n\r\u2028\u2029':
      raise RequestError(400, field, 'holds a line break; send one sentence per text')
    cat = unicodedata.category(ch)
    if cat == 'Cs':
      raise RequestError(400, field, f'holds a lone surrogate U+{ord(ch):04X}, which is not '
                         'text; send valid Unicode')
    if cat == 'Cc' and ch != '\t':
      raise RequestError(400, field, f'holds the control character U+{ord(ch):04X}; send '
                         'plain text')


def _json_type(value: Any) -> str:
  if isinstance(value, bool):
    return 'boolean'
  if value is None:
    return 'null'
  return {dict: 'object', list: 'array', str: 'string', int: 'number',
          float: 'number'}[type(value)]


async def _read_body(request: Request, limit: int) -> bytes:
  """The body, refused (413) as soon as it is known to be over `limit` bytes."""
  declared = request.headers.get('content-length')
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise RequestError(413, 'body', f'is {declared} bytes, over this server\'s {limit} '
                       '(--max_body_bytes); send fewer texts per request')
  chunks, n = [], 0
  async for chunk in request.stream():
    n += len(chunk)
    if n > limit:
      raise RequestError(413, 'body', f'is over this server\'s {limit} bytes '
                         '(--max_body_bytes); send fewer texts per request')
    chunks.append(chunk)
  return b''.join(chunks)


async def _disconnected(request: Request) -> None:
  """Returns when the client goes away (after the body, the next message says so)."""
  while (await request.receive())['type'] != 'http.disconnect':
    pass


def create_app(translator: translator_lib.Translator, limits: Limits) -> Starlette:
  """The app over a compiled translator; its batcher lives as long as the server."""
  page = importlib.resources.files('mtnt_tpu.serve').joinpath('page.html').read_text('utf-8')
  info = translator.info
  beam_sizes = translator.buckets.beam_sizes
  model_json = {
      **dataclasses.asdict(info),
      'decoding': {'beam_sizes': list(beam_sizes),
                   'max_decode_len': translator.buckets.max_decode_len},
      'limits': {'max_texts': limits.max_texts, 'max_text_chars': limits.max_text_chars,
                 'max_body_bytes': limits.max_body_bytes,
                 'max_prompt_tokens': translator.buckets.prompt_budget},
      'buckets': {'prompt_lens': list(translator.buckets.prompt_lens),
                  'batch_sizes': list(translator.batch_sizes)},
  }
  state: dict[str, batcher_lib.Batcher] = {}

  @contextlib.asynccontextmanager
  async def lifespan(_):
    b = batcher_lib.Batcher(translator.translate, window_s=limits.batch_window_s,
                            max_sentences=translator.batch_sizes[-1])
    b.start()
    state['batcher'] = b
    try:
      yield
    finally:
      await b.close()

  async def index(_: Request) -> Response:
    return HTMLResponse(page, headers={
        'Content-Security-Policy': "default-src 'self'; script-src 'unsafe-inline'; "
                                   "style-src 'unsafe-inline'",
        'X-Content-Type-Options': 'nosniff'})

  async def healthz(_: Request) -> Response:
    return JSONResponse({'status': 'ok', 'step': info.step,
                         'decoder_calls': state['batcher'].calls})

  async def model(_: Request) -> Response:
    return JSONResponse(model_json)

  async def translate(request: Request) -> Response:
    try:
      req = parse_request(await _read_body(request, limits.max_body_bytes), limits, beam_sizes)
      prompts = []
      for i, t in enumerate(req.texts):
        try:
          prompts.append(translator.encode(t, truncate=req.truncate, beam_size=req.beam_size))
        except translator_lib.TextError as e:
          raise RequestError(400, f'texts[{i}]', str(e)) from None
    except RequestError as e:
      return e.response()
    except ClientDisconnect:
      logging.warning('client left while sending its request (%d)', CLIENT_CLOSED)
      return Response(status_code=CLIENT_CLOSED)
    work = asyncio.ensure_future(state['batcher'].submit(prompts))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():
      work.cancel()  # withdraws its sentences if their decoder call has not started
      logging.warning('client left before its answer: %d sentences withdrawn or dropped (%d)',
                      len(prompts), CLIENT_CLOSED)
      return Response(status_code=CLIENT_CLOSED)
    gone.cancel()
    try:
      done = work.result()
    except Exception:  # pylint: disable=broad-except  (logged by the batcher)
      return JSONResponse({'error': 'decoding failed on the server; see its log',
                           'field': 'server'}, status_code=500)
    return JSONResponse({
        'translations': [r.text for r in done.results],
        'truncated': [p.truncated for p in prompts],
        'seconds': [round(r.seconds, 6) for r in done.results],
        'beam_size': req.beam_size,
        'step': info.step,
        'batched_requests': done.requests,
        'queued_seconds': round(done.queued_s, 6),
    })

  async def http_error(_: Request, exc: HTTPException) -> Response:
    what = {404: 'no such page; the API is GET /healthz, GET /v1/model, POST /v1/translate',
            405: 'method not allowed here; POST /v1/translate, GET everything else'}
    return JSONResponse({'error': what.get(exc.status_code, exc.detail), 'field': 'path'},
                        status_code=exc.status_code)

  return Starlette(routes=[
      Route('/', index, methods=['GET']),
      Route('/healthz', healthz, methods=['GET']),
      Route('/v1/model', model, methods=['GET']),
      Route('/v1/translate', translate, methods=['POST']),
  ], exception_handlers={HTTPException: http_error}, lifespan=lifespan)
