"""Boot loader configs as found on a guest's disk: GRUB 2's grub.cfg and extlinux/syslinux.

Pure parsing, no I/O: ``parse_grub(text)`` and ``parse_extlinux(text)`` give a ``BootConfig``
whose ``select(name)`` picks the entry to boot (the config's default, or the one named).  The
aim is pygrub's: boot what GRUB would boot by default, without running GRUB.

grub.cfg is read as GRUB's shell would, minus what cannot be evaluated without GRUB: ``if``/
``else``/``fi`` are transparent (both branches' ``set`` commands run, in order, so the usual
``if [ "${next_entry}" ]; then set default="${next_entry}" ... else set default="0" fi`` ends with
the else branch's value), ``$var``/``${var}`` expand from ``set`` and the grubenv block; a variable
that is not known is left as written, with a warning when it is in a ``linux``/``initrd`` line.
``menuentry`` and ``submenu`` blocks nest; ``default`` is GRUB's ``>``-separated path of items at
each level (an index counting entries and submenus, a title, or an ``--id``/``$menuentry_id_option``
id).  ``linux``/``linux16``/``linuxefi`` and ``initrd``/``initrd16``/``initrdefi`` (several files:
concatenated, as GRUB does); ``set root=`` and ``search ... --set=root`` say where the files are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_NESTING = 16


class BootConfigError(ValueError):
    """A config that cannot be parsed, or has no entry to boot; str() is a sentence fragment
    that the caller prefixes with the file's name."""


@dataclass
class BootEntry:
    title: str
    kernel: str | None = None           # as written: may start with "(hd0,gpt2)"
    initrds: list[str] = field(default_factory=list)
    cmdline: str = ""
    root: str | None = None             # GRUB's $root for this entry ("hd0,gpt2", "uuid=...", ...)
    id: str | None = None
    multiboot: bool = False
    index: str = ""                     # its place as a GRUB default path, e.g. "1>2"
    warnings: list[str] = field(default_factory=list)   # about this entry alone


@dataclass
class Submenu:
    title: str
    items: list = field(default_factory=list)
    id: str | None = None
    index: str = ""


@dataclass
class BootConfig:
    kind: str                            # "grub" or "extlinux"
    items: list                          # BootEntry and Submenu
    default: str = "0"
    warnings: list[str] = field(default_factory=list)

    def entries(self) -> list[BootEntry]:
        """Every bootable entry, submenus' included, in file order."""
        out: list[BootEntry] = []

        def walk(items):
            for it in items:
                if isinstance(it, Submenu):
                    walk(it.items)
                else:
                    out.append(it)
        walk(self.items)
        return out

    def select(self, name: str | None = None) -> BootEntry:
        """The entry named by ``name`` (a title, an id, an index or a GRUB path such as ``1>2``),
        or the config's default; BootConfigError if there is none."""
        if not self.entries():
            raise BootConfigError("has no boot entries")
        if name is not None:
            entry = self._by_path(name) or next((e for e in self.entries() if name in (e.title, e.id)), None)
            if entry is None:
                titles = ", ".join(repr(e.title) for e in self.entries()[:8])
                raise BootConfigError(f"has no entry {name!r} (its entries: {titles})")
            return entry
        entry = self._by_path(self.default)
        if entry is None:
            self.warnings.append(f"the default entry {self.default!r} is not in the menu: booting the first entry")
            entry = self.entries()[0]
        return entry

    def _by_path(self, path: str) -> BootEntry | None:
        items = self.items
        parts = path.split(">")
        for n, part in enumerate(parts):
            part = part.strip()
            found = None
            if re.fullmatch(r"\d+", part):
                found = items[int(part)] if int(part) < len(items) else None
            else:
                found = next((it for it in items if part in (it.title, it.id)), None)
            if found is None:
                return None
            if isinstance(found, Submenu):
                if n == len(parts) - 1:    # a submenu as the default: GRUB shows it; boot its first
                    return next(iter(BootConfig("grub", found.items).entries()), None)
                items = found.items
            elif n == len(parts) - 1:
                return found
            else:
                return None
        return None


