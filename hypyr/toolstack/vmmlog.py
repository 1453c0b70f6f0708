"""A domain process's own log, ``vmm.log``: rotated in place, with stdout and stderr following it."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
from collections.abc import Sequence

from hypyr.toolstack import logs, paths

log = logging.getLogger("hypyr.domain")


class VmmLogHandler(logging.handlers.RotatingFileHandler):
    """``vmm.log``, rotated at ``max_bytes`` (one old part, ``vmm.log.1``, is kept); those of
    ``fds`` (stdout, stderr: where only crashes still write) that were on the log move to each
    new file, so nothing keeps growing the old one."""

    def __init__(self, path: os.PathLike, max_bytes: int, fds: Sequence[int] = (1, 2)):
        super().__init__(path, maxBytes=max_bytes, backupCount=1, encoding="utf-8")
        self.fds = tuple(fds)

    def doRollover(self) -> None:
        follow = []
        for fd in self.fds:
            try:
                if self.stream and os.path.sameopenfile(fd, self.stream.fileno()):
                    follow.append(fd)
            except OSError:
                pass
        super().doRollover()
        for fd in follow:
            if self.stream is not None:
                os.dup2(self.stream.fileno(), fd)


def log_to_vmm_log(domid: int) -> None:
    """Log onto the domain's vmm.log through VmmLogHandler, as are uncaught exceptions in threads
    and warnings; stderr (also vmm.log, from `create`) is then only written by a crash."""
    handler: logging.Handler
    try:
        handler = VmmLogHandler(paths.vmm_log(domid), paths.log_max_bytes())
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    logs.setup(logging.INFO, handler)
    logging.captureWarnings(True)

    def thread_died(a: threading.ExceptHookArgs) -> None:
        if a.exc_type is not SystemExit:
            log.error("thread %s died", a.thread.name if a.thread else "?",
                      exc_info=a.exc_value)
    threading.excepthook = thread_died
