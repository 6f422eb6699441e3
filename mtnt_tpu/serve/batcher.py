"""Collects concurrent requests into shared decoder calls, off the event loop.

The window (`window_s`) opens when a request arrives at an idle decoder, or
when a call ends with requests waiting; every request that arrives before it
closes, up to `max_sentences`, is decoded in the same call, on one worker
thread (JAX calls are made from one thread, one at a time). Reopening the
window after a call lets the clients just answered send their next request
into the next call instead of the one after: under load, calls stay full. A
full batch starts at once. Each request gets its own results back, in its own
order.

A request cancelled before its call starts (its client went away) is left out
of the call; one cancelled later has its results dropped. Either way the
other requests of the call are untouched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from typing import Callable, Generic, Sequence, TypeVar

from absl import logging

In = TypeVar('In')
Out = TypeVar('Out')


@dataclasses.dataclass(frozen=True)
class Batched(Generic[Out]):
  """One request's results, and how many requests shared its decoder call."""
  results: list[Out]
  requests: int  # requests decoded in the same call (1: alone)
  queued_s: float  # from submit to the start of the call


@dataclasses.dataclass(eq=False)
class _Job(Generic[In]):
  items: Sequence[In]
  future: asyncio.Future
  arrived: float  # loop time


class Batcher(Generic[In, Out]):
  """`await submit(items)` -> Batched(fn(items of many requests) split back per request)."""

  def __init__(self, fn: Callable[[list[In]], list[Out]], *, window_s: float,
               max_sentences: int):
    if window_s < 0 or max_sentences < 1:
      raise ValueError(f'batching window {window_s}s must be >= 0 and max_sentences '
                       f'{max_sentences} >= 1')
    self._fn, self._window_s, self._max = fn, window_s, max_sentences
    self._queue: list[_Job] = []
    self._arrived = asyncio.Event()
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='decode')
    self._task: asyncio.Task | None = None
    self.calls = 0  # decoder calls made (for /healthz)
    self._idle_since = float('-inf')  # loop time the last call ended

  def start(self) -> None:
    self._task = asyncio.get_running_loop().create_task(self._loop())

  async def close(self) -> None:
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    for job in self._queue:
      job.future.cancel()
    self._executor.shutdown(wait=True)

  async def submit(self, items: Sequence[In]) -> Batched[Out]:
    """Waits for `items`' results; cancelling the caller withdraws them if not started."""
    if self._task is None or self._task.done():
      raise RuntimeError('the batcher is not running')
    loop = asyncio.get_running_loop()
    job = _Job(list(items), loop.create_future(), loop.time())
    self._queue.append(job)
    self._arrived.set()
    return await job.future  # cancelling this await cancels job.future

  async def _loop(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      await self._arrived.wait()
      self._queue = [j for j in self._queue if not j.future.done()]
      if not self._queue:
        self._arrived.clear()
        continue
      deadline = max(self._queue[0].arrived, self._idle_since) + self._window_s
      while self._waiting() < self._max and (left := deadline - loop.time()) > 0:
        self._arrived.clear()
        try:
          await asyncio.wait_for(self._arrived.wait(), left)
        except asyncio.TimeoutError:
          break
      jobs = self._take()
      if jobs:
        await self._run(jobs)
        self._idle_since = loop.time()

  def _waiting(self) -> int:
    return sum(len(j.items) for j in self._queue if not j.future.done())

  def _take(self) -> list[_Job]:
    """Whole requests, oldest first, up to max_sentences (at least one request)."""
    jobs, n = [], 0
    while self._queue and (not jobs or n + len(self._queue[0].items) <= self._max):
      job = self._queue.pop(0)
      if not job.future.done():  # cancelled while waiting: its client went away
        jobs.append(job)
        n += len(job.items)
    if not self._queue:
      self._arrived.clear()
    return jobs

  async def _run(self, jobs: list[_Job]) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    items = [x for j in jobs for x in j.items]
    try:
      results = await loop.run_in_executor(self._executor, self._fn, items)
      if len(results) != len(items):
        raise RuntimeError(f'{len(items)} sentences gave {len(results)} results')
    except Exception as e:  # pylint: disable=broad-except
      logging.exception('decoding %d sentences of %d requests failed', len(items), len(jobs))
      for j in jobs:
        if not j.future.done():
          j.future.set_exception(e)
      return
    finally:
      self.calls += 1
    start = 0
    for j in jobs:
      mine = results[start:start + len(j.items)]
      start += len(j.items)
      if not j.future.done():
        j.future.set_result(Batched(list(mine), len(jobs), started - j.arrived))

