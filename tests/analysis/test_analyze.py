"""`mergekit-rlvr analyze`: known answers computed by hand, a brute-force in-memory
reference on random checkpoints (global top-k through dots.magnitude_threshold on
the concatenated model), the real console script, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_rlvr.analysis import stats as S
from mergekit_rlvr.analysis.stream import analyze
from mergekit_rlvr.methods.common import task_vector
from mergekit_rlvr.methods.dots import magnitude_threshold, sparsify

BIN = Path(sys.executable).parent

# ---------------------------------------------------------------- hand-made checkpoints

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
LN = "model.layers.1.input_layernorm.weight"
HEAD = "lm_head.weight"
SHAPES = {Q: (2, 2), UP: (1, 4), LN: (2,), HEAD: (1, 2)}
DELTA_A = {Q: [0.5, -0.25, 0.0, 0.125], UP: [1.0, -0.5, 0.25, 0.0], LN: [0.0625, 0.0], HEAD: [-2.0, 0.03125]}
DELTA_B = {Q: [-0.5, -0.5, 0.25, 0.0], UP: [0.5, 0.5, 0.0, 0.0], LN: [0.0625, 0.25], HEAD: [0.0, -1.0]}


def write_model(path: Path, state: dict, shards: int = 1) -> str:
    path.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
        return str(path)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(path)


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand")
    base = {n: torch.ones(s) for n, s in SHAPES.items()}
    a = {n: base[n] + torch.tensor(DELTA_A[n]).reshape(SHAPES[n]) for n in SHAPES}
    b = {n: base[n] + torch.tensor(DELTA_B[n]).reshape(SHAPES[n]) for n in SHAPES}
    # tensors that must be skipped, with their reasons
    base["model.layers.1.extra.weight"] = torch.zeros(3)
    a["model.layers.1.extra.weight"] = torch.zeros(3)
    b["model.layers.1.extra.weight"] = torch.zeros(4)
    base["position_ids"] = torch.arange(3)
    a["position_ids"] = torch.arange(3)
    b["position_ids"] = torch.arange(3)
    a["only_in_a.bias"] = torch.zeros(2)
    paths = {
        "base": write_model(root / "base", base),
        "a": write_model(root / "a", a),
        "b": write_model(root / "b", b, shards=2),  # sharded, with an index
    }
    return root, paths


def test_names_give_layers_and_module_kinds():
    assert S.layer_index("model.layers.17.mlp.down_proj.weight") == 17
    assert S.layer_index("model.norm.weight") is None
    assert S.module_kind("model.embed_tokens.weight") == "embedding"
    assert S.module_kind("lm_head.weight") == "lm_head"
    assert S.module_kind("model.layers.0.input_layernorm.weight") == "norm"
    assert S.module_kind("model.layers.0.post_attention_layernorm.weight") == "norm"
    assert S.module_kind("model.layers.0.self_attn.q_norm.weight") == "norm"
    assert S.module_kind("model.norm.weight") == "norm"
    assert S.module_kind("model.layers.0.self_attn.k_proj.bias") == "attention"
    assert S.module_kind("model.layers.0.mlp.gate_proj.weight") == "mlp"


def test_hand_computed_figures(hand):
    root, p = hand
    report = analyze(p["base"], [p["a"], p["b"]], epsilon=1e-5, eta=0.1, top=0.5, progress=False,
                     chunk_entries=3)
    va, vb = report["vectors"][p["a"]], report["vectors"][p["b"]]
    assert list(report["vectors"]) == [p["a"], p["b"]]
    assert report["parameters"] == 12 and report["tensors"] == 4
    # ||Delta_a||^2 = .25+.0625+.015625 + 1+.25+.0625 + .00390625 + 4+.0009765625
    assert va["l2_norm"] == pytest.approx(math.sqrt(5.6455078125))
    assert vb["l2_norm"] == pytest.approx(math.sqrt(2.12890625))
    assert va["sparsity"] == pytest.approx(3 / 12) and vb["sparsity"] == pytest.approx(4 / 12)
    assert va["layer_l2_norms"] == pytest.approx({"0": math.sqrt(1.640625), "1": math.sqrt(0.00390625)})
    assert vb["layer_l2_norms"] == pytest.approx({"0": math.sqrt(1.0625), "1": math.sqrt(0.06640625)})
    # global top 50% (k = 6): a keeps |Delta| >= .25, b (7 entries, ties kept) |Delta| >= .25
    assert va["module_top_share"] == pytest.approx({"attention": 2 / 4, "mlp": 3 / 4, "norm": 0.0, "lm_head": 1 / 2})
    assert vb["module_top_share"] == pytest.approx({"attention": 3 / 4, "mlp": 2 / 4, "norm": 1 / 2, "lm_head": 1 / 2})
    assert va["top_threshold"] == 0.25 and vb["top_threshold"] == 0.25
    assert va["changed_share"] == pytest.approx(7 / 12)

    (pair,) = report["pairs"]
    assert (pair["a"], pair["b"]) == (p["a"], p["b"])
    assert pair["norm_ratio"] == pytest.approx(math.sqrt(5.6455078125 / 2.12890625))
    assert pair["cosine"] == pytest.approx(0.09765625 / math.sqrt(5.6455078125 * 2.12890625))
    assert pair["layer_cosine"] == pytest.approx({
        "0": 0.125 / math.sqrt(1.640625 * 1.0625),
        "1": 0.00390625 / math.sqrt(0.00390625 * 0.06640625),
    })
    # co-updated: 6 entries, 3 with opposite signs
    assert pair["sign_conflict"] == pytest.approx(0.5)
    assert pair["regions"] == pytest.approx({"overlap": 6 / 12, "conflict": 3 / 12, "private": 5 / 12,
                                             "unchanged": 1 / 12})
    # eta = 0.1: 7 changed entries each, 4 in both
    assert pair["jaccard"] == pytest.approx(4 / 10)
    assert pair["jaccard_random"] == pytest.approx(7 / 17)
    # paper 004 Table 5 per matrix type: q_proj changed a = [1,1,0,1], b = [1,1,1,0] (eta 0.1)
    assert pair["jaccard_by_type"]["q_proj"] == pytest.approx(2 / 4)
    assert pair["jaccard_random_by_type"]["q_proj"] == pytest.approx(0.5625 / (1.5 - 0.5625))
    assert pair["jaccard_by_layer_type"]["0"]["q_proj"] == pytest.approx(2 / 4)
    # Fig. 3: on the overlap (entries 0, 1) a = (.5, -.25), b = (-.5, -.5)
    assert pair["overlap_cosine_by_type"]["q_proj"] == pytest.approx(-0.125 / math.sqrt(0.3125 * 0.5))
    # paper 001 Fig. 2: layer 0 (q_proj, up_proj) has 6 of 8 entries of a updated, layer 1 (norm) 1 of 2
    assert va["layer_sparsity"] == pytest.approx({"0": 2 / 8, "1": 1 / 2})
    # negative products: -.25, -.25, -.03125
    assert pair["conflict_norm"] == pytest.approx(math.sqrt(0.1259765625))
    assert pair["sign_conflict_by_density"] == pytest.approx({
        "0.1": None, "0.2": 0.0, "0.3": 2 / 3, "0.4": 2 / 3, "0.5": 0.5, "0.6": 0.5,
        "0.7": 0.4, "0.8": 0.5, "0.9": 0.5, "1.0": 0.5,
    })
    # a at each density, b at its top 50% (|Delta_b| >= .25), as in paper 000 Fig. 1b
    got = pair["sign_conflict_a_sparsified"]
    assert (got["0.1"], got["0.2"], got["0.3"], got["0.5"], got["0.8"]) == pytest.approx((None, 0.0, 2 / 3, 0.5, 0.6))

    skipped = {(s["tensor"], os.path.basename(s["model"])): s["reason"] for s in report["skipped"]}
    assert skipped[("model.layers.1.extra.weight", "b")] == "shape [4] differs from the base's [3]"
    assert skipped[("position_ids", "base")].startswith("not floating point")
    assert skipped[("only_in_a.bias", "a")] == "missing in the base"


def test_chunking_does_not_change_the_report(hand):
    _, p = hand
    small = analyze(p["base"], [p["a"], p["b"]], top=0.3, progress=False, chunk_entries=1)
    large = analyze(p["base"], [p["a"], p["b"]], top=0.3, progress=False)
    assert_close(small, large)


def test_unmappable_files_are_read_with_pread_to_the_same_report(hand, monkeypatch):
    import mmap

    _, p = hand
    mapped = analyze(p["base"], [p["a"], p["b"]], top=0.3, progress=False)

    def refuse(*args, **kwargs):
        raise OSError("mapping refused")

    monkeypatch.setattr(mmap, "mmap", refuse)
    read = analyze(p["base"], [p["a"], p["b"]], top=0.3, progress=False)
    assert read == mapped


def assert_close(got, want, where="report", rel=1e-6):
    """Equal structure; floats equal up to float32 summation order."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}", rel)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]", rel)
    elif isinstance(want, float) and math.isfinite(want):
        assert got == pytest.approx(want, rel=rel, abs=1e-12), where
    else:
        assert got == want, where


