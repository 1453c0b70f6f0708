"""The i8042 keyboard controller (both ports), as a hostile guest drives it (see
_harness.legacy for the operations and oracles)."""

from _harness import fuzz, legacy

one_input = legacy("i8042")

if __name__ == "__main__":
    fuzz(one_input)
