"""A look inside a wedged L1 before it is killed: QEMU's human monitor on a unix socket.

When the lab's watchdog gives up on L1, the runner asks QEMU for the state of L1's CPUs and prints
one line per CPU (where it was, in which privilege level, halted or not, and the L1 kernel symbol
for that address when L1's symbol table is known). The nested-KVM-under-TCG wedges this is for
leave no kernel message, so this is the only trace they leave in a CI log.
"""

from __future__ import annotations

import bisect
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

PROMPT = b"(qemu) "


def query(sock_path: str | Path, commands: list[str], timeout: float = 5.0) -> str | None:
    """Run HMP commands; their output, or None if QEMU does not answer in time."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            out = []
            _read_to_prompt(s, deadline)  # the banner
            for cmd in commands:
                s.sendall(cmd.encode() + b"\n")
                out.append(_read_to_prompt(s, deadline))
            return "".join(out)
    except (OSError, TimeoutError):
        return None


def _read_to_prompt(s: socket.socket, deadline: float) -> str:
    buf = b""
    while not buf.endswith(PROMPT):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        s.settimeout(left)
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("monitor closed")
        buf += chunk
    # HMP echoes the command line with terminal escapes; keep the answer's lines only.
    text = buf[: -len(PROMPT)].decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return text


@dataclass(frozen=True)
class CpuState:
    index: int
    rip: int
    cpl: int
    halted: bool


_CPU = re.compile(r"^CPU#(\d+)", re.M)
_RIP = re.compile(r"RIP=([0-9a-f]+)\b.*?\bCPL=(\d)\b.*?\bHLT=(\d)", re.S)


def parse_registers(text: str) -> list[CpuState]:
    """The CPUs in `info registers -a` output."""
    heads = list(_CPU.finditer(text))
    cpus = []
    for n, h in enumerate(heads):
        block = text[h.end(): heads[n + 1].start() if n + 1 < len(heads) else len(text)]
        m = _RIP.search(block)
        if m:
            cpus.append(CpuState(int(h.group(1)), int(m.group(1), 16), int(m.group(2)), m.group(3) == "1"))
    return cpus


class Symbols:
    """L1 kernel text symbols from a /proc/kallsyms copy (L1 boots with nokaslr, so they hold)."""

    def __init__(self, entries: list[tuple[int, str]]):
        entries.sort()
        self.addrs = [a for a, _ in entries]
        self.names = [n for _, n in entries]

    @classmethod
    def load(cls, path: Path) -> Symbols | None:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return None
        entries = []
        for line in lines:
            f = line.split()
            if len(f) >= 3 and f[1] in "tTwW":
                try:
                    entries.append((int(f[0], 16), f[2]))
                except ValueError:
                    continue
        return cls(entries) if entries else None

    def lookup(self, addr: int) -> str | None:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or addr - self.addrs[i] > 0x100000:
            return None
        return f"{self.names[i]}+{addr - self.addrs[i]:#x}"


def describe(cpus: list[CpuState], symbols: Symbols | None) -> list[str]:
    lines = []
    for c in cpus:
        where = "user mode" if c.cpl == 3 else "kernel mode"
        sym = symbols.lookup(c.rip) if symbols and c.cpl == 0 else None
        # A CPU running an L2 guest shows the guest's registers: a symbol is L1's only if it was in L1.
        lines.append(f"CPU {c.index}: RIP={c.rip:#018x} {where}{', halted' if c.halted else ''}"
                     + (f" ({sym} if in L1's kernel)" if sym else ""))
    return lines
