"""A tiny static x86-64 program, `hypyr-exit N`, that writes the byte N to hypyr's exit port.

The guest reports its exit status with a one-byte `out` to I/O port 0xf4. The Debian cloud
kernel has no /dev/port (CONFIG_DEVPORT is off), so busybox cannot do that write; this helper
does it with ioperm(2) + `out`. It is built here as bytes (no compiler needed) so the image
stays reproducible.

Behaviour: parse argv[1] as a decimal number (missing -> 0), ioperm(0xf4, 1, 1), write the low
byte to port 0xf4, exit 0; exit 1 if ioperm fails.
"""

from __future__ import annotations

import struct

EXIT_PORT = 0xF4
LOAD_ADDR = 0x400000

# Assembled from (Intel syntax):
#   mov rsi,[rsp+16]; xor eax,eax; test rsi,rsi; jz done
#   1: movzx ecx,byte[rsi]; sub ecx,'0'; cmp ecx,9; ja done; imul eax,eax,10; add eax,ecx;
#      inc rsi; jmp 1b
#   done: mov ebx,eax; mov eax,173 (ioperm); mov edi,0xf4; mov esi,1; mov edx,1; syscall
#   test eax,eax; jnz fail; mov eax,ebx; mov edx,0xf4; out dx,al; mov eax,60; xor edi,edi; syscall
#   fail: mov eax,60; mov edi,1; syscall
CODE = bytes.fromhex(
    "488b74241031c04885f674150fb60e83e93083f909770a6bc00a01c848ffc6ebeb"
    "89c3b8ad000000bff4000000be01000000ba010000000f0585c0751189d8baf4000000ee"
    "b83c00000031ff0f05b83c000000bf010000000f05"
)


def exit_helper_elf() -> bytes:
    """The helper as a minimal static ELF64 executable (one PT_LOAD segment, no sections)."""
    ehsize, phsize = 64, 56
    entry = LOAD_ADDR + ehsize + phsize
    total = ehsize + phsize + len(CODE)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, ehsize, 0, 0, ehsize, phsize, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, LOAD_ADDR, LOAD_ADDR, total, total, 0x1000)
    return ehdr + phdr + CODE
