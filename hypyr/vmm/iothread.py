"""One I/O thread per VM: waits on eventfds (KVM ioeventfds for virtqueue notifications) and
runs their handlers, so device work happens off the vCPU threads and a notification costs the
guest no exit to userspace."""

from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import Callable

log = logging.getLogger("hypyr.vmm.io")


class IoThread:
    def __init__(self, name: str = "io"):
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._stopping = False
        self._fds: list[int] = []

    def add_eventfd(self, handler: Callable[[], None]) -> int:
        """Create an eventfd whose signals call ``handler`` on this thread; return the fd."""
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(fd)
        self._sel.register(fd, selectors.EVENT_READ, handler)
        return fd

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sel.close()
        for fd in self._fds + [self._wake_r, self._wake_w]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def _main(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select():
                if key.data is None:
                    continue
                try:
                    os.eventfd_read(key.fd)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                try:
                    key.data()
                except Exception:  # a device bug must not kill the I/O thread
                    log.exception("I/O handler failed")
