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
hidden matrices to Muon (`enter_phase`, `muon.Optimizers.use`).

Long-context stretching is nothing but the last phases of the config: the same loop with a longer seq_len
and a smaller global batch (about the same tokens per step). What changes there: RoPE already has the long
base (rope_base 500k) from step 0, so only the windows grow; `batch_split` picks a smaller micro-batch
(a phase may set its own `micro_batch`) and more accumulation; the LR climbs back up linearly from the
decay's end and decays again.

Each step: the global batch is split into micro-batches x gradient accumulation x data-parallel ranks; the
learning rate of every μP group is its peak times the schedule's factor; gradients are clipped to norm 1.0.
The loop does not wait on the device except at logging steps: the loss and a "first bad step" marker stay on
the device, so a NaN stops the run naming its step without ever being written into a checkpoint; on several
ranks the decision to stop early (a signal, the time limit) is agreed in host memory, a step late
(`runtime.Preemption.vote`).

The run's plumbing (the machine, config files, checkpoints, the process group, metrics, the report) is
runtime.py; a reader of the recipe can skip it.
"""
import math
import os
import sys
import time
import typing
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

import data
import mup
import runtime
from model import COMPILE_MODES, ModelConfig
from muon import Optimizers


@dataclass
class TrainConfig:
    out_dir: str = "out/run"           # checkpoints, metrics.jsonl, config.json, loss.png
    device: str = "auto"               # auto | cpu | cuda | mps (auto: CUDA, else Apple MPS, else CPU)
    dtype: str = "auto"                # auto | float32 | bfloat16 (autocast; master weights stay fp32)
    seed: int = 0                      # model init and data order (data is a pure function of seed and step)
    max_steps: int = 0                 # stop after this many steps (with a checkpoint); 0 = whole curriculum
    compile: bool = False              # torch.compile each block
    compile_mode: str = "default"      # its mode: default | reduce-overhead (CUDA graphs) | max-autotune(...)
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
    zero1: bool = False                # shard optimizer state across ranks (ZeroRedundancyOptimizer)
    micro_batch: int = 8               # sequences per rank per forward (a phase may set its own)
    # data
    tokenizer: str = "deepseek-v3"     # or a tokenizer.json path, tiktoken:NAME, a .tiktoken file
    data: typing.Optional[dict] = None  # {source: prepared dataset dir or raw .txt/.jsonl/dir}; None = embedded corpus
    data_cache: str = ""               # where raw text and the default corpus are prepared ("" = data.py's default)
    mixtures: dict = field(default_factory=lambda: {"stable": {"prose": 0.5, "code": 0.5}})  # {name: {source: weight}}
    eval_mix: str = "stable"           # the mixture held-out loss is measured on
    phases: list = field(default_factory=list)  # the curriculum: a list of phase dicts (docs/CONFIG.md)
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
    ckpt_timeout_s: int = 3600         # how long a checkpoint's write may wait for the slowest rank
    time_limit: typing.Union[int, str] = 0  # stop with a checkpoint before this wall time: s or "[D-]HH:MM:SS"
    stop_margin_s: int = 60            # time_limit: kept free for the final checkpoint (or the last write time)
    preempt_grace_s: int = 25          # SIGTERM/SIGUSR1: the step's checkpoint only if written by then (s)
    # dry-run cost model
    gpus: int = 0                      # the data-parallel size the dry run plans for (0 = the current one)
    gpu_peak_tflops: float = 989.0     # the GPU's dense bf16 peak (H100 SXM)
    mfu: float = 0.4                   # the model-FLOPs utilization the dry run assumes (a phase may set its own)


LR_SHAPES = ("linear", "constant", "exp")
OPTIMIZERS = ("adamw", "muon")
PHASE_KEYS = {"name", "steps", "lr", "batch", "seq_len", "mix", "optimizer", "micro_batch", "mfu"}
OPTIONAL_PHASE_KEYS = {"micro_batch", "mfu"}
# ModelConfig keys that change how the model is computed, not what it is: a resume may change them
EXECUTION_KEYS = ("act_ckpt", "loss_chunk", "fp8_backend", "fp8_margin", "attn_backend", "gqa")


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


def batch_split(phase: dict, micro_batch: int, world: int) -> tuple[int, int]:
    """global batch -> (sequences per micro-batch per rank, gradient-accumulation steps): the largest
    micro-batch up to the phase's (or the config's) micro_batch that divides each rank's share."""
    if phase["batch"] % world:
        raise ValueError(f"phase {phase['name']!r}: global batch {phase['batch']} is not divisible by the "
                         f"world size {world}")
    share = phase["batch"] // world
    mb = max(d for d in range(1, min(phase.get("micro_batch", micro_batch), share) + 1) if share % d == 0)
    return mb, share // mb


def total_steps(phases: list) -> int:
    return sum(p["steps"] for p in phases)


def phase_spans(phases: list, stop: int | None = None) -> list[tuple[dict, int, int]]:
    """(phase, its first step, its end step) of every phase, the end cut at `stop` (none: the whole curriculum);
    a phase wholly past `stop` has end < first."""
    spans, begin = [], 0
    for p in phases:
        end = begin + p["steps"]
        spans.append((p, begin, end if stop is None else min(end, stop)))
        begin = end
    return spans


def curriculum_tokens(phases: list, start: int = 0, stop: int | None = None) -> int:
    """Tokens trained in steps [start, stop) of the curriculum (the whole of it by default)."""
    return sum(max(0, end - max(begin, start)) * p["batch"] * p["seq_len"]
               for p, begin, end in phase_spans(phases, stop))


