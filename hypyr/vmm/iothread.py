"""One I/O thread per VM: waits on eventfds (KVM ioeventfds for virtqueue notifications) and
runs their handlers, so device work happens off the vCPU threads and a notification costs the
guest no exit to userspace.  The loop is a bare edge-triggered ``epoll`` (one dictionary lookup
per event, no read of the eventfd): it runs once per guest request."""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from hypyr.devices.ratelog import RateLimitedLog

log = logging.getLogger("hypyr.vmm.io")


class IoThread:
    def __init__(self, name: str = "io", seccomp: str = "off"):
        self.seccomp = seccomp  # the mode of the "io" filter the thread installs on itself
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._handlers: dict[int, Callable[[], None]] = {}
        self._owned_elsewhere: set[int] = set()  # fds from add_fd: not closed by stop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._stopping = False
        self._rlog = RateLimitedLog(log)  # a handler may fail on every request a guest makes

    def add_eventfd(self, handler: Callable[[], None]) -> int:
        """Create an eventfd whose signals call ``handler`` on this thread; return the fd."""
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._handlers[fd] = handler
        # edge-triggered: every signal of the eventfd is an event of its own, so its counter
        # need never be read (one system call less per request; it saturates, never fails)
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)
        return fd

    def add_fd(self, fd: int, handler: Callable[[], None]) -> None:
        """Call ``handler`` on this thread each time ``fd`` (which the caller owns and closes)
        becomes readable; edge-triggered, so the handler must read until EAGAIN or remember
        that it stopped early."""
        self._handlers[fd] = handler
        self._owned_elsewhere.add(fd)
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)

    def watch(self, fd: int, on: bool) -> None:
        """Stop (``on=False``) or resume watching ``fd`` (e.g. while vhost serves it).  A resumed
        descriptor gets one handler call, for whatever arrived meanwhile."""
        if fd not in self._handlers:
            return
        try:
            if on:
                self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)
            else:
                self._epoll.unregister(fd)
        except (FileExistsError, FileNotFoundError):
            return
        except OSError:
            return  # stopped meanwhile

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
        self._epoll.close()
        for fd in [f for f in self._handlers if f not in self._owned_elsewhere] + [self._wake_r, self._wake_w]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._handlers = {}
        self._owned_elsewhere = set()

    def _main(self) -> None:
        if self.seccomp != "off":
            from hypyr.vmm import seccomp
            try:
                seccomp.install("io", self.seccomp)   # block workers and timers it starts inherit it
            except Exception:
                log.exception("the I/O thread cannot confine itself: it serves no request")
                return
        poll, handlers = self._epoll.poll, self._handlers
        while not self._stopping:
            try:
                events = poll()
            except InterruptedError:
                continue
            except OSError:
                return
            for fd, _ in events:
                handler = handlers.get(fd)
                if handler is None:
                    continue  # the wake-up pipe: the loop condition decides
                try:
                    handler()
                except Exception:  # a device bug must not kill the I/O thread
                    self._rlog.exception("handler", "I/O handler failed")
