"""Coordinate check (Yang et al., Tensor Programs V, Fig. 5): seeing μP work.

    python -m tools.coord_check --out docs            # docs/coord_check.json and docs/coord_check.png

μP's claim is about the size of a typical coordinate of every activation, |x_i| = Θ(1) in the width n,
at init AND after any fixed number of updates. After t Adam steps a hidden layer computes (W_0 + ΔW) x,
and Adam's ΔW has entries of size η regardless of the gradient's scale; because ΔW is built from the same
inputs it is applied to, ΔW x sums n aligned terms and is of size η·n. SP (η fixed) therefore grows like
n after one step, and μP's η/m keeps it Θ(1). Likewise the output layer: the logits sum n aligned terms,
hence the 1/m multiplier. (This project's SP also gives every matrix the same init std, so its W_0 x
already grows like sqrt(n).)

So: measure mean |x| per layer type at widths 64 ... 1024 for a few steps at a large LR and fit
log2(scale) against log2(width). A slope near 0 is μP working; a slope near 0.5 (a missing 1/sqrt(m) in
an init) or 1 (a missing 1/m in an LR or multiplier) is a broken rule, visible within 1-3 steps. The
data is a random Markov chain (tools.proxy.markov_tokens): the check needs gradients, not a corpus.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import mup
import runtime
from model import ModelConfig, Xmodel
from tools.proxy import (PARAMETERIZATIONS, add_machine_options, add_variant_options, make_optimizer,
                         markov_tokens, proxy_config, pyplot, report_written, save_png, write_json)
from tools import model_overrides

COORD_TYPES = ("embedding", "attention", "mlp", "block", "logits")
HIDDEN_TYPES = ("embedding", "attention", "mlp", "block")  # the logits are the output, not a hidden layer
SLOPE_BOUND = 0.25     # |d log2(scale) / d log2(width)| that still counts as "width-independent"


def log_slope(widths, values) -> float:
    """Least-squares slope of log2(value) against log2(width): 0 = width-independent, 1 = grows like width."""
    x, y = np.log2(np.asarray(widths, float)), np.log2(np.asarray(values, float))
    if not np.all(np.isfinite(y)):
        return float("inf")
    return float(np.polyfit(x, y, 1)[0])


def coord_scales(model: Xmodel, idx: torch.Tensor, targets: torch.Tensor):
    """One forward pass: (loss, {layer type: mean |activation|}), averaged over the blocks of a type.

    embedding = tok_emb(ids) x input_scale (what enters block 0); attention, mlp = each branch's output
    as added to the residual stream (after the residual multiplier); block = a block's output (the
    residual stream); logits = the output layer's logits (after output_scale / m)."""
    sums = {t: [] for t in COORD_TYPES}
    cfg = model.config

    def record(kind, mult=1.0):
        return lambda mod, inp, out: sums[kind].append(out.detach().float().abs().mean().item() * mult)

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
    sums["logits"].append(logits.detach().float().abs().mean().item())
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return loss, {t: float(np.mean(v)) for t, v in sums.items()}


