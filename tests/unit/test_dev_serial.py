import threading

import pytest

from hypyr.devices.bus import Bus
from hypyr.devices.legacy import serial as S
from hypyr.devices.legacy.serial import Serial
from hypyr.errors import StateError


class Line:
    def __init__(self):
        self.calls: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.calls.append(level)

    @property
    def level(self) -> bool:
        return self.calls[-1] if self.calls else False


def make():
    line = Line()
    out: list[bytes] = []
    return Serial(line, out.append), line, out


def rd(dev, off):
    return dev.read(off, 1)[0]


def wr(dev, off, val):
    dev.write(off, bytes([val]))


def test_reset_values():
    u, line, _ = make()
    assert rd(u, S.IER) == 0
    assert rd(u, S.IIR) == 0x01
    assert rd(u, S.LSR) == 0x60
    assert rd(u, S.MSR) & 0xF0 == 0xB0
    assert line.calls == []


def test_divisor_latch_round_trip():
    u, _, _ = make()
    wr(u, S.IER, 0x05)
    wr(u, S.LCR, 0x83)
    wr(u, S.DLL, 0x01)
    wr(u, S.DLM, 0x02)
    assert rd(u, S.DLL) == 0x01 and rd(u, S.DLM) == 0x02
    assert u.divisor == 0x0201
    wr(u, S.LCR, 0x03)
    assert rd(u, S.LCR) == 0x03
    assert rd(u, S.IER) == 0x05  # IER untouched by DLM writes
    assert rd(u, S.LSR) & S.LSR_DR == 0  # DLL write did not transmit


def test_dlab_write_does_not_transmit():
    u, _, out = make()
    wr(u, S.LCR, 0x80)
    wr(u, S.THR, ord("x"))
    assert out == []


def test_scratch_and_lcr():
    u, _, _ = make()
    for v in (0x00, 0x55, 0xAA, 0xFF):
        wr(u, S.SCR, v)
        assert rd(u, S.SCR) == v
        wr(u, S.LCR, v & 0x7F)
        assert rd(u, S.LCR) == v & 0x7F


def test_ier_masks_reserved_bits():
    u, _, _ = make()
    wr(u, S.IER, 0xFF)
    assert rd(u, S.IER) == 0x0F
    wr(u, S.IER, 0)
    assert rd(u, S.IER) == 0


def test_transmit_reaches_out_and_lsr():
    u, _, out = make()
    for c in b"hi\n":
        wr(u, S.THR, c)
    assert b"".join(out) == b"hi\n"
    assert rd(u, S.LSR) & (S.LSR_THRE | S.LSR_TEMT) == 0x60


def test_receive_fifo_order_and_dr():
    u, _, _ = make()
    assert u.enqueue_input(b"abc") == 3
    assert rd(u, S.LSR) & S.LSR_DR
    assert bytes(rd(u, S.RBR) for _ in range(3)) == b"abc"
    assert rd(u, S.LSR) & S.LSR_DR == 0
    assert rd(u, S.RBR) == 0  # empty


def test_thre_interrupt_on_ier_enable_and_out2_gate():
    u, line, _ = make()
    wr(u, S.IER, S.IER_ETBEI)
    assert rd(u, S.IIR) == 0x02  # reading clears THRE ...
    assert rd(u, S.IIR) == 0x01
    assert line.calls == []  # OUT2 clear: the line is gated off
    wr(u, S.IER, 0)
    wr(u, S.MCR, S.MCR_OUT2 | S.MCR_DTR | S.MCR_RTS)
    assert line.calls == []
    wr(u, S.IER, S.IER_ETBEI)  # 0 -> 1 re-arms THRE
    assert line.calls == [True]
    assert rd(u, S.IIR) == 0x02
    assert line.calls == [True, False]
    wr(u, S.IER, S.IER_ETBEI)  # unchanged: no re-arm
    assert line.calls == [True, False]
    wr(u, S.THR, ord("a"))  # THR write re-arms
    assert line.calls == [True, False, True]
    wr(u, S.MCR, 0)  # dropping OUT2 lowers the line
    assert line.calls == [True, False, True, False]
    wr(u, S.MCR, S.MCR_OUT2)
    assert line.calls[-1] is True


