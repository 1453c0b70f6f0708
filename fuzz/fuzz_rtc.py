"""The CMOS RTC, as a hostile guest drives it (see
_harness.legacy for the operations and oracles)."""

from _harness import fuzz, legacy

one_input = legacy("rtc")

if __name__ == "__main__":
    fuzz(one_input)
