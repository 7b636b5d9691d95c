"""How every bench suite times its cases: warm up, alternate the sides, take the median.

A case is a `Timer` around a call that blocks until its result is ready. `alternate` warms every
case up once (compile time stays out of the figures), then times them round by round -- ours,
transformers', ours, ... -- so machine noise hits both sides alike; a suite reports the median of
each case's times. A case whose warm-up took longer than `slow_s` keeps that single run.

`settle=True` makes every timed call directly follow an untimed call of the same case, as steps
run back to back in a training loop. On the 2-core VM a call straight after the other library's
work measured slower: a train step up to ~40% (the other side's threads still holding a core,
ours waking up), a generation ~20 ms after transformers' single-threaded `generate` (XLA's pool
threads waking: ~130 involuntary context switches instead of ~1). That would count against
whichever side is timed second, and most against short calls (ours: 45 ms at 16 XLNet tokens).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

# A case whose warm-up call takes longer than this (seconds) is timed once, by that call.
SLOW_S = 10.0


def timed(fn: Callable[[], Any]) -> float:
    """Seconds that one call of `fn` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_ms(times: Sequence[float]) -> float:
    """The median of `times` (seconds), in milliseconds."""
    return 1e3 * statistics.median(times)


@dataclasses.dataclass
class Timer:
    """One timed case: `run()` blocks until its result is ready; `times` in seconds."""

    name: str
    run: Callable[[], Any]
    keep_result: bool = False  # keep what the warm-up call returned (else it is freed at once)
    warmup_s: float = 0.0
    result: Any = None
    times: list[float] = dataclasses.field(default_factory=list)

    def warm_up(self, slow_s: float = SLOW_S) -> None:
        t0 = time.perf_counter()
        result = self.run()
        self.warmup_s = time.perf_counter() - t0
        self.result = result if self.keep_result else None
        self.times = [self.warmup_s] if self.warmup_s > slow_s else []


def alternate(
    timers: Sequence[Timer], n: int, settle: bool = False, slow_s: float = SLOW_S
) -> None:
    """Warms every timer up, then times each `n` times, one call of each per round, in order.

    Args:
      timers: the cases, in the order each round calls them.
      n: timed rounds.
      settle: an untimed call of the same case right before every timed one.
      slow_s: a timer whose warm-up took longer keeps that one run (`math.inf`: never).
    """
    for t in timers:
        t.warm_up(slow_s)
    for _ in range(n):
        for t in timers:
            if t.warmup_s <= slow_s:
                if settle:
                    t.run()
                t.times.append(timed(t.run))
