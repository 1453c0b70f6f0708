"""The xl-style toolstack commands: domains (create, list, save, migrate, ...), networks and the
REST server.  Each is a client of hypyr.toolstack.api (or the module named), imported when run."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from hypyr.cli.common import say
from hypyr.errors import HypyrError


def add_commands(sub: Any, common: Any) -> None:
    """Add the toolstack commands' parsers (hypyr.cli.COMMAND_MODULES lists them) to ``sub``."""
    c = sub.add_parser("create", parents=[common], help="create a domain from an xl.cfg file")
    c.add_argument("config", metavar="FILE.cfg")
    c.add_argument("-c", dest="console", action="store_true", help="attach to its console")
    c.set_defaults(func=cmd_create)

    ls = sub.add_parser("list", parents=[common], help="list domains (as xl list)")
    ls.add_argument("names", nargs="*", metavar="NAME")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    co = sub.add_parser("console", parents=[common], help="attach to a domain's console (Ctrl-] detaches)")
    co.add_argument("name", metavar="NAME")
    co.set_defaults(func=cmd_console)

    for op, text in (("pause", "pause a domain"), ("unpause", "unpause a domain"),
                     ("shutdown", "ask a domain to power off (the ACPI power button, else Ctrl-Alt-Del)"),
                     ("reboot", "reset a domain (a hard reboot; on_reboot applies)"),
                     ("destroy", "stop a domain immediately")):
        o = sub.add_parser(op, parents=[common], help=text)
        o.add_argument("name", metavar="NAME")
        if op == "shutdown":
            o.add_argument("-w", dest="wait", action="store_true", help="wait until the domain is gone")
        o.set_defaults(func=cmd_domain_op)

    tr = sub.add_parser("trigger", parents=[common], help="send an NMI to a vCPU of a domain (as xl trigger); a "
                        "guest booted with unknown_nmi_panic prints where it was and panics")
    tr.add_argument("name", metavar="DOMAIN")
    tr.add_argument("what", metavar="nmi")
    tr.add_argument("vcpu", metavar="VCPU", type=int, nargs="?", default=0, help="the vCPU (default 0)")
    tr.set_defaults(func=cmd_trigger)

    sa = sub.add_parser("save", parents=[common], help="save a domain's state to a file and destroy it (as xl save)")
    sa.add_argument("name", metavar="DOMAIN")
    sa.add_argument("file", metavar="FILE")
    sa.add_argument("-c", dest="keep_running", action="store_true", help="keep the domain running after the save")
    sa.set_defaults(func=cmd_save)

    rs = sub.add_parser("restore", parents=[common], help="restore a domain from a file made by hypyr save")
    rs.add_argument("file", metavar="FILE")
    rs.add_argument("-p", dest="paused", action="store_true", help="leave it paused (hypyr unpause runs it)")
    rs.set_defaults(func=cmd_restore)

    mg = sub.add_parser("migrate", parents=[common],
                        help="migrate a domain live to a hypyr migrate-receive (as xl migrate)")
    mg.add_argument("name", metavar="DOMAIN")
    mg.add_argument("host", metavar="HOST[:PORT]", help="where hypyr migrate-receive listens (default port 8002)")
    mg.add_argument("--downtime-ms", type=float, default=300.0, metavar="N",
                    help="stop and copy once the rest fits in N ms (default 300)")
    mg.add_argument("--max-iterations", type=int, default=30, metavar="N",
                    help="at most N pre-copy passes, the first included (default 30)")
    mg.set_defaults(func=cmd_migrate)

    mr = sub.add_parser("migrate-receive", parents=[common],
                        help="accept one live migration, then exit (the domain runs on)")
    mr.add_argument("--listen", default="127.0.0.1:8002", metavar="ADDR:PORT",
                    help="address to listen on (default 127.0.0.1:8002; anyone who can connect can send a "
                         "domain: listen on other addresses only on a trusted network)")
    mr.add_argument("--once", action="store_true",
                    help="accept one migration and exit (what it always does; for scripts)")
    mr.set_defaults(func=cmd_migrate_receive)

    vl = sub.add_parser("vcpu-list", parents=[common], help="list vCPUs with host CPU and affinity")
    vl.add_argument("name", nargs="?", metavar="NAME")
    vl.add_argument("--json", action="store_true")
    vl.set_defaults(func=cmd_vcpu_list)

    vp = sub.add_parser("vcpu-pin", parents=[common], help="set a vCPU thread's host CPU affinity")
    vp.add_argument("name", metavar="NAME")
    vp.add_argument("vcpu", metavar="VCPU", help="vCPU number or 'all'")
    vp.add_argument("cpus", metavar="CPUS", help="host CPUs, e.g. 0-1,3 or all")
    vp.set_defaults(func=cmd_vcpu_pin)

    sc = sub.add_parser("sched-credit", parents=[common], help="show or set a domain's credit weight and cap")
    sc.add_argument("-d", dest="domain", metavar="NAME")
    sc.add_argument("-w", dest="weight", type=int, metavar="WEIGHT", help="1-65535 (default 256)")
    sc.add_argument("-c", dest="cap", type=int, metavar="CAP", help="%% of one host CPU, 0 = no cap")
    sc.set_defaults(func=cmd_sched_credit)

    nc = sub.add_parser("net-create", parents=[common],
                        help="create a network: a bridge with the host's address, optional DHCP and NAT")
    nc.add_argument("name", metavar="NAME", help="the network's (and its bridge's) name, e.g. xenbr1")
    nc.add_argument("--subnet", required=True, metavar="CIDR",
                    help="IPv4 subnet, e.g. 10.78.0.0/24; the host takes its first address")
    nc.add_argument("--dhcp", action="store_true", help="serve DHCP on it (dnsmasq)")
    nc.add_argument("--nat", action="store_true", help="masquerade the subnet out of the host's other interfaces")
    nc.set_defaults(func=cmd_net_create)

    nl = sub.add_parser("net-list", parents=[common], help="list the networks hypyr created")
    nl.add_argument("--json", action="store_true", help="machine-readable output")
    nl.set_defaults(func=cmd_net_list)

    nd = sub.add_parser("net-destroy", parents=[common], help="delete a network (no taps may be attached)")
    nd.add_argument("name", metavar="NAME")
    nd.set_defaults(func=cmd_net_destroy)

    nwl = sub.add_parser("network-list", parents=[common],
                         help="a domain's NICs: MAC, bridge, tap, bytes received and sent by the guest")
    nwl.add_argument("name", metavar="DOMAIN")
    nwl.add_argument("--json", action="store_true", help="machine-readable output")
    nwl.set_defaults(func=cmd_network_list)

    inf = sub.add_parser("info", parents=[common], help="host information (CPUs, memory, KVM backend), or "
                                                      "a domain's VMM: pid, seccomp mode, jail")
    inf.add_argument("domain", nargs="?", metavar="DOMAIN", help="a domain's name or id")
    inf.add_argument("--json", action="store_true")
    inf.add_argument("--registers", action="store_true",
                     help="each vCPU's registers and pending events (the domain pauses for the instant; as xenctx)")
    inf.add_argument("--queues", action="store_true",
                     help="each virtio device's status and its queues' ring indices (as QEMU's "
                          "info virtio-queue-status)")
    inf.set_defaults(func=cmd_info)

    tp = sub.add_parser("top", parents=[common], help="live table of domains: CPU %%, memory, state (q quits)")
    tp.add_argument("-d", dest="delay", type=float, default=1.0, help="seconds between refreshes")
    tp.add_argument("-n", dest="iterations", type=int, help="stop after N refreshes")
    tp.add_argument("-b", dest="batch", action="store_true", help="plain output, no screen control")
    tp.set_defaults(func=cmd_top)

    sv = sub.add_parser("serve", parents=[common], help="serve the toolstack's REST API on a unix socket")
    sv.add_argument("--socket", metavar="PATH", help="default: <state dir>/api.sock")
    sv.set_defaults(func=cmd_serve)


