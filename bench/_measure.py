"""Small helpers to measure rates the same way for djstm and its peers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Each rate is the best of this many runs: the machine is shared, and noise only ever slows a run down.
RUNS = 3


def _one_run(operation: Callable[[], object], count: int, threads: int) -> float:
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
    return count * threads / (time.perf_counter() - started)


def rates(*candidates: tuple[Callable[[], object], int, int]) -> list[float]:
    """Operations per second of each ``(operation, count, threads)``: best of RUNS, runs interleaved.

    Interleaving puts each candidate's runs next to its peers', so a slow
    moment of the machine (or its disk) hits all of them alike.
    """
    best = [0.0] * len(candidates)
    for _ in range(RUNS):
        for index, (operation, count, threads) in enumerate(candidates):
            best[index] = max(best[index], _one_run(operation, count, threads))
    return best


def best_time(run: Callable[[], object]) -> float:
    """Seconds taken by the fastest of RUNS calls of ``run``."""
    return min(timed(run) for _ in range(RUNS))


def timed(run: Callable[[], object]) -> float:
    """Seconds one call of ``run`` takes."""
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
