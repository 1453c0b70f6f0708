"""Legacy PC devices.  Port I/O wiring the VMM does (start, length, device)::

    0x3f8, 8   serial.Serial(irq4, out)               COM1, ISA IRQ 4
    0x60,  1   i8042.I8042(stop, kbd_irq=irq1).data_port
    0x64,  1   (same controller).command_port
    0x70,  2   rtc.Rtc()                              CMOS index/data
    0x600, 2   acpi_pm.AcpiPm(stop)                   FADT SLEEP_CONTROL/SLEEP_STATUS
    0x604, 1   acpi_pm.AcpiReset(stop)                optional FADT RESET_REG
    0xf4,  1   hypyr.devices.pvexit.PvExit(stop)      exit-status port (or length 4)
"""
