"""One worker process of tests/distributed/test_processes.py: ``python worker.py ROLE [options]``.

The worker sets up Django itself (DJANGO_SETTINGS_MODULE=tests.settings, PYTHONPATH=the
project root) and opens the distributed store on the alias "distributed". It talks to the
test through JSON lines: ``{"event": ...}`` on stdout, commands on stdin where a role takes
them. Nothing is caught: an exception prints its traceback on stderr and exits non-zero,
which the test reports with that stderr.

Roles
-----
transfer   random transfers among accounts (each a ``(balance, version)`` tuple), each also
           incrementing a shared counter and this worker's count DVar; read-only audits sum
           every account. Reports commits, bad sums, and (``--log``) every committed
           transaction's reads and writes with versions.
opacity    ``--writer``: increment x and y together; otherwise read x and y in one
           transaction and count x != y seen INSIDE the transaction (aborted attempts too).
shuffle    pessimistic transactions incrementing 3-5 of ``--vars`` variables in random order.
waiter     for each SPEC ``STORE@POLL*COUNT``: block in retry until ``v`` of STORE changes,
           COUNT times, printing a ``wake`` line with time.time() each time.
committer  for each stdin line naming a store: increment its ``v``; print ``committed`` with
           time.time() taken right after atomically returned. ``get STORE`` prints ``got``
           with the value of ``v`` read in a transaction. ``quit`` ends.
create     print ``ready``, wait for a start time on stdin, then at that instant open
           ``--names`` with default 0, and increment each once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()


def open_store(name: str, **kwargs):
    import djstm

    return djstm.with_store(database="distributed", mode="distributed", name=name, **kwargs)


# -- transfer ---------------------------------------------------------------------------------------


def account_name(i: int) -> str:
    return f"acct-{i:02d}"


def run_transfer(args) -> None:
    import djstm

    rng = random.Random(args.seed)
    store = open_store(args.store)
    accounts = [store.dvar(account_name(i), (100, 0), type=tuple[int, int]) for i in range(args.accounts)]
    counter = store.dvar("counter", 0) if args.counter else None
    mine_name = f"count-{args.worker}"
    mine = store.dvar(mine_name, 0)
    total = 100 * args.accounts
    log: list[dict] = []
    commits = audits = 0
    bad_sums: list[int] = []  # committed audits whose sum was wrong
    bad_inside: list[int] = []  # sums seen inside any attempt, committed or not

    def transfer(a: int, b: int, amount: int) -> None:
        balance_a, version_a = accounts[a].read()
        balance_b, version_b = accounts[b].read()
        count = counter.read() if counter is not None else None
        own = mine.read()
        if args.think:
            time.sleep(args.think)
        accounts[a].write((balance_a - amount, version_a + 1))
        accounts[b].write((balance_b + amount, version_b + 1))
        reads = [[account_name(a), version_a], [account_name(b), version_b], [mine_name, own]]
        writes = [[account_name(a), version_a + 1], [account_name(b), version_b + 1], [mine_name, own + 1]]
        if counter is not None:
            counter.write(count + 1)
            reads.append(["counter", count])
            writes.append(["counter", count + 1])
        mine.write(own + 1)
        djstm.after_commit(lambda: log.append({"reads": reads, "writes": writes}))

    def audit() -> int:
        order = list(range(len(accounts)))
        rng.shuffle(order)
        seen = {i: accounts[i].read() for i in order}
        balance = sum(value[0] for value in seen.values())
        if balance != total:
            bad_inside.append(balance)
        reads = [[account_name(i), value[1]] for i, value in seen.items()]
        djstm.after_commit(lambda: log.append({"reads": reads, "writes": []}))
        return balance

    emit("ready", pid=os.getpid())
    deadline = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        if n % args.audit_every == 0:
            balance = djstm.atomically(audit, lock=args.lock, timeout=60)
            audits += 1
            if balance != total:
                bad_sums.append(balance)
        else:
            a, b = rng.sample(range(len(accounts)), 2)
            djstm.atomically(transfer, a, b, rng.randint(1, 20), lock=args.lock, timeout=60)
            commits += 1
    if args.log:
        with open(args.log, "w") as file:
            json.dump(log, file)
    emit("done", commits=commits, audits=audits, bad_sums=bad_sums, bad_inside=bad_inside,
         logged=len(log), worker=args.worker)


# -- opacity ----------------------------------------------------------------------------------------


def run_opacity(args) -> None:
    import djstm

    store = open_store(args.store)
    x, y = store.dvar("x", 0), store.dvar("y", 0)
    violations: list[list[int]] = []
    attempts = 0

    def write() -> None:
        x.write(x.read() + 1)
        y.write(y.read() + 1)

    def read(first, second) -> None:
        nonlocal attempts
        attempts += 1
        a = first.read()
        time.sleep(0.0005)  # widen the window in which another process commits
        b = second.read()
        if a != b:
            violations.append([a, b])

    emit("ready", pid=os.getpid())
    deadline = time.monotonic() + args.seconds
    commits = 0
    while time.monotonic() < deadline:
        if args.writer:
            djstm.atomically(write, lock=args.lock, timeout=60)
        else:
            pair = (x, y) if commits % 2 else (y, x)
            djstm.atomically(read, *pair, lock=args.lock, timeout=60)
        commits += 1
    emit("done", commits=commits, attempts=attempts, violations=violations[:20], violation_count=len(violations))


# -- shuffle ----------------------------------------------------------------------------------------


def run_shuffle(args) -> None:
    import djstm

    rng = random.Random(args.seed)
    store = open_store(args.store)
    dvars = [store.dvar(f"var-{i}", 0) for i in range(args.vars)]

    def bump(chosen: list[int]) -> None:
        for i in chosen:
            dvars[i].write(dvars[i].read() + 1)

    emit("ready", pid=os.getpid())
    deadline = time.monotonic() + args.seconds
    commits = increments = 0
    while time.monotonic() < deadline:
        chosen = rng.sample(range(args.vars), rng.randint(3, 5))  # random order, not name order
        djstm.atomically(bump, chosen, lock="pessimistic", timeout=60)
        commits += 1
        increments += len(chosen)
    emit("done", commits=commits, increments=increments)


# -- waiter and committer ---------------------------------------------------------------------------


def run_waiter(args) -> None:
    import djstm

    plan = []
    for spec in args.specs:
        name, rest = spec.split("@")
        poll, count = rest.split("*")
        store = open_store(name, poll_interval=float(poll))
        plan.append((name, store.dvar("v", 0), int(count)))
    emit("ready", pid=os.getpid())
    for name, v, count in plan:
        last = djstm.atomically(v.read)

        def changed():
            value = v.read()
            if value == last:
                djstm.retry()
            return value

        for _ in range(count):
            last = djstm.atomically(changed, timeout=args.timeout)
            emit("wake", store=name, value=last, t=time.time())
    emit("done")


def run_committer(args) -> None:
    import djstm

    dvars = {name: open_store(name).dvar("v", 0) for name in args.stores}
    emit("ready", pid=os.getpid())
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command.startswith("get "):
            name = command[4:]
            emit("got", store=name, value=djstm.atomically(dvars[name].read, timeout=60))
            continue
        v = dvars[command]
        value = djstm.atomically(lambda: v.write(v.read() + 1) or v.read(), timeout=60)
        emit("committed", store=command, value=value, t=time.time())
    emit("done")


# -- create -----------------------------------------------------------------------------------------


def run_create(args) -> None:
    import djstm

    store = open_store(args.store)
    names = args.names.split(",")
    random.Random(args.seed).shuffle(names)
    emit("ready", pid=os.getpid())
    start = float(sys.stdin.readline())
    time.sleep(max(0.0, start - time.time()))
    dvars = [store.dvar(name, 0) for name in names]  # all processes at the same instant
    created_at = time.time()
    for dvar in dvars:
        djstm.atomically(lambda: dvar.write(dvar.read() + 1), timeout=60)
    emit("done", late=created_at - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = parser.add_subparsers(dest="role", required=True)

    p = roles.add_parser("transfer")
    p.add_argument("--store", required=True)
    p.add_argument("--lock", default="auto")
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--accounts", type=int, default=20)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--no-counter", dest="counter", action="store_false")
    p.add_argument("--think", type=float, default=0.0, help="seconds slept inside each transfer")
    p.add_argument("--audit-every", type=int, default=5)
    p.add_argument("--log")
    p.add_argument("--seed", type=int, default=0)

    p = roles.add_parser("opacity")
    p.add_argument("--store", required=True)
    p.add_argument("--writer", action="store_true")
    p.add_argument("--lock", default="auto")
    p.add_argument("--seconds", type=float, default=3.0)

    p = roles.add_parser("shuffle")
    p.add_argument("--store", required=True)
    p.add_argument("--vars", type=int, default=10)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)

    p = roles.add_parser("waiter")
    p.add_argument("specs", nargs="+", metavar="STORE@POLL*COUNT")
    p.add_argument("--timeout", type=float, default=60.0)

    p = roles.add_parser("committer")
    p.add_argument("stores", nargs="+")

    p = roles.add_parser("create")
    p.add_argument("--store", required=True)
    p.add_argument("--names", required=True)
    p.add_argument("--seed", type=int, default=0)

    args = parser.parse_args()
    setup()
    globals()[f"run_{args.role}"](args)


if __name__ == "__main__":
    main()
