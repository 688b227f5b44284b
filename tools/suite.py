"""The paper's downstream score: 13 lm-evaluation-harness tasks, one number each, and their plain mean.

    python -m tools.suite commands HF_DIR [--output_path DIR] [--device cuda:0] [--batch_size N|auto]
                                          [--dtype bfloat16] [--bos]
    python -m tools.suite score RESULTS [RESULTS ...] [--metric TASK=KEY] [--shots TASK=N] [--partial] [--json]
    python -m tools.eval suite ...        (the same tool)

What the paper averages. Xmodel-2.5 reports 13 scores, ARC-C ... C-Eval, and their average 52.49: the plain
mean of the 13 percentages, every task weighing the same whatever its size (the mean of the paper's own 13
numbers is 52.487). Each score is one metric of one lm-eval task; for a group (MMLU, BBH, MATH, CMMLU,
C-Eval) it is the group's own aggregate, the mean over all of its subtasks' documents (weight_by_size).

Where the settings come from. The original evaluates with experiments/eval/config.yaml and eval_ckpt.py
(XiaoduoAILab/Xmodel-2.5): one `lm_eval --tasks T --num_fewshot N` per task, then the value of the first
row of the printed table whose Metric column is the config's metric. That rule decides two things the
config does not spell out: a group is printed before its subtasks, so the group aggregate is taken; and
lm-eval prints a task's metric keys sorted, so for GSM8K, which reports exact_match under two filters, the
first row is "flexible-extract" (before "strict-match"). TASKS below writes each choice as the full key
of lm-eval's results file, "metric,filter", so nothing depends on the order of a printed table.

`commands` prints those 13 lm_eval lines for an exported model, with the original's shots and batch sizes.
The original passed no add_bos_token, so lm-eval's hf model encoded without BOS; that stays the default
(the paper's protocol), and --bos adds BOS as every training document began.

lm-eval's results file. `lm_eval ... --output_path DIR` writes DIR/<model>/results_<date>.json:

    {"results": {"arc_challenge": {"alias": "arc_challenge", "acc,none": 0.4480, "acc_stderr,none": 0.0145,
                                   "acc_norm,none": 0.4889, "acc_norm_stderr,none": 0.0146},
                 "mmlu": {"acc,none": 0.5181, ...}, "mmlu_stem": {...}, "mmlu_abstract_algebra": {...}, ...},
     "groups": {"mmlu": {...}},                 "group_subtasks": {"mmlu": ["mmlu_stem", ...], ...},
     "n-shot": {"arc_challenge": 25, ...},      "n-samples": {"arc_challenge": {"original": 1172, "effective": 1172}},
     "config": {"limit": null, ...},            "date": 1764000000.0, "lm_eval_version": "0.4.13", ...}

A value's standard error sits beside it as "metric_stderr,filter" (a number, or "N/A" for some groups).
Any number of files are merged (one per task, as the original runs them, or one for the whole group
docs/lm_eval/xmodel25); a task found in several files is taken from the newest ("date"). A flat
{task: score} file, as the original's eval_ckpt.py writes, is read too: its scores were already picked.

Checks, each naming the file and the task: a task missing from every file; a result without the task's
metric key (the keys it does have are listed); a value that is not a number in [0, 1]; a run with other
shots than the table's (lm-eval's "n-shot"; for a group, that of its subtasks); a run on part of the
documents (--limit: "n-samples" effective < original). A score over part of a task, or over 12 tasks, is
not the paper's number, so the average is printed only when all 13 are clean; --partial prints the mean
of the clean ones, labelled as such. --metric and --shots accept other choices (e.g. GSM8K's strict-match,
or the paper table's 5 shots); the average is then no longer the original's protocol, and says so.
"""
import argparse
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import tools

LM_EVAL_VERSION = "0.4.13"  # the harness these task names, keys and docs/lm_eval/xmodel25 target
PAPER_AVERAGE = 52.49       # Xmodel-2.5, 13-task average as printed in the paper


@dataclass(frozen=True)
class SuiteTask:
    name: str             # lm-eval task or group name (the key in the results file)
    label: str            # as the paper's table names it
    shots: int            # --num_fewshot, from the original's eval config
    metric: str           # lm-eval results key "metric,filter" the original's rule picks
    paper: float          # Xmodel-2.5's score in the paper, percent
    batch: int            # the original's --batch_size (speed; padding changes only the last bits)
    group: bool = False   # an lm-eval group: scored by its aggregate over all subtasks' documents
    unsafe: bool = False  # runs model-written code: needs HF_ALLOW_CODE_EVAL=1 and --confirm_run_unsafe_code


