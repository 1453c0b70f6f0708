"""Minimal ACPI tables: RSDP, XSDT (and RSDT), FADT (hardware-reduced), DSDT with \\_S5, MADT.

Enough for Linux to find the CPUs and interrupt controllers (MADT) and to power off:
the FADT's SLEEP_CONTROL_REG is an 8-bit I/O port; Linux powers off by writing
``SLP_EN | SLP_TYP << 2`` to it, with SLP_TYP taken from the DSDT's ``\\_S5`` package (5).
The VMM treats such a write (value 0x34) as poweroff.

Everything lives in the e820-reserved area 0xe0000-0xfffff, RSDP first (Linux also
scans this area for it, besides reading boot_params.acpi_rsdp_addr).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from hypyr.errors import HypyrError
from hypyr.memory import GuestMemory

from . import aml, layout
from .layout import MAX_VCPUS

OEM_ID = b"HYPYR "
OEM_TABLE_ID = b"HYPYRVM "
OEM_REVISION = 1
CREATOR_ID = b"HYPY"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR = b"HYPYR\0\0\0"

ACPI_SLEEP_CONTROL_PORT = 0x600
ACPI_SLEEP_STATUS_PORT = 0x601
SLP_TYP_S5 = 5
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 5
WAK_STS = 1 << 7  # in the sleep status register
POWEROFF_VALUE = SLP_EN | SLP_TYP_S5 << SLP_TYP_SHIFT  # 0x34

SDT_HEADER_SIZE = 36
RSDP_SIZE = 36
FADT_SIZE = 276
FADT_REVISION = 6
FADT_MINOR_VERSION = 0

# FADT Flags
FADT_WBINVD = 1 << 0
FADT_HW_REDUCED_ACPI = 1 << 20
# FADT IAPC_BOOT_ARCH
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# Generic Address Structure
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

# MADT
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
LAPIC_ENABLED = 1 << 0
MPS_INTI_POLARITY_HIGH = 0x1
MPS_INTI_TRIGGER_EDGE = 0x1 << 2
ALL_PROCESSORS = 0xFF

# DSDT body: Name(_S5_, Package(){5, 0})
#   08           NameOp
#   5F 53 35 5F  NameSeg "_S5_"
#   12           PackageOp
#   05           PkgLength: 5 bytes, counted from this byte to the end of the package
#   02           NumElements
#   0A 05        BytePrefix 5   -> SLP_TYPa
#   00           ZeroOp         -> SLP_TYPb
S5_AML = bytes([0x08, 0x5F, 0x53, 0x35, 0x5F, 0x12, 0x05, 0x02, 0x0A, SLP_TYP_S5, 0x00])


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with this byte in place of a 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete system description table: header (with checksum) + body."""
    length = SDT_HEADER_SIZE + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                         OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(space_id: int, bit_width: int, address: int, access_size: int = 0, bit_offset: int = 0) -> bytes:
    """A 12-byte Generic Address Structure."""
    return struct.pack("<BBBBQ", space_id, bit_width, bit_offset, access_size, address)


def rsdp(xsdt_addr: int, rsdt_addr: int = 0) -> bytes:
    """A revision-2 RSDP (36 bytes) with both checksums."""
    t = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, rsdt_addr, RSDP_SIZE, xsdt_addr, 0))
    t[8] = checksum(t[:20])
    t[32] = checksum(t)
    return bytes(t)


def xsdt(addrs: list[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in addrs))


def rsdt(addrs: list[int]) -> bytes:
    return sdt(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in addrs))


# Legacy devices are described in the DSDT: with hardware-reduced ACPI Linux sets up no legacy
# PIC, so ISA IRQs have no fixed mapping and a device's IRQ must come from its _CRS.
COM1_AML = aml.scope(
    "\\_SB",
    aml.device("COM1",
               aml.name("_HID", aml.eisa_id("PNP0501")),   # 16550A-compatible UART
               aml.name("_UID", aml.integer(1)),
               aml.name("_CRS", aml.resource_template(aml.io_port(0x3F8, 8), aml.irq_no_flags(4)))),
    # The i8042 keyboard controller: Linux probes it only when ACPI lists it; it carries the
    # Ctrl-Alt-Del that `hypyr shutdown` sends (as Firecracker's SendCtrlAltDel).
    aml.device("KBD_",
               aml.name("_HID", aml.eisa_id("PNP0303")),   # IBM enhanced keyboard (101/102-key, PS/2)
               aml.name("_CRS", aml.resource_template(aml.io_port(0x60, 1), aml.io_port(0x64, 1),
                                                      aml.irq_no_flags(1)))),
    # pvpanic (QEMU's ACPI id): the guest kernel reports panics on port 0x505
    aml.device("PEVT",
               aml.name("_HID", aml.string("QEMU0001")),
               aml.name("_CRS", aml.resource_template(aml.io_port(0x505, 1)))),
)


# The power button (hypyr.devices.legacy.acpi_ged): a Generic Event Device whose _EVT reads its
# event register and notifies the PNP0C0C button, as Cloud Hypervisor's and QEMU's microvm do.
GED_PORT = 0x606
GED_GSI = 5           # an ISA interrupt no other device of the machine uses
GED_POWER_BUTTON = 0x01
GED_AML = aml.scope(
    "\\_SB",
    aml.device("GED0",
               aml.name("_HID", aml.string("ACPI0013")),
               aml.name("_UID", aml.integer(0)),
               aml.name("_CRS", aml.resource_template(aml.interrupt(GED_GSI, edge=True))),
               aml.op_region_io("GDST", GED_PORT, 1),
               aml.field_bytes("GDST", "GDAT"),
               aml.method("_EVT", 1,
                          aml.store(aml.name_path("GDAT"), aml.LOCAL0),
                          aml.if_(aml.and_(aml.LOCAL0, aml.integer(GED_POWER_BUTTON)),
                                  aml.notify("\\_SB.PWRB", 0x80)),
                          serialized=True)),
    aml.device("PWRB",
               aml.name("_HID", aml.eisa_id("PNP0C0C")),
               aml.name("_UID", aml.integer(0))),
)


