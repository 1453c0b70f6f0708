"""The default guest image: what it is made of, where it lives, and whether it is current.

`hypyr run` checks it at every start (:func:`current`), so this module is light: os.path and
strings on that path (pathlib's import alone costs more than the check in the lab); building it
is :mod:`hypyr.image.build`'s (imported only to build).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pathlib import Path

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
FILES = ("vmlinuz", "initrd.img", "rootfs.ext4")   # kernel, initrd, root filesystem


def _cache_dir(sub: str, env_var: str) -> str:
    env = os.environ.get(env_var)
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hypyr", sub)


def hypyr_cache(sub: str, env_var: str) -> Path:
    """``$env_var`` if set, else ``$XDG_CACHE_HOME/hypyr/<sub>`` (default ``~/.cache/hypyr/<sub>``)."""
    from pathlib import Path
    return Path(_cache_dir(sub, env_var))


class ImagePaths(NamedTuple):
    kernel: Path
    initrd: Path
    dir: Path
    rootfs: Path


def image_dir() -> Path:
    return hypyr_cache("image", "HYPYR_IMAGE_DIR")


def paths() -> ImagePaths:
    d = image_dir()
    kernel, initrd, rootfs = (d / name for name in FILES)
    return ImagePaths(kernel=kernel, initrd=initrd, dir=d, rootfs=rootfs)


def init_script() -> bytes:
    """The guest's /init (hypyr/image/init.sh, package data)."""
    with open(os.path.join(os.path.dirname(__file__), "init.sh"), "rb") as f:
        return f.read()


def init_digest(init: bytes) -> str:
    """The init script's fingerprint in the stamp: a CRC-32, since `hypyr run` checks it at every
    start and importing hashlib costs more than the whole check (it detects edits, not attacks)."""
    return f"crc32:{zlib.crc32(init):08x}"


def current() -> tuple[str, str, str] | None:
    """(kernel, initrd, root filesystem) of the default image if it is complete and made from
    today's inputs, else None.  Without asking apt: a changed init script, module list, userland
    or builder makes it out of date."""
    d = _cache_dir("image", "HYPYR_IMAGE_DIR")
    kernel, initrd, rootfs = (os.path.join(d, name) for name in FILES)
    if not all(os.path.isfile(p) for p in (kernel, initrd, rootfs)):
        return None
    try:
        with open(os.path.join(d, STAMP), "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if (isinstance(doc, dict) and doc.get("builder") == BUILDER_VERSION and doc.get("modules") == GUEST_MODULES
            and doc.get("init") == init_digest(init_script())
            and [u[0].split("_")[0] for u in doc.get("userland", [])] == USERLAND_PACKAGES):
        return kernel, initrd, rootfs
    return None


def ensure() -> ImagePaths:
    """The guest image, built first if it is missing or out of date (see :func:`current`)."""
    if current() is not None:
        return paths()
    from hypyr.image import build
    return build.build()
