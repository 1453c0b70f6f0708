import pytest

from hypyr.devices.bus import Bus
from hypyr.devices.events import GuestEvent, StopRequest
from hypyr.devices.legacy import i8042 as K
from hypyr.devices.legacy.i8042 import I8042
from hypyr.errors import StateError


class Line:
    def __init__(self):
        self.calls: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.calls.append(level)


def make():
    stops: list[StopRequest] = []
    kbd, aux = Line(), Line()
    bus = Bus("pio")
    ctl = I8042(stops.append, kbd_irq=kbd, aux_irq=aux)
    bus.register(K.DATA_PORT, 1, ctl.data_port)
    bus.register(K.COMMAND_PORT, 1, ctl.command_port)
    return ctl, bus, stops, kbd, aux


def cmd(bus, c):
    bus.write(0x64, bytes([c]))


def data(bus, d):
    bus.write(0x60, bytes([d]))


def status(bus):
    return bus.read(0x64, 1)[0]


def rd(bus):
    assert status(bus) & K.STS_OBF
    return bus.read(0x60, 1)[0]


def drain(bus):
    out = []
    while status(bus) & K.STS_OBF:
        out.append(bus.read(0x60, 1)[0])
    return out


def test_status_idle():
    _, bus, _, _, _ = make()
    st = status(bus)
    assert st & K.STS_OBF == 0
    assert st == 0x1C


def test_reset_command_requests_reboot():
    _, bus, stops, _, _ = make()
    cmd(bus, 0xFE)
    assert stops == [StopRequest(GuestEvent.REBOOT, detail="i8042 reset")]
    cmd(bus, 0xFF)  # pulses nothing
    assert len(stops) == 1


def test_output_port_reset():
    _, bus, stops, _, _ = make()
    cmd(bus, 0xD1)
    data(bus, 0x03)
    assert stops == []
    cmd(bus, 0xD1)
    data(bus, 0x02)
    assert [s.event for s in stops] == [GuestEvent.REBOOT]


def test_self_tests():
    _, bus, _, _, _ = make()
    cmd(bus, 0xAA)
    assert rd(bus) == 0x55
    assert status(bus) & K.STS_SYS
    cmd(bus, 0xAB)
    assert rd(bus) == 0x00
    cmd(bus, 0xA9)
    assert rd(bus) == 0x00


def test_command_byte_and_port_enables():
    _, bus, _, _, _ = make()
    cmd(bus, 0x20)
    assert rd(bus) == K.CTR_DEFAULT
    cmd(bus, 0x60)
    data(bus, 0x47)
    cmd(bus, 0x20)
    assert rd(bus) == 0x47
    cmd(bus, 0xAD)
    cmd(bus, 0xA7)
    cmd(bus, 0x20)
    assert rd(bus) == 0x47 | K.CTR_KBDDIS | K.CTR_AUXDIS
    cmd(bus, 0xAE)
    cmd(bus, 0xA8)
    cmd(bus, 0x20)
    assert rd(bus) == 0x47


def test_keyboard_commands_acked_with_irq():
    _, bus, _, kbd, _ = make()
    data(bus, 0xF2)  # identify
    assert kbd.calls == [True]
    assert drain(bus) == [0xFA, 0xAB, 0x83]
    # one rising edge per byte, line low at the end
    assert kbd.calls == [True, False, True, False, True, False]
    data(bus, 0xED)
    data(bus, 0x07)
    assert drain(bus) == [0xFA, 0xFA]
    data(bus, 0xFF)
    assert drain(bus) == [0xFA, 0xAA]
    data(bus, 0xF0)
    data(bus, 0x00)
    assert drain(bus) == [0xFA, 0xFA, 0x02]
    data(bus, 0xEE)
    assert drain(bus) == [0xEE]
    data(bus, 0xF4)
    assert drain(bus) == [0xFA]
    data(bus, 0x42)
    assert drain(bus) == [0xFA]


def test_no_irq_when_kbd_interrupt_disabled():
    _, bus, _, kbd, _ = make()
    cmd(bus, 0x60)
    data(bus, 0x44)  # KBDINT off
    data(bus, 0xF4)
    assert kbd.calls == []
    assert rd(bus) == 0xFA


def test_aux_loop_and_no_mouse():
    _, bus, _, kbd, aux = make()
    cmd(bus, 0x60)
    data(bus, 0x47)  # kbd + aux interrupts
    cmd(bus, 0xD3)
    data(bus, 0x5A)
    assert status(bus) & K.STS_AUXDATA
    assert aux.calls == [True] and kbd.calls == []
    assert rd(bus) == 0x5A
    assert aux.calls == [True, False]
    cmd(bus, 0xD4)
    data(bus, 0xF2)
    assert rd(bus) == 0xFE


def test_ctrl_alt_del_injection():
    ctl, bus, _, kbd, _ = make()
    assert ctl.inject_ctrl_alt_del()
    assert kbd.calls[0] is True
    assert drain(bus) == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    cmd(bus, 0x60)
    data(bus, K.CTR_DEFAULT & ~K.CTR_XLATE)
    assert ctl.inject_ctrl_alt_del()
    assert drain(bus)[:2] == [0x14, 0x11]
    cmd(bus, 0xAD)
    assert not ctl.inject_ctrl_alt_del()


def test_output_queue_bounded():
    _, bus, _, _, _ = make()
    for _ in range(200):
        data(bus, 0xF2)
    assert len(drain(bus)) == K.OUTPUT_QUEUE_LIMIT


def test_state_round_trip():
    ctl, bus, _, _, _ = make()
    cmd(bus, 0x60)
    data(bus, 0x47)
    data(bus, 0xF2)
    data(bus, 0xED)
    st = ctl.save_state()
    kbd2 = Line()
    other = I8042(lambda r: None, kbd_irq=kbd2)
    other.load_state(st)
    assert other.save_state() == st
    assert kbd2.calls == [True]
    for bad in ({**st, "ram": b"\0"}, {**st, "output": [[0x100, False]]}, {**st, "pending_cmd": 0x01}):
        with pytest.raises(StateError):
            other.load_state(bad)


def test_single_device_offsets():
    stops = []
    ctl = I8042(stops.append)
    ctl.write(4, b"\xaa")
    assert ctl.read(4, 1)[0] & K.STS_OBF
    assert ctl.read(0, 1) == b"\x55"
    ctl.write(4, b"\xfe")
    assert stops and stops[0].event is GuestEvent.REBOOT
