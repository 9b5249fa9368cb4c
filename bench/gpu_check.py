"""Every CUDA check and benchmark of the swap and the merge, in one prepared run.

One line per figure. On a GPU machine (PyTorch and Triton, no vLLM, no network):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 -m pytest -q -m cuda tests/methods/test_device_math.py
    PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py

Wheels to carry in ``.whl/`` (only for the ``merge`` section, which runs mergekit on
the GPU; the other sections need torch alone): mergekit
0.1.5, pydantic, pydantic-core (cp312 manylinux), annotated-types,
typing-inspection, immutables (cp312 manylinux). Our own packages travel as the
working tree (``mergekit_rlvr``, ``vllm_plugins``: pure Python, no vLLM import on
these paths).

Sections (``--only`` picks some):

- ``copy``: the device's copy rate (``dst.copy_(src)``, bytes read + written / s).
- ``swap``: a Qwen2.5-7B-shaped set of bf16 tensors (``--layers`` of 28; embeddings
  and lm_head included), a 2-model dots recipe at density 0.3, packed as the worker
  packs it (``vllm_plugins.packed``); one swap = ``combine_packed`` + ``scatter``
  into the live bf16 parameters. Prints held bytes / weight bytes, the swap's time
  and its rate for the bytes it must read and write against ``copy`` (goal >= 0.5);
  then the host-offload mode's swap (the stores in pinned host memory, streamed to
  the device per swap) against it.
- ``equal``: the swap and the dots/sar/interpolation merge math on the device equal
  the CPU's bit for bit on one layer's tensors.
- ``merge``: what ``mergekit-yaml --cuda`` runs (mergekit's ``run_merge``) on
  Qwen2.5-7B-wide bf16 checkpoints of ``--merge-layers`` layers written to disk: dots
  and sar on the device equal the CPU merge bit for bit; dots against
  task_arithmetic on the device (goal: <= 1.3x). Needs mergekit (carried wheels).

Without a GPU it runs the same code on the CPU on Qwen2.5-0.5B's shapes, 1 layer and
a 4096-row vocabulary (``make bench`` does; the figures are then the CPU's).
"""

from __future__ import annotations

import argparse
import time

import torch

QWEN_7B = {"hidden": 3584, "intermediate": 18944, "kv": 512, "vocab": 152064, "heads": 28, "kv_heads": 4}
QWEN_05B = {"hidden": 896, "intermediate": 4864, "kv": 128, "vocab": 151936, "heads": 14, "kv_heads": 2}
SHAPES = {"7b": QWEN_7B, "0.5b": QWEN_05B}
COEFFICIENTS = [0.79, 1.82]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn, repeat: int = 3) -> float:
    """Best of ``repeat`` wall times after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def shapes(layers: int, vocab: int, model=QWEN_7B):
    h, i, kv = model["hidden"], model["intermediate"], model["kv"]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def checkpoints(shape, device: str, seed: int):
    """(base, sft, rl) in bf16: a dense SFT update and a small sparse RL one."""
    g = torch.Generator(device=device).manual_seed(seed)
    base = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16)
    sft = (base.float() + torch.randn(shape, generator=g, device=device) * 2e-3).to(torch.bfloat16)
    touched = torch.rand(shape, generator=g, device=device) < 0.05
    rl = torch.where(touched, (base.float() + torch.randn(shape, generator=g, device=device) * 5e-4), base.float())
    return base, sft, rl.to(torch.bfloat16)


def dots_store(base, models, density: float = 0.3):
    """The worker's packed base and dots vectors for one tensor (float32 merge dtype;
    gamma per tensor here: the swap's arithmetic does not depend on its value)."""
    from mergekit_rlvr.methods.common import RecomputedVector, task_vector
    from mergekit_rlvr.methods.dots import gamma_from_norms, keep_mask, magnitude_threshold, squared_norms
    from vllm_plugins import packed

    base32 = base.float()
    vectors = []
    for model in models:
        model32 = model.float()
        tau = task_vector(model32, base32)
        mask = keep_mask(tau, magnitude_threshold(tau, density))
        gamma = gamma_from_norms(*squared_norms(tau, mask)) if tau.numel() < (1 << 20) else 1.25
        vectors.append(RecomputedVector(model32, mask, gamma))
    return packed.pack(base32, vectors), vectors


