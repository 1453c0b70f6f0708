"""Save, restore and live migration, hypyr vs QEMU/KVM in one L1 (prints figures, never asserts).

    .venv/bin/python bench/migrate.py [--rounds N] [--memory MIB] [--only idle,dirty]

Run on the host: it re-executes itself in the lab (see bench/README.md). Per round and workload
(an idle guest, and one rewriting 64 MiB of tmpfs in a loop), alternating which VMM goes first:
- hypyr: a domain (`hypyr create`), `hypyr migrate` to `hypyr migrate-receive` on 127.0.0.1,
  then `hypyr save` and `hypyr restore` of the migrated domain, then a second save restored
  through `hypyr serve`'s REST API (`curl -X POST /restore`; its fork server has the VMM's
  modules imported already);
- QEMU (`-M pc`, the same kernel, initrd and command line): QMP `migrate tcp:127.0.0.1:PORT` to
  an `-incoming` QEMU, then `migrate "exec:cat > FILE"` and a new QEMU started with
  `-incoming "exec:cat FILE"`, timed until QMP reports it running.
Figures: total migration time, downtime (hypyr: last source vCPU paused to first destination vCPU
running; QEMU: its own `downtime`, measured on the source, and "pause to resume", from the
source's STOP to the destination's RESUME QMP event, which is hypyr's measure), data sent,
iterations, save time and restore time (to running). Goal of issue #11: hypyr's downtime and
restore time <= QEMU's.
With HYPYR_LOG=DEBUG it also prints the domains' "migration:" log lines (the stop-and-copy's
phases, on both sides).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, ensure_image, install_signal_handlers, kill_all_live, kill_group, lab_command, lab_guest, live

HERE = Path(__file__).resolve()
PY = sys.executable
MIB = 1 << 20
READY = "mig-ready"
WORKLOADS = {
    "idle": f"echo {READY}; i=0; while true; do i=$((i+1)); echo tick-$i; sleep 1; done",
    # rewrites the same 64 MiB of page cache: the guest prints its rate every 5 passes
    "dirty": ("mount -t tmpfs -o size=80m none /mnt; dd if=/dev/zero of=/mnt/f bs=1M count=64 2>/dev/null; "
              f"echo {READY}; n=0; t=$(cut -d' ' -f1 /proc/uptime); while true; do "
              "dd if=/dev/zero of=/mnt/f bs=1M count=64 conv=notrunc 2>/dev/null; n=$((n+1)); "
              "if [ $((n % 5)) = 0 ]; then u=$(cut -d' ' -f1 /proc/uptime); echo dirty-mibs $u $t; t=$u; fi; done"),
}
GOAL_KEYS = ("pause_to_resume_ms", "restore_s")   # downtime measured alike for both


def wait_for(pred, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dirty_rate(text: str) -> float | None:
    """MiB/s the dirtying guest reported last (5 passes of 64 MiB between two uptimes)."""
    m = re.findall(r"dirty-mibs ([\d.]+) ([\d.]+)", text)
    if not m:
        return None
    now, then = map(float, m[-1])
    return 5 * 64 / (now - then) if now > then else None


# -- hypyr ----------------------------------------------------------------------------------------
class Hypyr:
    def __init__(self, workdir: Path, guest: tuple[str, str, str], memory: int):
        self.state = workdir / "hypyr-state"
        self.env = dict(os.environ, HYPYR_STATE_DIR=str(self.state))
        self.kernel, self.initrd = guest[0], guest[1]
        self.memory, self.workdir = memory, workdir
        self.api_socket = workdir / "api.sock"
        self.server: subprocess.Popen | None = None

    def serve(self) -> None:
        """Start `hypyr serve` (once): the API restores go through it."""
        if self.server is None:
            self.server = subprocess.Popen([PY, "-m", "hypyr", "serve", "--socket", str(self.api_socket)],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, env=self.env, start_new_session=True)
            live.add(self.server.pid)
            wait_for(self.api_socket.exists, 120, "hypyr serve's socket")

    def api_restore(self, save: Path) -> None:
        p = subprocess.run(["curl", "-sS", "-f", "--unix-socket", str(self.api_socket), "-X", "POST",
                            "-H", "Content-Type: application/json", "-d", json.dumps({"file": str(save)}),
                            "http://localhost/restore"], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"POST /restore: {p.stderr.strip() or p.stdout.strip() or p.returncode}")

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        p = subprocess.run([PY, "-m", "hypyr", *args], capture_output=True, text=True, env=self.env,
                           stdin=subprocess.DEVNULL, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"hypyr {' '.join(args)}: {p.stderr.strip() or p.returncode}")
        return p

    def console(self, name: str) -> str:
        doms = {d["name"]: d for d in json.loads(self.cli("list", "--json").stdout)}
        if name not in doms:
            return ""
        path = self.state / "domains" / str(doms[name]["domid"]) / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def round(self, workload: str) -> dict:
        name = f"mb-{workload}"
        cfg = self.workdir / f"{name}.cfg"
        cmd = base64.b64encode(WORKLOADS[workload].encode()).decode()
        cfg.write_text(f'name = "{name}"\nmemory = {self.memory}\nvcpus = 1\nkernel = "{self.kernel}"\n'
                       f'ramdisk = "{self.initrd}"\nextra = "hypyr.exec={cmd}"\n')
        out: dict = {}
        try:
            self.cli("create", str(cfg))
            wait_for(lambda: READY in self.console(name), 300, "the guest's ready line")
            time.sleep(3)
            port = free_port()
            recv = subprocess.Popen([PY, "-m", "hypyr", "migrate-receive", "--listen", f"127.0.0.1:{port}", "--once"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=self.env, start_new_session=True)
            live.add(recv.pid)
            wait_for(lambda: _listening(port), 60, "migrate-receive to listen")
            p = self.cli("migrate", name, f"127.0.0.1:{port}")
            recv.communicate(timeout=120)
            live.discard(recv.pid)
            m = re.search(r"in ([\d.]+) s: (\d+) iterations, (\d+) pages data, (\d+) zero, ([\d.]+) MiB, "
                          r"downtime ([\d.]+) ms", p.stdout)
            if not m:
                raise RuntimeError(f"unexpected migrate output: {p.stdout.strip()}")
            out.update(migrate_s=float(m[1]), iterations=int(m[2]), sent_mib=float(m[5]), downtime_ms=float(m[6]),
                       pause_to_resume_ms=float(m[6]))   # (hypyr's downtime is measured so)
            out["dirty_mibs"] = dirty_rate(self.console(name))
            if self.env.get("HYPYR_LOG", "").upper() == "DEBUG":   # the migration's phase lines
                for log in sorted(self.state.rglob("*vmm.log")):
                    for line in log.read_text(errors="replace").splitlines():
                        if "migration: " in line:
                            print(f"  {log.name}: {line}", flush=True)
            save = self.workdir / f"{name}.save"
            p = self.cli("save", name, str(save))
            m = re.search(r"in ([\d.]+) s", p.stdout)
            out["save_s"] = float(m[1]) if m else None
            t0 = time.monotonic()
            self.cli("restore", str(save))
            out["restore_s"] = time.monotonic() - t0
            self.serve()
            self.cli("save", name, str(save))
            t0 = time.monotonic()
            self.api_restore(save)
            out["restore_api_s"] = time.monotonic() - t0
            save.unlink()
        finally:
            subprocess.run([PY, "-m", "hypyr", "destroy", name], env=self.env, capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=120)
        return out


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:PORT, asked of /proc (not by connecting to it)."""
    want = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[1].endswith(want.strip()) and f[3] == "0A":
                    return True
        except OSError:
            pass
    return False


