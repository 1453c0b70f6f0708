"""The user's terminal as a guest console: raw mode while attached, input pumped to a device.

Ctrl-] (0x1d) is the escape: it ends the session (the caller decides what that means).
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import time
import tty
from typing import Callable

ESCAPE = 0x1D  # Ctrl-]


class Terminal:
    """Puts a tty into raw mode for the duration of a ``with`` block; a no-op for non-ttys."""

    def __init__(self, fd: int | None = None):
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.is_tty = os.isatty(self.fd)
        self._saved = None

    def __enter__(self) -> "Terminal":
        if self.is_tty:
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
            # keep output post-processing off too: the guest sends its own \r\n
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None


class InputPump:
    """Reads the host's stdin in a thread and feeds it to ``sink`` (which returns bytes taken)."""

    def __init__(self, sink: Callable[[bytes], int], room: Callable[[], int], on_escape: Callable[[], None],
                 fd: int | None = None, escape: bool = True):
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.sink, self.room, self.on_escape, self.escape = sink, room, on_escape, escape
        self._r, self._w = os.pipe()
        self._thread = threading.Thread(target=self._main, name="console-input", daemon=True)

    def start(self) -> "InputPump":
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
