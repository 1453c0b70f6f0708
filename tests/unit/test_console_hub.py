"""The domain console's two ends (hypyr.toolstack.console) and the domain's log files: no slow
reader blocks a writer, and console.log / vmm.log stay bounded."""

import logging
import os
import select
import socket
import threading
import time

import pytest

from hypyr.console import write_all
from hypyr.toolstack import paths
from hypyr.toolstack.console import ConsoleHub, RotatingLog, relay
from hypyr.toolstack.vmmlog import VmmLogHandler

MiB = 1 << 20


def run_in_thread(fn, *args):
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def pairs():
    made = []

    def make():
        a, b = socket.socketpair()
        made.extend((a, b))
        return a, b
    yield make
    for s in made:
        s.close()


def read_exactly(sock, n, timeout=5.0):
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def test_a_client_that_never_reads_does_not_block_console_output(tmp_path, pairs):
    hub = ConsoleHub(tmp_path / "console.log", max_bytes=64 * MiB)
    stuck, stuck_peer = pairs()  # the peer never reads: a paused terminal
    hub.attach(stuck)
    chunk = bytes(range(256)) * 16
    total = 8 * MiB

    def flood():
        for _ in range(total // len(chunk)):
            hub.write(chunk)
    start = time.monotonic()
    writer = run_in_thread(flood)
    writer.join(5.0)
    assert not writer.is_alive(), "ConsoleHub.write blocked on a client that does not read"
    assert time.monotonic() - start < 5.0
    assert (tmp_path / "console.log").stat().st_size == total  # the log misses nothing
    stats = hub.stats()
    assert stats["clients"] == 1 and stats["dropped"] > total - MiB
    # what was not dropped is still delivered once the client reads again
    got = read_exactly(stuck_peer, total - stats["dropped"])
    assert len(got) == total - stats["dropped"]
    hub.close()


def test_a_guest_printing_to_its_uart_never_waits_for_a_client_that_does_not_read(tmp_path, pairs):
    """Issue #13's case end to end: the 8250 transmits into a domain's ConsoleHub while its only
    client never reads and its socket buffer is full.  The vCPU writing THR and another one
    polling LSR (both take the UART's lock) go on; the log gets every byte."""
    from hypyr.devices.legacy.serial import Serial
    hub = ConsoleHub(tmp_path / "console.log", max_bytes=64 * MiB, client_limit=4096)
    stuck, stuck_peer = pairs()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    hub.attach(stuck)
    uart = Serial(lambda level: None, hub.write)
    total = 256 << 10
    polls = []

    def vcpu0():
        for i in range(total):
            uart.write(0, bytes([i & 0xFF]))    # THR

    def vcpu1():
        while printer.is_alive():
            polls.append(uart.read(5, 1)[0])  # LSR
    printer = run_in_thread(vcpu0)
    poller = run_in_thread(vcpu1)
    printer.join(20.0)
    assert not printer.is_alive(), "a vCPU writing the UART blocked on a console client that does not read"
    poller.join(5.0)
    assert polls and all(lsr & 0x60 == 0x60 for lsr in polls)  # THRE|TEMT: the UART never looked busy
    assert (tmp_path / "console.log").read_bytes() == bytes(i & 0xFF for i in range(total))
    assert hub.stats()["dropped"] > 0
    hub.close()


def test_other_clients_get_all_output_while_one_is_stuck(tmp_path, pairs):
    hub = ConsoleHub(tmp_path / "console.log")
    stuck, _ = pairs()
    good, good_peer = pairs()
    hub.attach(stuck)
    hub.attach(good)
    received = bytearray()

    def reader():
        while data := good_peer.recv(65536):
            received.extend(data)
    run_in_thread(reader)
    data = os.urandom(8 * MiB)
    step = 64 << 10

    def paced():  # each part once the good client has the previous one: it must lose nothing
        for i in range(0, len(data), step):
            hub.write(data[i:i + step])
            while len(received) < i + step and time.monotonic() < deadline:
                time.sleep(0.001)
    deadline = time.monotonic() + 5.0
    writer = run_in_thread(paced)
    writer.join(5.0)
    assert not writer.is_alive(), "ConsoleHub.write blocked on a client that does not read"
    assert bytes(received) == data
    assert hub.stats()["dropped"] > 0  # all of it the stuck client's
    hub.close()


def test_dropped_output_is_warned_about_once_in_a_while(tmp_path, pairs, caplog):
    hub = ConsoleHub(tmp_path / "console.log", client_limit=64 << 10)
    stuck, _ = pairs()
    hub.attach(stuck)
    with caplog.at_level(logging.WARNING, logger="hypyr.console"):
        for _ in range(1024):
            hub.write(b"x" * 4096)
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1
    assert hub.stats()["dropped"] > 3 * MiB
    hub.close()


def test_a_client_that_went_away_is_forgotten(tmp_path, pairs):
    hub = ConsoleHub(tmp_path / "console.log")
    conn, peer = pairs()
    hub.attach(conn)
    peer.close()

    def gone():
        hub.write(b"hello\r\n")
        return hub.stats()["clients"] == 0
    wait_for(gone)
    hub.close()


def test_detach_stops_output_to_a_client(tmp_path, pairs):
    hub = ConsoleHub(tmp_path / "console.log")
    conn, peer = pairs()
    hub.attach(conn)
    hub.write(b"one")
    assert read_exactly(peer, 3) == b"one"
    hub.detach(conn)
    hub.write(b"two")
    assert peer.recv(10) == b""
    assert hub.stats()["clients"] == 0


def test_detach_ends_a_send_blocked_on_a_client_that_stopped_reading(tmp_path, pairs):
    hub = ConsoleHub(tmp_path / "console.log", client_limit=8 * MiB)
    conn, _ = pairs()
    before = set(threading.enumerate())   # (an earlier test's drain thread may still be ending)
    hub.attach(conn)
    [drain] = [t for t in set(threading.enumerate()) - before if t.name == f"console client {conn.fileno()}"]
    hub.write(b"x" * (8 * MiB))
    wait_for(lambda: hub.stats()["pending"] == 0)  # all of it in one send, which cannot finish
    hub.detach(conn)
    drain.join(5.0)
    assert not drain.is_alive()
    hub.close()


def test_console_log_is_rotated_keeping_one_old_part(tmp_path):
    path = tmp_path / "console.log"
    hub = ConsoleHub(path, max_bytes=1000)
    data = b"".join(b"line %05d\n" % i for i in range(300))  # 3000 bytes
    for i in range(0, len(data), 100):
        hub.write(data[i:i + 100])
    hub.close()
    old, new = (tmp_path / "console.log.1").read_bytes(), path.read_bytes()
    assert 0 < len(old) <= 1000 and 0 < len(new) <= 1000
    assert data.endswith(old + new)  # the newest output, in order, across the two files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log", "console.log.1"]


def test_console_log_continues_an_existing_file_and_counts_it(tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"a" * 900)
    log = RotatingLog(path, max_bytes=1000)
    log.write(b"b" * 200)
    log.close()
    assert (tmp_path / "console.log.1").read_bytes() == b"a" * 900
    assert path.read_bytes() == b"b" * 200


def test_log_size_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("HYPYR_LOG_MAX_BYTES", raising=False)
    assert paths.log_max_bytes() == MiB
    monkeypatch.setenv("HYPYR_LOG_MAX_BYTES", "4096")
    assert paths.log_max_bytes() == 4096
    monkeypatch.setenv("HYPYR_LOG_MAX_BYTES", "lots")
    assert paths.log_max_bytes() == MiB


def test_vmm_log_is_rotated_and_stderr_follows_it(tmp_path):
    path = tmp_path / "vmm.log"
    stderr = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # as `create` gives the process
    r, w = os.pipe()  # an fd elsewhere (a terminal) is left alone
    handler = VmmLogHandler(path, 2000, fds=(stderr, w))
    logger = logging.getLogger("test-vmm-log")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        os.write(stderr, b"early crash output\n")
        for i in range(200):
            logger.warning("record %03d %s", i, "x" * 40)
        os.write(stderr, b"late crash output\n")
        os.write(w, b"elsewhere\n")
    finally:
        logger.removeHandler(handler)
        handler.close()
        os.close(stderr)
        os.close(w)
    assert os.read(r, 100) == b"elsewhere\n"
    os.close(r)
    new, old = path.read_text(), (tmp_path / "vmm.log.1").read_text()
    assert len(new) <= 2000 + 100 and len(old) <= 2000
    assert "record 199" in new and "record 000" not in new + old
    assert new.endswith("late crash output\n")  # stderr writes land in the current file
    assert "early crash output" not in new + old  # older parts than .1 are gone


def test_hypyr_console_shows_output_while_the_domain_takes_no_input(pairs):
    sock, domain = pairs()  # the domain does not read the client's input for now
    inp_r, inp_w = os.pipe()
    out_r, out_w = os.pipe()
    typed = os.urandom(4 * MiB)

    def type_in():
        try:
            write_all(inp_w, typed)
        finally:
            os.close(inp_w)
    run_in_thread(type_in)
    client = run_in_thread(relay, sock, inp_r, out_w, False)
    time.sleep(0.2)  # input piles up
    domain.sendall(b"login: ")
    ready, _, _ = select.select([out_r], [], [], 5.0)
    assert ready, "`hypyr console` stopped showing output while its input waited"
    assert os.read(out_r, 100) == b"login: "
    assert read_exactly(domain, len(typed)) == typed  # nothing typed is lost, in order
    domain.shutdown(socket.SHUT_RDWR)
    client.join(5.0)
    assert not client.is_alive()
    for fd in (inp_r, out_r, out_w):
        os.close(fd)


def test_hypyr_console_ctrl_bracket_detaches(pairs):
    sock, domain = pairs()
    inp_r, inp_w = os.pipe()
    os.write(inp_w, b"ls\r\x1dnot sent")
    with open(os.devnull, "wb") as out:
        relay(sock, inp_r, out.fileno(), escape=True)
    assert read_exactly(domain, 3) == b"ls\r"
    domain.setblocking(False)
    with pytest.raises(BlockingIOError):
        domain.recv(10)
    os.close(inp_r)
    os.close(inp_w)


def test_output_byte_by_byte_goes_out_in_bursts_whole_and_in_order():
    """A UART hands the queue one byte per exit; its drain thread sends bursts, not bytes (one
    wake-up per burst), and every byte arrives once, in order."""
    from hypyr.console import BATCH_S, OutputQueue
    sent: list[bytes] = []
    q = OutputQueue(sent.append, name="test")
    data = bytes(range(256)) * 4
    t0 = time.monotonic()
    for i in range(len(data)):
        q.write(data[i:i + 1])
        if i % 64 == 0:
            time.sleep(0.0005)   # a byte now and then after a pause, as from a guest between exits
    took = time.monotonic() - t0
    deadline = time.monotonic() + 5
    while sum(map(len, sent)) < len(data) and time.monotonic() < deadline:
        time.sleep(0.01)
    q.close(timeout=1)
    assert b"".join(sent) == data
    assert len(sent) <= took / BATCH_S + 2, (len(sent), took)


def test_a_client_gets_the_last_output_when_the_console_closes(tmp_path, pairs):
    """The guest's last bytes, still gathered into a burst when the domain's console closes, reach
    an attached client before its end of the connection is shut."""
    domain, client = pairs()
    hub = ConsoleHub(tmp_path / "console.log")
    hub.attach(domain)
    for b in b"reboot: Power down\n":
        hub.write(bytes([b]))
    hub.close()
    client.settimeout(5)
    got = b""
    while chunk := client.recv(100):
        got += chunk
    assert got == b"reboot: Power down\n"
