"""The ACPI PM registers (sleep control/status) and the reset register, as a hostile guest drives it (see
_harness.legacy for the operations and oracles)."""

from _harness import fuzz, legacy

one_input = legacy("acpi_pm")

if __name__ == "__main__":
    fuzz(one_input)