def coord_check(widths=(64, 128, 256, 512, 1024), steps: int = 4, n_layer: int = 2, lr: float = 0.03,
                vocab_size: int = 1024, batch: int = 8, seq_len: int = 64, seeds: int = 2, head_dim: int = 32,
                parameterizations=PARAMETERIZATIONS, device: str = "cpu", dtype: str = "float32",
                log=None, overrides=None) -> dict:
    """Mean |activation| of each layer type at each of steps+1 forward passes (step t = after t Adam
    updates at a large, constant lr = emb_lr), for every width, under μP and SP, averaged over seeds.
    overrides: ModelConfig fields for every model (e.g. {"init_out": "mup"}).

    Returns {"config", "widths", "steps", "scales": {param: {type: [[scale per width] per step]}},
    "slopes": {param: {type: log-log slope at the last step}}}."""
    if steps < 1 or seeds < 1 or not widths:
        raise ValueError(f"coord_check: need steps >= 1, seeds >= 1 and some widths (got {steps}, {seeds}, {widths})")
    tokens = [markov_tokens(vocab_size, batch * (steps + 1), seq_len, seed=1000 + s).to(device) for s in range(seeds)]
    scales = {}
    for param in parameterizations:
        if param not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {param!r}; use one of {PARAMETERIZATIONS}")
        acc = {t: np.zeros((steps + 1, len(widths))) for t in COORD_TYPES}
        for wi, width in enumerate(widths):
            t0 = time.time()
            for s in range(seeds):
                torch.manual_seed(s)
                cfg = proxy_config(width, n_layer, vocab_size, use_mup=param == "mup", head_dim=head_dim,
                                   **(overrides or {}))
                model = mup.build_model(cfg, device)
                opt = make_optimizer(model, lr, lr)
                for step in range(steps + 1):
                    w = tokens[s][step * batch:(step + 1) * batch]
                    with runtime.autocast(device, dtype):
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
                  data=f"random Markov chain over {vocab_size} tokens", slope_bound=SLOPE_BOUND,
                  device=torch.device(device).type, dtype=dtype, model_overrides=dict(overrides or {}))
    return dict(config=config, widths=list(widths), steps=list(range(steps + 1)), scales=scales, slopes=slopes)


def coord_check_ok(result: dict, param: str = "mup", bound: float = SLOPE_BOUND) -> tuple[bool, dict]:
    """μP's promise at the last step: every hidden type's |slope| <= bound and the logits do not grow
    (slope <= bound; under μP they start at O(1/sqrt(m)) and become O(1) as training correlates them).
    Returns (ok, {type: slope})."""
    s = result["slopes"][param]
    ok = all(abs(s[t]) <= bound for t in HIDDEN_TYPES) and s["logits"] <= bound
    return ok, s


def plot_coord_check(result: dict, path) -> bool:
    """Log-log mean |activation| vs width, one panel per step, μP row above SP row. False if no matplotlib."""
    plt = pyplot()
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
    variant = "".join(f", {k}={v}" for k, v in c.get("model_overrides", {}).items())
    fig.suptitle(f"coordinate check: {c['n_layer']} layers, Adam lr {c['lr']:g}, {c['seeds']} seeds, "
                 f"vocab {c['vocab_size']}{variant}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.coord_check",
                                 description="μP coordinate check: activation scale vs width over a few "
                                             "large-LR Adam steps, μP and SP. Writes OUT/coord_check.json and .png.")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32, help="fixed head size (heads = width / head_dim)")
    ap.add_argument("--threads", type=int, default=None)
    add_machine_options(ap, dtype_help=" (bf16 moves the slopes by about 0.002; docs/coord_check.png is float32)")
    add_variant_options(ap, "coord_check")
    args = ap.parse_args(argv)
    say = lambda m: print(m, flush=True)  # noqa: E731
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        device, dtype = runtime.resolve_machine(args.device, args.dtype, say)
        res = coord_check(args.widths, args.steps, args.n_layer, args.lr, args.vocab, seeds=args.seeds,
                          head_dim=args.head_dim, device=device, dtype=dtype, log=say,
                          overrides=model_overrides(args.set))
    except (ValueError, RuntimeError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    out, stem = Path(args.out), "coord_check" + (f"_{args.tag}" if args.tag else "")
    write_json(out / f"{stem}.json", res)
    for p in res["slopes"]:
        ok, sl = coord_check_ok(res, p)
        say(f"{p}: log-log slopes at step {args.steps}: " + "  ".join(f"{t} {v:+.2f}" for t, v in sl.items())
            + f"  -> {'width-independent' if ok else 'GROWS with width'} (bound {SLOPE_BOUND})")
    report_written(say, out / f"{stem}.json", out / f"{stem}.png", plot_coord_check(res, out / f"{stem}.png"))
    return res


if __name__ == "__main__":
    main()
