"""Block placement and request routing for pipelined (PETALS-style) inference across the Internet.

A model too big for one server is split into runs of consecutive transformer blocks held by servers
that may be far apart; each session walks a chain of them. Which blocks each server holds and how
sessions are routed decide the inference time. This package implements Sun, He, Ji and Parag,
"Optimizing Resource Allocation for Geographically-Distributed Inference by Large Language Models"
(arXiv 2512.21884) and compares it with PETALS' own rule and with the optimum:

- :mod:`~isthmus.place.model`: servers, clients, RTTs, model, session shape; the time and memory model.
- :mod:`~isthmus.place.algorithms`: PETALS' rule, CG-BPRR with its Theorem 2 bound, a local search.
- :mod:`~isthmus.place.milp`: the joint MILP, solved by HiGHS (scipy), status checked.
- :mod:`~isthmus.place.verify`: an independent feasibility check of every solution.
- :mod:`~isthmus.place.simulate`: Poisson sessions on a placement, WS-RR / PETALS routing, caches, back-off.
- :mod:`~isthmus.place.topology`: RTTs from Internet Topology Zoo networks (REPETITA ``.graph`` files).
- :mod:`~isthmus.place.config`, :mod:`~isthmus.place.run`, :mod:`~isthmus.place.report`,
  :mod:`~isthmus.place.plot`, :mod:`~isthmus.place.cli`: the ``isthmus place`` command.

The model, algorithm, simulator and topology modules do no I/O and take time and randomness as
arguments.
"""

from isthmus.place.model import Instance, LinkCost, ModelSpec, Placement, PlacementError, Route

__all__ = ["Instance", "LinkCost", "ModelSpec", "Placement", "PlacementError", "Route"]