def stop_step(cfg: TrainConfig) -> int:
    """The step this run stops after: the curriculum's end, or max_steps if that comes first."""
    n = total_steps(cfg.phases)
    return min(n, cfg.max_steps) if cfg.max_steps > 0 else n


# ----------------------------------------------------------------------------------------------------
# the loop

@dataclass
class Run:
    """What the loop works with: the configs, this process's place among the ranks, the data, the model
    and its optimizers, and where the run's rows and results go."""
    cfg: TrainConfig
    mcfg: ModelConfig
    rank: int                          # this process among `world` data-parallel ranks (rank 0 logs and saves)
    world: int
    device: torch.device
    tok: data.Tokenizer
    mixture: data.Mixture              # the curriculum's windows: each phase's mix, each window once per pass
    model: torch.nn.Module             # the Xmodel: its weights, FP8 scales, sampling
    ddp: torch.nn.Module               # what forward/backward run through: DDP around `model` on several ranks
    opts: Optimizers                   # AdamW for everything, or Muon for the hidden matrices from the switch on
    sinks: runtime.Sinks | None        # metrics.jsonl (+ TensorBoard / W&B); rank 0 only
    ckpt: runtime.Checkpointer         # checkpoints, every rank writing its share in the background
    say: typing.Callable               # print on rank 0, nothing elsewhere
    summary: dict                      # what run() returns: step, losses, evals, checkpoint, sample, preempted
    fp8_range: torch.Tensor | None = None  # FP8: the largest range use since the last row (fp8.update_scales)


def enter_phase(r: Run, phase: dict, step: int, i: int) -> tuple[int, int]:
    """A phase boundary: the micro-batch / accumulation split, a new data mix, and possibly the optimizer
    switch of the hidden matrices (AdamW -> Muon at the decay; logged as an event row).
    Returns (micro-batch, accumulation)."""
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
    return mb, accum  # the phase's data mix: the Mixture knows the curriculum (build_data)


def train_step(r: Run, params: list, phase: dict, step: int, mb: int, accum: int):
    """One optimizer step over the phase's global batch: `accum` micro-batches of `mb` sequences on each rank.
    Returns this rank's loss and the global gradient norm, as device tensors (no sync)."""
    loss_step = torch.zeros((), device=r.device)
    for micro in range(accum):
        x, y = runtime.to_device(r.mixture.batch(step, micro, r.rank, r.world, mb, phase["seq_len"]), r.device)
        # DDP all-reduces the gradients only in the last micro-step's backward (a fresh context each use)
        sync = r.ddp.no_sync if r.world > 1 and micro < accum - 1 else nullcontext
        with sync(), runtime.autocast(r.device, r.cfg.dtype):
            loss = r.ddp(x, y) / accum
        with sync():
            loss.backward()
        use = r.model.update_fp8_scales()  # FP8: this micro-batch's amaxes, one all-reduce for every layer
        if use is not None:
            r.fp8_range = use if r.fp8_range is None else torch.maximum(r.fp8_range, use)
        loss_step += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, r.cfg.grad_clip)
    r.opts.step()
    r.opts.zero_grad()
    return loss_step, grad_norm


def due(step: int, interval: int) -> bool:
    """Whether an every-`interval`-steps action (log, checkpoint, evaluation) falls after `step` steps."""
    return interval > 0 and step % interval == 0


def train_loop(r: Run, step: int, tokens: int, unlogged: dict, preemption: runtime.Preemption) -> tuple[int, int]:
    """Steps from `step` to the run's stop (or a preemption); returns the last step done and the tokens trained
    by then. Logs every
    log_interval steps, checkpoints every ckpt_interval, evaluates every eval_interval and at the end."""
    cfg, phases, stop, start = r.cfg, r.cfg.phases, stop_step(r.cfg), step
    first_bad = torch.full((), -1, dtype=torch.long, device=r.device)  # first step with a non-finite loss/grad
    if start and start < stop and due(start, cfg.eval_interval):  # the evaluation of the resumed step is redone
        evaluate(r, start, tokens, phases[phase_at(phases, start - 1)[0]])
    params = list(r.model.parameters())
    cur_phase, mb, accum, t_start = None, 0, 0, time.perf_counter()
    meter = runtime.Meter(tokens, unlogged["loss_sum"], unlogged["steps"], r.device)
    t_polled = t_start
    while step < stop:
        if r.world > 1:
            runtime.note_progress(r.rank, step)
        pi, i = phase_at(phases, step)
        phase = phases[pi]
        if pi != cur_phase:
            cur_phase = pi
            mb, accum = enter_phase(r, phase, step, i)
        lr = lr_factor(phase, i)
        r.opts.set_lr(lr)
        loss, grad_norm = train_step(r, params, phase, step, mb, accum)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, step), first_bad)
        step += 1
        tokens += phase["batch"] * phase["seq_len"]
        meter.add(loss)
        log_due, ckpt_due = due(step, cfg.log_interval), due(step, cfg.ckpt_interval) or step == stop
        eval_due = due(step, cfg.eval_interval) or step == stop
        if ckpt_due:  # the checkpoint in flight, if its write is slower than ckpt_interval steps
            wait_checkpoint(r)
        step_s, t_polled = time.perf_counter() - t_polled, time.perf_counter()  # the whole last iteration
        # every rank's stop reason (a signal, the time limit), agreed a step late unless the host waits here anyway
        stopping = preemption.vote(step_s, r.ckpt.write_s, settle=log_due or ckpt_due or eval_due)
        if log_due or step == stop or stopping:
            check_finite(first_bad, cfg.out_dir)
            log_row(r, meter, step, tokens, phase, lr, grad_norm, closes=log_due)
        elif step - start == 2:  # a first estimate of the whole run's time, long before the first log row
            tps = meter.tokens_per_s(tokens)
            eta = curriculum_tokens(phases, step, stop) / tps / 60
            r.say(f"step {step}: {tps:,.0f} tok/s over the first steps; the whole run: about "
                  f"{(time.perf_counter() - t_start) / 60 + eta:.1f} min (ETA {eta:.1f} min)")
        if stopping:
            stop_early(r, step, tokens, meter, first_bad, stopping, preemption)
            break
        t_held = time.perf_counter()
        if ckpt_due:  # before evaluating: never costs weights
            write_checkpoint(r, step, tokens, meter, first_bad)
        if eval_due:
            evaluate(r, step, tokens, phase)
        meter.hold(time.perf_counter() - t_held)  # checkpoints and evaluations are not training time
    if step == stop and start == stop and stop:  # resumed a finished run: its final evaluation again
        evaluate(r, step, tokens, phases[phase_at(phases, step - 1)[0]])
    wait_checkpoint(r)  # the last one (its write overlapped the final evaluation) complete before the end
    return step, tokens


