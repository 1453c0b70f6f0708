"""The ACPI Generic Event Device (the power button's event register), as a hostile guest drives it,
with power-button presses from the host in between (see _harness.legacy for the operations and oracles)."""

from _harness import fuzz, legacy

one_input = legacy("acpi_ged")

if __name__ == "__main__":
    fuzz(one_input)
