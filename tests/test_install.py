"""Plain `mergekit-yaml` finds our methods after `pip install .` and `pip install -e .`,
and registration costs nothing at interpreter start (no torch, no mergekit)."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import load_state, write_recipe

pytestmark = pytest.mark.slow  # builds and installs the package with pip

REPO = Path(__file__).resolve().parents[1]


def test_interpreter_start_imports_neither_torch_nor_mergekit():
    code = "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mergekit', 'mergekit_rlvr')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['mergekit_rlvr', 'mergekit_rlvr._autoload']"


def test_methods_are_registered_when_mergekit_loads():
    code = ("from mergekit import merge_methods; "
            "print(sorted(m.spec.name for m in merge_methods.registered_methods() "
            "if m.spec.name in ('dots', 'sar', 'reasoning_interp')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['dots', 'reasoning_interp', 'sar']"


def _fresh_venv(path: Path) -> Path:
    """A new venv that sees the project's dependencies (but not the project) through
    a path line, so that installing our package is the only difference."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_plain_mergekit_yaml_after_install(tiny_family, tmp_path, editable):
    python = _fresh_venv(tmp_path / "venv")
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check"]
    subprocess.run(pip + ["--no-build-isolation"] + (["-e"] if editable else []) + [str(REPO)],
                   check=True, cwd=tmp_path)
    # the console script itself, as users get it from mergekit's wheel
    subprocess.run(pip + ["--ignore-installed", "mergekit==0.1.5"], check=True, cwd=tmp_path)
    recipe = write_recipe(tmp_path / "r.yml", {
        "merge_method": "dots", "base_model": tiny_family["base"],
        "models": [{"model": tiny_family["sft"], "parameters": {"weight": 0.5}}]})
    out = tmp_path / "out"
    proc = subprocess.run([str(tmp_path / "venv" / "bin" / "mergekit-yaml"), str(recipe), str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.json").exists() and load_state(out)
    where = subprocess.run([str(python), "-c", "import mergekit_rlvr; print(mergekit_rlvr.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert (str(REPO) in where) == editable
