"""Guest RAM in the record stream: PAGES records of data, ZERO runs for pages that read as zeros
(sent as their addresses only), the sender's and the loader's side; a loaded range is checked
against the VM's RAM layout first.  Used by save/restore (hypyr.vmm.snapshot) and live migration
(hypyr.vmm.migration)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from hypyr.errors import SnapshotError
from hypyr.memory import GuestMemory

from .stream import MAX_RUN, PAGE, Rec, StreamWriter, pages_head, parse_zero, zero_payload

_ZERO_PAGE = bytes(PAGE)
_ZERO_RUN = bytes(MAX_RUN * PAGE)
_MAX_ZERO_RUN = 1 << 31  # pages in one ZERO run


def page_runs(pages: Sequence[int], limit: int = MAX_RUN):
    """(first, count) runs of consecutive page numbers in ``pages`` (sorted, no repeats), at
    most ``limit`` long.  Each run's end is found by bisection: ``pages[j] - pages[i] == j - i``
    holds exactly while ``pages[i:j + 1]`` is consecutive."""
    i, n = 0, len(pages)
    while i < n:
        lo, hi = i + 1, min(i + limit, n)  # the run is pages[i:lo] at least, pages[i:hi] at most
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if pages[mid - 1] - pages[i] == mid - 1 - i:
                lo = mid
            else:
                hi = mid - 1
        yield pages[i], lo - i
        i = lo


def zero_pages(data: bytes) -> bytearray:
    """One flag per page of ``data``: 1 if it reads as zeros.  A zero page starts with a zero
    byte, so only such pages are compared in full (guest RAM rarely has many).  (bytes, not a
    memoryview: comparing a memoryview goes byte by byte, ~30x slower than memcmp.)"""
    n = len(data) // PAGE
    if len(data) == len(_ZERO_RUN) and data == _ZERO_RUN:
        return bytearray(b"\x01" * n)
    flags = bytearray(n)
    firsts = data[::PAGE]
    k = firsts.find(0)
    while k >= 0:
        if data.startswith(_ZERO_PAGE, k * PAGE):
            flags[k] = 1
        k = firsts.find(0, k + 1)
    return flags


class PageSender:
    """Writes guest RAM as PAGES records, pages that read as zeros as ZERO runs (no data)."""

    def __init__(self, writer: StreamWriter, memory: GuestMemory, tick: Callable[[], None] | None = None):
        self.w, self.mem, self._tick = writer, memory, tick
        self.data_pages = 0
        self.zero_pages = 0
        self._zero: list[list[int]] = []

    def send_all(self) -> None:
        for r in self.mem.regions:
            self._send_range(int(r.start), r.size // PAGE)
        self.flush()

    def send_dirty(self, dirty: Sequence[Sequence[int]]) -> int:
        """Send the pages ``dirty`` lists per region (sorted page indices); return how many."""
        total = 0
        for r, pages in zip(self.mem.regions, dirty):
            for first, count in page_runs(pages):
                self._send_range(int(r.start) + first * PAGE, count)
            total += len(pages)
        self.flush()
        return total

    def flush(self) -> None:
        if self._zero:
            self.w.record(Rec.ZERO, zero_payload([(a, n) for a, n in self._zero]))
            self._zero = []

    def _send_range(self, gpa: int, npages: int) -> None:
        for off in range(0, npages, MAX_RUN):
            n = min(MAX_RUN, npages - off)
            base = gpa + off * PAGE
            data = self.mem.read(base, n * PAGE)
            zero = zero_pages(data)
            i = 0
            while i < n:  # runs of data pages as PAGES, of zero pages as ZERO
                j = zero.find(zero[i] ^ 1, i)
                j = n if j < 0 else j
                if zero[i]:
                    self._add_zero(base + i * PAGE, j - i)
                else:
                    self.w.record(Rec.PAGES, pages_head(base + i * PAGE, j - i),
                                  memoryview(data)[i * PAGE:j * PAGE])
                    self.data_pages += j - i
                i = j
            if self._tick is not None:
                self._tick()

    def _add_zero(self, gpa: int, n: int) -> None:
        self.zero_pages += n
        last = self._zero[-1] if self._zero else None
        if last is not None and last[0] + last[1] * PAGE == gpa and last[1] + n <= _MAX_ZERO_RUN:
            last[1] += n
            return
        self._zero.append([gpa, n])
        if len(self._zero) >= 65536:
            self.flush()


class PageLoader:
    """Puts PAGES and ZERO records into guest RAM, each range checked against its layout."""

    def __init__(self, memory: GuestMemory, what: str):
        self.mem, self.what = memory, what
        self._starts = [int(r.start) for r in memory.regions]
        self._written = [bytearray(r.size // PAGE) for r in memory.regions]  # pages holding data
        self.pages = 0

    def pages_into(self, gpa: int, count: int) -> memoryview:
        """Where the ``count`` pages of a PAGES record at ``gpa`` go: a view of that guest RAM
        (SnapshotError if it is not), for the stream to read them into."""
        i, first = self._locate(gpa, count)
        self._written[i][first:first + count] = b"\x01" * count
        self.pages += count
        view, = self.mem.views([(gpa, count * PAGE)])  # (one region: _locate checked)
        return view

    def put_zero(self, payload: bytes) -> None:
        for gpa, count in parse_zero(payload, self.what):
            i, first = self._locate(gpa, count)
            marks = self._written[i]
            self.pages += count
            if marks.find(1, first, first + count) < 0:
                continue  # never written: reads as zeros already
            for off in range(0, count, MAX_RUN):  # a page sent earlier in a migration, zero now
                n = min(MAX_RUN, count - off)
                if marks.find(1, first + off, first + off + n) >= 0:
                    self.mem.write(gpa + off * PAGE, memoryview(_ZERO_RUN)[:n * PAGE])
            marks[first:first + count] = bytes(count)

    def _locate(self, gpa: int, count: int) -> tuple[int, int]:
        i = bisect.bisect_right(self._starts, gpa) - 1
        r = self.mem.regions[i] if i >= 0 else None
        if r is None or not r.contains(gpa, count * PAGE):
            raise SnapshotError(f"{self.what} is corrupt (pages at {gpa:#x}+{count * PAGE:#x} are not guest RAM)")
        return i, (gpa - int(r.start)) // PAGE
