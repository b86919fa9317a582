"""Run the benchmarks: ``python -m bench`` (all) or ``python -m bench engine durable``.

Every figure is measured in this run next to its peer, and reported as a
ratio with its goal; nothing here asserts, since shared machines are noisy.
"""

import sys

from . import distributed, durable, engine

SUITES = {"engine": engine, "durable": durable, "distributed": distributed}


def main(names: list[str]) -> None:
    for name in names or list(SUITES):
        SUITES[name].run().print()


if __name__ == "__main__":
    main(sys.argv[1:])
