"""Build progress: a bar on a terminal, a log line every few seconds otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    LOG_EVERY = 10.0  # seconds between plain log lines

    def __init__(self, total_bytes: int | None, done_bytes: int = 0, enabled: bool = True):
        self.total, self.start_bytes = total_bytes, done_bytes
        self.docs = self.tokens = 0
        self.bytes = done_bytes
        self.t0 = self._last_log = time.monotonic()
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, dynamic_ncols=True)

    def rates(self) -> dict[str, float]:
        dt = max(time.monotonic() - self.t0, 1e-9)
        return {
            "docs/s": self.docs / dt,
            "tokens/s": self.tokens / dt,
            "MB/s": (self.bytes - self.start_bytes) / dt / 1e6,
        }

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        if not self.enabled:
            return
        r = self.rates()
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{r['docs/s']:.0f} docs/s, {r['tokens/s'] / 1e3:.0f}k tok/s", refresh=False)
        elif time.monotonic() - self._last_log >= self.LOG_EVERY:
            self._last_log = time.monotonic()
            eta = ""
            if self.total and r["MB/s"] > 0:
                eta = f", ETA {max(self.total - self.bytes, 0) / 1e6 / r['MB/s']:.0f}s"
            log.info(
                "%d docs, %d tokens, %.0f docs/s, %.0fk tokens/s, %.1f MB/s%s",
                self.docs, self.tokens, r["docs/s"], r["tokens/s"] / 1e3, r["MB/s"], eta,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
