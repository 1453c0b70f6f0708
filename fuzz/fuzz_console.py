"""virtio-console as a hostile driver drives it: fuzzed chains on the receive and transmit
queues, host input (up to beyond the receive buffer's bound), the emergency-write register,
resets, quiesce/save/resume.  See _harness.py for the oracles."""

from _harness import DeviceRig, check, fuzz

from hypyr.devices.virtio import console as C

out_bytes = [0]


def out(b: bytes) -> None:
    out_bytes[0] += len(b)


dev = C.VirtioConsole(out)
rig = DeviceRig(dev)


def host_input(fdp):
    n = fdp.ConsumeIntInRange(0, 64) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 2 * C.RX_BUFFER_SIZE)
    data = fdp.ConsumeBytes(n).ljust(n, b"x")
    took = dev.enqueue_input(data)
    check(0 <= took <= len(data), f"enqueue_input took {took} of {len(data)} bytes")


def config(fdp):
    off, size = fdp.ConsumeIntInRange(-4, 16), fdp.ConsumeIntInRange(0, 8)
    if fdp.ConsumeBool():
        check(len(dev.config_read(off, size)) == size, "config read of the wrong length")
    else:
        dev.config_write(off, fdp.ConsumeBytes(size))


rig.extra_ops += [host_input, config]


def one_input(data: bytes) -> None:
    rig.run(data)
    dev.load_state({**dev.save_state(), "rx": b""})  # drop the input left over (it survives resets by design)
    dev.resume()


if __name__ == "__main__":
    fuzz(one_input)