def log_row(r: Run, meter: runtime.Meter, step: int, tokens: int, phase: dict, lr: float, grad_norm, closes: bool):
    """The row of `step`: the loss averaged over the ranks (an all-reduce: every rank calls this), the hidden
    matrices' LR, throughput, and MFU on a GPU. `closes`: a full interval ends here (a row cut short by a
    stop or a preemption keeps its sum, which the checkpoint carries into the resumed run)."""
    tps, local = meter.tokens_per_s(tokens), meter.mean_loss()
    loss = runtime.all_reduce_mean(local, r.world).item()
    eta = curriculum_tokens(r.cfg.phases, step, stop_step(r.cfg)) / max(tps, 1e-9) / 60
    row = {"step": step, "phase": phase["name"], "loss": loss, "lr": r.opts.hidden_groups[0]["base_lr"] * lr,
           "lr_factor": lr, "grad_norm": grad_norm.item(), "tokens": tokens, "tokens_per_s": tps,
           "seq_len": phase["seq_len"], "global_batch": phase["batch"], "optimizer": r.opts.kind}
    line = (f"step {step}/{total_steps(r.cfg.phases)} {phase['name']} loss {loss:.4f} lr {row['lr']:.3g} "
            f"gnorm {row['grad_norm']:.3f} {tps:,.0f} tok/s ETA {eta:.1f} min")
    if r.fp8_range is not None:  # above 1: a tensor outgrew its delayed scale and was clipped (docs/FP8.md)
        row["fp8_range"] = dict(zip(("x", "w", "dy"), r.fp8_range.tolist()))
        r.fp8_range = None
    if r.device.type == "cuda":
        row["mfu"] = r.model.flops_per_token(phase["seq_len"]) * tps / r.world / (r.cfg.gpu_peak_tflops * 1e12)
        line += f" MFU {row['mfu']:.1%}"
    r.say(line)
    r.summary["losses"].append(local.item())
    if r.sinks:
        r.sinks.log(row)
    if closes:
        meter.close_interval(tokens)
    else:
        meter.pause(tokens)


def check_finite(first_bad: torch.Tensor, out_dir: str) -> None:
    bad = int(first_bad.item())
    if bad >= 0:
        raise FloatingPointError(f"non-finite loss or gradient norm at step {bad + 1}: stopping; "
                                 f"the last good checkpoint in {out_dir} is kept as it was")


def write_checkpoint(r: Run, step: int, tokens: int, meter: runtime.Meter, first_bad: torch.Tensor) -> None:
    """Start the checkpoint of `step` (runtime.Checkpointer: every rank writes its share, in the background),
    only if no step so far was non-finite and the weights are finite. Training waits only for the checkpoint
    still in flight, if any (an error in writing it stops the run here, on every rank) and for the copy of its
    own share to CPU memory."""
    check_finite(first_bad, r.cfg.out_dir)
    if not torch.stack([torch.isfinite(p).all() for p in r.model.parameters()]).all():  # one device sync
        raise FloatingPointError(f"non-finite weights after step {step}: no checkpoint written; the last "
                                 f"good checkpoint in {r.cfg.out_dir} is kept as it was")
    wait_checkpoint(r)
    optim, replicated, owned = runtime.checkpoint_parts(r.model, {"rest": r.opts.rest, "hidden": r.opts.hidden},
                                                         r.world)
    optim["kind"] = r.opts.kind
    meta = {"optim": optim, "tokens": tokens, "model_config": asdict(r.mcfg), "config": asdict(r.cfg),
            "tokenizer": r.tok.identity,
            "log": {"loss_sum": runtime.all_reduce_mean(meter.loss, r.world).cpu(), "steps": meter.n},
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(r.device) if r.device.type == "cuda" else None}}
    waited = r.ckpt.save(step, meta, replicated, owned)
    r.say(f"step {step}: checkpoint started (training waited {waited:.2f} s; the rest is written in the background)")


def wait_checkpoint(r: Run) -> None:
    """Wait for the checkpoint in flight, if any: complete (and listed) when this returns."""
    if r.ckpt.in_flight():
        r.summary["checkpoint"] = r.ckpt.wait()
        r.say(f"checkpoint {r.summary['checkpoint']} complete ({r.ckpt.write_s:.1f} s to write)")


