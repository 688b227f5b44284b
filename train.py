"""The Xmodel-2.5 trainer: a Warmup-Stable-Decay curriculum, end to end, on one CPU or many GPUs.

    python train.py configs/proxy20m.py [--key=value ...]                    # laptop CPU, ~10 minutes
    torchrun --nproc_per_node=8 train.py configs/xmodel25.py                 # the 1.3B run

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
hidden matrices to Muon (`Optimizers.use`).

Each step: the global batch is split into micro-batches x gradient accumulation x data-parallel ranks
(recomputed whenever a phase changes the batch or the sequence length); the learning rate of every μP
group is its peak times the schedule's factor; gradients are clipped to norm 1.0. The loop does not wait
on the device except at logging steps: the loss and a "first bad step" marker stay on the device and are
read every `log_interval` steps, and before each checkpoint, so a NaN stops the run naming its step
without ever being written into a checkpoint. Checkpoints are written to a temporary file and renamed,
hold everything needed to continue exactly, and load with `weights_only=True` (no code execution).
"""
import ast
import json
import os
import re
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

import data
import mup
from model import ModelConfig
from muon import Muon


@dataclass
class TrainConfig:
    out_dir: str = "out/run"
    device: str = "auto"               # auto | cpu | cuda | mps (auto: CUDA, else Apple MPS, else CPU)
    seed: int = 0
    max_steps: int = 0                 # stop after this many steps (with a checkpoint); 0 = whole curriculum
    dtype: str = "auto"                # auto | float32 | bfloat16 (autocast; master weights stay fp32)
    compile: bool = False              # torch.compile each block
    resume: bool = False               # continue from the latest checkpoint in out_dir
    init_from: str = ""                # start from these weights (a checkpoint, e.g. export.py --import), step 0
    dry_run: bool = False              # print the plan, allocate nothing
    # optimizer (μP base rates, at width base_width)
    lr: float = 0.01
    emb_lr: float = 0.01
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    muon_momentum: float = 0.95
    muon_rms_scale: float = 0.2
    muon_ns_steps: int = 5
    hidden_optimizer: str = ""         # if set (adamw | muon), every phase's optimizer: e.g. the AdamW-only ablation
    zero1: bool = False                # shard AdamW state across ranks (ZeroRedundancyOptimizer)
    # batch
    micro_batch: int = 8               # sequences per rank per forward (a phase may set its own)
    # data
    tokenizer: str = "deepseek-v3"
    data: typing.Optional[dict] = None  # {source: prepared dataset dir or raw .txt/.jsonl/dir}; None = embedded corpus
    data_cache: str = ""               # where the default corpus is prepared ("" = data.py's default)
    mixtures: dict = field(default_factory=lambda: {"stable": {"prose": 0.5, "code": 0.5}})
    eval_mix: str = "stable"
    phases: list = field(default_factory=list)
    # logging, evaluation, checkpoints
    log_interval: int = 10
    eval_interval: int = 0             # 0 = only at the end
    eval_windows: int = 40
    eval_batch: int = 8
    sample_tokens: int = 48
    ckpt_interval: int = 0             # 0 = only at the end / at max_steps
    keep_checkpoints: int = 3
    dist_timeout_s: int = 300          # a dead or hung rank fails the job after this long
    # dry-run cost model
    gpus: int = 0                      # the data-parallel size the dry run plans for (0 = the current one)
    gpu_peak_tflops: float = 989.0     # H100 SXM dense bf16
    mfu: float = 0.4


LR_SHAPES = ("linear", "constant", "exp")
OPTIMIZERS = ("adamw", "muon")
PHASE_KEYS = {"name", "steps", "lr", "batch", "seq_len", "mix", "optimizer", "micro_batch"}


