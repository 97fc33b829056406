"""Upload bytes held safely: in memory up to a threshold and a per-process budget, else on disk.

The spool threshold alone bounds one upload, not a crowd: 200 concurrent uploads each
just under a 1 MB threshold would pin 200 MB. :class:`BufferBudget` bounds what all
uploads of a process keep in memory together; past it, bodies go to anonymous temporary
files. Nothing here reads or judges the bytes.
"""

from __future__ import annotations

import contextlib
import mmap
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final

#: Upload bytes one process keeps in memory, all uploads together (see BufferBudget).
MEMORY_BUDGET_BYTES: Final = 8 * 1024 * 1024


class BufferBudget:
    """Bytes of upload bodies this process holds in memory at once, all uploads together.

    The spool threshold alone bounds one upload, not a crowd: 200 concurrent uploads
    each just under a 1 MB threshold would pin 200 MB. Past the budget, a body goes to
    its spool file from the next chunk on, whatever its size.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class SpooledBody:
    """Bytes in memory up to a threshold (and within the process's budget), else in an
    anonymous temporary file (``O_TMPFILE`` on Linux: it has no name and vanishes on close).

    In memory, the chunks are kept as they were written — immutable ``bytes`` or read-only
    views of them, as the server handed them over — and joined only when the body is needed
    whole (:meth:`freeze`). Most bodies never are: a cache hit needs only the hash, so keeping
    instead of copying saves a copy of every upload that is answered from the cache.
    """

    def __init__(self, threshold: int, spool_dir: Path, budget: BufferBudget | None = None) -> None:
        self._threshold = threshold
        self._dir = spool_dir
        self._budget = budget or BufferBudget(threshold)
        self._parts: list[bytes | memoryview] = []
        self._held = 0  # bytes of the budget this body holds
        self._frozen: bytes | None = None
        self._file: IO[bytes] | None = None
        self.size = 0

    def write(self, chunk: bytes | memoryview) -> None:
        """Take ``chunk``: it must not change afterwards (``bytes``, or a view of ``bytes``)."""
        self.size += len(chunk)
        if self._file is None:
            if self.size <= self._threshold and self._budget.take(len(chunk)):
                self._held += len(chunk)
                self._parts.append(chunk)
                return
            self._file = tempfile.TemporaryFile(dir=self._dir)  # noqa: SIM115 - closed in close()
            self._file.writelines(self._parts)
            self._release_memory()
        self._file.write(chunk)

    def freeze(self) -> None:
        """The body is complete: keep in-memory bytes as one immutable ``bytes`` (sent as is,
        on every attempt, without a copy), or flush the spool file."""
        if self._file is not None:
            self._file.flush()
        elif self._frozen is None:
            self._frozen = b"".join(self._parts)
            self._parts = []

    @property
    def spooled(self) -> bool:
        return self._file is not None

    @contextlib.contextmanager
    def view(self) -> Iterator[memoryview | mmap.mmap]:
        """The whole (frozen) body, readable without a copy: an mmap while spooled.

        The mapping lives only as long as the ``with``: mapped pages of a spool file count
        in the process's RSS, and an upload waits seconds for ailabapi after inspection.
        """
        self.freeze()
        if self._file is None:
            assert self._frozen is not None
            with memoryview(self._frozen) as mv:
                yield mv
            return
        mapped = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            yield mapped
        finally:
            mapped.close()

    def content(self) -> bytes | IO[bytes]:
        """What the upstream client sends: bytes, or the rewound spool file (streamed by httpx)."""
        self.freeze()
        if self._file is None:
            assert self._frozen is not None
            return self._frozen
        self._file.seek(0)
        return self._file

    def _release_memory(self) -> None:
        self._budget.give(self._held)
        self._held = 0
        self._parts = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._release_memory()
        self._frozen = None
