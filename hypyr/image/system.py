"""Build a bootable Debian system disk image: `hypyr image build --system`.

mmdebstrap installs Debian (systemd, udev, the cloud kernel and its initramfs, systemd-networkd,
optionally OpenSSH) from the Debian mirrors into a private directory; hypyr then writes the
configuration (root password or SSH key, hostname, /etc/fstab, a DHCP ``.network`` file,
/boot/grub/grub.cfg) into that directory, and ``mke2fs -t ext4 -d DIR`` turns it into a bare ext4
image.  No loop device, no mount of the image: the result boots with ``hypyr run --disk IMG
--boot disk`` and xl.cfg ``bootloader = "pygrub"`` (hypyr/image/diskboot.py reads its grub.cfg).

The guest's root is ``/dev/vda`` (the first virtio-blk disk, virtio-mmio announced through ACPI):
the initramfs (initramfs-tools) is told to carry and load ``virtio_mmio`` and ``virtio_blk`` before
it mounts root.  The console is ``ttyS0`` (``console=ttyS0`` on the command line makes systemd
start a serial getty there).

A stamp beside the image (``IMG.stamp``, mode 0600) records what it was built from; a second
build with the same options finds it current and does nothing.  Every failure leaves no partial
output behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hypyr.errors import HypyrError
from hypyr.image import debs
from hypyr.image.default import hypyr_cache

log = logging.getLogger("hypyr.image")

SYSTEM_BUILDER_VERSION = 1
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
KERNEL_PACKAGE = "linux-image-cloud-amd64"
# minbase (Priority: required) plus these: systemd as init, udev, D-Bus, networkd's resolver,
# the kernel and its initramfs generator, and the few tools a person logging in expects.
BASE_PACKAGES = (
    "systemd-sysv", "udev", "dbus", "systemd-resolved", KERNEL_PACKAGE, "initramfs-tools",
    "libpam-systemd", "iproute2", "iputils-ping", "procps", "less", "ca-certificates",
)
SSH_PACKAGE = "openssh-server"
# loaded by the initramfs before it mounts root=/dev/vda (hypyr's virtio devices are virtio-mmio,
# found through ACPI; udev would load them too, this makes it independent of udev's timing)
INITRAMFS_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "ext4")
DEFAULT_SIZE = "2G"
MIN_SIZE = 512 << 20
MAX_SIZE = 2 << 40
DEFAULT_HOSTNAME = "hypyr"
ROOT_DEVICE = "/dev/vda"
SERIAL_CONSOLE = "ttyS0"
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.\-]+(?:[:=/][A-Za-z0-9+.~:\-]+)?$")
_HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")
_SSH_KEY_TYPES = ("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-sha2-")


class SystemImageError(HypyrError):
    """The system image cannot be built; str() is one sentence."""


@dataclass(frozen=True)
class SystemSpec:
    out: Path
    size: int                          # bytes
    hostname: str = DEFAULT_HOSTNAME
    root_password: str | None = None
    ssh_keys: str | None = None        # authorized_keys text for root
    packages: tuple[str, ...] = ()     # extra packages
    force: bool = False
    mirrors: tuple[str, ...] = field(default=MIRRORS)

    def all_packages(self) -> list[str]:
        pkgs = list(BASE_PACKAGES)
        if self.ssh_keys:
            pkgs.append(SSH_PACKAGE)
        for p in self.packages:
            if p not in pkgs:
                pkgs.append(p)
        return pkgs


def default_out(create_dir: bool = False) -> Path:
    """``$HYPYR_SYSTEM_DIR/system.img`` (default ``~/.cache/hypyr/system/system.img``)."""
    d = hypyr_cache("system", "HYPYR_SYSTEM_DIR")
    if create_dir:
        d.mkdir(parents=True, exist_ok=True)
    return d / "system.img"


# -- argument checks (no root, no network) ---------------------------------------------------------
def parse_size(text: str) -> int:
    """'2G', '1536M', '3g', '4294967296' -> bytes (K, M, G, T are powers of 1024); refused outside
    MIN_SIZE..MAX_SIZE."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text or "", re.IGNORECASE)
    if not m:
        raise SystemImageError(f"the size {text!r} is not a size such as 2G or 1536M")
    n = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    if n < MIN_SIZE:
        raise SystemImageError(f"the size {text} is too small for a Debian system: give at least 512M")
    if n > MAX_SIZE:
        raise SystemImageError(f"the size {text} is larger than hypyr builds (2T at most)")
    return n


