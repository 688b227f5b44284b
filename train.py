"""The Xmodel-2.5 trainer: a Warmup-Stable-Decay curriculum, end to end, on one CPU or many GPUs.

    python train.py configs/proxy20m.py [--key=value ...]                    # laptop CPU, minutes
    torchrun --nproc_per_node=8 train.py configs/xmodel25.py                 # the 1.3B run
    python train.py --help                                                   # every config key

The curriculum is data: `phases` in the config, each a number of steps with an LR shape, a global batch
(sequences), a sequence length, a data mixture and an optimizer. Xmodel-2.5's (RECIPE.md) is:

    warmup   2k steps   LR 0 -> peak        480 x 3712     stable mix    AdamW
    stable1  268k       peak                480 x 3712     stable mix    AdamW
    stable2  260k       peak                960 x 3712     stable mix    AdamW
    decay    20k        exp. to peak/16     960 x 3712     decay mix     Muon   <- the optimizer switch
    long     10k        back up, linear     480 x 8192, then 240 x 16384 decay mix  Muon

Why WSD: a constant LR for most of the run keeps the model "unfinished" but cheap to continue (more data
can be appended at any time), and a short decay at the end collects most of the loss improvement; the
decay is where the data mix moves to high-quality SFT data and, in Xmodel-2.5, where AdamW hands the
hidden matrices to Muon (`muon.Optimizers.use`).

Each step: the global batch is split into micro-batches x gradient accumulation x data-parallel ranks
(recomputed whenever a phase changes the batch or the sequence length); the learning rate of every μP
group is its peak times the schedule's factor; gradients are clipped to norm 1.0. The loop does not wait
on the device except at logging steps: the loss and a "first bad step" marker stay on the device and are
read every `log_interval` steps, and before each checkpoint, so a NaN stops the run naming its step
without ever being written into a checkpoint.

Nothing is lost to a late error: the whole curriculum is checked against the data before step 1; the last
checkpoint is written before the final evaluation; checkpoints are written atomically with a sha256 beside
them (verified on load), only with finite weights, by one run at a time (a lock on out_dir); SIGTERM or
SIGUSR1 (how SLURM and Kubernetes announce preemption) ends the current step, writes a checkpoint and exits 0.
"""
import ast
import fcntl
import hashlib
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
import mup
from model import ModelConfig
from muon import Optimizers


@dataclass
class TrainConfig:
    out_dir: str = "out/run"           # checkpoints, metrics.jsonl, config.json, loss.png
    device: str = "auto"               # auto | cpu | cuda | mps (auto: CUDA, else Apple MPS, else CPU)
    dtype: str = "auto"                # auto | float32 | bfloat16 (autocast; master weights stay fp32)
    seed: int = 0                      # model init and data order (data is a pure function of seed and step)
    max_steps: int = 0                 # stop after this many steps (with a checkpoint); 0 = whole curriculum
    compile: bool = False              # torch.compile each block
    resume: bool = False               # continue from the latest checkpoint in out_dir
    init_from: str = ""                # start from these weights (a checkpoint or run dir), at step 0
    allow_tokenizer_change: bool = False  # resume/init_from a checkpoint trained with another tokenizer
    dry_run: bool = False              # print the plan and its cost, allocate nothing, need no device
    verbose: bool = False              # also print the whole effective config
    # optimizer (μP base rates, at width base_width)
    lr: float = 0.01                   # base LR of the hidden matrices (they get lr / m)
    emb_lr: float = 0.01               # LR of the embedding and the norm weights
    weight_decay: float = 0.1          # AdamW / Muon decoupled weight decay (none on norms)
    beta1: float = 0.9                 # AdamW beta1
    beta2: float = 0.95                # AdamW beta2
    adam_eps: float = 1e-8             # AdamW epsilon
    grad_clip: float = 1.0             # clip the global gradient norm to this (> 0; inf = no clipping)
    muon_momentum: float = 0.95        # Muon (Nesterov) momentum
    muon_rms_scale: float = 0.2        # Muon update RMS = muon_rms_scale (matches AdamW's update RMS)
    muon_ns_steps: int = 5             # Newton-Schulz iterations per Muon step
    hidden_optimizer: str = ""         # if set (adamw | muon), every phase's optimizer: e.g. the AdamW-only ablation
    zero1: bool = False                # shard optimizer state across ranks (ZeroRedundancyOptimizer)
    micro_batch: int = 8               # sequences per rank per forward (a phase may set its own)
    # data
    tokenizer: str = "deepseek-v3"     # or a tokenizer.json path, tiktoken:NAME, a .tiktoken file
    data: typing.Optional[dict] = None  # {source: prepared dataset dir or raw .txt/.jsonl/dir}; None = embedded corpus
    data_cache: str = ""               # where raw text and the default corpus are prepared ("" = data.py's default)
    mixtures: dict = field(default_factory=lambda: {"stable": {"prose": 0.5, "code": 0.5}})  # {name: {source: weight}}
    eval_mix: str = "stable"           # the mixture held-out loss is measured on
    phases: list = field(default_factory=list)  # the curriculum: a list of phase dicts (see the README)
    # logging, evaluation, checkpoints
    log_interval: int = 10             # steps per logged row (loss = mean over the steps in the interval)
    log_to: list = field(default_factory=lambda: ["jsonl"])  # jsonl (always) and any of tensorboard, wandb
    wandb_project: str = "xmodel25"    # the W&B project (WANDB_MODE=offline works without a network)
    eval_interval: int = 0             # steps between held-out evaluations (0 = only at the end)
    eval_windows: int = 40             # held-out windows per evaluation
    eval_batch: int = 8                # windows per evaluation forward
    sample_tokens: int = 48            # tokens sampled at the end of the run (0 = none)
    ckpt_interval: int = 0             # steps between checkpoints (0 = only at the end / at max_steps)
    keep_checkpoints: int = 3          # the newest K checkpoints are kept
    dist_timeout_s: int = 300          # a dead or hung rank fails the job after this long
    ckpt_timeout_s: int = 3600         # how long the other ranks wait for rank 0 to write a checkpoint
    # dry-run cost model
    gpus: int = 0                      # the data-parallel size the dry run plans for (0 = the current one)
    gpu_peak_tflops: float = 989.0     # the GPU's dense bf16 peak (H100 SXM)
    mfu: float = 0.4                   # the model-FLOPs utilization the dry run assumes


# ModelConfig keys that change how the model is computed, not what it is: a resume may change them
EXECUTION_KEYS = ("act_ckpt", "loss_chunk", "fp8_backend")
LR_SHAPES = ("linear", "constant", "exp")
OPTIMIZERS = ("adamw", "muon")
PHASE_KEYS = {"name", "steps", "lr", "batch", "seq_len", "mix", "optimizer", "micro_batch"}
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16")


# ----------------------------------------------------------------------------------------------------
# the machine: which device, which precision

