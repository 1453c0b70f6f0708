"""The split virtqueue alone, as a hostile driver fills it: fuzzed chains, raw descriptors and
ring indices, then every device-side call (pop, pop_all, pop_many, add_used[_many],
needs_interrupt, unpop, resync, reset).  Oracles besides _harness.py's: pop* raise nothing but
QueueError; every chain's buffers lie in guest RAM, readable before writable, lengths as
summed; at most a queue size of chains in flight; the queue writes guest memory only in its
used ring (it never writes a chain's buffers itself)."""

from _harness import (
    FDP,
    MEM_SIZE,
    DeviceRig,
    GuestMemory,
    GuestOps,
    MockDriver,
    SplitQueue,
    WriteWatch,
    check,
    check_rss,
    errors_logged,
    fuzz,
)

from hypyr.devices.virtio.chain import QueueError

mem = GuestMemory.anonymous([(0, MEM_SIZE)], hugepages=False)
drv = MockDriver(size=16, mem=mem, base=0x1000)
q = SplitQueue(256)
watch = WriteWatch(mem)
watch.queues = [q]
held: list = []  # chains popped and not yet returned


def _check_chain(c) -> None:
    for a, n in c.readable + c.writable:
        check(n > 0 and mem.check_range(a, n), f"chain {c.head} has a buffer {a:#x}+{n:#x} outside RAM")
    check(c.readable_len == sum(n for _, n in c.readable), "readable_len is not the sum of the buffers")
    check(c.writable_len == sum(n for _, n in c.writable), "writable_len is not the sum of the buffers")
    check(0 <= c.head < q.size, f"head {c.head} outside the queue")
    if c.readable_len:
        c.readable_ranges(0, c.readable_len)
    if c.writable_len:
        c.writable_ranges(c.writable_len // 2)


def device_op(fdp, op: int) -> None:
    watch.forget()  # the queue itself must not write any chain's buffers
    try:
        if op == 0:
            c = q.pop()
            got = [] if c is None else [c]
        elif op == 1:
            got, _err = q.pop_all()
        elif op == 2:
            got, _err = q.pop_many(fdp.ConsumeIntInRange(-1, 300))
        elif op == 3:  # return some of the held chains (possibly with lies about the length)
            n = fdp.ConsumeIntInRange(0, len(held))
            done, held[:n] = held[:n], []
            q.add_used_many([(c.head, fdp.ConsumeIntInRange(0, 0xFFFFFFFF) if fdp.ConsumeIntInRange(0, 7) == 0
                              else c.writable_len) for c in done])
            got = []
        elif op == 4:
            q.needs_interrupt()
            q.has_available()
            got = []
        elif op == 5:
            n = fdp.ConsumeIntInRange(0, len(held))
            q.unpop(n)
            del held[len(held) - n:]
            got = []
        elif op == 6:  # a driver reset and set-up again (the harness rewrites nothing)
            q.reset()
            q.size, q.desc_table, q.avail_ring, q.used_ring = drv.size, drv.desc, drv.avail, drv.used
            q.activate(mem, event_idx=rig_flags[0], indirect=rig_flags[1])
            held.clear()
            got = []
        else:  # vhost handing the rings back
            try:
                q.resync(fdp.ConsumeIntInRange(0, 0xFFFF))
                held.clear()  # (in flight per the used index; a device would not know which)
            except QueueError:
                pass
            got = []
    except QueueError:
        got = []
    for c in got:
        _check_chain(c)
    held.extend(got)
    check(0 <= q.in_flight <= q.size, f"{q.in_flight} chains in flight in a queue of {q.size}")


rig_flags = [False, True]
ops = GuestOps(mem, [drv], watch, device_op, 8)


def one_input(data: bytes) -> None:
    fdp = FDP(data)
    ops.reset()
    held.clear()
    drv.size = DeviceRig.SIZES[fdp.ConsumeIntInRange(0, len(DeviceRig.SIZES) - 1)]
    drv.avail = drv.desc + 16 * drv.size
    drv.used = (drv.avail + 6 + 2 * drv.size + 3) & ~3
    rig_flags[:] = [fdp.ConsumeBool(), fdp.ConsumeBool()]
    q.reset()
    q.size, q.desc_table, q.avail_ring, q.used_ring = drv.size, drv.desc, drv.avail, drv.used
    q.activate(mem, event_idx=rig_flags[0], indirect=rig_flags[1])
    ops.run(fdp, 64)
    errors_logged()
    check_rss()


if __name__ == "__main__":
    fuzz(one_input)
