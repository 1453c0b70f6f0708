import gzip
import shutil
import stat
import subprocess

import pytest

from hypyr.errors import HypyrError
from hypyr.image.cpio import CpioWriter, gzip_bytes


def parse_newc(data: bytes) -> list[dict]:
    """A tiny newc reader, independent of the writer."""
    out, off = [], 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad magic at {off}"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_start = off + 110
        name = data[name_start:name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        off = name_start + namesize
        off += -off % 4
        body = data[off:off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            assert len(data) % 512 == 0
            assert not data[off:].strip(b"\0")
            return out
        out.append(dict(name=name, ino=f[0], mode=f[1], uid=f[2], gid=f[3], nlink=f[4], mtime=f[5],
                        data=body, rmaj=f[9], rmin=f[10]))


def sample() -> CpioWriter:
    w = CpioWriter()
    w.add_dir("proc")
    w.add_dir("/tmp", 0o1777)
    w.add_file("/bin/busybox", b"\x7fELF fake", mode=0o755)
    w.add_file("etc/hypyr/modules", b"a.ko\nb.ko\n")
    w.add_symlink("bin/sh", "/bin/busybox")
    w.add_chardev("dev/console", 5, 1)
    w.add_chardev("dev/null", 1, 3, 0o666)
    w.add_file("init", b"#!/bin/sh\necho hi\n", mode=0o755)
    return w


def test_roundtrip_members_and_metadata():
    entries = {e["name"]: e for e in parse_newc(sample().to_bytes())}
    names = list(entries)
    assert names == sorted(names)
    assert {"bin", "etc", "etc/hypyr", "dev"} <= set(names)  # parents were created implicitly
    assert all(e["uid"] == 0 and e["gid"] == 0 and e["mtime"] == 0 for e in entries.values())
    assert len({e["ino"] for e in entries.values()}) == len(entries)
    bb = entries["bin/busybox"]
    assert stat.S_ISREG(bb["mode"]) and stat.S_IMODE(bb["mode"]) == 0o755 and bb["data"] == b"\x7fELF fake"
    sh = entries["bin/sh"]
    assert stat.S_ISLNK(sh["mode"]) and sh["data"] == b"/bin/busybox"
    con = entries["dev/console"]
    assert stat.S_ISCHR(con["mode"]) and (con["rmaj"], con["rmin"]) == (5, 1)
    assert (entries["dev/null"]["rmaj"], entries["dev/null"]["rmin"]) == (1, 3)
    assert stat.S_IMODE(entries["tmp"]["mode"]) == 0o1777 and stat.S_ISDIR(entries["tmp"]["mode"])
    assert stat.S_IMODE(entries["init"]["mode"]) == 0o755


def test_deterministic_regardless_of_insertion_order(tmp_path):
    a = sample()
    b = CpioWriter()
    b.add_file("init", b"#!/bin/sh\necho hi\n", mode=0o755)
    b.add_chardev("dev/null", 1, 3, 0o666)
    b.add_chardev("dev/console", 5, 1)
    b.add_symlink("bin/sh", "/bin/busybox")
    b.add_file("etc/hypyr/modules", b"a.ko\nb.ko\n")
    host = tmp_path / "bb"
    host.write_bytes(b"\x7fELF fake")
    b.add_file("bin/busybox", host_path=host, mode=0o755)
    b.add_dir("tmp", 0o1777)
    b.add_dir("proc")
    assert a.to_bytes() == b.to_bytes()
    assert a.to_gzip() == b.to_gzip()
    assert gzip.decompress(a.to_gzip()) == a.to_bytes()
    a.write(tmp_path / "x.img")
    assert (tmp_path / "x.img").read_bytes() == a.to_gzip()


def test_gzip_has_zero_mtime():
    g = gzip_bytes(b"abc")
    assert g[4:8] == b"\0\0\0\0"
    assert gzip_bytes(b"abc") == g


def test_bad_paths_rejected():
    w = CpioWriter()
    with pytest.raises(HypyrError):
        w.add_file("../etc/passwd", b"")
    with pytest.raises(HypyrError):
        w.add_dir("/")
    w.add_file("a", b"x")
    with pytest.raises(HypyrError):
        w.add_file("a/b", b"y")
    with pytest.raises(ValueError):
        w.add_file("c")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_cpio_tool_lists_archive():
    r = subprocess.run(["cpio", "-itv"], input=sample().to_bytes(), capture_output=True)
    assert r.returncode == 0, r.stderr
    listing = r.stdout.decode()
    names = [l.split()[-1] if "->" not in l else l.split()[-3] for l in listing.splitlines()]
    assert "init" in names and "dev/console" in names and "bin/sh" in names
    assert any(l.startswith("crw") and l.split()[-1] == "dev/console" for l in listing.splitlines())
