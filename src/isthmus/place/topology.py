"""Round-trip times from an Internet Topology Zoo network in REPETITA's ``.graph`` format.

Format (Gay, Schaus, Vissicchio, "REPETITA", arXiv 1710.08665)::

    NODES <V>
    label x y                     # x = longitude, y = latitude
    <i>_<City> <lon> <lat>
    EDGES <E>
    label src dest weight bw delay
    edge_<k> <src> <dest> <weight> <bw kbit/s> <delay µs>

As the code of Sun et al. (arXiv 2512.21884) reads these files: only the ``delay`` column is used
(µs, one way), links are undirected, the one-way delay between two nodes is the shortest path
(Floyd–Warshall), and the round trip is twice that. Pure: parses text, reads no file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class GraphFormatError(ValueError):
    """The text is not a REPETITA ``.graph`` file; the message names the line."""


@dataclass(frozen=True, eq=False)
class Network:
    """Nodes of a topology and the round trip between every pair.

    Attributes:
        labels: node labels in file order (``0_Washington_CDC``, ...).
        lon_lat: ``(V, 2)`` coordinates in degrees (``0, 0`` where the Zoo has none).
        rtt_s: ``(V, V)`` round-trip times, seconds (``inf`` between disconnected nodes).
    """

    labels: tuple[str, ...]
    lon_lat: np.ndarray
    rtt_s: np.ndarray

    def index(self, name: str) -> int:
        """Node index of ``name``: a full label (``3_Miami``), the city part (``Miami``) or the
        number (``3``). Raises ``KeyError`` with the choices when unknown or ambiguous."""
        if name in self.labels:
            return self.labels.index(name)
        if name.isdigit() and int(name) < len(self.labels):
            return int(name)
        hits = [k for k, lab in enumerate(self.labels) if lab.split("_", 1)[-1] == name]
        if len(hits) == 1:
            return hits[0]
        raise KeyError(f"{'ambiguous' if hits else 'unknown'} node {name!r}; nodes: {', '.join(self.labels[:8])}"
                       + (", ..." if len(self.labels) > 8 else ""))


def all_pairs_shortest(weights: np.ndarray) -> np.ndarray:
    """Floyd–Warshall on a dense matrix (``inf``: no link), vectorised over one pivot at a time."""
    dist = np.array(weights, dtype=float)
    np.fill_diagonal(dist, 0.0)
    for k in range(dist.shape[0]):
        np.minimum(dist, dist[:, k: k + 1] + dist[k: k + 1, :], out=dist)
    return dist


def parse_graph(text: str) -> Network:
    """Parse a REPETITA ``.graph`` document.

    Raises:
        GraphFormatError: a missing section, a bad count, a malformed line or a link to an unknown node.
    """
    lines = text.splitlines()
    pos = 0

    def section(keyword: str) -> int:
        nonlocal pos
        while pos < len(lines) and not lines[pos].strip():
            pos += 1
        if pos >= len(lines):
            raise GraphFormatError(f"no '{keyword}' section")
        parts = lines[pos].split()
        if len(parts) != 2 or parts[0] != keyword or not parts[1].isdigit():
            raise GraphFormatError(f"line {pos + 1}: expected '{keyword} <count>', got {lines[pos].strip()!r}")
        pos += 2  # the count line and the column header
        return int(parts[1])

    def rows(count: int, columns: int, what: str) -> list[tuple[int, list[str]]]:
        nonlocal pos
        out: list[tuple[int, list[str]]] = []
        for _ in range(count):
            if pos >= len(lines):
                raise GraphFormatError(f"file ends after {len(out)} of {count} {what}")
            parts = lines[pos].split()
            if len(parts) != columns:
                raise GraphFormatError(f"line {pos + 1}: expected {columns} columns for a {what[:-1]}, "
                                       f"got {len(parts)}")
            out.append((pos + 1, parts))
            pos += 1
        return out

    n = section("NODES")
    nodes = rows(n, 3, "nodes")
    if n < 1:
        raise GraphFormatError("no nodes")
    labels = tuple(p[0] for _, p in nodes)
    try:
        coords = np.array([[float(p[1]), float(p[2])] for _, p in nodes])
    except ValueError as exc:
        raise GraphFormatError(f"bad node coordinate: {exc}") from None
    e = section("EDGES")
    one_way = np.full((n, n), np.inf)
    for line_no, p in rows(e, 6, "edges"):
        try:
            src, dst, delay_us = int(p[1]), int(p[2]), float(p[5])
        except ValueError:
            raise GraphFormatError(f"line {line_no}: src, dest must be integers and delay a number") from None
        if not (0 <= src < n and 0 <= dst < n):
            raise GraphFormatError(f"line {line_no}: link {src} -> {dst} names a node outside 0..{n - 1}")
        if not (delay_us >= 0 and np.isfinite(delay_us)):
            raise GraphFormatError(f"line {line_no}: delay must be a number >= 0")
        d = delay_us * 1e-6
        one_way[src, dst] = min(one_way[src, dst], d)
        one_way[dst, src] = min(one_way[dst, src], d)
    return Network(labels=labels, lon_lat=coords, rtt_s=2.0 * all_pairs_shortest(one_way))
