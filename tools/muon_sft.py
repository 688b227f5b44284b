"""The paper's Muon claim in miniature: the AdamW -> Muon switch at the decay, measured downstream.

    python -m tools.muon_sft [--config configs/proxy20m.py] [--seeds 0 1 2] [--out docs] [--runs out/muon_sft]
                             [--per_family 250] [--max_tokens 16] [--heldout_windows 64] [--device auto]
                             [--dtype auto]
                             [--key=value ...]     any train.py override, e.g. --phase.stable1.steps=50

Xmodel-2.5 replaces AdamW by Muon for the hidden matrices at the start of the decay phase and reports +4.58
points on its 13-task average against a decay on AdamW (RECIPE.md, Optimizers). Here, for each seed:

  1. warmup and stable once (train.py --max_steps=<first step of the first Muon phase>), into RUNS/sS/stable;
  2. its last checkpoint copied into RUNS/sS/adamw and RUNS/sS/muon, each continued with --resume through the
     decay and long-context phases (mix: 2/3 SFT problems) with the hidden matrices on AdamW or on Muon
     (--phase.NAME.optimizer for every phase from the switch on): the same weights, AdamW state, data
     order, LR schedule and batch; only the optimizer of the hidden matrices differs;
  3. both final checkpoints measured the same way: exact-match accuracy of greedy answers on the SFT test
     problems (tools.eval.sft_accuracy, with its Wilson interval), and held-out loss on the pretraining text,
     the mean of the "prose" and "code" domains' losses (runtime.heldout_loss, the same windows for both).

Writes OUT/muon_vs_adamw_sft.json ({"seeds": [...], "adamw": {"accuracy": [...], "heldout_loss": [...], ...},
"muon": {...}, "difference": {...}}) and OUT/muon_vs_adamw_sft.png. A run that already reached its last step
is reused and a partial one continued, so an interrupted experiment picks up where it stopped.

Sizing: proxy20m's curriculum as it is, 3 seeds. A seed trains the 300 warmup/stable steps once (0.86M tokens)
and the 100 decay/long-context steps twice (2 x 0.41M): 1.68M tokens, about 13 min at the proxy's 2,100
tokens/s on 2 CPU cores; each branch's measurement (1,000 greedy replies of at most 16 tokens, 2 x 64
held-out windows of 1,024 tokens) adds under a minute: about 45-50 minutes for the whole experiment.
Fewer steps for a quicker look: e.g. --phase.stable1.steps=50 --phase.stable2.steps=40.
"""
import argparse
import json
import os
import shutil
import sys
import time


import data
import runtime
import tools
import train
from tools import eval as probe
from tools import export

BRANCHES = ("adamw", "muon")


def switch_step(phases: list) -> tuple[int, int]:
    """(index of the first phase on Muon, its first step): where the recipe switches and the branches split."""
    for i, p in enumerate(phases):
        if p["optimizer"] == "muon":
            if i == 0:
                raise ValueError("the first phase already runs Muon: there is no AdamW stage to branch from")
            return i, sum(q["steps"] for q in phases[:i])
    raise ValueError("no phase runs Muon: the config has no AdamW -> Muon switch to compare against")


def run_to(argv: list[str], out_dir: str, step: int) -> None:
    """Train argv into out_dir up to `step`, continuing what is there; nothing to do if it got there."""
    if any(os.path.basename(p).startswith(f"ckpt_{step:08d}") for p in runtime.list_checkpoints(out_dir)):
        print(f"muon_sft: reusing {out_dir} (step {step} reached)", flush=True)
        return
    if train.train(argv + [f"--out_dir={out_dir}", "--resume=True", "--keep_checkpoints=1"])["preempted"]:
        sys.exit(f"muon_sft: preempted in {out_dir}; run the same command again to continue")


def branch_from(stable_dir: str, out_dir: str) -> None:
    """A new run directory holding the stable run's last checkpoint (its directory, or a file and its checksum)
    and its metrics."""
    if os.path.isdir(out_dir):
        return  # a branch started earlier: --resume continues it
    ckpt = runtime.list_checkpoints(stable_dir)[-1]
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for path in (ckpt, ckpt + ".sha256", os.path.join(stable_dir, "metrics.jsonl")):
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(tmp, os.path.basename(path)))
        elif os.path.exists(path):
            shutil.copy2(path, tmp)
    os.replace(tmp, out_dir)


