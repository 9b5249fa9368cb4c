"""Speed and memory of `mergekit-rlvr analyze` on generated models of >= 1 GB each.

Writes a base and two models (bf16 safetensors of random tensors with Llama-like
names: a dense "sft" update and a sparse "rl" update), then, in one run and each in
its own child process:

  read     - only reads every tensor of the three checkpoints (the same row slices,
             each copied into memory with pread: what reading the files costs; the goal's
             unit)
  map      - only makes the analysis' own read-only mappings of those slices (the pages
             mapped, not touched: what the analysis itself spends on reading)
  analyze  - the full analysis (sample pre-pass, pass 1, pass 2 only if the sample
             missed a threshold's bin, pass 3; report dictionary, no files) on --device
             (cpu; cuda runs the torch kernels on a GPU), with each set of kernels:
             native  - the default on CPU: the C loops of analysis/cpu_kernels.c
             compiled - the torch kernels fused by torch.compile (cold, then with its
                        caches warm; the default on CUDA)
             eager   - the torch kernels as they are (MERGEKIT_RLVR_NATIVE=0 --no-compile)

and prints seconds (wall and CPU), throughput (model parameters per second), the
analysis/read ratios against the goal (<= 5x the read on CPU), and each child's peak RSS above its RSS after imports, against the model
size and the largest tensor (float32).

    .venv/bin/python bench/analyze_speed.py [--layers 9] [--dir DIR] [--keep] [--device cpu|cuda|auto]
                                            [--no-eager] [--no-compiled] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def shapes(layers: int):
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (HIDDEN // 4, HIDDEN),
            p + "self_attn.v_proj.weight": (HIDDEN // 4, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        })
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def write_streaming(path: str, tensors, names_shapes) -> None:
    """A bf16 safetensors file written tensor by tensor (header first), so that
    generating it holds one tensor in memory."""
    import torch

    header, offset = {}, 0
    for name, shape in names_shapes.items():
        size = 2 * int(math.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path + ".tmp", "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name, tensor in tensors:
            handle.write(tensor.contiguous().view(torch.int16).numpy().tobytes())
    os.replace(path + ".tmp", path)


def generate(root: str, layers: int) -> dict:
    import torch

    layout = shapes(layers)
    paths = {k: os.path.join(root, k) for k in ("base", "sft", "rl")}
    if all(os.path.exists(os.path.join(p, "model.safetensors")) for p in paths.values()):
        return paths
    for p in paths.values():
        os.makedirs(p, exist_ok=True)

    def stream(kind):
        g = torch.Generator().manual_seed(0)
        for name, shape in layout.items():
            base = torch.randn(shape, generator=g) * 0.02
            if name.endswith("norm.weight"):
                base += 1.0
            if kind == "base":
                yield name, base.to(torch.bfloat16)
                continue
            h = torch.Generator().manual_seed(zlib.crc32(f"{kind}:{name}".encode()))
            if kind == "sft":
                delta = torch.randn(shape, generator=h) * 0.002
            else:
                delta = torch.randn(shape, generator=h) * 0.0002 * (torch.rand(shape, generator=h) < 0.3)
            yield name, (base + delta).to(torch.bfloat16)

    for kind, path in paths.items():
        write_streaming(os.path.join(path, "model.safetensors"), stream(kind), layout)
    return paths


CHILD = r"""
import json, os, sys, time
mode, device, base, models = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
import torch
from mergekit_rlvr.analysis import stream as S
def status(key):  # /proc: VmHWM starts afresh at exec (ru_maxrss would keep the parent's peak)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
after_import = status("VmRSS")
start = time.perf_counter()
cpu = time.process_time()
if mode == "raw":  # plain sequential reads of the files
    n = 0
    buf = bytearray(64 << 20)
    for path in (base, *models):
        with open(os.path.join(path, "model.safetensors"), "rb", buffering=0) as handle:
            while True:
                got = handle.readinto(buf)
                if not got:
                    break
                n += got
    result = {"bytes": n}
elif mode in ("read", "map"):  # every chunk of every tensor, once: copied (pread) or mapped
    b = S.Source(base, mode == "map"); ms = [S.Source(m, mode == "map") for m in models]
    plan = S.plan(b, ms)
    n = 0
    for name, bt, mts in S.chunks(plan, b, ms):
        n += bt.numel()
    result = {"parameters": n}
else:  # "native" (the default kernels), "compiled" (torch.compile, compile time included) or "eager"
    compile = {"native": None, "compiled": True, "eager": False}[mode]
    report = S.analyze(base, models, progress=False, compile=compile, device=device)
    result = {"parameters": report["parameters"], "norm_ratio": report["pairs"][0]["norm_ratio"],
              "sign_conflict": report["pairs"][0]["sign_conflict"]}
