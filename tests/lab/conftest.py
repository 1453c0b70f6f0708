"""Lab end-to-end tests boot real Linux guests with `hypyr run`.

They need hardware virtualisation: inside the lab (`hypyr lab -- pytest tests/lab`, which
`make test` does) or on a host where `hypyr doctor` finds it.  Elsewhere they are skipped.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

from hypyr import doctor
from hypyr.image import default as image
from hypyr.lab.rerun import record_output
from hypyr.lab.testguard import run_bounded


def _native() -> bool:
    if os.environ.get("HYPYR_IN_LAB") == "1":
        return True
    d = doctor.diagnose()
    return d.usable and d.native


@pytest.fixture(scope="session")
def guest_image():
    if not _native():
        pytest.skip("no hardware virtualisation here: run these with `hypyr lab -- python -m pytest tests/lab`")
    paths = image.paths()
    if not (paths.kernel.exists() and paths.initrd.exists() and paths.rootfs.exists()):
        msg = f"the default guest image is missing in {paths.dir}: run `hypyr image build` first"
        if os.environ.get("HYPYR_IN_LAB") == "1":
            pytest.fail(msg)  # in the lab (make test, CI) a missing image is a failure, not a skip
        pytest.skip(msg)
    return paths


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def hypyr_run(guest_image, request):
    def run(*args: str, timeout: float = 300) -> Result:
        cmd = [sys.executable, "-m", "hypyr", "run", "--no-input", *args]
        p = run_bounded(cmd, timeout)
        r = Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))
        record_output(request.node, r.stderr)
        print(f"$ {' '.join(cmd)}\n--- rc={r.returncode}\n--- stdout:\n{r.stdout}\n--- stderr:\n{r.stderr}")
        return r
    return run
