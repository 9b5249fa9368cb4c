"""mergekit's own test suite (from its sdist) passes with our methods registered;
its regression tests iterate over every registered method, ours included."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

CACHE = Path(sys.prefix) / ".cache" / "mergekit-sdist"


def _sdist_tests() -> Path:
    tests = CACHE / "mergekit-0.1.5" / "tests"
    if not tests.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", "-d", str(CACHE), "mergekit==0.1.5"], check=True)
        with tarfile.open(CACHE / "mergekit-0.1.5.tar.gz") as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("mergekit-0.1.5/tests/")]
            archive.extractall(CACHE, members=members, filter="data")
    return tests


@pytest.mark.slow
def test_mergekit_suite_passes_with_our_methods_registered(tmp_path):
    tests = _sdist_tests()
    # The sdist does not ship tests/common.py; the modules that import it cannot be
    # collected with or without our package, so they are left out.
    ignore = [f"--ignore={p}" for p in sorted(tests.glob("test_*.py")) if "tests.common" in p.read_text()
              or "from tests." in p.read_text()]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tests), *ignore],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    for method in ("dots", "sar", "reasoning_interp"):
        assert f"test_state_dict_methods_accept_strided_weights_without_mutation[{method}]" in proc.stdout