def test_linux_thre_test_sequence():
    """serial8250_do_startup's THRE re-assertion test must not flag UART_BUG_THRE."""
    u, _, _ = make()
    wr(u, S.IER, S.IER_ETBEI)
    iir1 = rd(u, S.IIR)
    wr(u, S.IER, 0)
    wr(u, S.IER, S.IER_ETBEI)
    iir = rd(u, S.IIR)
    wr(u, S.IER, 0)
    assert not iir1 & 0x01 and not iir & 0x01


def test_thr_write_pulses_line_when_thre_only_source():
    u, line, _ = make()
    wr(u, S.MCR, S.MCR_OUT2)
    wr(u, S.IER, S.IER_ETBEI)
    assert line.calls == [True]
    wr(u, S.THR, ord("x"))  # line high and THRE re-armed: falls then rises (edge for the PIC)
    assert line.calls == [True, False, True]
    # with RX data pending too the line stays up: no spurious calls
    u.enqueue_input(b"z")
    wr(u, S.IER, S.IER_ETBEI | S.IER_ERBFI)
    n = len(line.calls)
    wr(u, S.THR, ord("y"))
    assert len(line.calls) == n


def test_irq_only_on_level_change():
    u, line, _ = make()
    wr(u, S.MCR, S.MCR_OUT2)
    wr(u, S.IER, S.IER_ERBFI)
    u.enqueue_input(b"a")
    u.enqueue_input(b"b")
    assert line.calls == [True]
    rd(u, S.RBR)
    assert line.calls == [True]
    rd(u, S.RBR)
    assert line.calls == [True, False]
    for i in range(len(line.calls) - 1):
        assert line.calls[i] != line.calls[i + 1]


def test_iir_priorities_and_fifo_bits():
    u, _, _ = make()
    wr(u, S.MCR, S.MCR_OUT2)
    wr(u, S.FCR, 0x01)  # FIFO on, trigger 1
    wr(u, S.IER, 0x0F)
    u.enqueue_input(b"x")
    # overrun (RLS) outranks data: fill the buffer and overflow it
    u.enqueue_input(b"\0" * (S.RX_BUFFER_SIZE + 5))
    assert rd(u, S.IIR) == 0xC6
    lsr = rd(u, S.LSR)
    assert lsr & S.LSR_OE and lsr & S.LSR_DR
    assert rd(u, S.LSR) & S.LSR_OE == 0  # cleared by reading
    assert rd(u, S.IIR) == 0xC4  # received data
    wr(u, S.FCR, 0x01 | 0x02)  # clear RX FIFO: only the 16-byte hardware FIFO goes
    assert u.input_room() == 16
    u2, _, _ = make()
    wr(u2, S.IER, 0x0F)
    assert rd(u2, S.IIR) == 0x02  # THRE (no FIFO bits, FIFO off)
    assert rd(u2, S.IIR) == 0x01
    wr(u2, S.MCR, S.MCR_LOOP | S.MCR_RTS)  # DSR and DCD drop -> modem status
    assert rd(u2, S.IIR) == 0x00
    assert rd(u2, S.MSR) == S.MSR_CTS | S.MSR_DDSR | S.MSR_DDCD
    assert rd(u2, S.IIR) == 0x01


def test_rx_trigger_level_reports_timeout_below_trigger():
    u, _, _ = make()
    wr(u, S.FCR, 0x81)  # FIFO on, trigger 8
    wr(u, S.IER, S.IER_ERBFI)
    u.enqueue_input(b"abc")
    assert rd(u, S.IIR) == 0xCC
    u.enqueue_input(b"defgh")
    assert rd(u, S.IIR) == 0xC4


def test_fcr_disable_clears_fifo_bits():
    u, _, _ = make()
    wr(u, S.FCR, 0xC7)
    assert rd(u, S.IIR) & 0xC0 == 0xC0
    wr(u, S.FCR, 0x00)
    assert rd(u, S.IIR) == 0x01


