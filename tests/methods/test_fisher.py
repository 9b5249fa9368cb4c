"""`mergekit-rlvr fisher` (paper 001, Eq. 13): known answers by hand and by brute
force, tiny values through the file format, bad input, and the Fisher files driving
`merge_method: sar` through the real `mergekit-yaml`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from support.files import BIN, load_state, mergekit_yaml, write_recipe
from mergekit_rlvr.errors import UserError
from mergekit_rlvr.fisher import Row, compute_fisher, diagonal_fisher, encode, read_rows
from mergekit_rlvr.io.fisher import FisherStore, save_fisher

ROWS = [
    {"prompt": "What is 2+3? ", "answer": "5"},
    {"prompt": "Name a color:", "answer": " blue sky"},
    {"prompt": "x", "answer": "yz!"},
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than two
    competing with other jobs' threads (measured 37 ms vs 1.1 s per example)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def checkpoint_shapes(model_dir) -> dict:
    out = {}
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                out[name] = tuple(handle.get_slice(name).get_shape())
    return out


class Bigram(torch.nn.Module):
    """logits at position t = W[token_t]: gradients computable by hand."""

    def __init__(self, table):
        super().__init__()
        self.W = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids):
        return self.W[input_ids]


# ---------------------------------------------------------------- known answers


def test_hand_computed_fisher_masks_the_prompt_and_squares_per_example_sums():
    # W = 0 over 3 tokens: every prediction is uniform, d log p(y) / d W[a] = onehot(y) - 1/3.
    model = Bigram([[0.0] * 3] * 3)
    examples = [
        (torch.tensor([0, 1]), 1),  # prompt [0], answer [1]: one term on row 0
        (torch.tensor([2, 1, 1, 1]), 2),  # prompt [2, 1], answer [1, 1]: two terms on row 1
    ]
    result = diagonal_fisher(model, examples, progress=False)
    g = torch.tensor([-1 / 3, 2 / 3, -1 / 3], dtype=torch.float64)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[0] = g**2 / 2  # example 1, averaged over 2 examples
    expected[1] = (2 * g) ** 2 / 2  # example 2: the square of the summed gradient, not a sum of squares
    # row 2 stays 0: the prompt transition 2 -> 1 is context, not a target
    assert result.examples == 2
    assert result.values["W"].dtype == torch.float64
    torch.testing.assert_close(result.values["W"], expected, rtol=1e-6, atol=0)
    assert result.mean_log_prob == pytest.approx(3 * math.log(1 / 3) / 2, rel=1e-6)
    assert model.W.grad is None  # gradients freed as they were accumulated


def test_fisher_far_below_float32_range_survives_compute_write_and_read(tmp_path):
    # A confident prediction: p(token 1 | token 0) = sigmoid(-60) ~ 8.8e-27, so the
    # Fisher value of W[0, 1] is ~ 7.7e-53, which is 0 in float32.
    model = Bigram([[60.0, 0.0], [0.0, 0.0]])
    result = diagonal_fisher(model, [(torch.tensor([0, 0]), 1)], progress=False)
    exact = (1.0 / (1.0 + math.exp(60.0))) ** 2
    assert float(torch.tensor(exact, dtype=torch.float32)) == 0.0
    assert float(result.values["W"][0, 1]) == pytest.approx(exact, rel=1e-5)
    out = tmp_path / "small.safetensors"
    mixed = torch.tensor([1.0, 1e-60, 3e-65, 0.0], dtype=torch.float64)  # one tensor, 65 decades apart
    save_fisher({"W": result.values["W"], "mixed": mixed, "tiny": torch.full((2, 2), 1e-300, dtype=torch.float64)},
                str(out))
    store = FisherStore(str(out))
    back = store.get("W", (2, 2))
    assert float(back[0, 1]) == pytest.approx(exact, rel=1e-6)
    torch.testing.assert_close(store.get("mixed"), mixed, rtol=1e-6, atol=0)
    torch.testing.assert_close(store.get("tiny"), torch.full((2, 2), 1e-300, dtype=torch.float64), rtol=1e-6, atol=0)
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o600)  # an ordinary file
    assert not list(tmp_path.glob("*.tmp-*"))


def brute_force_fisher(model_dir, rows, *, names_from=None):
    """Eq. 13 one example at a time with torch.autograd.grad, the log-probability
    summed token by token in a Python loop (an independent code path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    named = dict(model.named_parameters(remove_duplicate=False))
    unique = list(dict(model.named_parameters()).items())
    sums = [torch.zeros(p.shape, dtype=torch.float64) for _, p in unique]
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        logits = model(input_ids=ids).logits[0]
        log_p = 0.0
        for t in range(len(prompt), len(prompt) + len(answer)):
            log_p = log_p + torch.log_softmax(logits[t - 1], -1)[ids[0, t]]
        grads = torch.autograd.grad(log_p, [p for _, p in unique])
        for acc, grad in zip(sums, grads):
            acc += grad.double() ** 2
    by_param = {id(p): acc / len(rows) for (_, p), acc in zip(unique, sums)}
    return {name: by_param[id(named[name])] for name in names_from}


def assert_close_fisher(got, want, name):
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6 * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_cli_matches_brute_force_per_example_gradients(tiny_family, tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", ROWS[:2] + [""] + ROWS[2:])  # a blank line is skipped
    out = tmp_path / "fisher" / "base.safetensors"
    proc = subprocess.run(
        [str(BIN / "mergekit-rlvr"), "fisher", tiny_family["base"], "--data", str(data), "--out", str(out),
         "--device", "cpu", "--quiet"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from 3 examples" in proc.stdout
    shapes = checkpoint_shapes(tiny_family["base"])
    store = FisherStore(str(out))
    assert set(store.names()) == set(shapes)  # the checkpoint's names, as mergekit-yaml sees them
    want = brute_force_fisher(tiny_family["base"], ROWS, names_from=shapes)
    for name, shape in shapes.items():
        got = store.get(name, shape)
        assert_close_fisher(got, want[name], name)
    assert float(store.get("model.embed_tokens.weight").sum()) > 0
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert meta["examples"] == "3" and meta["equation"] == "paper 001 Eq. 13"


def test_tied_embeddings_get_the_shared_parameters_fisher_under_every_checkpoint_name(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2ForCausalLM

    from mergekit_rlvr.toy.tiny import char_tokenizer, tiny_config

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = Qwen2ForCausalLM(tiny_config(len(tokenizer), hidden=64, intermediate=64, layers=1,
                                         tie_word_embeddings=True))
    dropped = tmp_path / "tied"  # save_pretrained writes the tied weight once (no lm_head.weight)
    model.save_pretrained(str(dropped))
    tokenizer.save_pretrained(str(dropped))
    both = tmp_path / "tied_both"  # another writer keeps both names
    shutil.copytree(dropped, both)
    state = load_file(str(both / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(both / "model.safetensors"), metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "val.jsonl", ROWS)

    for model_dir in (dropped, both):
        out = tmp_path / f"{model_dir.name}.safetensors"
        summary = compute_fisher(str(model_dir), str(data), str(out), device="cpu", progress=False)
        shapes = checkpoint_shapes(model_dir)
        store = FisherStore(str(out))
        assert set(store.names()) == set(shapes)
        assert summary["unwritten_parameters"] == [] and summary["zero_tensors"] == []
        want = brute_force_fisher(str(model_dir), ROWS, names_from=shapes)
        for name in shapes:
            assert_close_fisher(store.get(name), want[name], name)
    store = FisherStore(str(tmp_path / "tied_both.safetensors"))
    torch.testing.assert_close(store.get("lm_head.weight"), store.get("model.embed_tokens.weight"), rtol=0, atol=0)


def test_encode_splits_prompt_and_answer_exactly(tiny_family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_family["base"])
    ids, n_prompt = encode(tokenizer, Row(1, "ab", "cd"), add_eos=True)
    assert n_prompt == 2
    assert ids.tolist() == tokenizer("abcd")["input_ids"] + [tokenizer.eos_token_id]
    chat_ids, chat_prompt = encode(tokenizer, Row(1, "ab", "cd"), chat_template=True)  # template: the content
    assert (chat_ids.tolist(), chat_prompt) == (tokenizer("abcd")["input_ids"], 2)
    with pytest.raises(UserError, match="line 7: the answer has no tokens"):
        encode(tokenizer, Row(7, "ab", ""))
    with pytest.raises(UserError, match="line 8: the prompt has no tokens"):
        encode(tokenizer, Row(8, "", "cd"))


# ---------------------------------------------------------------- bad input


def run_cli(argv, capsys):
    from mergekit_rlvr.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err.strip()
    return done.value.code, err


@pytest.mark.parametrize(
    "case, rows, message",
    [
        ("missing", None, "data file {data} does not exist"),
        ("no_answer", [ROWS[0], {"prompt": "q"}], "data file {data} line 2: row has no 'answer'"),
        ("no_prompt", [{"answer": "a"}], "data file {data} line 1: row has no 'prompt'"),
        ("not_json", [ROWS[0], "{prompt: 1"], "data file {data} line 2: not valid JSON"),
        ("not_string", [{"prompt": "q", "answer": 5}], "data file {data} line 1: 'answer' must be a string"),
        ("empty", ["", "  "], "data file {data} holds no examples"),
        ("empty_answer", [{"prompt": "q", "answer": ""}], "data file {data} line 1: 'answer' is empty"),
    ],
)
def test_bad_data_is_one_error_line_and_nothing_written(tiny_family, tmp_path, capsys, case, rows, message):
    data = tmp_path / "val.jsonl"
    if rows is not None:
        write_jsonl(data, rows)
    out = tmp_path / "f.safetensors"
    code, err = run_cli(["fisher", tiny_family["base"], "--data", str(data), "--out", str(out)], capsys)
    assert code == 1
    assert err == f"error: {message.format(data=data)}" or err.startswith(f"error: {message.format(data=data)}")
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == ([data] if rows is not None else [])


def test_unreadable_model_is_one_error_line(tiny_family, tmp_path, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", ROWS)
    out = tmp_path / "f.safetensors"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_family["base"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    empty = tmp_path / "empty"
    empty.mkdir()
    for model, message in [
        (str(tmp_path / "nowhere"), f"model {tmp_path / 'nowhere'} does not exist"),
        (str(broken), f"model checkpoint {broken / 'model.safetensors'} is not a readable safetensors file"),
        (str(empty), f"model {empty} has no *.safetensors or *.bin checkpoint files"),
        (str(data), f"model {data} is not a directory"),
    ]:
        code, err = run_cli(["fisher", model, "--data", str(data), "--out", str(out)], capsys)
        assert code == 1 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_family["base"], no_config)
    (no_config / "config.json").unlink()
    code, err = run_cli(["fisher", str(no_config), "--data", str(data), "--out", str(out)], capsys)
    assert code == 1 and err.startswith(f"error: model {no_config}: cannot load") and len(err.splitlines()) == 1
    assert not out.exists()
    code, err = run_cli(["fisher", tiny_family["base"], "--data", str(data), "--out", str(tmp_path)], capsys)
    assert code == 1 and err.startswith(f"error: --out {tmp_path} is a directory") and len(err.splitlines()) == 1


def test_read_rows_streams_and_stops_at_max_examples(tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", ROWS + ["not json"])
    assert [r.line for r in read_rows(str(data), limit=2)] == [1, 2]
    with pytest.raises(UserError, match="line 4: not valid JSON"):
        list(read_rows(str(data)))


# ---------------------------------------------------------------- fisher files driving sar


@pytest.mark.slow
def test_fisher_files_drive_sar_through_mergekit_yaml(tiny_family, tmp_path):
    from mergekit_rlvr.methods.common import combine
    from mergekit_rlvr.methods.sar import sar_vector

    data = write_jsonl(tmp_path / "val.jsonl", ROWS)
    fisher = {}
    for name in ("rl", "rl2"):
        fisher[name] = tmp_path / f"{name}.safetensors"
        compute_fisher(tiny_family[name], str(data), str(fisher[name]), device="cpu", progress=False)
    params = {"drop_rate": 0.3, "scale": 1.0, "seed": 5, "epsilon": 1e-5}
    recipe = write_recipe(tmp_path / "sar.yml", {
        "merge_method": "sar",
        "base_model": tiny_family["base"],
        "models": [{"model": tiny_family[n], "parameters": {"fisher": str(fisher[n])}} for n in ("rl", "rl2")],
        "parameters": params,
        "dtype": "float32",
    })
    out = tmp_path / "merged"
    mergekit_yaml(recipe, out)
    merged = load_state(out)
    base, rl, rl2 = (load_state(tiny_family[n]) for n in ("base", "rl", "rl2"))
    stores = [FisherStore(str(fisher[n])) for n in ("rl", "rl2")]
    fisher_decided = 0
    for name, theta0 in base.items():
        fishers = [s.get(name, theta0.shape) for s in stores]
        kwargs = dict(drop_rate=params["drop_rate"], epsilon=params["epsilon"], seed=params["seed"], name=name)
        vector = sar_vector(theta0, [rl[name], rl2[name]], fishers, **kwargs)
        want = combine(theta0, [vector], [params["scale"]], out_dtype=theta0.dtype)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
        by_magnitude = sar_vector(theta0, [rl[name], rl2[name]], [None, None], **kwargs)
        fisher_decided += int((vector != by_magnitude).sum())
    assert fisher_decided > 0  # the Fisher values, not |delta|, settled some conflicts
