"""The user's terminal as a guest console: raw mode while attached, input pumped to a device,
and output that never blocks its writer (``OutputQueue``).

Ctrl-] (0x1d) is the escape: it ends the session (the caller decides what that means).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from typing import Any

ESCAPE = 0x1D  # Ctrl-]
OUTPUT_LIMIT = 256 << 10  # bytes an OutputQueue holds for a reader that does not keep up
DROP_WARN_INTERVAL = 10.0  # seconds between two warnings about one queue's dropped bytes
# An OutputQueue woken for less than BATCH_BYTES waits BATCH_S for the rest of the burst: a UART
# hands over one byte per exit, and waking the drain thread for each cost two thread switches per
# byte (and, in the lab, an IPI each: docs/lab.md, "QEMU's L2 guests fault too").
BATCH_S = 0.005
BATCH_BYTES = 4096

log = logging.getLogger(__name__)


class Terminal:
    """Puts a tty into raw mode for the duration of a ``with`` block; a no-op for non-ttys, when
    not ``attach``ed, and for a background job (:attr:`background`: changing or reading its
    terminal would stop it with SIGTTOU/SIGTTIN, e.g. under timeout(1), which looks like a hang)."""

    def __init__(self, fd: int | None = None, attach: bool = True):
        self.fd = sys.stdin.fileno() if fd is None else fd
        tty_in = os.isatty(self.fd)
        self.background = tty_in and _background(self.fd)
        self.is_tty = attach and tty_in and not self.background
        self._saved: list[Any] | None = None  # the termios attributes to restore

    def __enter__(self) -> Terminal:
        if self.is_tty:
            self._saved = _no_eintr(termios.tcgetattr, self.fd)
            _no_eintr(tty.setraw, self.fd, termios.TCSANOW)
            # keep output post-processing off too: the guest sends its own \r\n
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            _no_eintr(termios.tcsetattr, self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None


def _background(fd: int) -> bool:
    """Whether this process is not in the foreground process group of the terminal ``fd``."""
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:  # not our controlling terminal: job control does not apply
        return False


def _no_eintr(fn, *args):
    """Call a termios function again when a signal interrupted it (Python does not retry these:
    a SIGTERM while `hypyr run` set up its terminal raised EINTR)."""
    while True:
        try:
            return fn(*args)
        except termios.error as e:
            if e.args[0] != errno.EINTR:
                raise


class InputPump:
    """Reads the host's stdin in a thread and feeds it to ``sink`` (which returns bytes taken)."""

    def __init__(self, sink: Callable[[bytes], int], room: Callable[[], int], on_escape: Callable[[], None],
                 fd: int | None = None, escape: bool = True):
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.sink, self.room, self.on_escape, self.escape = sink, room, on_escape, escape
        self._r, self._w = os.pipe()
        self._thread = threading.Thread(target=self._main, name="console-input", daemon=True)

    def start(self) -> InputPump:
        self._thread.start()
        return self

    def stop(self) -> None:
        try:
            os.write(self._w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=1)
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _main(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd, self._r], [], [])
            except (OSError, ValueError):
                return
            if self._r in ready:
                return
            try:
                data = os.read(self.fd, 1024)
            except OSError:
                return
            if not data:
                return  # EOF: the guest just gets no more input
            if self.escape and ESCAPE in data:
                data = data[:data.index(ESCAPE)]
                self._feed(data)
                self.on_escape()
                return
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        while data:
            if self.room() <= 0:
                time.sleep(0.01)  # back-pressure: the guest is not reading
                continue
            n = self.sink(data)
            data = data[n:]


class OutputQueue:
    """A bounded buffer in front of a blocking ``send`` (a socket's ``sendall``, a write to a
    terminal), drained by its own thread, so that ``write`` never blocks: a vCPU thread can hand
    console output to a reader that stopped reading.

    Output goes out in bursts (BATCH_S, BATCH_BYTES), not byte by byte.
    Bytes that do not fit in ``limit`` are dropped (the newest ones), counted in ``dropped`` and
    warned about at most every DROP_WARN_INTERVAL seconds.  At most ``limit`` bytes wait in the
    buffer and as many in the one ``send`` under way.  When ``send`` raises OSError the queue is
    ``failed`` and takes nothing more.
    """

    def __init__(self, send: Callable[[bytes], object], limit: int = OUTPUT_LIMIT, name: str = "console-output"):
        self.name, self.limit = name, limit
        self.dropped = 0
        self.failed = False
        self._send = send
        self._buf = bytearray()
        self._closed = False
        self._cond = threading.Condition()
        self._warned = -DROP_WARN_INTERVAL
        self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> int:
        """Queue ``data``; return how many of its bytes were taken (the rest are dropped)."""
        with self._cond:
            if self._closed or self.failed:
                return 0
            n = min(len(data), self.limit - len(self._buf))
            if n > 0:
                if not self._buf:
                    self._cond.notify()   # the drain thread waits for bytes only when there are none
                self._buf += data[:n]
            lost = len(data) - max(n, 0)
            self.dropped += lost
            dropped = self.dropped
        if lost and time.monotonic() - self._warned >= DROP_WARN_INTERVAL:
            self._warned = time.monotonic()
            log.warning("%s is not keeping up: %d bytes of console output dropped so far", self.name, dropped)
        return max(n, 0)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._buf)

    def close(self, timeout: float = 0.0) -> None:
        """Take no more bytes; give the pending ones ``timeout`` seconds to go out, drop the rest."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            self.dropped += len(self._buf)
            self._buf.clear()

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._closed:
                    self._cond.wait()
                if self._buf and not self._closed and len(self._buf) < BATCH_BYTES:
                    self._cond.wait(BATCH_S)   # the rest of the burst joins it (close() ends the wait)
                if not self._buf:
                    return
                chunk = bytes(self._buf)
                self._buf.clear()
            try:
                self._send(chunk)
            except OSError:
                with self._cond:
                    self.failed = True
                    self.dropped += len(self._buf)
                    self._buf.clear()
                return


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (waiting, if ``fd`` is non-blocking, until it
    takes more)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
