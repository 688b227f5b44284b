"""μP, the maximal-update parameterization: why a 20M proxy's learning rate is right for 1.3B.

Under the standard parameterization (SP), the best learning rate shrinks as a model widens: a wider
hidden layer sums more terms, so the same Adam step moves its output further, and a rate tuned on a
small model blows a large one up. μP (Yang et al., "Tensor Programs V") rescales initialisation,
multipliers and per-layer learning rates by the width multiplier m = hidden / base_width so that every
layer's activations and their per-step updates stay O(1) as m grows. Then the optimum of the base
hyper-parameters no longer moves with width, and Xmodel-2.5 tunes them once on a small proxy (base
width 256) and reuses them for the 1.3B model (m = 6).

The rules for Adam, as Xmodel-2.5 uses them (RECIPE.md):

    piece                 init std            Adam LR           forward multiplier (model.py)
    embedding             init_std (0.1)      emb_lr (0.01)     x input_scale (12)
    hidden matrices       init_std/sqrt(m)    lr / m (0.01/m)   residual branches x 1.4/sqrt(L)
    output (tied embed.)  -                   -                 logits x output_scale / m
    norm weights          1                   emb_lr, no decay  -
    attention             -                   -                 softmax scale 1/head_dim

Norm gains are "vector-like" parameters (one dimension grows with width, none is summed over), so μP
gives them the width-independent Adam LR, the same as the embedding; weight decay is off for them as in
the recipe. The public Megatron scripts initialise the two output projections (attention out, MLP down)
with 0.1/sqrt(2 * n_layer) and no width factor; that is not μP-consistent (it would not transfer), so
here every hidden matrix, output projections included, uses init_std/sqrt(m) and the depth dependence
comes from the residual multiplier alone.

This module holds those rules (`init_weights`, `param_groups`, `build_model`) and the tools that make
them visible: a coordinate check, a learning-rate transfer sweep and a proxy hyper-parameter search.
"""
import math

import torch
import torch.nn as nn

from model import ModelConfig, Xmodel


def width_mult(cfg: ModelConfig) -> float:
    """m = hidden / base_width under μP; 1 under the standard parameterization (nothing scales)."""
    return cfg.width_mult if cfg.use_mup else 1.0


def init_stds(cfg: ModelConfig) -> dict:
    """The init std of each kind of weight (SP: one width-independent std for all of them)."""
    return {"embedding": cfg.init_std, "hidden": cfg.init_std / math.sqrt(width_mult(cfg)),
            "output": cfg.init_std}


@torch.no_grad()
def init_weights(model: Xmodel) -> None:
    std = init_stds(model.config)
    nn.init.normal_(model.tok_emb.weight, 0.0, std["embedding"])
    if model.lm_head is not None:
        nn.init.normal_(model.lm_head.weight, 0.0, std["output"])
    for name, p in model.blocks.named_parameters():
        if p.dim() == 2:
            nn.init.normal_(p, 0.0, std["hidden"])
        elif "norm" in name:
            nn.init.ones_(p)
    nn.init.ones_(model.norm.weight)


def build_model(cfg: ModelConfig, device="cpu") -> Xmodel:
    """The model with μP (or SP) initialisation; on the meta device nothing is allocated or initialised."""
    with torch.device(device):
        model = Xmodel(cfg)
    if torch.device(device).type != "meta":
        init_weights(model)
    return model


