"""The rank-0 progress display: a tqdm bar on a terminal, plain log lines otherwise (files,
Slurm logs, CI)."""

from __future__ import annotations

import logging
import math
import sys
import time

from tqdm import tqdm

log = logging.getLogger("zeroforge.train")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _fmt_rate(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (files, Slurm logs, CI)."""

    def __init__(self, start_step: int, max_steps: int, tty: bool | None = None) -> None:
        self.max_steps = max_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if self.tty:
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float,
               mfu: float | None) -> None:
        done = step - self.start_step
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.max_steps - step) if done > 0 else float("nan")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=_fmt_rate(tokens_per_s), refresh=True)
            return
        mfu_s = f" | mfu {mfu * 100:.1f}%" if mfu is not None else ""
        eta_s = _fmt_duration(eta) if math.isfinite(eta) else "?"
        log.info("step %d/%d | loss %.4f | lr %.3g | %s tok/s%s | eta %s", step, self.max_steps,
                 loss, lr, _fmt_rate(tokens_per_s), mfu_s, eta_s)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info("%s", text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