def section_copy(args) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    seconds = timed(args.device, lambda: dst.copy_(src))
    rate = 2 * src.numel() / seconds
    print(f"copy: {rate / 1e9:.1f} GB/s (1 GiB read + written in {seconds * 1e3:.2f} ms)", flush=True)
    return rate


def section_swap(args, copy_rate: float) -> None:
    from vllm_plugins import packed

    stores, live, weight_bytes = [], [], 0
    for n, (name, shape) in enumerate(shapes(args.layers, args.vocab, args.model)):
        base, sft, rl = checkpoints(shape, args.device, n)
        store, _ = dots_store(base, [sft, rl])
        stores.append(store)
        live.append(base.clone())
        weight_bytes += base.numel() * base.element_size()
        del sft, rl
    held = sum(s.nbytes for s in stores)
    moved = held + sum(s.count * 2 for s in stores)  # read the store, write the touched bf16 entries

    def swap():
        for store, param in zip(stores, live):
            packed.scatter(store, packed.combine_packed(store, COEFFICIENTS).to(param.dtype), param)

    seconds = timed(args.device, swap)
    print(f"swap held bytes / weight bytes: {held / weight_bytes:.3f} ({held / 1e9:.2f} GB for "
          f"{weight_bytes / 1e9:.2f} GB of bf16 weights, {len(stores)} tensors)")
    print(f"swap time: {seconds * 1e3:.1f} ms; rate {moved / seconds / 1e9:.1f} GB/s = "
          f"{moved / seconds / copy_rate:.2f} x copy (goal >= 0.5)")
    section_offload(args, stores, live, held, seconds)


def section_offload(args, stores, live, held: int, resident: float) -> None:
    """The host-offload mode (``HotSwapLLM.from_recipe(offload=True)``): the same stores in
    pinned host memory, streamed to the device at each swap by the worker's own
    ``stores.InPlace.swap``."""
    from vllm_plugins.stores import InPlace

    entries = [InPlace(f"p{i}", param, store.to("pinned"), None, [0, 1])
               for i, (store, param) in enumerate(zip(stores, live))]

    def swap():
        for entry in entries:
            entry.swap(COEFFICIENTS)

    seconds = timed(args.device, swap)
    where = "pinned host memory -> GPU" if args.device == "cuda" else "host memory (no GPU: nothing is streamed)"
    print(f"offload swap time: {seconds * 1e3:.1f} ms = {seconds / resident:.2f} x the resident swap; "
          f"{held / seconds / 1e9:.1f} GB/s of held bytes streamed ({where})")


def section_equal(args) -> None:
    from mergekit_rlvr.methods.common import combine, task_vector
    from mergekit_rlvr.methods.reasoning_interp import interp_vector
    from mergekit_rlvr.methods.sar import sar_vector
    from vllm_plugins import packed

    checked, failed = 0, []
    for n, (name, shape) in enumerate(shapes(1, args.vocab, args.model)[1:13]):  # one layer
        cpu = checkpoints(shape, "cpu", n)
        dev = [t.to(args.device) for t in cpu]
        store_cpu, vectors_cpu = dots_store(cpu[0], cpu[1:])
        store_dev, _ = dots_store(dev[0], dev[1:])
        want = combine(cpu[0].float(), vectors_cpu, COEFFICIENTS)
        results = {
            "swap": (packed.merge_dense(store_dev, COEFFICIENTS, dev[0]), want),
            "swap-cpu": (packed.merge_dense(store_cpu, COEFFICIENTS, cpu[0]), want),
            "sar": (sar_vector(dev[0], dev[1:], [None, None], seed=1, name=name),
                    sar_vector(cpu[0], cpu[1:], [None, None], seed=1, name=name)),
            "interp": (combine(dev[1], [interp_vector(dev[1], dev[2])], [0.3]),
                       combine(cpu[1], [interp_vector(cpu[1], cpu[2])], [0.3])),
            "tau": (task_vector(dev[1], dev[0]), task_vector(cpu[1], cpu[0])),
        }
        for what, (got, expected) in results.items():
            checked += 1
            if not packed.same_bits(got.cpu(), expected):
                failed.append(f"{what}:{name}")
    print(f"equal device == cpu bit for bit: {checked - len(failed)}/{checked}"
          + (f" FAILED {failed[:5]}" if failed else ""))


