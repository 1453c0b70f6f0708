"""hypyr: a Xen-style hypervisor in Python on Linux KVM."""

__version__ = "0.1.0"