def check_hostname(name: str) -> str:
    if len(name) > 253 or not _HOSTNAME_RE.match(name):
        raise SystemImageError(f"the host name {name!r} is not a valid host name (letters, digits, '-', dots "
                               "between labels)")
    return name


def check_packages(names: Sequence[str]) -> tuple[str, ...]:
    out = []
    for n in names:
        n = n.strip()
        if not n:
            continue
        if not _PACKAGE_RE.match(n):
            raise SystemImageError(f"{n!r} is not a Debian package name")
        out.append(n)
    return tuple(out)


def check_password(pw: str) -> str:
    if not pw:
        raise SystemImageError("the root password is empty")
    if any(c in pw for c in "\n\r\0"):
        raise SystemImageError("the root password must be one line")
    return pw


def read_ssh_keys(path: str | os.PathLike) -> str:
    """The public keys in ``path`` as authorized_keys text; a private key or no key is refused."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemImageError(f"cannot read the SSH key file {path} ({getattr(e, 'strerror', None) or e})") from None
    if "PRIVATE KEY" in text:
        raise SystemImageError(f"{path} is a private key: give the public one (usually {path}.pub)")
    keys = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    if not keys or not all(k.split()[0].startswith(_SSH_KEY_TYPES) or " ssh-" in k or " ecdsa-" in k for k in keys):
        raise SystemImageError(f"{path} holds no OpenSSH public key (a line such as 'ssh-ed25519 AAAA... user@host')")
    return "".join(k + "\n" for k in keys)


def make_spec(out: str | os.PathLike, size: str = DEFAULT_SIZE, hostname: str = DEFAULT_HOSTNAME,
              root_password: str | None = None, ssh_key_file: str | os.PathLike | None = None,
              packages: Sequence[str] = (), force: bool = False) -> SystemSpec:
    """Check the user's options (every refusal one sentence) and return what to build."""
    if root_password is None and ssh_key_file is None:
        raise SystemImageError("give --root-password PASSWORD or --ssh-key FILE (or both): without either "
                               "nobody could log in")
    return SystemSpec(
        out=Path(out).absolute(),
        size=parse_size(size),
        hostname=check_hostname(hostname),
        root_password=check_password(root_password) if root_password is not None else None,
        ssh_keys=read_ssh_keys(ssh_key_file) if ssh_key_file is not None else None,
        packages=check_packages(packages),
        force=force,
    )


# -- the files hypyr writes into the system --------------------------------------------------------
def grub_cfg(release: str, hostname: str = DEFAULT_HOSTNAME) -> str:
    """One menu entry booting /boot/vmlinuz-RELEASE with its initrd, root /dev/vda, console ttyS0."""
    return (
        "# written by hypyr image build --system; read by hypyr's pygrub-like disk boot\n"
        "set default=0\n"
        "set timeout=0\n"
        f"menuentry 'Debian GNU/Linux ({hostname}), with Linux {release}' --id debian-{release} {{\n"
        f"\tlinux /boot/vmlinuz-{release} root={ROOT_DEVICE} ro console={SERIAL_CONSOLE}\n"
        f"\tinitrd /boot/initrd.img-{release}\n"
        "}\n"
    )


def fstab() -> str:
    return (
        "# <file system> <mount point> <type> <options> <dump> <pass>\n"
        f"{ROOT_DEVICE} / ext4 errors=remount-ro 0 1\n"
    )


def network_file() -> str:
    """systemd-networkd: DHCP (v4) on the first Ethernet NIC, whatever its name."""
    return (
        "# written by hypyr image build --system\n"
        "[Match]\n"
        "Name=en* eth*\n"
        "\n"
        "[Network]\n"
        "DHCP=ipv4\n"
    )


def hosts(hostname: str) -> str:
    short = hostname.split(".")[0]
    names = hostname if short == hostname else f"{hostname} {short}"
    return f"127.0.0.1\tlocalhost\n127.0.1.1\t{names}\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def initramfs_modules() -> str:
    return "# loaded by the initramfs before it mounts root (hypyr: virtio-mmio disks)\n" + \
        "".join(f"{m}\n" for m in INITRAMFS_MODULES)


