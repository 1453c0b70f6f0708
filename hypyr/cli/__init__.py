"""The `hypyr` command line: its parser and dispatch.  The commands live by concern in
:mod:`hypyr.cli.run`, :mod:`hypyr.cli.host` and :mod:`hypyr.cli.domains`; each module adds its
own commands' parsers, and a command line builds only the parser of the command it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from hypyr.cli.common import EXIT_ERROR, say
from hypyr.errors import HypyrError

# each module of hypyr.cli and the commands it adds, in the order `hypyr --help` lists them
COMMAND_MODULES = {
    "run": ("run",),
    "host": ("doctor", "image", "lab"),
    "domains": ("create", "list", "console", "pause", "unpause", "shutdown", "reboot", "destroy", "trigger",
                "save", "restore", "migrate", "migrate-receive", "vcpu-list", "vcpu-pin", "sched-credit",
                "net-create", "net-list", "net-destroy", "network-list", "info", "top", "serve"),
}


def _setup_logging(verbose: int) -> None:
    from hypyr.toolstack import logs
    logs.setup(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


class _NotBuilt:
    """Stands in for the parser of a command this command line does not run (see build_parser)."""

    def __getattr__(self, name: str) -> Callable[..., _NotBuilt]:
        return lambda *args, **kwargs: self


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it ($COLUMNS, then stdout's
    terminal, else 80), without importing shutil (with bz2 and lzma: ~2 ms of every start)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):
            pass
    return columns if columns > 0 else 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, sized by :func:`_columns` (argparse makes one per argument added)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """argparse's parser with :class:`_Formatter`; its subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


class _OnlyCommand:
    """The subcommands, of which only ``only`` gets a real parser."""

    def __init__(self, sub: argparse._SubParsersAction, only: str):
        self.sub, self.only = sub, only

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        return self.sub.add_parser(name, **kwargs) if name == self.only else _NotBuilt()


def _command_word(argv: list[str]) -> str | None:
    """The command of ``argv`` (its first word that is not an option), or None for help."""
    for arg in argv:
        if arg in ("-h", "--help", "--"):
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with ``only``, with that command's parser alone (building them
    all takes longer than the rest of a `hypyr run` start-up's argument handling), or all if
    ``only`` is not a command."""
    modules = [m for m, names in COMMAND_MODULES.items() if only is None or only in names]
    if not modules:
        return build_parser()  # not a command: the whole parser says so, and lists them
    p = _Parser(prog="hypyr", description="A Xen-style hypervisor in Python on Linux KVM.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    common = _Parser(add_help=False)  # so `hypyr run -v` works as well as `hypyr -v run`
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output")
    sub: Any = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    if only is not None:
        sub = _OnlyCommand(sub, only)
    for name in modules:
        importlib.import_module(f"hypyr.cli.{name}").add_commands(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_word(argv)).parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except HypyrError as e:
        say(f"error: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