# --------------------------------------------------------------------------- GRUB 2

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*|[0-9]+|[?#])\}|([A-Za-z_][A-Za-z0-9_]*|[0-9]+|[?#]))")
_KERNEL_CMDS = ("linux", "linux16", "linuxefi")
_INITRD_CMDS = ("initrd", "initrd16", "initrdefi")


# A word is a list of (text, expands) segments: single-quoted text never expands.
_Seg = tuple[str, bool]


def _split(text: str) -> list[tuple[list[list[_Seg]], int] | tuple[str, int]]:  # noqa: C901 (too complex: pyproject.toml)
    """GRUB script → commands (lists of words) and the tokens "{" and "}", each with its line."""
    out: list = []
    words: list[list[_Seg]] = []
    cur: list[_Seg] | None = None
    i, n, line = 0, len(text), 1

    def end_word():
        nonlocal cur
        if cur is not None:
            words.append(cur)
        cur = None

    def end_cmd():
        nonlocal words
        end_word()
        if words:
            out.append((words, line))
        words = []

    while i < n:
        c = text[i]
        if c in " \t\r":
            end_word()
            i += 1
        elif c in "\n;":
            end_cmd()
            line += c == "\n"
            i += 1
        elif c == "#" and cur is None:
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{}" and cur is None and (i + 1 == n or text[i + 1] in " \t\r\n;"):
            end_cmd()
            out.append((c, line))
            i += 1
        elif c == "\\":
            if i + 1 < n and text[i + 1] == "\n":
                line += 1
            elif i + 1 < n:
                cur = (cur or []) + [(text[i + 1], False)]
            i += 2
        elif c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise BootConfigError(f"has an unterminated ' quote on line {line}")
            cur = (cur or []) + [(text[i + 1:j], False)]
            line += text.count("\n", i, j)
            i = j + 1
        elif c == '"':
            j, buf = i + 1, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n and text[j + 1] in '"\\$\n':
                    buf.append("" if text[j + 1] == "\n" else text[j + 1])
                    j += 2
                else:
                    buf.append(text[j])
                    j += 1
            if j >= n:
                raise BootConfigError(f'has an unterminated " quote on line {line}')
            cur = (cur or []) + [("".join(buf), True)]
            line += text.count("\n", i, j)
            i = j + 1
        else:
            j = i + 1
            while j < n and text[j] not in " \t\r\n;'\"\\":
                j += 1
            cur = (cur or []) + [(text[i:j], True)]
            i = j
    end_cmd()
    return out


def _expand(word: list[_Seg], env: dict[str, str], unknown: set[str]) -> str:
    def sub(m):
        name = m.group(1) or m.group(2)
        if name in env:
            return env[name]
        unknown.add(name)
        return m.group(0)
    return "".join(_VAR.sub(sub, text) if expands else text for text, expands in word)


def _root_from(words: list[str]) -> str | None:
    """GRUB's root device from ``set root=...`` or a ``search`` command, as a hint string:
    "hd0,gpt2", "uuid=...", "label=...", "file=..."."""
    if words[0] == "set":
        return words[1].partition("=")[2].strip("()") or None
    kind = {"search.fs_uuid": "uuid", "search.fs_label": "label", "search.file": "file"}.get(words[0])
    args, rest, sets_root = words[1:], [], kind is not None
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--fs-uuid", "-u"):
            kind = "uuid"
        elif a in ("--label", "-l"):
            kind = "label"
        elif a in ("--file", "-f"):
            kind = "file"
        elif a == "--set=root" or (a in ("--set", "-s") and i + 1 < len(args) and args[i + 1] == "root"):
            sets_root = True
            i += a != "--set=root"
        elif a.startswith("--hint") and "=" not in a:
            i += 1
        elif not a.startswith("-"):
            rest.append(a)
        i += 1
    if words[0].startswith("search.") and len(rest) > 1 and rest[-1] != "root":
        sets_root = False              # search.fs_uuid UUID VAR: sets VAR, not root
    if sets_root and kind and rest:
        return f"{kind}={rest[0]}"
    return None


def parse_grub(text: str, env: dict[str, str] | None = None) -> BootConfig:  # noqa: C901 (too complex: pyproject.toml)
    """Parse grub.cfg text; ``env`` holds the grubenv block's variables (saved_entry, ...)."""
    env = dict(env or {})
    cfg = BootConfig("grub", [], default="0")
    # the open blocks: (their item list, the menuentry/submenu or None for if/function, root before)
    stack: list[tuple[list, BootEntry | Submenu | None, str | None]] = [(cfg.items, None, None)]
    root: str | None = None
    for tok, line in _split(text):
        items, block, _ = stack[-1]
        if tok == "{":
            continue              # a menuentry's "{" is taken with its command below
        if tok == "}":
            if len(stack) > 1:
                _, closed, root_before = stack.pop()
                if isinstance(closed, BootEntry):
                    root = root_before   # a `set root` inside an entry is that entry's own
            continue
        assert isinstance(tok, list)
        unknown: set[str] = set()
        words = [_expand(w, env, unknown) for w in tok]
        cmd = words[0]
        if cmd in ("menuentry", "submenu"):
            if len(words) < 2 or words[1] == "{":
                raise BootConfigError(f"has a {cmd} without a title on line {line}")
            if len(stack) > MAX_NESTING:
                raise BootConfigError(f"nests menus too deeply (line {line})")
            ident = next((b for a, b in zip(tok, words[1:])
                          if _expand(a, {}, set()) in ("--id", "$menuentry_id_option", "${menuentry_id_option}")),
                         None)
            index = f"{block.index}>{len(items)}" if isinstance(block, Submenu) else str(len(items))
            new: BootEntry | Submenu
            if cmd == "menuentry":
                new = BootEntry(words[1], root=root, id=ident, index=index)
                stack.append(([], new, root))
            else:
                new = Submenu(words[1], id=ident, index=index)
                stack.append((new.items, new, root))
            items.append(new)
            continue
        if cmd == "set" and len(words) > 1 and "=" in words[1]:
            name, _, value = words[1].partition("=")
            env[name] = value
            if name == "default":
                cfg.default = value
            elif name == "root":
                root = _root_from(words)
                if isinstance(block, BootEntry):
                    block.root = root
            continue
        if cmd == "unset":
            for name in words[1:]:
                env.pop(name, None)
            continue
        if cmd.startswith("search"):
            hint = _root_from(words)
            if hint:
                root = hint
                if isinstance(block, BootEntry):
                    block.root = root
            continue
        if isinstance(block, BootEntry):
            if cmd in _KERNEL_CMDS and len(words) > 1:
                block.kernel = words[1]
                block.cmdline = " ".join(_linux_arg(a) for a in words[2:])
                _warn_unknown(block, unknown)
            elif cmd in _INITRD_CMDS:
                block.initrds = words[1:]
                _warn_unknown(block, unknown)
            elif cmd in ("multiboot", "multiboot2", "chainloader", "kernel", "appleloader"):
                block.multiboot = True
    if len(stack) > 1:
        what = stack[-1][1]
        raise BootConfigError(f"ends inside {what.title!r} (a missing }})" if what else "ends inside a block")
    return cfg


def _linux_arg(arg: str) -> str:
    if " " in arg and "=" in arg:
        k, _, v = arg.partition("=")
        return f'{k}="{v}"'
    return arg


def _warn_unknown(entry: BootEntry, unknown: set[str]) -> None:
    names = sorted(unknown)
    if names:
        entry.warnings.append(f"entry {entry.title!r}: {', '.join('$' + n for n in names)} "
                            f"{'is' if len(names) == 1 else 'are'} not known here and left as written")


def parse_grubenv(text: str) -> dict[str, str]:
    """GRUB's environment block (/boot/grub/grubenv): NAME=VALUE lines, # padding."""
    env = {}
    for line in text.split("\n"):
        if line and not line.startswith("#") and "=" in line:
            k, _, v = line.partition("=")
            env[k] = v
    return env


# --------------------------------------------------------------------------- extlinux / syslinux

def parse_extlinux(text: str) -> BootConfig:
    """extlinux.conf / syslinux.cfg: DEFAULT, LABEL, KERNEL/LINUX, INITRD, APPEND, MENU LABEL,
    MENU DEFAULT (keywords in any case).  A DEFAULT that names no label is a kernel and its
    arguments, as syslinux reads it."""
    cfg = BootConfig("extlinux", [], default="")
    entry: BootEntry | None = None
    menu_default: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, rest = line.partition(" ")
        key, rest = key.lower(), rest.strip()
        if key == "menu":
            sub, _, arg = rest.partition(" ")
            if sub.lower() == "label" and entry is not None:
                entry.id = entry.title
                entry.title = arg.strip().replace("^", "")
            elif sub.lower() == "default" and entry is not None:
                menu_default = entry.id or entry.title
            continue
        if key == "default":
            cfg.default = rest
        elif key == "label":
            entry = BootEntry(rest, index=str(len(cfg.items)), id=rest)
            cfg.items.append(entry)
        elif entry is None:
            continue
        elif key in ("kernel", "linux"):
            entry.kernel = rest
        elif key == "initrd":
            entry.initrds = [p for p in rest.split(",") if p]
        elif key == "append":
            args = []
            for a in rest.split():
                if a.startswith("initrd=") and not entry.initrds:
                    entry.initrds = [p for p in a[7:].split(",") if p]
                else:
                    args.append(a)
            entry.cmdline = " ".join(args)
        elif key in ("com32", "boot", "bss", "pxe", "fdimage", "comboot"):
            entry.multiboot = True
    if menu_default is not None:
        cfg.default = menu_default
    if cfg.default and not any(cfg.default in (e.title, e.id) for e in cfg.entries()):
        words = cfg.default.split()
        if words and not cfg.entries():   # "DEFAULT vmlinuz root=..." with no LABELs
            cfg.items.insert(0, BootEntry(cfg.default, kernel=words[0], cmdline=" ".join(words[1:]), index="0"))
            for i, it in enumerate(cfg.items):
                it.index = str(i)
            cfg.default = "0"
    elif not cfg.default:
        cfg.default = "0"
    return cfg