def heldout(run_dir: str, argv: list[str], windows: int, seq_len: int, seed: int, device: str, dtype: str) -> dict:
    """Held-out loss of the run's last checkpoint on each pretraining domain, and their mean."""
    conf = train.load_config(argv)
    _, mixture = train.build_data(conf["train"], conf["model"], 0)
    model, _, _ = export.load_any(run_dir, None, device)
    out = {}
    for domain in ("prose", "code"):
        batches = mixture.eval_batches(windows, conf["train"].eval_batch, seq_len, seed=seed, source=domain)
        out[domain] = runtime.heldout_loss(model, batches, device, runtime.autocast(device, dtype))
    out["mean"] = (out["prose"] + out["code"]) / 2
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = result["seeds"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for k, (name, color) in enumerate(zip(BRANCHES, ("tab:blue", "tab:orange"))):
        r, x = result[name], [i + (k - 0.5) * 0.2 for i in range(len(seeds))]
        acc = [100 * a for a in r["accuracy"]]
        err = [[a - 100 * lo for a, (lo, _) in zip(acc, r["accuracy_ci"])],
               [100 * hi - a for a, (_, hi) in zip(acc, r["accuracy_ci"])]]
        a1.errorbar(x, acc, yerr=err, fmt="o", color=color, capsize=3, label=name)
        a2.plot(x, r["heldout_loss"], "o", color=color, label=name)
    for ax, label in ((a1, "SFT test accuracy, % (95% Wilson CI)"), (a2, "held-out loss, prose + code")):
        ax.set(xticks=range(len(seeds)), xticklabels=[f"seed {s}" for s in seeds], ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("decay + long context on AdamW vs on Muon, from the same stable checkpoint")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def experiment(config: str, seeds: list[int], out: str, runs: str, overrides: list[str], per_family: int = 250,
               max_tokens: int = 16, heldout_windows: int = 64, device: str = "auto", dtype: str = "auto") -> dict:
    t0 = time.perf_counter()
    device, dtype = runtime.resolve_machine(device, dtype)
    base = [config, *overrides, f"--device={device}", f"--dtype={dtype}"]
    phases = train.load_config(base)["train"].phases
    k, split = switch_step(phases)
    stop, seq_len = train.total_steps(phases), phases[-1]["seq_len"]
    command = (f"python -m tools.muon_sft --config {config} --seeds {' '.join(map(str, seeds))} --out {out} --runs "
               f"{runs} --per_family {per_family} --max_tokens {max_tokens} --heldout_windows {heldout_windows} "
               f"--device {device} --dtype {dtype} {' '.join(overrides)}").strip()
    result = {"command": command, "config": config,
              "overrides": overrides, "seeds": seeds, "switch_step": split, "steps": stop,
              "probe": {"per_family": per_family, "max_tokens": max_tokens, "test_seed": probe.SFT_TEST_SEED},
              "heldout": {"windows_per_domain": heldout_windows, "seq_len": seq_len}, "device": device, "dtype": dtype}
    for name in BRANCHES:
        result[name] = {"accuracy": [], "accuracy_ci": [], "heldout_loss": [], "heldout_loss_prose": [],
                        "heldout_loss_code": [], "families": {f: [] for f in data.SFT_FAMILIES}, "runs": []}
    for seed in seeds:
        argv = base + [f"--seed={seed}"]
        stable = os.path.join(runs, f"s{seed}", "stable")
        run_to(argv + [f"--max_steps={split}"], stable, split)
        for name in BRANCHES:
            run = os.path.join(runs, f"s{seed}", name)
            branch_from(stable, run)
            run_to(argv + [f"--phase.{p['name']}.optimizer={name}" for p in phases[k:]], run, stop)
            t = time.perf_counter()
            acc = probe.sft_accuracy(run, per_family, max_tokens, device=device, dtype=dtype)
            loss = heldout(run, argv, heldout_windows, seq_len, seed, device, dtype)
            r = result[name]
            r["accuracy"].append(acc["accuracy"])
            r["accuracy_ci"].append(acc["ci"])
            for f in data.SFT_FAMILIES:
                r["families"][f].append(acc["families"][f]["accuracy"])
            r["heldout_loss"].append(loss["mean"])
            r["heldout_loss_prose"].append(loss["prose"])
            r["heldout_loss_code"].append(loss["code"])
            r["runs"].append(run)
            print(f"muon_sft: seed {seed} {name}: accuracy {acc['accuracy']:.1%} [{acc['ci'][0]:.1%}, "
                  f"{acc['ci'][1]:.1%}], held-out loss {loss['mean']:.4f} (measured in {time.perf_counter() - t:.0f} s)",
                  flush=True)
    diff = {m: [b - a for a, b in zip(result["adamw"][m], result["muon"][m])] for m in ("accuracy", "heldout_loss")}
    result["difference"] = {"muon_minus_adamw": diff,
                            **{f"mean_{m}": sum(v) / len(v) for m, v in diff.items()}}
    result["wall_s"] = time.perf_counter() - t0
    os.makedirs(out, exist_ok=True)
    with runtime.atomic_write(os.path.join(out, "muon_vs_adamw_sft.json")) as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(out, "muon_vs_adamw_sft.png"))
    print(f"muon_sft: Muon - AdamW: accuracy {100 * result['difference']['mean_accuracy']:+.2f} points, held-out "
          f"loss {result['difference']['mean_heldout_loss']:+.4f} (mean over seeds {seeds}); "
          f"{result['wall_s'] / 60:.1f} min; wrote {out}/muon_vs_adamw_sft.json and .png", flush=True)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.muon_sft", description="AdamW vs Muon in the decay phase, "
                                 "from the same stable checkpoint: SFT accuracy and held-out loss.",
                                 epilog="Other --key=value options are passed to train.py (config overrides).")
    ap.add_argument("--config", default="configs/proxy20m.py")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="docs", help="where the JSON and the plot go")
    ap.add_argument("--runs", default="out/muon_sft", help="where the run directories go")
    ap.add_argument("--per_family", type=int, default=probe.SFT_PER_FAMILY, help="SFT test problems per family")
    ap.add_argument("--max_tokens", type=int, default=16, help="longest SFT reply (answers: <= 9 tokens)")
    ap.add_argument("--heldout_windows", type=int, default=64, help="held-out windows per domain")
    ap.add_argument("--device", default="auto", choices=runtime.DEVICES)
    ap.add_argument("--dtype", default="auto", choices=runtime.DTYPES)
    a, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        ap.error(f"unrecognized arguments {bad}: train.py overrides are --key=value")
    experiment(a.config, a.seeds, a.out, a.runs, overrides, a.per_family, a.max_tokens, a.heldout_windows, a.device,
               a.dtype)


if __name__ == "__main__":
    tools.run(main)
