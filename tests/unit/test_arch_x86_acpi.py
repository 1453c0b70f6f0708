import shutil
import struct
import subprocess

import pytest

from hypyr.arch.x86 import acpi, aml, layout
from hypyr.errors import HypyrError
from hypyr.memory import GuestMemory, GuestMemoryError


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 4 * layout.MiB)], hugepages=False)
    yield m
    m.close()


def read_table(mem, addr):
    length = mem.read_u32(addr + 4)
    return mem.read(addr, length)


def tables_from_rsdp(mem, rsdp_addr):
    rsdp = mem.read(rsdp_addr, 36)
    xsdt = read_table(mem, struct.unpack_from("<Q", rsdp, 24)[0])
    out = {}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = read_table(mem, addr)
        out[t[:4]] = (addr, t)
    fadt = out[b"FACP"][1]
    dsdt_addr = struct.unpack_from("<Q", fadt, 140)[0]
    out[b"DSDT"] = (dsdt_addr, read_table(mem, dsdt_addr))
    out[b"XSDT"] = (None, xsdt)
    rsdt_addr = struct.unpack_from("<I", rsdp, 16)[0]
    out[b"RSDT"] = (rsdt_addr, read_table(mem, rsdt_addr))
    return rsdp, out


@pytest.mark.parametrize("n", [1, 2, 8, 254])
def test_checksums_and_structure(mem, n):
    addr = acpi.write_acpi_tables(mem, n)
    assert addr == 0xE0000
    rsdp, tables = tables_from_rsdp(mem, addr)
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2 and rsdp[9:15] == b"HYPYR "
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36
    assert set(tables) == {b"FACP", b"APIC", b"DSDT", b"XSDT", b"RSDT"}
    for sig, (taddr, t) in tables.items():
        assert sum(t) % 256 == 0, sig
        assert t[10:16] == b"HYPYR "
        if taddr is not None:
            assert taddr >= layout.ACPI_AREA_START and taddr + len(t) <= layout.ACPI_AREA_END
    rsdt_ptrs = [a for (a,) in struct.iter_unpack("<I", tables[b"RSDT"][1][36:])]
    xsdt_ptrs = [a for (a,) in struct.iter_unpack("<Q", tables[b"XSDT"][1][36:])]
    assert rsdt_ptrs == xsdt_ptrs


def test_fadt(mem):
    _, tables = tables_from_rsdp(mem, acpi.write_acpi_tables(mem, 2))
    f = tables[b"FACP"][1]
    assert len(f) == 276 and f[8] == 6
    dsdt_addr = tables[b"DSDT"][0]
    assert struct.unpack_from("<I", f, 40)[0] == dsdt_addr
    assert struct.unpack_from("<I", f, 112)[0] & (1 << 20)  # HW_REDUCED_ACPI
    assert struct.unpack_from("<H", f, 109)[0] & 0b1100 == 0b1100  # no VGA, no MSI
    assert struct.unpack_from("<BBBBQ", f, 244) == (1, 8, 0, 1, 0x600)
    assert struct.unpack_from("<BBBBQ", f, 256) == (1, 8, 0, 1, 0x601)
    assert f[268:276] == b"HYPYR\0\0\0"


def parse_name_package(aml: bytes):
    """Just enough AML to read Name(NAME, Package(){integers})."""
    assert aml[0] == 0x08
    name = aml[1:5].decode()
    assert aml[5] == 0x12
    pkglen = aml[6]
    assert pkglen >> 6 == 0  # one-byte PkgLength
    end = 6 + pkglen
    count = aml[7]
    pos, values = 8, []
    while pos < end:
        op = aml[pos]
        if op == 0x00:
            values.append(0)
            pos += 1
        elif op == 0x01:
            values.append(1)
            pos += 1
        elif op == 0x0A:
            values.append(aml[pos + 1])
            pos += 2
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
    assert pos == end == len(aml)
    assert len(values) == count
    return name, values


def test_dsdt_s5(mem):
    _, tables = tables_from_rsdp(mem, acpi.write_acpi_tables(mem, 1))
    d = tables[b"DSDT"][1]
    assert parse_name_package(d[36:36 + len(acpi.S5_AML)]) == ("_S5_", [5, 0])


def test_dsdt_describes_com1():
    """The UART is an ACPI device (PNP0501) with I/O 0x3f8-0x3ff and IRQ 4 in its _CRS."""
    d = acpi.dsdt()
    com1 = d[36 + len(acpi.S5_AML):]
    assert com1[0] == aml.SCOPE_OP and b"\\_SB_" in com1
    assert bytes([aml.EXT_OP_PREFIX, aml.DEVICE_OP]) in com1 and b"COM1" in com1
    assert b"_HID" + bytes.fromhex("0c41d00501") in com1
    crs = com1[com1.index(b"_CRS") + 4:]
    assert crs[0] == aml.BUFFER_OP
    body = crs[2:]  # PkgLength (1 byte) then BufferSize
    assert body[:2] == bytes([aml.BYTE_PREFIX, 13])
    assert body[2:10] == bytes([0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08])
    assert body[10:13] == bytes([0x22, 0x10, 0x00]) and body[13:15] == bytes([0x79, 0x00])