def cpu_has_native_bf16() -> bool:
    """True where oneDNN has bf16 kernels for this CPU (AVX512-BF16 or AMX). Elsewhere (AVX2-only CPUs) a
    bf16 GEMM is emulated and runs about 8x slower than fp32, so bf16 autocast would slow training down."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_device(device: str = "auto") -> tuple[str, str]:
    """'auto' -> CUDA, else Apple MPS, else CPU (nanochat's order). Returns (device, the reason, for the log).
    MPS is chosen but never tested here (no Apple machine in CI): it runs the plain eager path."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda", f"device auto -> cuda ({torch.cuda.get_device_name()})"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps", "device auto -> mps (Apple GPU; an untested path)"
        return "cpu", f"device auto -> cpu (no CUDA or MPS device; {torch.backends.cpu.get_cpu_capability()})"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device': cuda requested but torch.cuda.is_available() is False "
                         "(device=auto picks what this machine has)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError("config key 'device': mps requested but torch.backends.mps.is_available() is False")
    return device, f"device {device} (as configured)"


def resolve_dtype(dtype: str, device: str) -> tuple[str, str]:
    """'auto' -> bfloat16 where the hardware runs it natively (CUDA with bf16 support, CPUs with AVX512-BF16
    or AMX), else float32. An explicit bfloat16 is kept, with a warning where it is emulated."""
    if device == "cuda":
        native, why = torch.cuda.is_bf16_supported(), "this GPU"
    elif device == "cpu":
        native, why = cpu_has_native_bf16(), f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
    else:
        native, why = False, f"{device} (bf16 autocast not relied on)"
    if dtype == "auto":
        if native:
            return "bfloat16", f"dtype auto -> bfloat16: {why} has native bf16 kernels"
        return "float32", (f"dtype auto -> float32: {why} has no native bf16 kernels; bf16 would be about 8x "
                           f"slower" if device == "cpu" else f"dtype auto -> float32: {why}")
    if dtype == "bfloat16" and not native:
        return dtype, (f"warning: dtype bfloat16 as configured, but {why} has no native bf16 kernels: expect it "
                       f"to run several times slower than --dtype=float32")
    return dtype, f"dtype {dtype} (as configured)"


def resolve_machine(device: str = "auto", dtype: str = "auto", say=print) -> tuple[str, str]:
    """Both choices, printed with their reasons: what train.py and every tool call first."""
    device, why_device = resolve_device(device)
    dtype, why_dtype = resolve_dtype(dtype, device)
    say(why_device)
    say(why_dtype)
    return device, dtype


# ----------------------------------------------------------------------------------------------------
# configuration: a Python file of assignments, then --key=value overrides

USAGE = """usage: python train.py [CONFIG.py] [--key=value ...] [--phase.NAME.KEY=value ...]
       torchrun --nproc_per_node=N train.py CONFIG.py [...]

A config is a Python file of assignments (configs/proxy20m.py, configs/xmodel25.py). Any key below can be
overridden as --key=value (a Python literal; --flag alone means True) and any key of one phase of the
curriculum as --phase.NAME.KEY=value (e.g. --phase.decay.optimizer=adamw). Phase keys: name, steps,
lr=(shape, start, end) with shape linear|constant|exp, batch (global, sequences), seq_len, mix, optimizer
(adamw|muon) and optionally micro_batch. --dry_run prints the plan and its cost on any machine."""


def _check_type(key, value, tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, typing.get_origin(tp) or tp):
        raise ValueError(f"config key {key!r}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def parse_value(s: str):
    """A command-line value: a Python literal, true/false, or else the string itself."""
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(s.lower(), s)


def config_help() -> str:
    """--help: every key of TrainConfig and ModelConfig with its default and the comment beside its field
    (the dataclasses are the one source of truth)."""
    lines = [USAGE]
    for cls, title in ((TrainConfig, "training keys (train.TrainConfig)"), (ModelConfig, "model keys (model.ModelConfig)")):
        notes = dict(re.findall(r"^\s+(\w+):[^\n#]*#\s*(.+)$", inspect.getsource(cls), re.M))
        lines += ["", title + ":"]
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            shown = repr(default) if len(repr(default)) <= 24 else "(see the config)"
            lines.append(f"  --{f.name}={shown}".ljust(44) + notes.get(f.name, ""))
    return "\n".join(lines)


def load_config(argv: list[str]) -> dict:
    """argv = [CONFIG.py] [--key=value ...] [--phase.NAME.KEY=value ...] -> {"train": TrainConfig, "model": ModelConfig}."""
    train_types = typing.get_type_hints(TrainConfig)
    model_types = typing.get_type_hints(ModelConfig)
    values: dict = {}
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        if not os.path.isfile(path):
            raise ValueError(f"config file not found: {path}")
        scope: dict = {}
        try:
            exec(compile(open(path).read(), path, "exec"), scope)
        except Exception as e:
            raise ValueError(f"config file {path}: {type(e).__name__}: {e}") from None
        values.update({k: v for k, v in scope.items() if not k.startswith("_")
                       and not isinstance(v, type(os)) and not callable(v)})
    phase_overrides = []
    for a in args:
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r} (options are --key=value; see --help)")
        key, eq, raw = a[2:].partition("=")
        value = parse_value(raw) if eq else True
        if key.startswith("phase."):
            phase_overrides.append((key, value))
        else:
            values[key] = value
    for key in values:
        if key not in train_types and key not in model_types:
            raise ValueError(f"unknown config key {key!r} (python train.py --help lists them)")
    tcfg = TrainConfig(**{k: _check_type(k, v, train_types[k]) for k, v in values.items() if k in train_types})
    mcfg = ModelConfig(**{k: _check_type(k, v, model_types[k]) for k, v in values.items() if k in model_types})
    tcfg.phases = [dict(p) for p in tcfg.phases]
    for key, value in phase_overrides:  # --phase.decay.optimizer=adamw
        _, name, pkey = (key.split(".", 2) + ["", ""])[:3]
        hits = [p for p in tcfg.phases if p.get("name") == name]
        if not hits or pkey not in PHASE_KEYS:
            raise ValueError(f"config override --{key}: no phase named {name!r} or unknown phase key {pkey!r}")
        hits[0][pkey] = value
    if tcfg.hidden_optimizer:
        if tcfg.hidden_optimizer not in OPTIMIZERS:
            raise ValueError(f"config key 'hidden_optimizer': one of {OPTIMIZERS}, got {tcfg.hidden_optimizer!r}")
        for p in tcfg.phases:
            p["optimizer"] = tcfg.hidden_optimizer
    validate(tcfg, mcfg)
    return {"train": tcfg, "model": mcfg}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# (key, test, what it must be): every number of TrainConfig has a range; a negative LR or clip is refused
_RANGES = [
    (("lr", "emb_lr", "adam_eps", "muon_rms_scale", "gpu_peak_tflops"), lambda v: math.isfinite(v) and v > 0,
     "a finite number > 0"),
    (("weight_decay",), lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    (("beta1", "beta2", "muon_momentum"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("grad_clip",), lambda v: v > 0, "> 0 (inf = no clipping)"),
    (("mfu",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("micro_batch", "log_interval", "eval_windows", "eval_batch", "keep_checkpoints", "muon_ns_steps",
      "dist_timeout_s", "ckpt_timeout_s"), lambda v: v > 0, "a positive integer"),
    (("max_steps", "eval_interval", "ckpt_interval", "sample_tokens", "gpus", "seed"), lambda v: v >= 0,
     "an integer >= 0"),
]


def validate(cfg: TrainConfig, mcfg: ModelConfig | None = None) -> None:
    """Everything that can be checked without the data: choices, the range of every number, every phase."""
    for key, choices in (("device", DEVICES), ("dtype", DTYPES)):
        if getattr(cfg, key) not in choices:
            raise ValueError(f"config key {key!r}: one of {choices}, got {getattr(cfg, key)!r}")
    for keys, ok, what in _RANGES:
        for k in keys:
            v = getattr(cfg, k)
            if not _number(v) or (isinstance(v, float) and math.isnan(v)) or not ok(v):
                raise ValueError(f"config key {k!r} must be {what}, got {v!r}")
    if not (isinstance(cfg.log_to, list) and set(cfg.log_to) <= set(LOG_SINKS)):
        raise ValueError(f"config key 'log_to': a list of {LOG_SINKS}, got {cfg.log_to!r}")
    if not cfg.phases:
        raise ValueError("config key 'phases': the curriculum is empty")
    if cfg.eval_mix not in cfg.mixtures:
        raise ValueError(f"config key 'eval_mix': {cfg.eval_mix!r} is not in mixtures {sorted(cfg.mixtures)}")
    for name, mix in cfg.mixtures.items():
        if not isinstance(mix, dict) or not mix or not all(_number(w) and math.isfinite(w) and w >= 0 for w in mix.values()) \
                or sum(mix.values()) <= 0:
            raise ValueError(f"config key 'mixtures': {name!r} must map sources to finite weights >= 0, not all 0; "
                             f"got {mix!r}")
    names = [p.get("name") for p in cfg.phases]
    if len(set(names)) != len(names):
        raise ValueError(f"config key 'phases': phase names must be unique, got {names}")
    for i, p in enumerate(cfg.phases):
        where = f"phases[{i}] ({p.get('name', '?')})"
        missing = PHASE_KEYS - {"micro_batch"} - set(p)
        if missing or set(p) - PHASE_KEYS:
            raise ValueError(f"{where}: missing keys {sorted(missing)} / unknown keys {sorted(set(p) - PHASE_KEYS)}")
        for k in ("steps", "batch", "seq_len") + (("micro_batch",) if "micro_batch" in p else ()):
            if not isinstance(p[k], int) or isinstance(p[k], bool) or p[k] <= 0:
                raise ValueError(f"{where}: {k} must be a positive integer, got {p[k]!r}")
        lr = p["lr"]
        if not (isinstance(lr, (tuple, list)) and len(lr) == 3 and lr[0] in LR_SHAPES
                and all(_number(v) and math.isfinite(v) and v >= 0 for v in lr[1:])):
            raise ValueError(f"{where}: lr must be (shape, start, end) with shape in {LR_SHAPES} and "
                             f"finite start, end >= 0 (fractions of the peak LR), got {lr!r}")
        if p["mix"] not in cfg.mixtures:
            raise ValueError(f"{where}: mix {p['mix']!r} is not in mixtures {sorted(cfg.mixtures)}")
        if p["optimizer"] not in OPTIMIZERS:
            raise ValueError(f"{where}: optimizer must be one of {OPTIMIZERS}, got {p['optimizer']!r}")
        if mcfg is not None and p["seq_len"] > mcfg.max_seq_len:
            raise ValueError(f"{where}: seq_len {p['seq_len']} > the model's max_seq_len {mcfg.max_seq_len}")


def check_run(cfg: TrainConfig, mixture, world: int) -> None:
    """The checks that need the data and the world size, for the whole curriculum, before step 1: every
    phase's global batch against the ranks, every source a phase draws from long enough for a window of
    seq_len + 1 tokens (its training split; its held-out split where the run evaluates)."""
    evaluated = range(len(cfg.phases)) if cfg.eval_interval else [phase_at(cfg.phases, _stop(cfg) - 1)[0]]
    for i, p in enumerate(cfg.phases):
        where = f"phases[{i}] ({p['name']})"
        if p["batch"] % world:
            raise ValueError(f"{where}: global batch {p['batch']} is not divisible by the world size {world}")
        needs = [(s, "train", p["mix"]) for s, w in cfg.mixtures[p["mix"]].items() if w > 0]
        if i in evaluated:
            needs += [(s, "heldout", cfg.eval_mix) for s, w in cfg.mixtures[cfg.eval_mix].items() if w > 0]
        for source, split, mix in needs:
            if source not in mixture.names:
                raise ValueError(f"{where}: mixture {mix!r} names source {source!r}, which the data does not "
                                 f"have (sources: {mixture.names})")
            n = mixture.split_tokens(source, split)
            if n < p["seq_len"] + 1:
                raise ValueError(f"{where}: seq_len {p['seq_len']} needs {p['seq_len'] + 1} tokens per window, but "
                                 f"source {source!r} has {n} in its {split} split (mixture {mix!r})")


def _stop(cfg: TrainConfig) -> int:
    n = total_steps(cfg.phases)
    return min(n, cfg.max_steps) if cfg.max_steps > 0 else n


# ----------------------------------------------------------------------------------------------------
# the curriculum

def phase_at(phases: list, step: int) -> tuple[int, int]:
    """(phase index, step within the phase) of global step `step` (0-based)."""
    for i, p in enumerate(phases):
        if step < p["steps"]:
            return i, step
        step -= p["steps"]
    raise IndexError("step past the end of the curriculum")


def lr_factor(phase: dict, i: int) -> float:
    """The LR of step i of a phase, as a fraction of the peak. r = (i + 1) / steps runs to 1 at the phase's
    last step, so a warmup ends exactly at the peak and a decay exactly at its minimum."""
    shape, start, end = phase["lr"]
    r = (i + 1) / phase["steps"]
    if shape == "constant":
        return start
    if shape == "linear":
        return start + r * (end - start)
    return end + (2 * 0.5 ** r - 1) * (start - end)  # "exp", the recipe's decay: start at r=0, end at r=1


def total_steps(phases: list) -> int:
    return sum(p["steps"] for p in phases)


def batch_split(phase: dict, micro_batch: int, world: int) -> tuple[int, int]:
    """global batch -> (sequences per micro-batch per rank, gradient-accumulation steps): the largest
    micro-batch up to the phase's (or the config's) micro_batch that divides each rank's share."""
    if phase["batch"] % world:
        raise ValueError(f"phase {phase['name']!r}: global batch {phase['batch']} is not divisible by the "
                         f"world size {world}")
    share = phase["batch"] // world
    mb = max(d for d in range(1, min(phase.get("micro_batch", micro_batch), share) + 1) if share % d == 0)
    return mb, share // mb


# ----------------------------------------------------------------------------------------------------
# checkpoints: atomic, checksummed, loadable without executing code; one run per out_dir

CKPT_FORMAT = "xmodel25-checkpoint-v1"
_CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")


class _Hashing:
    """A write-only file that hashes what passes through it (torch.save writes its zip sequentially)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def save_checkpoint(out_dir: str, step: int, state: dict, keep: int) -> str:
    """Write out_dir/ckpt_<step>.pt atomically (data.atomic_write: a crash or a full disk leaves the earlier
    checkpoints as they were and no partial file under a checkpoint's name) with the sha256 of its bytes in
    ckpt_<step>.pt.sha256 (written just before the rename, so a listed checkpoint has its checksum), then
    prune all but the newest `keep`."""
    path = os.path.join(out_dir, f"ckpt_{step:08d}.pt")
    with data.atomic_write(path, "wb") as f:
        out = _Hashing(f)
        torch.save(dict(state, format=CKPT_FORMAT, step=step), out)
        with data.atomic_write(path + ".sha256") as g:
            g.write(out.sha.hexdigest() + "\n")
    for old in list_checkpoints(out_dir)[:-keep]:
        for p in (old, old + ".sha256"):
            if os.path.exists(p):
                os.remove(p)
    return path


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints in out_dir, oldest first (a partial file left by a crash is never listed)."""
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir)) if _CKPT_RE.match(n)]


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint file, or a run directory's latest (weights_only: tensors and plain data, never code).
    The file's sha256 must match the one written with it: flipped bytes are refused, naming the previous
    good checkpoint."""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in {path}")
        path = found[-1]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.exists(path + ".sha256"):
        with open(path, "rb") as f:
            ok = hashlib.file_digest(f, "sha256").hexdigest() == open(path + ".sha256").read().strip()
        if not ok:
            earlier = [p for p in list_checkpoints(os.path.dirname(path) or ".") if p < path]
            hint = (f"the previous checkpoint is {earlier[-1]}: move the corrupt one aside to resume from it"
                    if earlier else "there is no earlier checkpoint in that directory")
            raise ValueError(f"{path}: corrupt checkpoint (sha256 differs from {path}.sha256); {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed global, ...
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not an Xmodel-2.5 checkpoint of this project (format {CKPT_FORMAT})")
    return ckpt


class RunLock:
    """One run per out_dir: an exclusive flock on out_dir/.lock, held for the run's life. The kernel drops
    it when the process dies however it dies, so a stale lock never blocks a resume; the file holds the
    holder's PID and host for the message a second run gets."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, ".lock")
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.seek(0)
            holder = self.f.read().strip() or "unknown"
            self.f.close()
            raise ValueError(f"out_dir {out_dir!r} is in use by another run ({holder}); wait for it or choose "
                             f"another out_dir") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        self.f.flush()
        for name in os.listdir(out_dir):  # partial files of a run that died mid-write (never listed, just space)
            if ".tmp-" in name:
                os.remove(os.path.join(out_dir, name))

    def release(self) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


# ----------------------------------------------------------------------------------------------------
# distributed set-up (torchrun provides RANK / WORLD_SIZE / LOCAL_RANK)

def setup_distributed(cfg: TrainConfig):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "cuda":
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        # the timeout bounds how long a collective waits for a dead or hung rank before failing the job
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo",
                                timeout=timedelta(seconds=cfg.dist_timeout_s))
        _DIST_TIMEOUT_S[0] = cfg.dist_timeout_s
    device = torch.device(f"cuda:{local}" if cfg.device == "cuda" else cfg.device)
    return rank, world, device


def exit_distributed(code: int = 0) -> None:
    """The last act of a process of a multi-process run whose work is done (results written, files closed):
    destroy the process group and exit without Python's finalization. A gloo worker thread may still drop the
    last reference to a tensor of the last collectives (a barrier holds its prior work); if that happens
    while the interpreter finalizes, the thread cannot take the GIL and the process aborts with SIGABRT
    ("terminate called without an active exception") although everything succeeded (seen in about 1 of 10
    runs of a 2-rank Muon test; pytorch/pytorch#179291 describes the mechanism)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_DIST_TIMEOUT_S = [0]
_PROGRESS_KEY = "xmodel25/step/{}"


def note_progress(rank: int, step: int) -> None:
    """Record in the rendezvous key-value store (torchrun's, which outlives the workers) the step this
    rank is starting, so that after a failed collective the survivors can name the rank that fell behind."""
    dist.distributed_c10d._get_default_store().set(_PROGRESS_KEY.format(rank), str(step))


def is_collective_failure(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        w in text for w in ("Connection closed by peer", "Connection reset", "Broken pipe", "Timed out", "timed out"))


def collective_failure(error: BaseException) -> str:
    """The message for a collective that failed (a peer's connection closed) or timed out: this rank,
    the timeout, the last step each rank started and which rank(s) fell behind (died or hung)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = {}
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        for r in range(world):
            if store.check([_PROGRESS_KEY.format(r)]):
                steps[r] = int(store.get(_PROGRESS_KEY.format(r)))
    except Exception:  # the store lived in a rank that is gone: report without it
        pass
    behind = sorted(r for r in range(world) if r not in steps or steps[r] < max(steps.values(), default=0))
    blame = (f"rank(s) {behind} fell behind (died or hung)" if behind else
             "every rank reached the same step; one of them died or hung inside it")
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return (f"rank {rank}: a collective failed or timed out (dist_timeout_s={_DIST_TIMEOUT_S[0]}) waiting for "
            f"the other ranks; last step started per rank: {steps}; {blame}. ({type(error).__name__}: {detail})")


def checkpoint_handoff(rank: int, step: int, error: str | None, timeout_s: int) -> None:
    """After rank 0 writes (or fails to write) the checkpoint of `step`, every rank learns the outcome through
    the rendezvous store, waiting up to `timeout_s` (ckpt_timeout_s): a barrier would fail the whole job when
    a 1.3B checkpoint on slow storage takes longer than the collective timeout."""
    store, key = dist.distributed_c10d._get_default_store(), f"xmodel25/ckpt/{step}"
    if rank == 0:
        store.set(key, error or "ok")
    else:
        store.wait([key], timedelta(seconds=timeout_s))
        outcome = store.get(key).decode()
        if outcome != "ok":
            raise OSError(f"rank 0 could not write the checkpoint of step {step}: {outcome}")


def any_rank(flag: bool, world: int, device) -> bool:
    """True on every rank if it is True on any (e.g. a preemption signal that reached one rank first)."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= world
    return t


# ----------------------------------------------------------------------------------------------------
# the plan (--dry_run) and what it costs

def _si(n: float) -> str:
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= v:
            return f"{n / v:.2f}{unit}"
    return f"{n:.0f}"


def dry_run(cfg: TrainConfig, mcfg: ModelConfig, world: int) -> dict:
    world = cfg.gpus or world
    model = mup.build_model(mcfg, device="meta")
    n = model.num_params()
    print(f"model: {n:,} parameters ({model.num_params(embedding=False):,} without the embedding), "
          f"width multiplier m = {mcfg.width_mult:g}, μP {'on' if mcfg.use_mup else 'off'}")
    groups = mup.param_groups(model, cfg.lr, cfg.emb_lr, cfg.weight_decay)
    print("peak LRs: " + ", ".join(f"{g['name']} {g['lr']:.4g} (wd {g['weight_decay']:g})" for g in groups))
    print(f"{'phase':<10} {'steps':>8} {'batch x seq':>13} {'mb x acc x world':>17} {'tokens':>10} "
          f"{'LR first..last (x peak)':>25} {'mix':>7} {'opt':>6} {'GB/GPU':>7} {'ckpt+zero1':>10}")
    tokens_total, flops_total, step = 0, 0.0, 0
    for p in cfg.phases:
        mb, acc = batch_split(p, cfg.micro_batch, world)
        tok = p["steps"] * p["batch"] * p["seq_len"]
        tokens_total += tok
        flops_total += tok * model.flops_per_token(p["seq_len"])
        muon = p["optimizer"] == "muon"
        mem = model.memory_estimate_gb(mb, p["seq_len"], muon, world, False, mcfg.act_ckpt)
        mem_lean = model.memory_estimate_gb(mb, p["seq_len"], muon, world, True, True)
        lrs = f"{lr_factor(p, 0):.4g}..{lr_factor(p, p['steps'] - 1):.4g}"
        print(f"{p['name']:<10} {p['steps']:>8,} {p['batch']:>5} x {p['seq_len']:<6} {mb:>5} x {acc:>3} x {world:<4} "
              f"{_si(tok):>10} {lrs:>25} {p['mix']:>7} {p['optimizer']:>6} {mem:>7.1f} {mem_lean:>10.1f}")
        step += p["steps"]
    gpu_hours = flops_total / (cfg.gpu_peak_tflops * 1e12 * cfg.mfu) / 3600
    print(f"total: {step:,} steps, {_si(tokens_total)} tokens, {model.flops_per_token(cfg.phases[0]['seq_len']):.3g} "
          f"FLOPs/token at {cfg.phases[0]['seq_len']}, {flops_total:.3g} FLOPs; {gpu_hours:,.4g} GPU-hours at "
          f"{cfg.mfu:.0%} MFU of {cfg.gpu_peak_tflops:g} TFLOP/s; memory per GPU with {world} data-parallel GPUs "
          f"(last column: with activation checkpointing and ZeRO-1)")
    return dict(params=n, steps=step, tokens=tokens_total, flops=flops_total, gpu_hours=gpu_hours)


# ----------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def heldout_loss(model, batches, device="cpu", autocast=None, rank: int = 0, world: int = 1) -> float:
    """Token-weighted mean next-token loss over (x, y) batches, the one held-out evaluator of the project
    (the trainer, the evaluation tool and the μP tools). Under torch.distributed each rank takes every
    world-th batch and the sums are all-reduced, so the value does not depend on the number of ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(batches):
        if i % world != rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            loss = model(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    if total[1] == 0:
        raise ValueError("held-out evaluation got no tokens (no batches)")
    return (total[0] / total[1]).item()


def evaluate(r, step: int, tokens: int, phase: dict) -> None:
    """The run's held-out loss at `step`: cfg.eval_windows fixed windows of the eval mix at the phase's length."""
    c = r.cfg
    batches = r.mixture.with_weights(c.mixtures[c.eval_mix]).eval_batches(c.eval_windows, c.eval_batch,
                                                                           phase["seq_len"], seed=c.seed)
    ev = heldout_loss(r.raw, batches, r.device, r.autocast, r.rank, r.world)
    r.summary["evals"].append((step, ev))
    r.say(f"step {step}: held-out loss {ev:.4f}")
    if r.sinks:
        r.sinks.log({"step": step, "phase": phase["name"], "eval_loss": ev, "tokens": tokens})


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl: one row per logged step, evaluation and event; exact across resumes

def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl. A torn last line (a crash or a full disk mid-append) is dropped with a
    warning naming the file; a bad line elsewhere is an error naming the file and the line."""
    lines = open(path).read().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}: line {n} is not JSON (the file is damaged)") from None
            print(f"warning: {path}: dropped a torn last line ({line[:60]!r})", file=sys.stderr)
    return rows


def start_metrics(out_dir: str, resumed_step: int | None, redo_row: bool = False) -> None:
    """A fresh run refuses an out_dir holding another run's checkpoints (nothing is overwritten). A resumed
    run keeps the rows up to its checkpoint's step, minus the events and evaluations of that step itself,
    which it redoes, and minus that step's loss row if it closed a log interval early (`redo_row`: the
    resumed run continues that interval): the file ends as an uninterrupted run's would."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if resumed_step is None and list_checkpoints(out_dir):
        raise ValueError(f"out_dir {out_dir!r} holds checkpoints of an earlier run: continue it with --resume, "
                         f"or choose another out_dir")
    rows = read_metrics(path) if resumed_step is not None and os.path.exists(path) else []
    keep = [r for r in rows if r.get("step", 0) < resumed_step or r.get("step") == resumed_step and "loss" in r
            and not redo_row]
    with data.atomic_write(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)


LOG_SINKS = ("jsonl", "tensorboard", "wandb")


class Sinks:
    """Where rank 0's rows go: metrics.jsonl always (the record the resume logic and the report read), and
    as asked by `log_to`, TensorBoard event files in out_dir/tensorboard and Weights & Biases (run id = the
    out_dir's name, so a resumed run continues its W&B run). Both are optional packages: a missing one is an
    error before step 1, never a silent gap in a long run's curves."""

    def __init__(self, cfg: TrainConfig):
        self.path, self.tb, self.wandb = os.path.join(cfg.out_dir, "metrics.jsonl"), None, None
        if "tensorboard" in cfg.log_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("config key 'log_to': tensorboard needs the tensorboard package "
                                 "(pip install tensorboard)") from None
            self.tb = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
        if "wandb" in cfg.log_to:
            try:
                import wandb
            except ImportError:
                raise ValueError("config key 'log_to': wandb needs the wandb package (pip install wandb; "
                                 "WANDB_MODE=offline runs without a network)") from None
            name = os.path.basename(os.path.normpath(cfg.out_dir))
            self.wandb = wandb.init(project=cfg.wandb_project, name=name, id=re.sub(r"[^\w-]", "-", name),
                                    dir=cfg.out_dir, resume="allow", config=asdict(cfg))

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        if "event" in row:  # the optimizer switch: a marker in both dashboards
            scalars = {f"event/{row['event']}": 1.0}
            if self.tb:
                self.tb.add_text("events", json.dumps(row), step)
        elif "eval_loss" in row:
            scalars = {"eval/loss": row["eval_loss"]}
        else:
            scalars = {f"train/{k}": v for k, v in row.items() if k != "step" and _number(v)}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


# ----------------------------------------------------------------------------------------------------
# setting up a run: data, model, optimizers, the state to continue from

def build_data(cfg: TrainConfig, mcfg: ModelConfig, rank: int, world: int):
    """The tokenizer and the Mixture of the run. `data` maps each source to a prepared dataset directory, or
    to raw text (.txt / .jsonl files or directories), which is prepared here into data_cache (once: an
    unchanged input is reused). Rank 0 prepares while the others wait, then every rank opens the result."""
    tok = data.get_tokenizer(cfg.tokenizer)
    cache = cfg.data_cache or str(data.default_cache_dir())

    def prepared():
        if cfg.data is None:
            return data.default_corpus(cfg.data_cache or None, tokenizer=tok)
        return {s: p if os.path.isfile(os.path.join(p, "manifest.json"))
                else data.prepare({s: p}, os.path.join(cache, "prepared", s), tokenizer=tok)
                for s, p in cfg.data.items()}

    if rank == 0:
        source = prepared()
    if world > 1:
        dist.barrier()
    if rank != 0:
        source = prepared()  # ready by now: this only checks and reuses it
    mixture = data.Mixture(source, cfg.mixtures[cfg.phases[0]["mix"]], seed=cfg.seed,
                           vocab_size=mcfg.vocab_size, tokenizer=tok)
    return tok, mixture


def restore(cfg: TrainConfig, mcfg: ModelConfig, raw, opts: Optimizers, tok, device, say) -> tuple[int, int, dict]:
    """Continue from the latest checkpoint (--resume) or start from a checkpoint's weights (--init_from):
    the model config and the tokenizer must be the run's. Returns (step, tokens, the unfinished log
    interval: {"loss_sum", "steps"}) to start from."""
    fresh = {"loss_sum": torch.zeros(()), "steps": 0}
    found = list_checkpoints(cfg.out_dir) if cfg.resume else []
    if cfg.resume and not found:
        say(f"resume: no checkpoint in {cfg.out_dir}, starting from step 0")
    source = found[-1] if found else cfg.init_from
    if not source:
        return 0, 0, fresh
    ckpt = load_checkpoint(source)
    theirs = {**asdict(ModelConfig()), **ckpt["model_config"]}  # keys added since it was written: defaults
    diff = [k for k, v in asdict(mcfg).items() if theirs.get(k) != v and k not in EXECUTION_KEYS]
    if diff:
        raise ValueError(f"{source}: checkpoint was written for another model config (fields {diff})")
    theirs, ours = ckpt.get("tokenizer") or {}, tok.identity
    if (theirs.get("name"), theirs.get("sha256")) != (ours["name"], ours["sha256"]):
        msg = (f"{source}: trained with tokenizer {theirs.get('name')} (sha256 {str(theirs.get('sha256'))[:12]}), "
               f"this run uses {ours['name']} (sha256 {ours['sha256'][:12]})")
        if not cfg.allow_tokenizer_change:
            raise ValueError(msg + "; --allow_tokenizer_change=True to continue anyway")
        say(f"warning: {msg}; continuing (--allow_tokenizer_change)")
    missing, unexpected = raw.load_state_dict(ckpt["model"], strict=False)
    if unexpected or any(not k.endswith(("amax_history", "scale")) for k in missing):  # FP8 state may start fresh
        raise ValueError(f"{source}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    if not found:
        say(f"initialized from {source} (weights only), starting at step 0")
        return 0, 0, fresh
    if ckpt.get("optim") is not None:
        opts.load_state_dict(ckpt["optim"])
    else:
        say(f"{source} holds no optimizer state: the optimizers start fresh")
    if ckpt.get("rng"):
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    say(f"resumed from {source} at step {ckpt['step']}")
    return ckpt["step"], ckpt["tokens"], ckpt.get("log") or fresh


def machine_info(device, world: int) -> dict:
    """What the run ran on, for config.json and the report."""
    info = {"device": str(device), "world_size": world, "torch": torch.__version__, "host": socket.gethostname()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = torch.backends.cpu.get_cpu_capability()
        info["cpu_native_bf16"] = cpu_has_native_bf16()
    return info


def write_config(cfg: TrainConfig, mcfg: ModelConfig, machine: dict, say) -> None:
    path = os.path.join(cfg.out_dir, "config.json")
    with data.atomic_write(path) as f:
        json.dump({"train": asdict(cfg), "model": asdict(mcfg), "machine": machine}, f, indent=1, default=str)
    if cfg.verbose:
        say(json.dumps({"train": asdict(cfg), "model": asdict(mcfg)}, indent=1, default=str))
    say(f"config: {path}")


def print_plan(cfg: TrainConfig, raw, world: int, start: int, say) -> None:
    n = raw.num_params()
    say(f"model: {n / 1e6:.1f}M parameters ({raw.num_params(embedding=False) / 1e6:.1f}M without the embedding), "
        f"{raw.config.n_layer} x {raw.config.hidden}, width multiplier m = {raw.config.width_mult:g}")
    stop, step = _stop(cfg), 0
    for p in cfg.phases:
        if step < stop:
            say(f"  {p['name']:<10} steps {step}..{min(step + p['steps'], stop) - 1}  {p['batch']} x {p['seq_len']}  "
                f"LR {p['lr'][0]} {p['lr'][1]:g}->{p['lr'][2]:g}  mix {p['mix']}  {p['optimizer']}")
        step += p["steps"]
    tokens = sum(p["steps"] * p["batch"] * p["seq_len"] for p in cfg.phases)
    say(f"plan: {stop - start} steps to run of {total_steps(cfg.phases)}, {tokens / 1e6:,.2f}M tokens in the "
        f"curriculum, {world} rank(s); the time estimate follows the first steps")


def remaining_tokens(phases: list, step: int, stop: int) -> int:
    """Tokens in steps [step, stop) of the curriculum."""
    total, begin = 0, 0
    for p in phases:
        end = begin + p["steps"]
        total += max(0, min(end, stop) - max(begin, step)) * p["batch"] * p["seq_len"]
        begin = end
    return total


# ----------------------------------------------------------------------------------------------------
# the training loop

class Meter:
    """Throughput and the logged loss: the mean over the steps actually in the interval (after a resume the
    first interval may be shorter), read from the device only at logging steps."""

    def __init__(self, tokens: int, phases: list, device, say, unlogged: dict):
        # a resume continues the log interval its checkpoint cut short (the checkpoint holds its sum and count)
        self.phases, self.say, self.n = phases, say, unlogged["steps"]
        self.loss = unlogged["loss_sum"].to(device=device, dtype=torch.float32).clone()
        self.pause(tokens)

    def pause(self, tokens: int | None = None):
        self.t = time.perf_counter()
        self.tokens = self.tokens if tokens is None else tokens

    def add(self, loss: torch.Tensor):
        self.loss += loss
        self.n += 1

    def _rate(self, tokens: int, step: int, stop: int) -> tuple[float, float]:
        tps = (tokens - self.tokens) / max(time.perf_counter() - self.t, 1e-9)
        return tps, remaining_tokens(self.phases, step, stop) / max(tps, 1e-9) / 60

    def estimate(self, step: int, tokens: int, stop: int, t_start: float):
        tps, eta = self._rate(tokens, step, stop)
        self.say(f"step {step}: {tps:,.0f} tok/s over the first steps; the whole run: about "
                 f"{(time.perf_counter() - t_start) / 60 + eta:.1f} min (ETA {eta:.1f} min)")

    def row(self, r, step, tokens, phase, lr, grad_norm, stop, closes=True) -> dict:
        """The row of `step`; `closes`: a full interval ends here (a row cut short by a stop or a preemption
        keeps its sum, which the checkpoint carries into the resumed run)."""
        tps, eta = self._rate(tokens, step, stop)
        local = self.loss / self.n
        row = {"step": step, "phase": phase["name"], "loss": all_reduce_mean(local, r.world).item(),
               "lr": r.opts.groups[0]["base_lr"] * lr, "lr_factor": lr, "grad_norm": grad_norm.item(),
               "tokens": tokens, "tokens_per_s": tps, "seq_len": phase["seq_len"],
               "global_batch": phase["batch"], "optimizer": r.opts.kind}
        line = (f"step {step}/{total_steps(self.phases)} {phase['name']} loss {row['loss']:.4f} lr {row['lr']:.3g} "
                f"gnorm {row['grad_norm']:.3f} {tps:,.0f} tok/s ETA {eta:.1f} min")
        if r.device.type == "cuda":
            row["mfu"] = r.raw.flops_per_token(phase["seq_len"]) * tps / r.world / (r.cfg.gpu_peak_tflops * 1e12)
            line += f" MFU {row['mfu']:.1%}"
        self.say(line)
        if closes:
            self.loss.zero_()
            self.n = 0
        self.pause(tokens)
        return dict(row, local_loss=local.item())


class _Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, checkpoints and exits 0."""

    def __init__(self):
        self.flag, self.old = False, {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.old[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread (e.g. a test harness): no signal handling
                pass

    def _set(self, *_):
        self.flag = True

    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def start_run(cfg: TrainConfig, mcfg: ModelConfig, rank: int, world: int, device, say) -> SimpleNamespace:
    """Everything the loop needs, as one namespace: the data (checked against the whole curriculum before
    anything trains), the model, the optimizers, the state to continue from, metrics.jsonl and config.json."""
    torch.manual_seed(cfg.seed)
    tok, mixture = build_data(cfg, mcfg, rank, world)
    check_run(cfg, mixture, world)
    raw = mup.build_model(mcfg, device)
    if cfg.compile:
        raw.compile_for_training()
    model = raw
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        # gradients as views of DDP's all-reduce buckets: no second copy of every gradient (5.2 GB per GPU at 1.3B)
        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    opts = Optimizers(mup.param_groups(raw, cfg.lr, cfg.emb_lr, cfg.weight_decay), cfg, cfg.phases[0]["optimizer"])
    step, tokens, unlogged = restore(cfg, mcfg, raw, opts, tok, device, say)
    sinks = None
    if rank == 0:
        start_metrics(cfg.out_dir, step if cfg.resume and step else None, unlogged["steps"] > 0 and step < _stop(cfg))
        write_config(cfg, mcfg, machine_info(device, world), say)
        sinks = Sinks(cfg)
    return SimpleNamespace(
        cfg=cfg, mcfg=mcfg, rank=rank, world=world, device=device, say=say, tok=tok, mixture=mixture, raw=raw,
        model=model, opts=opts, sinks=sinks, step=step, tokens=tokens, unlogged=unlogged,
        autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"),
        summary={"step": step, "losses": [], "evals": [], "out_dir": cfg.out_dir, "checkpoint": None})


def enter_phase(r, phase, step, i) -> tuple[int, int]:
    """A phase boundary: the micro-batch / accumulation split, the data mix (r.mixture), and possibly the
    optimizer switch of the hidden matrices (logged as an event row). Returns (micro-batch, accumulation)."""
    mb, accum = batch_split(phase, r.cfg.micro_batch, r.world)
    r.say(f"phase {phase['name']}: steps {step}..{step + phase['steps'] - i - 1}, batch {phase['batch']} x "
          f"{phase['seq_len']} = {mb} x {accum} accumulation x {r.world} ranks, mix {phase['mix']}, "
          f"optimizer {phase['optimizer']}")
    if phase["optimizer"] != r.opts.kind:
        r.say(f"step {step}: optimizer switch {r.opts.kind} -> {phase['optimizer']} for the hidden matrices")
        if r.sinks:
            r.sinks.log({"step": step, "event": "optimizer_switch", "from": r.opts.kind, "to": phase["optimizer"],
                         "phase": phase["name"]})
        r.opts.use(phase["optimizer"])
    r.mixture = r.mixture.with_weights(r.cfg.mixtures[phase["mix"]])
    return mb, accum


def train_step(r, params, phase, step, mb, accum):
    """One optimizer step over the phase's global batch: `accum` micro-batches of `mb` sequences on each rank.
    Returns this rank's loss and the global gradient norm, as device tensors (no sync)."""
    loss_step = torch.zeros((), device=r.device)
    for micro in range(accum):
        x, y = r.mixture.batch(step, micro, r.rank, r.world, mb, phase["seq_len"])
        x, y = x.to(r.device, non_blocking=True), y.to(r.device, non_blocking=True)
        # DDP all-reduces the gradients only in the last micro-step's backward (a fresh context each use)
        sync = r.model.no_sync if r.world > 1 and micro < accum - 1 else nullcontext
        with sync(), r.autocast:
            loss = r.model(x, y) / accum
        with sync():
            loss.backward()
        r.raw.update_fp8_scales()  # FP8: this micro-batch's amaxes, one all-reduce for every layer
        loss_step += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, r.cfg.grad_clip)
    r.opts.step()
    r.opts.zero_grad()
    return loss_step, grad_norm


def check_finite(first_bad: torch.Tensor, out_dir: str) -> None:
    bad = int(first_bad.item())
    if bad >= 0:
        raise FloatingPointError(f"non-finite loss or gradient norm at step {bad + 1}: stopping; "
                                 f"the last good checkpoint in {out_dir} is kept as it was")


def write_checkpoint(r, step: int, tokens: int, meter: Meter, first_bad: torch.Tensor) -> None:
    """Rank 0 writes the checkpoint of `step`, only if no step so far was non-finite and the weights are
    finite; every rank learns whether it was written (an error on rank 0 stops all of them)."""
    check_finite(first_bad, r.cfg.out_dir)
    if not all(bool(torch.isfinite(p).all()) for p in r.raw.parameters()):
        raise FloatingPointError(f"non-finite weights after step {step}: no checkpoint written; the last "
                                 f"good checkpoint in {r.cfg.out_dir} is kept as it was")
    state = {"model": r.raw.state_dict(), "optim": r.opts.state_dict(), "tokens": tokens,
             "model_config": asdict(r.mcfg), "config": asdict(r.cfg), "tokenizer": r.tok.identity,
             "log": {"loss_sum": all_reduce_mean(meter.loss, r.world).cpu(), "steps": meter.n},
             "rng": {"cpu": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state(r.device) if r.device.type == "cuda" else None}}
    error = None
    if r.rank == 0:
        try:
            r.summary["checkpoint"] = save_checkpoint(r.cfg.out_dir, step, state, r.cfg.keep_checkpoints)
            r.say(f"step {step}: checkpoint {r.summary['checkpoint']}")
        except OSError as e:
            error = str(e)
    if r.world > 1:
        checkpoint_handoff(r.rank, step, error, r.cfg.ckpt_timeout_s)
    if error:
        raise OSError(error)


def train(argv: list[str]) -> dict:
    """Run the curriculum described by argv (see load_config); returns a summary: the last step, the logged
    losses of this rank, the held-out evaluations, the last checkpoint, the sample."""
    if "-h" in argv or "--help" in argv:
        print(config_help())
        return {}
    conf = load_config(argv)
    cfg, mcfg = conf["train"], conf["model"]
    if cfg.dry_run:  # a plan needs no device: any machine plans any run
        return dry_run(cfg, mcfg, int(os.environ.get("WORLD_SIZE", 1)))
    master = int(os.environ.get("RANK", 0)) == 0
    say = (lambda *a, **k: print(*a, **k, flush=True)) if master else (lambda *a, **k: None)
    t_start = time.perf_counter()
    cfg.device, cfg.dtype = resolve_machine(cfg.device, cfg.dtype, say)
    rank, world, device = setup_distributed(cfg)
    lock = RunLock(cfg.out_dir) if master else None
    preemption, r = _Preemption(), None
    try:
        r = start_run(cfg, mcfg, rank, world, device, say)
        return train_loop(r, preemption, t_start)
    finally:
        if r and r.sinks:
            r.sinks.close()
        preemption.restore()
        if lock:
            lock.release()


def train_loop(r, preemption: _Preemption, t_start: float) -> dict:
    cfg, phases, stop, step, tokens = r.cfg, r.cfg.phases, _stop(r.cfg), r.step, r.tokens
    start = step
    print_plan(cfg, r.raw, r.world, step, r.say)
    if not can_plot():
        r.say("note: matplotlib is not installed: no loss.png will be drawn (pip install matplotlib)")
    first_bad = torch.full((), -1, dtype=torch.long, device=r.device)  # first step with a non-finite loss/grad
    due = lambda interval: interval and step % interval == 0  # noqa: E731
    if step and step < stop and due(cfg.eval_interval):  # the evaluation of the resumed step is redone
        evaluate(r, step, tokens, phases[phase_at(phases, step - 1)[0]])
    params = list(r.raw.parameters())
    cur_phase, mb, accum, preempted = None, 0, 0, False
    meter = Meter(tokens, phases, r.device, r.say, r.unlogged)
    while step < stop:
        if r.world > 1:
            note_progress(r.rank, step)
        pi, i = phase_at(phases, step)
        phase = phases[pi]
        if pi != cur_phase:
            cur_phase = pi
            mb, accum = enter_phase(r, phase, step, i)
        lr = lr_factor(phase, i)
        r.opts.set_lr(lr)
        loss_step, grad_norm = train_step(r, params, phase, step, mb, accum)
        finite = torch.isfinite(loss_step) & torch.isfinite(grad_norm)
        first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, step), first_bad)
        step += 1
        tokens += phase["batch"] * phase["seq_len"]
        meter.add(loss_step)
        preempted = any_rank(preemption.flag, r.world, r.device)
        last = step == stop
        if due(cfg.log_interval) or last or preempted:
            check_finite(first_bad, cfg.out_dir)
            row = meter.row(r, step, tokens, phase, lr, grad_norm, stop, closes=bool(due(cfg.log_interval)))
            r.summary["losses"].append(row.pop("local_loss"))
            if r.sinks:
                r.sinks.log(row)
        elif step - start == 2:  # a first estimate of the whole run's time, long before the first log row
            meter.estimate(step, tokens, stop, t_start)
        if due(cfg.ckpt_interval) or last or preempted:  # before the evaluation: an evaluation never costs weights
            write_checkpoint(r, step, tokens, meter, first_bad)
        if preempted:
            break
        if due(cfg.eval_interval) or last:
            evaluate(r, step, tokens, phase)
        if due(cfg.ckpt_interval) or due(cfg.eval_interval) or last:
            meter.pause()  # checkpoints and evaluations are not training time
    r.summary["step"] = step
    if preempted:
        r.say(f"preempted: stopped after step {step} with a checkpoint; continue with: "
              f"python train.py {' '.join(sys.argv[1:]) or '...'} --resume")
        r.summary["preempted"] = True
        return r.summary
    if step == stop and start == stop and stop:  # resumed a finished run: its final evaluation again
        evaluate(r, step, tokens, phases[phase_at(phases, step - 1)[0]])
    if r.world > 1:  # leave together: no rank tears the group down under another's last collective; before
        dist.barrier()  # finish, so no rank waits (under dist_timeout_s) while rank 0 draws and samples
    if r.rank == 0:
        finish(r, t_start, tokens)
    return r.summary


def can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def finish(r, t_start: float, tokens: int) -> None:
    """The run's last lines: the loss curve, a sample, the numbers, where everything is, what to run next."""
    cfg, raw, tok, device, summary, say, out = r.cfg, r.raw, r.tok, r.device, r.summary, r.say, r.cfg.out_dir
    plot = plot_runs({os.path.basename(os.path.normpath(out)): out}, os.path.join(out, "loss.png"))
    if summary["step"] == total_steps(cfg.phases) and cfg.sample_tokens > 0:
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        ids = raw.generate(torch.tensor([tok.doc_start + tok.encode("def ")], device=device), cfg.sample_tokens,
                           temperature=0.8, top_k=50, generator=g)
        summary["sample"] = tok.decode(ids[0].tolist())
        say(f"sample:\n{summary['sample']}")
        with data.atomic_write(os.path.join(out, "sample.txt")) as f:
            f.write(summary["sample"])
    wall = time.perf_counter() - t_start
    ckpt = summary["checkpoint"] or (list_checkpoints(out) or ["(none)"])[-1]
    report = write_report(out, wall)
    if summary["evals"]:
        say(f"final held-out loss {summary['evals'][-1][1]:.4f}")
    say(f"done: {summary['step']} steps in {wall / 60:.1f} min, {tokens:,} tokens trained in total\n"
        f"  checkpoint  {ckpt}\n  metrics     {os.path.join(out, 'metrics.jsonl')}\n"
        f"  loss curve  {plot or 'not drawn: matplotlib is not installed (pip install matplotlib)'}\n"
        f"  config      {os.path.join(out, 'config.json')}\n  report      {report}\n"
        f"next:\n  python -m tools.sample {out} --prompt 'def '\n  python -m tools.export {out} {out}/hf\n"
        f"  python -m tools.eval {out}\n  python -m tools.plot compare.png A={out} B=OTHER_RUN")


def write_report(out_dir: str, wall_s: float | None = None) -> str:
    """out_dir/report.md from what the run left (config.json, metrics.jsonl, loss.png, sample.txt, and a
    downstream probe's probe.json if one was run): the config in brief, the machine, plan vs actual, one row per
    phase, the final held-out loss. Written at the end of every run; `python -m tools.report RUN` redoes it."""
    conf = json.load(open(os.path.join(out_dir, "config.json")))
    t, m, machine = conf["train"], conf["model"], conf.get("machine", {})
    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    planned = sum(p["steps"] * p["batch"] * p["seq_len"] for p in t["phases"])
    train_s = sum((b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip([{"tokens": 0}] + steps, steps)
                  if b["tokens_per_s"] > 0)
    done = steps[-1]["tokens"] if steps else 0
    lines = [f"# Run report: {out_dir}", "",
             f"- model: {m['n_layer']} layers x {m['hidden']} (FFN {m['ffn_hidden']}, {m['n_head']} heads / "
             f"{m['n_kv_head']} KV), vocab {m['vocab_size']:,}, μP {'on' if m['use_mup'] else 'off'}, "
             f"fp8 {m['fp8']}",
             f"- machine: {machine.get('gpu') or machine.get('cpu', '?')} ({machine.get('device', t['device'])}, "
             f"{machine.get('world_size', 1)} rank(s)), dtype {t['dtype']}, torch {machine.get('torch', '?')}",
             f"- optimizer: AdamW (lr {t['lr']}, emb_lr {t['emb_lr']}), hidden matrices per phase; Muon momentum "
             f"{t['muon_momentum']}, seed {t['seed']}",
             f"- plan vs actual: {done:,} of {planned:,} tokens ({done / max(planned, 1):.0%}), "
             f"{steps[-1]['step'] if steps else 0} of {sum(p['steps'] for p in t['phases'])} steps; training time "
             f"{train_s / 60:.1f} min at {done / max(train_s, 1e-9):,.0f} tokens/s"
             + (f"; wall time of the last session {wall_s / 60:.1f} min" if wall_s else ""),
             "", "| phase | steps | batch x seq | optimizer | last loss | tokens/s | MFU |", "|---|---|---|---|---|---|---|"]
    for p in t["phases"]:
        mine = [r for r in steps if r["phase"] == p["name"]]
        if mine:
            mfu = f"{sum(r['mfu'] for r in mine) / len(mine):.1%}" if "mfu" in mine[-1] else "-"
            lines.append(f"| {p['name']} | {p['steps']} | {p['batch']} x {p['seq_len']} | {mine[-1]['optimizer']} | "
                         f"{mine[-1]['loss']:.4f} | {sum(r['tokens_per_s'] for r in mine) / len(mine):,.0f} | {mfu} |")
    lines += ["", f"Final held-out loss: {evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']})" if evals
              else "No held-out evaluation yet."]
    extras = {"probe.json": "Downstream probe", "sample.txt": "Sample"}
    for name, title in extras.items():
        if os.path.exists(os.path.join(out_dir, name)):
            lines += ["", f"## {title}", "", "```", open(os.path.join(out_dir, name)).read().strip(), "```"]
    if os.path.exists(os.path.join(out_dir, "loss.png")):
        lines += ["", "![loss](loss.png)"]
    path = os.path.join(out_dir, "report.md")
    with data.atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
    return path


def plot_runs(runs: dict, path: str, title: str = "", from_tokens: float = 0) -> str | None:
    """Training loss (and held-out loss, as markers) against tokens for {label: out_dir}, saved as a PNG
    next to the metrics it comes from. matplotlib is optional: without it nothing is drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, out_dir in runs.items():
        rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
        rows = [r for r in rows if r.get("tokens", from_tokens) >= from_tokens]  # zoom: e.g. an ablation's decay
        train_rows = [r for r in rows if "loss" in r]
        line, = ax.plot([r["tokens"] for r in train_rows], [r["loss"] for r in train_rows], label=label, lw=1)
        ev = [r for r in rows if "eval_loss" in r]
        ax.plot([r["tokens"] for r in ev], [r["eval_loss"] for r in ev], "o", color=line.get_color(), ms=4)
        for r in rows:
            if r.get("event") == "optimizer_switch":  # a dotted line where AdamW hands over to Muon
                x = max([t["tokens"] for t in train_rows if t["step"] <= r["step"]], default=0)
                ax.axvline(x, color=line.get_color(), ls=":", lw=0.8)
    ax.set(xlabel="tokens", ylabel="loss (lines: training, dots: held-out)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    try:
        train(sys.argv[1:])
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        if isinstance(e, RuntimeError):
            raise
        where = f"rank {dist.get_rank()}: " if dist.is_initialized() else ""
        print(f"error: {where}{e}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # gloo raises RuntimeError (DistBackendError) on a dead peer or a timeout
        if not (dist.is_initialized() and dist.get_world_size() > 1 and is_collective_failure(e)):
            raise
        print(f"error: {collective_failure(e)}", file=sys.stderr, flush=True)
        os._exit(1)  # the process group is broken: tearing it down could wait on the dead rank again
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # a finished rank of a torchrun job
        exit_distributed()
