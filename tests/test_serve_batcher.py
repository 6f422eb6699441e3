"""The request batcher on its own, with a stand-in for the decoder (no JAX)."""

import asyncio
import threading

import pytest

from mtnt_tpu.serve import batcher as batcher_lib


class Recorder:
  """Doubles its inputs; records each call's items; can hold a call until released."""

  def __init__(self, fail_on=None):
    self.calls: list[list[int]] = []
    self.release = threading.Event()
    self.release.set()
    self.started = threading.Event()
    self._fail_on = fail_on

  def __call__(self, items):
    self.calls.append(list(items))
    self.started.set()
    assert self.release.wait(10)
    if self._fail_on is not None and self._fail_on in items:
      raise RuntimeError('decoder broke')
    return [2 * x for x in items]


def run(coro):
  return asyncio.run(asyncio.wait_for(coro, 30))


async def _with_batcher(fn, body, *, window_s=0.05, max_sentences=32):
  b = batcher_lib.Batcher(fn, window_s=window_s, max_sentences=max_sentences)
  b.start()
  try:
    return await body(b)
  finally:
    await b.close()


def test_concurrent_requests_share_one_call_and_get_their_own_results_in_order():
  fn = Recorder()

  async def body(b):
    return await asyncio.gather(b.submit([1, 2, 3]), b.submit([4]), b.submit([5, 6]))

  a, c, d = run(_with_batcher(fn, body))
  assert fn.calls == [[1, 2, 3, 4, 5, 6]]
  assert (a.results, c.results, d.results) == ([2, 4, 6], [8], [10, 12])
  assert a.requests == c.requests == d.requests == 3


def test_a_request_alone_waits_the_window_and_runs_alone():
  fn = Recorder()

  async def body(b):
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = await b.submit([7])
    return out, loop.time() - t0

  out, waited = run(_with_batcher(fn, body, window_s=0.2))
  assert out.results == [14] and out.requests == 1
  assert waited >= 0.2 and out.queued_s >= 0.2
  assert fn.calls == [[7]]


def test_requests_arriving_during_a_call_go_together_into_the_next():
  fn = Recorder()

  async def body(b):
    fn.release.clear()
    first = asyncio.ensure_future(b.submit([1]))
    await asyncio.get_running_loop().run_in_executor(None, fn.started.wait, 10)
    later = [asyncio.ensure_future(b.submit([x])) for x in (2, 3, 4)]
    await asyncio.sleep(0.1)
    fn.release.set()
    return await first, await asyncio.gather(*later)

  first, later = run(_with_batcher(fn, body, window_s=0.01))
  assert fn.calls == [[1], [2, 3, 4]]
  assert first.requests == 1 and [r.requests for r in later] == [3, 3, 3]


def test_max_sentences_caps_a_call_at_whole_requests():
  fn = Recorder()

  async def body(b):
    return await asyncio.gather(b.submit([1, 2]), b.submit([3, 4]), b.submit([5]))

  run(_with_batcher(fn, body, max_sentences=3))
  assert fn.calls == [[1, 2], [3, 4, 5]]


def test_a_full_batch_does_not_wait_out_the_window():
  fn = Recorder()

  async def body(b):
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.gather(b.submit([1, 2]), b.submit([3, 4]))
    return loop.time() - t0

  assert run(_with_batcher(fn, body, window_s=5, max_sentences=4)) < 2


def test_a_request_cancelled_while_queued_is_left_out_of_the_call():
  fn = Recorder()

  async def body(b):
    gone = asyncio.ensure_future(b.submit([99]))
    kept = asyncio.ensure_future(b.submit([1]))
    await asyncio.sleep(0)  # both queued
    gone.cancel()
    return await kept

  kept = run(_with_batcher(fn, body, window_s=0.1))
  assert fn.calls == [[1]] and kept.results == [2] and kept.requests == 1


def test_a_request_cancelled_during_its_call_leaves_the_others_their_results():
  fn = Recorder()

  async def body(b):
    fn.release.clear()
    gone = asyncio.ensure_future(b.submit([99]))
    kept = asyncio.ensure_future(b.submit([1]))
    await asyncio.get_running_loop().run_in_executor(None, fn.started.wait, 10)
    gone.cancel()
    fn.release.set()
    return await kept, await b.submit([5])

  kept, after = run(_with_batcher(fn, body))
  assert fn.calls == [[99, 1], [5]]
  assert kept.results == [2] and after.results == [10]


def test_a_failed_call_fails_its_requests_and_the_next_call_still_runs():
  fn = Recorder(fail_on=3)

  async def body(b):
    failed = await asyncio.gather(b.submit([1]), b.submit([3]), return_exceptions=True)
    return failed, await b.submit([4])

  failed, after = run(_with_batcher(fn, body))
  assert all(isinstance(f, RuntimeError) for f in failed)
  assert after.results == [8]


def test_bad_settings_and_a_closed_batcher_are_errors():
  with pytest.raises(ValueError, match='window'):
    batcher_lib.Batcher(Recorder(), window_s=-1, max_sentences=4)
  with pytest.raises(ValueError, match='max_sentences'):
    batcher_lib.Batcher(Recorder(), window_s=0, max_sentences=0)

  async def closed():
    b = batcher_lib.Batcher(Recorder(), window_s=0, max_sentences=4)
    b.start()
    await b.close()
    await b.submit([1])

  with pytest.raises(RuntimeError, match='not running'):
    run(closed())


def test_the_window_reopens_after_a_call_so_answered_clients_join_the_next():
  fn = Recorder()

  async def body(b):
    fn.release.clear()
    first = asyncio.ensure_future(b.submit([1]))
    await asyncio.get_running_loop().run_in_executor(None, fn.started.wait, 10)
    waiting = asyncio.ensure_future(b.submit([2]))  # queued during the call
    fn.release.set()
    await first
    await asyncio.sleep(0.05)  # the answered client comes back within the window
    return await asyncio.gather(waiting, b.submit([3]))

  run(_with_batcher(fn, body, window_s=0.3))
  assert fn.calls == [[1], [2, 3]]
