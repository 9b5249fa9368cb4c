"""The three methods through the real `mergekit-yaml` console script, against
mergekit's built-ins where the formulas coincide and against references written
here from the papers' equations."""

import numpy as np
import pytest
import torch

from conftest import load_state, mergekit_yaml, write_recipe

pytestmark = pytest.mark.slow  # every test runs the real mergekit-yaml in a subprocess


def _states(family, *names):
    return [load_state(family[n]) for n in names]


def _merge(tmp_path, name, recipe):
    out = tmp_path / f"out-{name}"
    mergekit_yaml(write_recipe(tmp_path / f"{name}.yml", recipe), out)
    return load_state(out)


def _assert_states_close(a, b, atol=1e-6, rtol=1e-5):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)


def test_dots_density_one_rescale_none_equals_task_arithmetic(tiny_family, tmp_path):
    models = [{"model": tiny_family["sft"], "parameters": {"weight": 0.7}},
              {"model": tiny_family["rl"], "parameters": {"weight": 1.3}}]
    common = {"base_model": tiny_family["base"], "models": models, "dtype": "float32"}
    dots = _merge(tmp_path, "dots", {"merge_method": "dots", "parameters": {"density": 1.0, "rescale": "none"}, **common})
    ta = _merge(tmp_path, "ta", {"merge_method": "task_arithmetic", **common})
    _assert_states_close(dots, ta)


def test_reasoning_interp_equals_linear(tiny_family, tmp_path):
    alpha = 0.3
    interp = _merge(tmp_path, "ri", {
        "merge_method": "reasoning_interp", "base_model": tiny_family["base"],
        "models": [{"model": tiny_family["sft"]}], "parameters": {"alpha": alpha}, "dtype": "float32"})
    linear = _merge(tmp_path, "lin", {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": tiny_family["base"], "parameters": {"weight": 1 - alpha}},
                   {"model": tiny_family["sft"], "parameters": {"weight": alpha}}]})
    _assert_states_close(interp, linear)


def dots_reference(base, models, weights, densities, rescale, sparsify="tensor"):
    """Eq. 2, 3, 6 of paper 000, written independently with numpy sorts (sparsify
    global: Eq. 2's one quantile over the whole task vector)."""
    taus = [{k: m[k].float().double().numpy() - base[k].float().double().numpy() for k in base} for m in models]
    sparse = []
    for tau, density in zip(taus, densities):
        out = {}
        everything = np.concatenate([np.abs(t).reshape(-1) for t in tau.values()])
        for k, t in tau.items():
            flat = everything if sparsify == "global" else np.abs(t).reshape(-1)
            keep = int(density * flat.size)
            thr = np.sort(flat)[::-1][keep - 1] if keep > 0 else np.inf
            out[k] = np.where(np.abs(t) >= thr, t, 0.0)
        sparse.append(out)
    result = {k: base[k].double().numpy().copy() for k in base}
    for tau, sp, w in zip(taus, sparse, weights):
        if rescale == "global":
            full = np.sqrt(sum((t ** 2).sum() for t in tau.values()))
            kept = np.sqrt(sum((s ** 2).sum() for s in sp.values()))
            gammas = {k: full / (kept + 1e-8) for k in tau}
        elif rescale == "tensor":
            gammas = {k: np.sqrt((tau[k] ** 2).sum()) / (np.sqrt((sp[k] ** 2).sum()) + 1e-8) for k in tau}
        else:
            gammas = {k: 1.0 for k in tau}
        for k in result:
            result[k] += w * gammas[k] * sp[k]
    return {k: torch.from_numpy(v).float() for k, v in result.items()}


@pytest.mark.parametrize("rescale,sparsify", [("global", "tensor"), ("tensor", "tensor"), ("global", "global"),
                                              ("tensor", "global")])
def test_dots_matches_paper_equations(tiny_family, tmp_path, rescale, sparsify):
    base, sft, rl = _states(tiny_family, "base", "sft", "rl")
    recipe = {
        "merge_method": "dots", "base_model": tiny_family["base"], "dtype": "float32",
        "models": [{"model": tiny_family["sft"], "parameters": {"weight": 0.79}},
                   {"model": tiny_family["rl"], "parameters": {"weight": 1.82, "density": 0.5}}],
        "parameters": {"density": 0.3, "rescale": rescale, "sparsify": sparsify},
    }
    merged = _merge(tmp_path, f"dots-{rescale}-{sparsify}", recipe)
    expected = dots_reference(base, [sft, rl], [0.79, 1.82], [0.3, 0.5], rescale, sparsify)
    _assert_states_close(merged, expected, atol=2e-5, rtol=1e-5)
    if sparsify == "global":  # the same merge through mergekit's in-memory entry point, bit for bit
        from mergekit.merge_methods.api import merge_state_dicts

        in_memory = merge_state_dicts(
            {"base": base, "sft": sft, "rl": rl}, "dots", base="base",
            parameters={"weight": {"sft": 0.79, "rl": 1.82}, "density": {"sft": 0.3, "rl": 0.5},
                        "rescale": rescale, "sparsify": sparsify})
        _assert_states_close(in_memory, merged, atol=0, rtol=0)
        # and the per-tensor rule really differs: some tensor keeps more or fewer than 30%
        per_tensor = dots_reference(base, [sft, rl], [0.79, 1.82], [0.3, 0.5], rescale)
        assert any(not torch.allclose(per_tensor[k], expected[k]) for k in expected)