# ----------------------------------------------------------------------------------------------------
# the machine: which device, which precision

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16")


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
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(s.lower(), s)


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
        exec(compile(open(path).read(), path, "exec"), scope)
        values.update({k: v for k, v in scope.items() if not k.startswith("_")
                       and not isinstance(v, type(os)) and not callable(v)})
    phase_overrides = []
    for a in args:
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r} (options are --key=value)")
        key, eq, raw = a[2:].partition("=")
        value = parse_value(raw) if eq else True
        if key.startswith("phase."):
            phase_overrides.append((key, value))
        else:
            values[key] = value
    for key in values:
        if key not in train_types and key not in model_types:
            raise ValueError(f"unknown config key {key!r}")
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
    validate(tcfg)
    return {"train": tcfg, "model": mcfg}


def validate(cfg: TrainConfig) -> None:
    if cfg.device not in DEVICES:
        raise ValueError(f"config key 'device': one of {DEVICES}, got {cfg.device!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"config key 'dtype': one of {DTYPES}, got {cfg.dtype!r}")
    if not cfg.phases:
        raise ValueError("config key 'phases': the curriculum is empty")
    for k in ("micro_batch", "log_interval", "eval_windows", "eval_batch", "keep_checkpoints"):
        if getattr(cfg, k) <= 0:
            raise ValueError(f"config key {k!r} must be positive, got {getattr(cfg, k)}")
    if cfg.eval_mix not in cfg.mixtures:
        raise ValueError(f"config key 'eval_mix': {cfg.eval_mix!r} is not in mixtures {sorted(cfg.mixtures)}")
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
                and all(isinstance(v, (int, float)) and v >= 0 for v in lr[1:])):
            raise ValueError(f"{where}: lr must be (shape, start, end) with shape in {LR_SHAPES} and "
                             f"start, end >= 0 (fractions of the peak LR), got {lr!r}")
        if p["mix"] not in cfg.mixtures:
            raise ValueError(f"{where}: mix {p['mix']!r} is not in mixtures {sorted(cfg.mixtures)}")
        if p["optimizer"] not in OPTIMIZERS:
            raise ValueError(f"{where}: optimizer must be one of {OPTIMIZERS}, got {p['optimizer']!r}")


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
# optimizers: AdamW for everything, or Muon for the hidden matrices and AdamW for the rest