def cmd_create(args) -> int:
    from hypyr.toolstack import api
    rec = api.create(args.config)
    print(f"hypyr: domain {rec.name} created (id {rec.domid})", file=sys.stderr)
    if args.console:
        from hypyr.toolstack.console import attach
        return attach(rec.name)
    return 0


MIB = 1 << 20


class _ProgressLine:
    """One line on stderr, rewritten in place, for a tty only (nothing otherwise)."""

    def __init__(self, what: str):
        self.what = what
        self.tty = sys.stderr.isatty()
        self.shown = False

    def __call__(self, p: dict) -> None:
        if not self.tty:
            return
        try:
            done, total = int(p.get("pages", 0)), max(1, int(p.get("total_pages", 0)))
            text = f"{self.what}: {p.get('phase', '')} {int(p.get('bytes', 0)) / MIB:.1f} MiB"
            if p.get("phase") in ("memory", "state", "loading"):
                text += f" ({min(100, 100 * done // total)}% of RAM)"
            else:
                text += (f", pass {int(p.get('iteration', 0))}, {int(p.get('dirty_pages', 0))} pages dirty, "
                         f"dirty rate {float(p.get('dirty_rate', 0.0)) * 4096 / MIB:.1f} MiB/s")
        except (TypeError, ValueError):
            return
        sys.stderr.write(f"\r\033[K{text}")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def cmd_save(args) -> int:
    from hypyr.toolstack import transfer
    bar = _ProgressLine(f"saving {args.name}")
    try:
        r = transfer.save(args.name, args.file, keep_running=args.keep_running, progress=bar)
    finally:
        bar.done()
    print(f"hypyr: domain {r.name} saved to {r.file} in {r.seconds:.2f} s: {r.bytes / MIB:.1f} MiB written, "
          f"{r.pages_data} pages data, {r.pages_zero} zero"
          + ("; it keeps running" if r.keep_running else "; destroyed"))
    return 0


