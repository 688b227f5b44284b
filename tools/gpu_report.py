"""The GPU check's report: gpu_check.md, from the record that gpu_check.json holds.

    python -m tools.gpu_report DIR/gpu_check.json      # DIR/gpu_check.md written again from the record

tools.gpu_check writes the page after every section; this module is that page, and its command rewrites it from a
record (an older one too, for a newer page). The page opens with what the measurements mean for a run on the GPU
they were taken on, then gives a line per section and every measured case:

- Settings (`settings`): the config keys and module switches the measurements choose, each with the numbers
  behind it: fp8 and fp8_backend (the fastest FP8 run against bf16), fp8_layers (the attention output projection
  in bf16 or not), compile_mode (each compiled block replayed as a CUDA graph or not), fp8.DIRECT_LAUNCH,
  attn_backend and gqa for the long-context phases, fp8_margin (or another FP8 switch) where FP8 failed the
  fixed batch and one variant alone passed it, and the phases' `mfu` for the dry run's cost model. A setting
  moves from its default only where it is faster by more than NOISE.
- Goals (`goals`): the project's speed and stability goals at xmodel25's shape, each measured value against
  its goal (GOALS).
"""
import argparse
import json
import math
import os

import tools

NOISE = 1.02  # a measured speedup below this is within run-to-run noise: the default stays
# The project's goals at xmodel25's shape (48 x 1536, micro-batch 4 x 3712, compiled, the trainer's cadence):
# FP8 tokens/s over bf16's (the paper reports ~1.3x; the block GEMMs' share of the step caps it near 1.27x here),
# bf16 MFU by the project's FLOP count, the decay's Muon step over the AdamW step of the same batch, the MFU of the
# long-context phases.
GOALS = dict(fp8_speedup=1.2, bf16_mfu=0.50, muon_step=1.15, long_mfu=0.40)
# A fixed-batch variant that alone makes FP8 follow bf16 -> the setting that applies it in a run
FIXED_FIX = {"eager": ("compile", "False"), "no_weight_cache": ("fp8.WEIGHT_CACHE (module switch)", "False"),
             "separate_casts": ("fp8.FUSED_CAST (module switch)", "False"), "margin_1": ("fp8_margin", "1")}


def settings(report: dict) -> list[tuple[str, str, str]]:
    """(setting, value, the measurement behind it) for every choice the report's sections can make; "default"
    where the measurement keeps it."""
    sec = {r["section"]: r for r in report["sections"]}
    return (_fp8_settings(sec.get("train", {}).get("runs", {})) + _attn_settings(sec.get("attn", {}).get("model", []))
            + _fixed_settings(sec.get("fixed", {})) + _mfu_settings(sec.get("trainer", {}).get("results", [])))


def _fp8_settings(runs: dict) -> list:
    ok = {k: v for k, v in runs.items() if v.get("status") == "ok" and v.get("tokens_per_s")}
    fp8 = {k: v for k, v in ok.items() if k.startswith("fp8")}
    if "bf16" not in ok or not fp8:
        return []
    plain = [k for k in ("fp8_torch", "fp8_triton") if k in fp8] or list(fp8)  # one run per GEMM, no variant
    best = max(plain, key=lambda k: fp8[k]["tokens_per_s"])
    x = fp8[best]["tokens_per_s"] / ok["bf16"]["tokens_per_s"]
    out = [("fp8, fp8_backend", f"True, {fp8[best]['gemm']}", f"{best}: x{x:.2f} the tokens/s of bf16") if x > NOISE
           else ("fp8", "False", f"the fastest FP8 run, {best}, x{x:.2f} the tokens/s of bf16: FP8 does not pay")]
    base = fp8.get("fp8_torch")
    for label, setting, value in (("fp8_torch_no_out", "fp8_layers", '"qkv,gate_up,down"'),
                                  ("fp8_torch_graphs", "compile_mode", '"reduce-overhead"'),
                                  ("fp8_torch_direct", "fp8.DIRECT_LAUNCH (module switch)", "True")):
        if base and label in fp8:
            y = fp8[label]["tokens_per_s"] / base["tokens_per_s"]
            out.append((setting, value if y > NOISE else "default", f"{label}: x{y:.2f} the tokens/s of fp8_torch"))
    return out


