"""What the lab needs on the host: QEMU, the Debian generic kernel, and the L1 initramfs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hypyr.errors import HypyrError
from hypyr.image import debs
from hypyr.image.build import add_base, add_busybox, add_modules, find_vmlinuz
from hypyr.image.cpio import CpioWriter
from hypyr.image.default import hypyr_cache

log = logging.getLogger("hypyr.lab")

LAB_VERSION = 1
KERNEL_PACKAGE = "linux-image-amd64"  # the generic kernel: has kvm-amd and 9p as modules
KERNEL_PACKAGE_ENV = "HYPYR_LAB_KERNEL"   # another L1 kernel package, e.g. linux-image-6.12-amd64
BUSYBOX_PACKAGE = "busybox-static"
QEMU_BINARY = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
L1_MODULES = [
    "irqbypass", "kvm", "ccp", "kvm-amd", "netfs", "fscache", "9pnet", "9p", "virtio_ring",
    "virtio", "9pnet_virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    # networking for L2 guests: TAP devices, bridges, vhost-net, veth pairs, and nftables NAT.
    # ipv6, af_packet and unix are built in; libcrc32c wants a crc32c algorithm first (softdep).
    "tun", "llc", "stp", "bridge", "vhost_iotlb", "vhost", "tap", "vhost_net", "veth",
    "nfnetlink", "crc32c_generic", "libcrc32c", "nf_tables", "nf_defrag_ipv4", "nf_defrag_ipv6",
    "nf_conntrack", "nf_nat", "nft_chain_nat", "nft_masq", "nft_nat", "nft_ct",
]
STAMP = "l1.stamp"


@dataclass(frozen=True)
class LabParts:
    qemu: Path
    kernel: Path
    initrd: Path
    kernel_release: str


def kernel_package() -> str:
    """The Debian package of L1's kernel: ``$HYPYR_LAB_KERNEL`` or the generic one."""
    return os.environ.get(KERNEL_PACKAGE_ENV) or KERNEL_PACKAGE


def lab_dir() -> Path:
    return hypyr_cache("lab", "HYPYR_LAB_DIR")


def init_script() -> bytes:
    return resources.files("hypyr.lab").joinpath("init.sh").read_bytes()


def find_qemu() -> Path | None:
    p = shutil.which(QEMU_BINARY)
    return Path(p) if p else None


def ensure_qemu() -> Path:
    """qemu-system-x86_64, installed with apt-get when missing and we are root."""
    q = find_qemu()
    if q:
        return q
    if os.geteuid() != 0:
        raise HypyrError(f"{QEMU_BINARY} is missing; install it with: sudo apt-get install {QEMU_PACKAGE}")
    if shutil.which("apt-get") is None:
        raise HypyrError(f"{QEMU_BINARY} is missing and there is no apt-get to install {QEMU_PACKAGE} with.")
    debs.progress(f"installing {QEMU_PACKAGE} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", QEMU_PACKAGE]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        debs.apt_update_once()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    q = find_qemu()
    if r.returncode != 0 or q is None:
        log.info("apt-get install output: %s", r.stdout + r.stderr)
        raise HypyrError(f"apt-get could not install {QEMU_PACKAGE}; install it by hand and retry.")
    return q


def available() -> tuple[bool, str]:
    """Whether the lab can run here (cheap: looks for QEMU or a way to install it)."""
    if find_qemu():
        return True, f"{QEMU_BINARY} is installed"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        return True, f"{QEMU_BINARY} is missing but can be installed with apt-get"
    return False, f"{QEMU_BINARY} is missing; install the {QEMU_PACKAGE} package"


def _cached_parts() -> LabParts | None:
    d = lab_dir()
    q = find_qemu()
    stamp = d / STAMP
    if q and (d / "vmlinuz").is_file() and (d / "l1-initrd.img").is_file() and stamp.is_file():
        try:
            doc = json.loads(stamp.read_text())
            release = doc["release"]
        except (ValueError, KeyError):
            return None
        # Without asking apt, a changed init script or module list still forces a rebuild.
        if (doc.get("lab") != LAB_VERSION or doc.get("modules") != L1_MODULES
                or doc.get("kernel_package", KERNEL_PACKAGE) != kernel_package()
                or doc.get("init") != hashlib.sha256(init_script()).hexdigest()):
            return None
        return LabParts(q, d / "vmlinuz", d / "l1-initrd.img", release)
    return None


def ensure_parts(refresh: bool = False) -> LabParts:
    """Fetch and build everything the lab needs; cheap when all is in place.

    With refresh=True, apt is asked for the current kernel/busybox packages and the L1
    initramfs is rebuilt if its inputs changed; otherwise a complete cached set is used as is.
    """
    if not refresh:
        cached = _cached_parts()
        if cached:
            return cached
    t0 = time.monotonic()
    qemu = ensure_qemu()
    d = lab_dir()
    d.mkdir(parents=True, exist_ok=True)
    kernel_deb = debs.download(debs.resolve_package(kernel_package()))
    busybox_deb = debs.download(BUSYBOX_PACKAGE)
    init = init_script()
    stamp_doc = {
        "lab": LAB_VERSION,
        "kernel": [kernel_deb.name, debs.file_sha256(kernel_deb)],
        "kernel_package": kernel_package(),
        "busybox": [busybox_deb.name, debs.file_sha256(busybox_deb)],
        "init": hashlib.sha256(init).hexdigest(),
        "modules": L1_MODULES,
    }
    kernel, initrd, stamp = d / "vmlinuz", d / "l1-initrd.img", d / STAMP
    if stamp.is_file() and kernel.is_file() and initrd.is_file():
        try:
            old = json.loads(stamp.read_text())
            if {k: v for k, v in old.items() if k != "release"} == stamp_doc:
                return LabParts(qemu, kernel, initrd, old["release"])
        except (ValueError, KeyError):
            pass

    debs.progress("building the lab's L1 initramfs")
    kroot = debs.extract(kernel_deb)
    bbroot = debs.extract(busybox_deb)
    release = debs.kernel_release(kroot)
    w = CpioWriter()
    add_base(w)
    add_busybox(w, bbroot / "bin" / "busybox")
    for sub in ("newroot", "job", "keep"):
        w.add_dir(sub)
    order = add_modules(w, kroot / "lib" / "modules" / release, L1_MODULES, "etc/hypyr/modules")
    w.add_file("init", init, mode=0o755)
    data = w.to_gzip()

    stamp.unlink(missing_ok=True)
    tmp = kernel.with_name("vmlinuz.tmp")
    shutil.copyfile(find_vmlinuz(kroot), tmp)
    tmp.replace(kernel)
    tmp = initrd.with_name("l1-initrd.img.tmp")
    tmp.write_bytes(data)
    tmp.replace(initrd)
    stamp.write_text(json.dumps(dict(stamp_doc, release=release), sort_keys=True) + "\n")
    debs.progress(f"lab ready: L1 kernel {release}, {len(order)} modules, "
                  f"initramfs {len(data) / 1e6:.1f} MB ({time.monotonic() - t0:.1f} s)")
    return LabParts(qemu, kernel, initrd, release)
