"""hypyr.toolstack.procmem: what a domain process imports before its jail's fork."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from hypyr.toolstack import procmem, xlcfg
cfg = xlcfg.loads(sys.argv[1])
procmem.import_before_fork(cfg, restoring=sys.argv[2] == "1", receiving=sys.argv[3] == "1")
procmem.one_malloc_arena()
procmem.trim_malloc()
print(" ".join(m for m in ("hypyr.arch.x86.boot", "hypyr.toolstack.sched", "hypyr.devices.virtio.blk",
                           "hypyr.devices.virtio.net", "hypyr.vmm.snapshot", "hypyr.vmm.migration")
               if m in sys.modules))
"""


def _imported(cfg: str, restoring: bool = False, receiving: bool = False) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, cfg, str(int(restoring)), str(int(receiving))],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_only_what_the_domain_will_use_is_imported_before_the_fork(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    bare = 'name = "a"\nkernel = "/k"\n'
    assert _imported(bare) == {"hypyr.arch.x86.boot", "hypyr.toolstack.sched"}
    with_io = bare + f"disk = [ '{disk},raw,xvda,w' ]\nvif = [ 'bridge=br0' ]\n"
    assert _imported(with_io) == {"hypyr.arch.x86.boot", "hypyr.toolstack.sched", "hypyr.devices.virtio.blk",
                                  "hypyr.devices.virtio.net"}
    restoring = _imported(bare, restoring=True)       # (snapshot imports the device models it restores)
    assert "hypyr.vmm.snapshot" in restoring and "hypyr.vmm.migration" not in restoring
    assert {"hypyr.vmm.snapshot", "hypyr.vmm.migration"} <= _imported(bare, receiving=True)
