"""Learning-rate transfer sweep (Tensor Programs V, Fig. 1): the best base LR does not move with width.

    python -m tools.lr_sweep --out docs               # docs/lr_sweep.json and docs/lr_sweep.png (resumable)

The consequence of μP that matters: the base LR that minimises the loss does not move with width under
μP, while under SP it has no reason to stay put (in the paper it drifts to smaller values as the model
widens). Held-out loss after a short constant-LR AdamW training vs log2(LR), one curve per width, both
parameterizations, on the embedded corpus with a small BPE (tools.proxy.small_bpe); docs/lr_sweep.png
is the default grid's result.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

import data
import runtime
from model import ModelConfig
from tools.proxy import (PARAMETERIZATIONS, add_machine_options, add_variant_options, equal_mixture,
                         proxy_config, proxy_dataset, pyplot, report_written, save_png, train_proxy, write_json)
from tools import model_overrides, positive_float, positive_int


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


# one sweep process's mixture and held-out batches, built once by the pool's initializer
_WORKER = {}


def _worker_init(dataset: str, eval_windows: int, batch: int, seq_len: int, seed: int, threads: int,
                 device: str, dtype: str):
    torch.set_num_threads(threads)
    mix = equal_mixture(dataset, seed)
    _WORKER.update(mix=mix, evals=mix.eval_batches(eval_windows, batch, seq_len, seed=seed), device=device,
                   dtype=dtype)


def _run_one(task):
    p, w, lr, c = task
    t0 = time.time()
    cfg = proxy_config(w, c["n_layer"], c["vocab_size"], use_mup=p == "mup", **c["model_overrides"])
    r = train_proxy(cfg, lr, lr, _WORKER["mix"], c["steps"], c["batch"], c["seq_len"], _WORKER["evals"],
                    c["weight_decay"], c["seed"], _WORKER["device"], _WORKER["dtype"])
    return dict(param=p, width=w, lr=lr, loss=r["loss"], diverged=r["diverged"], seconds=round(time.time() - t0, 2))


def _resumable_runs(out_json, config: dict) -> list[dict]:
    """The runs already in out_json when it was written for the same config, else none."""
    if out_json is None or not Path(out_json).is_file():
        return []
    try:
        old = json.loads(Path(out_json).read_text())
        return old["runs"] if old.get("config") == config else []
    except (json.JSONDecodeError, KeyError):
        return []


def lr_sweep(widths=(64, 128, 256, 512), lrs=None, steps: int = 128, n_layer: int = 2, batch: int = 8,
             seq_len: int = 64, eval_windows: int = 64, parameterizations=PARAMETERIZATIONS, dataset=None,
             weight_decay: float = 0.0, seed: int = 0, jobs: int = 2, threads: int = 1, out_json=None,
             device: str = "cpu", dtype: str = "float32", log=None, overrides=None) -> dict:
    """Held-out loss after `steps` constant-LR AdamW steps for every (parameterization, width, base lr).

    The base lr is used for both groups (lr = emb_lr = η): μP then gives hidden matrices η/m and the
    embedding η; SP gives every parameter η. dataset: a prepared dataset directory (default: the
    embedded corpus with the small BPE). Runs are spread over `jobs` processes of `threads` torch
    threads each (many small runs parallelize better than threads inside one). With out_json, the
    result is rewritten after every run and an existing file with the same config is resumed.
    overrides: ModelConfig fields for every model (e.g. {"init_out": "mup"})."""
    lrs = [float(x) for x in lrs] if lrs is not None else lr_grid(-10, -3)
    dataset = proxy_dataset(dataset)
    for p in parameterizations:
        if p not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {p!r}; use one of {PARAMETERIZATIONS}")
    tokenizer = data.read_manifest(dataset)["tokenizer"]
    config = dict(widths=list(widths), lrs=lrs, steps=steps, n_layer=n_layer, batch=batch, seq_len=seq_len,
                  eval_windows=eval_windows, parameterizations=list(parameterizations),
                  vocab_size=int(tokenizer["n_vocab"]), weight_decay=weight_decay, seed=seed, head_dim=64,
                  base_width=ModelConfig.base_width, tokenizer=tokenizer["name"],
                  optimizer="AdamW(0.9, 0.95, eps 1e-8), constant LR, no warmup, no clipping", dtype=dtype,
                  model_overrides=dict(overrides or {}))
    runs = _resumable_runs(out_json, config)
    done = {(r["param"], r["width"], r["lr"]) for r in runs}
    # widest first: the long runs start early, so the pool does not end on one straggler
    tasks = [(p, w, lr, config) for w in sorted(widths, reverse=True) for p in parameterizations for lr in lrs
             if (p, w, lr) not in done]
    result = dict(config=config, runs=runs)
    init = (str(dataset), eval_windows, batch, seq_len, seed, threads, device, dtype)

    def finish(r):
        runs.append(r)
        if log:
            log(f"sweep {r['param']:>3} width {r['width']:>4} lr 2^{math.log2(r['lr']):+.1f}: held-out loss "
                f"{r['loss']:.4f}  ({r['seconds']:.1f}s)")
        result["optimum"] = summarize_sweep(result)
        if out_json is not None:
            write_json(out_json, result)

    if jobs <= 1:
        saved = torch.get_num_threads()
        _worker_init(*init)
        try:
            for t in tasks:
                finish(_run_one(t))
        finally:
            torch.set_num_threads(saved)
    else:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(jobs, _worker_init, init) as pool:
            for r in pool.imap_unordered(_run_one, tasks):
                finish(r)
    runs.sort(key=lambda r: (PARAMETERIZATIONS.index(r["param"]), r["width"], r["lr"]))
    result["optimum"] = summarize_sweep(result)
    if out_json is not None:
        write_json(out_json, result)
    return result


def plot_sweep(result: dict, path) -> bool:
    """Held-out loss vs base LR (log2), one curve per width, μP and SP side by side. False if no matplotlib."""
    plt = pyplot()
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
    variant = "".join(f", {k}={v}" for k, v in c.get("model_overrides", {}).items())
    fig.suptitle(f"LR transfer: {c['n_layer']} layers, {c['steps']} steps x {c['batch']}x{c['seq_len']} tokens, "
                 f"BPE vocab {c['vocab_size']}{variant} (stars: optimum; missing points diverged)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
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
    ap = argparse.ArgumentParser(prog="python -m tools.lr_sweep",
                                 description="μP LR transfer: held-out loss vs base LR at several widths, μP and "
                                             "SP. Writes OUT/lr_sweep.json (resumable) and OUT/lr_sweep.png.")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--widths", type=positive_int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--lrs", type=positive_float, nargs="+", default=None, help="base LRs (default 2^-10 ... 2^-3)")
    ap.add_argument("--steps", type=positive_int, default=128)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--seq-len", type=positive_int, default=64)
    ap.add_argument("--eval-windows", type=positive_int, default=64)
    ap.add_argument("--jobs", type=int, default=None,
                    help="parallel runs of --threads torch threads each (default: one per core on a CPU, 1 on a GPU)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--params", nargs="+", default=list(PARAMETERIZATIONS), choices=PARAMETERIZATIONS,
                    help="parameterizations to sweep")
    add_machine_options(ap)
    add_variant_options(ap, "lr_sweep")
    args = ap.parse_args(argv)
    say = lambda m: print(m, flush=True)  # noqa: E731
    out, stem = Path(args.out), "lr_sweep" + (f"_{args.tag}" if args.tag else "")
    try:
        device, dtype = runtime.resolve_machine(args.device, args.dtype, say)
        jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1) if device == "cpu" else 1
        res = lr_sweep(args.widths, args.lrs, args.steps, args.n_layer, args.batch, args.seq_len,
                       args.eval_windows, parameterizations=args.params, dataset=args.dataset, jobs=jobs,
                       threads=args.threads,
                       out_json=out / f"{stem}.json", device=device, dtype=dtype, log=say,
                       overrides=model_overrides(args.set))
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    say(format_sweep_table(res))
    report_written(say, out / f"{stem}.json", out / f"{stem}.png", plot_sweep(res, out / f"{stem}.png"))
    return res


if __name__ == "__main__":
    main()