def cmd_restore(args) -> int:
    from hypyr.toolstack import transfer
    rec = transfer.restore(args.file, paused=args.paused)
    print(f"hypyr: domain {rec.name} restored (id {rec.domid})" + (", paused" if args.paused else ""))
    return 0


def cmd_migrate(args) -> int:
    from hypyr.toolstack import transfer
    host, port = transfer.parse_address(args.host)
    bar = _ProgressLine(f"migrating {args.name}")
    try:
        r = transfer.migrate(args.name, host, port, downtime_ms=args.downtime_ms,
                             max_iterations=args.max_iterations, progress=bar)
    finally:
        bar.done()
    down = "n/a (it was paused)" if r.downtime_ms is None else f"{r.downtime_ms:.1f} ms"
    print(f"hypyr: domain {r.name} migrated to {r.to} in {r.seconds:.2f} s: {r.iterations} iterations, "
          f"{r.pages_data} pages data, {r.pages_zero} zero, {r.bytes / MIB:.1f} MiB, downtime {down}")
    return 0


def cmd_migrate_receive(args) -> int:
    from hypyr.toolstack import transfer
    host, port = transfer.parse_address(args.listen, default_host="127.0.0.1")
    r = transfer.migrate_receive(host, port,
                                 on_listening=lambda a: say(f"waiting for a migration on {a[0]}:{a[1]}"),
                                 on_incoming=lambda src, name: say(f"receiving domain {name} from {src}"))
    if r.renamed:
        print(f"hypyr: domain {r.name} migrated here from {r.source} (id {r.domid}) in {r.seconds:.2f} s")
    else:
        print(f"hypyr: domain {r.name} migrated here from {r.source} (id {r.domid}) in {r.seconds:.2f} s; "
              f"it keeps this name: {r.note}")
    return 0


def cmd_list(args) -> int:
    from hypyr.toolstack import api
    doms = api.list_domains(args.names or None)
    if args.json:
        import dataclasses
        print(json.dumps([dataclasses.asdict(d) for d in doms], indent=2))
        return 0
    print(f"{'Name':<40}{'ID':>5}{'Mem':>6}{'VCPUs':>6}\t{'State':<8}{'Time(s)':>8}")
    if not args.names:  # as xl: the host first, as Domain-0 (the JSON output lists guests only)
        host = api.host_domain()
        print(f"{host.name:<40}{host.domid:>5}{host.memory:>6}{host.vcpus:>6}\t{host.state:<8}{host.cpu_time:>8.1f}")
    for d in doms:
        print(f"{d.name:<40}{d.domid:>5}{d.memory:>6}{d.vcpus:>6}\t{d.state:<8}{d.cpu_time:>8.1f}")
    return 0


