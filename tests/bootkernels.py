"""Tiny multiboot and PVH test kernels, built as bytes by the tests (no toolchain needed).

One 32-bit body, position-dependent at ``BASE`` (1 MiB + 4 KiB), serves the multiboot kernel
in both of its forms: an ELF32 with one PT_LOAD segment, and the a.out kludge (the raw body,
whose multiboot header gives the load addresses).  It checks the entry state (EAX magic,
paging and interrupts off), prints over COM1 (port 0x3f8) its greeting, the command line, the
boot loader name, the module count and each module's string and first 8 bytes, and reports
through hypyr's exit-status port (0xf4): 0x40 + the module count, or an error code:

    0x61 EAX is not 0x2BADB002     0x62 info flags lack mem/cmdline/mods/mmap/loader name
    0x63 mem_lower is not 639      0x64 paging is on      0x65 interrupts are on
    0x66 mmap_length is 0

The PVH kernel (an ELF64 with a XEN_ELFNOTE_PHYS32_ENTRY note) checks hvm_start_info (magic,
version 1, a memory map, paging off), prints its greeting, the command line, the module count
and the whole first module (the initrd), and reports 0x50 + the module count, or 0x71 bad
magic, 0x72 bad version, 0x73 no memory map, 0x74 paging on.

``MULTIBOOT_ASM`` and ``PVH_ASM`` are the sources (GNU as, Intel syntax, linked at ``BASE``);
``test_boot_kernel_bytes_match_their_assembly`` rebuilds them when binutils is installed.
"""

from __future__ import annotations

import struct

BASE = 0x101000
BSS_END = 0x104000          # both bodies put their stack top here, in memory the image's bss provides
MB_ENTRY = BASE + 0x20      # _start, after the 32-byte multiboot header
MB_MAGIC = 0x1BADB002
MB_FLAGS_ELF = 0x00000003   # page-aligned modules, memory info
MB_FLAGS_AOUT = 0x00010003  # ... and the a.out-kludge address fields

MULTIBOOT_ASM = """\
.intel_syntax noprefix
.code32
body:
  .long 0x1BADB002               # multiboot header: magic
  .long 0x00010003               #   flags (the ELF form patches 0x3 and the checksum)
  .long -(0x1BADB002 + 0x00010003)
  .long 0x101000                 #   header_addr
  .long 0x101000                 #   load_addr
  .long 0                        #   load_end_addr (patched)
  .long 0                        #   bss_end_addr (patched)
  .long 0x101020                 #   entry_addr
_start:
  mov esp, 0x104000
  mov esi, ebx
  mov ebp, eax
  mov edi, offset msg_hello
  call puts
  cmp ebp, 0x2BADB002
  mov bl, 0x61
  jne exit
  mov eax, cr0
  test eax, 0x80000000
  mov bl, 0x64
  jnz exit
  pushfd
  pop eax
  test eax, 0x200
  mov bl, 0x65
  jnz exit
  mov eax, [esi]
  and eax, 0x24d
  cmp eax, 0x24d
  mov bl, 0x62
  jne exit
  cmp dword ptr [esi+4], 639
  mov bl, 0x63
  jne exit
  cmp dword ptr [esi+44], 0
  mov bl, 0x66
  je exit
  mov edi, offset msg_cmd
  call puts
  mov edi, [esi+16]
  call puts
  mov edi, offset msg_name
  call puts
  mov edi, [esi+64]
  call puts
  mov edi, offset msg_mods
  call puts
  mov al, [esi+20]
  add al, 0x30
  out dx, al
  mov ecx, [esi+20]
  mov ebx, [esi+24]
mod_loop:
  test ecx, ecx
  jz done
  mov edi, offset msg_mod
  call puts
  mov edi, [ebx+8]
  call puts
  mov al, 0x3a
  out dx, al
  mov al, 0x20
  out dx, al
  mov edi, [ebx]
  lea ebp, [edi+8]
byte_loop:
  cmp edi, [ebx+4]
  jae mod_next
  cmp edi, ebp
  jae mod_next
  mov al, [edi]
  out dx, al
  inc edi
  jmp byte_loop
mod_next:
  add ebx, 16
  dec ecx
  jmp mod_loop
done:
  mov al, 0x0a
  out dx, al
  mov bl, [esi+20]
  add bl, 0x40
exit:
  mov al, bl
  out 0xf4, al
  cli
  hlt
  jmp exit
puts:
  mov dx, 0x3f8
puts_loop:
  mov al, [edi]
  test al, al
  jz puts_ret
  out dx, al
  inc edi
  jmp puts_loop
puts_ret:
  ret
msg_hello: .asciz "mb: hello from a multiboot kernel\\n"
msg_cmd: .asciz "cmdline="
msg_name: .asciz "\\nloader="
msg_mods: .asciz "\\nmods="
msg_mod: .asciz "\\nmod "
"""

