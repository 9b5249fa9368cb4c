"""Bad input through the real `mergekit-yaml`: one error line naming the model,
tensor, parameter or file; non-zero exit; no output that looks complete. Two cases
(an execution-time and a planning-time error) run the console script in a fresh
process; the others in children of the fork server (tests/support/mergekit_fork.py)."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import BIN, mergekit_yaml, write_recipe

pytestmark = pytest.mark.slow  # every case runs the real mergekit-yaml in a subprocess

LAYER = "model.layers.1.mlp.up_proj.weight"


def _variant(src, dst: Path, edit) -> str:
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _resize_vocab(state):
    state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"], torch.zeros(4, 128)])


def _drop_tensor(state):
    del state[LAYER]


def _nan(state):
    state[LAYER][3, 5] = float("nan")


def _inf(state):
    state[LAYER][0, 0] = float("inf")


def _dots(base, model, **params):
    return {"merge_method": "dots", "base_model": base,
            "models": [{"model": model, "parameters": {"weight": 1.0, **params}}]}


CHECKPOINT_CASES = {
    "resized_vocab": (_resize_vocab, "model.embed_tokens.weight"),
    "missing_tensor": (_drop_tensor, LAYER),
    "nan": (_nan, "NaN"),
    "inf": (_inf, "Inf"),
}


def _run_failing(tmp_path, recipe, *needles, fresh_process=False):
    out = tmp_path / "out"
    exe = BIN / "mergekit-yaml" if fresh_process else None
    proc = mergekit_yaml(write_recipe(tmp_path / "bad.yml", recipe), out, exe=exe, check=False)
    # progress bars may redraw around it; the error itself is exactly one line
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert len(errors) == 1, proc.stderr[-2000:]
    last = errors[0]
    for needle in needles:
        assert needle in last, last
    assert "Traceback" not in proc.stderr
    # nothing that looks like a finished model
    assert not (out / "config.json").exists()
    assert not list(out.glob("*.safetensors")) if out.exists() else True
    return last


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint(tiny_family, tmp_path, case):
    edit, needle = CHECKPOINT_CASES[case]
    bad = _variant(tiny_family["sft"], tmp_path / "bad-model", edit)
    last = _run_failing(tmp_path, _dots(tiny_family["base"], bad), needle, fresh_process=case == "missing_tensor")
    if case != "resized_vocab":
        assert "bad-model" in last


@pytest.mark.parametrize(
    "recipe_params, needle",
    [
        ({"merge_method": "dots", "density": 0.0}, "density"),
        ({"merge_method": "dots", "density": 1.5}, "density"),
        ({"merge_method": "dots", "rescale": "sometimes"}, "rescale"),
        ({"merge_method": "sar", "drop_rate": 1.0}, "drop_rate"),
        ({"merge_method": "sar", "drop_rate": -0.1}, "drop_rate"),
        ({"merge_method": "reasoning_interp", "alpha": 1.2}, "alpha"),
        ({"merge_method": "reasoning_interp", "alpha": -0.5}, "alpha"),
        ({"merge_method": "dots", "density": "dense"}, "density"),
    ],
)
def test_bad_parameter(tiny_family, tmp_path, recipe_params, needle):
    params = dict(recipe_params)
    method = params.pop("merge_method")
    model = {"model": tiny_family["sft"]}
    if method == "dots":
        model["parameters"] = {"weight": 1.0}
    recipe = {"merge_method": method, "base_model": tiny_family["base"], "models": [model], "parameters": params}
    _run_failing(tmp_path, recipe, needle)


def test_missing_weight(tiny_family, tmp_path):
    recipe = {"merge_method": "dots", "base_model": tiny_family["base"], "models": [{"model": tiny_family["sft"]}]}
    _run_failing(tmp_path, recipe, "weight", tiny_family["sft"], fresh_process=True)


def test_fisher_with_wrong_names_or_shapes(tiny_family, tmp_path):
    base = load_file(str(Path(tiny_family["base"]) / "model.safetensors"))
    wrong_shape = {k: torch.ones(v.shape) for k, v in base.items()}
    wrong_shape[LAYER] = torch.ones(3, 3)
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"))
    wrong_names = {k.replace("model.", "transformer."): torch.ones(v.shape) for k, v in base.items()}
    save_file(wrong_names, str(tmp_path / "names.safetensors"))
    for fisher, needle in (("shape.safetensors", LAYER), ("names.safetensors", "has no tensor")):
        recipe = {"merge_method": "sar", "base_model": tiny_family["base"],
                  "models": [{"model": tiny_family["rl"], "parameters": {"fisher": str(tmp_path / fisher)}},
                             {"model": tiny_family["rl2"], "parameters": {"fisher": str(tmp_path / fisher)}}]}
        _run_failing(tmp_path, recipe, needle, fisher)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_unreadable_safetensors(tiny_family, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_family["sft"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:1000])
    _run_failing(tmp_path, _dots(tiny_family["base"], str(bad)), "cannot read", str(bad / "model.safetensors"))