def param_groups(model: Xmodel, lr: float, emb_lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups with μP learning rates, from base (width base_width) rates.

    Each group carries "name" (hidden / embedding / norm), its peak "lr", "base_lr" (the same value, kept
    for the schedule to scale) and "weight_decay". The "hidden" group is the 2-D block matrices: the ones
    Muon may take over in the decay phase."""
    m = width_mult(model.config)
    hidden, embedding, norm = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and p.dim() == 2:
            hidden.append(p)
        elif p.dim() == 2:
            embedding.append(p)  # the token embedding, and lm_head when untied
        else:
            norm.append(p)
    groups = [dict(name="hidden", params=hidden, lr=lr / m, weight_decay=weight_decay),
              dict(name="embedding", params=embedding, lr=emb_lr, weight_decay=weight_decay),
              dict(name="norm", params=norm, lr=emb_lr, weight_decay=0.0)]
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


# ====================================================================================================
# Tools: seeing μP work (coordinate check), checking that learning rates transfer (sweep), and tuning
# a proxy (search). `python mup.py {coord-check,sweep,search} --help`.
# ====================================================================================================
#
# All three train small members of the recipe's proxy family (RECIPE.md: heads = hidden/head_dim, one
# K/V head, FFN = 2.5 x hidden) for a few steps with AdamW on `param_groups` at a constant learning rate,
# as the paper's sweeps did. Only the width changes between the members of a sweep; everything that is a
# finite dimension under μP (depth, head size, vocabulary, sequence length, batch) stays fixed.
#
# Coordinate check (Yang et al., Tensor Programs V, Fig. 5). μP's claim is about the size of a typical
# coordinate of every activation, |x_i| = Θ(1) in the width n, at init AND after any fixed number of
# updates. After t Adam steps a hidden layer computes (W_0 + ΔW) x, and Adam's ΔW has entries of size
# η regardless of the gradient's scale; because ΔW is built from the same inputs it is applied to, ΔW x
# sums n aligned terms and is of size η·n. SP (η fixed) therefore grows like n after one step, and μP's
# η/m keeps it Θ(1). Likewise the output layer: the logits sum n aligned terms, hence the 1/m multiplier.
# (This project's SP also gives every matrix the same init std, so its W_0 x already grows like sqrt(n).)
# So: measure mean |x| per layer type at widths 64 ... 1024 for a few steps at a large LR and fit
# log2(scale) against log2(width). A slope near 0 is μP working; a slope near 0.5 (a missing 1/sqrt(m) in
# an init) or 1 (a missing 1/m in an LR or multiplier) is a broken rule, visible within 1-3 steps.
#
# LR transfer sweep (Tensor Programs V, Fig. 1). The consequence that matters: the base LR that minimises
# the loss does not move with width under μP, while under SP it has no reason to stay put (in the paper
# it drifts to smaller values as the model widens). Loss vs log2(LR), one curve per width, both
# parameterizations; docs/lr_sweep.png is the default grid's result.
#
# Proxy search. Xmodel-2.5 tuned its base LRs, init std and multipliers on a small proxy with a TPE
# search (Optuna) and copied the winners to the 1.3B config; `search` does the same against the held-out
# loss of a short proxy training and writes the winners into a copy of a config file.

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch.nn.functional as F

COORD_TYPES = ("embedding", "attention", "mlp", "block", "logits")
HIDDEN_TYPES = ("embedding", "attention", "mlp", "block")  # the logits are the output, not a hidden layer
SLOPE_BOUND = 0.25     # |d log2(scale) / d log2(width)| that still counts as "width-independent"
PARAMETERIZATIONS = ("mup", "sp")


def _write_atomic(path, data: bytes | str) -> None:
    """Write to a temporary file in the same directory, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def proxy_config(width: int, n_layer: int, vocab_size: int, use_mup: bool = True, head_dim: int = 64,
                 **overrides) -> ModelConfig:
    """A member of the recipe's proxy family: n_head = width/head_dim, one K/V head, FFN = 2.5 x width.

    Everything else (base width 256, the multipliers, init std) is ModelConfig's default unless
    overridden; use_mup=False gives the standard parameterization of the same shape."""
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
    kw = dict(vocab_size=vocab_size, n_layer=n_layer, hidden=width, ffn_hidden=int(2.5 * width),
              n_head=width // head_dim, n_kv_head=1, max_seq_len=4096, use_mup=use_mup, loss_chunk=4096)
    kw.update(overrides)
    return ModelConfig(**kw)


def make_optimizer(model: Xmodel, lr: float, emb_lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.95, eps 1e-8, the recipe's) on the μP parameter groups of `param_groups`."""
    return torch.optim.AdamW(param_groups(model, lr, emb_lr, weight_decay), betas=(0.9, 0.95), eps=1e-8)


def log_slope(widths, values) -> float:
    """Least-squares slope of log2(value) against log2(width): 0 = width-independent, 1 = grows like width."""
    x, y = np.log2(np.asarray(widths, float)), np.log2(np.asarray(values, float))
    if not np.all(np.isfinite(y)):
        return float("inf")
    return float(np.polyfit(x, y, 1)[0])


# ---------------------------------------------------------------------------------------------------
# Coordinate check
# ---------------------------------------------------------------------------------------------------

def markov_tokens(vocab_size: int, n_seq: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[n_seq, seq_len + 1] token ids from a fixed random Markov chain (something learnable, no corpus).

    Each token has 4 possible successors, taken with probabilities 0.5/0.25/0.15/0.1; the chain's table
    and the first tokens come from `seed`."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(vocab_size, (vocab_size, 4), generator=g)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    out = torch.empty(n_seq, seq_len + 1, dtype=torch.long)
    out[:, 0] = torch.randint(vocab_size, (n_seq,), generator=g)
    for t in range(seq_len):
        k = torch.multinomial(probs.expand(n_seq, 4), 1, generator=g).squeeze(1)
        out[:, t + 1] = succ[out[:, t], k]
    return out


def coord_scales(model: Xmodel, idx: torch.Tensor, targets: torch.Tensor):
    """One forward pass: (loss, {layer type: mean |activation|}), averaged over the blocks of a type.

    embedding = tok_emb(ids) x input_scale (what enters block 0); attention, mlp = each branch's output
    as added to the residual stream (after the residual multiplier); block = a block's output (the
    residual stream); logits = the output layer's logits (after output_scale / m)."""
    sums = {t: [] for t in COORD_TYPES}
    cfg = model.config

    def record(kind, mult=1.0):
        return lambda mod, inp, out: sums[kind].append(out.detach().abs().mean().item() * mult)

    hooks = [model.tok_emb.register_forward_hook(record("embedding", cfg.embed_mult))]
    for b in model.blocks:
        hooks += [b.attn.register_forward_hook(record("attention", b.residual_mult)),
                  b.mlp.register_forward_hook(record("mlp", b.residual_mult)),
                  b.register_forward_hook(record("block"))]
    try:
        logits = model(idx)
    finally:
        for h in hooks:
            h.remove()
    sums["logits"].append(logits.detach().abs().mean().item())
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return loss, {t: float(np.mean(v)) for t, v in sums.items()}


def coord_check(widths=(64, 128, 256, 512, 1024), steps: int = 4, n_layer: int = 2, lr: float = 0.03,
                vocab_size: int = 1024, batch: int = 8, seq_len: int = 64, seeds: int = 2, head_dim: int = 32,
                parameterizations=PARAMETERIZATIONS, log=None) -> dict:
    """Mean |activation| of each layer type at each of steps+1 forward passes (step t = after t Adam
    updates at a large, constant lr = emb_lr), for every width, under μP and SP, averaged over seeds.

    Returns {"config", "widths", "steps", "scales": {param: {type: [[scale per width] per step]}},
    "slopes": {param: {type: log-log slope at the last step}}}."""
    if steps < 1 or seeds < 1 or not widths:
        raise ValueError(f"coord_check: need steps >= 1, seeds >= 1 and some widths (got {steps}, {seeds}, {widths})")
    data = [markov_tokens(vocab_size, batch * (steps + 1), seq_len, seed=1000 + s) for s in range(seeds)]
    scales = {}
    for param in parameterizations:
        if param not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {param!r}; use one of {PARAMETERIZATIONS}")
        acc = {t: np.zeros((steps + 1, len(widths))) for t in COORD_TYPES}
        for wi, width in enumerate(widths):
            t0 = time.time()
            for s in range(seeds):
                torch.manual_seed(s)
                cfg = proxy_config(width, n_layer, vocab_size, use_mup=param == "mup", head_dim=head_dim)
                model = build_model(cfg)
                opt = make_optimizer(model, lr, lr)
                for step in range(steps + 1):
                    w = data[s][step * batch:(step + 1) * batch]
                    loss, sc = coord_scales(model, w[:, :-1], w[:, 1:])
                    for t in COORD_TYPES:
                        acc[t][step, wi] += sc[t] / seeds
                    if step < steps:
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
            if log:
                log(f"coord-check {param:>3} width {width:>5}: {time.time() - t0:5.1f}s  "
                    + "  ".join(f"{t} {acc[t][-1, wi]:.3g}" for t in COORD_TYPES))
        scales[param] = {t: acc[t].tolist() for t in COORD_TYPES}
    slopes = {p: {t: log_slope(widths, scales[p][t][-1]) for t in COORD_TYPES} for p in scales}
    config = dict(widths=list(widths), steps=steps, n_layer=n_layer, lr=lr, emb_lr=lr, vocab_size=vocab_size,
                  batch=batch, seq_len=seq_len, seeds=seeds, head_dim=head_dim, base_width=ModelConfig.base_width,
                  data=f"random Markov chain over {vocab_size} tokens", slope_bound=SLOPE_BOUND)
    return dict(config=config, widths=list(widths), steps=list(range(steps + 1)), scales=scales, slopes=slopes)


def coord_check_ok(result: dict, param: str = "mup", bound: float = SLOPE_BOUND) -> tuple[bool, dict]:
    """μP's promise at the last step: every hidden type's |slope| <= bound and the logits do not grow
    (slope <= bound; under μP they start at O(1/sqrt(m)) and become O(1) as training correlates them).
    Returns (ok, {type: slope})."""
    s = result["slopes"][param]
    ok = all(abs(s[t]) <= bound for t in HIDDEN_TYPES) and s["logits"] <= bound
    return ok, s


# ---------------------------------------------------------------------------------------------------
# Short proxy training on the embedded corpus (used by sweep and search)
# ---------------------------------------------------------------------------------------------------

BPE_VOCAB = 2048
SPECIAL_EOS = "<|endoftext|>"


def small_bpe(vocab_size: int = BPE_VOCAB, cache_dir=None, texts=None) -> str:
    """Path of a byte-level BPE tokenizer.json with vocab_size ids (EOS included), trained once on
    `texts` (default: the embedded stdlib corpus, both domains) and cached.

    Why: under μP the vocabulary is a finite dimension, and a 129k-row softmax would dominate the cost
    of 64-512 wide models on a CPU. A BPE of the same corpus keeps the task (next-token prediction on
    code and prose) while making the output layer small. The tokenizer sees all documents, held-out
    ones included; that touches only the segmentation, not the loss."""
    import data
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"BPE vocab_size {vocab_size} is too small: it needs the 256 bytes + EOS + merges")
    base = Path(cache_dir).expanduser() if cache_dir is not None else data.default_cache_dir()
    path = base / f"mup-bpe{vocab_size}-py{sys.version_info.major}{sys.version_info.minor}" / "tokenizer.json"
    if texts is None and path.is_file():
        return str(path)
    if texts is None:
        docs = data.default_corpus_documents()
        texts = [t for domain in docs.values() for _, t in domain]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    _write_atomic(path, tok.to_str())
    return str(path)


def corpus_mixture(tokenizer: str | None = None, cache_dir=None, dataset: str | None = None, seed: int = 0):
    """(Mixture over "code"/"prose" 50/50, n_vocab) for the embedded corpus tokenized with `tokenizer`
    (default: the cached small BPE), or for an already prepared `dataset` directory."""
    import data

    if dataset is None:
        tokenizer = tokenizer or small_bpe(cache_dir=cache_dir)
        dataset = data.default_corpus(cache_dir, tokenizer=tokenizer, progress=False)
    sources = list(data.read_manifest(dataset)["sources"])
    mix = data.Mixture(dataset, {s: 1.0 / len(sources) for s in sources}, seed=seed)
    n_vocab = int(mix.tokenizer_identity["n_vocab"])
    return mix, n_vocab


@torch.no_grad()
def heldout_loss(model: Xmodel, batches) -> float:
    """Mean next-token cross-entropy over held-out (x, y) batches (token-weighted)."""
    model.eval()
    tot, n = 0.0, 0
    for x, y in batches:
        tot += model(x, y).item() * y.numel()
        n += y.numel()
    model.train()
    return tot / n


def train_proxy(cfg: ModelConfig, lr: float, emb_lr: float, mix, steps: int, batch: int, seq_len: int,
                eval_batches, weight_decay: float = 0.0, seed: int = 0) -> dict:
    """Train a freshly built μP/SP model for `steps` AdamW steps at a constant LR; held-out loss at the end.

    The batches are the mixture's (a pure function of the step), the init is seeded, so two runs that
    differ only in lr see the same data and start from the same weights. A non-finite training loss
    stops the run and reports loss = inf (diverged)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = make_optimizer(model, lr, emb_lr, weight_decay)
    train = []
    for step in range(steps):
        x, y = mix.batch(step, 0, 0, 1, batch, seq_len)
        loss = model(x, y)
        if not torch.isfinite(loss):
            return dict(loss=float("inf"), train=train, diverged=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train.append(loss.item())
    loss = heldout_loss(model, eval_batches)
    return dict(loss=loss if math.isfinite(loss) else float("inf"), train=train, diverged=not math.isfinite(loss))


# ---------------------------------------------------------------------------------------------------
# Learning-rate transfer sweep
# ---------------------------------------------------------------------------------------------------

def lr_grid(lo: int = -12, hi: int = -4) -> list[float]:
    """2^lo ... 2^hi, one point per power of two."""
    return [2.0 ** k for k in range(lo, hi + 1)]


def optimum(runs: list[dict]) -> dict | None:
    """The run with the lowest finite held-out loss (None if all diverged)."""
    ok = [r for r in runs if math.isfinite(r["loss"])]
    return min(ok, key=lambda r: r["loss"]) if ok else None


def summarize_sweep(result: dict) -> dict:
    """{param: {width: {"lr", "loss", "log2_lr"}}} of the optimum per width, and the spread of the
    optimum across widths in grid steps (powers of two)."""
    table = {}
    for p in result["config"]["parameterizations"]:
        table[p] = {}
        for w in result["config"]["widths"]:
            best = optimum([r for r in result["runs"] if r["param"] == p and r["width"] == w])
            if best is not None:
                table[p][str(w)] = dict(lr=best["lr"], loss=best["loss"], log2_lr=round(math.log2(best["lr"]), 3))
        k = [v["log2_lr"] for v in table[p].values()]
        table[p + "_spread_grid_steps"] = (max(k) - min(k)) if k else None
    return table


_WORKER = {}


def _sweep_worker_init(dataset: str, eval_windows: int, batch: int, seq_len: int, seed: int, threads: int):
    import data
    torch.set_num_threads(threads)
    sources = list(data.read_manifest(dataset)["sources"])
    mix = data.Mixture(dataset, {s: 1.0 / len(sources) for s in sources}, seed=seed)
    _WORKER.update(mix=mix, evals=mix.eval_batches(eval_windows, batch, seq_len, seed=seed))


def _sweep_task(task):
    p, w, lr, c = task
    t0 = time.time()
    cfg = proxy_config(w, c["n_layer"], c["vocab_size"], use_mup=p == "mup")
    r = train_proxy(cfg, lr, lr, _WORKER["mix"], c["steps"], c["batch"], c["seq_len"], _WORKER["evals"],
                    c["weight_decay"], c["seed"])
    return dict(param=p, width=w, lr=lr, loss=r["loss"], diverged=r["diverged"], seconds=round(time.time() - t0, 2))


def lr_sweep(widths=(64, 128, 256, 512), lrs=None, steps: int = 128, n_layer: int = 2, batch: int = 8,
             seq_len: int = 64, eval_windows: int = 64, parameterizations=PARAMETERIZATIONS, dataset=None,
             weight_decay: float = 0.0, seed: int = 0, jobs: int = 2, threads: int = 1, out_json=None,
             log=None) -> dict:
    """Held-out loss after `steps` constant-LR AdamW steps for every (parameterization, width, base lr).

    The base lr is used for both groups (lr = emb_lr = η): μP then gives hidden matrices η/m and the
    embedding η; SP gives every parameter η. dataset: a prepared dataset directory (default: the
    embedded corpus with the small BPE). Runs are spread over `jobs` processes of `threads` torch
    threads each (many small runs parallelize better than threads inside one). With out_json, the
    result is rewritten after every run and an existing file with the same config is resumed."""
    import data
    lrs = [float(x) for x in lrs] if lrs is not None else lr_grid(-10, -3)
    if dataset is None:
        dataset = data.default_corpus(None, tokenizer=small_bpe(), progress=False)
    for p in parameterizations:
        if p not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {p!r}; use one of {PARAMETERIZATIONS}")
    n_vocab = int(data.read_manifest(dataset)["tokenizer"]["n_vocab"])
    config = dict(widths=list(widths), lrs=lrs, steps=steps, n_layer=n_layer, batch=batch, seq_len=seq_len,
                  eval_windows=eval_windows, parameterizations=list(parameterizations), vocab_size=n_vocab,
                  weight_decay=weight_decay, seed=seed, head_dim=64, base_width=ModelConfig.base_width,
                  tokenizer=data.read_manifest(dataset)["tokenizer"]["name"],
                  optimizer="AdamW(0.9, 0.95, eps 1e-8), constant LR, no warmup, no clipping")
    runs = []
    if out_json is not None and Path(out_json).is_file():
        try:
            old = json.loads(Path(out_json).read_text())
            if old.get("config") == config:
                runs = old["runs"]
        except (json.JSONDecodeError, KeyError):
            pass
    done = {(r["param"], r["width"], r["lr"]) for r in runs}
    # widest first: the long runs start early, so the pool does not end on one straggler
    tasks = [(p, w, lr, config) for w in sorted(widths, reverse=True) for p in parameterizations for lr in lrs
             if (p, w, lr) not in done]
    result = dict(config=config, runs=runs)
    init = (str(dataset), eval_windows, batch, seq_len, seed, threads)

    def finish(r):
        runs.append(r)
        if log:
            log(f"sweep {r['param']:>3} width {r['width']:>4} lr 2^{math.log2(r['lr']):+.1f}: held-out loss "
                f"{r['loss']:.4f}  ({r['seconds']:.1f}s)")
        result["optimum"] = summarize_sweep(result)
        if out_json is not None:
            _write_atomic(out_json, json.dumps(result, indent=1))

    if jobs <= 1:
        saved = torch.get_num_threads()
        _sweep_worker_init(*init)
        try:
            for t in tasks:
                finish(_sweep_task(t))
        finally:
            torch.set_num_threads(saved)
    else:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(jobs, _sweep_worker_init, init) as pool:
            for r in pool.imap_unordered(_sweep_task, tasks):
                finish(r)
    runs.sort(key=lambda r: (PARAMETERIZATIONS.index(r["param"]), r["width"], r["lr"]))
    result["optimum"] = summarize_sweep(result)
    if out_json is not None:
        _write_atomic(out_json, json.dumps(result, indent=1))
    return result




# ---------------------------------------------------------------------------------------------------
# Proxy hyper-parameter search (Optuna TPE, as the paper)
# ---------------------------------------------------------------------------------------------------

MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))
# what the search may tune, with default ranges (low, high), all sampled on a log scale
SEARCH_SPACE = {"lr": (2.0 ** -10, 2.0 ** -3), "emb_lr": (2.0 ** -10, 2.0 ** -3), "init_std": (0.02, 0.4),
                "input_scale": (1.0, 32.0), "residual_scale": (0.5, 4.0)}
TUNABLE = ("lr", "emb_lr", "init_std", "input_scale", "residual_scale", "output_scale")


def load_config_file(path) -> dict:
    """A config file (plain Python assignments, as train.py reads them) -> {name: value} of its public,
    non-module, non-callable names."""
    path = Path(path)
    try:
        src = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {str(path)!r} does not exist") from None
    ns: dict = {}
    exec(compile(src, str(path), "exec"), ns)
    return {k: v for k, v in ns.items() if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def model_config_from(values: dict, **overrides) -> ModelConfig:
    """ModelConfig from the model keys of a config dict (other keys, e.g. lr, are ignored)."""
    kw = {k: values[k] for k in MODEL_KEYS if k in values}
    kw.update(overrides)
    return ModelConfig(**kw)


def parse_space(items) -> dict:
    """["lr=1e-3:1e-1", ...] -> {"lr": (1e-3, 1e-1), ...} on top of SEARCH_SPACE; "name=off" drops one."""
    space = dict(SEARCH_SPACE)
    for item in items or []:
        name, sep, rng = item.partition("=")
        if not sep or name not in TUNABLE:
            raise ValueError(f"--space {item!r}: expected NAME=LOW:HIGH with NAME one of {TUNABLE}")
        if rng == "off":
            space.pop(name, None)
            continue
        try:
            lo, hi = (float(x) for x in rng.split(":"))
        except ValueError:
            raise ValueError(f"--space {item!r}: expected NAME=LOW:HIGH with two numbers") from None
        if not 0 < lo < hi:
            raise ValueError(f"--space {item!r}: need 0 < LOW < HIGH (the search is on a log scale)")
        space[name] = (lo, hi)
    if not space:
        raise ValueError("the search space is empty")
    return space


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("`python mup.py search` needs Optuna (an optional dependency): pip install optuna") from None
    return optuna


def _storage(optuna, study_path: str):
    """A resumable on-disk study: SQLite when SQLAlchemy is installed, else Optuna's journal file."""
    path = Path(study_path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import sqlalchemy  # noqa: F401  (optuna's RDB storage needs it)
    except ImportError:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        return JournalStorage(JournalFileBackend(str(path)))
    return f"sqlite:///{path}"


def format_best_config(base_text: str, base_path: str, best: dict, note: str) -> str:
    """The base config file, then the tuned assignments (later assignments win when the file is exec'd)."""
    lines = [base_text.rstrip("\n"), "", f"# --- tuned by `python mup.py search` on the proxy ({note}); "
             f"base config: {base_path} ---"]
    lines += [f"{k} = {v!r}" for k, v in best.items()]
    return "\n".join(lines) + "\n"


def search(base_config="configs/proxy20m.py", trials: int = 20, study_path="out/mup_search.db",
           out_path="best_config.py", space=None, steps: int = 100, batch: int = 8, seq_len: int = 64,
           eval_windows: int = 64, width: int | None = None, n_layer: int | None = None, dataset=None,
           study_name: str = "mup-proxy", seed: int = 0, log=None) -> dict:
    """Tune the base hyper-parameters on a short proxy training with Optuna's TPE sampler.

    Objective: held-out loss after `steps` constant-LR AdamW steps of the base config's model (optionally
    at another width / depth) with the small-BPE vocabulary. The study lives in `study_path` (SQLite), so
    a second call continues it: `trials` is the total budget of finished trials. The first trial is the
    base config's own values (when inside the space), so the result is never worse than the baseline.
    Writes out_path = the base config + the best values; returns {"best", "loss", "trials", "out"}."""
    import data
    optuna = _optuna()
    space = dict(space) if space is not None else dict(SEARCH_SPACE)
    for k in space:
        if k not in TUNABLE:
            raise ValueError(f"search space key {k!r} is not tunable; use {TUNABLE}")
    base_vals = load_config_file(base_config)
    if dataset is None:
        dataset = data.default_corpus(None, tokenizer=small_bpe(), progress=False)
    n_vocab = int(data.read_manifest(dataset)["tokenizer"]["n_vocab"])
    over = dict(vocab_size=n_vocab, max_seq_len=max(seq_len, 64), fp8=False, act_ckpt=False)
    if width is not None:
        head_dim = model_config_from(base_vals).head_dim
        over.update(hidden=width, ffn_hidden=int(2.5 * width), n_head=max(1, width // head_dim), n_kv_head=1)
    if n_layer is not None:
        over["n_layer"] = n_layer
    proxy = model_config_from(base_vals, **over)
    sources = list(data.read_manifest(dataset)["sources"])
    mix = data.Mixture(dataset, {s: 1.0 / len(sources) for s in sources}, seed=seed)
    evals = mix.eval_batches(eval_windows, batch, seq_len, seed=seed)
    wd = float(base_vals.get("weight_decay", 0.0))
    setup = dict(base_config=str(base_config), proxy={k: getattr(proxy, k) for k in MODEL_KEYS},
                 space={k: list(v) for k, v in space.items()}, steps=steps, batch=batch, seq_len=seq_len,
                 eval_windows=eval_windows, weight_decay=wd, tokenizer=mix.tokenizer_identity.get("name"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(optuna, study_path)
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    old = study.user_attrs.get("setup")
    if old is None:
        study.set_user_attr("setup", json.loads(json.dumps(setup)))
    elif old != json.loads(json.dumps(setup)):
        diff = sorted(k for k in setup if json.loads(json.dumps(setup))[k] != old.get(k))
        raise ValueError(f"study {str(study_path)!r} ({study_name}) was started with another setup (differs in "
                         f"{diff}); use a new --study file or the same arguments")
    finished = lambda: [t for t in study.trials if t.state.is_finished()]  # noqa: E731
    if not study.trials:
        start = {k: float(base_vals[k]) if k in base_vals else float(getattr(proxy, k)) for k in space}
        if all(space[k][0] <= v <= space[k][1] for k, v in start.items()):
            study.enqueue_trial(start)
    # a resumed study gets a fresh sampler seed, so its random start-up points are not the first run's
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))

    def objective(trial):
        vals = {k: trial.suggest_float(k, lo, hi, log=True) for k, (lo, hi) in space.items()}
        lr = vals.get("lr", float(base_vals.get("lr", 0.01)))
        emb_lr = vals.get("emb_lr", float(base_vals.get("emb_lr", lr)))
        cfg = replace(proxy, **{k: v for k, v in vals.items() if k in MODEL_KEYS})
        t0 = time.time()
        r = train_proxy(cfg, lr, emb_lr, mix, steps, batch, seq_len, evals, wd, seed)
        if log:
            log(f"trial {trial.number:>3}: held-out loss {r['loss']:.4f} ({time.time() - t0:.1f}s)  "
                + "  ".join(f"{k}={v:.4g}" for k, v in vals.items()))
        return r["loss"] if math.isfinite(r["loss"]) else float("inf")

    todo = max(0, trials - len(finished()))
    if todo:
        study.optimize(objective, n_trials=todo)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and math.isfinite(t.value)]
    if not done:
        raise RuntimeError(f"study {str(study_path)!r}: no trial finished with a finite loss")
    best = min(done, key=lambda t: t.value)
    best_vals = {k: float(f"{v:.6g}") for k, v in best.params.items()}
    note = (f"study {Path(study_path).name}, trial {best.number} of {len(done)}, held-out loss {best.value:.4f} "
            f"after {steps} steps at hidden {proxy.hidden} x {proxy.n_layer} layers, vocab {n_vocab}")
    _write_atomic(out_path, format_best_config(Path(base_config).read_text(), str(base_config), best_vals, note))
    return dict(best=best_vals, loss=best.value, trials=len(done), out=str(out_path), trial=best.number)


# ---------------------------------------------------------------------------------------------------
# Plots (matplotlib is optional: the JSON is always written)
# ---------------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_png(fig, path) -> None:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    _write_atomic(path, buf.getvalue())


def plot_coord_check(result: dict, path) -> bool:
    """Log-log mean |activation| vs width, one panel per step, μP row above SP row. False if no matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    params = list(result["scales"])
    steps = result["steps"]
    fig, axes = plt.subplots(len(params), len(steps), figsize=(2.6 * len(steps), 2.5 * len(params)),
                             squeeze=False, sharey="row")
    names = {"mup": "μP", "sp": "SP"}
    for r, p in enumerate(params):
        for c, t in enumerate(steps):
            ax = axes[r][c]
            for typ in COORD_TYPES:
                ax.plot(result["widths"], [v for v in result["scales"][p][typ][c]], marker="o", ms=3, label=typ)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{names[p]}, step {t}", fontsize=9)
            ax.tick_params(labelsize=7)
            if r == len(params) - 1:
                ax.set_xlabel("width", fontsize=8)
        axes[r][0].set_ylabel("mean |activation|", fontsize=8)
    axes[0][0].legend(fontsize=6)
    c = result["config"]
    fig.suptitle(f"coordinate check: {c['n_layer']} layers, Adam lr {c['lr']:g}, {c['seeds']} seeds, "
                 f"vocab {c['vocab_size']}", fontsize=9)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


def plot_sweep(result: dict, path) -> bool:
    """Held-out loss vs base LR (log2), one curve per width, μP and SP side by side. False if no matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    c = result["config"]
    params = c["parameterizations"]
    fig, axes = plt.subplots(1, len(params), figsize=(5.2 * len(params), 3.8), squeeze=False, sharey=True)
    finite = [r["loss"] for r in result["runs"] if math.isfinite(r["loss"])]
    lo = min(finite) if finite else 0.0
    names = {"mup": "μP", "sp": "SP (standard)"}
    for ax, p in zip(axes[0], params):
        for w in c["widths"]:
            rs = sorted((r for r in result["runs"] if r["param"] == p and r["width"] == w), key=lambda r: r["lr"])
            xs = [math.log2(r["lr"]) for r in rs if math.isfinite(r["loss"])]
            ys = [r["loss"] for r in rs if math.isfinite(r["loss"])]
            line, = ax.plot(xs, ys, marker="o", ms=3, label=f"width {w}")
            best = optimum(rs)
            if best is not None:
                ax.plot([math.log2(best["lr"])], [best["loss"]], marker="*", ms=12, color=line.get_color())
        ax.set_title(names.get(p, p), fontsize=10)
        ax.set_xlabel("log2 base learning rate", fontsize=9)
        ax.set_ylim(lo - 0.1, lo + 2.0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"held-out loss after {c['steps']} steps", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"LR transfer: {c['n_layer']} layers, {c['steps']} steps x {c['batch']}x{c['seq_len']} tokens, "
                 f"BPE vocab {c['vocab_size']} (stars: optimum; missing points diverged)", fontsize=9)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


def format_sweep_table(result: dict) -> str:
    """The optimum per width as a text table (one column per parameterization)."""
    opt = summarize_sweep(result)
    params = result["config"]["parameterizations"]
    lines = ["width  " + "  ".join(f"{p + ' best lr':>16} {'loss':>7}" for p in params)]
    for w in result["config"]["widths"]:
        cells = []
        for p in params:
            b = opt[p].get(str(w))
            best = f"{b['lr']:.3g} (2^{b['log2_lr']:+g})" if b else "no finite run"
            cells.append(f"{best:>16} {b['loss'] if b else float('nan'):7.4f}")
        lines.append(f"{w:>5}  " + "  ".join(cells))
    for p in params:
        lines.append(f"{p}: optimum spread across widths = {opt[p + '_spread_grid_steps']} grid steps (powers of 2)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="μP tools: coordinate check, LR transfer sweep, proxy search.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="held-out loss vs base LR at several widths, μP and SP")
    s.add_argument("--out", default="docs")
    s.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    s.add_argument("--lrs", type=float, nargs="+", default=None, help="base LRs (default 2^-10 ... 2^-3)")
    s.add_argument("--steps", type=int, default=128)
    s.add_argument("--n-layer", type=int, default=2)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=64)
    s.add_argument("--eval-windows", type=int, default=64)
    s.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel runs of --threads torch threads each (default: one per core)")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--dataset", default=None)
    c = sub.add_parser("coord-check", help="activation scale vs width over a few large-LR steps, μP and SP")
    c.add_argument("--out", default="docs")
    c.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--n-layer", type=int, default=2)
    c.add_argument("--lr", type=float, default=0.01)
    c.add_argument("--vocab", type=int, default=1024)
    c.add_argument("--seeds", type=int, default=2)
    c.add_argument("--head-dim", type=int, default=32, help="fixed head size (heads = width / head_dim)")
    c.add_argument("--threads", type=int, default=None)
    q = sub.add_parser("search", help="Optuna TPE search of base LRs, init std and multipliers on the proxy")
    q.add_argument("--base", default="configs/proxy20m.py", help="config file to tune and copy")
    q.add_argument("--trials", type=int, default=20, help="total finished trials wanted in the study")
    q.add_argument("--study", default="out/mup_search.db", help="the study file (SQLite); reuse it to resume")
    q.add_argument("--study-name", default="mup-proxy")
    q.add_argument("--out", default="best_config.py")
    q.add_argument("--space", action="append", metavar="NAME=LOW:HIGH",
                   help=f"override a range (log scale) or NAME=off; tunable: {', '.join(TUNABLE)}; defaults: "
                        + ", ".join(f"{k}={lo:g}:{hi:g}" for k, (lo, hi) in SEARCH_SPACE.items()))
    q.add_argument("--steps", type=int, default=100)
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--seq-len", type=int, default=64)
    q.add_argument("--eval-windows", type=int, default=64)
    q.add_argument("--width", type=int, default=None, help="proxy width (default: the base config's)")
    q.add_argument("--n-layer", type=int, default=None, help="proxy depth (default: the base config's)")
    q.add_argument("--dataset", default=None)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    args = ap.parse_args(argv)
    try:
        _run(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        ap.exit(2, f"mup.py {args.cmd}: error: {e}\n")


def _run(args):
    say = lambda m: print(m, flush=True)  # noqa: E731
    if getattr(args, "threads", None) and args.cmd != "sweep":
        torch.set_num_threads(args.threads)
    if args.cmd == "coord-check":
        out = Path(args.out)
        res = coord_check(args.widths, args.steps, args.n_layer, args.lr, args.vocab, seeds=args.seeds,
                          head_dim=args.head_dim, log=say)
        _write_atomic(out / "coord_check.json", json.dumps(res, indent=1))
        for p in res["slopes"]:
            ok, sl = coord_check_ok(res, p)
            say(f"{p}: log-log slopes at step {args.steps}: " + "  ".join(f"{t} {v:+.2f}" for t, v in sl.items())
                + f"  -> {'width-independent' if ok else 'GROWS with width'} (bound {SLOPE_BOUND})")
        if plot_coord_check(res, out / "coord_check.png"):
            say(f"wrote {out / 'coord_check.json'} and {out / 'coord_check.png'}")
        else:
            say(f"wrote {out / 'coord_check.json'}; the plot needs matplotlib (pip install matplotlib)")
    elif args.cmd == "search":
        res = search(args.base, args.trials, args.study, args.out, parse_space(args.space), args.steps, args.batch,
                     args.seq_len, args.eval_windows, args.width, args.n_layer, args.dataset, args.study_name,
                     args.seed, log=say)
        say(f"best of {res['trials']} trials (trial {res['trial']}): held-out loss {res['loss']:.4f}  "
            + "  ".join(f"{k}={v:g}" for k, v in res["best"].items()) + f"\nwrote {res['out']}")
    elif args.cmd == "sweep":
        out = Path(args.out)
        res = lr_sweep(args.widths, args.lrs, args.steps, args.n_layer, args.batch, args.seq_len,
                       args.eval_windows, dataset=args.dataset, jobs=args.jobs, threads=args.threads,
                       out_json=out / "lr_sweep.json", log=lambda m: print(m, flush=True))
        say(format_sweep_table(res))
        if plot_sweep(res, out / "lr_sweep.png"):
            say(f"wrote {out / 'lr_sweep.json'} and {out / 'lr_sweep.png'}")
        else:
            say(f"wrote {out / 'lr_sweep.json'}; the plot needs matplotlib (pip install matplotlib)")


if __name__ == "__main__":
    main()
