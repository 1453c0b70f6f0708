"""Loading a Linux kernel (bzImage or ELF vmlinux), an initrd and the command line into guest memory.

:func:`detect_format` decides how any kernel file boots (bzImage, ELF, PVH, multiboot);
:mod:`.boot` dispatches on it (PVH and multiboot live in :mod:`.pvh` and :mod:`.multiboot`)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import NamedTuple

from hypyr.errors import HypyrError
from hypyr.memory import GuestAddress, GuestMemory

from . import bootparams as bp
from . import layout
from .bootfile import BootFile, KernelData, copier

ELF_MAGIC = b"\x7fELF"
MIN_PROTOCOL = 0x0206
# xloadflags (which says whether there is a 64-bit entry) appeared in protocol 2.12
MIN_PROTOCOL_64 = 0x020C
ENTRY_64_OFFSET = 0x200
# a bzImage's setup header lies in its first page (it ends by 0x202 + 255)
_HEAD_BYTES = 4096


class KernelImage(NamedTuple):
    """A kernel loaded into guest memory."""

    path: str
    kind: str  # KIND_BZIMAGE, KIND_ELF, KIND_PVH or KIND_MULTIBOOT
    load_addr: GuestAddress
    entry: GuestAddress  # entry point (rip: 64-bit for bzImage/elf, 32-bit for pvh/multiboot)
    end: GuestAddress  # first byte after the kernel and the memory it needs (init_size)
    setup_header: bytes  # bytes from offset 0x1f1 to copy into boot_params
    protocol_version: int
    cmdline_size: int  # longest command line, NUL not counted
    initrd_addr_max: int  # highest address the initrd may occupy
    xloadflags: int


def _fail(path: str, why: str) -> HypyrError:
    return HypyrError(f"Kernel {path} {why}.")


def _u8(d: bytes, off: int) -> int:
    return d[off]


def _u16(d: bytes, off: int) -> int:
    return struct.unpack_from("<H", d, off)[0]


def _u32(d: bytes, off: int) -> int:
    return struct.unpack_from("<I", d, off)[0]


def _u64(d: bytes, off: int) -> int:
    return struct.unpack_from("<Q", d, off)[0]


def _check_fits(mem: GuestMemory, path: str, start: int, end: int) -> None:
    if start < layout.HIGH_MEMORY_START:
        raise _fail(path, f"wants to be loaded at {start:#x}, below 1 MiB where the boot structures live")
    if not mem.check_range(start, end - start):
        raise HypyrError(
            f"Guest memory ({mem.size // layout.MiB} MiB) is too small for kernel {path}, "
            f"which needs RAM at {start:#x}-{end:#x}.")


# kernel formats (KernelImage.kind and detect_format's answers)
KIND_BZIMAGE = "bzImage"      # Linux 64-bit boot protocol, entered in long mode with boot_params
KIND_ELF = "elf"              # an x86-64 ELF vmlinux without a PVH note: the same 64-bit entry
KIND_PVH = "pvh"              # an ELF with XEN_ELFNOTE_PHYS32_ENTRY: 32-bit entry with hvm_start_info
KIND_MULTIBOOT = "multiboot"  # a multiboot (v1) header in the first 8 KiB: 32-bit entry with multiboot info


def _is_bzimage(data: KernelData) -> bool:
    """The setup header's "HdrS" magic (in the first page of a bzImage)."""
    return data[bp.HDR_HEADER:bp.HDR_HEADER + 4] == bp.HDRS_MAGIC