# ---------------------------------------------------------------- brute-force reference

NAMES = {
    "model.embed_tokens.weight": (50, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.q_proj.bias": (16,),
    "model.layers.0.mlp.down_proj.weight": (16, 40),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.1.self_attn.o_proj.weight": (16, 16),
    "model.layers.1.mlp.up_proj.weight": (40, 16),
    "model.norm.weight": (16,),
    "lm_head.weight": (50, 16),
}


def random_models(root: Path, dtype):
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g) for n, s in NAMES.items()}
    models = {}
    for name, scale, density in (("sft", 0.05, 1.0), ("rl", 0.002, 0.3), ("rl2", 0.002, 0.3)):
        state = {}
        for n, t in base.items():
            mask = torch.rand(t.shape, generator=g) < density
            state[n] = (t + scale * torch.randn(t.shape, generator=g) * mask).to(dtype)
        models[name] = write_model(root / name, state)
    base = {n: t.to(dtype) for n, t in base.items()}
    return write_model(root / "base", base), models


def reference(base_path, model_paths, epsilon, eta, top):
    """Every figure from whole in-memory models, concatenated over tensors."""
    from safetensors.torch import load_file

    base = load_file(os.path.join(base_path, "model.safetensors"))
    names = list(NAMES)
    from mergekit_rlvr.analysis.breakdown import matrix_type

    deltas, changed, layers, kinds, types, layer_types = [], [], {}, {}, {}, {}
    offset = 0
    for n in names:
        size = base[n].numel()
        if S.layer_index(n) is not None:
            layers.setdefault(S.layer_index(n), []).append((offset, offset + size))
            layer_types.setdefault((S.layer_index(n), matrix_type(n)), []).append((offset, offset + size))
        kinds.setdefault(S.module_kind(n), []).append((offset, offset + size))
        types.setdefault(matrix_type(n), []).append((offset, offset + size))
        offset += size

    def pick(vector, spans):
        return torch.cat([vector[s:e] for s, e in spans])

    for path in model_paths:
        model = load_file(os.path.join(path, "model.safetensors"))
        d = torch.cat([task_vector(model[n], base[n]).float().reshape(-1) for n in names]).double()
        scale = torch.cat([torch.maximum(model[n].float().abs(), base[n].float().abs()).reshape(-1) for n in names])
        deltas.append(d)
        changed.append(d.float().abs() > eta * scale)
    out = {"vectors": {}, "pairs": []}

    def kept(d, density):  # DoTS's rule on the whole concatenated vector
        mask, _ = sparsify(d.float(), magnitude_threshold(d.float(), density))
        return mask

    for path, d, c in zip(model_paths, deltas, changed):
        top_mask = kept(d, top)
        out["vectors"][path] = {
            "l2_norm": float(d.norm()),
            "sparsity": float((d.abs() <= epsilon).double().mean()),
            "layer_l2_norms": {str(i): float(pick(d, s).norm()) for i, s in layers.items()},
            "module_top_share": {k: float(pick(top_mask, s).double().mean()) for k, s in kinds.items()},
            "changed_share": float(c.double().mean()),
            "layer_sparsity": {str(i): float((pick(d, s).abs() <= epsilon).double().mean()) for i, s in layers.items()},
        }
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            a, b = deltas[i], deltas[j]
            ua, ub = a.abs() > epsilon, b.abs() > epsilon
            opposite = (a * b) < 0
            n = a.numel()
            pa, pb = float(changed[i].double().mean()), float(changed[j].double().mean())
            by_density = {}
            for k in S.DENSITIES:
                co = kept(a, k) & kept(b, k) & ua & ub
                by_density[str(k)] = float((co & opposite).sum() / co.sum()) if co.any() else None
            out["pairs"].append({
                "a": model_paths[i], "b": model_paths[j],
                "norm_ratio": float(a.norm() / b.norm()),
                "cosine": float(a @ b / (a.norm() * b.norm())),
                "layer_cosine": {str(L): float(pick(a, s) @ pick(b, s) / (pick(a, s).norm() * pick(b, s).norm()))
                                 for L, s in layers.items()},
                "sign_conflict": float((ua & ub & opposite).sum() / (ua & ub).sum()),
                "regions": {
                    "overlap": float((ua & ub).sum()) / n,
                    "conflict": float((ua & ub & opposite).sum()) / n,
                    "private": float((ua ^ ub).sum()) / n,
                    "unchanged": float((~ua & ~ub).sum()) / n,
                },
                "jaccard": float((changed[i] & changed[j]).sum() / (changed[i] | changed[j]).sum()),
                "jaccard_random": pa * pb / (pa + pb - pa * pb),
                "conflict_norm": float((a * b).clamp(max=0).norm()),
                "sign_conflict_by_density": by_density,
            })
            ci, cj = changed[i], changed[j]

            def jac(spans):
                x, y = pick(ci, spans), pick(cj, spans)
                return float((x & y).sum() / (x | y).sum()) if (x | y).any() else None

            def rand(spans):
                x, y = float(pick(ci, spans).double().mean()), float(pick(cj, spans).double().mean())
                return x * y / (x + y - x * y) if x + y > 0 else None

            def cos(spans):  # the two updates on the entries changed in both
                both = pick(ci, spans) & pick(cj, spans)
                x, y = pick(a, spans)[both], pick(b, spans)[both]
                return float(x @ y / (x.norm() * y.norm())) if both.any() and x.norm() * y.norm() > 0 else None

            out["pairs"][-1].update({
                "jaccard_by_type": {t: jac(sp) for t, sp in sorted(types.items())},
                "jaccard_random_by_type": {t: rand(sp) for t, sp in sorted(types.items())},
                "jaccard_by_layer": {str(L): jac(sp) for L, sp in sorted(layers.items())},
                "jaccard_random_by_layer": {str(L): rand(sp) for L, sp in sorted(layers.items())},
                "overlap_cosine_by_type": {t: cos(sp) for t, sp in sorted(types.items())},
                "overlap_cosine_by_layer": {str(L): cos(sp) for L, sp in sorted(layers.items())},
                "overlap_cosine_by_kind": {k: cos(sp) for k, sp in sorted(kinds.items())},
                "overlap_cosine": cos([(0, a.numel())]),
                "jaccard_by_layer_type": {str(L): {t: jac(layer_types[(L, t)])
                                                   for t in sorted(t_ for L_, t_ in layer_types if L_ == L)}
                                          for L in sorted(layers)},
            })
    return out


