"""Build the guest image hypyr boots: the Debian cloud kernel plus a busybox initramfs.

`build()` is idempotent: a stamp records a hash of every input (kernel and busybox packages,
the init script, the module list, this builder's version) and a rebuild with the same inputs
does nothing unless forced. Outputs are byte-identical across rebuilds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from hypyr.errors import HypyrError
from hypyr.image import debs, default
from hypyr.image.cpio import CpioWriter
from hypyr.image.default import ImagePaths, paths
from hypyr.image.exitport import exit_helper_elf

log = logging.getLogger("hypyr.image")

BUSYBOX_PACKAGE = "busybox-static"
USERLAND_PROGRAMS = ["usr/bin/iperf3"]
BASE_DIRS = ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "mnt", "root",
             "etc", "etc/hypyr", "lib/modules", "run", "var"]

# busybox udhcpc calls this with $1 = deconfig|bound|renew|leasefail|nak and, when bound, the
# lease in $interface, $ip, $mask (prefix length), $subnet, $router, $dns.
UDHCPC_SCRIPT = b"""#!/bin/sh
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            ip route del default dev "$interface" 2>/dev/null
            for r in $router; do ip route add default via "$r" dev "$interface" && break; done
        fi
        if [ -n "$dns" ]; then
            : >/etc/resolv.conf
            for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        fi
        ;;
