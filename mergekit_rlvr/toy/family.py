"""Build (or reuse) the toy family: base -> sft (task K) and base -> rl (task R).

    fam = build_family("toy-family", FamilySettings())
    fam.paths            # {"base": ..., "sft": ..., "rl": ...}
    fam.eval_sets        # {"K": [Example], "R": [Example]}, held out
    fam.pool             # unlabeled queries (Example; use .prompt only)

Each stage is cached under ``OUT``: a stamp file records the hash of the
settings the stage depends on (the base's for sft and rl), so a second call with
the same settings reuses every checkpoint, and changing, e.g., only the RL
settings retrains only rl. Checkpoints are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Dict, List, Optional

import torch

from mergekit_rlvr.toy import tasks
from mergekit_rlvr.toy.lm import exists, load_model, make_config, save_model, set_threads

#: bump when training code changes in a way that changes the weights
TRAINING_VERSION = 1
STAGES = ("base", "sft", "rl")


@dataclass(frozen=True)
class FamilySettings:
    seed: int = 0
    # model (Qwen2-shaped; head_dim 64 for vLLM CPU)
    hidden: int = 128
    layers: int = 2
    intermediate: int = 256
    # pretraining corpus and schedule
    careless: float = 0.6
    pretrain_steps: int = 700
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    # SFT on task K
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 1e-3
    sft_replay: float = 0.5  # share of pretraining text in each SFT batch
    # GRPO on task R
    rl_steps: int = 60
    rl_prompts: int = 16
    rl_group: int = 8
    rl_lr: float = 0.05
    #: plain SGD: the update follows the policy gradient without Adam's per-entry
    #: normalization, small and concentrated like the papers' RLVR updates
    rl_optimizer: str = "sgd"
    # data
    eval_size: int = 200
    pool_size: int = 200
    #: torch threads. 1 by default: the weights are bit-reproducible only for a fixed
    #: thread count, and on a shared 2-core machine 2 threads ran ~10x slower than 1
    threads: int = 1

    def stage_settings(self, stage: str) -> dict:
        model = {k: getattr(self, k) for k in ("seed", "hidden", "layers", "intermediate")}
        base = dict(model, careless=self.careless, steps=self.pretrain_steps, batch=self.pretrain_batch,
                    lr=self.pretrain_lr, version=TRAINING_VERSION)
        if stage == "base":
            return base
        if stage == "sft":
            return dict(base=base, steps=self.sft_steps, batch=self.sft_batch, lr=self.sft_lr,
                        replay=self.sft_replay)
        if stage == "rl":
            return dict(base=base, steps=self.rl_steps, prompts=self.rl_prompts, group=self.rl_group,
                        lr=self.rl_lr, optimizer=self.rl_optimizer)
        raise ValueError(stage)

    def stage_hash(self, stage: str) -> str:
        text = json.dumps(self.stage_settings(stage), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict) -> "FamilySettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            from mergekit_rlvr.errors import UserError

            raise UserError(f"unknown toy-family setting(s): {', '.join(unknown)}")
        return cls(**values)


@dataclass
class Family:
    out: str
    settings: FamilySettings
    paths: Dict[str, str]
    eval_sets: Dict[str, List[tasks.Example]]
    pool: List[tasks.Example]
    trained: List[str] = field(default_factory=list)  # stages trained by this call
    info: dict = field(default_factory=dict)

    @property
    def pool_path(self) -> str:
        """JSONL of the unlabeled pool (``prompt``; ``answer`` only for reports)."""
        return os.path.join(self.out, "data", "pool.jsonl")

    @property
    def eval_paths(self) -> Dict[str, str]:
        return {name: os.path.join(self.out, "data", f"eval_{name}.jsonl") for name in self.eval_sets}


def _stamp_path(out: str, stage: str) -> str:
    return os.path.join(out, "stamps", f"{stage}.json")


def _read_stamp(out: str, stage: str) -> Optional[dict]:
    try:
        with open(_stamp_path(out, stage)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _write_jsonl(path: str, examples) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for e in examples:
            f.write(json.dumps(e.to_json()) + "\n")
    os.replace(tmp, path)


def cached(out: str, settings: FamilySettings, stage: str) -> bool:
    stamp = _read_stamp(out, stage)
    return bool(stamp) and stamp.get("hash") == settings.stage_hash(stage) and exists(os.path.join(out, stage))


class _Progress:
    """A stage's progress bar, called by the training loop with (step, value); keeps the values."""

    def __init__(self, total: int, desc: str, show: bool, key: str = "loss", form: str = ".3f"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not show, leave=False, mininterval=1.0)
        self.key, self.form, self.values = key, form, []

    def __call__(self, step: int, value: float) -> None:
        self.values.append(value)
        self.bar.update(1)
        self.bar.set_postfix({self.key: f"{value:{self.form}}"}, refresh=False)

    def last_mean(self) -> float:
        """The mean of the last 20 values (the loss a stage ended at)."""
        return sum(self.values[-20:]) / max(1, len(self.values[-20:]))