@pytest.mark.parametrize("dtype,epsilon", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float32, 0.0)])
def test_matches_brute_force_reference(tmp_path, dtype, epsilon):
    base, models = random_models(tmp_path, dtype)
    paths = [models["sft"], models["rl"], models["rl2"]]
    got = analyze(base, paths, epsilon=epsilon, eta=1e-3, top=0.1, progress=False, chunk_entries=100)
    want = reference(base, paths, epsilon, 1e-3, 0.1)
    for path, expected in want["vectors"].items():
        vector = got["vectors"][path]
        for key, value in expected.items():
            assert vector[key] == pytest.approx(value, rel=1e-5, abs=1e-12), (path, key)
    assert len(got["pairs"]) == 3
    for pair, expected in zip(got["pairs"], want["pairs"]):
        for key, value in expected.items():
            if isinstance(value, str):
                assert pair[key] == value
            elif isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
                assert list(pair[key]) == list(value), key
                for inner in value:
                    assert pair[key][inner] == pytest.approx(value[inner], rel=1e-5, abs=1e-12), (key, inner)
            else:
                assert pair[key] == pytest.approx(value, rel=1e-5, abs=1e-12), (pair["a"], pair["b"], key)
    if dtype == torch.bfloat16:  # quantized deltas: many ties at the global thresholds
        rl = got["vectors"][models["rl"]]
        assert rl["sparsity"] > 0.6


