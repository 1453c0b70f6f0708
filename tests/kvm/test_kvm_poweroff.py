"""How `hypyr shutdown` asks a guest to power off (LinuxVm.request_poweroff), on this host's /dev/kvm."""

from __future__ import annotations

from hypyr.arch.x86 import acpi
from hypyr.kvm import B
from hypyr.vmm.builder import build_vm
from hypyr.vmm.config import VmConfig

MEMORY = 64 << 20


def test_shutdown_presses_the_power_button_only_once_the_guest_unmasks_its_interrupt(kvm):
    """`hypyr shutdown`'s choice (LinuxVm.request_poweroff): Ctrl-Alt-Del (the i8042 is ready
    from reset) while the GED's IOAPIC pin is masked; the power button once the guest unmasked it."""
    vm = build_vm(VmConfig(kernel="", memory=MEMORY), lambda data: None, kvm=kvm, boot=False)
    try:
        assert vm.request_poweroff() == "Ctrl-Alt-Del"
        assert vm.devices["acpi_ged"].read(0, 1) == b"\x00"  # no press
        chip = vm.machine.vm.get_irqchip(B.KVM_IRQCHIP_IOAPIC)
        chip.chip.ioapic.redirtbl[acpi.GED_GSI] = 0x30   # vector 0x30, edge, unmasked (as evged leaves it)
        vm.machine.vm.set_irqchip(chip)
        assert vm.request_poweroff() == "the ACPI power button"
        assert vm.devices["acpi_ged"].read(0, 1) == b"\x01"   # what the guest's _EVT reads
    finally:
        vm.close()
