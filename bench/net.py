#!/usr/bin/env python3
"""Network benchmark: hypyr's virtio-net (vhost-net and userspace) against QEMU/KVM's, on the same
guest kernel and image, in one L1 of the lab.

Per configuration and round it boots two guests on a bridge (br0, 10.77.0.1/24 on the L1 side):
a peer (10.77.0.3) that runs `iperf3 -s`, and a client (10.77.0.2) that measures TCP throughput
guest->host (iperf3 server on L1) and guest->guest (to the peer), one stream and four, and the
ping round trip (50 pings, 50 ms apart) to both; the VMM processes' CPU time (utime+stime of all
threads, plus their vhost kernel threads) over each transfer gives CPU seconds per GB moved.
Runs inside the lab (nested KVM); started on the host it re-executes itself there:

    .venv/bin/python bench/net.py [--rounds N] [--seconds S] [--only CONFIGS] [--quick]

It prints every round as it ends, medians per configuration and the ratios hypyr/QEMU (medians of
per-round ratios), and exits 0 whatever the figures; non-zero only when it could not run.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))
from _common import (  # noqa: E402
    ensure_image,
    install_signal_handlers,
    kill_all_live,
    kill_group,
    lab_command,
    lab_guest,
    live,
    tail_of,
)

GUEST_MEMORY = "512M"
BRIDGE = "br0"
SUBNET = "10.77.0"
HOST_IP = f"{SUBNET}.1"
CLIENT_IP = f"{SUBNET}.2"
PEER_IP = f"{SUBNET}.3"
PREFIX = 24
PINGS = 50
PING_INTERVAL = 0.05
CMDLINE_MAX = 2047
VHOST_GOAL = 0.9   # hypyr+vhost / QEMU+vhost
USER_GOAL = 0.5    # hypyr userspace / QEMU vhost=off

# name -> (vmm, vhost)
CONFIGS = {
    "hypyr-vhost": ("hypyr", True),
    "qemu-microvm-vhost": ("qemu-microvm", True),
    "qemu-pc-vhost": ("qemu-pc", True),
    "hypyr-user": ("hypyr", False),
    "qemu-microvm-user": ("qemu-microvm", False),
    "qemu-pc-user": ("qemu-pc", False),
}
# (hypyr config, QEMU config, goal) pairs whose per-round ratios are reported
PAIRS = (
    ("hypyr-vhost", "qemu-microvm-vhost", VHOST_GOAL),
    ("hypyr-vhost", "qemu-pc-vhost", VHOST_GOAL),
    ("hypyr-user", "qemu-microvm-user", USER_GOAL),
    ("hypyr-user", "qemu-pc-user", USER_GOAL),
)

# The client guest's script (busybox ash; base64 on the kernel command line, 2 KiB at most).
# `o go K` is printed just before test K starts and `NET K ...` when it ends: the bench samples the
# VMMs' CPU time at both lines.  iperf3's receiver summary line (the [SUM] line with -P 4) is kept.
CLIENT_SCRIPT = r"""S={secs};H={host};P={peer}
o(){{ echo "NET $*";}}
w(){{ n=0;until ping -c1 -W1 $1 >/dev/null 2>&1;do n=$((n+1));[ $n -ge 60 ]&&{{ o error no-route-$1;return 1;}};sleep .5;done;}}
w $H;w $P;sleep 1
t(){{ k=$1;shift;o go $k;iperf3 -c "$@" -t $S -f m 2>&1|grep -E 'receiver|error'|tail -1|sed "s/^/NET $k /";}}
p(){{ o go $1;ping -q -c {pings} -i {interval} $2 2>&1|tail -1|sed "s/^/NET $1 /";}}
t h1 $H;t h4 $H -P 4;t g1 $P;t g4 $P -P 4
p rh $H;p rg $P
o done"""  # noqa: E501 (a guest shell script, kept compact)
PEER_SCRIPT = "iperf3 -s -D&&echo NET ready||echo NET error iperf3-s;while :;do sleep 1000;done"

THROUGHPUT = {"h1": "guest->host TCP, 1 stream", "h4": "guest->host TCP, 4 streams",
              "g1": "guest->guest TCP, 1 stream", "g4": "guest->guest TCP, 4 streams"}
LATENCY = {"rh": "ping RTT guest->host", "rg": "ping RTT guest->guest"}


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool
    goal: bool = False


METRICS = (
    [Metric(f"{k}_Mbps", v, "Mbit/s", True, True) for k, v in THROUGHPUT.items()]
    + [Metric(f"{k}_us", v + " (avg)", "us", False) for k, v in LATENCY.items()]
    + [Metric(f"{k}_cpuGB", f"  VMM CPU per GB, {k}", "s/GB", False) for k in THROUGHPUT]
)


@dataclass
class Sample:
    config: str
    round: int
    ok: bool
    wall_s: float
    values: dict = field(default_factory=dict)
    note: str = ""


# -- guests ---------------------------------------------------------------------------------------
def guest_cmdline(script: str, ip: str) -> str:
    """Exactly what `hypyr run --exec SCRIPT --net ...,ip=IP/PREFIX` gives the guest."""
    from hypyr.vmm.config import DEFAULT_CMDLINE, VmConfig
    return VmConfig(kernel="-", cmdline=f"{DEFAULT_CMDLINE} hypyr.ip.0={ip}/{PREFIX}", exec_cmd=script).full_cmdline()


def pci_initrd(initrd: str, out: str) -> str | None:
    """The default initrd plus a second archive with virtio_pci (and what it needs) appended to the
    module list, for `-M pc`: the default image loads only virtio_mmio.  Returns a problem or None."""
    import json

    from hypyr.image import debs
    from hypyr.image import default as image
    from hypyr.image.cpio import CpioWriter
    try:
        stamp = json.loads((Path(initrd).parent / image.STAMP).read_text())
        kroot = debs.cache_dir() / "unpacked" / stamp["kernel"][0].removesuffix(".deb")
        tree = debs.ModuleTree(kroot / "lib" / "modules" / debs.kernel_release(kroot))
        have = tree.resolve(list(stamp["modules"])).ordered
        full = tree.resolve(list(stamp["modules"]) + ["virtio_pci"]).ordered
        w = CpioWriter()
        for rel in full:
            if rel not in have:
                w.add_file(f"lib/modules/{debs.mod_name(rel)}.ko", debs.read_module(tree.dir / rel))
        w.add_file("etc/hypyr/modules", "".join(f"{debs.mod_name(r)}.ko\n" for r in full).encode())
        with open(out, "wb") as f:
            f.write(Path(initrd).read_bytes())
            f.write(w.to_gzip())
    except Exception as e:  # noqa: BLE001 - a missing -M pc is reported, the rest goes on
        return f"{type(e).__name__}: {e}"
    return None


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def make_tap(name: str) -> None:
    sh("ip", "link", "del", name, check=False)
    sh("ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr")
    sh("ip", "link", "set", name, "master", BRIDGE, "up")


def guest_command(config: str, role: str, script: str, ip: str, env: dict) -> list[str]:
    vmm, vhost = CONFIGS[config]
    kernel, initrd, qemu = env["kernel"], env["initrd"], env["qemu"]
    if vmm == "hypyr":
        tree = env.get("hypyr_tree")
        python = ["env", "-C", tree, f"PYTHONPATH={tree}", sys.executable] if tree else [sys.executable]
        return [*python, "-m", "hypyr", "run", "--kernel", kernel, "--initrd", initrd,
                "--memory", GUEST_MEMORY, "--vcpus", "1", "--exec", script, "--no-input",
                "--net", f"bridge={BRIDGE},ip={ip}/{PREFIX},vhost={'on' if vhost else 'off'}"]
    cmdline = guest_cmdline(script, ip)
    mac = "52:54:00:77:00:{:02x}".format(int(ip.rsplit(".", 1)[1]))
    tap = f"nq{role}"
    netdev = f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost={'on' if vhost else 'off'}"
    if vmm == "qemu-microvm":
        machine, device = "microvm,x-option-roms=off,isa-serial=on", "virtio-net-device"
    else:
        machine, device = "pc", "virtio-net-pci"
        cmdline = " ".join(w for w in cmdline.split(" ") if w != "pci=off")
        initrd = env["pci_initrd"]
    return [qemu, "-M", machine, "-accel", "kvm", "-cpu", "host", "-m", GUEST_MEMORY, "-smp", "1",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-serial", "stdio",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-netdev", netdev, "-device", f"{device},netdev=n0,mac={mac}"]


# -- CPU time ------------------------------------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")


def _stat_ticks(pid: int | str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime (the process's: all threads)


def cpu_seconds(pid: int) -> float:
    """utime+stime of PID (all its threads) plus its vhost worker kernel threads (vhost-TID, named
    after the thread that called VHOST_SET_OWNER; kernel threads before Linux 6.4)."""
    ticks = _stat_ticks(pid)
    try:
        tids = set(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        tids = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith("vhost-") and comm[6:] in tids:
            ticks += _stat_ticks(p)
    return ticks / TICK


# -- one configuration, one round -------------------------------------------------------------------
class Guest:
    def __init__(self, name: str, cmd: list[str]):
        self.name = name
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the process runs)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.err,
                                     bufsize=0, start_new_session=True)
        live.add(self.proc.pid)
        self.buf = bytearray()
        self.pending = b""
        self.eof = False

    def fd(self) -> int:
        return self.proc.stdout.fileno()

    def read(self) -> list[str]:
        chunk = os.read(self.fd(), 65536)
        if not chunk:
            self.eof = True
            return []
        self.buf += chunk
        data = self.pending + chunk.replace(b"\r", b"")
        *lines, self.pending = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc.pid)
        self.proc.wait()
        live.discard(self.proc.pid)
        self.proc.stdout.close()

    def tail(self) -> str:
        self.err.seek(0)
        return tail_of(bytes(self.buf) + b"\n" + self.err.read(), 500)


def parse_iperf(line: str) -> tuple[float, float] | None:
    """(Mbit/s, MB moved) from iperf3's receiver summary line."""
    m = re.search(r"([\d.]+)\s+(K|M|G)Bytes\s+([\d.]+)\s+(K|M|G)bits/sec", line)
    if not m:
        return None
    scale = {"K": 1e-3, "M": 1.0, "G": 1e3}
    mb = float(m.group(1)) * scale[m.group(2)] * 1.048576  # iperf3's MBytes are MiB
    return float(m.group(3)) * scale[m.group(4)], mb