class Optimizers:
    """The μP parameter groups on two optimizers: AdamW for the embedding and norm weights, always, and
    for the hidden matrices either AdamW or (from the switch on) Muon.

    Keeping the hidden matrices on their own optimizer makes the switch a replacement of that one
    optimizer: `use("muon")` gives them a fresh Muon (momentum starts at zero) and the embedding/norm
    AdamW, its moments and its step counts are not touched. AdamW updates each parameter independently,
    so two AdamW instances compute exactly what one over all groups would. With `zero1` under
    torch.distributed each AdamW shards its state across ranks (ZeroRedundancyOptimizer) and Muon keeps
    each matrix's momentum on the one rank that orthogonalizes it (Muon(shard_state=True)); checkpoints
    hold the full, unsharded state (gathered on rank 0), which every rank loads and shards again."""

    def __init__(self, model, cfg: TrainConfig, kind: str = "adamw"):
        self.cfg, self.groups = cfg, mup.param_groups(model, cfg.lr, cfg.emb_lr, cfg.weight_decay)
        hidden = [g for g in self.groups if g["name"] == "hidden"]
        self.rest = self._adamw([g for g in self.groups if g["name"] != "hidden"])
        self.hidden_groups, self.kind, self.hidden = hidden, None, None
        self.use(kind)

    def _sharded(self) -> bool:
        return self.cfg.zero1 and dist.is_initialized() and dist.get_world_size() > 1

    def _adamw(self, groups):
        # fused: one kernel for all parameters (CPU and CUDA); the foreach path is several times slower on a CPU
        kw = dict(betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.adam_eps, fused=True)
        groups = [dict(g) for g in groups]
        if self._sharded():
            from torch.distributed.optim import ZeroRedundancyOptimizer
            return ZeroRedundancyOptimizer(groups, torch.optim.AdamW, **kw)
        return torch.optim.AdamW(groups, **kw)

    def use(self, kind: str) -> None:
        """Put the hidden matrices on `kind` ("adamw" or "muon") with fresh optimizer state."""
        if kind == self.kind:
            return
        if kind == "muon":
            c = self.cfg
            self.hidden = Muon([dict(g) for g in self.hidden_groups], lr=self.hidden_groups[0]["lr"],
                               momentum=c.muon_momentum, nesterov=True, ns_steps=c.muon_ns_steps,
                               weight_decay=c.weight_decay, rms_scale=c.muon_rms_scale, shard_state=self._sharded())
        else:
            self.hidden = self._adamw(self.hidden_groups)
        self.kind = kind

    def all(self):
        return [self.rest, self.hidden]

    def set_lr(self, factor: float) -> None:
        for opt in self.all():
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor

    def step(self) -> None:
        for opt in self.all():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.all():
            opt.zero_grad(set_to_none=True)

    @staticmethod
    def _state(opt):
        if hasattr(opt, "consolidate_state_dict"):  # ZeRO-1: every rank sends its shard to rank 0
            opt.consolidate_state_dict(0)
            return opt.state_dict() if dist.get_rank() == 0 else None
        if isinstance(opt, Muon):  # with shard_state the same: the momentum shares gathered on rank 0
            return opt.full_state_dict(to=0)
        return opt.state_dict()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "rest": self._state(self.rest), "hidden": self._state(self.hidden)}

    def load_state_dict(self, sd: dict) -> None:
        self.use(sd["kind"])
        for opt, s in ((self.rest, sd["rest"]), (self.hidden, sd["hidden"])):
            peak = [(g["base_lr"], g["weight_decay"]) for g in opt.param_groups]
            opt.load_state_dict(s)
            for g, (base_lr, wd) in zip(opt.param_groups, peak):  # the config's rates win over the file's
                g["base_lr"], g["weight_decay"] = base_lr, wd


# ----------------------------------------------------------------------------------------------------
# checkpoints: atomic, self-contained, loadable without executing code

CKPT_FORMAT = "xmodel25-checkpoint-v1"
_CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")


