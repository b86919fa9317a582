"""A plain script that commits transactions keeping an invariant until it is killed.

Every transaction i sets n = a = i, b = -i and a large blob derived from i, so
a torn transaction shows up as a mismatch. Every 25 transactions it calls
``sync()`` and prints the number it confirmed.
"""

import sys

import djstm

path = sys.argv[1]
with djstm.with_store(path) as store:
    n, a, b = store.dvar("n", 0), store.dvar("a", 0), store.dvar("b", 0)
    blob = store.dvar("blob", "")
    i = n.peek()
    print("started", i, flush=True)

    def step():
        n.write(i)
        a.write(i)
        b.write(-i)
        blob.write(str(i) * 20000)  # big rows make every flush take a while

    while True:
        i += 1
        djstm.atomically(step)
        if i % 25 == 0:
            store.sync()
            print("synced", i, flush=True)
