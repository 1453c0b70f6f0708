"""Fetch Debian packages without installing them, and work out kernel-module load order.

Packages are fetched with `apt-get download` into a cache directory and unpacked with
`dpkg-deb -x`; both steps are skipped when the cached file is already there. Module order comes
from the kernel's `modules.dep` when the package ships one, otherwise from the `depends=` field of
each module's `.modinfo` ELF section (Debian's kernel packages leave `modules.dep` to `depmod`
at install time, which never runs here).
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hypyr.errors import HypyrError
from hypyr.image.default import hypyr_cache

log = logging.getLogger("hypyr.image")

_MOD_SUFFIXES = (".ko", ".ko.xz", ".ko.zst")
_updated = False  # `apt-get update` is run at most once per process


def progress(msg: str) -> None:
    """One progress line on stderr for long-running steps."""
    print(f"hypyr: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where downloaded and unpacked packages are kept (env HYPYR_DEB_CACHE overrides)."""
    return hypyr_cache("debs", "HYPYR_DEB_CACHE")


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise HypyrError(f"The command {args[0]} is missing; hypyr needs a Debian-based system with apt and dpkg.")
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)


def apt_update_once() -> None:
    global _updated
    if _updated:
        return
    _updated = True
    progress("refreshing the apt package lists (apt-get update)")
    r = _run(["apt-get", "update"])
    if r.returncode != 0:
        log.warning("apt-get update failed: %s", r.stderr.strip())


def _retry_after_update(fn):
    try:
        return fn()
    except HypyrError:
        if _updated:
            raise
        apt_update_once()
        return fn()


def resolve_package(name: str) -> str:
    """Turn a metapackage such as linux-image-cloud-amd64 into the concrete package it pulls in.

    A package that ships its own files (busybox-static, linux-image-6.1.0-NN-amd64,
    linux-image-6.12.NN+deb12-cloud-amd64) is returned unchanged; a series metapackage such as
    linux-image-6.12-cloud-amd64 is resolved too.
    """
    if not name.startswith("linux-image-") or re.match(r"linux-image-\d+\.\d+\.\d+", name):
        return name

    def lookup() -> str:
        r = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", name])
        for line in r.stdout.splitlines():
            m = re.match(r"\s*\|?Depends:\s*(linux-image-\d\S*)", line)
            if m:
                return m.group(1)
        raise HypyrError(f"apt-cache could not resolve {name} to a kernel package; check that apt sources are "
                         "configured.")

    return _retry_after_update(lookup)


@dataclass(frozen=True)
class DebInfo:
    package: str
    filename: str
    size: int
    sha256: str | None


def deb_info(package: str) -> DebInfo:
    """What `apt-get download` would fetch for `package` (file name, size, hash), without fetching."""

    def lookup() -> DebInfo:
        r = _run(["apt-get", "download", "--print-uris", package])
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0].startswith("'") and parts[1].endswith(".deb"):
                sha = parts[3].split(":", 1)[1].lower() if len(parts) >= 4 and parts[3].startswith("SHA256:") else None
                return DebInfo(package, parts[1], int(parts[2]), sha)
        raise HypyrError(f"apt-get cannot find the package {package}; check that apt sources are configured.")

    return _retry_after_update(lookup)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached_fallback(package: str, cache: Path) -> Path | None:
    hits = sorted(cache.glob(f"{package}_*.deb"))
    return hits[-1] if hits else None


def download(package: str, cache: Path | None = None) -> Path:
    """Return the path of `package`'s .deb in the cache, downloading it only if not there yet."""
    cache = Path(cache) if cache else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        info = deb_info(package)
    except HypyrError:
        fallback = _cached_fallback(package, cache)
        if fallback is None:
            raise
        log.info("apt cannot look up %s; using cached %s", package, fallback.name)
        return fallback
    path = cache / info.filename
    if path.exists() and path.stat().st_size == info.size:
        log.info("using cached %s", path.name)
        return path
    progress(f"downloading {info.package} ({info.size / 1e6:.1f} MB)")

    def fetch() -> None:
        r = _run(["apt-get", "download", package], cwd=cache)
        if r.returncode != 0 or not path.exists():
            lines = r.stderr.strip().splitlines() or ["no output"]
            raise HypyrError(f"apt-get download {package} failed: {lines[-1]}")

    _retry_after_update(fetch)
    if info.sha256 and _sha256(path) != info.sha256:
        path.unlink()
        raise HypyrError(f"The downloaded {info.filename} does not match its checksum; run the command again.")
    return path