def _run_merge(recipe: dict, out: str, device: str) -> float:
    """mergekit's run_merge in this process, what ``mergekit-yaml [--cuda]`` runs."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(cuda=device.startswith("cuda"), device=device, quiet=True, lazy_unpickle=True)
    start = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(recipe), out, options=options)
    sync(device)
    return time.perf_counter() - start


def section_merge(args) -> None:
    import shutil
    import tempfile

    try:
        from mergekit_rlvr.kernels import register_all

        register_all()
    except ImportError as error:
        print(f"merge: skipped (mergekit does not import: {error}); carry the wheels in the docstring", flush=True)
        return
    from mergekit_rlvr.toy.tiny import write_family
    from safetensors.torch import load_file
    from vllm_plugins import packed

    work = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        models = write_family(f"{work}/models", {"sft": (0.3, 1.0), "rl": (0.01, 0.3)}, dtype=torch.bfloat16,
                              hidden=args.model["hidden"], intermediate=args.model["intermediate"],
                              layers=args.merge_layers, num_attention_heads=args.model["heads"],
                              num_key_value_heads=args.model["kv_heads"])
        entries = [{"model": models["sft"], "parameters": {"weight": COEFFICIENTS[0]}},
                   {"model": models["rl"], "parameters": {"weight": COEFFICIENTS[1]}}]
        recipes = {"task_arithmetic": {"merge_method": "task_arithmetic", "models": entries},
                   "dots": {"merge_method": "dots", "models": entries, "parameters": {"density": 0.3}},
                   "sar": {"merge_method": "sar", "models": [{"model": e["model"]} for e in entries]}}
        seconds = {}
        for method, recipe in recipes.items():
            recipe = {**recipe, "base_model": models["base"], "dtype": "bfloat16"}
            for device in ([args.device, "cpu"] if method != "task_arithmetic" else [args.device]):
                out = f"{work}/{method}-{device}"
                times = [_run_merge(recipe, out, device) for _ in range(2)]
                seconds[method, device] = min(times)
            print(f"merge {method}: {seconds[method, args.device]:.2f} s on {args.device}", flush=True)
            if method != "task_arithmetic" and args.device != "cpu":
                a, b = (load_file(f"{work}/{method}-{d}/model.safetensors") for d in (args.device, "cpu"))
                same = sum(packed.same_bits(a[k], b[k]) for k in b)
                print(f"merge {method} --cuda == cpu bit for bit: {same}/{len(b)} tensors", flush=True)
        print(f"merge dots / task_arithmetic on {args.device}: "
              f"{seconds['dots', args.device] / seconds['task_arithmetic', args.device]:.2f} (goal <= 1.3)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", choices=sorted(SHAPES), help="tensor shapes: 7b (GPU default) or 0.5b (CPU)")
    parser.add_argument("--layers", type=int, help="default: 28 (Qwen2.5-7B) on a GPU, 1 on a CPU")
    parser.add_argument("--vocab", type=int, help=f"default: {QWEN_7B['vocab']} on a GPU, 4096 on a CPU")
    parser.add_argument("--merge-layers", type=int, help="layers of the on-disk merge checkpoints (4 / 1)")
    parser.add_argument("--only", nargs="*", default=["copy", "swap", "equal", "merge"])
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.model = SHAPES[args.shapes or ("7b" if gpu else "0.5b")]
    args.layers = args.layers or (28 if gpu else 1)
    args.vocab = args.vocab or (QWEN_7B["vocab"] if gpu else 4096)
    args.merge_layers = args.merge_layers or (4 if gpu else 1)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"gpu_check: torch {torch.__version__} on {name}, {args.shapes or ('7b' if gpu else '0.5b')} shapes, "
          f"{args.layers} layers, vocab {args.vocab}", flush=True)
    torch.set_grad_enabled(False)
    copy_rate = section_copy(args) if "copy" in args.only or "swap" in args.only else None
    if "swap" in args.only:
        section_swap(args, copy_rate)
    if "equal" in args.only:
        section_equal(args)
    if "merge" in args.only:
        section_merge(args)


if __name__ == "__main__":
    main()
