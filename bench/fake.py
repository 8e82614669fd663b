"""The fake provider as its own process, for benchmarks: `python -m bench.fake --latency 0.2`.

It is `worker.local.fake_server` (the stdlib ThreadingHTTPServer the tests use) with three changes that
keep the fake from being what is measured:
- answers are cached by prompt (the benchmark sends one brief to every order, so three prompts
  cover every request; without the cache each request rebuilds the site offline, ~ms of CPU);
- requests are counted, not recorded (the test server keeps every request body in memory);
- a listen backlog of 1024 instead of 128, so 500 connections opened at once are not dropped.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from worker.local import fake_server

if os.environ.get("BENCH_FAKE_NO_CACHE") != "1":
    fake_server.answer_for = functools.lru_cache(maxsize=64)(fake_server.answer_for)
fake_server._HTTPServer.request_queue_size = 1024


def _count_only(self: fake_server.FakeProviderServer, request: Any) -> int:
    with self._lock:
        self._counter += 1
        return self._counter


fake_server.FakeProviderServer._record = _count_only  # type: ignore[method-assign]

if __name__ == "__main__":
    fake_server.main(sys.argv[1:])