def _attn_settings(model_rows: list) -> list:
    """The whole model at the first long phase's shape, auto against the fastest other kernel (attn section)."""
    if len(model_rows) != 2 or not all(x.get("status") == "ok" for x in model_rows):
        return []
    other, x = model_rows[1], model_rows[1].get("speedup_vs_auto", 0.0)
    shape = f"{other['micro_batch']} x {other['seq_len']}"
    return [(f"attn_backend, gqa (the phases at {other['seq_len']})",
             f"{other['backend']}, {other['gqa']}" if x > NOISE else "default",
             f"{other['backend']}/{other['gqa']}: x{x:.2f} the model's tokens/s with auto at {shape}")]


def _fixed_settings(fixed: dict) -> list:
    rows = fixed.get("results", [])
    if not rows or any("status" not in x for x in rows):
        return []
    if all(x["status"] == "ok" for x in rows):
        return [("fp8_margin", "default", "FP8 followed bf16 on the fixed batch at micro-batch "
                 + " and ".join(str(x["micro_batch"]) for x in rows))]
    out = []
    for x in (x for x in rows if x["status"] != "ok"):
        passed = [v for v, got in x.get("bisect", {}).items() if isinstance(got, dict) and got.get("status") == "ok"]
        why = f"FP8 failed the fixed batch at micro-batch {x['micro_batch']} ({x.get('problem', '')})"
        for v in passed:
            setting, value = FIXED_FIX.get(v, ("fp8_backend", fixed.get("other_gemm", "the other GEMM")))
            out.append((setting, value, why + f"; {v} alone follows bf16"))
        if not passed:
            out.append(("fp8", "False", why + "; no single variant follows bf16"))
    return out


def _mfu_settings(phases: list) -> list:
    """Each phase's measured MFU (trainer section) for the `mfu` phase key the dry run's cost reads."""
    got = [x for x in phases if x.get("mfu")]
    return [("phases' mfu (the dry run's cost)", ", ".join(f"{x['phase']} {x['mfu']:.2f}" for x in got),
             "the trainer section's per-phase MFU")] if got else []


def goals(report: dict) -> list[tuple[str, str, str, str]]:
    """(goal, measured, target, "met" | "not met" | "not measured") for each of GOALS."""
    sec = {r["section"]: r for r in report["sections"]}
    runs = {k: v for k, v in sec.get("train", {}).get("runs", {}).items()
            if v.get("status") == "ok" and v.get("tokens_per_s")}
    phases = [x for x in sec.get("trainer", {}).get("results", []) if x.get("tokens_per_s")]
    fp8 = [v["tokens_per_s"] for k, v in runs.items() if k.startswith("fp8")]
    speedup = max(fp8) / runs["bf16"]["tokens_per_s"] if fp8 and "bf16" in runs else None
    bf16_mfu = runs.get("bf16", {}).get("mfu")
    muon = next((x for x in phases if x["optimizer"] == "muon"), None)
    adamw = next((x for x in phases[::-1] if x["optimizer"] == "adamw" and muon
                  and (x["batch"], x["seq_len"]) == (muon["batch"], muon["seq_len"])), None)
    muon_step = adamw["tokens_per_s"] / muon["tokens_per_s"] if adamw else None
    out = [_goal("FP8 tokens/s over bf16's (train: the fastest FP8 run)", speedup, GOALS["fp8_speedup"], "x{:.2f}"),
           _goal("bf16 MFU (train)", bf16_mfu, GOALS["bf16_mfu"], "{:.1%}"),
           _goal("the Muon step over the AdamW step, same batch (trainer: "
                 + (f"{muon['phase']} vs {adamw['phase']})" if adamw else "the decay vs the stable phase)"),
                 muon_step, GOALS["muon_step"], "x{:.2f}", below=True)]
    first_len = phases[0]["seq_len"] if phases else None
    for T in dict.fromkeys(x["seq_len"] for x in phases if x["seq_len"] != first_len and x.get("mfu")):
        out.append(_goal(f"MFU at {T} tokens (trainer)", max(x["mfu"] for x in phases if x["seq_len"] == T),
                         GOALS["long_mfu"], "{:.1%}"))
    fixed = sec.get("fixed", {}).get("results", [])
    done = fixed and all("status" in x for x in fixed)
    out.append(("FP8 follows bf16 on the fixed batch (fixed)", ", ".join(
        f"micro-batch {x['micro_batch']} {x['status']}" for x in fixed) if done else "-", "every micro-batch ok",
        ("met" if all(x["status"] == "ok" for x in fixed) else "not met") if done else "not measured"))
    return out


