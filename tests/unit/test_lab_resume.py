"""The lab's resume plugin: tests that passed in an earlier lab boot are not run again."""

import os
import subprocess
import sys

SUITE = '''
import os, pytest

def test_a():
    pass

def test_b():
    assert os.environ.get("B_OK") == "1"

@pytest.fixture
def bad_teardown():
    yield
    if os.environ.get("TEARDOWN_FAILS") == "1":
        raise RuntimeError("teardown")

def test_c(bad_teardown):
    pass

def test_d():
    pytest.skip("not here")
'''


def _pytest(tmp_path, passed, extra=(), **env):
    e = dict(os.environ, HYPYR_LAB_PASSED=str(passed), **env)
    e.pop("PYTEST_ADDOPTS", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "hypyr.lab.resume",
                        "-rA", *extra, str(tmp_path / "test_suite.py")], env=e, capture_output=True, text=True,
                       cwd=tmp_path)
    ran = {line.split()[1].split("::")[1] for line in r.stdout.splitlines()
           if line.startswith(("PASSED ", "FAILED ", "ERROR ", "SKIPPED "))
           and "::" in line}
    return r, ran


def test_resume_records_passes_and_skips_them(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    passed = tmp_path / "state" / "passed"
    passed.parent.mkdir()
    # First boot: b fails, c's teardown fails, d skips; only a is recorded.
    r, ran = _pytest(tmp_path, passed, TEARDOWN_FAILS="1")
    assert r.returncode == 1
    assert passed.read_text().split() == ["test_suite.py::test_a"]
    # The next run skips a and runs the rest again; now b and c pass.
    r, ran = _pytest(tmp_path, passed, B_OK="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 tests passed in an earlier lab boot" in r.stderr
    assert "test_a" not in ran and {"test_b", "test_c"} <= ran
    assert sorted(passed.read_text().split()) == ["test_suite.py::test_a", "test_suite.py::test_b",
                                                  "test_suite.py::test_c"]
    # A boot that finds everything (but the skipped test) already passed still succeeds.
    passed.write_text(passed.read_text() + "test_suite.py::test_d\n")
    r, ran = _pytest(tmp_path, passed)
    assert r.returncode == 0 and ran == set(), r.stdout + r.stderr
    # ... also when -k had already deselected the rest.
    r, ran = _pytest(tmp_path, passed, extra=["-k", "test_a or test_b"])
    assert r.returncode == 0 and ran == set(), r.stdout + r.stderr
    assert "2 tests passed in an earlier lab boot and are not run again; 0 to run" in r.stderr


def test_resume_is_inert_without_its_variable(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    e = {k: v for k, v in os.environ.items() if k != "HYPYR_LAB_PASSED"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "hypyr.lab.resume",
                        str(tmp_path / "test_suite.py")], env=e, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "1 failed, 2 passed, 1 skipped" in r.stdout
    assert list(tmp_path.iterdir()) == [tmp_path / "test_suite.py"]
