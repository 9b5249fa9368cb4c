"""search.groups (one coefficient per module group) without vLLM: parsing, the
tensor classification (mergekit's own filter rule), and known answers through the
real mergekit-yaml: a grouped recipe written back with filters equals the
decomposition bit for bit, and its mlp tensors equal an ungrouped merge whose
weights are the mlp values."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import load_state
from support.files import mergekit_yaml_all

from mergekit_rlvr import groups as grp
from mergekit_rlvr.decompose import decompose, recipe_with_coefficients
from mergekit_rlvr.errors import UserError


def test_parse_forms_and_errors():
    assert grp.parse(None) is None and grp.parse(False) is None
    assert grp.parse(True).names == ["norms", "embeddings", "lm_head", "attention", "mlp"]
    assert grp.parse(["mlp", "attention"]).names == ["mlp", "attention"]
    custom = grp.parse({"qk": ["q_proj", "k_proj"], "mlp": "mlp"})
    assert custom.items == (("qk", ("q_proj", "k_proj")), ("mlp", ("mlp",)))
    for bad, message in [(["mlps"], "unknown group 'mlps'"), ([], "empty"), ({"a@b": ["x"]}, "without '@'"),
                         ({"a": []}, "search.groups.a"), (["mlp", "mlp"], "listed twice"), (3, "expected true")]:
        with pytest.raises(UserError, match=message):
            grp.parse(bad)


def test_classification_is_mergekits_first_match():
    g = grp.parse(True)
    expect = {
        "model.embed_tokens.weight": "embeddings",
        "lm_head.weight": "lm_head",
        "model.norm.weight": "norms",
        "model.layers.3.input_layernorm.weight": "norms",
        "model.layers.3.post_attention_layernorm.weight": "norms",
        "model.layers.3.self_attn.q_norm.weight": "norms",  # norms come first
        "model.layers.3.self_attn.o_proj.weight": "attention",
        "model.layers.3.mlp.gate_proj.weight": "mlp",
        "transformer.h.0.attn.c_attn.weight": "attention",
        "model.rotary_emb.inv_freq": None,
    }
    assert {name: g.group_of(name) for name in expect} == expect
    # the order given decides: attention before norms puts q_norm in attention
    assert grp.parse(["attention", "norms"]).group_of("model.layers.3.self_attn.q_norm.weight") == "attention"


def grouped_recipe(family, method="dots"):
    if method == "sar":
        return {"merge_method": "sar", "base_model": family["base"],
                "models": [{"model": family["rl"]}, {"model": family["rl2"]}],
                "parameters": {"scale": 1.0, "drop_rate": 0.3, "seed": 3}, "dtype": "float32",
                "search": {"groups": ["attention", "norms"]}}
    return {"merge_method": "dots", "base_model": family["base"],
            "models": [{"model": family["sft"], "parameters": {"weight": 1.0, "density": 0.3}},
                       {"model": family["rl"], "parameters": {"weight": 1.0, "density": 0.5}}],
            "dtype": "float32", "search": {"groups": ["attention", "mlp"]}}


@pytest.fixture(scope="module")
def written(tiny_family, tmp_path_factory):
    """(decomposition, coefficients, mergekit-yaml output) per case, all merged at once."""
    root = tmp_path_factory.mktemp("groups")
    sft, rl = tiny_family["sft"], tiny_family["rl"]
    cases = {
        "dots": (grouped_recipe(tiny_family), {f"{sft}@attention": 0.25, f"{sft}@mlp": 1.5, sft: 0.75,
                                               f"{rl}@attention": 1.25, f"{rl}@mlp": 0.5, rl: 2.0}),
        "sar": (grouped_recipe(tiny_family, "sar"), {"scale@attention": 0.5, "scale@norms": 1.75, "scale": 1.25}),
    }
    # the ungrouped dots merge at the mlp values: mergekit's own answer for the mlp tensors
    plain = grouped_recipe(tiny_family)
    del plain["search"]
    for entry, weight in zip(plain["models"], (1.5, 0.5)):
        entry["parameters"]["weight"] = weight
    jobs, out = [], {}
    for name, (recipe, coefficients) in cases.items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(recipe_with_coefficients(recipe, coefficients), sort_keys=False))
        out[name] = (path, coefficients, root / f"out-{name}")
        jobs.append((path, root / f"out-{name}"))
    (root / "plain.yml").write_text(yaml.safe_dump(plain, sort_keys=False))
    jobs.append((root / "plain.yml", root / "out-plain"))
    mergekit_yaml_all(jobs)
    out["plain"] = root / "out-plain"
    return out


@pytest.mark.parametrize("method", ["dots", "sar"])
@pytest.mark.slow
def test_written_filters_materialize_what_was_searched(written, method):
    path, coefficients, out = written[method]
    d = decompose(str(path))
    assert d.coefficient_dict() == coefficients  # read back from mergekit's filter lists
    merged = load_state(out)
    assert sorted(d.tensor_names) == sorted(merged)
    for task in d.tasks:
        ours = d.merged(task)
        assert torch.equal(ours.view(torch.int32), merged[task.name].view(torch.int32)), task.name


def test_mlp_tensors_equal_an_ungrouped_merge_at_the_mlp_values(written):
    _, _, out = written["dots"]
    grouped, plain = load_state(out), load_state(written["plain"])
    mlp = [n for n in grouped if ".mlp." in n]
    assert mlp
    for name in mlp:
        assert torch.equal(grouped[name], plain[name]), name
    assert not all(torch.equal(grouped[n], plain[n]) for n in grouped if "self_attn" in n)


def test_slots_and_names(tiny_family):
    d = decompose(grouped_recipe(tiny_family))
    sft, rl = tiny_family["sft"], tiny_family["rl"]
    assert d.coefficient_names == [f"{sft}@attention", f"{sft}@mlp", sft, f"{rl}@attention", f"{rl}@mlp", rl]
    by_name = {t.name: (t.group, t.slots) for t in d.tasks}
    assert by_name["model.layers.0.self_attn.q_proj.weight"] == ("attention", [0, 3])
    assert by_name["model.layers.1.mlp.up_proj.weight"] == ("mlp", [1, 4])
    assert by_name["model.embed_tokens.weight"] == (None, [2, 5])
    # every group covers its tensors: no rest coefficient when nothing is left over
    full = dict(grouped_recipe(tiny_family), search={"groups": True})
    names = decompose(full).coefficient_names
    assert names[:5] == [f"{sft}@{g}" for g in ("norms", "embeddings", "lm_head", "attention", "mlp")]
    assert sft not in names and len(names) == 10


def test_filters_finer_than_the_groups_are_refused(tiny_family):
    recipe = grouped_recipe(tiny_family)
    recipe["models"][0]["parameters"]["weight"] = [{"filter": "q_proj", "value": 0.5}, {"value": 1.0}]
    d = decompose(recipe)
    with pytest.raises(UserError, match="filters finer than search.groups"):
        list(d.iter_tensors())


def test_grouped_coefficients_must_be_named(tiny_family):
    recipe = grouped_recipe(tiny_family)
    with pytest.raises(UserError, match="dict of name@group"):
        recipe_with_coefficients(recipe, [1.0] * 6)
    with pytest.raises(UserError, match="unknown coefficient 'x@mlp'"):
        recipe_with_coefficients(recipe, {"x@mlp": 1.0})
