"""The lab: run a command inside an L1 Linux VM under QEMU TCG with emulated AMD SVM, so that
hypyr can be tested against real hardware-virtualisation semantics (/dev/kvm with kvm-amd)."""

from hypyr.lab.parts import LabParts, available, ensure_parts, lab_dir
from hypyr.lab.runner import run

__all__ = ["LabParts", "available", "ensure_parts", "lab_dir", "run"]