def cmd_console(args) -> int:
    from hypyr.toolstack.console import attach
    return attach(args.name)


def cmd_domain_op(args) -> int:
    from hypyr.toolstack import api
    if args.cmd == "shutdown":
        api.shutdown(args.name, wait=args.wait)
    else:
        getattr(api, args.cmd)(args.name)
    return 0


def cmd_trigger(args) -> int:
    from hypyr.toolstack import api
    api.trigger(args.name, args.what, args.vcpu)
    return 0


def cmd_vcpu_list(args) -> int:
    from hypyr.toolstack import api
    rows = api.vcpu_list(args.name)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'Name':<32}{'ID':>5}{'VCPU':>6}{'CPU':>5}{'State':>7}{'Time(s)':>9}  Affinity (Hard)")
    for r in rows:
        aff = _cpulist(r["affinity"])
        cpu = "-" if r["cpu"] is None else r["cpu"]
        print(f"{r['name']:<32}{r['domid']:>5}{r['vcpu']:>6}{cpu:>5}{r['state']:>7}{r['time']:>9.1f}  {aff}")
    return 0


def _cpulist(cpus: list[int]) -> str:
    if set(cpus) == set(range(os.cpu_count() or 1)):
        return "all"
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


def cmd_vcpu_pin(args) -> int:
    from hypyr.toolstack import api
    from hypyr.toolstack.domconfig import parse_cpulist
    api.vcpu_pin(args.name, args.vcpu, parse_cpulist(args.cpus, os.cpu_count() or 1))
    return 0


def cmd_sched_credit(args) -> int:
    from hypyr.toolstack import sched
    from hypyr.toolstack.registry import Registry
    if args.domain:
        with Registry() as reg:
            rec = reg.get(args.domain)
        if args.weight is not None or args.cap is not None:
            sched.set_params(rec, weight=args.weight, cap=args.cap)
        rows = [(rec.domid, rec.name, *sched.get_params(rec))]
    else:
        if args.weight is not None or args.cap is not None:
            raise HypyrError("give the domain to change with -d NAME")
        with Registry() as reg:
            names = {(r.domid, r.uuid): r.name for r in reg.list()}   # a stale group matches no domain
        rows = [(d, names[d, u], w, c) for d, u, w, c in sched.list_params() if (d, u) in names]
    print(f"{'Name':<32}{'ID':>5}{'Weight':>8}{'Cap':>6}")
    for domid, name, weight, cap in rows:
        print(f"{name:<32}{domid:>5}{weight:>8}{cap:>6}")
    return 0


def cmd_net_create(args) -> int:
    from hypyr.toolstack import network
    net = network.net_create(args.name, args.subnet, dhcp=args.dhcp, nat=args.nat)
    extras = [w for w, on in (("DHCP", net.dhcp), ("NAT", net.nat)) if on]
    print(f"hypyr: network {net.name} created: bridge {net.bridge}, host address {net.subnet}"
          + (f", {' and '.join(extras)}" if extras else ""), file=sys.stderr)
    return 0


def cmd_net_list(args) -> int:
    from hypyr.toolstack import network
    nets = network.net_list()
    if args.json:
        print(json.dumps([network.info_dict(n) for n in nets], indent=2))
        return 0
    print(f"{'Name':<16}{'Bridge':<16}{'Subnet':<20}{'DHCP':<6}{'NAT':<5}Taps")
    for n in nets:
        taps = ",".join(n.taps) if n.present else "(bridge missing)"
        print(f"{n.name:<16}{n.bridge:<16}{n.subnet:<20}{'yes' if n.dhcp else 'no':<6}"
              f"{'yes' if n.nat else 'no':<5}{taps or '-'}")
    return 0


