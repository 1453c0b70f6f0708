"""The 8250 UART (hypyr/devices/legacy/serial.py), as a hostile guest drives it (see
_harness.legacy for the operations and oracles)."""

from _harness import fuzz, legacy

one_input = legacy("serial")

if __name__ == "__main__":
    fuzz(one_input)
