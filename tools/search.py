"""Proxy hyper-parameter search (Optuna TPE, as Xmodel-2.5 did): tune once on the proxy, copy to 1.3B.

    python -m tools.search --trials 20 --study out/mup_search.db --out best_config.py
    python train.py best_config.py

Xmodel-2.5 tuned its base LRs, init std and multipliers on a small proxy with a TPE search and copied
the winners to the 1.3B config; under μP (mup.py) those base values do not move with width. This tool
does the same against the held-out loss of a short proxy training (tools.proxy.train_proxy) and writes
the winners into a copy of a config file. Optuna is an optional dependency.
"""
import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import data
import runtime
import train
from tools import positive_int
from tools.proxy import add_machine_options, equal_mixture, proxy_dataset, train_proxy

# what the search may tune, with default ranges (low, high), all sampled on a log scale
SEARCH_SPACE = {"lr": (2.0 ** -10, 2.0 ** -3), "emb_lr": (2.0 ** -10, 2.0 ** -3), "init_std": (0.02, 0.4),
                "input_scale": (1.0, 32.0), "residual_scale": (0.5, 4.0)}
TUNABLE = ("lr", "emb_lr", "init_std", "input_scale", "residual_scale", "output_scale")
OPTIMIZER_KEYS = ("lr", "emb_lr")  # TrainConfig fields; the other tunables are ModelConfig fields


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
        raise ImportError("`python -m tools.search` needs Optuna (an optional dependency): pip install optuna") from None
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
    lines = [base_text.rstrip("\n"), "", f"# --- tuned by `python -m tools.search` on the proxy ({note}); "
             f"base config: {base_path} ---"]
    lines += [f"{k} = {v!r}" for k, v in best.items()]
    return "\n".join(lines) + "\n"


