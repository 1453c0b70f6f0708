"""The default guest image: what it is made of, where it lives, and whether it is current.

`hypyr run` checks it at every start, so this module is light; building it is
:mod:`hypyr.image.build`'s (imported only to build).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import NamedTuple

BUILDER_VERSION = 4
KERNEL_PACKAGE = "linux-image-cloud-amd64"
GUEST_MODULES = [
    "virtio_mmio", "virtio_blk", "virtio_console", "virtio_rng", "virtio_net",
    "virtio_balloon", "vmw_vsock_virtio_transport", "ext4", "pvpanic_mmio",
    "button", "evdev",  # the ACPI power button `hypyr shutdown` presses, as an input device
]
# Dynamically linked programs added beside busybox, with their ELF interpreter and libraries,
# taken from these Debian packages (unpacked, not installed).
USERLAND_PACKAGES = ["iperf3", "libiperf0", "libc6", "libsctp1", "libssl3"]
STAMP = "image.stamp"


def hypyr_cache(sub: str, env_var: str) -> Path:
    """``$env_var`` if set, else ``$XDG_CACHE_HOME/hypyr/<sub>`` (default ``~/.cache/hypyr/<sub>``)."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hypyr" / sub


class ImagePaths(NamedTuple):
    kernel: Path
    initrd: Path
    dir: Path
    rootfs: Path


def image_dir() -> Path:
    return hypyr_cache("image", "HYPYR_IMAGE_DIR")


def paths() -> ImagePaths:
    d = image_dir()
    return ImagePaths(kernel=d / "vmlinuz", initrd=d / "initrd.img", dir=d, rootfs=d / "rootfs.ext4")


def init_script() -> bytes:
    """The guest's /init (hypyr/image/init.sh, package data)."""
    return Path(__file__).with_name("init.sh").read_bytes()


def init_digest(init: bytes) -> str:
    """The init script's fingerprint in the stamp: a CRC-32, since `hypyr run` checks it at every
    start and importing hashlib costs more than the whole check (it detects edits, not attacks)."""
    return f"crc32:{zlib.crc32(init):08x}"


def ensure() -> ImagePaths:
    """The guest image, built first if it is missing (no package look-up when it exists)."""
    out = paths()
    stamp = out.dir / STAMP
    if out.kernel.is_file() and out.initrd.is_file() and out.rootfs.is_file() and stamp.is_file():
        try:
            doc = json.loads(stamp.read_text())
        except ValueError:
            doc = {}
        # Without asking apt, a changed init script, module list or builder still rebuilds.
        if (doc.get("builder") == BUILDER_VERSION and doc.get("modules") == GUEST_MODULES
                and doc.get("init") == init_digest(init_script())
                and [u[0].split("_")[0] for u in doc.get("userland", [])] == USERLAND_PACKAGES):
            return out
    from hypyr.image import build
    return build.build()