def stop_early(r: Run, step: int, tokens: int, meter: runtime.Meter, first_bad: torch.Tensor, why: int,
               preemption: runtime.Preemption) -> None:
    """A signal or the time limit, after step `step`: a checkpoint made safe before the exit. The one in flight
    is completed; then this step's own is written and completed, unless (after a signal) the last write's
    duration says it would end past preempt_grace_s from the signal: then the last one is kept, at most
    ckpt_interval steps back. So the run exits within preempt_grace_s of the signal whenever the rest of
    the step (on several ranks also the next one: their vote is read a step late, Preemption) and the write
    in flight fit in it; since_signal() counts from the signal itself, so the late vote's step is in the
    deadline. The time limit always writes it: stop_margin_s is for it."""
    wait_checkpoint(r)
    late = (why == runtime.STOP_SIGNAL and r.ckpt.write_s is not None
            and preemption.since_signal() + r.ckpt.write_s > r.cfg.preempt_grace_s)
    if runtime.any_rank(late, r.world, r.device):
        r.summary["kept"] = r.summary["checkpoint"]
    else:
        write_checkpoint(r, step, tokens, meter, first_bad)
        wait_checkpoint(r)
    ago = preemption.since_signal()
    if why == runtime.STOP_SIGNAL and r.world > 1:  # the signal may have reached another rank only: its time
        ago = runtime.max_over_ranks(round(ago * 1000), r.world, r.device) / 1000
    r.summary["preempted"] = (f"time limit ({preemption.limit:g} s)" if why == runtime.STOP_TIME else
                              f"preempted ({preemption.signal or 'a signal to another rank'}, {ago:.1f} s ago)")
    kept = (f"; {r.summary['kept']} is kept (this step's own would have ended past preempt_grace_s="
            f"{r.cfg.preempt_grace_s})" if r.summary.get("kept") else " with a checkpoint")
    r.say(f"{r.summary['preempted']}: stopped after step {step}{kept}; continue with: "
          f"{runtime.launch_command('train.py', sys.argv[1:])}")


# ----------------------------------------------------------------------------------------------------
# setting up a run: data, model, optimizers, the state to continue from; evaluation; the end

def start_run(cfg: TrainConfig, mcfg: ModelConfig, tok, mixture, rank: int, world: int, device,
              say) -> tuple[Run, int, int, dict]:
    """Everything the loop needs: the data checked against the whole curriculum before anything trains,
    the model, the optimizers, metrics.jsonl and config.json; and the state to continue from: (run, step,
    tokens, the unfinished log interval)."""
    check_run(cfg, mixture, world)
    torch.manual_seed(cfg.seed)
    model = mup.build_model(mcfg, device)
    if cfg.compile:
        model.compile_for_training(cfg.compile_mode)
    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        # gradients as views of DDP's all-reduce buckets: no second copy of every gradient (5.2 GB per GPU at 1.3B)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)
    opts = Optimizers(mup.param_groups(model, cfg.lr, cfg.emb_lr, cfg.weight_decay), cfg, cfg.phases[0]["optimizer"])
    step, tokens, unlogged = restore(cfg, mcfg, model, opts, tok, rank, world, device, say, mixture.fingerprints)
    if step > stop_step(cfg):  # before metrics.jsonl is cut back to the checkpoint's step
        raise ValueError(f"resume: the latest checkpoint in {cfg.out_dir} is at step {step}, past this run's end at "
                         f"step {stop_step(cfg)} (" + (f"max_steps={cfg.max_steps}" if cfg.max_steps else
                         "the curriculum's length") + "): nothing to train; the checkpoint and metrics are untouched")
    if world > 1 and 0 < step < stop_step(cfg):
        runtime.settle_ddp_buckets(ddp, model, cfg.dtype, device)
    ckpt = runtime.Checkpointer(cfg.out_dir, cfg.keep_checkpoints, rank, world, cfg.ckpt_timeout_s)
    sinks = None
    if rank == 0:
        runtime.start_metrics(cfg.out_dir, step if cfg.resume and step else None,
                              unlogged["steps"] > 0 and step < stop_step(cfg))
        runtime.write_config(cfg.out_dir, {"train": asdict(cfg), "model": asdict(mcfg)}, device, world,
                             say, cfg.verbose)
        sinks = runtime.Sinks(cfg.out_dir, cfg.log_to, cfg.wandb_project, asdict(cfg))
    summary = {"step": step, "losses": [], "evals": [], "out_dir": cfg.out_dir, "checkpoint": None,
               "sample": None, "preempted": False}
    run = Run(cfg, mcfg, rank, world, device, tok, mixture, model, ddp, opts, sinks, ckpt, say, summary)
    return run, step, tokens, unlogged


def build_data(cfg: TrainConfig, mcfg: ModelConfig, rank: int):
    """The tokenizer and the Mixture of the run: the embedded corpus, or `data`'s sources, raw text among them
    prepared into data_cache. Every rank calls this before it joins the process group, so no collective ever
    waits on tokenization (a dataset directory's lock lets one process build it while the others wait)."""
    tok = data.get_tokenizer(cfg.tokenizer)
    if cfg.data is None:
        sources = data.default_corpus(cfg.data_cache or None, tokenizer=tok, progress=rank == 0)
    else:
        sources = data.ready_sources(cfg.data, cfg.data_cache, tok, progress=rank == 0)
    mixture = data.Mixture(sources, cfg.mixtures[cfg.eval_mix], seed=cfg.seed, vocab_size=mcfg.vocab_size,
                           tokenizer=tok)
    return tok, mixture.schedule(data_schedule(cfg))