def sar_reference(base, models, fishers, drop_rate=0.0, epsilon=1e-5):
    """Eq. 12-16 of paper 001 (drop_rate 0: the deterministic part), with numpy."""
    out = {}
    for k in base:
        b = base[k].double().numpy()
        da, db = (m[k].double().numpy() - b for m in models)
        fa, fb = (f[k] for f in fishers) if fishers else (np.abs(da), np.abs(db))
        resolved = np.where(da * db >= 0, da + db, np.where(fa > fb, da, db))
        out[k] = torch.from_numpy(b + resolved).float()
    return out


def test_sar_without_dropout_matches_eq_14(tiny_family, tmp_path):
    base, rl, rl2 = _states(tiny_family, "base", "rl", "rl2")
    recipe = {"merge_method": "sar", "base_model": tiny_family["base"], "dtype": "float32",
              "models": [{"model": tiny_family["rl"]}, {"model": tiny_family["rl2"]}],
              "parameters": {"drop_rate": 0.0}}
    merged = _merge(tmp_path, "sar0", recipe)
    _assert_states_close(merged, sar_reference(base, [rl, rl2], None), atol=1e-6)


def test_sar_with_fisher_files_arbitrates_conflicts(tiny_family, tmp_path):
    from mergekit_rlvr.io.fisher import save_fisher

    base, rl, rl2 = _states(tiny_family, "base", "rl", "rl2")
    g = torch.Generator().manual_seed(7)
    # tiny values far below float32's normal range must still decide conflicts
    fishers = [{k: torch.rand(v.shape, generator=g, dtype=torch.float64) * 1e-60 for k, v in base.items()}
               for _ in range(2)]
    paths = []
    for i, f in enumerate(fishers):
        paths.append(str(tmp_path / f"fisher{i}.safetensors"))
        save_fisher(f, paths[-1])
    recipe = {"merge_method": "sar", "base_model": tiny_family["base"], "dtype": "float32",
              "models": [{"model": tiny_family["rl"], "parameters": {"fisher": paths[0]}},
                         {"model": tiny_family["rl2"], "parameters": {"fisher": paths[1]}}],
              "parameters": {"drop_rate": 0.0, "scale": 1.0}}
    merged = _merge(tmp_path, "sarf", recipe)
    expected = sar_reference(base, [rl, rl2], [{k: v.numpy() for k, v in f.items()} for f in fishers])
    _assert_states_close(merged, expected, atol=1e-6)
    # and the arbitration really differs from the magnitude fallback somewhere
    fallback = sar_reference(base, [rl, rl2], None)
    assert any(not torch.allclose(expected[k], fallback[k]) for k in expected)


def test_sar_dropout_touches_only_low_private_half_at_the_rate(tiny_family, tmp_path):
    from mergekit_rlvr.methods.sar import low_private, private_region

    base, sft, rl = _states(tiny_family, "base", "sft", "rl")
    common = {"merge_method": "sar", "base_model": tiny_family["base"], "dtype": "float32",
              "models": [{"model": tiny_family["sft"]}, {"model": tiny_family["rl"]}]}
    p = 0.3
    plain = _merge(tmp_path, "sar-p0", {**common, "parameters": {"drop_rate": 0.0, "scale": 2.0}})
    dropped = _merge(tmp_path, "sar-p", {**common, "parameters": {"drop_rate": p, "scale": 2.0, "seed": 5}})
    again = _merge(tmp_path, "sar-p-again", {**common, "parameters": {"drop_rate": p, "scale": 2.0, "seed": 5}})
    _assert_states_close(dropped, again, atol=0, rtol=0)
    unscaled = _merge(tmp_path, "sar-p-unscaled",
                      {**common, "parameters": {"drop_rate": p, "scale": 2.0, "seed": 5, "rescale": False}})
    low_total = zeroed = 0
    for k in base:
        if base[k].numel() < 1000:
            continue
        deltas = [sft[k].float() - base[k].float(), rl[k].float() - base[k].float()]
        resolved = (plain[k] - base[k]) / 2.0
        low = low_private(resolved, private_region(deltas, 1e-5))
        torch.testing.assert_close(dropped[k][~low], plain[k][~low], atol=0, rtol=0)
        d = (dropped[k] - base[k])[low] / 2.0
        r = resolved[low]
        is_zero = d.abs() < 1e-7
        torch.testing.assert_close(d[~is_zero], r[~is_zero] / (1 - p), atol=1e-5, rtol=1e-4)
        u = (unscaled[k] - base[k])[low] / 2.0  # rescale: false (paper 001 Table 5): survivors as they were
        torch.testing.assert_close(u[~is_zero], r[~is_zero], atol=1e-5, rtol=1e-4)
        assert bool((u[is_zero].abs() < 1e-7).all())
        low_total += int(low.sum())
        zeroed += int(is_zero.sum())
    assert low_total > 10_000
    assert abs(zeroed / low_total - p) < 0.02


def test_in_memory_entry_point_matches_mergekit_yaml(tiny_family, tmp_path):
    from mergekit.merge_methods.api import merge_state_dicts

    base, sft, rl = _states(tiny_family, "base", "sft", "rl")
    recipe = {"merge_method": "dots", "base_model": tiny_family["base"], "dtype": "float32",
              "models": [{"model": tiny_family["sft"], "parameters": {"weight": 0.5}},
                         {"model": tiny_family["rl"], "parameters": {"weight": 1.5}}]}
    from_yaml = _merge(tmp_path, "dots-mem", recipe)
    in_memory = merge_state_dicts({"base": base, "sft": sft, "rl": rl}, "dots", base="base",
                                  parameters={"weight": {"sft": 0.5, "rl": 1.5}})
    _assert_states_close(in_memory, from_yaml, atol=0, rtol=0)
