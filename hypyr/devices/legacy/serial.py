"""A 16550A-compatible UART (8250 family), as used for COM1.

Register it at port 0x3f8 with length 8; its interrupt line is ISA IRQ 4 (gated by MCR.OUT2).
Transmission is instantaneous; THRE is re-armed on every THR write and on ETBEI 0->1, as on a real
16550 (Linux's tty layer depends on it).  All state is guarded by one lock; ``irq`` and ``out``
are called with it held and must not call back into this device.
Design notes (registers, interrupt sources, loopback, input buffer): docs/devices.md, "8250 UART (COM1)".
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from hypyr.devices.bus import IrqLine
from hypyr.devices.legacy._bytedev import ByteRegisterDevice
from hypyr.devices.overflow import OverflowLog
from hypyr.devices.state import HostInputGate, StateError, StateReader

log = logging.getLogger("hypyr.dev.serial")

COM1_PORT = 0x3F8
COM1_IRQ = 4
LENGTH = 8

RX_BUFFER_SIZE = 64 * 1024
HW_FIFO_SIZE = 16

# Register offsets
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER bits
IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # THR empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status

# IIR values
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_TIMEOUT = 0x0C
IIR_FIFO_BITS = 0xC0

# FCR bits
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA = 0x08
FCR_TRIGGER_MASK = 0xC0
_TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}

# LCR
LCR_DLAB = 0x80

# MCR bits
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR bits
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFO_ERR = 0x80
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR bits
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F

# Modem inputs when not in loopback: a terminal is attached.
_HOST_LINES = MSR_CTS | MSR_DSR | MSR_DCD


# The registers a save holds: name, the bits it can have set, its value at reset.
_REGISTERS = (
    ("ier", 0x0F, 0), ("lcr", 0xFF, 0), ("mcr", MCR_MASK, 0),
    ("fcr", FCR_ENABLE | FCR_DMA | FCR_TRIGGER_MASK, 0),   # as programmed (the clear bits are not kept)
    ("lsr_errors", LSR_ERRORS, 0),   # sticky LSR error bits (OE/PE/FE/BI), cleared by reading LSR
    ("msr", 0xFF, _HOST_LINES),      # lines in bits 7:4, deltas in bits 3:0
    ("scr", 0xFF, 0), ("dll", 0xFF, 0x0C), ("dlm", 0xFF, 0),   # 9600 baud
)


class Serial(HostInputGate, ByteRegisterDevice):
    """16550A UART.  ``irq`` is the UART's (OUT2-gated) interrupt line; ``out`` gets TX bytes."""

    LENGTH = LENGTH

    def __init__(self, irq: IrqLine, out: Callable[[bytes], object]):
        super().__init__(log)
        self._irq = irq
        self._out = out
        self._irq_level = False
        self._overflow = OverflowLog(log, "serial", RX_BUFFER_SIZE)
        self._quiesced = False  # host input refused (left with the caller) while saving
        self._set_registers({name: reset for name, _, reset in _REGISTERS}, thre_pending=True, rx=b"")

    # ------------------------------------------------------------------ save/restore (devices/state.py)
    STATE_KIND = "serial-16550a"
    STATE_VERSION = 1

    def _set_registers(self, regs: dict[str, int], thre_pending: bool, rx: bytes) -> None:
        self._ier, self._lcr, self._mcr, self._fcr = regs["ier"], regs["lcr"], regs["mcr"], regs["fcr"]
        self._lsr_errors, self._msr, self._scr = regs["lsr_errors"], regs["msr"], regs["scr"]
        self._dll, self._dlm = regs["dll"], regs["dlm"]
        self._thre_pending = thre_pending
        self._rx: collections.deque[int] = collections.deque(rx)

    def save_state(self) -> dict:
        """Registers, the receive buffer (FIFO and what waits behind it) and the line level."""
        with self._lock:
            return {"kind": self.STATE_KIND, "v": self.STATE_VERSION,
                    **{name: getattr(self, "_" + name) for name, _, _ in _REGISTERS},
                    "thre_pending": self._thre_pending, "rx": bytes(self._rx), "irq": self._irq_level}

    def load_state(self, state: dict) -> None:
        """Validate and load ``state``; the line is driven to the restored level (the caller
        does not know its level before); quiesced."""
        r = StateReader(state, "serial", self.STATE_KIND, self.STATE_VERSION)
        regs = {name: r.integer(name, 0, 0xFF) for name, _, _ in _REGISTERS}
        thre_pending, rx, irq = r.flag("thre_pending"), r.blob("rx", RX_BUFFER_SIZE), r.flag("irq")
        r.done()
        for name, bits, _ in _REGISTERS:
            if regs[name] & ~bits:
                raise StateError(f"serial: {name}={regs[name]:#04x} has bits the UART does not keep")
        probe = Serial(lambda _: None, lambda _: None)
        probe._set_registers(regs, thre_pending, rx)
        if probe._compute_level() != irq:
            raise StateError("serial: the saved interrupt line level does not follow from the registers")
        with self._lock:
            self._set_registers(regs, thre_pending, rx)
            self._irq_level = self._compute_level()
            self._call_irq(self._irq_level)
        self.quiesce()

    # ------------------------------------------------------------------ host side
    def input_room(self) -> int:
        """How many bytes :meth:`enqueue_input` would accept right now."""
        with self._lock:
            return 0 if self._quiesced else RX_BUFFER_SIZE - len(self._rx)

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes received from the host console; returns how many were accepted.
        Bytes beyond the buffer bound are dropped (logged, LSR.OE set).  While quiesced nothing
        is accepted (and nothing dropped)."""
        data = bytes(data)
        if not data:
            return 0
        with self._lock:
            if self._quiesced:
                return 0
            accepted = self._rx_push(data)
            self._update_irq()
            verdict = self._overflow.note(len(data), accepted, len(self._rx))
        self._overflow.emit(*verdict)
        return accepted

    @property
    def divisor(self) -> int:
        with self._lock:
            return (self._dlm << 8) | self._dll

    # ------------------------------------------------------------------ internals
    def _rx_push(self, data: bytes) -> int:
        room = RX_BUFFER_SIZE - len(self._rx)
        take = min(room, len(data))
        if take:
            self._rx.extend(data[:take])
        if take < len(data):
            self._lsr_errors |= LSR_OE
        return take

    def _fifo_enabled(self) -> bool:
        return bool(self._fcr & FCR_ENABLE)

    def _pending_iir(self) -> int:
        """The IIR interrupt-identification value (bits 3:0) of the highest pending source."""
        ier = self._ier
        if ier & IER_ELSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_ERBFI and self._rx:
            if self._fifo_enabled() and len(self._rx) < _TRIGGER_LEVELS[self._fcr & FCR_TRIGGER_MASK]:
                return IIR_TIMEOUT
            return IIR_RDI
        if ier & IER_ETBEI and self._thre_pending:
            return IIR_THRI
        if ier & IER_EDSSI and self._msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _compute_level(self) -> bool:
        return self._pending_iir() != IIR_NO_INT and bool(self._mcr & MCR_OUT2)

    def _call_irq(self, level: bool) -> None:
        try:
            self._irq(level)
        except Exception:
            self._rlog.exception("irq", "serial: irq(%s) failed", level)

    def _update_irq(self) -> None:
        level = self._compute_level()
        if level != self._irq_level:
            self._irq_level = level
            self._call_irq(level)

    def _modem_lines(self) -> int:
        if self._mcr & MCR_LOOP:
            m = self._mcr
            return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        return _HOST_LINES

    def _set_modem_lines(self, new: int) -> None:
        old = self._msr & 0xF0
        delta = 0
        changed = old ^ new
        if changed & MSR_CTS:
            delta |= MSR_DCTS
        if changed & MSR_DSR:
            delta |= MSR_DDSR
        if old & MSR_RI and not new & MSR_RI:  # trailing edge of ring indicator
            delta |= MSR_TERI
        if changed & MSR_DCD:
            delta |= MSR_DDCD
        self._msr = new | (self._msr & MSR_DELTAS) | delta

    def _hw_fifo_len(self) -> int:
        return HW_FIFO_SIZE if self._fifo_enabled() else 1

    def _clear_rx_fifo(self) -> None:
        for _ in range(min(self._hw_fifo_len(), len(self._rx))):
            self._rx.popleft()

    def _transmit(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            if not self._rx_push(bytes([value])):
                self._rlog.debug("loopback-full", "serial: loopback byte dropped, receive buffer full")
            return
        try:
            self._out(bytes([value]))
        except Exception:
            self._rlog.exception("out", "serial: output callback failed; byte dropped")

    # ------------------------------------------------------------------ registers
    def _read_reg(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            if dlab:
                return self._dll
            value = self._rx.popleft() if self._rx else 0
            self._update_irq()
            return value
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            iid = self._pending_iir()
            if iid == IIR_THRI:
                self._thre_pending = False
                self._update_irq()
            return iid | (IIR_FIFO_BITS if self._fifo_enabled() else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = LSR_THRE | LSR_TEMT | self._lsr_errors
            if self._rx:
                value |= LSR_DR
            if self._fifo_enabled() and self._lsr_errors & (LSR_PE | LSR_FE | LSR_BI):
                value |= LSR_FIFO_ERR
            if self._lsr_errors:
                self._lsr_errors = 0
                self._update_irq()
            return value
        if offset == MSR:
            value = self._msr
            if value & MSR_DELTAS:
                self._msr &= 0xF0
                self._update_irq()
            return value
        if offset == SCR:
            return self._scr
        return 0xFF  # unreachable: offsets are checked by the base class

    def _write_reg(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._dll = value
                return
            # THR now full: THRE drops (the line may fall) ...
            self._thre_pending = False
            self._update_irq()
            # ... the byte goes out immediately, THR is empty again and THRE is re-armed.
            self._transmit(value)
            self._thre_pending = True
            self._update_irq()
        elif offset == IER:
            if dlab:
                self._dlm = value
                return
            if value & ~0x0F:
                self._rlog.debug("ier-reserved", "serial: IER write %#04x, reserved bits ignored", value)
            new = value & 0x0F
            changed = self._ier ^ new
            self._ier = new
            if changed & IER_ETBEI:
                # THR is always empty here, so enabling ETBEI (0->1) raises THRE at once.
                self._thre_pending = bool(new & IER_ETBEI)
            self._update_irq()
        elif offset == FCR:
            self._write_fcr(value)
            self._update_irq()
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            if value & ~MCR_MASK:
                self._rlog.debug("mcr-reserved", "serial: MCR write %#04x, reserved bits ignored", value)
            self._mcr = value & MCR_MASK
            self._set_modem_lines(self._modem_lines())
            self._update_irq()
        elif offset in (LSR, MSR):
            self._rlog.debug("read-only", "serial: write %#04x to read-only register %d ignored", value, offset)
        elif offset == SCR:
            self._scr = value

    def _write_fcr(self, value: int) -> None:
        was_enabled = self._fifo_enabled()
        if not value & FCR_ENABLE:
            if was_enabled:
                self._clear_rx_fifo()
            self._fcr = 0
            return
        if not was_enabled:
            # Switching FIFO mode on resets the (1-byte) receiver holding register.
            self._clear_rx_fifo()
        self._fcr = value & (FCR_ENABLE | FCR_DMA | FCR_TRIGGER_MASK)
        if value & FCR_CLEAR_RX:
            self._clear_rx_fifo()
        # FCR_CLEAR_TX: the transmitter is always empty.