def mmdebstrap_args(spec: SystemSpec, target: Path) -> list[str]:
    """The mmdebstrap command line (mode root, a directory).  The setup hook writes the initramfs
    module list before initramfs-tools and the kernel are installed, so the kernel's initramfs,
    built once at install time, already carries them (dpkg keeps the file: --force-confold)."""
    mods = initramfs_modules().replace("'", "")
    hook = (f"mkdir -p \"$1/etc/initramfs-tools\" && printf '%s' '{mods}' > \"$1/etc/initramfs-tools/modules\"")
    return ["mmdebstrap", "--mode=root", "--format=directory", "--variant=minbase",
            "--dpkgopt=force-confold", "--aptopt=APT::Install-Recommends \"false\"",
            f"--include={','.join(spec.all_packages())}",
            f"--setup-hook={hook}",
            SUITE, str(target), *spec.mirrors]


# -- the stamp ------------------------------------------------------------------------------------
def _stamp_doc(spec: SystemSpec, salt: str) -> dict:
    pw = None if spec.root_password is None else hashlib.sha256((salt + spec.root_password).encode()).hexdigest()
    return {
        "builder": SYSTEM_BUILDER_VERSION, "suite": SUITE, "mirrors": list(spec.mirrors),
        "packages": spec.all_packages(), "size": spec.size, "hostname": spec.hostname,
        "initramfs_modules": list(INITRAMFS_MODULES), "salt": salt, "root_password": pw,
        "ssh_keys": None if spec.ssh_keys is None else hashlib.sha256(spec.ssh_keys.encode()).hexdigest(),
    }


def stamp_path(out: Path) -> Path:
    return out.with_name(out.name + ".stamp")


def stamp_text(spec: SystemSpec, salt: str | None = None) -> str:
    return json.dumps(_stamp_doc(spec, salt or secrets.token_hex(16)), sort_keys=True) + "\n"


def is_current(spec: SystemSpec) -> bool:
    """The image exists and its stamp says it was built with these very options."""
    f = stamp_path(spec.out)
    if not (spec.out.is_file() and f.is_file()):
        return False
    try:
        old = json.loads(f.read_text())
        return isinstance(old, dict) and old == _stamp_doc(spec, str(old.get("salt", "")))
    except (OSError, ValueError):
        return False


# -- the build ------------------------------------------------------------------------------------
def check_host(spec: SystemSpec) -> None:
    """Refusals that need no work: not root, the output's place, then no mmdebstrap or mke2fs
    (what the user asked is judged before this host's tools)."""
    if os.geteuid() != 0:
        raise SystemImageError("building a system image needs root (mmdebstrap installs packages as root "
                               "into a directory): run it with sudo")
    if not spec.out.parent.is_dir():
        raise SystemImageError(f"the directory {spec.out.parent} for the image does not exist")
    if (spec.out.exists() or os.path.islink(spec.out)) and not spec.force:
        raise SystemImageError(f"{spec.out} already exists: give --force to replace it")
    if _tool("chroot") is None:
        raise SystemImageError("chroot is missing: install it with `apt-get install coreutils`")
    if _tool("mmdebstrap") is None:
        raise SystemImageError("mmdebstrap is missing: install it with `apt-get install mmdebstrap`")
    if _mke2fs() is None:
        raise SystemImageError("mke2fs is missing: install it with `apt-get install e2fsprogs`")


def _path() -> str:
    """$PATH with the sbin directories (chroot, mke2fs) that a user's $PATH may lack."""
    parts = (os.environ.get("PATH") or "/usr/bin:/bin").split(os.pathsep)
    return os.pathsep.join(parts + [d for d in ("/usr/sbin", "/sbin") if d not in parts])


def _tool(name: str) -> str | None:
    return shutil.which(name, path=_path())


def _mke2fs() -> str | None:
    return _tool("mke2fs")


def _progress(step: int, total: int, msg: str) -> None:
    debs.progress(f"[{step}/{total}] {msg}")


def _run_logged(args: list[str], what: str, logfile: Path, stdin: str | None = None) -> None:
    """Run ``args``, its output to ``logfile``; on failure one sentence with the last error line."""
    env = dict(os.environ, LC_ALL="C.UTF-8", DEBIAN_FRONTEND="noninteractive", PATH=_path())
    with open(logfile, "ab") as lf:
        lf.write(f"$ {' '.join(args)}\n".encode())
        lf.flush()
        try:
            p = subprocess.run(args, stdout=lf, stderr=subprocess.STDOUT, env=env,
                               input=None if stdin is None else stdin.encode(),
                               stdin=subprocess.DEVNULL if stdin is None else None)
        except OSError as e:
            raise SystemImageError(f"{what} failed: cannot run {args[0]} ({e.strerror or e})") from None
    if p.returncode != 0:
        lines = [l for l in logfile.read_text(errors="replace").splitlines() if l.strip()]
        errs = [l for l in lines if l.startswith(("E:", "error", "Error", "mke2fs:", "__populate_fs"))]
        last = (errs or lines or ["no output"])[-1].strip()
        raise SystemImageError(f"{what} failed (exit status {p.returncode}): {last} (full log: {logfile})")


