"""Write (or rewrite) a run's report: `python -m tools.report OUT_DIR` -> OUT_DIR/report.md.

The report is also written at the end of every run; this tool redoes it for a run that stopped early
(preempted, max_steps) or after adding a downstream probe's probe.json to the run directory.
"""
import argparse
import os

import runtime
import tools


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run directory (holds config.json and metrics.jsonl)")
    args = ap.parse_args(argv)
    for need in ("config.json", "metrics.jsonl"):
        if not os.path.isfile(os.path.join(args.run, need)):
            ap.exit(1, f"python -m tools.report: error: {args.run}: no {need} (not a run directory)\n")
    print(runtime.write_report(args.run))


if __name__ == "__main__":
    tools.run(main)  # an output that cannot be written: one line, not a traceback
