"""virtio-rng as a hostile driver drives it: fuzzed chains on its one queue, notifications,
resets, quiesce/save/resume (see _harness.py for the oracles)."""

from _harness import DeviceRig, fuzz

from hypyr.devices.virtio.rng import VirtioRng

rig = DeviceRig(VirtioRng())


def one_input(data: bytes) -> None:
    rig.run(data)


if __name__ == "__main__":
    fuzz(one_input)