result.update(seconds=time.perf_counter() - start, cpu=time.process_time() - cpu, rss_after_import=after_import, peak_rss=status("VmHWM"))
print(json.dumps(result))
"""


def child(mode: str, paths: dict, device: str = "cpu") -> dict:
    env = dict(os.environ, MERGEKIT_RLVR_NATIVE="0") if mode == "eager" else None
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, device, paths["base"], paths["sft"], paths["rl"]],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(runs):
    """The fastest run, with the least CPU time of all (each is a lower bound of the run's cost)."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["cpu"] = min(r["cpu"] for r in runs)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=9, help="decoder layers (9 -> 1.07 GB per model in bf16)")
    parser.add_argument("--dir", default=None, help="where to write the models (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--device", default="cpu", help="where analyze runs its kernels: cpu, cuda or auto")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager run (minutes on a loaded machine)")
    parser.add_argument("--no-compiled", action="store_true", help="skip the two torch.compile runs")
    parser.add_argument("--repeat", type=int, default=3, help="read and native runs, interleaved (best of each)")
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="analyze-bench-")
    try:
        t0 = time.perf_counter()
        paths = generate(root, args.layers)
        size = os.path.getsize(os.path.join(paths["sft"], "model.safetensors"))
        layout = shapes(args.layers)
        largest = max(int(math.prod(s)) for s in layout.values())
        print(f"models: 3 x {size / 1e9:.2f} GB bf16 ({size // 2 / 1e6:.0f}M parameters each), "
              f"generated in {time.perf_counter() - t0:.0f} s; largest tensor {largest / 1e6:.1f}M entries "
              f"({4 * largest / 1e6:.0f} MB as float32)")
        raw = child("raw", paths)
        mapped = min((child("map", paths) for _ in range(2)), key=lambda r: r["seconds"])
        reads, natives = [], []
        for _ in range(max(1, args.repeat)):  # interleaved: a shared machine's load hits both alike
            reads.append(child("read", paths))
            natives.append(child("native", paths, args.device))
        full = None if args.no_compiled else child("compiled", paths, args.device)
        warm = None if args.no_compiled else child("compiled", paths, args.device)  # torch.compile's caches warm
        eager = None if args.no_eager else child("eager", paths, args.device)
        reads.append(child("read", paths))  # page-cache state on both sides of the analysis
        read, native = _best(reads), _best(natives)
        read_s, read_cpu = read["seconds"], max(read["cpu"], 1e-9)
        n = native["parameters"]
        print(f"raw read  : {raw['seconds']:7.2f} s wall {raw['cpu']:7.2f} s cpu  "
              f"{raw['bytes'] / raw['seconds'] / 1e9:6.2f} GB/s (3 files)")
        print(f"read only : {read_s:7.2f} s wall {read_cpu:7.2f} s cpu  {n / read_s / 1e6:8.1f} M params/s "
              f"(the row slices copied with pread; best of {len(reads)}: "
              f"{', '.join('%.2f' % r['seconds'] for r in reads)} s)")
        print(f"mapped    : {mapped['seconds']:7.2f} s wall {mapped['cpu']:7.2f} s cpu  (the analysis' own reading: "
              f"read-only mappings of the same slices, pages mapped, not touched)")
        label = "native C" if args.device == "cpu" else f"default ({args.device})"
        for label, r in ((f"{label} (best of {len(natives)})", native), ("torch compiled (cold)", full),
                         ("torch compiled (warm)", warm), ("torch eager", eager)):
            if r is None:
                continue
            print(f"analyze {label:21s}: {r['seconds']:7.2f} s wall {r['cpu']:7.2f} s cpu  "
                  f"{n / r['seconds'] / 1e6:6.1f} M params/s; analyze/read {r['seconds'] / read_s:5.1f}x wall, "
                  f"{r['cpu'] / read_cpu:5.1f}x cpu")
        wall, cpu = native["seconds"] / read_s, native["cpu"] / read_cpu
        print(f"goal: analyze <= 5x the read on CPU, default kernels: {wall:.1f}x wall "
              f"({'met' if wall <= 5 else 'NOT met'}), {cpu:.1f}x cpu time ({'met' if cpu <= 5 else 'NOT met'})")
        print(f"machine load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared)")
        for name, r in (("read", read), ("native", native), ("compiled", warm), ("eager", eager)):
            if r is None:
                continue
            extra = r["peak_rss"] - r["rss_after_import"]
            print(f"peak RSS {name:8s}: {r['peak_rss'] / 1e6:7.0f} MB, {extra / 1e6:6.0f} MB above the "
                  f"{r['rss_after_import'] / 1e6:.0f} MB after imports = {extra / size:.3f} x model size, "
                  f"{extra / (4 * largest):.2f} x largest float32 tensor")
        for name, r in (("native", native), ("compiled", warm), ("eager", eager)):
            if r is not None:
                print(f"check {name:8s}: norm ratio sft/rl {r['norm_ratio']:.6f}, sign conflict {r['sign_conflict']:.6f}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
