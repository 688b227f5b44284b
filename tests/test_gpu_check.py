"""tools/gpu_check.py on the CPU: the whole sequence at tiny shapes (Triton interpreter, emulated FP8 training,
gloo), what it records, and that a failing or overrunning section is recorded without stopping the rest."""
import json
import math
import time

import pytest
import torch

from tools import gpu_check, gpu_report

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny steps, where more threads only wait at barriers


def test_gpu_check_runs_every_section_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored afterwards for the other test modules
    report = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--dtype", "float32"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert [r["section"] for r in saved["sections"]] == list(gpu_check.SECTIONS) == [r["section"] for r in report["sections"]]
    for r in saved["sections"]:
        assert r["status"] == "ok", (r["section"], r.get("error"))
        assert r["versions"]["torch"] and r["device"] == "cpu" and f"--sections {r['section']}" in r["command"]
        assert f"| {r['section']} | ok |" in md
    sm90, kernel, gemm, train, ns, attn, dist, fixed, trainer = saved["sections"]
    # the Triton kernel compiled for Hopper from this CPU: every config the autotuner would try, per GEMM
    import fp8
    tried = [(r["gemm"], r["config"]) for r in sm90["results"]]
    assert tried == [(g, list(c)) for g, *_, fast in gpu_check.SM90_GEMMS for c in fp8.H100_CONFIGS
                     if fp8.accumulator_fits(c[0], c[1], c[4], fast)]
    assert len(sm90["pruned"]) == 6 and ["wgrad", 128, 256, 128, 8, 8, 3] in sm90["pruned"]  # split acc: spills
    for r in sm90["results"]:
        fmt = "e4m3.e4m3" if r["gemm"] == "fwd" else "e5m2.e4m3"
        assert r["wgmma"] and all(w.endswith(f".f32.{fmt}") for w in r["wgmma"]), r
        assert r["stage_buffers"] >= 2 and r["shared"] <= gpu_check.SM90_SHARED_LIMIT  # pipelined, fits
        assert 0 < r["reg"] <= 255 and r["local"] == r["stack"] == 0
        # the split accumulator: one fp32 add per accumulator value held by a thread, none with fast accumulation
        bm, bn, _, _, warps, _ = r["config"]
        assert (r["fp32_adds"] == 0) if r["fast_accum"] else (r["fp32_adds"] >= bm * bn // (32 * warps)), r
    # the fused cast kernel compiled for Hopper in each launch mode: no spills, its rounding kept, div.rn for the
    # weight's scale, the transposed store through shared memory
    assert [r["launch"] for r in sm90["cast"]] == [c[0] for c in gpu_check.SM90_CASTS]
    for r in sm90["cast"]:
        assert r["status"] == "ok" and r["local"] == r["stack"] == 0 and 0 < r["reg"] <= 255, r
        assert (r["rounding_adds"] > 0) == (r["launch"] != "jit_amax") and (r["div_rn"] > 0) == (
            r["launch"] == "weight_recast"), r
        assert r["shared"] >= 64 * 64 or r["launch"] == "jit_amax", r
    # 2 format pairs x 2 layouts x 2 kernels, each inside the fp32-summation bound (torch 2.13 has a CPU _scaled_mm)
    fp8_rows = [x for x in kernel["results"] if x["kernel"] != "chunked_ce"]
    assert len(fp8_rows) == 12
    assert {(x["kernel"], x["a"], x["b"], x["layout"], x["fast_accum"]) for x in fp8_rows} == {
        (k, a, "float8_e4m3fn", lay, fast) for k in ("triton", "torch") for a in ("float8_e4m3fn", "float8_e5m2")
        for lay, fast in (("k_major", False), ("k_major", True), ("row_major", False))}
    assert all(0 <= x["error_over_bound"] <= 1 for x in fp8_rows)  # fp32 accumulation on a CPU, fast or not
    # the eager chunked loss on the device vs float64 cross-entropy, in fp32 and bf16
    ce = {x["dtype"]: x["rel_err_loss_dh_dw"] for x in kernel["results"] if x["kernel"] == "chunked_ce"}
    assert set(ce) == {"float32", "bfloat16"} and max(ce["float32"]) < 1e-4 and max(ce["bfloat16"]) < 3e-2
    assert len(gemm["results"]) == 4 * 3 and all(
        x[k] > 0 for x in gemm["results"] for k in ("bf16_mm_tflops", "triton_fp8_tflops", "torch_scaled_mm_tflops"))
    assert [(x["gemm"], x["fast_accum"], "triton_fp8_fast_tflops" in x) for x in gemm["results"][:3]] == [
        ("fwd", True, False), ("dgrad", False, True), ("wgrad", False, True)]
    assert gemm["results"][0]["M"] == 32 and gemm["results"][0]["K"] == 32  # the tiny config's qkv forward
    # the fused cast against the separate ops (the kernel under the interpreter): every fp8 value and tie of both
    # formats, then x, dY and W of each layer, the same bytes and amax, each timed both ways
    assert len(gemm["cast"]) == 2 + 4 * 3 and all(x["bit_equal"] for x in gemm["cast"])
    assert [x["tensor"] for x in gemm["cast"][2:5]] == ["x", "dy", "weight"] and gemm["cast"][3]["fp8"] == "float8_e5m2"
    assert all(x["fused_ms"] > 0 and x["separate_ms"] > 0 and x["fused_gb_s"] > 0 for x in gemm["cast"][2:])
    # each block linear forward + backward, FP8 (both GEMM kernels, the weight cache warm and cold) vs bf16
    import model
    assert [x["fp8_layers_name"] for x in gemm["layers"]] == list(model.FP8_LAYERS)
    assert all(x[k] > 0 for x in gemm["layers"] for k in ("bf16_ms", "fp8_torch_ms", "fp8_torch_cold_ms",
                                                          "fp8_triton_ms", "fp8_torch_vs_bf16"))
    runs = train["runs"]
    assert set(runs) == set(gpu_check.TRAIN_RUNS) and train["micro_batches"] == 2
    # the weight cache: each FP8 linear's weight cast once per optimizer step of 2 micro-batches (2 blocks x 4
    # linears; 3 without the attention output projection), never without the cache; and the same losses
    assert [runs[k]["weight_casts_per_step"] for k in ("fp8_torch", "fp8_torch_uncached", "fp8_torch_no_out")] == [
        8, 0, 6]
    assert runs["fp8_torch"]["losses"] == runs["fp8_torch_uncached"]["losses"]
    assert runs["fp8_torch"]["max_loss_rel_diff_vs_uncached"] == 0 and runs["fp8_torch"]["speedup_vs_uncached"] > 0
    assert runs["fp8_triton"]["gemm"] == runs["fp8_torch"]["gemm"] == "emulate"  # FP8 training on a CPU
    for v in runs.values():
        assert len(v["losses"]) == train["steps"] + 2 and all(math.isfinite(x) for x in v["losses"])
        assert abs(v["losses"][0] - math.log(512)) < 0.5  # synthetic tokens from 512: ~uniform at init
        assert 0 < v["fwd_bwd_ms"] < v["step_ms"] and v["fwd_bwd_tokens_per_s"] > v["tokens_per_s"]  # + optimizer
        assert v["cast_launches_per_step"] == 0  # FP8 emulated on a CPU: no kernel launched
    assert runs["fp8_torch"]["fwd_bwd_speedup_vs_bf16"] > 0
    assert runs["fp8_triton"]["losses"] != runs["bf16"]["losses"]  # FP8 really quantized
    assert all(v["host_syncs_per_step"] is None for v in runs.values())  # counted on CUDA only
    assert runs["bf16"]["update_fp8_scales_ms"] is None and runs["fp8_torch"]["update_fp8_scales_ms"] > 0
    assert 0 < runs["fp8_triton"]["mean_loss_rel_diff_vs_bf16"] <= gpu_check.FP8_LOSS_RTOL
    for v in runs.values():  # one step under the profiler: its time by kernel class, the GEMMs found by name
        prof = v["profile"]
        assert prof["ms"]["gemm"] > 0 and prof["ms"]["attention"] >= 0 and prof["ms"]["other"] > 0
        assert prof["total_ms"] == pytest.approx(sum(prof["ms"].values())) and len(prof["top"]) == 12
    assert ns["matrices"] == 2 * 4 and len(ns["results"]) == 4  # [q;k;v] 64x32, o 32x32, [gate;up] 160x32, down 32x80
    assert ns["batched_ms_per_step_one_device"] > 0 and all(x["count"] == 2 and x["batched_ms"] > 0 for x in ns["results"])
    assert len(attn["results"]) == 3 * 5 * 2 and [x["backend"] for x in attn["model"]][0] == "auto"  # test_attn_...
    # gpu_check.md: every measured case in a table per section, beside the one-line summaries
    assert "| fp8_triton | ok | False | emulate |" in md and md.count("| qkv | dgrad | 32x64x32 |") == 1
    assert "## gemm: the fused cast vs the separate ops" in md and "| - | every value and tie | float8_e5m2 |" in md
    assert "## gemm: each block linear, forward + backward" in md and "## sm90: the fused cast kernel" in md
    assert "| weight_recast | fp32 | float8_e4m3fn | ok |" in md
    assert md.count("| triton | float8_e5m2 x float8_e4m3fn | k_major | 48x64x32 | fast | ok |") == 1
    assert dist["backend"] == "gloo" and dist["world"] == 1 and dist["ddp_max_grad_diff"] == 0.0
    assert dist["amax_all_reduce_equal"] is True and dist["amax_layers"] == 2 * 4 and dist["amax_local"][0] > 0
    # one fixed batch per micro-batch size, bf16 and FP8 from the same init, every step's loss recorded
    assert [x["micro_batch"] for x in fixed["results"]] == list(gpu_check.FIXED_MICRO_BATCHES) == [4, 8]
    for x in fixed["results"]:
        assert set(x["losses"]) == {"bf16", "fp8"} and all(len(v) == fixed["steps"] == 20 for v in x["losses"].values())
        assert x["losses"]["bf16"] != x["losses"]["fp8"] and 0 < x["max_rel_diff"] <= gpu_check.FIXED_BATCH_RTOL
        assert all(v < gpu_check.FIXED_BATCH_DROP for v in x["final_over_first"].values())
        use = x["range_use"]["fp8"]  # x, W, dY per step: the first scaled just in time, later ones near 1
        assert len(use) == 20 and use[0] == [1.0, 1.0, 1.0] and all(0 < u <= 4 for step in use for u in step)
        assert "bisect" not in x
    assert md.count("| 4 | ok |") == 1 and "micro-batch 8 ok" in md
    # the real train.py under torchrun through every phase kind; stopped and resumed = uninterrupted, bit for bit
    phases = gpu_check.TRAINER_PHASES["cpu"]
    assert trainer["steps"] == sum(p[1] for p in phases) and trainer["resume_max_loss_diff"] == 0.0
    assert [(x["phase"], x["steps"], x["seq_len"]) for x in trainer["results"]] == [(p[0], p[1], p[3]) for p in phases]
    assert [x["optimizer"] for x in trainer["results"]] == ["adamw"] * 3 + ["muon"] * 4  # the switch at the decay
    assert all(x["tokens_per_s"] > 0 and x["mfu"] is None for x in trainer["results"])  # MFU: on CUDA only
    assert all(set(x["fp8_range"]) == {"x", "w", "dy"} and min(x["fp8_range"].values()) > 0  # xmodel25: FP8
               for x in trainer["results"])
    assert set(trainer["launches"]) == {"whole", "stopped", "resumed"} and trainer["checkpoint_read_s"] >= 0
    assert "| long16k | 1 | 2 x 128 | muon |" in md
    # what the measurements choose (which way depends on this CPU's timings) and the goals measured here
    suggested = {row[0] for row in gpu_report.settings(saved)}
    assert {"fp8_layers", "compile_mode", "fp8.DIRECT_LAUNCH (module switch)", "attn_backend, gqa (the phases at 64)",
            "fp8_margin"} <= suggested and ({"fp8", "fp8, fp8_backend"} & suggested)
    assert "phases' mfu (the dry run's cost)" not in suggested  # no MFU without a GPU's peak
    assert "## What these measurements suggest" in md and "| fp8_margin | default |" in md
    assert "| FP8 follows bf16 on the fixed batch (fixed) | micro-batch 4 ok, micro-batch 8 ok |" in md


def test_attn_section_times_every_kernel_and_records_the_ones_that_refuse(tmp_path):
    """The attn section on the CPU: every phase shape x kernel x K/V mode is a row; the CPU's kernels (flash, and
    math, timed only here) run and match auto, the CUDA ones are "unavailable" rows carrying PyTorch's error, auto's
    choice is recorded; then the whole model with auto and with the fastest case."""
    import model
    report = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--sections", "attn"])
    (attn,) = report["sections"]
    assert attn["status"] == "ok", attn.get("error")
    rows, mcfg = attn["results"], gpu_check.shapes_config(torch.device("cpu"))[0]
    assert [(x["seq_len"], x["micro_batch"]) for x in rows[::10]] == list(gpu_check.ATTN_CPU_SHAPES)
    assert [(x["backend"], x["gqa"]) for x in rows[:10]] == [
        (b, g) for b in ("auto", "flash", "efficient", "cudnn", "math") for g in ("native", "repeat")]
    for x in rows:
        if x["backend"] in ("efficient", "cudnn"):  # CUDA kernels: refused, with torch's words
            assert x["status"] == "unavailable" and "No viable backend" in x["error"] and "ms" not in x, x
            continue
        assert x["status"] == "ok" and x["ms"] > 0, x
        # the model's FLOP count: 6 * T * n_head * head_dim per token and layer, fwd + bwd, causal
        flops = x["micro_batch"] * x["seq_len"] * 6 * x["seq_len"] * mcfg.n_head * mcfg.head_dim
        assert x["tflops"] == pytest.approx(flops / x["ms"] / 1e9)
        if x["backend"] == "auto":
            assert x["ran"] == "flash" and x["kernels"], x  # torch 2.13's CPU choice, and what the profiler saw
        if (x["backend"], x["gqa"]) != ("auto", "native"):
            assert x["rel_err_vs_auto"] < 1e-5, x  # fp32: every kernel computes the same attention
    # the whole model at the second shape (the 8k phase's on CUDA): the default against the fastest other case
    auto, best = attn["model"]
    fastest = min((x for x in rows if x["seq_len"] == 64 and x["status"] == "ok" and x is not rows[10]),
                  key=lambda x: x["ms"])
    assert (auto["backend"], auto["gqa"], best["backend"], best["gqa"]) == (
        "auto", "native", fastest["backend"], fastest["gqa"])
    assert all(x["status"] == "ok" and x["tokens_per_s"] > 0 and x["seq_len"] == 64 for x in attn["model"])
    assert best["speedup_vs_auto"] == pytest.approx(auto["step_ms"] / best["step_ms"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| 128 x 1 | math | repeat | ok |" in md and "## attn: the whole model, forward + backward (eager)" in md
    assert "auto ran flash" in md and model.NO_KERNEL[1] in md


def test_a_failing_or_overrunning_section_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    def boom(device, args, rec):
        rec["partial"] = 1
        raise RuntimeError("boom")

    def hang(device, args, rec):
        time.sleep(30)

    monkeypatch.setitem(gpu_check.RUNNERS, "kernel", boom)
    monkeypatch.setitem(gpu_check.RUNNERS, "gemm", hang)
    monkeypatch.setitem(gpu_check.TIME_BOX, "gemm", 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    t0 = time.perf_counter()
    gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--sections", "kernel,gemm,ns"])
    assert time.perf_counter() - t0 < 25  # the hang was cut at its (scaled) time box
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    kernel, gemm, ns = saved["sections"]
    assert kernel["status"] == "failed" and "boom" in kernel["error"] and kernel["partial"] == 1
    assert gemm["status"] == "timeout" and "time box" in gemm["error"]
    assert ns["status"] == "ok" and ns["matrices"] == 8
    assert "boom" in (tmp_path / "gpu_check.md").read_text()


def test_the_budget_cuts_the_last_sections_short_and_skips_what_it_cannot_start(tmp_path, monkeypatch):
    """--budget_s (a GPU machine's 600 s per-command limit): a section gets at most what is left; once under 5 s
    is left the rest are skipped, recorded, and the report is still written."""
    monkeypatch.setitem(gpu_check.RUNNERS, "kernel", lambda device, args, rec: time.sleep(30))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    t0 = time.perf_counter()
    gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--sections", "kernel,ns", "--budget_s", "6"])
    assert time.perf_counter() - t0 < 20
    kernel, ns = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert kernel["status"] == "timeout" and kernel["time_box_s"] == 6
    assert ns["status"] == "skipped" and "--budget_s" in ns["error"]
    assert "| ns | skipped |" in (tmp_path / "gpu_check.md").read_text()


def test_sm90_section_fails_on_a_spilling_tile(tmp_path, monkeypatch):
    """The sm_90 check reads spills from the compiled kernel: a 128x256 tile on 8 warps compiles clean with
    fast accumulation and spills with the split accumulator, so forcing the autotuner to keep it fails."""
    import fp8
    monkeypatch.setattr(fp8, "H100_CONFIGS", [(128, 256, 128, 8, 8, 3)])
    monkeypatch.setattr(fp8, "accumulator_fits", lambda *a: True)
    report = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--sections", "sm90"])
    (sec,) = report["sections"]
    assert sec["status"] == "failed" and "register spills" in sec["error"]
    fwd, dgrad, wgrad = sec["results"]
    assert fwd["status"] == "ok" and fwd["stack"] == 0
    assert dgrad["problems"] == wgrad["problems"] == ["register spills"] and dgrad["stack"] > 0


def test_a_run_that_fails_to_compile_is_measured_eagerly(tmp_path, monkeypatch):
    """A compiler problem on the GPU must not cost the kernel's numbers: the run is repeated without compile,
    the compile error kept beside it."""
    from model import Xmodel

    def broken(self, mode="default"):
        raise RuntimeError("inductor says no")

    monkeypatch.setattr(Xmodel, "compile_for_training", broken)
    report = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--sections",
                             "train,fixed", "--compile", "on", "--fixed_steps", "3", "--train_runs", "bf16,fp8_torch"])
    train, fixed = report["sections"]
    assert train["status"] == "ok" and train["compiled"] is True
    for run in train["runs"].values():
        assert run["status"] == "ok" and run["compiled"] is False and "inductor says no" in run["compile_error"]
        assert run["tokens_per_s"] > 0
    for x in fixed["results"]:  # measured eagerly too (3 steps: too few to judge, only the fallback is checked)
        assert len(x["losses"]["fp8"]) == 3 and x["fp8_compiled"] is False and "inductor says no" in x["fp8_compile_error"]
    assert "bf16 ok (eager)" in (tmp_path / "gpu_check.md").read_text()


def test_where_fp8_fails_the_fixed_section_names_the_culprit(tmp_path, monkeypatch):
    """A broken weight cache (its FP8 copy zeroed): FP8 leaves bf16's curve; of the variants run one at a time
    only the one without the weight cache follows bf16 again, and the report says so."""
    import fp8
    refresh = fp8.FP8Linear.refresh_fp8_weight

    def broken(self, record):
        refresh(self, record)
        if self._w_q is not None:
            self._w_q = torch.zeros_like(self._w_q)

    monkeypatch.setattr(fp8.FP8Linear, "refresh_fp8_weight", broken)
    report = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--sections", "fixed"])
    (fixed,) = report["sections"]
    assert fixed["status"] == "failed" and "FP8 does not follow bf16" in fixed["error"]
    for x in fixed["results"]:
        assert x["status"] == "failed" and list(x["bisect"]) == list(gpu_check.FIXED_BISECT)
        assert {k: v["status"] for k, v in x["bisect"].items()} == dict(
            eager="failed", no_weight_cache="ok", separate_casts="failed", other_gemm="failed", margin_1="failed")
        assert len(x["bisect"]["no_weight_cache"]["fp8"]) == 20
    md = (tmp_path / "gpu_check.md").read_text()
    assert "eager failed, no_weight_cache ok, separate_casts failed, other_gemm failed, margin_1 failed" in md
    assert "| fp8.WEIGHT_CACHE (module switch) | False | FP8 failed the fixed batch at micro-batch 4 (" in md


def test_count_calls_counts_the_fused_cast_launches(monkeypatch):
    """The train section's launch count: each fused cast (a Python launch on the host) counted once, the
    counter removed again by stop()."""
    import fp8
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    real = fp8._launch_cast
    launches = gpu_check.count_calls("_launch_cast")
    x = torch.randn(8, 16)
    fp8.cast_transpose(x, torch.tensor(2.0), fp8.E4M3, kernel=True)
    fp8.cast_transpose(x, torch.tensor(2.0), fp8.E5M2, kernel=True)
    fp8.cast_transpose(x, torch.tensor(2.0), fp8.E4M3, kernel=False)  # the separate torch ops: no launch
    assert launches.stop() == 2 and fp8._launch_cast is real


def test_host_syncs_lists_where_a_step_waited_for_the_gpu(monkeypatch):
    """On CUDA the train section counts the host syncs of one training step with torch.cuda's sync debug mode:
    here the mode switch is recorded and the warnings it would raise are raised by hand, each at its own line."""
    import warnings
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step():
        warnings.warn("called a synchronizing CUDA operation")  # as the debug mode words it
        warnings.warn("some other warning")
        warnings.warn("called a synchronizing CUDA operation")

    sites = gpu_check.host_syncs(torch.device("cuda"), step)
    line = step.__code__.co_firstlineno
    assert sites == [f"tests/test_gpu_check.py:{line + 1}", f"tests/test_gpu_check.py:{line + 3}"]
    assert modes == ["warn", 0]

    def broken():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        gpu_check.host_syncs(torch.device("cuda"), broken)
    assert modes[-1] == 0  # the debug mode is switched off whatever the step does
    assert gpu_check.host_syncs(torch.device("cpu"), lambda: None) is None


def _record(train=None, attn=None, fixed=None, trainer=None):
    sections = [dict(section=name, status="ok", **body) for name, body in
                (("train", train), ("attn", attn), ("fixed", fixed), ("trainer", trainer)) if body is not None]
    return dict(device="cuda", versions={}, command="python -m tools.gpu_check", sections=sections)


def _run(tokens_per_s, gemm="torch", mfu=None):
    return dict(status="ok", tokens_per_s=tokens_per_s, gemm=gemm, mfu=mfu)


def _phase(name, optimizer, batch, seq_len, tokens_per_s, mfu):
    return dict(phase=name, steps=3, seq_len=seq_len, batch=batch, optimizer=optimizer, tokens_per_s=tokens_per_s,
                mfu=mfu)


def test_the_report_turns_measurements_into_settings_and_goals():
    """A setting leaves its default only where its run is faster by more than NOISE; each goal is met or not by its
    measured value; what was not measured says so."""
    record = _record(
        train=dict(runs=dict(bf16=_run(100.0, None, 0.52), fp8_torch=_run(125.0), fp8_triton=_run(110.0, "triton"),
                             fp8_torch_no_out=_run(130.0), fp8_torch_graphs=_run(126.0), fp8_torch_direct=_run(140.0),
                             fp8_torch_uncached=dict(status="failed"))),
        attn=dict(model=[dict(status="ok", micro_batch=2, seq_len=8192, backend="auto", gqa="native", n_layer=48,
                              tokens_per_s=50.0),
                         dict(status="ok", micro_batch=2, seq_len=8192, backend="cudnn", gqa="repeat", n_layer=48,
                              tokens_per_s=65.0, speedup_vs_auto=1.3)]),
        fixed=dict(results=[dict(micro_batch=4, status="ok", losses={}), dict(micro_batch=8, status="ok", losses={})]),
        trainer=dict(results=[_phase("stable2", "adamw", 16, 3712, 100.0, 0.5),
                              _phase("decay", "muon", 16, 3712, 90.0, 0.45),
                              _phase("long8k", "muon", 4, 8192, 80.0, 0.42),
                              _phase("long16k", "muon", 2, 16384, 70.0, 0.38)]))
    got = {name: value for name, value, _ in gpu_report.settings(record)}
    assert got == {"fp8, fp8_backend": "True, torch", "fp8_layers": '"qkv,gate_up,down"', "compile_mode": "default",
                   "fp8.DIRECT_LAUNCH (module switch)": "True",
                   "attn_backend, gqa (the phases at 8192)": "cudnn, repeat", "fp8_margin": "default",
                   "phases' mfu (the dry run's cost)": "stable2 0.50, decay 0.45, long8k 0.42, long16k 0.38"}
    goals = {g[0]: (g[1], g[3]) for g in gpu_report.goals(record)}
    assert goals == {"FP8 tokens/s over bf16's (train: the fastest FP8 run)": ("x1.40", "met"),
                     "bf16 MFU (train)": ("52.0%", "met"),
                     "the Muon step over the AdamW step, same batch (trainer: decay vs stable2)": ("x1.11", "met"),
                     "MFU at 8192 tokens (trainer)": ("42.0%", "met"),
                     "MFU at 16384 tokens (trainer)": ("38.0%", "not met"),
                     "FP8 follows bf16 on the fixed batch (fixed)": ("micro-batch 4 ok, micro-batch 8 ok", "met")}
    md = gpu_report.markdown(record)
    assert "| compile_mode | default | fp8_torch_graphs: x1.01 the tokens/s of fp8_torch |" in md
    assert "| MFU at 16384 tokens (trainer) | 38.0% | >= 40.0% | not met |" in md

    # FP8 slower than bf16, and failing the fixed batch: where one variant alone passes, its setting; else fp8 off
    bisect = dict(eager=dict(status="failed"), margin_1=dict(status="ok"), other_gemm=dict(status="ok"),
                  separate_casts="not run: the time box")
    record = _record(train=dict(runs=dict(bf16=_run(100.0), fp8_torch=_run(99.0))),
                     fixed=dict(other_gemm="triton", results=[
                         dict(micro_batch=4, status="failed", problem="fp8 climbs back at step 9", bisect=bisect,
                              losses={}),
                         dict(micro_batch=8, status="failed", problem="a run did not finish", bisect={},
                              losses={})]))
    rows = gpu_report.settings(record)
    assert [(name, value) for name, value, _ in rows] == [("fp8", "False"), ("fp8_margin", "1"),
                                                          ("fp8_backend", "triton"), ("fp8", "False")]
    assert rows[1][2] == ("FP8 failed the fixed batch at micro-batch 4 (fp8 climbs back at step 9); margin_1 alone "
                          "follows bf16")
    assert rows[3][2].endswith("no single variant follows bf16")
    goals = {g[0]: g[3] for g in gpu_report.goals(record)}
    assert goals["FP8 tokens/s over bf16's (train: the fastest FP8 run)"] == "not met"
    assert goals["bf16 MFU (train)"] == "not measured"
    assert goals["FP8 follows bf16 on the fixed batch (fixed)"] == "not met"

    # nothing that settles a setting or a goal: no such tables
    md = gpu_report.markdown(_record())
    assert "What these measurements suggest" not in md and "## Goals" not in md


def test_gpu_report_rewrites_the_page_from_a_record(tmp_path):
    record = _record(train=dict(runs=dict(bf16=dict(status="ok", tokens_per_s=100.0, mfu=0.5))))
    (tmp_path / "gpu_check.json").write_text(json.dumps(record))
    gpu_report.main([str(tmp_path / "gpu_check.json")])
    md = (tmp_path / "gpu_check.md").read_text()
    assert md == gpu_report.markdown(record) and "| bf16 MFU (train) | 50.0% | >= 50.0% | met |" in md
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a gpu_check record"):
        gpu_report.main([str(tmp_path / "bad.json")])
