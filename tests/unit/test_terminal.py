"""hypyr.console.Terminal: raw mode only on a tty it is attached to."""

import os
import pty
import termios

from hypyr.console import Terminal


def test_raw_mode_while_attached_and_restored_after():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with Terminal(slave) as term:
            assert term.is_tty
            assert not termios.tcgetattr(slave)[3] & termios.ICANON   # raw: no line editing
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_not_attached_leaves_the_terminal_alone():
    """`hypyr run --no-input`: a background job must not touch the terminal (SIGTTOU would stop it)."""
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with Terminal(slave, attach=False) as term:
            assert not term.is_tty
            assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)