def detect_format(data: KernelData) -> str:
    """Which boot protocol ``data`` (a kernel file's bytes, or the file) is booted with; the one place that decides.

    bzImage (the "HdrS" setup header) first; an ELF64 with a PVH note boots through PVH, and so
    does an ELF32 with one unless it also has a multiboot header (then multiboot, as in QEMU);
    other ELF files with a multiboot header boot as multiboot, the rest by the 64-bit ELF path;
    a non-ELF file with a multiboot header (the a.out kludge) as multiboot.  Anything else is
    left to the bzImage loader, whose error says what is wrong."""
    if _is_bzimage(data):
        return KIND_BZIMAGE
    from . import elf, multiboot, pvh  # only for the other formats (hypyr run's start, issue #14)
    if elf.is_elf(data):
        try:
            image = elf.parse(data, "")
        except HypyrError:
            image = None
        has_mb = multiboot.find_header(data) is not None
        if image is not None and pvh.phys32_entry(image) is not None and (image.bits == 64 or not has_mb):
            return KIND_PVH  # an ELF32 with both (Xen itself) boots as multiboot, as QEMU does
        return KIND_MULTIBOOT if has_mb else KIND_ELF
    if multiboot.find_header(data) is not None:
        return KIND_MULTIBOOT
    return KIND_BZIMAGE


def kernel_format(path: str | os.PathLike) -> str:
    """:func:`detect_format` of the file at ``path`` (HypyrError if it cannot be read)."""
    with BootFile(path, "kernel") as f:
        return detect_format(f)


def load_kernel(mem: GuestMemory, path: str | os.PathLike) -> KernelImage:
    """Load a bzImage or an x86-64 ELF vmlinux into ``mem`` (the 64-bit Linux entry), straight
    from its file."""
    with BootFile(path, "kernel") as f:
        return load_kernel_data(mem, f, os.fspath(path))


def load_kernel_data(mem: GuestMemory, data: KernelData, name: str) -> KernelImage:
    if data[:4] == ELF_MAGIC:
        return load_elf(mem, data, name)
    return load_bzimage(mem, data, name)


