"""`serve --data-parallel-size N` is refused in one line that says what to run instead
(the swap lock, admission gate and version counter live in one API server process;
vLLM's data-parallel engines would not be swapped together)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("args", [["--data-parallel-size", "2"], ["-dp=2"], ["--api-server-count", "2"]])
def test_data_parallel_serve_is_refused_in_one_line(tmp_path, args):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: dots\nbase_model: base\nmodels: [{model: a}]\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "mergekit-rlvr"), "serve", str(recipe), *args],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: option "), proc.stderr
    assert "does not support" in lines[0] and "one mergekit-rlvr serve per GPU" in lines[0]