def data_schedule(cfg: TrainConfig) -> list[dict]:
    """The curriculum as the Mixture draws it: each phase's steps, global batch, seq_len and weights."""
    return [{"steps": p["steps"], "batch": p["batch"], "seq_len": p["seq_len"], "mix": p["mix"],
             "weights": cfg.mixtures[p["mix"]], "name": f"phases[{i}] ({p['name']})"} for i, p in enumerate(cfg.phases)]


def restore(cfg: TrainConfig, mcfg: ModelConfig, model, opts: Optimizers, tok, rank: int, world: int, device,
            say, data_fingerprints: dict | None = None) -> tuple[int, int, dict]:
    """Continue from the latest checkpoint (--resume) or start from a checkpoint's weights (--init_from). Every
    rank verifies its share of the checkpoint's files and reads what it needs (the weights, and of sharded
    optimizer state its own share, whatever the world size that wrote it); then one collective compares what
    the ranks found and the data each reads (runtime.agree_on_checkpoint). The model config and the tokenizer
    must be the run's.
    Returns (step, tokens, the unfinished log interval: {"loss_sum", "steps"}) to start from."""
    fresh = {"loss_sum": torch.zeros(()), "steps": 0}
    found = runtime.list_checkpoints(cfg.out_dir) if cfg.resume else []
    if cfg.resume and not found:
        say(f"resume: no checkpoint in {cfg.out_dir}, starting from step 0")
    source = found[-1] if found else cfg.init_from
    def optimizers_for(meta):  # the checkpoint's hidden-matrix optimizer first: it decides what a rank keeps
        if not found or meta.get("optim") is None:
            return None
        opts.use(meta["optim"]["kind"])
        return {"rest": opts.rest, "hidden": opts.hidden}

    ckpt, problem = runtime.read_start(source, rank, world, optimizers_for) if source else (None, None)
    runtime.agree_on_checkpoint(rank, world, cfg.out_dir, {
        "checkpoint": source if found else None, "problem": problem,
        "step": ckpt["step"] if found and ckpt else 0, "tokens": ckpt["tokens"] if found and ckpt else 0,
        "data": data_fingerprints})
    if not source:
        return 0, 0, fresh
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
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
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


def evaluate(r: Run, step: int, tokens: int, phase: dict) -> None:
    """The run's held-out loss at `step`: cfg.eval_windows fixed windows of the eval mix at the phase's length."""
    c = r.cfg
    batches = r.mixture.with_weights(c.mixtures[c.eval_mix]).eval_batches(c.eval_windows, c.eval_batch,
                                                                           phase["seq_len"], seed=c.seed)
    ev = runtime.heldout_loss(r.model, batches, r.device, runtime.autocast(r.device, c.dtype), r.rank, r.world)
    r.summary["evals"].append((step, ev))
    r.say(f"step {step}: held-out loss {ev:.4f}")
    if r.sinks:
        r.sinks.log({"step": step, "phase": phase["name"], "eval_loss": ev, "tokens": tokens})


def finish(r: Run, t_start: float, tokens: int) -> None:
    """Rank 0's last act: a sample from the trained model, then the plot, the report and the closing lines."""
    if r.summary["step"] == total_steps(r.cfg.phases) and r.cfg.sample_tokens > 0:
        g = torch.Generator(device=r.device).manual_seed(r.cfg.seed)
        prompt = torch.tensor([r.tok.doc_start + r.tok.encode("def ")], device=r.device)
        ids = r.model.generate(prompt, r.cfg.sample_tokens, temperature=0.8, top_k=50, generator=g)
        r.summary["sample"] = r.tok.decode(ids[0].tolist())
        r.say(f"sample:\n{r.summary['sample']}")
        with runtime.atomic_write(os.path.join(r.cfg.out_dir, "sample.txt")) as f:
            f.write(r.summary["sample"])
    runtime.wrap_up(r.cfg.out_dir, r.summary, tokens, time.perf_counter() - t_start, r.say)


# ----------------------------------------------------------------------------------------------------
# the config: a Python file of assignments, --key=value and --phase.NAME.KEY=value; checked before step 1

USAGE = """usage: python train.py [CONFIG.py] [--key=value ...] [--phase.NAME.KEY=value ...]
       torchrun --nproc_per_node=N train.py CONFIG.py [...]

A config is a Python file of assignments (configs/proxy20m.py, configs/xmodel25.py). Any key below can be
overridden as --key=value (a Python literal; --flag alone means True) and any key of one phase of the
curriculum as --phase.NAME.KEY=value (e.g. --phase.decay.optimizer=adamw), of every phase as
--phase.*.KEY=value (--phase.*.optimizer=adamw: the AdamW-only ablation). Phase keys: name, steps,
lr=(shape, start, end) with shape linear|constant|exp, batch (global, sequences), seq_len, mix, optimizer
(adamw|muon) and optionally micro_batch and mfu (the dry run's cost). --dry_run prints the plan and its cost
on any machine."""