def load_bzimage(mem: GuestMemory, kernel: KernelData, path: str = "<kernel>") -> KernelImage:
    """Load the bzImage ``kernel`` (a kernel file's bytes, or the file) into ``mem``: its setup
    header is read from the first page, its protected-mode part copied straight into RAM."""
    data, size, copy = kernel[:_HEAD_BYTES], len(kernel), copier(kernel)
    not_bz = "is not a bzImage Linux kernel (or is too old)"
    if len(data) < bp.HDR_HEADER + 6 or not _is_bzimage(data):
        raise _fail(path, "is not a kernel hypyr can boot: not a bzImage Linux kernel, an ELF vmlinux "
                          "or a multiboot kernel")
    version = _u16(data, bp.HDR_VERSION)
    hdr_end = bp.HDR_HEADER + data[bp.HDR_JUMP + 1]
    if version < MIN_PROTOCOL:
        raise _fail(path, not_bz)
    if version < MIN_PROTOCOL_64 or len(data) < bp.HDR_END or hdr_end < bp.HDR_XLOADFLAGS + 2:
        raise _fail(path, f"uses boot protocol {version >> 8}.{version & 0xff:02d}, too old for a 64-bit entry")
    xloadflags = _u16(data, bp.HDR_XLOADFLAGS)
    if not xloadflags & bp.XLF_KERNEL_64:
        raise _fail(path, "is not a 64-bit kernel (it has no 64-bit entry point)")

    setup_sects = _u8(data, bp.HDR_SETUP_SECTS) or 4
    pm_offset = (setup_sects + 1) * 512
    pm_size = _u32(data, bp.HDR_SYSSIZE) * 16
    if pm_size == 0 or size < pm_offset + pm_size:
        raise _fail(path, "is truncated")
    pm_length = size - pm_offset  # anything after syssize (e.g. signatures) is loaded too, harmlessly

    load_addr = _u64(data, bp.HDR_PREF_ADDRESS) or layout.DEFAULT_KERNEL_ADDR
    init_size = _u32(data, bp.HDR_INIT_SIZE)
    end = load_addr + max(init_size, pm_length)
    end = (end + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
    _check_fits(mem, path, load_addr, end)
    copy(mem, load_addr, pm_offset, pm_length)

    return KernelImage(
        path=path, kind="bzImage",
        load_addr=GuestAddress(load_addr), entry=GuestAddress(load_addr + ENTRY_64_OFFSET), end=GuestAddress(end),
        setup_header=data[bp.SETUP_HEADER:min(hdr_end, len(data))],
        protocol_version=version,
        cmdline_size=_u32(data, bp.HDR_CMDLINE_SIZE),
        initrd_addr_max=_u32(data, bp.HDR_INITRD_ADDR_MAX),
        xloadflags=xloadflags,
    )


def load_elf(mem: GuestMemory, data: KernelData, path: str = "<kernel>") -> KernelImage:
    """Load the x86-64 ELF vmlinux ``data`` into ``mem`` (its PT_LOAD segments, at their
    physical addresses).  Read with :mod:`hypyr.arch.x86.elf`, the bounds-checked reader of
    the multiboot and PVH loaders: pyelftools would cost each domain's VMM 2.5 MiB of
    private memory (its modules, and pdb they import; issue #14)."""
    from . import elf
    image = elf.parse(data, path)
    if image.bits != 64 or image.machine != elf.EM_X86_64:
        raise _fail(path, "is an ELF file but not an x86-64 kernel")
    segments = image.segments
    if not segments:
        raise _fail(path, "has no loadable segments")

    for seg in segments:
        _check_fits(mem, path, seg.paddr, seg.end)
    elf.load_segments(mem, data, segments)
    # vmlinux's e_entry is the physical startup_64; translate a virtual one just in case
    entry = elf.physical_entry(path, image.entry, segments)

    start = min(s.paddr for s in segments)
    end = max(s.end for s in segments)
    end = (end + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
    return KernelImage(
        path=path, kind="elf",
        load_addr=GuestAddress(start), entry=GuestAddress(entry), end=GuestAddress(end),
        setup_header=bp.default_setup_header(),
        protocol_version=bp.DEFAULT_PROTOCOL_VERSION,
        cmdline_size=layout.DEFAULT_CMDLINE_SIZE,
        initrd_addr_max=0x7FFFFFFF,
        xloadflags=bp.XLF_KERNEL_64,
    )


def load_initrd(mem: GuestMemory, data_or_path: bytes | str | os.PathLike,
                kernel: KernelImage) -> tuple[GuestAddress, int]:
    """Place the initrd page-aligned as high as possible in low RAM, above the kernel; return (addr, size)."""
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        data = memoryview(data_or_path)
        return _place_initrd(mem, data.nbytes, "initrd", kernel,
                             lambda addr: mem.write(addr, data))
    with BootFile(data_or_path, "initrd") as f:
        return _place_initrd(mem, f.size, f"initrd {os.fspath(data_or_path)}", kernel,
                             lambda addr: f.copy_to(mem, addr, 0, f.size))


def _place_initrd(mem: GuestMemory, size: int, name: str, kernel: KernelImage,
                  copy: Callable[[int], None]) -> tuple[GuestAddress, int]:
    if not size:
        raise HypyrError(f"The {name} is empty.")

    low = next((r for r in mem.regions if r.contains(kernel.load_addr)), None)
    ceiling = min(kernel.initrd_addr_max + 1, low.end if low else 0, layout.MMIO_HOLE_START, layout.FOUR_GIB)
    floor = (int(kernel.end) + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
    addr = (ceiling - size) & ~(layout.PAGE_SIZE - 1)
    if ceiling - size < floor or addr < floor:
        raise HypyrError(
            f"The {name} ({size / layout.MiB:.1f} MiB) does not fit in guest memory between the kernel "
            f"(ending at {floor:#x}) and {ceiling:#x}; give the guest more memory.")
    copy(addr)
    return GuestAddress(addr), size


def write_cmdline(mem: GuestMemory, cmdline: str | bytes, max_size: int,
                  addr: int = layout.CMDLINE_ADDR) -> GuestAddress:
    """Write ``cmdline`` NUL-terminated at ``addr``; ``max_size`` is the kernel's cmdline_size (NUL excluded)."""
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise HypyrError("The kernel command line contains a NUL character.")
    limit = min(max_size, layout.CMDLINE_MAX_SIZE - 1)
    if len(raw) > limit:
        raise HypyrError(f"The kernel command line is {len(raw)} bytes long but this kernel accepts at most {limit}.")
    mem.write(addr, raw + b"\0")
    return GuestAddress(addr)
