"""The seccomp filter builder (hypyr/vmm/seccomp.py): every check runs in a forked child, so
that no filter ever binds a thread of the test process.  Needs libseccomp.so.2."""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

from hypyr.errors import HypyrError
from hypyr.libc import LIBC
from hypyr.vmm import seccomp

try:
    seccomp._libseccomp()
except seccomp.SeccompError:
    pytest.skip("libseccomp is not installed", allow_module_level=True)

libc = LIBC
SIGSYS = signal.SIGSYS


def in_child(fn, kind: str = "vcpu", mode: str = "kill"):
    """Fork; the child installs ``kind``'s filter in ``mode``, runs ``fn`` and exits 0 (or 3 if it
    raised).  Returns the signal that killed the child, or ("exit", status)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            seccomp.install(kind, mode)
            fn()
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else ("exit", os.WEXITSTATUS(status))


OK = ("exit", 0)


# -- the lists --------------------------------------------------------------------------------------
def test_no_kind_allows_a_denied_syscall():
    for kind, allowed in seccomp.ALLOW.items():
        assert not allowed & seccomp.DENIED, kind
    assert set(seccomp.KINDS) == set(seccomp.ALLOW)


def test_every_allowed_name_is_an_x86_64_syscall():
    unknown = {name for allowed in seccomp.ALLOW.values() for name in allowed if seccomp.syscall_number(name) is None}
    assert not unknown


def test_syscall_names_and_numbers():
    assert seccomp.syscall_number("futex") == 202 and seccomp.syscall_name(202) == "futex"
    assert seccomp.syscall_number("no_such_call") is None


def test_bad_mode_is_one_sentence():
    with pytest.raises(HypyrError, match=r"^seccomp must be one of kill, log, off, not 'strict'$"):
        seccomp.check_mode("strict")
    assert seccomp.check_mode("log") == "log"
    with pytest.raises(ValueError):
        seccomp.build("gpu", "kill")


def test_off_installs_nothing():
    def check():
        assert not seccomp.filtered()
        seccomp.forbidden_syscall()
    assert in_child(check, mode="off") == OK


# -- kill, log, the architecture ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", seccomp.KINDS)
def test_allowed_works_and_forbidden_kills(kind):
    def allowed():
        assert seccomp.filtered()
        fd = os.open("/dev/null", os.O_RDONLY)
        os.read(fd, 1)
        os.close(fd)
        os.getpid()
    assert in_child(allowed, kind) == OK
    assert in_child(seccomp.forbidden_syscall, kind) == SIGSYS


@pytest.mark.parametrize("kind", seccomp.KINDS)
def test_log_mode_lets_it_through(kind):
    def check():
        assert seccomp.filtered()
        assert seccomp.forbidden_syscall() >= 0     # personality(0xffffffff) ran: only a query
    assert in_child(check, kind, "log") == OK


@pytest.mark.parametrize("mode", ["kill", "log"])
def test_x32_syscalls_kill_in_every_mode(mode):
    assert in_child(lambda: libc.syscall(0x40000000 | 39), "main", mode) == SIGSYS   # x32 getpid


@pytest.mark.parametrize("name,args", [("execve", (b"/bin/true", None, None)), ("ptrace", (0, 0, 0, 0)),
                                       ("unshare", (0,)), ("bpf", (0, 0, 0)), ("setuid", (0,)),
                                       ("mount", (b"none", b"/", b"tmpfs", 0, 0)), ("userfaultfd", (0,)),
                                       ("keyctl", (0, 0)), ("kexec_load", (0, 0, 0, 0)), ("perf_event_open", (0,) * 5),
                                       ("process_vm_readv", (0,) * 6), ("fork", ())])
def test_denied_syscalls_kill_every_kind(name, args):
    nr = seccomp.syscall_number(name)
    for kind in seccomp.KINDS:
        assert in_child(lambda: libc.syscall(nr, *args), kind) == SIGSYS, (name, kind)


# -- clone, clone3, socket, ioctl -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", seccomp.KINDS)
def test_threads_yes_processes_no(kind):
    def thread():
        t = threading.Thread(target=os.getpid)
        t.start()
        t.join()
    assert in_child(thread, kind) == OK
    assert in_child(os.fork, kind) == SIGSYS

    def no_clone3():
        assert libc.syscall(seccomp.syscall_number("clone3"), 0, 0) == -1
        assert ctypes.get_errno() == errno.ENOSYS
    assert in_child(no_clone3, kind) == OK


def test_socket_only_on_control_threads_and_not_af_packet():
    def unix():
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    assert in_child(unix, "control") == OK
    for kind in ("vcpu", "io", "main"):
        assert in_child(unix, kind) == SIGSYS, kind
    assert in_child(lambda: libc.syscall(41, 17, 3, 0), "control") == SIGSYS          # AF_PACKET
    assert in_child(lambda: libc.syscall(41, 16, 3, 9), "control") == SIGSYS          # NETLINK_AUDIT


def test_terminal_injection_is_denied_even_with_high_bits():
    def tiocsti(request):
        def f():
            fd = os.open("/dev/null", os.O_RDONLY)
            libc.syscall(16, fd, ctypes.c_ulong(request), 0)
        return f
    assert in_child(tiocsti(0x5401)) == OK             # TCGETS (isatty) is fine
    assert in_child(tiocsti(0x5412)) == SIGSYS
    assert in_child(tiocsti(0x1_0000_5412)) == SIGSYS  # the kernel reads only the low 32 bits
    assert in_child(tiocsti(0x5412), mode="log") == OK


def test_filters_stack_on_threads_created_later():
    """A vCPU thread created by the filtered main thread has both filters: the stricter wins."""
    def check():
        result = {}

        def vcpu():
            seccomp.install("vcpu", "kill")
            result["ok"] = True
        t = threading.Thread(target=vcpu)
        t.start()
        t.join()
        assert result == {"ok": True}
        seccomp.forbidden_syscall()
    assert in_child(check, "main") == SIGSYS


# -- what Python itself does on a confined thread ---------------------------------------------------------
def _python_work(tmp: Path):
    # GC of big cyclic garbage (munmap anywhere), a lazy import, a traceback read from source
    for _ in range(3):
        junk = [[bytearray(1 << 20)] for _ in range(32)]
        for a in junk:
            a.append(a)
        del junk
        gc.collect()
    import xml.dom.minidom  # noqa: F401 - not imported before in this process (lazy import)
    try:
        raise ValueError("boom")
    except ValueError:
        text = traceback.format_exc()
    assert "raise ValueError" in text
    # logging with rotation, as vmm.log's handler does it (rename, open, dup2 of stderr)
    from hypyr.toolstack.vmmlog import VmmLogHandler
    h = VmmLogHandler(tmp / "vmm.log", max_bytes=2000, fds=())
    lg = logging.getLogger("seccomp-test")
    lg.addHandler(h)
    lg.propagate = False
    for i in range(200):
        lg.warning("line %d %s", i, "x" * 40)
    lg.exception("with a traceback", exc_info=ValueError("x"))
    h.close()
    assert (tmp / "vmm.log.1").exists()


@pytest.mark.parametrize("kind", seccomp.KINDS)
def test_python_runtime_works_under_every_filter(kind, tmp_path):
    sys.modules.pop("xml.dom.minidom", None)
    d = tmp_path / kind
    d.mkdir()
    assert in_child(lambda: _python_work(d), kind) == OK


def test_virtio_blk_requests_and_workers_under_the_io_filter(tmp_path):
    """In, out, flush, write-zeroes, discard and a batch for the worker pool, on an "io" thread."""
    from test_virtio_blk import ALL_FEATURES, Rig, make_image, seg  # noqa: F401

    from hypyr.devices.virtio import blk_spec as spec
    path = tmp_path / "disk.img"
    make_image(path)
    rig = Rig(path, workers=4, qsize=64)         # opened by the main thread, as the builder does

    def work():
        heads = [rig.request(spec.VIRTIO_BLK_T_OUT, s, out=bytes([s]) * 512, indirect=True)[0] for s in range(8)]
        heads += [rig.request(spec.VIRTIO_BLK_T_IN, 30 + i, in_len=512)[0] for i in range(4)]
        heads.append(rig.request(spec.VIRTIO_BLK_T_FLUSH, 0)[0])
        assert sorted(h for h, _ in rig.run()) == sorted(heads)
        _, _, st = rig.request(spec.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg(2, 3))
        rig.run()
        assert rig.drv.mem.read_u8(st) == spec.VIRTIO_BLK_S_OK
        _, _, st = rig.request(spec.VIRTIO_BLK_T_DISCARD, 0, out=seg(20, 8))
        rig.run()
        assert rig.drv.mem.read_u8(st) == spec.VIRTIO_BLK_S_OK
    try:
        assert in_child(work, "io") == OK
    finally:
        rig.close()
    assert path.read_bytes()[7 * 512:8 * 512] == bytes([7]) * 512


def test_console_hub_rotates_on_a_vcpu_thread_and_feeds_a_client(tmp_path):
    """The UART's output path (vCPU threads): console.log rotation, and a client attached by a
    control thread, whose output queue thread inherits the control filter."""
    from hypyr.toolstack.console import ConsoleHub
    hub = ConsoleHub(tmp_path / "console.log", max_bytes=4096)   # made before the filters, as in a domain
    ours, theirs = socket.socketpair()                            # a client's connection

    def work():
        ready = threading.Event()

        def control():
            seccomp.install("control", "kill")
            hub.attach(theirs)
            ready.set()
        t = threading.Thread(target=control)
        t.start()
        t.join()
        assert ready.is_set()
        seccomp.install("vcpu", "kill")     # this thread now writes as a vCPU does
        for i in range(100):
            hub.write(b"%04d " % i + b"y" * 95)
        time.sleep(0.5)                     # the client's output queue thread sends meanwhile
        hub.detach(theirs)
    try:
        assert in_child(work, "main") == OK
        got = b""
        ours.settimeout(5)
        while b"0099" not in got:
            got += ours.recv(65536)
    finally:
        ours.close()
        theirs.close()
    assert len(list(tmp_path.iterdir())) == 2      # console.log and its rotated part


# -- the switches ------------------------------------------------------------------------------------
def test_xl_cfg_key(tmp_path):
    from hypyr.toolstack import domconfig, xlcfg
    from hypyr.toolstack.errors import InvalidConfig
    base = 'name = "a"\nkernel = "/boot/vmlinuz"\n'
    assert xlcfg.loads(base).seccomp == "kill"
    cfg = xlcfg.loads(base + 'seccomp = "log"\n')
    assert cfg.seccomp == "log" and domconfig.DomainConfig.from_dict(cfg.to_dict()) == cfg
    assert not cfg.warnings
    with pytest.raises(InvalidConfig, match=r"^<cfg>:3: seccomp must be 'kill', 'log' or 'off', not 'strict'$"):
        xlcfg.loads(base + 'seccomp = "strict"\n')
    old = cfg.to_dict()
    del old["seccomp"]                     # a row stored before the key existed
    assert domconfig.DomainConfig.from_dict(old).seccomp == "kill"


def test_vm_config_of_a_domain_carries_the_mode():
    from hypyr.toolstack.domain_vm import vm_config
    from hypyr.toolstack.domconfig import DomainConfig
    from hypyr.vmm.builder import validate
    from hypyr.vmm.config import VmConfig
    assert vm_config(DomainConfig(name="a", kernel="/k", seccomp="off")).seccomp == "off"
    assert VmConfig(kernel="/k").seccomp == "kill"
    with pytest.raises(HypyrError, match="seccomp must be kill, log or off, not 'no'"):
        validate(VmConfig(kernel="/nonexistent", seccomp="no"))


def test_bad_switch_values_exit_non_zero(tmp_path, monkeypatch, capsys):
    from hypyr import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--seccomp", "strict"])
    assert e.value.code != 0
    assert "--seccomp: invalid choice: 'strict'" in capsys.readouterr().err
    monkeypatch.setenv("HYPYR_STATE_DIR", str(tmp_path / "state"))
    cfg = tmp_path / "a.cfg"
    cfg.write_text('name = "a"\nkernel = "/boot/vmlinuz"\nseccomp = "maybe"\n')
    assert cli.main(["create", str(cfg)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seccomp must be 'kill', 'log' or 'off', not 'maybe'" in err[0], err


def test_a_vcpu_thread_may_change_the_io_threads_watch_list():
    """vhost-net starts on the vCPU thread that writes DRIVER_OK and stops the I/O thread's
    watch of the kicks and the tap (epoll_ctl)."""
    from hypyr.vmm.iothread import IoThread
    io = IoThread(seccomp="kill")
    r, w = os.pipe()
    io.add_fd(r, lambda: None)
    io.start()

    def vhost_start_and_stop():
        io.watch(r, False)
        io.watch(r, True)
        os.write(w, b"x")
    try:
        assert in_child(vhost_start_and_stop, "vcpu") == OK
    finally:
        io.stop()
        os.close(r)
        os.close(w)