def save_checkpoint(out_dir: str, step: int, state: dict, keep: int) -> str:
    """Write out_dir/ckpt_<step>.pt through a temporary file and a rename (a crash leaves either the old set
    or the new file, never a partial one under a checkpoint's name), then prune all but the last `keep`."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"ckpt_{step:08d}.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(dict(state, format=CKPT_FORMAT, step=step), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(out_dir)[:-keep]:
        os.remove(old)
    return path


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints in out_dir, oldest first (a .tmp left by a crash is never listed)."""
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir)) if _CKPT_RE.match(n)]


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint file (weights_only: a file can hold tensors and plain data, never code)."""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in {path}")
        path = found[-1]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed global, ...
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not an Xmodel-2.5 checkpoint of this project (format {CKPT_FORMAT})")
    return ckpt


def model_config_from(ckpt: dict) -> ModelConfig:
    return ModelConfig(**ckpt["model_config"])


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


def all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= world
    return t


# ----------------------------------------------------------------------------------------------------
# the plan (--dry_run) and what it costs

def memory_estimate_gb(mcfg: ModelConfig, n_params: int, n_hidden: int, phase: dict, micro_batch: int,
                       world: int, zero1: bool, act_ckpt: bool) -> float:
    """Per-GPU memory of a phase, in GB: fp32 master weights and gradients (8 B/param), optimizer state
    (AdamW 8 B/param, Muon 4 B per hidden weight; ZeRO-1 divides it by the world size), and activations
    under bf16 autocast with SDPA (about 34 bytes x tokens x hidden per layer, Korthikanti et al. 2022,
    without the s^2 term flash attention removes; with checkpointing only each block's fp32 input plus one
    block's activations), plus the chunked loss (one chunk of fp32 logits, twice)."""
    muon = phase["optimizer"] == "muon"
    opt = 8 * (n_params - n_hidden) + (4 if muon else 8) * n_hidden
    opt /= world if zero1 else 1
    tokens = micro_batch * phase["seq_len"]
    per_layer = 34 * tokens * mcfg.hidden
    act = (4 * tokens * mcfg.hidden * mcfg.n_layer + per_layer) if act_ckpt else per_layer * mcfg.n_layer
    loss = 2 * 4 * mcfg.loss_chunk * mcfg.vocab_size + 2 * tokens * mcfg.hidden * 4
    return (8 * n_params + opt + act + loss) / 1e9


def _si(n: float) -> str:
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= v:
            return f"{n / v:.2f}{unit}"
    return f"{n:.0f}"


def dry_run(cfg: TrainConfig, mcfg: ModelConfig, world: int) -> dict:
    world = cfg.gpus or world
    model = mup.build_model(mcfg, device="meta")
    n = model.num_params()
    n_hidden = sum(p.numel() for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2)
    print(f"model: {n:,} parameters ({n - model.tok_emb.weight.numel():,} without the embedding), "
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
        mem = memory_estimate_gb(mcfg, n, n_hidden, p, mb, world, False, mcfg.act_ckpt)
        mem_lean = memory_estimate_gb(mcfg, n, n_hidden, p, mb, world, True, True)
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
# evaluation and the training loop

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


def evaluate(model, mixture, cfg: TrainConfig, seq_len: int, rank: int, world: int, device, autocast) -> float:
    """Held-out loss of the run: cfg.eval_windows fixed windows of the eval mix at this phase's length."""
    batches = mixture.eval_batches(cfg.eval_windows, cfg.eval_batch, seq_len, seed=cfg.seed)
    return heldout_loss(model, batches, device, autocast, rank, world)


def _start_metrics(out_dir: str, resumed_from: str | None, step: int) -> None:
    """A fresh run refuses an out_dir holding another run's checkpoints (nothing is overwritten); a resumed
    run drops the metrics rows after its checkpoint's step, which it is about to redo."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if resumed_from is None and list_checkpoints(out_dir):
        raise ValueError(f"out_dir {out_dir!r} holds checkpoints of an earlier run: continue it with --resume, "
                         f"or choose another out_dir")
    if not os.path.exists(path):
        return
    rows = [l for l in open(path) if resumed_from and json.loads(l).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def _log(out_dir: str, row: dict) -> None:
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


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


def train(argv: list[str]) -> dict:
    """Run the curriculum described by argv (see load_config); returns a summary (used by the tests)."""
    conf = load_config(argv)
    cfg, mcfg = conf["train"], conf["model"]
    if cfg.dry_run:  # a plan needs no device: any machine plans any run
        return dry_run(cfg, mcfg, int(os.environ.get("WORLD_SIZE", 1)))
    master = int(os.environ.get("RANK", 0)) == 0
    say = print if master else (lambda *a, **k: None)
    cfg.device, cfg.dtype = resolve_machine(cfg.device, cfg.dtype, say)
    rank, world, device = setup_distributed(cfg)
    say(json.dumps({"train": asdict(cfg), "model": asdict(mcfg)}, indent=1, default=str))
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        tmp = os.path.join(cfg.out_dir, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"train": asdict(cfg), "model": asdict(mcfg)}, f, indent=1, default=str)
        os.replace(tmp, os.path.join(cfg.out_dir, "config.json"))

    torch.manual_seed(cfg.seed)
    tok, mixture = build_data(cfg, mcfg, rank, world)
    raw = mup.build_model(mcfg, device)
    if cfg.compile:
        raw.compile_for_training()
    model = raw
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    phases, n_total = cfg.phases, total_steps(cfg.phases)
    opts = Optimizers(raw, cfg, phases[0]["optimizer"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    step, tokens = 0, 0
    found = list_checkpoints(cfg.out_dir) if cfg.resume else []
    if cfg.resume and not found:
        say(f"resume: no checkpoint in {cfg.out_dir}, starting from step 0")
    source = found[-1] if found else cfg.init_from
    if source:
        ckpt = load_checkpoint(source)
        if ckpt["model_config"] != asdict(mcfg):
            diff = [k for k, v in asdict(mcfg).items() if ckpt["model_config"].get(k) != v]
            raise ValueError(f"{source}: checkpoint was written for another model config (fields {diff})")
        missing, unexpected = raw.load_state_dict(ckpt["model"], strict=False)
        if unexpected or any(not k.endswith(("amax_history", "scale")) for k in missing):  # FP8 state may start fresh
            raise ValueError(f"{source}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    if master:
        _start_metrics(cfg.out_dir, found[-1] if found else None, ckpt["step"] if found else 0)
    if found:
        step, tokens = ckpt["step"], ckpt["tokens"]
        if ckpt.get("optim") is not None:
            opts.load_state_dict(ckpt["optim"])
        else:
            say(f"{source} holds no optimizer state: the optimizers start fresh")
        if ckpt.get("rng"):
            torch.set_rng_state(ckpt["rng"]["cpu"])
            if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        say(f"resumed from {source} at step {step}")
    elif source:
        say(f"initialized from {source} (weights only), starting at step 0")
    stop = min(n_total, cfg.max_steps) if cfg.max_steps > 0 else n_total

    def checkpoint_now():
        state = {"model": raw.state_dict(), "optim": opts.state_dict(), "tokens": tokens,
                 "model_config": asdict(mcfg), "config": asdict(cfg), "tokenizer": tok.identity,
                 "rng": {"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        if master:
            path = save_checkpoint(cfg.out_dir, step, state, cfg.keep_checkpoints)
            say(f"step {step}: checkpoint {path}")
        if world > 1:
            dist.barrier()

    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss/grad

    def check_finite():
        bad = int(first_bad.item())
        if bad >= 0:
            raise FloatingPointError(f"non-finite loss or gradient norm at step {bad + 1}: stopping; "
                                     f"the last good checkpoint in {cfg.out_dir} is kept as it was")

    losses, evals, params = [], [], [p for p in raw.parameters()]
    cur_phase, mb, accum = None, 0, 0
    t_log, tok_log = time.perf_counter(), tokens
    loss_acc = torch.zeros((), device=device)
    while step < stop:
        if world > 1:
            note_progress(rank, step)
        pi, i = phase_at(phases, step)
        phase = phases[pi]
        if pi != cur_phase:
            cur_phase = pi
            mb, accum = batch_split(phase, cfg.micro_batch, world)
            say(f"phase {phase['name']}: steps {step}..{step + phase['steps'] - i - 1}, batch {phase['batch']} x "
                f"{phase['seq_len']} = {mb} x {accum} accumulation x {world} ranks, mix {phase['mix']}, "
                f"optimizer {phase['optimizer']}")
            mixture = mixture.with_weights(cfg.mixtures[phase["mix"]])
            if phase["optimizer"] != opts.kind:
                say(f"step {step}: optimizer switch {opts.kind} -> {phase['optimizer']} for the hidden matrices")
                if master:
                    _log(cfg.out_dir, {"step": step, "event": "optimizer_switch", "from": opts.kind,
                                       "to": phase["optimizer"], "phase": phase["name"]})
                opts.use(phase["optimizer"])
        lr = lr_factor(phase, i)
        opts.set_lr(lr)
        loss_step = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = mixture.batch(step, micro, rank, world, mb, phase["seq_len"])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # DDP all-reduces the gradients only in the last micro-step's backward (a fresh context each use)
            sync = model.no_sync if world > 1 and micro < accum - 1 else nullcontext
            with sync(), autocast:
                loss = model(x, y) / accum
            with sync():
                loss.backward()
            loss_step += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        finite = torch.isfinite(loss_step) & torch.isfinite(grad_norm)
        first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, step), first_bad)
        opts.step()
        opts.zero_grad()
        step += 1
        tokens += phase["batch"] * phase["seq_len"]
        losses.append(loss_step)
        loss_acc += loss_step

        last = step == stop
        if step % cfg.log_interval == 0 or last:
            check_finite()
            n_logged = step % cfg.log_interval or cfg.log_interval
            loss_mean = all_reduce_mean(loss_acc / n_logged, world).item()
            loss_acc.zero_()
            dt = time.perf_counter() - t_log
            tps = (tokens - tok_log) / max(dt, 1e-9)
            remaining = sum(p["steps"] * p["batch"] * p["seq_len"] for p in phases[pi + 1:]) + \
                (phase["steps"] - i - 1) * phase["batch"] * phase["seq_len"]
            row = {"step": step, "phase": phase["name"], "loss": loss_mean,
                   "lr": opts.groups[0]["base_lr"] * lr, "lr_factor": lr, "grad_norm": grad_norm.item(),
                   "tokens": tokens, "tokens_per_s": tps, "seq_len": phase["seq_len"],
                   "global_batch": phase["batch"], "optimizer": opts.kind}
            line = (f"step {step}/{n_total} {phase['name']} loss {loss_mean:.4f} lr {row['lr']:.3g} "
                    f"gnorm {row['grad_norm']:.3f} {tps:,.0f} tok/s ETA {remaining / max(tps, 1e-9) / 60:.1f} min")
            if device.type == "cuda":
                row["mfu"] = raw.flops_per_token(phase["seq_len"]) * tps / world / (cfg.gpu_peak_tflops * 1e12)
                line += f" MFU {row['mfu']:.1%}"
            say(line)
            if master:
                _log(cfg.out_dir, row)
            t_log, tok_log = time.perf_counter(), tokens
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or last:
            ev = evaluate(raw, mixture_eval(mixture, cfg), cfg, phase["seq_len"], rank, world, device, autocast)
            evals.append((step, ev))
            say(f"step {step}: held-out loss {ev:.4f}")
            if master:
                _log(cfg.out_dir, {"step": step, "phase": phase["name"], "eval_loss": ev, "tokens": tokens})
            t_log = time.perf_counter()
        if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or last:
            check_finite()
            checkpoint_now()
            t_log = time.perf_counter()

    summary = {"step": step, "losses": [l.item() for l in losses], "evals": evals, "out_dir": cfg.out_dir}
    if master:
        plot_runs({os.path.basename(os.path.normpath(cfg.out_dir)): cfg.out_dir}, os.path.join(cfg.out_dir, "loss.png"))
    if step == n_total and master and cfg.sample_tokens > 0:
        prompt = tok.encode("def ")
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        out = raw.generate(torch.tensor([prompt], device=device), cfg.sample_tokens, temperature=0.8, top_k=50,
                           generator=g)
        summary["sample"] = tok.decode(out[0].tolist())
        say(f"final held-out loss {evals[-1][1]:.4f}\nsample:\n{summary['sample']}")
    if world > 1:
        dist.barrier()  # leave together: no rank tears the group down under another's last collective
    return summary


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
        rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
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


def mixture_eval(mixture, cfg: TrainConfig):
    return mixture.with_weights(cfg.mixtures[cfg.eval_mix])


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["plot"]:  # python train.py plot OUT.png LABEL=OUT_DIR [LABEL=OUT_DIR ...]
            print(plot_runs(dict(a.split("=", 1) for a in sys.argv[3:]), sys.argv[2]) or "matplotlib is not installed")
        else:
            train(sys.argv[1:])
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
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
