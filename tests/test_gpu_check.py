"""tools/gpu_check.py on the CPU: the whole sequence at tiny shapes (Triton interpreter, emulated FP8 training,
gloo), what it records, and that a failing or overrunning section is recorded without stopping the rest."""
import json
import math
import time

from tools import gpu_check


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
    kernel, gemm, train, ns, dist = saved["sections"]
    # 2 format pairs x 2 layouts x 2 kernels, each inside the fp32-summation bound (torch 2.13 has a CPU _scaled_mm)
    fp8_rows = [x for x in kernel["results"] if x["kernel"] != "chunked_ce"]
    assert len(fp8_rows) == 8
    assert {(x["kernel"], x["a"], x["b"], x["layout"]) for x in fp8_rows} == {
        (k, a, "float8_e4m3fn", lay) for k in ("triton", "torch") for a in ("float8_e4m3fn", "float8_e5m2")
        for lay in ("k_major", "row_major")}
    assert all(0 <= x["error_over_bound"] <= 1 for x in fp8_rows)
    # the eager chunked loss on the device vs float64 cross-entropy, in fp32 and bf16
    ce = {x["dtype"]: x["rel_err_loss_dh_dw"] for x in kernel["results"] if x["kernel"] == "chunked_ce"}
    assert set(ce) == {"float32", "bfloat16"} and max(ce["float32"]) < 1e-4 and max(ce["bfloat16"]) < 3e-2
    assert len(gemm["results"]) == 4 * 3 and all(
        x[k] > 0 for x in gemm["results"] for k in ("bf16_mm_tflops", "triton_fp8_tflops", "torch_scaled_mm_tflops"))
    assert gemm["results"][0]["M"] == 32 and gemm["results"][0]["K"] == 32  # the tiny config's qkv forward
    runs = train["runs"]
    assert set(runs) == {"bf16", "fp8_triton", "fp8_torch"}
    assert runs["fp8_triton"]["gemm"] == runs["fp8_torch"]["gemm"] == "emulate"  # FP8 training on a CPU
    for v in runs.values():
        assert len(v["losses"]) == train["steps"] + 2 and all(math.isfinite(x) for x in v["losses"])
        assert abs(v["losses"][0] - math.log(512)) < 0.5  # synthetic tokens from 512: ~uniform at init
    assert runs["fp8_triton"]["losses"] != runs["bf16"]["losses"]  # FP8 really quantized
    assert 0 < runs["fp8_triton"]["max_loss_rel_diff_vs_bf16"] <= gpu_check.FP8_LOSS_RTOL
    assert ns["matrices"] == 2 * 7 and len(ns["results"]) == 4  # q/o 32x32, k/v 16x32, gate/up 80x32, down 32x80
    assert dist["backend"] == "gloo" and dist["world"] == 1 and dist["ddp_max_grad_diff"] == 0.0
    assert dist["amax_all_reduce"] == dist["amax_local"] and dist["amax_local"][0] > 0


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
    assert ns["status"] == "ok" and ns["matrices"] == 14
    assert "boom" in (tmp_path / "gpu_check.md").read_text()
