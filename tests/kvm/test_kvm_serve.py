"""`hypyr serve` on this host's KVM: its domain processes are forked by its fork server
(hypyr.toolstack.forkserver), for a create and a restore alike, and outlive the server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from procs import ancestors, children
from test_kvm_seccomp import toolstack  # noqa: F401 - the fixture

from hypyr.toolstack.domrecord import is_alive
from hypyr.toolstack.registry import Registry
from hypyr.toolstack.server import ApiClient

ROOT = Path(__file__).resolve().parents[2]


def _record(name: str):
    with Registry() as reg:
        return next(r for r in reg.list() if r.name == name)


def test_serve_forks_created_and_restored_domains_from_its_helper(toolstack):  # noqa: F811
    tmp, kernel = toolstack
    sock = tmp / "api.sock"
    err = tmp / "serve.err"
    with open(err, "w") as f:
        server = subprocess.Popen([sys.executable, "-m", "hypyr.toolstack.server", "--socket", str(sock)],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() or not children(server.pid):
            assert server.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        [helper] = children(server.pid)
        api = ApiClient(str(sock))
        cfg = tmp / "fs.cfg"
        cfg.write_text(f'name = "fs"\nmemory = 32\nkernel = "{kernel}"\n')
        assert api.post("/domains", {"path": str(cfg)})["name"] == "fs"
        created = _record("fs")
        assert is_alive(created) and helper in ancestors(created.pid)

        api.post("/domains/fs/save", {"file": str(tmp / "fs.save")})
        assert api.post("/restore", {"file": str(tmp / "fs.save")})["name"] == "fs"
        restored = _record("fs")
        assert restored.pid != created.pid and is_alive(restored) and helper in ancestors(restored.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{helper}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{helper}").exists()      # the helper goes with its server ...
    assert is_alive(_record("fs"))                     # ... and the domain runs on
