"""hypyr.console.Terminal: raw mode only on a tty it is attached to."""

import os
import pty
import termios

import pytest

from hypyr.console import Terminal


@pytest.fixture
def slave():
    """The terminal end of a fresh pty (both ends closed afterwards)."""
    master, slave = pty.openpty()
    yield slave
    os.close(master)
    os.close(slave)


def test_raw_mode_while_attached_and_restored_after(slave):
    before = termios.tcgetattr(slave)
    with Terminal(slave) as term:
        assert term.is_tty
        assert not termios.tcgetattr(slave)[3] & termios.ICANON   # raw: no line editing
    assert termios.tcgetattr(slave) == before


def test_not_attached_leaves_the_terminal_alone(slave):
    """`hypyr run --no-input`: a background job must not touch the terminal (SIGTTOU would stop it)."""
    before = termios.tcgetattr(slave)
    with Terminal(slave, attach=False) as term:
        assert not term.is_tty
        assert termios.tcgetattr(slave) == before


def test_a_background_job_leaves_the_terminal_alone(slave):
    """A process not in its terminal's foreground group (as under timeout(1)) must not set raw mode:
    the kernel would stop it with SIGTTOU, before its guest ever ran."""
    import fcntl
    import subprocess
    import sys

    def own_session_with_the_pty():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)      # the pty is now our controlling terminal

    child = ("import os, termios\n"
             "from hypyr.console import Terminal\n"
             "if os.fork() == 0:\n"
             "    os.setpgid(0, 0)\n"                # a new process group: a background job of the pty
             "    before = termios.tcgetattr(0)\n"
             "    with Terminal() as t:\n"
             "        print(t.background, t.is_tty, termios.tcgetattr(0) == before, flush=True)\n"
             "    os._exit(0)\n"
             "os.wait()\n")
    p = subprocess.run([sys.executable, "-c", child], stdin=slave, capture_output=True, text=True,
                       timeout=30, preexec_fn=own_session_with_the_pty)
    assert p.stdout.split() == ["True", "False", "True"], p.stdout + p.stderr