def load_config(argv: list[str]) -> dict:
    """argv = [CONFIG.py] [--key=value ...] [--phase.NAME.KEY=value ...] -> {"train": TrainConfig, "model": ModelConfig}."""
    values, dotted = runtime.read_config(argv)
    model_keys = typing.get_type_hints(ModelConfig)
    for key in values:
        if key not in typing.get_type_hints(TrainConfig) and key not in model_keys:
            raise ValueError(f"unknown config key {key!r} (python train.py --help lists them)")
    tcfg, mcfg = runtime.build_config(TrainConfig, values), runtime.build_config(ModelConfig, values)
    for i, p in enumerate(tcfg.phases):  # each one copied below: a stray string or number is named, not a TypeError
        if not isinstance(p, dict):
            raise ValueError(f"config key 'phases': phases[{i}] must be a dict of phase keys, got {p!r}")
    tcfg.phases = [dict(p) for p in tcfg.phases]
    for key, value in dotted:  # --phase.decay.optimizer=adamw, --phase.*.optimizer=adamw
        kind, name, pkey = (key.split(".", 2) + ["", ""])[:3]
        hits = [p for p in tcfg.phases if name in ("*", p.get("name"))]
        wrong = ("only phase keys are dotted" if kind != "phase" else
                 f"unknown phase key {pkey!r} (one of {sorted(PHASE_KEYS)})" if pkey not in PHASE_KEYS else
                 f"no phase named {name!r} (phases: {[p.get('name') for p in tcfg.phases]}, or * for all)"
                 if not hits else None)  # the one part that is wrong: a message that blames none of the others
        if wrong:
            raise ValueError(f"config override --{key}: {wrong}; the form is --phase.NAME.KEY=value")
        for p in hits:
            p[pkey] = value
    validate(tcfg, mcfg)
    return {"train": tcfg, "model": mcfg}


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
    (("max_steps", "eval_interval", "ckpt_interval", "sample_tokens", "gpus", "seed", "stop_margin_s",
      "preempt_grace_s"), lambda v: v >= 0, "an integer >= 0"),
]


def validate(cfg: TrainConfig, mcfg: ModelConfig | None = None) -> None:
    """Everything that can be checked without the data: choices, the range of every number, the mixtures."""
    for key, choices in (("device", runtime.DEVICES), ("dtype", runtime.DTYPES), ("compile_mode", COMPILE_MODES)):
        if getattr(cfg, key) not in choices:
            raise ValueError(f"config key {key!r}: one of {choices}, got {getattr(cfg, key)!r}")
    for keys, ok, what in _RANGES:
        for k in keys:
            v = getattr(cfg, k)
            if not runtime.is_number(v) or (isinstance(v, float) and math.isnan(v)) or not ok(v):
                raise ValueError(f"config key {k!r} must be {what}, got {v!r}")
    try:
        runtime.parse_duration(cfg.time_limit)
    except ValueError as e:
        raise ValueError(f"config key 'time_limit': {e}") from None
    if not cfg.out_dir.strip():  # "--out_dir=" would otherwise fail later as a directory named ''
        raise ValueError(f"config key 'out_dir': a directory path, got {cfg.out_dir!r}")
    if not (isinstance(cfg.log_to, list) and set(cfg.log_to) <= set(runtime.LOG_SINKS)):
        raise ValueError(f"config key 'log_to': a list of {runtime.LOG_SINKS}, got {cfg.log_to!r}")
    if cfg.eval_mix not in cfg.mixtures:
        raise ValueError(f"config key 'eval_mix': {cfg.eval_mix!r} is not in mixtures {sorted(cfg.mixtures)}")
    for name, mix in cfg.mixtures.items():
        if not isinstance(mix, dict) or not mix or not all(  # the weights' types before their sum
                runtime.is_number(w) and math.isfinite(w) and w >= 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"config key 'mixtures': {name!r} must map sources to finite weights >= 0, not all 0; "
                             f"got {mix!r}")
    validate_phases(cfg, mcfg)
    validate_sources(cfg)


def validate_sources(cfg: TrainConfig) -> None:
    """Every source the phases' and the evaluation's mixtures name is one of `data`'s (with data = None, the
    embedded corpus's): an error before hours of preparing the others, as Mixture.schedule words it once they
    are prepared."""
    sources = list(cfg.data) if cfg.data is not None else list(data.DEFAULT_CORPUS_SOURCES)
    uses = [(f"phases[{i}] ({p['name']})", p["mix"]) for i, p in enumerate(cfg.phases)]
    for where, mix in uses + [("config key 'eval_mix'", cfg.eval_mix)]:
        unknown = [s for s in cfg.mixtures[mix] if s not in sources]
        if unknown:
            raise ValueError(f"{where}: mixture {mix!r} names source {unknown[0]!r}, which the data does not have "
                             f"(sources: {sources})")