MULTIBOOT_BODY = bytes.fromhex(
    "02b0ad1b03000100fb4f51e40010100000101000000000000000000020101000bc0040100089de89c5bf1b111000e8d9"
    "00000081fd02b0ad2bb3610f85c30000000f20c0a900000080b3640f85b30000009c58a900020000b3650f85a4000000"
    "8b06254d0200003d4d020000b3620f8590000000817e047f020000b3630f8581000000837e2c00b3667479bf3e111000"
    "e8770000008b7e10e86f000000bf47111000e8650000008b7e40e85d000000bf50111000e8530000008a46140430ee8b"
    "4e148b5e1885c97432bf57111000e8390000008b7b08e831000000b03aeeb020ee8b3b8d6f083b7b04730a39ef73068a"
    "07ee47ebf183c31049ebcab00aee8a5e1480c34088d8e6f4faf4ebf866baf8038a0784c07404ee47ebf6c36d623a2068"
    "656c6c6f2066726f6d2061206d756c7469626f6f74206b65726e656c0a00636d646c696e653d000a6c6f616465723d00"
    "0a6d6f64733d000a6d6f642000")

PVH_ASM = """\
.intel_syntax noprefix
.code32
_start:
  mov esp, 0x104000
  mov esi, ebx
  mov edi, offset msg_hello
  call puts
  cmp dword ptr [esi], 0x336ec578
  mov bl, 0x71
  jne exit
  cmp dword ptr [esi+4], 1
  mov bl, 0x72
  jne exit
  cmp dword ptr [esi+48], 0
  mov bl, 0x73
  je exit
  mov eax, cr0
  test eax, 0x80000000
  mov bl, 0x74
  jnz exit
  mov edi, offset msg_cmd
  call puts
  mov edi, [esi+24]
  call puts
  mov edi, offset msg_mods
  call puts
  mov al, [esi+12]
  add al, 0x30
  out dx, al
  cmp dword ptr [esi+12], 0
  je done
  mov ebx, [esi+16]
  mov al, 0x20
  out dx, al
  mov edi, [ebx]
  mov ecx, [ebx+8]
byte_loop:
  test ecx, ecx
  jz done
  mov al, [edi]
  out dx, al
  inc edi
  dec ecx
  jmp byte_loop
done:
  mov al, 0x0a
  out dx, al
  mov bl, [esi+12]
  add bl, 0x50
exit:
  mov al, bl
  out 0xf4, al
  cli
  hlt
  jmp exit
puts:
  mov dx, 0x3f8
puts_loop:
  mov al, [edi]
  test al, al
  jz puts_ret
  out dx, al
  inc edi
  jmp puts_loop
puts_ret:
  ret
msg_hello: .asciz "pvh: hello from a PVH kernel\\n"
msg_cmd: .asciz "cmdline="
msg_mods: .asciz "\\nmods="
"""

PVH_BODY = bytes.fromhex(
    "bc0040100089debf95101000e875000000813e78c56e33b3717563837e0401b372755b837e3000b37374530f20c0a900"
    "000080b3747547bfb3101000e8450000008b7e18e83d000000bfbc101000e8330000008a460c0430ee837e0c0074168b"
    "5e10b020ee8b3b8b4b0885c974078a07ee4749ebf5b00aee8a5e0c80c35088d8e6f4faf4ebf866baf8038a0784c07404"
    "ee47ebf6c37076683a2068656c6c6f2066726f6d206120505648206b65726e656c0a00636d646c696e653d000a6d6f64"
    "733d00")


def _multiboot_body(flags: int) -> bytearray:
    body = bytearray(MULTIBOOT_BODY)
    struct.pack_into("<II", body, 4, flags, -(MB_MAGIC + flags) & 0xFFFFFFFF)
    struct.pack_into("<II", body, 20, BASE + len(body), BSS_END)   # load_end_addr, bss_end_addr
    return body


def multiboot_elf() -> bytes:
    """An ELF32 multiboot kernel: one PT_LOAD (file offset 4 KiB) at BASE with its bss up to BSS_END."""
    body = _multiboot_body(MB_FLAGS_ELF)
    ehdr = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, MB_ENTRY, 52, 0, 0, 52, 32, 1, 40, 0, 0)
    phdr = struct.pack("<8I", 1, 0x1000, BASE, BASE, len(body), BSS_END - BASE, 7, 0x1000)
    return (ehdr + phdr).ljust(0x1000, b"\0") + bytes(body)


def multiboot_aout() -> bytes:
    """The same kernel as a raw image whose multiboot header gives the load addresses (flag 16)."""
    return bytes(_multiboot_body(MB_FLAGS_AOUT))


def pvh_elf(entry: int = BASE) -> bytes:
    """An ELF64 with one PT_LOAD at BASE (bss up to BSS_END) and a PT_NOTE holding the PVH entry."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry)
    phoff, note_off = 64, 64 + 2 * 56
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0xFFFFFFFF81000000, phoff, 0, 0, 64, 56, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 7, 0x1000, 0xFFFFFFFF81000000, BASE, len(PVH_BODY), BSS_END - BASE, 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return (ehdr + load + pnote + note).ljust(0x1000, b"\0") + PVH_BODY


# -- a one-segment x86-64 ELF around a few bytes of code (the toolstack's tests and bench/domain_mem.py)
TINY_LOAD = 16 << 20
IDLE = bytes.fromhex("fa f4 eb fd")                  # cli; 1: hlt; jmp 1b


def tiny_elf(code: bytes) -> bytes:
    """An x86-64 ELF with one segment at 16 MiB, entered at its first byte."""
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, TINY_LOAD, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 120, TINY_LOAD, TINY_LOAD, len(code), len(code), 0x1000)
    return ehdr + phdr + code
