"""virtio 1.x devices over the MMIO transport (split virtqueues).

- :mod:`.queue`  — split virtqueue: descriptor chains (indirect, TTL-bounded), used ring, event index
- :mod:`.mmio`   — the virtio-mmio (version 2, "modern") register interface
- :mod:`.device` — the interface every device implements
- one file per device: :mod:`.rng`, :mod:`.blk`, :mod:`.console`
"""