def validate_phases(cfg: TrainConfig, mcfg: ModelConfig | None = None) -> None:
    """Every phase of the curriculum: its keys, positive sizes, an LR shape, a known mix and optimizer."""
    if not cfg.phases:
        raise ValueError("config key 'phases': the curriculum is empty (the defaults have none: give a config file, "
                         "e.g. python train.py configs/proxy20m.py)")
    for i, p in enumerate(cfg.phases):  # looked up by (a set of names, the mixtures): a list would be a TypeError
        for k in ("name", "mix"):
            if k in p and not isinstance(p[k], str):
                raise ValueError(f"phases[{i}]: {k} must be a string, got {p[k]!r}")
    names = [p.get("name") for p in cfg.phases]
    if len(set(names)) != len(names):
        raise ValueError(f"config key 'phases': phase names must be unique, got {names}")
    for i, p in enumerate(cfg.phases):
        where = f"phases[{i}] ({p.get('name', '?')})"
        missing = PHASE_KEYS - OPTIONAL_PHASE_KEYS - set(p)
        if missing or set(p) - PHASE_KEYS:
            raise ValueError(f"{where}: missing keys {sorted(missing)} / unknown keys {sorted(set(p) - PHASE_KEYS)}")
        for k in ("steps", "batch", "seq_len") + (("micro_batch",) if "micro_batch" in p else ()):
            if not isinstance(p[k], int) or isinstance(p[k], bool) or p[k] <= 0:
                raise ValueError(f"{where}: {k} must be a positive integer, got {p[k]!r}")
        lr = p["lr"]
        if not (isinstance(lr, (tuple, list)) and len(lr) == 3 and lr[0] in LR_SHAPES
                and all(runtime.is_number(v) and math.isfinite(v) and v >= 0 for v in lr[1:])):
            raise ValueError(f"{where}: lr must be (shape, start, end) with shape in {LR_SHAPES} and "
                             f"finite start, end >= 0 (fractions of the peak LR), got {lr!r}")
        if "mfu" in p and not (runtime.is_number(p["mfu"]) and 0 < p["mfu"] <= 1):
            raise ValueError(f"{where}: mfu must be in (0, 1], got {p['mfu']!r}")
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
    evaluated = range(len(cfg.phases)) if cfg.eval_interval else [phase_at(cfg.phases, stop_step(cfg) - 1)[0]]
    for i, p in enumerate(cfg.phases):
        where = f"phases[{i}] ({p['name']})"
        if p["batch"] % world:
            raise ValueError(f"{where}: global batch {p['batch']} is not divisible by the world size {world}")
        needs = [(s, "train", p["mix"]) for s, w in cfg.mixtures[p["mix"]].items() if w > 0]
        if i in evaluated:
            needs += [(s, "heldout", cfg.eval_mix) for s, w in cfg.mixtures[cfg.eval_mix].items() if w > 0]
        for source, split, mix in needs:
            n = mixture.split_tokens(source, split)
            if n < p["seq_len"] + 1:
                raise ValueError(f"{where}: seq_len {p['seq_len']} needs {p['seq_len'] + 1} tokens per window, but "
                                 f"source {source!r} has {n} in its {split} split (mixture {mix!r})")


# ----------------------------------------------------------------------------------------------------
# the plan: printed at the start of every run, and with its cost by --dry_run

def _si(n: float) -> str:
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= v:
            return f"{n / v:.2f}{unit}"
    return f"{n:.0f}"


def print_plan(cfg: TrainConfig, model, world: int, say, start: int = 0) -> None:
    """The model in one line and the curriculum as a table, from `start` to the run's stop: steps, batch
    split, tokens, LR, mix, optimizer and the memory per GPU (last column: with act_ckpt and ZeRO-1)."""
    mcfg, stop = model.config, stop_step(cfg)
    say(f"model: {model.num_params() / 1e6:.1f}M parameters ({model.num_params(embedding=False) / 1e6:.1f}M "
        f"without the embedding), {mcfg.n_layer} x {mcfg.hidden}, width multiplier m = {mcfg.width_mult:g}, "
        f"μP {'on' if mcfg.use_mup else 'off'}")
    say(f"  {'phase':<10} {'steps':>15} {'batch x seq':>13} {'mb x acc x world':>17} {'tokens':>8} "
        f"{'LR (x peak)':<24} {'mix':>7} {'opt':>6} {'GB/GPU':>7} {'ckpt+zero1':>10}")
    for p, begin, end in phase_spans(cfg.phases, stop):
        if end > max(begin, start):
            mb, acc = batch_split(p, cfg.micro_batch, world)
            muon = p["optimizer"] == "muon"
            mem = model.memory_estimate_gb(mb, p["seq_len"], muon, world, False, mcfg.act_ckpt)
            lean = model.memory_estimate_gb(mb, p["seq_len"], muon, world, True, True)
            shape, lr0, lr1 = p["lr"]
            say(f"  {p['name']:<10} {f'{begin:,}..{end - 1:,}':>15} {p['batch']:>5} x {p['seq_len']:<6} "
                f"{mb:>5} x {acc:>3} x {world:<4} {_si((end - begin) * p['batch'] * p['seq_len']):>8} "
                f"{f'{shape} {lr0:.3g}->{lr1:.3g}':<24} {p['mix']:>7} {p['optimizer']:>6} {mem:>7.1f} {lean:>10.1f}")
    say(f"plan: {stop - start:,} steps to run of {total_steps(cfg.phases):,}, "
        f"{_si(curriculum_tokens(cfg.phases, start, stop))} tokens of {_si(curriculum_tokens(cfg.phases))} in the "
        f"curriculum, {world} rank(s)")


def dry_run(cfg: TrainConfig, mcfg: ModelConfig, world: int) -> dict:
    """The plan and what it costs, on any machine (a meta-device model: nothing is allocated). Each phase's
    GPU-hours at its own `mfu` (measured figures in configs/xmodel25.py), else the config's."""
    world = cfg.gpus or world
    model = mup.build_model(mcfg, device="meta")
    groups = mup.param_groups(model, cfg.lr, cfg.emb_lr, cfg.weight_decay)
    print("peak LRs: " + ", ".join(f"{g['name']} {g['lr']:.4g} (wd {g['weight_decay']:g})" for g in groups))
    print_plan(cfg, model, world, print)
    stop, flops, gpu_hours, cost = stop_step(cfg), 0.0, 0.0, []
    for p, begin, end in phase_spans(cfg.phases, stop):
        phase_flops = max(0, end - begin) * p["batch"] * p["seq_len"] * model.flops_per_token(p["seq_len"])
        hours = phase_flops / (cfg.gpu_peak_tflops * 1e12 * p.get("mfu", cfg.mfu)) / 3600
        flops, gpu_hours = flops + phase_flops, gpu_hours + hours
        cost.append(f"{p['name']} {hours:,.4g} ({p.get('mfu', cfg.mfu):.0%})")
    tokens = curriculum_tokens(cfg.phases, 0, stop)
    print(f"total: {stop:,} steps, {_si(tokens)} tokens, {model.flops_per_token(cfg.phases[0]['seq_len']):.3g} "
          f"FLOPs/token at {cfg.phases[0]['seq_len']}, {flops:.3g} FLOPs; {gpu_hours:,.4g} GPU-hours of "
          f"{cfg.gpu_peak_tflops:g} TFLOP/s at each phase's MFU; memory per GPU with {world} data-parallel GPUs "
          f"(last column: with activation checkpointing and ZeRO-1)")
    print(f"GPU-hours per phase (its MFU): {', '.join(cost)}")
    print(data_table(cfg))
    return dict(params=model.num_params(), steps=stop, tokens=tokens, flops=flops, gpu_hours=gpu_hours)


