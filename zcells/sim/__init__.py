"""A whole tree of cells in one process, in virtual time, under faults, from one seed.

`zcells sim` runs the real cell code (node, handlers, cell and host
schedulers, fake driver, upward stream, housekeeping, each cell's own SQLite
database) over the in-memory transport, on an event loop whose clock jumps
to the next timer whenever nothing is ready. A thousand cells run ten
virtual minutes in a few wall minutes, and the same seed replays the same
run: the same messages at the same virtual times, hashed into `trace_hash`.

* `loop`: the virtual-time event loop.
* `network`: the links between cells, with their faults.
* `faults`: which faults happen, where and when, chosen from the seed.
* `tree`: building the cells, their databases and registries; crash and restart.
* `workload`: clients creating, acting on and deleting servers.
* `invariants`: what must hold once the faults stop and the tree settles.
* `run`: one whole run and its report.
"""