def _open_study(optuna, study_path, study_name: str, seed: int, setup: dict):
    """Create or reopen the study; refuse one that was started with another setup (its losses would not compare)."""
    study = optuna.create_study(study_name=study_name, storage=_storage(optuna, study_path), load_if_exists=True,
                                direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    setup = json.loads(json.dumps(setup))
    old = study.user_attrs.get("setup")
    if old is None:
        study.set_user_attr("setup", setup)
    elif old != setup:
        diff = sorted(k for k in set(setup) | set(old) if setup.get(k) != old.get(k))
        raise ValueError(f"study {str(study_path)!r} ({study_name}) was started with another setup (differs in "
                         f"{diff}); use a new --study file or the same arguments")
    return study


def search(base_config="configs/proxy20m.py", trials: int = 20, study_path="out/mup_search.db",
           out_path="best_config.py", space=None, steps: int = 100, batch: int = 8, seq_len: int = 64,
           eval_windows: int = 64, width: int | None = None, n_layer: int | None = None, dataset=None,
           study_name: str = "mup-proxy", seed: int = 0, device: str = "cpu", dtype: str = "float32",
           log=None) -> dict:
    """Tune the base hyper-parameters on a short proxy training with Optuna's TPE sampler.

    Objective: held-out loss after `steps` constant-LR AdamW steps of the base config's model (optionally
    at another width / depth) with the small-BPE vocabulary. The study lives in `study_path` (SQLite), so
    a second call continues it: `trials` is the total budget of finished trials. The first trial is the
    base config's own values (when inside the space), so the result is never worse than the baseline.
    Writes out_path = the base config + the best values; returns {"best", "loss", "trials", "out"}."""
    optuna = _optuna()
    space = dict(space) if space is not None else dict(SEARCH_SPACE)
    for k in space:
        if k not in TUNABLE:
            raise ValueError(f"search space key {k!r} is not tunable; use {TUNABLE}")
    base = train.load_config([str(base_config)])
    base_train, base_model = base["train"], base["model"]
    dataset = proxy_dataset(dataset)
    n_vocab = int(data.read_manifest(dataset)["tokenizer"]["n_vocab"])
    over = dict(vocab_size=n_vocab, max_seq_len=max(seq_len, 64), fp8=False, act_ckpt=False)
    if width is not None:
        over.update(hidden=width, ffn_hidden=int(2.5 * width), n_head=max(1, width // base_model.head_dim),
                    n_kv_head=1)
    if n_layer is not None:
        over["n_layer"] = n_layer
    proxy = replace(base_model, **over)
    mix = equal_mixture(dataset, seed)
    evals = mix.eval_batches(eval_windows, batch, seq_len, seed=seed)
    wd = base_train.weight_decay
    setup = dict(base_config=str(base_config), proxy=asdict(proxy), space={k: list(v) for k, v in space.items()},
                 steps=steps, batch=batch, seq_len=seq_len, eval_windows=eval_windows, weight_decay=wd,
                 tokenizer=mix.tokenizer_identity.get("name"), dtype=dtype)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(optuna, study_path, study_name, seed, setup)
    if not study.trials:
        start = {k: float(getattr(base_train if k in OPTIMIZER_KEYS else proxy, k)) for k in space}
        if all(space[k][0] <= v <= space[k][1] for k, v in start.items()):
            study.enqueue_trial(start)
    # a resumed study gets a fresh sampler seed, so its random start-up points are not the first run's
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))

    def objective(trial):
        vals = {k: trial.suggest_float(k, lo, hi, log=True) for k, (lo, hi) in space.items()}
        lr = vals.get("lr", base_train.lr)
        emb_lr = vals.get("emb_lr", base_train.emb_lr)
        cfg = replace(proxy, **{k: v for k, v in vals.items() if k not in OPTIMIZER_KEYS})
        t0 = time.time()
        r = train_proxy(cfg, lr, emb_lr, mix, steps, batch, seq_len, evals, wd, seed, device, dtype)
        if log:
            log(f"trial {trial.number:>3}: held-out loss {r['loss']:.4f} ({time.time() - t0:.1f}s)  "
                + "  ".join(f"{k}={v:.4g}" for k, v in vals.items()))
        return r["loss"] if math.isfinite(r["loss"]) else float("inf")

    todo = max(0, trials - len([t for t in study.trials if t.state.is_finished()]))
    if todo:
        study.optimize(objective, n_trials=todo)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and math.isfinite(t.value)]
    if not done:
        raise RuntimeError(f"study {str(study_path)!r}: no trial finished with a finite loss")
    best = min(done, key=lambda t: t.value)
    best_vals = {k: float(f"{v:.6g}") for k, v in best.params.items()}
    note = (f"study {Path(study_path).name}, trial {best.number} of {len(done)}, held-out loss {best.value:.4f} "
            f"after {steps} steps at hidden {proxy.hidden} x {proxy.n_layer} layers, vocab {n_vocab}")
    with runtime.atomic_write(out_path) as f:
        f.write(format_best_config(Path(base_config).read_text(), str(base_config), best_vals, note))
    return dict(best=best_vals, loss=best.value, trials=len(done), out=str(out_path), trial=best.number)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.search",
                                 description="Optuna TPE search of base LRs, init std and multipliers on the "
                                             "μP proxy; writes the base config plus the best values.")
    ap.add_argument("--base", default="configs/proxy20m.py", help="config file to tune and copy")
    ap.add_argument("--trials", type=positive_int, default=20, help="total finished trials wanted in the study")
    ap.add_argument("--study", default="out/mup_search.db", help="the study file (SQLite); reuse it to resume")
    ap.add_argument("--study-name", default="mup-proxy")
    ap.add_argument("--out", default="best_config.py")
    ap.add_argument("--space", action="append", metavar="NAME=LOW:HIGH",
                    help=f"override a range (log scale) or NAME=off; tunable: {', '.join(TUNABLE)}; defaults: "
                         + ", ".join(f"{k}={lo:g}:{hi:g}" for k, (lo, hi) in SEARCH_SPACE.items()))
    ap.add_argument("--steps", type=positive_int, default=100)
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--seq-len", type=positive_int, default=64)
    ap.add_argument("--eval-windows", type=positive_int, default=64)
    ap.add_argument("--width", type=int, default=None, help="proxy width (default: the base config's)")
    ap.add_argument("--n-layer", type=int, default=None, help="proxy depth (default: the base config's)")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    add_machine_options(ap)
    args = ap.parse_args(argv)
    say = lambda m: print(m, flush=True)  # noqa: E731
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        device, dtype = runtime.resolve_machine(args.device, args.dtype, say)
        res = search(args.base, args.trials, args.study, args.out, parse_space(args.space), args.steps, args.batch,
                     args.seq_len, args.eval_windows, args.width, args.n_layer, args.dataset, args.study_name,
                     args.seed, device, dtype, log=say)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    say(f"best of {res['trials']} trials (trial {res['trial']}): held-out loss {res['loss']:.4f}  "
        + "  ".join(f"{k}={v:g}" for k, v in res["best"].items()) + f"\nwrote {res['out']}")
    return res


if __name__ == "__main__":
    main()