TASKS = (
    SuiteTask("arc_challenge", "ARC-C", 25, "acc_norm,none", 48.89, 32),
    SuiteTask("arc_easy", "ARC-E", 25, "acc_norm,none", 76.94, 32),
    SuiteTask("piqa", "PIQA", 0, "acc_norm,none", 75.95, 32),
    SuiteTask("hellaswag", "HellaSwag", 10, "acc_norm,none", 67.24, 32),
    SuiteTask("winogrande", "WinoGrande", 5, "acc,none", 64.64, 32),
    SuiteTask("bbh", "BBH", 3, "exact_match,get-answer", 54.58, 24, group=True),
    SuiteTask("mmlu", "MMLU", 5, "acc,none", 51.81, 16, group=True),
    SuiteTask("gsm8k", "GSM8K", 8, "exact_match,flexible-extract", 58.98, 24),
    SuiteTask("minerva_math", "MATH", 4, "math_verify,none", 28.94, 24, group=True),
    SuiteTask("humaneval", "HumanEval", 0, "pass@1,create_test", 28.66, 24, unsafe=True),
    SuiteTask("mbpp", "MBPP", 3, "pass_at_1,none", 33.00, 24, unsafe=True),
    SuiteTask("cmmlu", "CMMLU", 5, "acc_norm,none", 47.16, 32, group=True),
    SuiteTask("ceval-valid", "C-Eval", 5, "acc_norm,none", 45.54, 32, group=True),
)
BY_NAME = {t.name: t for t in TASKS}


@dataclass
class Found:
    """One task's entry in one results file."""
    metrics: dict          # "metric,filter" -> value, as in the file
    shots: object          # int, None (not recorded) or "mixed" (a group whose subtasks differ)
    limited: str | None    # why the run covers only part of the documents, or None
    file: str
    date: float
    flat: bool = False     # the original's {task: score} file: the score is already picked
    version: str | None = None  # the lm_eval that wrote the file


def _leaves(name: str, subtasks: dict) -> list[str]:
    """The tasks under a group (the name itself for a task), through nested groups."""
    kids = subtasks.get(name)
    return [leaf for k in kids for leaf in _leaves(k, subtasks)] if kids else [name]


def _shots(name: str, doc: dict):
    n_shot = doc.get("n-shot") or {}
    if name in n_shot:  # lm-eval >= 0.4.12 also records a group's shots when its subtasks agree
        return n_shot[name]
    known = {n_shot.get(leaf) for leaf in _leaves(name, doc.get("group_subtasks") or {})} - {None}
    return known.pop() if len(known) == 1 else "mixed" if known else None


def _limited(name: str, doc: dict) -> str | None:
    counts = doc.get("n-samples") or {}
    short = [(leaf, c) for leaf in _leaves(name, doc.get("group_subtasks") or {})
             if isinstance(c := counts.get(leaf), dict) and c.get("effective", 0) < c.get("original", 0)]
    if short:
        leaf, c = short[0]
        return f"ran on {c['effective']} of {c['original']} documents of {leaf} (--limit)"
    return None


def read_results_file(path) -> dict[str, Found]:
    """{task or group name: Found} from one lm-eval results_*.json (or one flat {task: score} file)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such results file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    date = doc.get("date") if isinstance(doc.get("date"), (int, float)) else path.stat().st_mtime
    if "results" not in doc:
        if doc and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in doc.values()):
            return {k: Found({"recorded": v}, None, None, str(path), date, flat=True) for k, v in doc.items()}
        raise ValueError(f"{path}: no \"results\" object (not an lm-eval results file, nor a flat {{task: score}})")
    groups = doc.get("groups") or {}
    if not isinstance(doc["results"], dict) or not isinstance(groups, dict) or not all(
            isinstance(m, dict) for m in [*doc["results"].values(), *groups.values()]):
        raise ValueError(f"{path}: \"results\" must map task names to objects of metrics")
    entries = {**groups, **doc["results"]}  # some harness versions keep a group in "groups" only
    version = doc.get("lm_eval_version")
    return {name: Found(m, _shots(name, doc), _limited(name, doc), str(path), date, version=version)
            for name, m in entries.items()}


def result_files(paths) -> list[Path]:
    """The results files named, and every results_*.json under each folder named (lm-eval nests them in
    a folder per model)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("results_*.json"))
            if not found:
                raise FileNotFoundError(f"{p}: no lm-eval results_*.json under this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such results file or folder")
    return files


