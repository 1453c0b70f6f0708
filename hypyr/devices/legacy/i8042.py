"""A minimal i8042 PS/2 keyboard controller with an attached AT keyboard and no mouse.

It exposes two bus devices, each registered with length 1: :attr:`I8042.data_port` at 0x60 and
:attr:`I8042.command_port` at 0x64 (not 0x60..0x64 as one range: 0x61 is port B of the PC's system
control logic).  It answers what Linux's i8042 and atkbd probes need; a reset (e.g. command 0xfe)
calls ``stop(StopRequest(GuestEvent.REBOOT, detail="i8042 reset"))`` outside the device lock.
Design notes (status bits, commands, output queue, IRQs): docs/devices.md, "i8042 keyboard controller".
"""

from __future__ import annotations

import collections
import logging

from hypyr.devices.bus import IrqLine
from hypyr.devices.events import GuestEvent, StopCallback, StopRequest
from hypyr.devices.legacy._bytedev import ByteRegisterDevice
from hypyr.devices.state import HostInputGate, StateError, StateReader

log = logging.getLogger("hypyr.dev.i8042")

DATA_PORT = 0x60
COMMAND_PORT = 0x64
KBD_IRQ = 1
AUX_IRQ = 12

OUTPUT_QUEUE_LIMIT = 64

# Status register
STS_OBF = 0x01
STS_IBF = 0x02
STS_SYS = 0x04
STS_CMD = 0x08
STS_UNLOCKED = 0x10
STS_AUXDATA = 0x20

# Command byte (RAM[0])
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
CTR_DEFAULT = CTR_KBDINT | CTR_SYS | CTR_XLATE  # 0x45

# Output port
OUT_RESET = 0x01  # active low: 0 holds the CPU in reset
OUT_A20 = 0x02
OUT_DEFAULT = OUT_RESET | OUT_A20

# Commands that consume the next byte written to the data port
_CMD_WRITE_OUTPORT = 0xD1
_CMD_WRITE_KBD_OBUF = 0xD2
_CMD_WRITE_AUX_OBUF = 0xD3
_CMD_WRITE_AUX = 0xD4

# Keyboard commands taking one parameter byte
_KBD_PARAM_CMDS = (0xED, 0xF0, 0xF3)

_CAD_SET1 = bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])
_CAD_SET2 = bytes([0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14])


# The controller's state at reset, field by field as a save holds it.
_RESET = {
    "ram": bytes([CTR_DEFAULT]) + bytes(31),   # RAM[0] is the command byte
    "outport": OUT_DEFAULT,
    "output": (),              # queued (byte, is_aux), head first
    "pending_cmd": 0,          # controller command waiting for a data byte, 0 = none
    "kbd_pending_cmd": 0,      # keyboard command waiting for its parameter, 0 = none
    "kbd_scanning": True,
    "last_write_cmd": True,    # status bit 3
}
# The controller commands that wait for a data byte (as do 0x60-0x7F, writes to controller RAM)
_DATA_CMDS = (_CMD_WRITE_OUTPORT, _CMD_WRITE_KBD_OBUF, _CMD_WRITE_AUX_OBUF, _CMD_WRITE_AUX)


class _Port:
    """One of the controller's two ports as a bus device (length 1)."""

    def __init__(self, ctl: I8042, base: int):
        self._ctl = ctl
        self._base = base

    def read(self, offset: int, size: int) -> bytes:
        return self._ctl.read(self._base + offset, size) if offset == 0 else self._ctl.read(-1, size)

    def write(self, offset: int, data: bytes) -> None:
        self._ctl.write(self._base + offset if offset == 0 else -1, data)


