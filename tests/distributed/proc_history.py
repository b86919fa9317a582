"""A serializability checker for logged histories (Adya's direct serialization graph, by versions).

A history is a list of committed transactions, each ``{"reads": [[name, version], ...],
"writes": [[name, version], ...]}``: the version of each variable it read and the version
its write created. Every variable starts at ``initial`` (written by no logged transaction),
and each committed write creates the next version. Edges between transactions:

* ww: the writer of version k of x precedes the writer of version k+1;
* wr: the writer of version k of x precedes every transaction that read version k;
* rw: a transaction that read version k of x precedes the writer of version k+1
  (an anti-dependency: it must have run before that write).

The history is serializable (for these version orders) iff the graph has no cycle.
"""

from __future__ import annotations

from collections import defaultdict

__all__ = ["find_anomaly"]


def find_anomaly(history: list[dict], initial: int = 0) -> str | None:
    """Return None if ``history`` is serializable, else a description of what is wrong."""
    writer: dict[tuple[str, int], int] = {}
    for index, tx in enumerate(history):
        for name, version in tx["writes"]:
            key = (name, version)
            if version <= initial:
                return f"transaction {index} wrote version {version} of {name!r}, not above the initial {initial}"
            if key in writer:
                return (
                    f"lost update: transactions {writer[key]} and {index} both created version {version} of "
                    f"{name!r} ({_show(history, writer[key])} / {_show(history, index)})"
                )
            writer[key] = index

    edges: dict[int, set[int]] = defaultdict(set)

    def edge(source: int, target: int) -> None:
        if source != target:
            edges[source].add(target)

    for (name, version), index in writer.items():
        if version - 1 > initial:
            previous = writer.get((name, version - 1))
            if previous is None:
                return f"version {version - 1} of {name!r} was never committed, yet transaction {index} wrote {version}"
            edge(previous, index)  # ww
    for index, tx in enumerate(history):
        for name, version in tx["reads"]:
            if version != initial:
                source = writer.get((name, version))
                if source is None:
                    return (
                        f"transaction {index} read version {version} of {name!r}, which no committed "
                        f"transaction wrote ({_show(history, index)})"
                    )
                edge(source, index)  # wr
            successor = writer.get((name, version + 1))
            if successor is not None:
                edge(index, successor)  # rw
    cycle = _find_cycle(len(history), edges)
    if cycle is None:
        return None
    steps = " -> ".join(f"T{i} {_show(history, i)}" for i in cycle)
    return f"dependency cycle of {len(cycle) - 1} transactions: {steps}"


def _show(history: list[dict], index: int) -> str:
    tx = history[index]
    reads = ",".join(f"{n}@{v}" for n, v in tx["reads"][:6]) + ("…" if len(tx["reads"]) > 6 else "")
    writes = ",".join(f"{n}@{v}" for n, v in tx["writes"])
    return f"[r {reads} | w {writes}]"


def _find_cycle(count: int, edges: dict[int, set[int]]) -> list[int] | None:
    """A cycle as a list of nodes (first == last), or None; iterative DFS (histories are long)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = [WHITE] * count
    for root in range(count):
        if colour[root] != WHITE:
            continue
        path = [root]
        iterators = [iter(edges.get(root, ()))]
        colour[root] = GREY
        while iterators:
            for target in iterators[-1]:
                if colour[target] == GREY:
                    return path[path.index(target):] + [target]
                if colour[target] == WHITE:
                    colour[target] = GREY
                    path.append(target)
                    iterators.append(iter(edges.get(target, ())))
                    break
            else:
                colour[path.pop()] = BLACK
                iterators.pop()
    return None
