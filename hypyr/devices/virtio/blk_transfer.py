"""virtio-blk's data path: the record of a popped request, and the IN/OUT data moved between its
descriptor chain and the image file (``preadv``/``pwritev``, straight from the descriptor table
for the usual layout, else by range lists in bounded syscalls).

Kept apart from the device (blk.py: queue, generations, groups, completion), which checks a
request and then calls :func:`transfer` with the image's descriptor and a ``check`` that raises
to abandon the request (the device was reset) before each syscall.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable

from hypyr.libc import IOV_MAX
from hypyr.memory import GuestMemory

from .blk_spec import HEADER, HEADER_SIZE, VIRTIO_BLK_S_IOERR
from .chain import DescriptorChain
from .queue import SplitQueue

IO_CHUNK = 4 << 20                       # at most this many bytes per preadv/pwritev/pwrite


class Request:
    """A popped chain: the generation and queue it belongs to, its header (read once, at pop
    time), the bytes written into its writable buffers, its status."""

    __slots__ = ("gen", "queue", "mem", "chain", "header", "written", "status")

    def __init__(self, gen: int, queue: SplitQueue, mem: GuestMemory, chain: DescriptorChain,
                 header: tuple[int, int, int] | None):
        self.gen = gen
        self.queue = queue
        self.mem = mem
        self.chain = chain
        self.header = header  # (type, reserved, sector), read once; None if too short
        self.written = 0      # bytes written into the chain's writable buffers
        self.status = VIRTIO_BLK_S_IOERR


def read_request_header(mem: GuestMemory, chain: DescriptorChain) -> tuple[int, int, int] | None:
    """(type, reserved, sector), read once; None if the chain has fewer than 16 readable bytes."""
    if chain.nread:
        addr, length = chain.table_buffer(0)
        if length >= HEADER_SIZE:  # the first (readable) buffer holds it (the usual layout)
            return HEADER.unpack(mem.read(addr, HEADER_SIZE))
    if chain.readable_len < HEADER_SIZE:
        return None
    return HEADER.unpack(chain.read(mem, HEADER_SIZE))


def transfer(req: Request, fd: int, offset: int, nbytes: int, into_guest: bool,
             check: Callable[[Request], None]) -> int:
    """``preadv`` the image (``fd``) at ``offset`` into the request's data buffers (``into_guest``),
    or ``pwritev`` them to it, ``nbytes`` in all; returns the bytes moved (fewer only at the end
    of the file, for reads).  The usual layout goes straight from the descriptor table
    (:func:`_transfer_table`); the rest, or all of a request in any other layout, goes by
    range lists, in syscalls bounded by IO_CHUNK bytes and IOV_MAX buffers.  ``check(req)`` runs
    before each syscall (it raises if the request's generation is no longer current)."""
    done = _transfer_table(req, fd, offset, nbytes, into_guest, check)
    if done == nbytes:
        return done
    chain = req.chain
    left = nbytes - done
    ranges = (chain.writable_ranges(done, left) if into_guest
              else chain.readable_ranges(HEADER_SIZE + done, left))
    if left <= IO_CHUNK and len(ranges) <= IOV_MAX:
        # the usual case: one syscall, whose byte total is known
        chunks: Iterable[tuple[list[tuple[int, int]], int]] = ((ranges, left),)
    else:
        chunks = _split_ranges(ranges, IO_CHUNK, IOV_MAX)
    for chunk, size in chunks:
        n, eof = _transfer_chunk(req, fd, chunk, size, offset + done, into_guest, check)
        done += n
        if into_guest:
            req.written = done
        if eof:
            break
    return done


def _transfer_table(req: Request, fd: int, offset: int, nbytes: int, into_guest: bool,
                    check: Callable[[Request], None]) -> int:
    """One ``preadv_descs``/``pwritev_descs`` straight from the chain's descriptor table, no
    range lists, when the request has the usual layout (a 16-byte header buffer, the data
    buffers, a 1-byte status buffer) and fits one syscall; returns the bytes moved (0 when
    this does not apply: :func:`transfer` then does it all)."""
    chain = req.chain
    t = chain.table
    if not 0 < nbytes <= IO_CHUNK or t[2] != HEADER_SIZE or t[-2] != 1:
        return 0
    count = len(t) >> 2
    if chain.nread != (1 if into_guest else count - 1):
        return 0
    check(req)
    op = req.mem.preadv_descs if into_guest else req.mem.pwritev_descs
    r = op(fd, t, 1, count - 2, offset)
    if not r:
        return 0  # None (not for this RAM layout) or 0: the range path goes on (and reports)
    if into_guest:
        req.written = r
    return r


def _split_ranges(ranges: list[tuple[int, int]], chunk_max: int, iov_max: int):
    """Yield (ranges, their byte total) of at most ``chunk_max`` bytes and ``iov_max`` entries."""
    chunk: list[tuple[int, int]] = []
    size = 0
    for addr, n in ranges:
        while n:
            take = min(n, chunk_max - size)
            chunk.append((addr, take))
            size += take
            addr += take
            n -= take
            if size == chunk_max or len(chunk) == iov_max:
                yield chunk, size
                chunk, size = [], 0
    if chunk:
        yield chunk, size


def _transfer_chunk(req: Request, fd: int, ranges: list[tuple[int, int]], left: int, offset: int,
                    into_guest: bool, check: Callable[[Request], None]) -> tuple[int, bool]:
    """One chunk of ``left`` bytes: ``GuestMemory.preadv``/``pwritev`` (every range checked
    there), looping on short transfers; returns the bytes moved and whether the end of the
    file was met first (reads only)."""
    mem = req.mem
    op = mem.preadv if into_guest else mem.pwritev
    done = 0
    while left:
        check(req)  # reset: start no more I/O for this request
        r = op(fd, ranges, offset + done)
        if r <= 0:
            if into_guest:
                return done, True
            raise OSError(errno.EIO, "short write")
        done += r
        left -= r
        if not left:
            break
        i = 0
        while r:  # skip what was transferred; the first partly done range is cut
            addr, n = ranges[i]
            if r >= n:
                r -= n
                i += 1
            else:
                ranges = [(addr + r, n - r)] + ranges[i + 1:]
                i = 0
                r = 0
        if i:
            ranges = ranges[i:]
    return done, False