def find_release(root: Path) -> str:
    """The kernel release installed in ``root``: the one vmlinuz-R in /boot that has an initrd.img-R."""
    rels = sorted(p.name[len("vmlinuz-"):] for p in (root / "boot").glob("vmlinuz-*")
                  if (root / "boot" / f"initrd.img-{p.name[len('vmlinuz-'):]}").is_file())
    if not rels:
        raise SystemImageError(f"the installed system in {root} has no /boot/vmlinuz-* with its initrd.img-*")
    return rels[-1]


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


def configure(root: Path, spec: SystemSpec, logfile: Path) -> str:
    """Write hypyr's configuration into the installed tree; returns the kernel release."""
    release = find_release(root)
    _write(root, "etc/hostname", spec.hostname + "\n")
    _write(root, "etc/hosts", hosts(spec.hostname))
    _write(root, "etc/fstab", fstab())
    _write(root, "etc/systemd/network/20-hypyr-dhcp.network", network_file())
    _write(root, "boot/grub/grub.cfg", grub_cfg(release, spec.hostname))
    # enable networkd as `systemctl enable` would (its [Install] sections; resolved enables itself)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    for unit, target in (("systemd-networkd.service", wants),
                         ("systemd-networkd.socket", root / "etc/systemd/system/sockets.target.wants")):
        if (root / "lib/systemd/system" / unit).exists():
            target.mkdir(parents=True, exist_ok=True)
            link = target / unit
            if not link.is_symlink():
                link.symlink_to(f"/lib/systemd/system/{unit}")
    alias = root / "etc/systemd/system/dbus-org.freedesktop.network1.service"
    if (root / "lib/systemd/system/systemd-networkd.service").exists() and not alias.is_symlink():
        alias.symlink_to("/lib/systemd/system/systemd-networkd.service")
    # a fresh machine-id on first boot (systemd writes one when the file is empty: copies of the
    # image get distinct ids, hence distinct DHCP client ids) ...
    _write(root, "etc/machine-id", "", 0o444)
    # ... and that first boot must not stop at systemd-firstboot's prompts (locale, time zone) on
    # the serial console: the system is configured already
    firstboot = root / "etc/systemd/system/systemd-firstboot.service"
    if not firstboot.is_symlink():
        firstboot.unlink(missing_ok=True)
        firstboot.symlink_to("/dev/null")
    if spec.root_password is not None:
        _run_logged(["chroot", str(root), "chpasswd"], "setting the root password", logfile,
                    stdin=f"root:{spec.root_password}\n")
    if spec.ssh_keys is not None:
        (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
        _write(root, "root/.ssh/authorized_keys", spec.ssh_keys, 0o600)
        (root / "root/.ssh").chmod(0o700)
    # no host keys baked into an image that may be copied: generate them on first boot
    for k in (root / "etc/ssh").glob("ssh_host_*"):
        k.unlink()
    if (root / "etc/ssh").is_dir():
        _write(root, "etc/systemd/system/hypyr-ssh-keygen.service",
               "[Unit]\nDescription=Generate SSH host keys (hypyr system image)\n"
               "Before=ssh.service\nConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\n\n"
               "[Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n\n"
               "[Install]\nWantedBy=multi-user.target\n")
        link = wants / "hypyr-ssh-keygen.service"
        if not link.is_symlink():
            link.symlink_to("/etc/systemd/system/hypyr-ssh-keygen.service")
    # apt's downloaded packages and lists are not needed in the image
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for f in (root / d).glob("*"):
            if f.is_file() and f.name not in ("lock",):
                f.unlink()
    return release


def check_initramfs(root: Path, release: str) -> list[str]:
    """The INITRAMFS_MODULES the image's initrd lacks (listed with lsinitramfs; [] when it cannot run)."""
    lsinit = root / "usr/bin/lsinitramfs"
    if not lsinit.exists():
        return []
    p = subprocess.run([_tool("chroot") or "chroot", str(root), "lsinitramfs", f"/boot/initrd.img-{release}"],
                       capture_output=True, text=True, env=dict(os.environ, PATH=_path()))
    if p.returncode != 0:
        log.warning("lsinitramfs failed: %s", p.stderr.strip())
        return []
    names = {Path(l).name.split(".ko")[0] for l in p.stdout.splitlines() if ".ko" in l}
    builtin = (root / f"lib/modules/{release}/modules.builtin")
    built = {Path(l).name.split(".ko")[0] for l in builtin.read_text().splitlines()} if builtin.exists() else set()
    return [m for m in INITRAMFS_MODULES if m not in names and m not in built]


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            total += st.st_blocks * 512 if st.st_blocks else st.st_size
    return total


def make_ext4(root: Path, out: Path, size: int, logfile: Path) -> None:
    mke2fs = _mke2fs() or "mke2fs"
    _run_logged([mke2fs, "-q", "-F", "-t", "ext4", "-L", "hypyr-system", "-d", str(root), str(out),
                 f"{size // 1024}k"], f"mke2fs building {out}", logfile)


def build(spec: SystemSpec) -> Path:
    """Build the image described by ``spec`` (or nothing, when its stamp says it is current)."""
    if not spec.force and is_current(spec):
        debs.progress(f"the system image {spec.out} is up to date (built with these options)")
        return spec.out
    check_host(spec)
    t0 = time.monotonic()
    total = 5
    tmp_out = spec.out.with_name(f".{spec.out.name}.{os.getpid()}.tmp")
    work = Path(tempfile.mkdtemp(prefix="hypyr-system-", dir=os.environ.get("TMPDIR") or "/var/tmp"))
    logfile = work / "build.log"
    root = work / "root"
    ok = False
    try:
        _progress(1, total, f"installing Debian {SUITE} with mmdebstrap ({len(spec.all_packages())} packages "
                  "and their dependencies; a few minutes, about 110 MB to download)")
        _run_logged(mmdebstrap_args(spec, root), "mmdebstrap", logfile)
        _progress(2, total, "configuring: hostname, fstab, DHCP (systemd-networkd), root login, grub.cfg")
        release = configure(root, spec, logfile)
        _progress(3, total, f"checking the initramfs of Linux {release} for {', '.join(INITRAMFS_MODULES)}")
        missing = check_initramfs(root, release)
        if missing:
            raise SystemImageError(f"the initramfs /boot/initrd.img-{release} lacks {', '.join(missing)}, so the "
                                   f"system could not mount its root from {ROOT_DEVICE}")
        used = tree_bytes(root)
        if used * 1.1 + spec.size // 16 > spec.size:   # ext4's own: journal, inode tables (~1/16)
            raise SystemImageError(f"the system takes {used >> 20} MiB and does not fit in {spec.size >> 20} MiB: "
                                   f"give a larger --size (at least {int(used * 1.1 * 16 / 15) // (1 << 20) + 64}M)")
        _progress(4, total, f"making the ext4 image ({spec.size >> 20} MiB, {used >> 20} MiB used) with mke2fs -d")
        make_ext4(root, tmp_out, spec.size, logfile)
        _progress(5, total, "checking that hypyr's disk boot finds the kernel and initrd")
        from hypyr.image import diskboot
        try:
            with diskboot.load(str(tmp_out), tmp_parent=str(work)) as boot:
                if f"root={ROOT_DEVICE}" not in boot.cmdline.split() or not boot.initrd:
                    raise SystemImageError(f"the built image's default entry {boot.title!r} does not boot "
                                           f"root={ROOT_DEVICE} with an initrd")
        except HypyrError as e:
            raise SystemImageError(f"the built image would not boot: {e}") from None
        sp = stamp_path(spec.out)
        sp.unlink(missing_ok=True)
        tmp_out.replace(spec.out)
        fd = os.open(sp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(stamp_text(spec))
        ok = True
        debs.progress(f"built {spec.out} in {time.monotonic() - t0:.0f} s (Linux {release}; boot it with "
                      f"`hypyr run --disk {spec.out} --boot disk`)")
        return spec.out
    except KeyboardInterrupt:
        raise SystemImageError("interrupted; nothing was left behind") from None
    finally:
        tmp_out.unlink(missing_ok=True)
        if ok or not os.environ.get("HYPYR_KEEP_SYSTEM_WORK"):
            _rmtree(work)
        else:
            print(f"hypyr: the build's work directory is kept in {work}", file=sys.stderr)


def _rmtree(path: Path) -> None:
    """Remove the work directory.  mmdebstrap unmounts what it mounted; should anything still be
    mounted below (an interrupted run), it is unmounted first so rmtree never reaches the host's /dev."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [l.split()[1] for l in f]
    except OSError:
        mounts = []
    prefix = str(path) + "/"
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)
