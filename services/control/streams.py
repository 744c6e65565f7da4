"""Long responses with bounded cost: a folder streamed as tar.gz while it is packed, and slots that cap
how many such responses (downloads, event streams) run at once.

`TarGzStream` packs in a thread of its own into a queue of a few 1 MiB chunks that the response drains:
the archive is never built whole, on disk or in memory, and a client that reads slowly holds the packer
back instead of growing a buffer. `Slot` is one of a bounded number of permits; it is released when the
response ends, and, as a backstop, when the response is dropped without ever starting.
"""

from __future__ import annotations

import queue
import tarfile
import threading
import zlib
from pathlib import Path

CHUNK_BYTES = 1 << 20
QUEUED_CHUNKS = 4


class Slot:
    """A permit taken from `semaphore` (`Slot.take` -> None when none is free); `release` is idempotent."""

    def __init__(self, semaphore: threading.BoundedSemaphore) -> None:
        self._semaphore: threading.BoundedSemaphore | None = semaphore

    @classmethod
    def take(cls, semaphore: threading.BoundedSemaphore) -> Slot | None:
        return cls(semaphore) if semaphore.acquire(blocking=False) else None

    def release(self) -> None:
        semaphore, self._semaphore = self._semaphore, None
        if semaphore is not None:
            semaphore.release()

    __del__ = release


class _Cancelled(Exception):
    pass


class TarGzStream:
    """`folder` as a gzip-compressed tar (members under `arcname`), produced chunk by chunk (`next_chunk`)."""

    def __init__(self, folder: Path, arcname: str, slot: Slot | None = None, level: int = 6) -> None:
        self.folder, self.arcname, self.slot = folder, arcname, slot
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(QUEUED_CHUNKS)
        self._cancelled = threading.Event()
        self._zip = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: a gzip member
        self._pending = bytearray()
        self._thread: threading.Thread | None = None

    # ---- the packer (its own thread) -------------------------------------------------------
    def write(self, data: bytes) -> int:  # what tarfile writes to
        self._pending += self._zip.compress(data)
        if len(self._pending) >= CHUNK_BYTES:
            self._put(bytes(self._pending))
            self._pending.clear()
        return len(data)

    def _put(self, item: bytes | BaseException | None) -> None:
        while True:
            if self._cancelled.is_set():
                raise _Cancelled
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _pack(self) -> None:
        try:
            with tarfile.open(fileobj=self, mode="w|") as tar:  # type: ignore[call-overload]
                tar.add(self.folder, arcname=self.arcname)
            self._pending += self._zip.flush()
            if self._pending:
                self._put(bytes(self._pending))
            self._put(None)
        except _Cancelled:
            pass
        except Exception as err:  # noqa: BLE001 -- handed to the response, which ends the stream early
            try:
                self._put(err)
            except _Cancelled:
                pass

    # ---- the response ----------------------------------------------------------------------
    def next_chunk(self) -> bytes | None:
        """The next piece of the archive (blocks while it is packed); None at the end."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._pack, name="student-archive", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop packing and give back the slot (a client that left, or the end)."""
        self._cancelled.set()
        if self.slot is not None:
            self.slot.release()

    __del__ = close
