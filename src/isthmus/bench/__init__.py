"""Benchmarking faces: the multi-region testbed (``isthmus testbed``) and the load generator
(``isthmus bench``).

Nothing here is imported by the other layers; ``bench`` starts the emulator and the router as
processes and talks to them over HTTP, through delay relays (:mod:`isthmus.bench.relay`) that give
loopback connections the latencies of a scenario's topology.
"""