# -- QEMU -----------------------------------------------------------------------------------------
class Qmp:
    """A minimal QMP client on a unix socket."""

    def __init__(self, path: Path, timeout: float = 60):
        self.sock = wait_for(lambda: _connect(path), timeout, f"QMP at {path}")
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []  # every event seen so far, in order
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg
            self.events.append(msg)

    def event_time(self, name: str) -> float | None:
        """When the last event ``name`` seen was sent (QEMU's host clock, seconds), or None."""
        for e in reversed(self.events):
            if e["event"] == name:
                return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
        return None

    def cmd(self, name: str, args: dict | None = None) -> dict:
        self.file.write(json.dumps({"execute": name, **({"arguments": args} if args else {})}).encode() + b"\n")
        self.file.flush()
        r = self._read()
        if "error" in r:
            raise RuntimeError(f"QMP {name}: {r['error'].get('desc')}")
        return r.get("return", {})

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(path))
        return s
    except OSError:
        s.close()
        return None


class Qemu:
    def __init__(self, workdir: Path, guest: tuple[str, str, str], memory: int):
        self.kernel, self.initrd, self.qemu = guest
        self.memory, self.workdir = memory, workdir

    def start(self, tag: str, cmdline: str, *extra: str) -> tuple[subprocess.Popen, Qmp, Path]:
        qmp, log = self.workdir / f"{tag}.qmp", self.workdir / f"{tag}.log"
        for p in (qmp, log):
            p.unlink(missing_ok=True)
        proc = subprocess.Popen([self.qemu, "-M", "pc", "-accel", "kvm", "-cpu", "host", "-m", f"{self.memory}M",
                                 "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
                                 "-serial", f"file:{log}", "-qmp", f"unix:{qmp},server=on,wait=off",
                                 "-kernel", self.kernel, "-initrd", self.initrd, "-append", cmdline, *extra],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        live.add(proc.pid)
        return proc, Qmp(qmp), log

    @staticmethod
    def stop(proc: subprocess.Popen, qmp: Qmp | None) -> None:
        if qmp is not None:
            qmp.close()
        kill_group(proc.pid)
        proc.wait()
        live.discard(proc.pid)

    @staticmethod
    def migrate(qmp: Qmp, uri: str, timeout: float = 600) -> dict:
        qmp.cmd("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 1 << 40})
        qmp.cmd("migrate", {"uri": uri})

        def done():
            s = qmp.cmd("query-migrate")
            return s if s.get("status") in ("completed", "failed", "cancelled") else None
        s = wait_for(done, timeout, f"QEMU's migration to {uri}", step=0.05)
        if s["status"] != "completed":
            raise RuntimeError(f"QEMU's migration to {uri} {s['status']}: {s.get('error-desc', '')}")
        return s

    def round(self, workload: str) -> dict:
        from hypyr.vmm.config import VmConfig
        cmdline = " ".join(w for w in VmConfig(kernel="-", exec_cmd=WORKLOADS[workload]).full_cmdline().split()
                           if w != "pci=off")
        out: dict = {}
        procs: list[tuple[subprocess.Popen, Qmp | None]] = []
        save = self.workdir / f"qemu-{workload}.save"
        try:
            src, sq, slog = self.start("src", cmdline)
            procs.append((src, sq))
            wait_for(lambda: READY in slog.read_text(errors="replace"), 300, "the QEMU guest's ready line")
            time.sleep(3)
            port = free_port()
            dst, dq, dlog = self.start("dst", cmdline, "-incoming", f"tcp:127.0.0.1:{port}")
            procs.append((dst, dq))
            s = self.migrate(sq, f"tcp:127.0.0.1:{port}")
            wait_for(lambda: dq.cmd("query-status").get("status") == "running", 60, "the destination to run")
            ram = s.get("ram", {})
            out.update(migrate_s=s.get("total-time", 0) / 1000, downtime_ms=float(s.get("downtime", 0)),
                       sent_mib=ram.get("transferred", 0) / MIB, iterations=ram.get("dirty-sync-count"))
            stopped, resumed = sq.event_time("STOP"), dq.event_time("RESUME")
            if stopped is not None and resumed is not None:
                out["pause_to_resume_ms"] = (resumed - stopped) * 1000
            out["dirty_mibs"] = dirty_rate(slog.read_text(errors="replace") + dlog.read_text(errors="replace"))
            s = self.migrate(dq, f"exec:cat > {save}")
            out["save_s"] = s.get("total-time", 0) / 1000
            for p, q in procs:
                self.stop(p, q)
            procs.clear()
            t0 = time.monotonic()
            rp, rq, _ = self.start("rst", cmdline, "-incoming", f"exec:cat {save}")
            procs.append((rp, rq))
            wait_for(lambda: rq.cmd("query-status").get("status") == "running", 300, "the restored QEMU to run",
                     step=0.01)
            out["restore_s"] = time.monotonic() - t0
        finally:
            for p, q in procs:
                self.stop(p, q)
            save.unlink(missing_ok=True)
        return out


# -- report ---------------------------------------------------------------------------------------
KEYS = (("migrate_s", "migration total (s)"), ("downtime_ms", "downtime as reported (ms)"),
        ("pause_to_resume_ms", "downtime pause->resume (ms)"), ("sent_mib", "data sent (MiB)"),
        ("iterations", "iterations"), ("dirty_mibs", "guest dirty rate (MiB/s)"), ("save_s", "save (s)"),
        ("restore_s", "restore to running (s)"), ("restore_api_s", "restore, via the API (s)"))
GOAL_KEYS_TOO = {"restore_api_s": "restore_s"}   # a row of hypyr's alone, set against QEMU's restore


def report(samples: list[dict]) -> None:
    print("\n== bench/migrate.py: medians (per-round values in brackets) ==")
    for wl in WORKLOADS:
        rows = [s for s in samples if s["workload"] == wl]
        if not rows:
            continue
        print(f"\n-- {wl} guest --")
        print(f"{'':28}{'hypyr':>22}{'qemu':>22}{'hypyr/qemu':>12}")
        for key, label in KEYS:
            med = {}
            cells = []
            for vmm in ("hypyr", "qemu"):
                k = GOAL_KEYS_TOO.get(key, key) if vmm == "qemu" else key
                vals = [s[k] for s in rows if s["vmm"] == vmm and s.get(k) is not None]
                med[vmm] = statistics.median(vals) if vals else None
                cells.append("-" if not vals else f"{med[vmm]:.2f} [{', '.join(f'{v:.2f}' for v in vals)}]")
            r = f"{med['hypyr'] / med['qemu']:.2f}" if med["hypyr"] is not None and med["qemu"] else "-"
            goal = "  (goal <= 1)" if key in GOAL_KEYS or key in GOAL_KEYS_TOO else ""
            print(f"{label:<28}{cells[0]:>22}{cells[1]:>22}{r:>12}{goal}")
    failed = [s for s in samples if s.get("error")]
    for s in failed:
        print(f"failed: round {s['round']} {s['vmm']} {s['workload']}: {s['error']}")


def lab_side(args: argparse.Namespace) -> int:
    guest = lab_guest(args.kernel, args.initrd)
    if guest is None:
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-migrate-", dir="/tmp"))
    vmms = {"hypyr": Hypyr(workdir, guest, args.memory), "qemu": Qemu(workdir, guest, args.memory)}
    samples: list[dict] = []
    try:
        for rnd in range(1, args.rounds + 1):
            for wl in args.workloads:
                order = ["hypyr", "qemu"] if (rnd + len(samples) // 2) % 2 else ["qemu", "hypyr"]
                for vmm in order:
                    t0 = time.monotonic()
                    s = {"round": rnd, "vmm": vmm, "workload": wl}
                    try:
                        s.update(vmms[vmm].round(wl))
                    except Exception as e:  # noqa: BLE001 - a failed sample is reported, the rest goes on
                        s["error"] = f"{type(e).__name__}: {e}"
                    samples.append(s)
                    figures = ", ".join(f"{k}={v:.2f}" for k, v in s.items() if isinstance(v, float))
                    print(f"round {rnd} {vmm:<6}{wl:<6} {time.monotonic() - t0:6.1f} s  "
                          f"{s.get('error') or figures}", flush=True)
        report(samples)
        if args.json:
            print("JSON " + json.dumps(samples))
    finally:
        kill_all_live()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    p.add_argument("--only", default="idle,dirty", help="workloads: idle, dirty (default both)")
    p.add_argument("--json", action="store_true", help="also print every sample as one JSON line")
    p.add_argument("--kernel", help="guest kernel (default: the default image's)")
    p.add_argument("--initrd", help="guest initrd (default: the default image's)")
    a = p.parse_args(argv)
    a.workloads = [w for w in a.only.split(",") if w]
    if a.rounds < 1 or not 64 <= a.memory <= 4096 or not a.workloads or set(a.workloads) - set(WORKLOADS):
        p.error("--rounds >= 1, --memory 64..4096 and --only from idle,dirty")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if os.environ.get("HYPYR_IN_LAB") != "1":
        if args.kernel is None and (rc := ensure_image()) != 0:
            return rc
        return subprocess.call(lab_command(HERE, argv), cwd=str(REPO))
    install_signal_handlers()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        return lab_side(args)
    finally:
        kill_all_live()


if __name__ == "__main__":
    sys.exit(main())