class MmioDevice(NamedTuple):
    """A virtio-mmio window announced to the guest (ACPI id LNRO0005, as QEMU and Firecracker do)."""
    base: int
    size: int
    gsi: int
    edge: bool = False  # edge-triggered interrupt (an irqfd) rather than level-triggered


def virtio_mmio_aml(devices: list[MmioDevice]) -> bytes:
    if not devices:
        return b""
    return aml.scope("\\_SB", *(
        aml.device(f"VR{i:02X}",
                   aml.name("_HID", aml.string("LNRO0005")),
                   aml.name("_UID", aml.integer(i)),
                   aml.name("_CRS", aml.resource_template(aml.memory32_fixed(d.base, d.size),
                                                          aml.interrupt(d.gsi, edge=d.edge))))  # active high
        for i, d in enumerate(devices)))


def dsdt(devices: list[MmioDevice] | None = None) -> bytes:
    return sdt(b"DSDT", 2, S5_AML + COM1_AML + GED_AML + virtio_mmio_aml(devices or []))


def fadt(dsdt_addr: int) -> bytes:
    body = bytearray(FADT_SIZE - SDT_HEADER_SIZE)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - SDT_HEADER_SIZE, *values)

    put(40, "<I", dsdt_addr)  # DSDT
    put(109, "<H", IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED)  # IAPC_BOOT_ARCH
    put(112, "<I", FADT_HW_REDUCED_ACPI | FADT_WBINVD)  # Flags
    put(131, "<B", FADT_MINOR_VERSION)
    put(140, "<Q", dsdt_addr)  # X_DSDT
    put(244, "12s", gas(GAS_SYSTEM_IO, 8, ACPI_SLEEP_CONTROL_PORT, GAS_ACCESS_BYTE))
    put(256, "12s", gas(GAS_SYSTEM_IO, 8, ACPI_SLEEP_STATUS_PORT, GAS_ACCESS_BYTE))
    put(268, "8s", HYPERVISOR_VENDOR)
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(nr_vcpus: int) -> bytes:
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for cpu in range(nr_vcpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id(nr_vcpus), 0, layout.IOAPIC_ADDR, 0)
    # the PIT's IRQ0 is wired to IOAPIC pin 2, as on PCs (and KVM's in-kernel IOAPIC)
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, 2, 0)
    # NMIs arrive on LINT1 of every local APIC, edge triggered, active high
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS,
                        MPS_INTI_POLARITY_HIGH | MPS_INTI_TRIGGER_EDGE, 1)
    return sdt(b"APIC", 5, bytes(body))


def ioapic_id(nr_vcpus: int) -> int:
    return nr_vcpus


class AcpiTables(NamedTuple):
    """Where each table went (guest addresses) and the end of the area used."""

    rsdp: int
    xsdt: int
    rsdt: int
    fadt: int
    dsdt: int
    madt: int
    end: int


def _align(x: int, a: int = 16) -> int:
    return (x + a - 1) & ~(a - 1)


def build_acpi_tables(nr_vcpus: int, base: int = layout.RSDP_ADDR,
                      devices: list[MmioDevice] | None = None) -> tuple[AcpiTables, dict[int, bytes]]:
    """All tables as ``{address: bytes}``, laid out from ``base`` (the RSDP's address)."""
    if not 1 <= nr_vcpus <= MAX_VCPUS:
        raise HypyrError(f"The number of vCPUs must be between 1 and {MAX_VCPUS}, not {nr_vcpus}.")
    pos = _align(base + RSDP_SIZE)
    blobs: dict[int, bytes] = {}

    def place(data: bytes) -> int:
        nonlocal pos
        addr = pos
        blobs[addr] = data
        pos = _align(pos + len(data))
        return addr

    dsdt_addr = place(dsdt(devices))
    fadt_addr = place(fadt(dsdt_addr))
    madt_addr = place(madt(nr_vcpus))
    xsdt_addr = place(xsdt([fadt_addr, madt_addr]))
    rsdt_addr = place(rsdt([fadt_addr, madt_addr]))
    blobs[base] = rsdp(xsdt_addr, rsdt_addr)
    if pos > layout.ACPI_AREA_END:
        raise HypyrError(f"The ACPI tables for {nr_vcpus} vCPUs do not fit below 1 MiB.")
    return AcpiTables(rsdp=base, xsdt=xsdt_addr, rsdt=rsdt_addr, fadt=fadt_addr, dsdt=dsdt_addr,
                      madt=madt_addr, end=pos), blobs


def write_acpi_tables(mem: GuestMemory, nr_vcpus: int, devices: list[MmioDevice] | None = None) -> int:
    """Write the ACPI tables into the 0xe0000-0xfffff area; return the RSDP's address."""
    tables, blobs = build_acpi_tables(nr_vcpus, devices=devices)
    mem.fill(layout.ACPI_AREA_START, tables.end - layout.ACPI_AREA_START)
    for addr, data in blobs.items():
        mem.write(addr, data)
    return tables.rsdp


def is_poweroff_write(port: int, value: int) -> bool:
    """Whether an I/O write is the guest asking for S5 (poweroff) through the sleep control register."""
    return (port == ACPI_SLEEP_CONTROL_PORT and bool(value & SLP_EN)
            and (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == SLP_TYP_S5)