def parse_ping(line: str) -> float | None:
    m = re.search(r"= [\d.]+/([\d.]+)/[\d.]+ ms", line)
    return float(m.group(1)) * 1000 if m else None


def run_config(config: str, rnd: int, env: dict, secs: int, timeout: float) -> Sample:  # noqa: C901 (too complex: pyproject.toml)
    vmm, _ = CONFIGS[config]
    t0 = time.monotonic()
    guests: list[Guest] = []
    server = None
    vals: dict[str, float] = {}
    notes: list[str] = []
    ok = False
    try:
        if vmm != "hypyr":
            make_tap("nqp")
            make_tap("nqc")
        server = subprocess.Popen(["iperf3", "-s", "-B", HOST_IP], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        live.add(server.pid)
        peer = Guest("peer", guest_command(config, "p", PEER_SCRIPT, PEER_IP, env))
        guests.append(peer)
        client = Guest("client", guest_command(config, "c", env["client_script"], CLIENT_IP, env))
        guests.append(client)
        starts: dict[str, tuple[float, float, float]] = {}   # key -> (t, cpu client, cpu peer)
        deadline = t0 + timeout
        stall = secs + 60.0    # a test that has not ended by then will not end (a stuck NIC)
        running: tuple[str, float] | None = None   # the test under way and when it started
        done = False
        while not done:
            now = time.monotonic()
            if now >= deadline:
                notes.append(f"timed out after {timeout:.0f} s")
                break
            if running is not None and now - running[1] > stall:
                notes.append(f"{running[0]} did not end within {stall:.0f} s: stopped")
                break
            fds = {g.fd(): g for g in guests if not g.eof}
            if not fds:
                notes.append("both guests' output ended")
                break
            r, _, _ = select.select(list(fds), [], [], min(0.5, deadline - now))
            for fd in r:
                g = fds[fd]
                for line in g.read():
                    i = line.find("NET ")
                    if i < 0:
                        continue
                    words = line[i + 4:].split(None, 1)
                    if not words:
                        continue
                    key, rest = words[0], (words[1] if len(words) > 1 else "")
                    if g is peer:
                        if key == "error":
                            notes.append(f"peer: {rest}")
                        continue
                    if key == "go":
                        starts[rest.strip()] = (time.monotonic(), cpu_seconds(client.proc.pid),
                                                cpu_seconds(peer.proc.pid))
                        running = (rest.strip(), time.monotonic())
                        continue
                    running = None
                    if key in THROUGHPUT:
                        c1, p1 = cpu_seconds(client.proc.pid), cpu_seconds(peer.proc.pid)
                        got = parse_iperf(rest)
                        if got is None:
                            notes.append(f"{key}: {rest.strip()[:120]}")
                            continue
                        mbps, mb = got
                        vals[f"{key}_Mbps"] = mbps
                        if key in starts and mb > 0:
                            _, c0, p0 = starts[key]
                            cpu = (c1 - c0) + ((p1 - p0) if key.startswith("g") else 0.0)
                            vals[f"{key}_cpuGB"] = cpu / (mb / 1000)
                    elif key in LATENCY:
                        us = parse_ping(rest)
                        if us is None:
                            notes.append(f"{key}: {rest.strip()[:120]}")
                        else:
                            vals[f"{key}_us"] = us
                    elif key == "error":
                        notes.append(f"client: {rest}")
                    elif key == "done":
                        done = True
            for g in guests:
                if g.eof and g.proc.poll() is not None and not done:
                    why = (" (QEMU -no-reboot: the guest reset or powered off)"
                           if vmm != "hypyr" and g.proc.returncode == 0 else "")
                    notes.append(f"{g.name} exited with status {g.proc.returncode}{why}")
                    done = True
        ok = done and all(m.key in vals for m in METRICS if m.goal)
        if not ok:
            for g in guests:
                if not any(f"{g.name} tail" in n for n in notes):
                    notes.append(f"{g.name} tail: {g.tail()}")
    except Exception as e:  # noqa: BLE001 - one failed configuration must not end the bench
        notes.append(f"{type(e).__name__}: {e}")
    finally:
        for g in guests:
            g.stop()
        if server is not None:
            kill_group(server.pid)
            server.wait()
            live.discard(server.pid)
        if vmm != "hypyr":
            for t in ("nqp", "nqc"):
                sh("ip", "link", "del", t, check=False)
    return Sample(config, rnd, ok, time.monotonic() - t0, vals, "; ".join(notes))


# -- reporting ----------------------------------------------------------------------------------
def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def ratio(h: Sample | None, q: Sample | None, m: Metric) -> float | None:
    if h is None or q is None or m.key not in h.values or m.key not in q.values:
        return None
    hv, qv = h.values[m.key], q.values[m.key]
    if hv <= 0 or qv <= 0:
        return None
    return hv / qv if m.higher_better else qv / hv


def paired(samples: list[Sample], a: str, b: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in sorted({s.round for s in samples}):
        h = next((s for s in samples if s.round == r and s.config == a and s.values), None)
        q = next((s for s in samples if s.round == r and s.config == b and s.values), None)
        for m in METRICS:
            if (x := ratio(h, q, m)) is not None:
                out.setdefault(m.key, []).append(x)
    return out


def report(samples: list[Sample], configs: list[str]) -> None:
    print()
    print("Medians (Mbit/s: higher is better; us and s/GB: lower is better; CPU = VMM process(es) incl. guest")
    print("time and vhost threads, client VMM for guest->host, both VMMs for guest->guest):")
    short = {c: c.replace("qemu-", "q-").replace("microvm", "mvm") for c in configs}
    print(f"  {'metric':<34} {'unit':>6} " + " ".join(f"{short[c]:>12}" for c in configs))
    med: dict[str, dict[str, float | None]] = {}
    for c in configs:
        med[c] = {}
        for m in METRICS:
            xs = [s.values[m.key] for s in samples if s.config == c and m.key in s.values]
            med[c][m.key] = statistics.median(xs) if xs else None
    for m in METRICS:
        print(f"  {m.label:<34} {m.unit:>6} " + " ".join(f"{fmt(med[c][m.key]):>12}" for c in configs))
    print("  completed rounds: " + ", ".join(
        f"{c} {sum(1 for s in samples if s.config == c and s.ok)}/{sum(1 for s in samples if s.config == c)}"
        for c in configs))
    print()
    print("hypyr/QEMU, median of per-round ratios (both boots of a round run close together; > 1 means hypyr")
    print("is better, for latency and CPU/GB too); per-round values in brackets:")
    for a, b, goal in PAIRS:
        if a not in configs or b not in configs:
            continue
        pr = paired(samples, a, b)
        print(f"  {a} / {b}  (goal >= {goal} for throughput)")
        for m in METRICS:
            rs = pr.get(m.key)
            if not rs:
                print(f"    {m.key:<10} n/a")
                continue
            r = statistics.median(rs)
            verdict = f"   goal {'met' if r >= goal else 'NOT met'}" if m.goal else ""
            print(f"    {m.key:<10} {r:5.2f}  [{' '.join(f'{x:.2f}' for x in rs)}]{verdict}")


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds (each boots every configuration once; default 3)")
    p.add_argument("--seconds", type=int, default=10, help="iperf3 duration per test (default 10)")
    p.add_argument("--only", default="", help="comma-separated configurations or prefixes (e.g. hypyr,qemu-microvm); "
                                              "default all: " + ",".join(CONFIGS))
    p.add_argument("--quick", action="store_true", help="one round of 3 s tests (unless --rounds/--seconds say more)")
    p.add_argument("--timeout", type=float, default=0, help="per configuration and round, in s "
                                                           "(default 240 + 6 x seconds x 4)")
    p.add_argument("--kernel", help="guest kernel (default: the default image's)")
    p.add_argument("--initrd", help="guest initrd (default: the default image's)")
    p.add_argument("--hypyr-tree", metavar="DIR",
                   help="run hypyr from this checkout (e.g. `git worktree add --detach DIR COMMIT`) for a "
                        "before/after comparison; default: this one")
    a = p.parse_args(argv)
    if a.quick:
        if "--rounds" not in " ".join(argv):
            a.rounds = 1
        if "--seconds" not in " ".join(argv):
            a.seconds = 3
    if a.rounds < 1 or not 1 <= a.seconds <= 120:
        p.error("--rounds must be >= 1 and --seconds between 1 and 120")
    want = [w.strip() for w in a.only.split(",") if w.strip()]
    a.configs = [c for c in CONFIGS if not want or any(c == w or c.startswith(w) for w in want)]
    if not a.configs:
        p.error(f"--only matches no configuration ({', '.join(CONFIGS)})")
    if not a.timeout:
        a.timeout = 240 + 6 * a.seconds * 4
    return a


def host_side(argv: list[str], args: argparse.Namespace) -> int:
    if args.kernel is None and (rc := ensure_image()) != 0:
        return rc
    if shutil.which("iperf3") is None:
        print("bench: iperf3 is missing on this machine (L1 uses the host's; apt-get install -y iperf3)",
              file=sys.stderr)
        return 2
    inner = lab_command(HERE, argv)
    print(f"bench: running inside the lab: {' '.join(inner)}", flush=True)
    return subprocess.call(inner, cwd=str(REPO))


def setup_bridge() -> None:
    sh("ip", "link", "del", BRIDGE, check=False)
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")


def lab_side(args: argparse.Namespace) -> int:
    guest = lab_guest(args.kernel, args.initrd)
    if guest is None:
        return 2
    kernel, initrd, qemu = guest
    if shutil.which("iperf3") is None:
        print("bench: iperf3 is missing in L1", file=sys.stderr)
        return 2
    if shutil.which("ip") is None:
        print("bench: the ip command is missing in L1", file=sys.stderr)
        return 2
    script = CLIENT_SCRIPT.format(secs=args.seconds, host=HOST_IP, peer=PEER_IP, pings=PINGS,
                                  interval=PING_INTERVAL)
    cmdline = guest_cmdline(script, CLIENT_IP)
    if len(cmdline) > CMDLINE_MAX:
        print(f"bench: the kernel command line would be {len(cmdline)} bytes (> {CMDLINE_MAX})", file=sys.stderr)
        return 2
    tmpdir = tempfile.mkdtemp(prefix="hypyr-net-", dir="/tmp")
    env = {"kernel": kernel, "initrd": initrd, "qemu": qemu, "client_script": script,
           "pci_initrd": os.path.join(tmpdir, "initrd-pci.img"), "hypyr_tree": args.hypyr_tree}
    configs = list(args.configs)
    try:
        if any(CONFIGS[c][0] == "qemu-pc" for c in configs):
            problem = pci_initrd(initrd, env["pci_initrd"])
            if problem:
                print(f"bench: no initrd with virtio_pci for -M pc ({problem}); skipping the qemu-pc configurations")
                configs = [c for c in configs if CONFIGS[c][0] != "qemu-pc"]
        if any(c.endswith("-vhost") for c in configs) and not os.access("/dev/vhost-net", os.R_OK | os.W_OK):
            print("bench: /dev/vhost-net is not usable here; skipping the vhost configurations")
            configs = [c for c in configs if not c.endswith("-vhost")]
        setup_bridge()
        print(f"hypyr network benchmark: {args.rounds} round(s) of {', '.join(configs)}")
        print(f"  {GUEST_MEMORY} guest RAM, 1 vCPU per guest; bridge {BRIDGE} {HOST_IP}/{PREFIX} (L1), client guest "
              f"{CLIENT_IP}, peer guest {PEER_IP} (iperf3 -s); iperf3 -t {args.seconds} -f m, ping -c {PINGS} "
              f"-i {PING_INTERVAL}; L1 {os.uname().release}, {os.cpu_count()} CPUs")
        print(f"  kernel  {kernel}\n  initrd  {initrd}" + (f" (-M pc: {env['pci_initrd']}, + virtio_pci)"
                                                         if any(CONFIGS[c][0] == "qemu-pc" for c in configs) else ""))
        for c in configs:
            cmd = guest_command(c, "c", script, CLIENT_IP, env)
            shown = ["<client script>" if a == script else
                     repr(re.sub(r"hypyr\.exec=\S+", "hypyr.exec=<base64 of the client script>", a))
                     if "hypyr.exec=" in a else a for a in cmd]
            print(f"  {c:<19} {' '.join(shown)}")
        print("  client script:")
        for line in script.splitlines():
            print(f"    | {line}")
        print(flush=True)

        samples: list[Sample] = []
        for rnd in range(1, args.rounds + 1):
            order = configs if rnd % 2 else configs[::-1]
            for c in order:
                s = run_config(c, rnd, env, args.seconds, args.timeout)
                samples.append(s)
                parts = [f"{m.key}={fmt(s.values[m.key])}" for m in METRICS if m.key in s.values]
                print(f"round {rnd}  {c:<19} {'ok    ' if s.ok else 'FAILED'} {s.wall_s:6.1f} s  {' '.join(parts)}"
                      + (f"  [{s.note}]" if s.note else ""), flush=True)
            this = [s for s in samples if s.round == rnd]
            for a, b, _ in PAIRS:
                pr = paired(this, a, b)
                goal = [f"{m.key}={pr[m.key][0]:.2f}" for m in METRICS if m.goal and m.key in pr]
                if goal:
                    print(f"round {rnd}  {a}/{b}  {' '.join(goal)}", flush=True)
        report(samples, configs)
    finally:
        kill_all_live()
        for t in ("nqp", "nqc"):
            sh("ip", "link", "del", t, check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if os.environ.get("HYPYR_IN_LAB") != "1":
        return host_side(argv, args)
    install_signal_handlers()
    try:
        return lab_side(args)
    finally:
        kill_all_live()


if __name__ == "__main__":
    sys.exit(main())