def cmd_net_destroy(args) -> int:
    from hypyr.toolstack import network
    network.net_destroy(args.name)
    return 0


def cmd_network_list(args) -> int:
    from hypyr.toolstack import api
    rows = api.network_list(args.name)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'Idx':<4}{'MAC':<19}{'Bridge':<16}{'Tap':<16}{'RxBytes':>14}{'TxBytes':>14}")
    for r in rows:
        rx = "-" if r["rx_bytes"] is None else r["rx_bytes"]
        tx = "-" if r["tx_bytes"] is None else r["tx_bytes"]
        print(f"{r['devid']:<4}{r['mac'] or '-':<19}{r['bridge'] or '-':<16}{r['tap']:<16}{rx:>14}{tx:>14}")
    return 0


def cmd_info(args) -> int:
    if args.domain is not None and args.registers:
        from hypyr.toolstack import api
        for i, text in enumerate(api.vcpu_registers(args.domain)):
            print(f"vCPU {i}:\n{text}")
        return 0
    if args.domain is not None:
        from hypyr.toolstack import api
        info = api.vmm_info(args.domain)
        jail = info.get("jail")
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        if args.queues:
            print("\n".join(virtio_lines(info.get("virtio", {}))))
            return 0
        filtered = info.get("seccomp_filtered") or [0, 0]
        print(f"domain {info.get('name')} (id {info.get('domid')}): {info.get('state')}, VMM pid {info.get('pid')}, "
              f"seccomp {info.get('seccomp')} (a filter on {filtered[0]} of its {filtered[1]} threads)")
        if jail:
            print(f"jail: uid {jail['uid']} gid {jail['gid']}, capabilities {jail['capabilities']}, root "
                  f"{jail['root']} holding {', '.join(jail['read_only'])} (read-only), "
                  f"{', '.join(jail['writable'])} (read-write), {', '.join(jail['devices'])}")
        else:
            print("jail: none (jail = \"off\", or the toolstack does not run as root)")
        return 0
    from hypyr.toolstack import monitor
    host = monitor.host_info()
    print(json.dumps(host, indent=2) if args.json else "\n".join(monitor.info_lines(host)))
    return 0


def virtio_lines(report: dict[str, dict]) -> list[str]:
    """`hypyr info DOMAIN --queues`: per virtio device a line, then one per queue."""
    lines = []
    for window, dev in report.items():
        queues = dev.pop("queues", [])
        name, status, isr = dev.pop("device", "?"), dev.pop("status", 0), dev.pop("interrupt_status", 0)
        extra = ", ".join(f"{k} {v}" for k, v in dev.items())
        lines.append(f"{window} {name}: status {status:#x}, InterruptStatus {isr:#x}" + (f", {extra}" if extra else ""))
        for i, q in enumerate(queues):
            if "avail_idx" not in q:
                lines.append(f"  queue {i}: size {q['size']}, {'ready' if q['ready'] else 'not ready'}, not active")
                continue
            lines.append(f"  queue {i}: size {q['size']}; avail idx {q['avail_idx']} (flags {q['avail_flags']:#x}), "
                         f"taken to {q['last_avail']}, avail_event {q['avail_event']}; used idx {q['used_idx']} "
                         f"(flags {q['used_flags']:#x}), device at {q['next_used']}, used_event {q['used_event']}, "
                         f"signalled {q['signalled_used']}; in flight {q['in_flight']}"
                         + ("" if q["event_idx"] else "; no EVENT_IDX"))
    return lines


def cmd_top(args) -> int:
    from hypyr.toolstack import monitor
    if not monitor.good_interval(args.delay):
        raise HypyrError(f"-d must be a number of seconds more than 0 and at most {monitor.MAX_INTERVAL:g}, "
                         f"not {args.delay}")
    if args.iterations is not None and args.iterations < 1:
        raise HypyrError(f"-n must be at least 1, not {args.iterations}")
    return monitor.run_top(interval=float(args.delay), iterations=args.iterations, batch=True if args.batch else None)


def cmd_serve(args) -> int:
    from hypyr.toolstack import server
    return server.cli_main(args.socket)

