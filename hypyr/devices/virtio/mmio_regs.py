"""The virtio-mmio version 2 register map (virtio 1.2 §4.2.2) and the transport's fixed values.

Offsets within the window, identification values, device status bits (§2.1), InterruptStatus
bits, the registers a register page publishes, the features the transport adds to a device's and
the rule the driver's choice must follow.  Shared by the transport (:mod:`.mmio`), the checks of
a saved state (:mod:`.mmio_state`), the VMM and the tests; each register's meaning is tabled in
docs/devices.md.
"""

from __future__ import annotations

from .device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1

MMIO_WINDOW = 0x1000
MAGIC_VALUE = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR_ID = 0x52595048  # "HPYR"

# Register offsets (virtio 1.2 §4.2.2)
MAGIC = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY_OFFSET = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100
# what use_register_page() publishes besides InterruptStatus and ConfigGeneration (the other
# registers read as zero)
PAGE_REGISTERS = (MAGIC, VERSION, DEVICE_ID, VENDOR, DEVICE_FEATURES, QUEUE_NUM_MAX, QUEUE_READY, STATUS,
                  SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH)

# Device status bits (virtio 1.2 §2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# InterruptStatus bits
INT_VRING = 1
INT_CONFIG = 2

TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX


def features_acceptable(features: int, offered: int) -> bool:
    """Whether the driver may set FEATURES_OK with ``features``: a subset of ``offered`` with VERSION_1."""
    return not features & ~offered and bool(features & VIRTIO_F_VERSION_1)
