"""Device models.  Devices see register offsets, an interrupt line and guest memory, never the VM."""
