"""Compare runs: training and held-out loss against tokens for several run directories, as one PNG.

    python -m tools.plot OUT.png LABEL=OUT_DIR [LABEL=OUT_DIR ...] [--from-tokens N] [--title T]

Each run's metrics.jsonl is read (a torn last line is dropped with a warning); dots are held-out
evaluations, dotted lines the AdamW -> Muon switch. --from-tokens zooms to the end of the runs (e.g. the
decay phase of an ablation). A run with no loss to draw (none logged yet, or all before --from-tokens) is
an error naming it.
"""
import argparse
import contextlib
import io
import os

import runtime
import tools


def has_rows(out_dir: str, from_tokens: float) -> bool:
    """Whether a run has a training or held-out loss to draw (at or after from_tokens): a run that logged
    none yet, or a --from-tokens past its end, is named rather than drawn as an empty legend entry. The
    torn-line warning is left to the drawing, which reads the file again."""
    with contextlib.redirect_stderr(io.StringIO()):
        rows = runtime.read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    return any(("loss" in r or "eval_loss" in r) and r.get("tokens", from_tokens) >= from_tokens for r in rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.plot", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("runs", nargs="+", metavar="LABEL=OUT_DIR")
    ap.add_argument("--from-tokens", type=float, default=0, help="draw only rows at or after this many tokens")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, eq, path = item.partition("=")
        if not eq or not label:
            ap.error(f"{item!r}: expected LABEL=OUT_DIR")
        if not os.path.isfile(os.path.join(path, "metrics.jsonl")):
            ap.error(f"{path}: no metrics.jsonl (not a run directory)")
        if not has_rows(path, args.from_tokens):
            ap.error(f"{path}: nothing to draw (no loss in metrics.jsonl"
                     + (f" at or after --from-tokens {args.from_tokens:g})" if args.from_tokens else ")"))
        runs[label] = path
    try:
        done = runtime.plot_runs(runs, args.out, args.title, args.from_tokens)
    except ValueError as e:
        ap.exit(1, f"python -m tools.plot: error: {e}\n")
    if not done:
        ap.exit(1, "python -m tools.plot: matplotlib is not installed (pip install matplotlib)\n")
    print(done)


if __name__ == "__main__":
    tools.run(main)  # an output that cannot be written: one line, not a traceback
