"""python -m mtnt_tpu.serve --workdir DIR [--host 127.0.0.1] [--port 8000] [--step N]

Serves a trained workdir's best checkpoint (or `--step N`) as a web page at /
and an HTTP API (mtnt_tpu/serve/app.py), on this host's devices. Every decoder
bucket is compiled before the port opens, so no request waits on a compile.
Binds 127.0.0.1 unless --host says otherwise. `--port 0` picks a free port;
the URL is printed on stderr once the server is ready.
"""

from __future__ import annotations

import ipaddress
import logging as logging_std
import socket
import sys

from absl import app
from absl import flags
from absl import logging
import uvicorn

from mtnt_tpu import runtime
from mtnt_tpu import workdir as workdir_lib
from mtnt_tpu.serve import app as app_lib
from mtnt_tpu.serve import translator as translator_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; only when run as a program, so importing defines none."""
  limits = app_lib.Limits()
  flags.DEFINE_string('workdir', None, 'A training workdir (holds config.json).', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the best checkpoint.')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: every interface).')
  flags.DEFINE_integer('port', 8000, 'Port to listen on; 0 picks a free one.')
  flags.DEFINE_list('prompt_lens', None, 'Compiled prompt lengths in tokens, ascending; the '
                    'last is the budget of one text. Default: 32, 64, ... up to '
                    'config.data.max_len.')
  flags.DEFINE_list('batch_sizes', ['8', '32'], 'Compiled batch sizes, ascending (rounded up '
                    'to a multiple of the device count); the largest caps one decoder call.')
  flags.DEFINE_list('beam_sizes', None, 'Beam sizes offered beside greedy (1). Default: 1, '
                    'and 4 where the decoder has beam search.')
  flags.DEFINE_integer('max_decode_len', None,
                       'New tokens per translation; default: config.eval.max_decode_len.')
  flags.DEFINE_float('batch_window_ms', limits.batch_window_s * 1e3,
                     'How long the first waiting request holds the batch open for others.')
  flags.DEFINE_integer('max_texts', limits.max_texts, 'Texts per request at most.')
  flags.DEFINE_integer('max_text_chars', limits.max_text_chars, 'Characters per text at most.')
  flags.DEFINE_integer('max_body_bytes', limits.max_body_bytes, 'Request body bytes at most.')
  flags.DEFINE_integer('cpu_devices', None, 'For a workdir trained on faked CPU devices: '
                       'serve on this many (default: as many as it trained on).')
  flags.DEFINE_boolean('access_log', True, 'Log one line per HTTP request.')


def _ints(name: str, values: list[str] | None) -> tuple[int, ...] | None:
  if values is None:
    return None
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f'--{name}={",".join(values)}: give comma-separated integers') from None


def _bind(host: str, port: int) -> socket.socket:
  """A bound (not yet listening) socket: a taken port fails before anything compiles."""
  try:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
  except ValueError:
    raise ValueError(f'--host={host} is not an IP address; pass one such as 127.0.0.1') from None
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise ValueError(f'cannot listen on {host}:{port} ({e.strerror}); pass another --port '
                     '(0 picks a free one) or --host') from None
  return sock


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # stderr is for the URL, requests and problems
  runtime.quiet_libraries(logging_std.ERROR)  # orbax's notes stay off the log
  try:
    limits = app_lib.Limits(FLAGS.max_texts, FLAGS.max_text_chars, FLAGS.max_body_bytes,
                            FLAGS.batch_window_ms / 1e3)
    config = workdir_lib.load_config(FLAGS.workdir)
    if FLAGS.cpu_devices is not None:
      if FLAGS.cpu_devices < 1 or not config.runtime.get('cpu_devices', 0):
        raise ValueError(f'--cpu_devices={FLAGS.cpu_devices}: give >= 1, and only for a '
                         'workdir trained on faked CPU devices (config.runtime.cpu_devices)')
      config.runtime.cpu_devices = FLAGS.cpu_devices
    workdir_lib.use_cpu_devices(config)
    beam_sizes = _ints('beam_sizes', FLAGS.beam_sizes)
    if beam_sizes is None:
      beam_sizes = (1, 4) if translator_lib.decoder_has_beam_search() else (1,)
    buckets = translator_lib.Buckets(
        prompt_lens=(_ints('prompt_lens', FLAGS.prompt_lens)
                     or translator_lib.default_prompt_lens(config.data.max_len)),
        batch_sizes=_ints('batch_sizes', FLAGS.batch_sizes), beam_sizes=beam_sizes,
        max_decode_len=FLAGS.max_decode_len or config.eval.max_decode_len)
    sock = _bind(FLAGS.host, FLAGS.port)
    runtime.enable_compilation_cache(config.runtime.compilation_cache, FLAGS.workdir)
    trained = workdir_lib.restore(FLAGS.workdir, config, FLAGS.step)
    translator = translator_lib.Translator(
        trained, translator_lib.model_info(FLAGS.workdir, trained), buckets)
  except (ValueError, OSError) as e:  # WorkdirError among them
    raise SystemExit(f'error: {e}') from None
  host, port = sock.getsockname()[:2]
  url_host = f'[{host}]' if ':' in host else host
  if not ipaddress.ip_address(host).is_loopback:
    print(f'warning: listening on {host}: anyone who can reach this machine can use the '
          'translator', file=sys.stderr)
  sock.listen(128)
  info = translator.info
  print(f'serving {info.variant} step {info.step} ({info.origin}) of {FLAGS.workdir}, '
        f'{len(translator.buckets.prompt_lens)} prompt lengths x {len(translator.batch_sizes)} '
        f'batch sizes compiled in {translator.compile_seconds:.1f}s, at '
        f'http://{url_host}:{port}/', file=sys.stderr, flush=True)
  server = uvicorn.Server(uvicorn.Config(
      app_lib.create_app(translator, limits), host=host, port=port,
      log_level='info' if FLAGS.access_log else 'warning', access_log=FLAGS.access_log,
      timeout_graceful_shutdown=5))
  server.run(sockets=[sock])


if __name__ == '__main__':
  define_flags()
  app.run(main)