def test_threshold_prediction_only_decides_whether_pass_2_runs(tmp_path, monkeypatch):
    """The row sample predicts the coarse bins of the global thresholds; the report is
    the same when it holds (pass 2 skipped), when it is off (pass 2 for every bin) and
    when it misses on purpose (pass 2 for the missed bins only)."""
    from mergekit_rlvr.analysis import histograms as H
    from mergekit_rlvr.analysis import stream

    base, models = random_models(tmp_path, torch.bfloat16)
    paths = [models["sft"], models["rl"]]
    passes = []
    real_stream = stream.Run.stream
    monkeypatch.setattr(stream.Run, "stream", lambda self, desc: (passes.append(desc), real_stream(self, desc))[1])

    def run(**options):
        passes.clear()
        return analyze(base, paths, progress=False, chunk_entries=64, **options), list(passes)

    predicted, predicted_passes = run()
    assert predicted_passes == ["analyze 1/3", "analyze 3/3"]
    unpredicted, unpredicted_passes = run(predict=False)
    assert unpredicted_passes == ["analyze 1/3", "analyze 2/3", "analyze 3/3"]
    real_predict = H.predict_bins
    monkeypatch.setattr(H, "predict_bins", lambda *a: real_predict(*a)[::2])  # every other bin missed
    missed, missed_passes = run()
    assert missed_passes == unpredicted_passes
    monkeypatch.setattr(H, "predict_bins", real_predict)
    monkeypatch.setattr(stream, "SAMPLE_ALL_UP_TO", 0)  # a 1/64 row sample, as for large models
    sampled, _ = run()
    for got in (predicted, missed, sampled):
        assert_close(got, unpredicted, rel=0)