def collect(paths) -> tuple[dict[str, Found], list[str]]:
    """Every file's entries merged: {name: Found}, plus a note for each task found more than once (the
    newest run is kept: a rerun after a failure or a fix replaces the earlier one)."""
    merged, seen = {}, {}
    for f in result_files(paths):
        for name, found in read_results_file(f).items():
            seen.setdefault(name, []).append(found.file)
            if name not in merged or found.date >= merged[name].date:
                merged[name] = found
    notes = [f"{name}: in {len(files)} files, the newest kept ({merged[name].file})"
             for name, files in seen.items() if len(files) > 1 and name in BY_NAME]
    other = sorted({f.version for name, f in merged.items() if name in BY_NAME and f.version} - {LM_EVAL_VERSION})
    if other:  # task definitions and result keys can change between harness versions
        notes.append(f"made with lm_eval {', '.join(other)}; the task table targets {LM_EVAL_VERSION} (docs/EVAL.md)")
    return merged, notes


def _value(task: SuiteTask, key: str, found: Found) -> float | None:
    """The metric's value in percent (None where the file has no such key), checked to be a fraction."""
    v = found.metrics.get("recorded" if found.flat else key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
        raise ValueError(f"{found.file}: {task.name} {key!r} is {v!r}, not a number in [0, 1]")
    return 100.0 * v


def score_task(task: SuiteTask, found: Found | None, metric: str, shots: int) -> dict:
    """One row of the table: the score (percent) or the problem that keeps it out of the average."""
    row = {"task": task.name, "label": task.label, "shots": shots, "metric": metric, "paper": task.paper,
           "score": None, "stderr": None, "file": None, "problem": None}
    if found is None:
        return {**row, "problem": f"{task.name} ({task.label}) is in none of the results files"}
    row["file"] = found.file
    if found.flat and metric != task.metric:  # the original's file holds its own pick only
        return {**row, "problem": f"{found.file}: {task.name} has only the original's {task.metric!r} (a flat file)"}
    value = _value(task, metric, found)
    if value is None:
        have = sorted(k for k in found.metrics if "," in k and "_stderr," not in k)
        return {**row, "problem": f"{found.file}: {task.name} has no {metric!r} (it has: {', '.join(have) or 'none'})"}
    m, _, f = metric.partition(",")
    stderr = found.metrics.get(f"{m}_stderr,{f}")
    row["stderr"] = 100.0 * stderr if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    if found.limited:
        return {**row, "problem": f"{found.file}: {task.name} {found.limited}"}
    if found.shots == "mixed":
        return {**row, "problem": f"{found.file}: {task.name}'s subtasks ran with different shots, "
                                  f"the suite's is {shots}-shot"}
    if found.shots is not None and found.shots != shots:
        return {**row, "problem": f"{found.file}: {task.name} ran {found.shots}-shot, the suite's is {shots}-shot"
                                  f" (--shots {task.name}={found.shots} accepts it)"}
    return {**row, "score": value}


def score(found: dict[str, Found], metric: dict | None = None, shots: dict | None = None) -> dict:
    """The per-task table and the paper's average (None unless all 13 are clean)."""
    metric, shots = metric or {}, shots or {}
    rows = [score_task(t, found.get(t.name), metric.get(t.name, t.metric), shots.get(t.name, t.shots))
            for t in TASKS]
    clean = [r["score"] for r in rows if r["score"] is not None]
    return {"tasks": rows, "problems": [r["problem"] for r in rows if r["problem"]],
            "average": sum(clean) / len(clean) if len(clean) == len(TASKS) else None,
            "partial_average": sum(clean) / len(clean) if clean else None, "n_scored": len(clean),
            "paper_average": PAPER_AVERAGE,
            "protocol": _protocol(metric, shots)}


def _protocol(metric: dict, shots: dict) -> str:
    changes = [f"{k} {v}" for k, v in metric.items()] + [f"{k} {v}-shot" for k, v in shots.items()]
    return "original" if not changes else "changed: " + ", ".join(changes)


def commands(model: str, output_path: str | None = None, device: str | None = None, batch_size=None,
             dtype: str | None = "bfloat16", bos: bool = False) -> list[str]:
    """The shell lines that run the 13 tasks the original's way (one lm_eval per task), then score them."""
    args = f"pretrained={model}" + (f",dtype={dtype}" if dtype else "") + (",add_bos_token=True" if bos else "")
    out = output_path or f"evals/{Path(model).name}"
    lines = []
    for t in TASKS:
        cmd = ["lm_eval", "--model", "hf", "--model_args", args, "--tasks", t.name, "--num_fewshot", str(t.shots),
               "--batch_size", str(batch_size or t.batch), "--output_path", out]
        cmd += ["--device", device] if device else []
        cmd += ["--confirm_run_unsafe_code"] if t.unsafe else []
        lines.append(("HF_ALLOW_CODE_EVAL=1 " if t.unsafe else "") + shlex.join(cmd))
    return lines + [f"python -m tools.suite score {shlex.quote(out)}"]


def _cell(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(report: dict, notes=()) -> str:
    """The table as text: one row per task (a file column when the scores come from several files)."""
    files = {r["file"] for r in report["tasks"] if r["file"]}
    lines = [f"results: {f}" for f in files if len(files) == 1]
    lines.append(f"{'task':<11}{'lm-eval task':<15}{'shots':>5}  {'metric':<30}{'score':>7}{'stderr':>8}{'paper':>8}"
                 + ("  from" if len(files) > 1 else ""))
    for r in report["tasks"]:
        lines.append(f"{r['label']:<11}{r['task']:<15}{r['shots']:>5}  {r['metric']:<30}{_cell(r['score']):>7}"
                     f"{_cell(r['stderr']):>8}{r['paper']:>8.2f}" + (f"  {r['file'] or '-'}" if len(files) > 1 else ""))
    lines += [f"note: {n}" for n in notes] + [f"problem: {p}" for p in report["problems"]]
    proto = "" if report["protocol"] == "original" else f"; protocol {report['protocol']}"
    if report["average"] is not None:
        lines.append(f"average {report['average']:.2f} (plain mean of the 13 scores, percent; the paper: "
                     f"{PAPER_AVERAGE:.2f}{proto})")
    return "\n".join(lines)


def _pairs(items, flag: str, convert) -> dict:
    """["TASK=VALUE", ...] -> {TASK: convert(VALUE)}, TASK one of the 13."""
    out = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or name not in BY_NAME:
            raise ValueError(f"{flag} {item!r}: expected TASK=VALUE with TASK one of {', '.join(BY_NAME)}")
        try:
            out[name] = convert(value)
        except ValueError:
            raise ValueError(f"{flag} {item!r}: {value!r} is not a valid value") from None
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.suite", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("commands", help="print the lm_eval command lines for an exported model")
    c.add_argument("model", help="a Hugging Face folder (python -m tools.export RUN OUT)")
    c.add_argument("--output_path", default=None, help="lm_eval's --output_path (default evals/<folder name>)")
    c.add_argument("--device", default=None, help="lm_eval's --device, e.g. cuda:0 (default: lm_eval's)")
    c.add_argument("--batch_size", default=None, help="one batch size for all (default: the original's per task)")
    c.add_argument("--dtype", default="bfloat16", help="the hf model's dtype (\"auto\": the folder's own)")
    c.add_argument("--bos", action="store_true", help="add_bos_token=True (the original ran without)")
    s = sub.add_parser("score", help="the per-task table and the 13-task average from lm-eval's results")
    s.add_argument("results", nargs="+", help="results_*.json files or folders holding them (lm_eval --output_path)")
    s.add_argument("--metric", action="append", metavar="TASK=KEY", help="another results key for a task")
    s.add_argument("--shots", action="append", metavar="TASK=N", help="accept a task run with N shots")
    s.add_argument("--partial", action="store_true", help="with tasks missing: print the mean of the others")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    if a.mode == "commands":
        return print("\n".join(commands(a.model, a.output_path, a.device, a.batch_size, a.dtype, a.bos)))
    found, notes = collect(a.results)
    report = score(found, _pairs(a.metric, "--metric", str), _pairs(a.shots, "--shots", int))
    print(json.dumps({**report, "notes": notes}) if a.json else format_table(report, notes))
    if report["problems"] and not a.partial:
        bad = ", ".join(r["label"] for r in report["tasks"] if r["problem"])
        raise ValueError(f"no 13-task average: {bad} cannot be scored (the problems above; --partial prints the "
                         f"mean of the {report['n_scored']} others)")
    if report["problems"] and not a.json:
        print(f"partial mean {_cell(report['partial_average'])} over {report['n_scored']} of 13 tasks "
              f"(not the paper's average)")


if __name__ == "__main__":
    tools.run(main)