class I8042(HostInputGate, ByteRegisterDevice):
    """The controller.  As a single bus device its offsets are 0 (data) and 4 (status/command);
    prefer registering :attr:`data_port` and :attr:`command_port` separately (length 1)."""

    LENGTH = 5

    def __init__(self, stop: StopCallback, kbd_irq: IrqLine | None = None,
                 aux_irq: IrqLine | None = None):
        super().__init__(log)
        self._stop = stop
        self._kbd_irq = kbd_irq
        self._aux_irq = aux_irq
        self._kbd_level = False
        self._aux_level = False
        self.data_port = _Port(self, 0)
        self.command_port = _Port(self, 4)
        self._quiesced = False  # no host injection while saving
        self._set_fields(_RESET)

    # ------------------------------------------------------------------ save/restore (devices/state.py)
    STATE_KIND = "i8042"
    STATE_VERSION = 1

    def _set_fields(self, f: dict) -> None:
        self._ram = bytearray(f["ram"])
        self._outport = f["outport"]
        self._output: collections.deque[tuple[int, bool]] = collections.deque(f["output"])
        self._pending_cmd = f["pending_cmd"]
        self._kbd_pending_cmd = f["kbd_pending_cmd"]
        self._kbd_scanning = f["kbd_scanning"]
        self._last_write_cmd = f["last_write_cmd"]

    def save_state(self) -> dict:
        """Controller RAM, output port, the output queue, pending commands and both line levels."""
        with self._lock:
            return {"kind": self.STATE_KIND, "v": self.STATE_VERSION, "ram": bytes(self._ram),
                    "outport": self._outport, "output": [[b, aux] for b, aux in self._output],
                    "pending_cmd": self._pending_cmd, "kbd_pending_cmd": self._kbd_pending_cmd,
                    "kbd_scanning": self._kbd_scanning, "last_write_cmd": self._last_write_cmd,
                    "kbd_irq": self._kbd_level, "aux_irq": self._aux_level}

    def load_state(self, state: dict) -> None:
        """Validate and load ``state``; both lines are driven to their restored levels; quiesced."""
        r = StateReader(state, "i8042", self.STATE_KIND, self.STATE_VERSION)
        output = []
        for i, item in enumerate(r.items("output", OUTPUT_QUEUE_LIMIT)):
            if (not isinstance(item, (list, tuple)) or len(item) != 2 or isinstance(item[0], bool)
                    or not isinstance(item[0], int) or not 0 <= item[0] <= 0xFF or not isinstance(item[1], bool)):
                raise StateError(f"i8042.output[{i}] must be a [byte, is_aux] pair")
            output.append((int(item[0]), item[1]))
        pending, kbd_pending = r.integer("pending_cmd", 0, 0xFF), r.integer("kbd_pending_cmd", 0, 0xFF)
        f = {"ram": r.blob("ram", 32, 32), "outport": r.integer("outport", 0, 0xFF), "output": output,
             "pending_cmd": pending, "kbd_pending_cmd": kbd_pending,
             "kbd_scanning": r.flag("kbd_scanning"), "last_write_cmd": r.flag("last_write_cmd")}
        levels = (r.flag("kbd_irq"), r.flag("aux_irq"))
        r.done()
        if pending not in (0, *_DATA_CMDS) and not 0x60 <= pending <= 0x7F:
            raise StateError(f"i8042: pending_cmd={pending:#04x} is not a command that waits for data")
        if kbd_pending not in (0, *_KBD_PARAM_CMDS):
            raise StateError(f"i8042: kbd_pending_cmd={kbd_pending:#04x} is not a command that waits for a parameter")
        probe = I8042(lambda _: None)
        probe._set_fields(f)
        if probe._levels() != levels:
            raise StateError("i8042: the saved interrupt line levels do not follow from the output queue")
        with self._lock:
            self._set_fields(f)
            self._kbd_level, self._aux_level = self._levels()
            self._call(self._kbd_irq, self._kbd_level)
            self._call(self._aux_irq, self._aux_level)
        self.quiesce()

    # ------------------------------------------------------------------ host side
    def inject_ctrl_alt_del(self) -> bool:
        """Queue Ctrl-Alt-Del press and release; False (nothing queued) if the keyboard is
        disabled, not scanning, or the output queue lacks room, or while quiesced."""
        with self._lock:
            if self._quiesced:
                log.info("i8042: quiesced for save/restore, Ctrl-Alt-Del not injected")
                return False
            if self._ram[0] & CTR_KBDDIS or not self._kbd_scanning:
                log.info("i8042: keyboard disabled, Ctrl-Alt-Del not injected")
                return False
            seq = _CAD_SET1 if self._ram[0] & CTR_XLATE else _CAD_SET2
            if len(self._output) + len(seq) > OUTPUT_QUEUE_LIMIT:
                log.warning("i8042: output queue full, Ctrl-Alt-Del not injected")
                return False
            for b in seq:
                self._output.append((b, False))
            self._update_irqs()
            return True

    # ------------------------------------------------------------------ internals
    def _call(self, line: IrqLine | None, level: bool) -> None:
        if line is None:
            return
        try:
            line(level)
        except Exception:
            self._rlog.exception("irq", "i8042: irq(%s) failed", level)

    def _levels(self) -> tuple[bool, bool]:
        if not self._output:
            return False, False
        is_aux = self._output[0][1]
        ctr = self._ram[0]
        return (not is_aux and bool(ctr & CTR_KBDINT)), (is_aux and bool(ctr & CTR_AUXINT))

    def _update_irqs(self) -> None:
        kbd, aux = self._levels()
        if kbd != self._kbd_level:
            self._kbd_level = kbd
            self._call(self._kbd_irq, kbd)
        if aux != self._aux_level:
            self._aux_level = aux
            self._call(self._aux_irq, aux)

    def _queue(self, data: bytes | list[int], aux: bool = False) -> None:
        for b in data:
            if len(self._output) >= OUTPUT_QUEUE_LIMIT:
                self._rlog.warning("queue-full", "i8042: output queue full, byte %#04x dropped", b)
                continue
            self._output.append((b & 0xFF, aux))
        self._update_irqs()

    def _reset(self, why: str) -> None:
        self._rlog.info("reset", "i8042: reset line pulsed (%s)", why)
        self._defer(lambda: self._stop(StopRequest(GuestEvent.REBOOT, detail="i8042 reset")))

    def _status(self) -> int:
        st = STS_UNLOCKED
        if self._ram[0] & CTR_SYS:
            st |= STS_SYS
        if self._last_write_cmd:
            st |= STS_CMD
        if self._output:
            st |= STS_OBF
            if self._output[0][1]:
                st |= STS_AUXDATA
        return st

    # ------------------------------------------------------------------ registers
    def _read_reg(self, offset: int) -> int:
        if offset == 0:
            if not self._output:
                return 0x00
            value, _ = self._output.popleft()
            # The output buffer is empty until the next queued byte arrives: the lines drop
            # first, so each byte gives an edge-triggered PIC its own rising edge.
            if self._kbd_level:
                self._kbd_level = False
                self._call(self._kbd_irq, False)
            if self._aux_level:
                self._aux_level = False
                self._call(self._aux_irq, False)
            self._update_irqs()
            return value
        if offset == 4:
            return self._status()
        return 0xFF

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == 0:
            self._last_write_cmd = False
            self._write_data(value)
        elif offset == 4:
            self._last_write_cmd = True
            self._command(value)
        else:
            self._rlog.debug("unused-offset", "i8042: write %#04x to unused offset %d ignored", value, offset)

    def _command(self, cmd: int) -> None:
        self._pending_cmd = 0
        if 0x20 <= cmd <= 0x3F:
            self._queue([self._ram[cmd - 0x20]])
        elif 0x60 <= cmd <= 0x7F or cmd in (_CMD_WRITE_OUTPORT, _CMD_WRITE_KBD_OBUF,
                                             _CMD_WRITE_AUX_OBUF, _CMD_WRITE_AUX):
            self._pending_cmd = cmd
        elif cmd == 0xA7:
            self._ram[0] |= CTR_AUXDIS
        elif cmd == 0xA8:
            self._ram[0] &= ~CTR_AUXDIS & 0xFF
        elif cmd == 0xA9:
            self._queue([0x00])
        elif cmd == 0xAA:
            self._ram[0] |= CTR_SYS
            self._queue([0x55])
        elif cmd == 0xAB:
            self._queue([0x00])
        elif cmd == 0xAD:
            self._ram[0] |= CTR_KBDDIS
        elif cmd == 0xAE:
            self._ram[0] &= ~CTR_KBDDIS & 0xFF
        elif cmd == 0xC0:
            self._queue([0x80])  # input port: keyboard not inhibited
        elif cmd == 0xD0:
            out = self._outport
            if self._output:
                out |= 0x20 if self._output[0][1] else 0x10
            self._queue([out])
        elif cmd == 0xDD:
            self._outport &= ~OUT_A20 & 0xFF
        elif cmd == 0xDF:
            self._outport |= OUT_A20
        elif cmd >= 0xF0:
            if not cmd & OUT_RESET:
                self._reset(f"command {cmd:#04x}")
        else:
            self._rlog.debug("unknown-command", "i8042: unknown controller command %#04x ignored", cmd)

    def _write_data(self, value: int) -> None:
        cmd, self._pending_cmd = self._pending_cmd, 0
        if 0x60 <= cmd <= 0x7F:
            self._ram[cmd - 0x60] = value
            if cmd == 0x60:
                self._update_irqs()  # interrupt enables may have changed
        elif cmd == _CMD_WRITE_OUTPORT:
            self._outport = value
            if not value & OUT_RESET:
                self._reset("output port write")
        elif cmd == _CMD_WRITE_KBD_OBUF:
            self._queue([value])
        elif cmd == _CMD_WRITE_AUX_OBUF:
            self._queue([value], aux=True)
        elif cmd == _CMD_WRITE_AUX:
            self._queue([0xFE], aux=True)  # no mouse: resend/NAK
        else:
            self._keyboard(value)

    def _keyboard(self, value: int) -> None:
        """A byte sent to the keyboard itself."""
        pending, self._kbd_pending_cmd = self._kbd_pending_cmd, 0
        if pending:
            if pending == 0xF0 and value == 0:
                self._queue([0xFA, 0x02])  # current scan code set
            else:
                self._queue([0xFA])
            return
        if value in _KBD_PARAM_CMDS:
            self._kbd_pending_cmd = value
            self._queue([0xFA])
        elif value == 0xFF:
            self._kbd_scanning = True
            self._queue([0xFA, 0xAA])
        elif value == 0xF2:
            self._queue([0xFA, 0xAB, 0x83])
        elif value == 0xEE:
            self._queue([0xEE])
        elif value == 0xF4:
            self._kbd_scanning = True
            self._queue([0xFA])
        elif value == 0xF5:
            self._kbd_scanning = False
            self._queue([0xFA])
        elif value == 0xF6:
            self._kbd_scanning = True
            self._queue([0xFA])
        else:
            self._queue([0xFA])