def test_device_option(hand):
    from mergekit_rlvr.analysis.stream import resolve_device
    from mergekit_rlvr.errors import UserError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device must be one of cpu, cuda, auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA GPU"):
            resolve_device("cuda")
    else:  # on a GPU the kernels run there and give the CPU's report
        _, p = hand
        on_gpu = analyze(p["base"], [p["a"], p["b"]], top=0.3, progress=False, device="cuda")
        assert_close(on_gpu, analyze(p["base"], [p["a"], p["b"]], top=0.3, progress=False), rel=1e-5)


def exact_parts(report, where=""):
    """The report's integers and thresholds (which must not depend on the kernels)."""
    if isinstance(report, dict):
        return {k: exact_parts(v, f"{where}/{k}") for k, v in report.items()
                if not isinstance(v, float) or "threshold" in where}
    if isinstance(report, list):
        return [exact_parts(v, where) for v in report if not isinstance(v, float)]
    return report


def test_native_kernels_and_torch_kernels_give_one_report(tmp_path, monkeypatch):
    """MERGEKIT_RLVR_NATIVE=0 runs the torch kernels on CPU: every integer and threshold
    equal, floats to the torch kernels' float32 summation order (1e-5)."""
    base, models = random_models(tmp_path, torch.bfloat16)
    paths = [models["sft"], models["rl"], models["rl2"]]
    native = analyze(base, paths, progress=False, chunk_entries=700)
    monkeypatch.setenv("MERGEKIT_RLVR_NATIVE", "0")
    torch_kernels = analyze(base, paths, progress=False, chunk_entries=700)
    assert exact_parts(native) == exact_parts(torch_kernels)
    assert_close(native, torch_kernels, rel=1e-5)