def test_loopback_like_linux_autoconfig():
    u, _, out = make()
    wr(u, S.MCR, S.MCR_LOOP | S.MCR_OUT2 | S.MCR_RTS)  # 0x1a
    assert rd(u, S.MSR) & 0xF0 == 0x90
    wr(u, S.MCR, S.MCR_LOOP | S.MCR_DTR | S.MCR_OUT1)
    assert rd(u, S.MSR) & 0xF0 == S.MSR_DSR | S.MSR_RI
    wr(u, S.MCR, S.MCR_LOOP)
    assert rd(u, S.MSR) & S.MSR_TERI  # RI trailing edge
    wr(u, S.THR, 0x5A)
    wr(u, S.THR, 0xA5)
    assert out == []
    assert rd(u, S.LSR) & S.LSR_DR
    assert rd(u, S.RBR) == 0x5A and rd(u, S.RBR) == 0xA5
    wr(u, S.MCR, S.MCR_DTR | S.MCR_RTS | S.MCR_OUT2)
    assert rd(u, S.MCR) == 0x0B
    assert rd(u, S.MSR) & 0xF0 == 0xB0
    wr(u, S.THR, ord("k"))
    assert out == [b"k"]


def test_loopback_interrupts():
    u, line, _ = make()
    wr(u, S.MCR, S.MCR_LOOP | S.MCR_OUT2)
    wr(u, S.IER, S.IER_ERBFI)
    wr(u, S.THR, 0x41)
    assert line.level is True
    assert rd(u, S.IIR) == 0x04
    assert rd(u, S.RBR) == 0x41
    assert line.level is False


def test_bounded_input():
    u, _, _ = make()
    assert u.input_room() == S.RX_BUFFER_SIZE
    assert u.enqueue_input(b"x" * (S.RX_BUFFER_SIZE - 10)) == S.RX_BUFFER_SIZE - 10
    assert u.input_room() == 10
    assert u.enqueue_input(b"y" * 20) == 10
    assert u.input_room() == 0
    assert u.enqueue_input(b"z") == 0
    assert u.enqueue_input(b"") == 0


def test_wide_access_is_split_into_bytes():
    u, _, _ = make()
    u.write(S.SCR - 1, b"\x00\x77")  # MSR (ignored), SCR
    assert rd(u, S.SCR) == 0x77
    assert u.read(S.LCR, 2) == bytes([0, 0])
    assert len(u.read(6, 4)) == 4  # runs past the end: 0xff beyond


def test_via_bus():
    line = Line()
    out = []
    bus = Bus("pio")
    bus.register(S.COM1_PORT, S.LENGTH, Serial(line, out.append))
    bus.write(0x3F8, b"Q")
    assert out == [b"Q"]
    assert bus.read(0x3FD, 1) == b"\x60"


def test_out_callback_exception_is_contained():
    def bad(_):
        raise OSError("terminal gone")

    u = Serial(Line(), bad)
    wr(u, S.THR, 1)  # must not raise
    assert rd(u, S.LSR) & S.LSR_THRE


def test_state_round_trip_and_validation():
    u, _, _ = make()
    wr(u, S.LCR, 0x83)
    wr(u, S.DLL, 3)
    wr(u, S.LCR, 0x03)
    wr(u, S.FCR, 0xC1)
    wr(u, S.SCR, 9)
    wr(u, S.MCR, S.MCR_OUT2)
    wr(u, S.IER, S.IER_ERBFI)
    u.enqueue_input(b"hello")
    st = u.save_state()
    line2 = Line()
    v = Serial(line2, lambda b: None)
    v.load_state(st)
    assert v.save_state() == st
    assert line2.calls == [True]
    assert bytes(rd(v, S.RBR) for _ in range(5)) == b"hello"
    for bad in ({**st, "ier": 0x10}, {**st, "rx": b"x" * (S.RX_BUFFER_SIZE + 1)}, "nope"):
        with pytest.raises(StateError):
            v.load_state(bad)  # type: ignore[arg-type]


def test_concurrent_input_and_reads():
    u, _, _ = make()
    data = bytes(range(256)) * 40
    got = bytearray()

    def feeder():
        for i in range(0, len(data), 100):
            u.enqueue_input(data[i:i + 100])

    t = threading.Thread(target=feeder)
    t.start()
    while len(got) < len(data):
        if rd(u, S.LSR) & S.LSR_DR:
            got.append(rd(u, S.RBR))
    t.join()
    assert bytes(got) == data