def _goal(name, value, target, fmt, below=False):
    if value is None:
        return name, "-", ("<= " if below else ">= ") + fmt.format(target), "not measured"
    met = value <= target if below else value >= target
    return name, fmt.format(value), ("<= " if below else ">= ") + fmt.format(target), "met" if met else "not met"


# ----------------------------------------------------------------------------------------------------
# the page

def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device']})", "", f"`{report['command']}`", "",
             "| section | status | seconds | summary |", "|---|---|---:|---|"]
    for r in report["sections"]:
        lines.append(f"| {r['section']} | {r['status']} | {r.get('seconds', '')} | {summary(r)} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    lines += _table("What these measurements suggest", ["setting", "value", "measured"], settings(report))
    met = goals(report)
    if any(g[3] != "not measured" for g in met):
        lines += _table("Goals", ["goal", "measured", "target", "verdict"], met)
    for r in report["sections"]:
        if r.get("error"):
            lines += [f"**{r['section']}**: {r['error']}", ""]
        for title, (head, rows) in [(r["section"], details(r))] + more_details(r):
            lines += _table(title, head, rows)
    return "\n".join(lines)


def _table(title, head, rows) -> list[str]:
    if not rows:
        return []
    return ([f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows] + [""])


def _ratio_of(rows, kernel, fast):
    got = [x["error_over_bound"] for x in rows if x.get("kernel") == kernel and x.get("fast_accum") == fast
           and "error_over_bound" in x]
    return f"{max(got):.2g}" if got else "-"


def summary(r: dict) -> str:
    """One line per section for the table at the top of gpu_check.md (details() has the rest)."""
    s, res = r["section"], r.get("results", [])
    if s == "sm90":
        cast = r.get("cast", [])
        return (f"{sum(x['status'] == 'ok' for x in res)} of {len(res)} compilations ok; most registers "
                + ", ".join(f"{g} {max(x.get('reg', 0) for x in res if x['gemm'] == g)}"
                            for g in dict.fromkeys(x["gemm"] for x in res))
                + (f"; cast kernel {sum(x['status'] == 'ok' for x in cast)} of {len(cast)} ok, most registers "
                   f"{max(x.get('reg', 0) for x in cast)}" if cast else ""))
    if s == "kernel":
        return (f"{sum(x['status'] == 'ok' for x in res)} of {len(res)} ok; worst error / fp32 bound: triton "
                f"{_ratio_of(res, 'triton', False)} (fast {_ratio_of(res, 'triton', True)}), torch "
                f"{_ratio_of(res, 'torch', False)} (fast {_ratio_of(res, 'torch', True)})")
    if s == "gemm":
        def mean_speedup(col):
            got = [x[col] / x["bf16_mm_tflops"] for x in res if col in x and x.get("bf16_mm_tflops")]
            return f"x{math.exp(sum(map(math.log, got)) / len(got)):.3g}" if got else "-"
        cast, layers = r.get("cast", []), r.get("layers", [])
        timed = [x["speedup"] for x in cast if "speedup" in x]
        return (f"FP8 vs bf16 torch.mm, geometric mean of {len(res)} GEMMs: triton {mean_speedup('triton_fp8_tflops')}"
                f", torch._scaled_mm {mean_speedup('torch_scaled_mm_tflops')}"
                + (f"; fused cast vs separate ops x{math.exp(sum(map(math.log, timed)) / len(timed)):.3g}, "
                   f"{sum(x['bit_equal'] for x in cast)} of {len(cast)} bit-equal" if timed else "")
                + ("; layer fwd+bwd FP8 (cuBLASLt) vs bf16: " + ", ".join(
                    f"{x['fp8_layers_name']} x{x['fp8_torch_vs_bf16']:.2f}" for x in layers if "fp8_torch_vs_bf16" in x)
                   if layers else ""))
    if s == "train":
        return f"{r.get('n_layer')} layers x {r.get('hidden')}, {r.get('micro_batch')} x {r.get('seq_len')}: " + "; ".join(
            f"{k} {v.get('status')}" + (" (eager)" if v.get("compiled") is False and r.get("compiled") else "")
            + (f" {v['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in v else "")
            + (f" MFU {100 * v['mfu']:.1f}%" if v.get("mfu") else "")
            for k, v in r.get("runs", {}).items())
    if s == "ns":
        return (f"{r.get('ms_per_step_one_device', float('nan')):.1f} ms per step for {r.get('matrices')} matrices one "
                "by one" + (f", {r['batched_ms_per_step_one_device']:.1f} ms batched by shape"
                            if "batched_ms_per_step_one_device" in r else ""))
    if s == "attn":
        return attn_summary(r)
    if s == "dist":
        return (f"{r.get('backend')}: DDP grad diff {r.get('ddp_max_grad_diff')}, amax all-reduce equal "
                f"{r.get('amax_all_reduce_equal')} ({r.get('amax_layers')} layers)")
    if s == "trainer":
        return (f"{r.get('steps')} steps, stopped at {r.get('stopped_at')} and resumed: losses <= "
                f"{r.get('resume_max_loss_diff', float('nan')):.2g} from the uninterrupted run's; checkpoint read "
                f"{r.get('checkpoint_read_s')} s; " + ", ".join(
                    f"{x['phase']} {x['tokens_per_s']:.0f} tok/s" + (f" MFU {100 * x['mfu']:.1f}%" if x["mfu"] else "")
                    for x in res))
    if s == "fixed":
        return f"{r.get('n_layer')} layers x {r.get('hidden')}, {r.get('steps')} steps: " + "; ".join(
            f"micro-batch {x['micro_batch']} {x['status']}" + (f", steps <= {x['max_rel_diff']:.2g} apart"
                                                               if "max_rel_diff" in x else "") for x in res)
    return ""


def attn_summary(r: dict) -> str:
    """The attn section's line: per seq_len what auto ran and the fastest case; the whole model, auto vs that."""
    res, parts = r.get("results", []), []
    for T in dict.fromkeys(x["seq_len"] for x in res):
        mine = [x for x in res if x["seq_len"] == T and x["status"] == "ok"]
        auto = next((x for x in mine if x["backend"] == "auto" and x["gqa"] == "native"), None)
        best = min(mine, key=lambda x: x["ms"], default=None)
        if auto and best:
            parts.append(f"{T}: auto ran {auto.get('ran')} {auto['tflops']:.3g} TFLOP/s, fastest {best['backend']}/"
                         f"{best['gqa']} {best['tflops']:.3g}")
    for x in r.get("model", []):
        parts.append(f"model {x['micro_batch']} x {x['seq_len']} {x['backend']}/{x['gqa']} " + (
            f"{x['tokens_per_s']:.0f} tok/s" + (f" MFU {100 * x['mfu']:.1f}%" if x.get("mfu") else "")
            if x["status"] == "ok" else x["status"]))
    return "; ".join(parts)


def details(r: dict) -> tuple[list, list]:
    """(header, rows) of a section's table in gpu_check.md: every measured case, not only the summary."""
    s, res = r["section"], r.get("results", [])
    num = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"  # noqa: E731
    if s == "kernel":
        return (["kernel", "operands", "layout", "M x K x N", "accumulation", "status", "error / fp32 bound"],
                [[x["kernel"], x.get("dtype") or f"{x['a']} x {x['b']}", x.get("layout", "-"),
                  "x".join(map(str, x.get("shape", []))) or "-",
                  {True: "fast", False: "split"}.get(x.get("fast_accum"), "-"), x["status"],
                  num(x.get("error_over_bound"), ".3g") if "error_over_bound" in x else
                  x.get("error", "/".join(f"{e:.2g}" for e in x.get("rel_err_loss_dh_dw", [])))] for x in res])
    if s == "gemm":
        cols = ("bf16_mm", "triton_fp8", "torch_scaled_mm", "triton_fp8_fast")
        return (["layer", "gemm", "M x K x N", *(c + " TFLOP/s" for c in cols)],
                [[x["layer"], x["gemm"], f"{x['M']}x{x['K']}x{x['N']}",
                  *(num(x.get(c + "_tflops"), ".4g") if c + "_tflops" in x else x.get(c + "_error", "-")
                    for c in cols)] for x in res])
    if s == "train":
        return (["run", "status", "compiled", "GEMM", "tokens/s", "step ms", "fwd+bwd ms", "MFU %", "peak GB",
                 "vs bf16",
                 "mean loss diff", "weight casts / step", "cast launches / step", "host syncs",
                 "GEMM / attention / other ms"],
                [[k, v.get("status"), str(v.get("compiled")) + (
                    f" {v['compile_mode']}, {v['cudagraph_skips']} graph skips"
                    if v.get("compile_mode", "default") != "default" else ""),
                  v.get("gemm") or "bf16", num(v.get("tokens_per_s"), ".0f"),
                  num(v.get("step_ms"), ".1f"), num(v.get("fwd_bwd_ms"), ".1f"),
                  num(100 * v["mfu"], ".1f") if v.get("mfu") else "-",
                  num(v.get("peak_mem_gb"), ".1f"), num(v.get("speedup_vs_bf16"), ".2f")
                  + (f" ({v['speedup_vs_uncached']:.2f} vs uncached)" if "speedup_vs_uncached" in v else ""),
                  num(v.get("mean_loss_rel_diff_vs_bf16"), ".2g"), num(v.get("weight_casts_per_step"), ".3g"),
                  num(v.get("cast_launches_per_step"), ".4g"),
                  num(v.get("host_syncs_per_step"), "d"),
                  " / ".join(num(v["profile"]["ms"][c], ".1f") for c in ("gemm", "attention", "other"))
                  if v.get("profile") else "-"]
                 for k, v in r.get("runs", {}).items()])
    if s == "fixed":
        peak = lambda use: " / ".join(f"{max(u[i] for u in use):.3g}" for i in range(3)) if use else "-"  # noqa: E731
        verdict = lambda v: v if isinstance(v, str) else v["status"]  # noqa: E731
        return (["micro-batch", "status", "first loss", "bf16 last / first", "fp8 last / first", "max step diff",
                 "fp8 largest range use x / W / dY", "where FP8 failed: each variant alone"],
                [[x["micro_batch"], x["status"], num(x["losses"].get("bf16", [None])[0], ".4g"),
                  *(num(x.get("final_over_first", {}).get(k), ".3f") for k in ("bf16", "fp8")),
                  num(x.get("max_rel_diff"), ".2g"), peak(x.get("range_use", {}).get("fp8")),
                  ", ".join(f"{k} {verdict(v)}" for k, v in x.get("bisect", {}).items()) or "-"] for x in res])
    if s == "attn":
        return (["seq_len x micro-batch", "backend", "K/V", "status", "ms fwd+bwd", "TFLOP/s", "auto ran",
                 "vs auto", "longest kernels / why not"],
                [[f"{x['seq_len']} x {x['micro_batch']}", x["backend"], x["gqa"], x["status"], num(x.get("ms"), ".4g"),
                  num(x.get("tflops"), ".4g"), x.get("ran", "-"), num(x.get("rel_err_vs_auto"), ".2g"),
                  x.get("reasons") or x.get("error") or ", ".join(k[:60] for k in x.get("kernels", [])) or "-"]
                 for x in res])
    if s == "trainer":
        return (["phase", "steps", "batch x seq", "optimizer", "tokens/s", "MFU %", "FP8 range use x / W / dY"],
                [[x["phase"], x["steps"], f"{x['batch']} x {x['seq_len']}", x["optimizer"],
                  num(x["tokens_per_s"], ".0f"), num(100 * x["mfu"], ".1f") if x["mfu"] else "-",
                  " / ".join(f"{v:.3g}" for v in x["fp8_range"].values()) if x.get("fp8_range") else "-"]
                 for x in res])
    return [], []


def more_details(r: dict) -> list:
    """[(title, (header, rows))] of a section's further tables in gpu_check.md (the fused cast, the layers)."""
    num = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"  # noqa: E731
    s, out = r["section"], []
    if s == "sm90" and r.get("cast"):
        out.append(("sm90: the fused cast kernel", (
            ["launch", "x", "fp8", "status", "registers", "spills", "shared", "rounding adds", "div.rn"],
            [[x["launch"], x["x"], x["fp8"], x["status"] + (f" {x.get('problems') or x.get('error')}"
                                                            if x["status"] != "ok" else ""),
              x.get("reg", "-"), x.get("local", 0) + x.get("stack", 0), x.get("shared", "-"),
              x.get("rounding_adds", "-"), x.get("div_rn", "-")] for x in r["cast"]])))
    if s == "gemm" and r.get("cast"):
        out.append(("gemm: the fused cast vs the separate ops", (
            ["layer", "tensor", "fp8", "M x N", "bit-equal", "fused ms", "separate ms", "speedup", "fused GB/s"],
            [[x["layer"], x["tensor"], x["fp8"], f"{x['M']}x{x['N']}", x["bit_equal"], num(x.get("fused_ms"), ".4g"),
              num(x.get("separate_ms"), ".4g"), num(x.get("speedup"), ".2f"), num(x.get("fused_gb_s"), ".4g")]
             for x in r["cast"]])))
    if s == "attn" and r.get("model"):
        out.append(("attn: the whole model, forward + backward (eager)", (
            ["micro-batch x seq_len", "layers", "backend", "K/V", "status", "step ms", "tokens/s", "MFU %", "vs auto"],
            [[f"{x['micro_batch']} x {x['seq_len']}", x["n_layer"], x["backend"], x["gqa"], x["status"]
              + (f" {x['error']}" if x.get("error") else ""), num(x.get("step_ms"), ".1f"),
              num(x.get("tokens_per_s"), ".0f"), num(100 * x["mfu"], ".1f") if x.get("mfu") else "-",
              num(x.get("speedup_vs_auto"), ".2f")] for x in r["model"]])))
    if s == "gemm" and r.get("layers"):
        out.append(("gemm: each block linear, forward + backward", (
            ["fp8_layers", "M x K x N", "bf16 ms", "FP8 cuBLASLt ms (cold)", "vs bf16", "FP8 Triton ms (cold)",
             "vs bf16"],
            [[x["fp8_layers_name"], f"{x['M']}x{x['K']}x{x['N']}", num(x["bf16_ms"], ".4g")]
             + [f"{num(x.get(f'fp8_{k}_ms'), '.4g')} ({num(x.get(f'fp8_{k}_cold_ms'), '.4g')})"
                if f"fp8_{k}_ms" in x else x.get(f"fp8_{k}_error", "-") for k in ("torch",)]
             + [num(x.get("fp8_torch_vs_bf16"), ".2f")]
             + [f"{num(x.get('fp8_triton_ms'), '.4g')} ({num(x.get('fp8_triton_cold_ms'), '.4g')})"
                if "fp8_triton_ms" in x else x.get("fp8_triton_error", "-"), num(x.get("fp8_triton_vs_bf16"), ".2f")]
             for x in r["layers"]])))
    return out


def write(report: dict, out: str) -> None:
    from runtime import atomic_write
    with atomic_write(os.path.join(out, "gpu_check.json")) as f:
        json.dump(report, f, indent=1, default=str)
    with atomic_write(os.path.join(out, "gpu_check.md")) as f:
        f.write(markdown(report))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.gpu_report", description=__doc__.split("\n")[0])
    p.add_argument("record", help="a gpu_check.json (tools.gpu_check's record)")
    args = p.parse_args(argv)
    try:
        with open(args.record) as f:
            report = json.load(f)
        report["sections"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{args.record}: not a gpu_check record ({type(e).__name__}: {e})") from None
    from runtime import atomic_write
    out = os.path.join(os.path.dirname(os.path.abspath(args.record)), "gpu_check.md")
    with atomic_write(out) as f:
        f.write(markdown(report))
    print(out)


if __name__ == "__main__":
    tools.run(main)