def data_table(cfg: TrainConfig) -> str:
    """The dry run's data lines: per source, the tokens there are and the passes the curriculum makes over
    them (data.passes), where the data is prepared on this machine; else one line saying so."""
    found = data.prepared_sources(cfg.data, cfg.data_cache or None, cfg.tokenizer)
    if found is None:
        return ("data: the table of tokens per source (available, drawn, passes) needs the prepared data, which is "
                "not on this machine (docs/DATA.md: how to prepare it)")
    try:
        mixture = data.Mixture(found, cfg.mixtures[cfg.eval_mix]).schedule(data_schedule(cfg))
    except (ValueError, OSError) as e:
        return f"data: {e}"
    return data.describe_passes(data.passes(mixture, stop_step(cfg)))


# ----------------------------------------------------------------------------------------------------
# the entry point

def run(cfg: TrainConfig, mcfg: ModelConfig) -> dict:
    """Run the curriculum (from its start, or from where --resume finds it) on this process's rank.
    Returns the summary: the last step, this rank's logged losses, the held-out evaluations, the last
    checkpoint, the sample, whether it was preempted."""
    master = int(os.environ.get("RANK", 0)) == 0
    say = (lambda *a, **k: print(*a, **k, flush=True)) if master else (lambda *a, **k: None)
    t_start = time.perf_counter()
    cfg.device, cfg.dtype = runtime.resolve_machine(cfg.device, cfg.dtype, say)
    runtime.check_out_dir(cfg.out_dir, cfg.resume)
    lock = runtime.RunLock(cfg.out_dir) if master else None
    preemption = runtime.Preemption(runtime.parse_duration(cfg.time_limit), cfg.stop_margin_s)
    r, world, broken = None, 1, False
    try:
        runtime.raise_open_files_limit()  # a memory map (a file descriptor) per data shard
        tok, mixture = build_data(cfg, mcfg, int(os.environ.get("RANK", 0)))  # before joining the group
        rank, world, device = runtime.setup_distributed(cfg.device, cfg.dist_timeout_s)
        r, step, tokens, unlogged = start_run(cfg, mcfg, tok, mixture, rank, world, device, say)
        preemption.join(world, cfg.dist_timeout_s)  # the ranks' stop vote (its own group, after the checkpoints')
        print_plan(cfg, r.model, world, say, step)
        if not runtime.can_plot():
            say("note: matplotlib is not installed: no loss.png will be drawn (pip install matplotlib)")
        step, tokens = train_loop(r, step, tokens, unlogged, preemption)
        r.summary["step"] = step
        if r.summary["preempted"]:
            return r.summary
        if world > 1:  # leave together: no rank tears the group down under another's last collective; before
            dist.barrier()  # finish, so no rank waits (under dist_timeout_s) while rank 0 draws and samples
        if rank == 0:
            finish(r, t_start, tokens)
        return r.summary
    except RuntimeError as e:
        broken = world > 1 and runtime.is_collective_failure(e)
        if broken:
            raise runtime.collective_failure(e, cfg.dist_timeout_s) from e
        raise
    except KeyboardInterrupt:  # Ctrl-C: the checkpoint in flight completes, then one line says what is on disk
        if r:
            with suppress(OSError):
                r.ckpt.wait()
        latest = (runtime.list_checkpoints(cfg.out_dir) or [None])[-1]
        raise KeyboardInterrupt("stopped without a checkpoint of its own; " + (
            f"the latest is {latest}; continue with: {runtime.launch_command('train.py', sys.argv[1:])}" if latest
            else "none was written yet")) from None
    finally:
        if r and not broken:  # a checkpoint still in flight (an error stopped the run) completes before the exit
            with suppress(OSError):
                r.ckpt.wait()
        if r and r.sinks:
            r.sinks.close()
        preemption.restore()
        if lock:
            lock.release()


def train(argv: list[str]) -> dict:
    """`python train.py ARGV` as a function (tests, notebooks): load the config, run it, return the summary."""
    conf = load_config(argv)
    if conf["train"].dry_run:
        raise ValueError("--dry_run plans without training: use dry_run() or the command line")
    return run(conf["train"], conf["model"])


def config_help() -> str:
    return runtime.config_help(USAGE, [(TrainConfig, "training keys (train.TrainConfig)"),
                                       (ModelConfig, "model keys (model.ModelConfig)")])


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(config_help())
        return
    conf = load_config(argv)
    if conf["train"].dry_run:  # a plan needs no device: any machine plans any run
        dry_run(conf["train"], conf["model"], int(os.environ.get("WORLD_SIZE", 1)))
        return
    run(conf["train"], conf["model"])


if __name__ == "__main__":
    runtime.run_main(main, sys.argv[1:])