def _train_stage(stage: str, settings: FamilySettings, streams: tasks.TrainStreams, out: str, show: bool) -> dict:
    from mergekit_rlvr.toy.grpo import grpo
    from mergekit_rlvr.toy.pretrain import pretrain
    from mergekit_rlvr.toy.sft import sft

    s = settings
    start = time.perf_counter()
    log: dict = {}
    if stage == "base":
        progress = _Progress(s.pretrain_steps, "pretrain base", show)
        model = pretrain(make_config(s.hidden, s.layers, s.intermediate), streams, s.pretrain_steps,
                         batch=s.pretrain_batch, lr=s.pretrain_lr, seed=s.seed, progress=progress)
        log["loss_last"] = progress.last_mean()
    elif stage == "sft":
        progress = _Progress(s.sft_steps, "sft on task K", show)
        model = sft(load_model(os.path.join(out, "base")), streams, s.sft_steps, batch=s.sft_batch, lr=s.sft_lr,
                    seed=s.seed, replay=s.sft_replay, progress=progress)
        log["loss_last"] = progress.last_mean()
    else:
        progress = _Progress(s.rl_steps, "grpo on task R", show, key="reward", form=".2f")
        model, history = grpo(load_model(os.path.join(out, "base")), streams, s.rl_steps, prompts=s.rl_prompts,
                              group=s.rl_group, lr=s.rl_lr, seed=s.seed, optimizer=s.rl_optimizer,
                              progress=progress)
        log["reward"] = history
    progress.bar.close()
    save_model(model, os.path.join(out, stage))
    log["seconds"] = round(time.perf_counter() - start, 2)
    return log


def update_stats(out: str) -> dict:
    """Measures of each task vector over all tensors: global L2 norm, share of
    entries with |update| > 1e-5 (paper 002's count) and share of entries that
    hold 90% of the squared norm (how concentrated the update is)."""
    from safetensors.torch import load_file

    base = load_file(os.path.join(out, "base", "model.safetensors"))
    stats = {}
    for name in ("sft", "rl"):
        model = load_file(os.path.join(out, name, "model.safetensors"))
        tau = torch.cat([(model[k].double() - v.double()).reshape(-1) for k, v in base.items()])
        energy = tau.square().sort(descending=True).values.cumsum(0)
        energy90 = (int((energy < 0.9 * energy[-1]).sum()) + 1) / tau.numel() if float(energy[-1]) > 0 else 0.0
        stats[name] = {"l2": float(tau.norm()), "changed_share": float((tau.abs() > 1e-5).double().mean()),
                       "energy90_share": energy90}
    stats["norm_ratio_sft_over_rl"] = stats["sft"]["l2"] / max(stats["rl"]["l2"], 1e-30)
    return stats


def build_family(out: str, settings: Optional[FamilySettings] = None, show_progress: bool = True,
                 log: Optional[Callable[[str], None]] = None) -> Family:
    """Train what is missing or stale, reuse the rest; write eval sets and pool."""
    settings = settings or FamilySettings()
    say = log or (lambda msg: None)
    os.makedirs(out, exist_ok=True)
    set_threads(settings.threads)
    streams = tasks.TrainStreams(settings.seed, settings.careless)
    trained, logs = [], {}
    for stage in STAGES:
        if cached(out, settings, stage):
            say(f"{stage}: cached ({os.path.join(out, stage)})")
            continue
        say(f"{stage}: training")
        logs[stage] = _train_stage(stage, settings, streams, out, show_progress)
        _write_json(_stamp_path(out, stage), {"hash": settings.stage_hash(stage),
                                               "settings": settings.stage_settings(stage), "log": logs[stage]})
        trained.append(stage)
        say(f"{stage}: trained in {logs[stage]['seconds']:.1f} s")
    sets = tasks.eval_sets(settings.eval_size, settings.seed)
    pool = tasks.query_pool(settings.pool_size, settings.seed)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    for name, examples in sets.items():
        _write_jsonl(os.path.join(out, "data", f"eval_{name}.jsonl"), examples)
    _write_jsonl(os.path.join(out, "data", "pool.jsonl"), pool)
    info = {"settings": asdict(settings),
            "seconds": {s: (_read_stamp(out, s) or {}).get("log", {}).get("seconds") for s in STAGES},
            "updates": update_stats(out) if trained or not os.path.exists(os.path.join(out, "family.json"))
            else _old_updates(out)}
    _write_json(os.path.join(out, "family.json"), info)
    paths = {s: os.path.join(out, s) for s in STAGES}
    return Family(out, settings, paths, sets, pool, trained, info)


def _old_updates(out: str) -> dict:
    try:
        with open(os.path.join(out, "family.json")) as f:
            return json.load(f)["updates"]
    except (OSError, ValueError, KeyError):
        return update_stats(out)


def dots_recipe(paths: Dict[str, str], l_sft: float, l_rl: float, density: float = 0.3,
                dtype: str = "float32") -> dict:
    """A mergekit recipe for theta_base + l_sft * tau~_sft + l_rl * tau~_rl."""
    return {
        "merge_method": "dots",
        "base_model": paths["base"],
        "models": [
            {"model": paths["sft"], "parameters": {"weight": float(l_sft), "density": density}},
            {"model": paths["rl"], "parameters": {"weight": float(l_rl), "density": density}},
        ],
        "parameters": {"rescale": "global"},
        "dtype": dtype,
    }
