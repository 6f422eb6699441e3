"""The served translator under concurrent clients: does batching pay?

    uv run --extra serve python benchmarks/serve_load.py --workdir /tmp/mtnt_tiny \
        [--clients 1,8,32] [--seconds 15] [--repeats 2]

Starts `python -m mtnt_tpu.serve --workdir WORKDIR` (its default buckets and
10 ms batching window) on loopback, then for each client count runs that many
clients, each sending one eval-split sentence per request, back to back, for
`--seconds`. Levels alternate within each repeat (1, 8, 32, 1, 8, 32, ...),
so machine noise hits them alike; the table reports per level the median
throughput (sentences/s) over repeats, request latency p50/p99 over all
requests, the mean number of requests that shared a decoder call, the median
wall time of a decoder call, and the throughput against one client's. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mtnt_tpu.serve import harness  # noqa: E402  (after the path)


def eval_sources(workdir: str) -> list[str]:
  """The workdir's eval-split sources (read in a child: this process never starts JAX)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  code = ('import sys; from mtnt_tpu import evaluate, workdir as w; '
          'c = w.load_config(sys.argv[1]); '
          'print("\\n".join(p.src for p in evaluate.eval_pairs(c.data, -1)))')
  r = subprocess.run([sys.executable, '-c', code, workdir], capture_output=True, text=True,
                     cwd=ROOT, check=False)
  if r.returncode:
    sys.exit(f'cannot read the eval split of {workdir}:\n{r.stderr[-2000:]}')
  return [s for s in r.stdout.splitlines() if s.strip()]


def run_level(url: str, sources: list[str], clients: int, seconds: float) -> dict:
  """`clients` threads, each posting one sentence at a time until `seconds` pass."""
  latencies: list[float] = []
  batched: list[int] = []
  call_s: list[float] = []
  lock = threading.Lock()
  start = threading.Barrier(clients)
  stop_at = [0.0]

  def client(k: int) -> int:
    # The standard library's keep-alive client: it costs the shared CPU far
    # less per request than httpx, so the server gets the cycles measured.
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    done = 0
    start.wait(60)
    if k == 0:
      stop_at[0] = time.perf_counter() + seconds
    while not stop_at[0]:
      time.sleep(0.0005)
    i = k
    while time.perf_counter() < stop_at[0]:
      payload = json.dumps({'texts': [sources[i % len(sources)]]})
      t0 = time.perf_counter()
      conn.request('POST', '/v1/translate', payload, {'Content-Type': 'application/json'})
      r = conn.getresponse()
      body = json.loads(r.read())
      dt = time.perf_counter() - t0
      if r.status != 200:
        raise RuntimeError(f'HTTP {r.status}: {body}')
      with lock:
        latencies.append(dt)
        batched.append(body['batched_requests'])
        call_s.append(body['seconds'][0])
      done += 1
      i += clients
    conn.close()
    return done

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    sentences = sum(pool.map(client, range(clients)))
  wall = time.perf_counter() - t0  # includes the last requests' tails past `seconds`
  return {'clients': clients, 'sentences': sentences, 'wall': wall,
          'throughput': sentences / wall, 'latencies': latencies, 'batched': batched,
          'call_s': call_s}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', default='/tmp/mtnt_tiny',
                 help='a trained workdir (README\'s tiny run writes /tmp/mtnt_tiny)')
  p.add_argument('--clients', default='1,8,32')
  p.add_argument('--seconds', type=float, default=15.0)
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--serve_flags', default='', help='extra flags for python -m mtnt_tpu.serve')
  args = p.parse_args()
  if not os.path.isfile(os.path.join(args.workdir, 'config.json')):
    sys.exit(f'--workdir {args.workdir} is not a trained workdir; run README\'s tiny run first: '
             'uv run python -m mtnt_tpu.main --config configs/tiny_cpu.py '
             f'--workdir {args.workdir}')
  levels = [int(c) for c in args.clients.split(',')]
  sources = eval_sources(args.workdir)
  print(f'{len(sources)} eval sentences; starting the server...', file=sys.stderr)
  with harness.serve(args.workdir, '--access_log=false', *args.serve_flags.split(),
                     cwd=ROOT) as server:
    print(next(l for l in server.log().splitlines() if ' at http' in l), file=sys.stderr)
    for n in (1, 8, 32):  # warm every path once
      urllib.request.urlopen(urllib.request.Request(
          server.url + 'v1/translate', json.dumps({'texts': sources[:n]}).encode(),
          {'Content-Type': 'application/json'}), timeout=120).read()
    results: dict[int, list[dict]] = {n: [] for n in levels}
    for rep in range(args.repeats):
      for n in levels:
        r = run_level(server.url, sources, n, args.seconds)
        results[n].append(r)
        print(f'repeat {rep + 1}: {n:>3} clients  {r["throughput"]:7.1f} sentences/s',
              file=sys.stderr)
  base = statistics.median(r['throughput'] for r in results[levels[0]])
  print(f'| clients | sentences/s | p50 latency (ms) | p99 latency (ms) | requests per decoder '
        f'call | decoder call (ms) | throughput vs {levels[0]} client |')
  print('|---:|---:|---:|---:|---:|---:|---:|')
  for n in levels:
    tput = statistics.median(r['throughput'] for r in results[n])
    lat = np.array([x for r in results[n] for x in r['latencies']]) * 1e3
    batched = np.mean([x for r in results[n] for x in r['batched']])
    call_ms = np.median([x for r in results[n] for x in r['call_s']]) * 1e3
    print(f'| {n} | {tput:.1f} | {np.percentile(lat, 50):.0f} | {np.percentile(lat, 99):.0f} | '
          f'{batched:.1f} | {call_ms:.0f} | {tput / base:.1f}x |')


if __name__ == '__main__':
  main()
