"""When live migration stops pre-copying (another_pass), and which pages a dirty bitmap names."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from hypyr.vmm.dirty import bitmap_pages
from hypyr.vmm.migration import FEW_PAGES, _Link, another_pass

MB = 1 << 20  # bytes/s of the link in these cases: 256 pages a second


def test_iterates_while_the_dirty_set_would_not_fit_the_downtime():
    assert another_pass(1000, 1000, MB, 0.3)          # ~4 s of copying with the guest stopped
    assert another_pass(1000, 10, MB, 0.3)            # even if it grew


def test_once_it_fits_one_more_pass_only_while_passes_halve_it():
    fast = 1000 * MB                                   # everything fits the downtime
    assert another_pass(500, 65536, fast, 0.3)        # idle guest after pass 1: a pass shrinks the rest
    assert another_pass(500, 1000, fast, 0.3)         # exactly half: still worth it
    assert not another_pass(501, 1000, fast, 0.3)     # stopped shrinking: stop and copy
    assert not another_pass(FEW_PAGES, 65536, fast, 0.3)   # a few pages: not worth a pass
    assert another_pass(FEW_PAGES + 1, 65536, fast, 0.3)


def test_zero_downtime_iterates_until_nothing_is_dirty():
    assert another_pass(1, 1, MB, 0.0)
    assert not another_pass(0, 1, MB, 0.0)


@settings(max_examples=300)
@given(st.lists(st.sampled_from([0, 1, 0x8000_0000_0000_0001, (1 << 64) - 1, 0xF0F0]), min_size=1, max_size=16),
       st.integers(0, 1100))
def test_dirty_bitmap_bits_are_the_set_bits_below_the_limit(words, limit):
    bitmap = b"".join(w.to_bytes(8, "little") for w in words)
    want = [i for i in range(len(words) * 64) if bitmap[i // 8] >> (i % 8) & 1 and i < limit]
    assert bitmap_pages(bitmap, limit) == want


def test_a_tcp_link_turns_nagle_off_and_a_unix_one_is_left_alone():
    """Nagle would hold the tail of each flush until the peer's delayed ACK (up to 40 ms of downtime)."""
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as a, server.accept()[0] as b:
        assert not a.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        links = [_Link(a, "the migration stream"), _Link(b, "the migration stream")]
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert b.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        for link in links:
            link.close()
    u, v = socket.socketpair()
    with u, v:
        _Link(u, "the migration stream").close()    # (no TCP options on a unix socket)
