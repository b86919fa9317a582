"""Small helpers to measure rates the same way for djstm and its peers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Each rate is the best of this many runs: the machine is shared, and noise only ever slows a run down.
RUNS = 3


def rate(operation: Callable[[], object], count: int, threads: int = 1) -> float:
    """Operations per second of ``operation`` run ``count`` times in each of ``threads`` threads (best of RUNS)."""
    best = 0.0
    for _ in range(RUNS):
        start_line = threading.Barrier(threads + 1)

        def worker() -> None:
            start_line.wait()
            for _ in range(count):
                operation()

        workers = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in workers:
            thread.start()
        start_line.wait()
        started = time.perf_counter()
        for thread in workers:
            thread.join()
        best = max(best, count * threads / (time.perf_counter() - started))
    return best


def best_time(run: Callable[[], object]) -> float:
    """Seconds taken by the fastest of RUNS calls of ``run``."""
    return min(_timed(run) for _ in range(RUNS))


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


class Table:
    """Rows of (measure, figure, goal, verdict), printed aligned."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[tuple[str, str, str, str]] = []

    def rate(self, what: str, per_second: float) -> None:
        self.rows.append((what, f"{per_second:,.0f}/s", "", ""))

    def ratio(self, what: str, value: float, goal: str, met: bool) -> None:
        self.rows.append((what, f"{value:.2f}x", goal, "met" if met else "MISSED"))

    def print(self) -> None:
        widths = [max(len(row[i]) for row in self.rows) for i in range(4)]
        print(f"\n## {self.title}")
        for row in self.rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