def extract(deb: Path, dest: Path | None = None) -> Path:
    """Unpack `deb` with dpkg-deb -x (once; a marker file records a complete unpack)."""
    deb = Path(deb)
    dest = Path(dest) if dest else deb.parent / "unpacked" / deb.name.removesuffix(".deb")
    marker = dest / ".hypyr-unpacked"
    if marker.exists():
        return dest
    progress(f"unpacking {deb.name}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    r = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if r.returncode != 0:
        raise HypyrError(f"dpkg-deb could not unpack {deb.name}: {r.stderr.strip()}")
    marker.write_text(deb.name + "\n")
    return dest


def fetch(package: str, cache: Path | None = None) -> tuple[Path, Path]:
    """Resolve, download and unpack `package`; return (deb path, unpacked root)."""
    deb = download(resolve_package(package), cache)
    return deb, extract(deb)


def file_sha256(path: Path) -> str:
    return _sha256(Path(path))


# --------------------------------------------------------------------------------------------
# Kernel modules


def mod_name(path_or_name: str) -> str:
    """Canonical module name: basename without .ko[.xz|.zst], with '-' turned into '_'."""
    base = path_or_name.rsplit("/", 1)[-1]
    for suf in _MOD_SUFFIXES:
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    return base.replace("-", "_")


def kernel_release(root: Path) -> str:
    """The single kernel release under ROOT/lib/modules (ROOT is an unpacked kernel package)."""
    mods = Path(root) / "lib" / "modules"
    versions = sorted(p.name for p in mods.iterdir() if p.is_dir()) if mods.is_dir() else []
    if len(versions) != 1:
        raise HypyrError(f"Expected one kernel under {mods}, found {len(versions)}.")
    return versions[0]


def read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressing .ko.xz with lzma and .ko.zst with the zstd tool."""
    path = Path(path)
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise HypyrError(f"The module {path.name} is zstd-compressed and the zstd command is missing; install "
                             "the zstd package.")
        r = subprocess.run(["zstd", "-dc", str(path)], capture_output=True)
        if r.returncode != 0:
            raise HypyrError(f"zstd could not decompress {path.name}.")
        return r.stdout
    return path.read_bytes()


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """Parse the `.modinfo` section of a 64-bit little-endian ELF module."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise HypyrError("A kernel module is not a 64-bit little-endian ELF file.")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def sec(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = sec(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, off, size = sec(i)
        end = elf.index(b"\0", stroff + name_off)
        if elf[stroff + name_off:end] == b".modinfo":
            for item in elf[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


@dataclass
class ModuleSet:
    """Result of resolving module names: `ordered` paths (relative to the modules dir)."""

    ordered: list[str] = field(default_factory=list)
    builtin: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class ModuleTree:
    """An unpacked `lib/modules/VERSION/` directory."""

    def __init__(self, moddir: Path):
        self.dir = Path(moddir)
        if not self.dir.is_dir():
            raise HypyrError(f"The kernel modules directory {self.dir} does not exist.")
        self._deps: dict[str, list[str]] = {}  # relpath -> dependency relpaths
        self._by_name: dict[str, str] = {}  # canonical name -> relpath
        self._from_dep_file = (self.dir / "modules.dep").is_file()
        if self._from_dep_file:
            for line in (self.dir / "modules.dep").read_text().splitlines():
                if ":" not in line:
                    continue
                mod, deps = line.split(":", 1)
                mod = mod.strip()
                self._deps[mod] = deps.split()
                self._by_name.setdefault(mod_name(mod), mod)
        else:
            for p in sorted(self.dir.rglob("*")):
                if p.name.endswith(_MOD_SUFFIXES) and p.is_file():
                    rel = p.relative_to(self.dir).as_posix()
                    self._by_name.setdefault(mod_name(rel), rel)
        self.builtin: set[str] = set()
        builtin = self.dir / "modules.builtin"
        if builtin.is_file():
            self.builtin = {mod_name(l.strip()) for l in builtin.read_text().splitlines() if l.strip()}

    def path_of(self, name: str) -> str | None:
        return self._by_name.get(mod_name(name))

    def deps_of(self, rel: str) -> list[str]:
        if rel not in self._deps:
            info = modinfo(read_module(self.dir / rel))
            names = [d for v in info.get("depends", []) for d in v.split(",") if d]
            deps = []
            for d in names:
                p = self.path_of(d)
                if p is None:
                    if mod_name(d) in self.builtin:
                        continue
                    raise HypyrError(f"The module {mod_name(rel)} needs {d}, which the kernel package lacks.")
                deps.append(p)
            self._deps[rel] = deps
        return self._deps[rel]

    def resolve(self, names: list[str]) -> ModuleSet:
        """Order the modules for `names` and everything they need, dependencies first.

        Built-in modules are skipped; unknown ones are skipped with a log line.
        """
        result = ModuleSet()
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(rel: str) -> None:
            if rel in done:
                return
            if rel in visiting:
                raise HypyrError(f"The kernel modules have a dependency loop through {mod_name(rel)}.")
            visiting.add(rel)
            # modules.dep lists the deepest dependency last; visit in reverse so the
            # order matches what modprobe would load.
            for dep in reversed(self.deps_of(rel)):
                visit(dep)
            visiting.discard(rel)
            done.add(rel)
            result.ordered.append(rel)

        for name in names:
            rel = self.path_of(name)
            if rel is None:
                if mod_name(name) in self.builtin:
                    log.info("module %s is built into the kernel", name)
                    result.builtin.append(name)
                else:
                    log.info("module %s is not in the kernel package; skipping it", name)
                    result.missing.append(name)
                continue
            visit(rel)
        return result


def module_order(moddir: Path, names: list[str]) -> list[str]:
    """Relative paths of the .ko files to insert for `names`, dependencies first."""
    return ModuleTree(moddir).resolve(names).ordered


# --------------------------------------------------------------------------------------------
# Dynamically linked programs: the interpreter and shared libraries they need

LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")


def elf_dynamic(elf: bytes) -> tuple[str | None, list[str]]:
    """(PT_INTERP path, DT_NEEDED names) of a 64-bit little-endian ELF file; (None, []) if static."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise HypyrError("A program or library is not a 64-bit little-endian ELF file.")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    loads, interp, dyn = [], None, None
    for i in range(phnum):
        p_type, _flags, off, vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((vaddr, off, filesz))
        elif p_type == 3:  # PT_INTERP
            interp = elf[off:off + filesz].split(b"\0", 1)[0].decode()
        elif p_type == 2:  # PT_DYNAMIC
            dyn = (off, filesz)
    if dyn is None:
        return interp, []
    needed, strtab = [], None
    for off in range(dyn[0], dyn[0] + dyn[1], 16):
        tag, val = struct.unpack_from("<qQ", elf, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            needed.append(val)
        elif tag == 5:  # DT_STRTAB (a virtual address)
            strtab = val
    if not needed:
        return interp, []
    base = next((off + strtab - vaddr for vaddr, off, size in loads if vaddr <= strtab < vaddr + size), None)
    if base is None:
        raise HypyrError("An ELF file's dynamic string table lies outside its loaded segments.")
    return interp, [elf[base + n:elf.index(b"\0", base + n)].decode() for n in needed]


def _in_root(root: Path, rel: str) -> Path | None:
    """ROOT/REL with symbolic links resolved inside ROOT (absolute targets are re-rooted)."""
    path = Path(root)
    parts = [p for p in rel.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            path = path.parent if path != Path(root) else path
            continue
        nxt = path / part
        if nxt.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(nxt)
            if target.startswith("/"):
                path = Path(root)
            parts = [p for p in target.split("/") if p] + parts
            continue
        path = nxt
    return path if path.is_file() else None


def program_closure(roots: list[Path], programs: list[str]) -> dict[str, Path]:
    """Archive path -> host file for `programs` (paths such as 'usr/bin/iperf3', looked up in the
    unpacked package `roots`), their ELF interpreter and every shared library they need,
    recursively. Libraries go to lib/x86_64-linux-gnu/<name>, the interpreter to its PT_INTERP path.
    """

    def find(rel: str) -> Path | None:
        for root in roots:
            hit = _in_root(Path(root), rel)
            if hit:
                return hit
        return None

    out: dict[str, Path] = {}
    todo: list[tuple[str, Path]] = []
    for prog in programs:
        host = find(prog)
        if host is None:
            raise HypyrError(f"No package provides {prog}.")
        todo.append((prog.lstrip("/"), host))
    while todo:
        dest, host = todo.pop(0)
        if dest in out:
            continue
        out[dest] = host
        interp, needed = elf_dynamic(host.read_bytes())
        if interp and interp.lstrip("/") not in out:
            ihost = find(interp)
            if ihost is None:
                raise HypyrError(f"No package provides the ELF interpreter {interp} that {dest} needs.")
            todo.append((interp.lstrip("/"), ihost))
        for lib in needed:
            dest_lib = f"{LIB_DIRS[0]}/{lib}"
            if dest_lib in out:
                continue
            lhost = next((h for d in LIB_DIRS if (h := find(f"{d}/{lib}"))), None)
            if lhost is None:
                raise HypyrError(f"No package provides the library {lib} that {dest} needs.")
            todo.append((dest_lib, lhost))
    return out
