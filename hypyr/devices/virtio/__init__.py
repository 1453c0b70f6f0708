"""virtio 1.x devices over the MMIO transport (split virtqueues).

- :mod:`.queue`  — split virtqueue: descriptor chains (indirect, TTL-bounded), used ring, event index
- :mod:`.chain`  — a popped request's descriptor chain (its buffers, ranges, gather/scatter); QueueError
- :mod:`.mmio`   — the virtio-mmio (version 2, "modern") register interface, with its register map
  (:mod:`.mmio_regs`) and the checks of a saved transport state (:mod:`.mmio_state`)
- :mod:`.device` — the interface every device implements
- one file per device: :mod:`.rng`, :mod:`.blk` (with :mod:`.blk_spec`, :mod:`.blk_transfer`), :mod:`.console`,
  :mod:`.net` (with its userspace receive path :mod:`.net_rx`, :mod:`.tap`, :mod:`.vhost`)

Save/restore: the transport's state holds its device's (:mod:`hypyr.devices.state`, docs/save-restore.md).
"""
