"""Disk images for the disk-boot tests, made without loop devices or root: ``mke2fs -d DIR``
fills an ext4 image from a directory, and the partition tables are written here byte by byte."""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

SECTOR = 512


def mke2fs() -> str | None:
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if Path(d, "mke2fs").exists():
            return str(Path(d, "mke2fs"))
    return shutil.which("mke2fs")


def ext4(path: Path, tree: dict[str, bytes | str], size_mib: int = 8, fs_uuid: str | None = None,
         label: str | None = None) -> Path:
    """An ext4 image holding ``tree`` ({"boot/grub/grub.cfg": text, "vmlinuz": "->boot/x"}: a
    value starting "->" is a symbolic link to the rest)."""
    src = path.with_name(path.name + ".d")
    if src.exists():
        shutil.rmtree(src)
    src.mkdir()
    for name, data in tree.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str) and data.startswith("->"):
            p.symlink_to(data[2:])
        else:
            p.write_bytes(data.encode() if isinstance(data, str) else data)
    cmd = [mke2fs() or "mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src)]
    if fs_uuid:
        cmd += ["-U", fs_uuid]
    if label:
        cmd += ["-L", label]
    subprocess.run(cmd + [str(path), f"{size_mib}M"], check=True, capture_output=True)
    shutil.rmtree(src)
    return path


def _put(disk: Path, offset: int, data: bytes) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(data)


def mbr_disk(path: Path, fs_images: list[tuple[Path, int, bool]], first_lba: int = 2048) -> list[int]:
    """An MBR disk with one primary partition per (image, type byte, bootable); returns the byte
    offset of each partition.  The images are copied in with dd."""
    offsets, table, lba = [], b"", first_lba
    for img, ptype, bootable in fs_images:
        sectors = img.stat().st_size // SECTOR
        table += struct.pack("<B3sB3sII", 0x80 if bootable else 0, b"\0\0\0", ptype, b"\0\0\0", lba, sectors)
        offsets.append(lba * SECTOR)
        lba += sectors
    with open(path, "wb") as f:
        f.truncate(lba * SECTOR + SECTOR)
    _put(path, 446, table.ljust(64, b"\0") + b"\x55\xaa")
    for (img, _, _), off in zip(fs_images, offsets):
        subprocess.run(["dd", f"if={img}", f"of={path}", "bs=512", f"seek={off // SECTOR}", "conv=notrunc",
                        "status=none"], check=True)
    return offsets


LINUX_FS = "0fc63daf-8483-4772-8e79-3d69d8477de4"
ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"


def gpt_disk(path: Path, parts: list[tuple[Path | None, str, int]], first_lba: int = 2048) -> list[int]:
    """A GPT disk (protective MBR, primary header and entries; no backup) with a partition per
    (image or None for an empty one of ``sectors``, type GUID, sectors); returns byte offsets."""
    entries, offsets, lba = b"", [], first_lba
    for img, type_guid, sectors in parts:
        if img is not None:
            sectors = img.stat().st_size // SECTOR
        entries += (uuid.UUID(type_guid).bytes_le + uuid.uuid4().bytes_le
                    + struct.pack("<QQQ", lba, lba + sectors - 1, 0) + "part".encode("utf-16-le").ljust(72, b"\0"))
        offsets.append(lba * SECTOR)
        lba += sectors
    entries = entries.ljust(128 * 128, b"\0")
    total = lba + 34
    with open(path, "wb") as f:
        f.truncate(total * SECTOR)
    _put(path, 446, struct.pack("<B3sB3sII", 0, b"\0\0\0", 0xEE, b"\0\0\0", 1, total - 1).ljust(64, b"\0")
         + b"\x55\xaa")
    hdr = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, total - 1, 34,
                                total - 34, uuid.uuid4().bytes_le, 2, 128, 128, zlib.crc32(entries)))
    struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr)))
    _put(path, SECTOR, bytes(hdr))
    _put(path, 2 * SECTOR, entries)
    for (img, _, _), off in zip(parts, offsets):
        if img is not None:
            subprocess.run(["dd", f"if={img}", f"of={path}", "bs=512", f"seek={off // SECTOR}", "conv=notrunc",
                            "status=none"], check=True)
    return offsets
