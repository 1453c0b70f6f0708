"""`hypyr console NAME`: attach this terminal to a domain's console (Ctrl-] detaches)."""

from __future__ import annotations

import os
import select
import sys

from hypyr.console import ESCAPE, Terminal
from hypyr.errors import HypyrError
from hypyr.toolstack.api import Control
from hypyr.toolstack.registry import Registry


def attach(name: str) -> int:
    reg = Registry()
    rec = reg.get(name)
    if not reg.is_alive(rec):
        raise HypyrError(f"domain {rec.name} is not running (state {rec.state})")
    ctl = Control(rec, timeout=None)
    ctl.call("console")
    sock = ctl.sock
    out = sys.stdout.fileno()
    inp = sys.stdin.fileno()
    if sys.stderr.isatty():
        sys.stderr.write(f"hypyr: attached to {rec.name}'s console; Ctrl-] detaches\r\n")
    with Terminal(inp) as term:
        fds = [sock, inp]
        try:
            while True:
                ready, _, _ = select.select(fds, [], [])
                if sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return 0  # the domain went away
                    os.write(out, data)
                if inp in ready:
                    data = os.read(inp, 4096)
                    if not data:
                        fds.remove(inp)  # stdin closed: keep showing output
                        continue
                    if term.is_tty and ESCAPE in data:
                        data = data[:data.index(ESCAPE)]
                        if data:
                            sock.sendall(data)
                        return 0
                    sock.sendall(data)
        except KeyboardInterrupt:
            return 0
        finally:
            ctl.close()