def test_linux_autoconfig_sequence_sees_a_16550a():
    """The register dance of Linux's 8250 autoconfig(): must conclude "16550A" (and
    not 8250/16450, ST16C650, NS16550, 16750 or XScale)."""
    u, _, _ = make()
    # IER read-back test
    wr(u, S.IER, 0)
    assert rd(u, S.IER) & 0x0F == 0
    wr(u, S.IER, 0x0F)
    assert rd(u, S.IER) & 0x0F == 0x0F
    wr(u, S.IER, 0)
    # loopback test
    save_mcr = rd(u, S.MCR)
    wr(u, S.MCR, S.MCR_LOOP | 0x0A)
    assert rd(u, S.MSR) & 0xF0 == 0x90
    wr(u, S.MCR, save_mcr)
    # FIFO type
    wr(u, S.LCR, 0xBF)
    wr(u, 2, 0)  # EFR on enhanced parts; FCR here
    wr(u, S.LCR, 0)
    wr(u, S.FCR, S.FCR_ENABLE)
    assert rd(u, S.IIR) >> 6 == 3
    # no EFR behind DLAB (ST16C650V1) or 0xBF (16650V2/16850)
    wr(u, S.LCR, 0x80)
    assert rd(u, 2) != 0
    wr(u, S.LCR, 0xBF)
    assert rd(u, 2) != 0
    # not a National SuperIO (EXCR1 at LCR=0xE0 would mirror MCR loop toggles)
    wr(u, S.LCR, 0)
    status1 = rd(u, S.MCR)
    wr(u, S.LCR, 0xE0)
    status2 = rd(u, 2)
    assert not (status2 ^ status1) & S.MCR_LOOP
    wr(u, S.LCR, 0)
    wr(u, S.MCR, status1 ^ S.MCR_LOOP)
    wr(u, S.LCR, 0xE0)
    status2 = rd(u, 2)
    wr(u, S.LCR, 0)
    wr(u, S.MCR, status1)
    assert not (status2 ^ status1) & S.MCR_LOOP
    # not a 16750 (64-byte FIFO bit 5 in IIR)
    wr(u, S.FCR, 0x21)
    s1 = rd(u, S.IIR) >> 5
    wr(u, S.FCR, 0x01)
    wr(u, S.LCR, 0x80)
    wr(u, S.FCR, 0x21)
    s2 = rd(u, S.IIR) >> 5
    wr(u, S.FCR, 0x01)
    wr(u, S.LCR, 0)
    assert not (s1 == 6 and s2 == 7)
    # not XScale (IER UUE bit)
    wr(u, S.IER, 0)
    assert not rd(u, S.IER) & 0x40
    wr(u, S.IER, 0x40)
    assert not rd(u, S.IER) & 0x40


def test_linux_interrupt_driven_tx_drains():
    """Model of the 8250 tty TX path: start_tx enables THRI, the ISR loops on IIR writing up
    to 16 bytes per THRE and disables THRI when the buffer is empty."""
    line = Line()
    out = []
    u = Serial(line, out.append)
    wr(u, S.MCR, S.MCR_OUT2 | S.MCR_DTR | S.MCR_RTS)
    wr(u, S.FCR, 0xC1)
    wr(u, S.IER, S.IER_ERBFI)
    xmit = bytearray(b"login: " * 300)
    sent = bytes(xmit)
    rising = 0
    ier = S.IER_ERBFI
    ier |= S.IER_ETBEI  # start_tx
    wr(u, S.IER, ier)
    while line.level:
        rising += 1
        while not rd(u, S.IIR) & 0x01:  # serial8250_interrupt loop
            lsr = rd(u, S.LSR)
            if lsr & S.LSR_THRE and ier & S.IER_ETBEI:
                for _ in range(16):
                    if not xmit:
                        break
                    wr(u, S.THR, xmit.pop(0))
                if not xmit:
                    ier &= ~S.IER_ETBEI  # __stop_tx
                    wr(u, S.IER, ier)
    assert b"".join(out) == sent
    assert line.level is False
    assert rising >= 1