@pytest.mark.slow
def test_compiled_kernels_match_eager(tmp_path, monkeypatch):
    """torch.compile fuses the same kernel source: counts equal, sums to float32 order."""
    base, models = random_models(tmp_path, torch.bfloat16)
    paths = [models["sft"], models["rl"], models["rl2"]]
    monkeypatch.setenv("MERGEKIT_RLVR_NATIVE", "0")  # compile=False on CPU: the native kernels otherwise
    eager = analyze(base, paths, progress=False, chunk_entries=700, compile=False)
    fused = analyze(base, paths, progress=False, chunk_entries=700, compile=True)
    assert_close(fused, eager, rel=1e-5)


# ---------------------------------------------------------------- console script


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([str(BIN / "mergekit-rlvr"), "analyze", *args, "--no-progress"],
                          capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.slow
def test_cli_writes_report_and_plots(tiny_family, tmp_path):
    family = Path(tiny_family["base"]).parent
    out = tmp_path / "report"
    proc = run_cli("--base", "base", "sft", "rl", "--out", str(out), cwd=family)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert list(report["vectors"]) == ["sft", "rl"]  # the MODEL arguments as given
    for key in ("l2_norm", "sparsity", "layer_l2_norms", "module_top_share"):
        assert key in report["vectors"]["sft"]
    (pair,) = report["pairs"]
    for key in ("a", "b", "norm_ratio", "cosine", "layer_cosine", "sign_conflict", "regions", "jaccard",
                "jaccard_random", "conflict_norm", "sign_conflict_by_density"):
        assert key in pair
    assert set(pair["regions"]) == {"overlap", "conflict", "private", "unchanged"}
    assert report["skipped"] == []
    # the toy family: a large dense sft update, a small sparse rl update
    assert pair["norm_ratio"] > 10
    assert report["vectors"]["rl"]["sparsity"] > 0.5 > report["vectors"]["sft"]["sparsity"]
    text = (out / "report.md").read_text()
    assert "larger than Delta_rl" in text and "conflict in sign" in text
    for png in ("layer_norms.png", "sign_conflict_by_density.png", "regions.png", "module_shares.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".analyze-")]


def test_bad_input_is_one_line_and_writes_nothing(hand, tmp_path, capsys):
    from mergekit_rlvr.cli import main

    _, p = hand
    out = tmp_path / "out"
    proc = run_cli("--base", p["base"], p["a"], str(tmp_path / "nope"), "--out", str(out))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr, proc.stderr
    assert not out.exists()

    bad = {n: torch.ones(s) for n, s in SHAPES.items()}
    bad[UP] = torch.tensor([[1.0, float("nan"), 1.0, 1.0]])
    broken = write_model(tmp_path / "broken", bad)
    short = write_model(tmp_path / "short", {n: torch.ones(s) for n, s in SHAPES.items()})
    file = os.path.join(short, "model.safetensors")
    os.truncate(file, os.path.getsize(file) - 2)  # its last tensor's data cut: mapped, it would crash the reader
    for args, needle in (([broken], UP), ([short], "short"), ([p["a"], "--top", "0"], "--top"),
                         ([p["a"], p["a"]], "twice"), ([p["a"], "--epsilon", "-1"], "--epsilon")):
        with pytest.raises(SystemExit) as done:
            main(["analyze", "--base", p["base"], *args, "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert done.value.code == 1 and needle in err and err.strip().count("\n") == 0, err
        assert not out.exists()