def test_dsdt_power_button_disassembles_to_a_ged_that_notifies_pnp0c0c(tmp_path):
    """ACPICA's own disassembler (iasl, from acpica-tools: scripts/install-deps.sh) reads the DSDT
    back: a GED with an edge interrupt on GED_GSI whose _EVT reads the byte at GED_PORT and
    notifies the PNP0C0C power button with 0x80 when bit 0 is set."""
    if shutil.which("iasl") is None:
        pytest.fail("iasl is missing: run scripts/install-deps.sh (it installs acpica-tools)")
    (tmp_path / "dsdt.aml").write_bytes(acpi.dsdt([acpi.MmioDevice(0xD0000000, 0x200, 16, edge=True)]))
    r = subprocess.run(["iasl", "-d", "dsdt.aml"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    dsl = " ".join((tmp_path / "dsdt.dsl").read_text().split())  # whitespace folded
    assert 'Device (GED0) { Name (_HID, "ACPI0013" /* Generic Event Device */)' in dsl
    assert f"Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{acpi.GED_GSI:08X}, }}" in dsl
    assert f"OperationRegion (GDST, SystemIO, 0x{acpi.GED_PORT:04X}, One)" in dsl
    assert "Field (GDST, ByteAcc, NoLock, Preserve) { GDAT, 8 }" in dsl
    assert ("Method (_EVT, 1, Serialized) // _EVT: Event { Local0 = GDAT /* \\_SB_.GED0.GDAT */ "
            "If ((Local0 & One)) { Notify (\\_SB.PWRB, 0x80) // Status Change } }") in dsl
    assert 'Device (PWRB) { Name (_HID, EisaId ("PNP0C0C") /* Power Button Device */)' in dsl
    assert "Device (VR00)" in dsl   # the virtio-mmio devices still follow


def test_aml_name_paths_and_methods():
    assert aml.name_path("GDAT") == b"GDAT"
    assert aml.name_path("\\_SB.PWRB") == b"\\\x2e_SB_PWRB"
    with pytest.raises(ValueError):
        aml.name_path("\\_SB.A.B")
    with pytest.raises(ValueError):
        aml.method("_EVT", 8)
    assert aml.method("_EVT", 1, serialized=True) == bytes([aml.METHOD_OP, 6]) + b"_EVT" + bytes([9])


def test_aml_pkg_length_encodings():
    assert aml.pkg_length(0x3E) == bytes([0x3F])
    assert aml.pkg_length(0x3F) == bytes([0x41, 0x04])  # 0x41 total: 2-byte form
    two = aml.pkg_length(1000)
    assert two[0] >> 6 == 1 and ((two[1] << 4) | (two[0] & 0xF)) == 1000 + 2


def parse_madt(t):
    entries, pos = [], 44
    while pos < len(t):
        typ, length = t[pos], t[pos + 1]
        entries.append((typ, t[pos:pos + length]))
        pos += length
    assert pos == len(t)
    return entries


@pytest.mark.parametrize("n", [1, 3, 64])
def test_madt(mem, n):
    _, tables = tables_from_rsdp(mem, acpi.write_acpi_tables(mem, n))
    t = tables[b"APIC"][1]
    assert struct.unpack_from("<II", t, 36) == (0xFEE00000, 1)
    entries = parse_madt(t)
    lapics = [struct.unpack("<BBBBI", e) for typ, e in entries if typ == 0]
    assert [(uid, apic, flags) for _, _, uid, apic, flags in lapics] == [(i, i, 1) for i in range(n)]
    (ioapic,) = [struct.unpack("<BBBBII", e) for typ, e in entries if typ == 1]
    assert ioapic[2] == n and ioapic[4] == 0xFEC00000 and ioapic[5] == 0
    overrides = [struct.unpack("<BBBBIH", e) for typ, e in entries if typ == 2]
    assert (0, 0, 2) in [(bus, src, gsi) for _, _, bus, src, gsi, _ in overrides]
    (nmi,) = [struct.unpack("<BBBHB", e) for typ, e in entries if typ == 4]
    assert nmi[2] == 0xFF and nmi[4] == 1


@pytest.mark.parametrize("n", [0, 255, 1000])
def test_bad_vcpu_count(mem, n):
    with pytest.raises(HypyrError):
        acpi.write_acpi_tables(mem, n)


def test_poweroff_decoding():
    assert acpi.POWEROFF_VALUE == 0x34
    assert acpi.is_poweroff_write(0x600, 0x34)
    assert not acpi.is_poweroff_write(0x600, 0x14)  # no SLP_EN
    assert not acpi.is_poweroff_write(0x600, 0x20)  # S0
    assert not acpi.is_poweroff_write(0x601, 0x34)


def test_tables_outside_ram_raise(mem):
    small = GuestMemory.anonymous([(0, 0x80000)], hugepages=False)
    try:
        with pytest.raises(GuestMemoryError):
            acpi.write_acpi_tables(small, 1)
    finally:
        small.close()
