"""The queue of records not yet settled, mirrored to a JSON-lines spool file when it has a path.

The file is a log. A record is one line `{"sid": …, "record": {…}}`, appended and fsync'ed before
`record()` returns; a settled batch is one line `{"ack": [sid, …]}`, appended and fsync'ed. Once the
file holds more settled records than live ones (and at least `COMPACT_AFTER`), it is rewritten with
the live ones only: a temp file beside it, fsync'ed, then `os.replace` (atomic), then the directory
fsync'ed. Opening replays the log and compacts at once, so a line torn by a crash mid-append (skipped
on replay) is gone before anything is appended after it.

A `<spool>.lock` file, held with an exclusive `flock` while the queue is open, keeps two live clients
off one spool (`SpoolLocked`). Not thread-safe by itself: the ledger calls it under its lock.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import SpoolLocked
from .records import WireRecord

log = logging.getLogger("spendledger_client")

COMPACT_AFTER = 256


@dataclass(slots=True)
class Entry:
    sid: str
    record: WireRecord
    seq: int
    queued_at: float = field(default_factory=time.monotonic)
    in_flight: bool = False


class RecordQueue:
    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self._entries: dict[str, Entry] = {}
        self._seq = 0
        self._dead = 0  # record lines in the file whose records are settled
        self._path = None if path is None else os.fspath(path)
        self._file: IO[str] | None = None
        self._lock_file: IO[str] | None = None
        if self._path is not None:
            self._lock_file = _lock(self._path + ".lock")
            for sid, record in _replay(self._path):
                self._remember(sid, record)
            self._compact()

    @property
    def last_seq(self) -> int:
        return self._seq

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, record: WireRecord, *, in_flight: bool = False) -> Entry:
        sid = uuid.uuid4().hex
        self._append({"sid": sid, "record": record})
        entry = self._remember(sid, record)
        entry.in_flight = in_flight
        return entry

    def unsent(self) -> Iterator[Entry]:
        return (e for e in self._entries.values() if not e.in_flight)

    def oldest_seq(self) -> int | None:
        """The seq of the oldest unsettled record (in flight or not)."""
        return next((e.seq for e in self._entries.values()), None)

    def take(self, limit: int) -> list[Entry]:
        batch: list[Entry] = []
        for entry in self.unsent():
            if len(batch) == limit:
                break
            entry.in_flight = True
            batch.append(entry)
        return batch

    def release(self, entries: list[Entry]) -> None:
        for entry in entries:
            entry.in_flight = False

    def remove(self, entries: list[Entry]) -> None:
        gone = [e.sid for e in entries if self._entries.pop(e.sid, None) is not None]
        if not gone:
            return
        self._append({"ack": gone})
        self._dead += len(gone)
        if self._dead >= COMPACT_AFTER and self._dead > len(self._entries):
            self._compact()

    def close(self) -> None:
        for handle in (self._file, self._lock_file):
            if handle is not None:
                handle.close()  # closing the lock file's descriptor releases the flock
        self._file = self._lock_file = None

    def _remember(self, sid: str, record: WireRecord) -> Entry:
        self._seq += 1
        entry = Entry(sid=sid, record=record, seq=self._seq)
        self._entries[sid] = entry
        return entry

    def _append(self, line: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _compact(self) -> None:
        assert self._path is not None
        if self._file is not None:
            self._file.close()
        tmp = self._path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            for entry in self._entries.values():
                out.write(json.dumps({"sid": entry.sid, "record": entry.record}, separators=(",", ":")) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)
        _fsync_dir(os.path.dirname(os.path.abspath(self._path)))
        self._dead = 0
        self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 (held open: appended to for the queue's life)


def _replay(path: str) -> Iterator[tuple[str, WireRecord]]:
    """The live records of a spool log, in the order they were added."""
    live: dict[str, WireRecord] = {}
    torn = 0
    try:
        with open(path, encoding="utf-8") as spool:
            for line in spool:
                try:
                    item = json.loads(line)
                except ValueError:
                    torn += 1
                    continue
                if "ack" in item:
                    for sid in item["ack"]:
                        live.pop(sid, None)
                else:
                    live[item["sid"]] = item["record"]
    except FileNotFoundError:
        return
    if torn:
        log.warning("spool %s: %d unreadable line(s) skipped (a write torn by a crash)", path, torn)
    if live:
        log.info("spool %s: %d record(s) left by an earlier client, to send", path, len(live))
    yield from live.items()


def _lock(path: str) -> IO[str]:
    handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held open: the flock lives as long as it)
    if sys.platform != "win32":
        import fcntl

        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SpoolLocked(f"spool {path[: -len('.lock')]} is in use by another client") from None
    return handle


def _fsync_dir(directory: str) -> None:
    """The rename itself made durable (POSIX); directories cannot be opened for this on Windows."""
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
