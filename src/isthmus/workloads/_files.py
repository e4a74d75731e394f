"""Opening trace files, plain or gzipped, with errors that name the file and the line."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

from isthmus.core.errors import TraceError

_GZIP_MAGIC = b"\x1f\x8b"

PathLike = str | os.PathLike[str]


@contextmanager
def open_binary(path: PathLike) -> Iterator[IO[bytes]]:
    """Open ``path`` for reading bytes, decompressing it on the fly when it is gzipped.

    Compression is recognised by the gzip magic number, not by the file name. A missing or
    unreadable file raises :class:`TraceError` naming the path.
    """
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the with-block below
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with raw:
        try:
            magic = raw.read(2)
            raw.seek(0)
        except OSError as exc:
            raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if magic == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield cast(IO[bytes], unzipped)
        else:
            yield raw


def numbered_lines(lines: Iterable[bytes], path: PathLike) -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, line)`` pairs; a read or decompression failure becomes a TraceError."""
    lineno = 0
    try:
        for lineno, line in enumerate(lines, 1):
            yield lineno, line
    except (OSError, EOFError, zlib.error) as exc:
        raise TraceError(f"{path}:{lineno + 1}: unreadable data: {exc}") from None


def resolve(path: PathLike, base_dir: Path) -> Path:
    """``path`` itself when absolute, else ``base_dir / path``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base_dir / p