esac
exit 0
"""


ROOTFS_SIZE = "64M"


def stamp_for(kernel_deb: Path, busybox_deb: Path, init: bytes, modules: list[str],
              userland: Sequence[Path] = ()) -> str:
    """The stamp text for a set of inputs; equal inputs give equal stamps."""
    doc = {
        "builder": default.BUILDER_VERSION,
        "kernel": [Path(kernel_deb).name, debs.file_sha256(kernel_deb)],
        "busybox": [Path(busybox_deb).name, debs.file_sha256(busybox_deb)],
        "init": default.init_digest(init),
        "modules": list(modules),
        "userland": [[Path(d).name, debs.file_sha256(d)] for d in userland],
    }
    return json.dumps(doc, sort_keys=True) + "\n"


def is_current(out: ImagePaths, stamp: str) -> bool:
    """True when the outputs exist and were built from the inputs that `stamp` describes."""
    f = out.dir / default.STAMP
    return (out.kernel.is_file() and out.initrd.is_file() and out.rootfs.is_file() and f.is_file()
            and f.read_text() == stamp)


def busybox_applets(busybox: Path) -> list[str]:
    """Applet paths (e.g. 'bin/ls') that `busybox --list-full` reports; [] if it cannot run here."""
    try:
        r = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, timeout=30)
    except OSError:
        return []
    if r.returncode != 0:
        return []
    return sorted({l.strip().lstrip("/") for l in r.stdout.splitlines() if l.strip()})


def add_busybox(w: CpioWriter, busybox: Path) -> None:
    """Put /bin/busybox and its applet symlinks (at least /bin/sh) into the archive."""
    w.add_file("bin/busybox", host_path=busybox, mode=0o755)
    for applet in busybox_applets(busybox):
        if applet != "bin/busybox":
            w.add_symlink(applet, "/bin/busybox")
    if "bin/sh" not in w:
        w.add_symlink("bin/sh", "/bin/busybox")


def add_programs(w: CpioWriter, roots: list[Path], programs: list[str]) -> list[str]:
    """Copy `programs` from the unpacked package `roots` with their interpreter and shared
    libraries; a file reached under two names is stored once, the other name a symlink.
    Returns the archive paths added."""
    closure = debs.program_closure(roots, programs)
    stored: dict[Path, str] = {}
    for dest in sorted(closure):
        host = closure[dest].resolve()
        if host in stored:
            w.add_symlink(dest, "/" + stored[host])
        else:
            w.add_file(dest, host_path=host, mode=0o755)
            stored[host] = dest
    return sorted(closure)


def add_base(w: CpioWriter) -> None:
    for d in BASE_DIRS:
        w.add_dir(d)
    w.add_dir("tmp", 0o1777)
    w.add_dir("root", 0o700)
    w.add_chardev("dev/console", 5, 1, 0o600)
    w.add_chardev("dev/null", 1, 3, 0o666)


def add_modules(w: CpioWriter, moddir: Path, names: list[str], list_path: str) -> list[str]:
    """Copy the modules for `names` (with dependencies, decompressed) into lib/modules/ and
    write their load order to `list_path`; returns the file names in load order."""
    tree = debs.ModuleTree(moddir)
    resolved = tree.resolve(names)
    for name in resolved.missing:
        log.info("kernel has no module %s; the image goes without it", name)
    order = []
    for rel in resolved.ordered:
        fname = debs.mod_name(rel) + ".ko"
        w.add_file(f"lib/modules/{fname}", debs.read_module(moddir / rel), mode=0o644)
        order.append(fname)
    w.add_file(list_path, "".join(f"{m}\n" for m in order).encode(), mode=0o644)
    return order


def make_ext4(w: CpioWriter, out: Path, size: str = ROOTFS_SIZE) -> None:
    """Write the archive's tree (device nodes aside: devtmpfs provides them) into a new ext4 image
    with `mkfs.ext4 -d`, which needs no root privileges."""
    import stat as st
    import tempfile
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mke2fs") or "/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        raise HypyrError("mkfs.ext4 is missing: install the e2fsprogs package.")
    with tempfile.TemporaryDirectory(prefix="hypyr-rootfs-") as tmp:
        root = Path(tmp)
        for e in w.entries():
            path = root / e.name
            kind = st.S_IFMT(e.mode)
            if kind == st.S_IFDIR:
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(e.mode & 0o7777)
            elif kind == st.S_IFREG:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(e.data)
                path.chmod(e.mode & 0o7777)
            elif kind == st.S_IFLNK:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(e.data.decode(), path)
        tmp_img = out.with_name(out.name + ".tmp")
        tmp_img.unlink(missing_ok=True)
        r = subprocess.run([mkfs, "-q", "-F", "-t", "ext4", "-L", "hypyr-root", "-E", "root_owner=0:0",
                            "-d", str(root), str(tmp_img), size], capture_output=True, text=True)
        if r.returncode != 0:
            raise HypyrError(f"mkfs.ext4 failed to build {out}: {r.stderr.strip().splitlines()[-1:]}")
        tmp_img.replace(out)


def find_vmlinuz(root: Path) -> Path:
    hits = sorted((Path(root) / "boot").glob("vmlinuz-*"))
    if not hits:
        raise HypyrError(f"The kernel package unpacked at {root} has no boot/vmlinuz-* file.")
    return hits[-1]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def build(kernel_deb: Path | None = None, force: bool = False) -> ImagePaths:
    """Fetch the inputs and build vmlinuz + initrd.img in image_dir() (skipped when current)."""
    t0 = time.monotonic()
    out = paths()
    out.dir.mkdir(parents=True, exist_ok=True)
    if kernel_deb is not None:
        kernel_deb = Path(kernel_deb)
        if not kernel_deb.is_file():
            raise HypyrError(f"The kernel package {kernel_deb} does not exist.")
    else:
        kernel_deb = debs.download(debs.resolve_package(default.KERNEL_PACKAGE))
    busybox_deb = debs.download(BUSYBOX_PACKAGE)
    userland_debs = [debs.download(p) for p in default.USERLAND_PACKAGES]
    init = default.init_script()
    stamp = stamp_for(kernel_deb, busybox_deb, init, default.GUEST_MODULES, userland_debs)
    if not force and is_current(out, stamp):
        log.info("guest image in %s is up to date", out.dir)
        return out

    debs.progress(f"building the guest image in {out.dir}")
    kroot = debs.extract(kernel_deb)
    bbroot = debs.extract(busybox_deb)
    busybox = bbroot / "bin" / "busybox"
    if not busybox.is_file():
        raise HypyrError(f"The package {busybox_deb.name} has no bin/busybox.")
    release = debs.kernel_release(kroot)
    userland_roots = [debs.extract(d) for d in userland_debs]

    w = CpioWriter()
    add_base(w)
    add_busybox(w, busybox)
    add_programs(w, userland_roots, USERLAND_PROGRAMS)
    w.add_file("etc/hypyr/udhcpc.script", UDHCPC_SCRIPT, mode=0o755)
    order = add_modules(w, kroot / "lib" / "modules" / release, default.GUEST_MODULES, "etc/hypyr/modules")
    w.add_file("etc/hostname", b"hypyr\n")
    w.add_file("etc/hypyr/kernel-release", f"{release}\n".encode())
    w.add_file("bin/hypyr-exit", exit_helper_elf(), mode=0o755)
    w.add_file("init", init, mode=0o755)
    debs.progress(f"packing the initramfs ({len(order)} modules)")
    initrd = w.to_gzip()

    # The root filesystem: the same userland and init (as /sbin/init), no modules — the
    # initramfs loads them, mounts root=/dev/vda and switches to it.
    r = CpioWriter()
    add_base(r)
    add_busybox(r, busybox)
    add_programs(r, userland_roots, USERLAND_PROGRAMS)
    r.add_file("etc/hypyr/udhcpc.script", UDHCPC_SCRIPT, mode=0o755)
    r.add_file("etc/hostname", b"hypyr\n")
    r.add_file("etc/hypyr/rootfs", b"this is hypyr's default root filesystem\n")
    r.add_file("bin/hypyr-exit", exit_helper_elf(), mode=0o755)
    r.add_file("sbin/init", init, mode=0o755)
    debs.progress(f"making the root filesystem ({ROOTFS_SIZE}, ext4)")
    (out.dir / default.STAMP).unlink(missing_ok=True)
    make_ext4(r, out.rootfs)

    (out.dir / default.STAMP).unlink(missing_ok=True)
    tmp = out.kernel.with_name(out.kernel.name + ".tmp")
    shutil.copyfile(find_vmlinuz(kroot), tmp)
    tmp.replace(out.kernel)
    _write_atomic(out.initrd, initrd)
    _write_atomic(out.dir / default.STAMP, stamp.encode())
    debs.progress(f"guest image ready: kernel {release}, initrd {len(initrd) / 1e6:.1f} MB "
                  f"({time.monotonic() - t0:.1f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m hypyr.image.build", description=__doc__.splitlines()[0])
    ap.add_argument("--kernel-deb", type=Path, help="use this kernel .deb instead of the Debian cloud kernel")
    ap.add_argument("--force", action="store_true", help="rebuild even when the inputs did not change")
    args = ap.parse_args(argv)
    try:
        p = build(args.kernel_deb, force=args.force)
    except HypyrError as e:
        print(f"hypyr: {e}", file=__import__("sys").stderr)
        return 1
    print(p.kernel)
    print(p.initrd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
