"""tools/bench.py end to end on a tiny config: what it counts and times, the peer comparison, the Muon and
FP8 GEMM reports."""
import dataclasses
import json
import math
import subprocess
import sys
import time

import pytest

import muon
import train
from conftest import write_config
from tools import bench

BENCH = [sys.executable, "-m", "tools.bench"]


def run_json(argv, timeout=300):
    t0 = time.perf_counter()
    out = subprocess.run(BENCH + argv + ["--json"], capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bench_counts_tokens_and_times_within_the_wall_clock(tmp_path, optimizer):
    cfg = write_config(tmp_path / "c.py", tmp_path)  # bench uses random tokens: the data dir is never read
    r, wall = run_json([cfg, "--steps", "3", "--warmup", "1", "--batch_size", "2", "--seq_len", "16",
                        "--optimizer", optimizer, "--device", "cpu", "--dtype", "float32"])
    assert r["optimizer"] == optimizer and r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["tokens"] == 2 * 16 * 3  # what the timed steps fed the model, counted as it went in
    # the timed steps happened inside this subprocess: seconds, not ms; one step is at most all of them
    assert 0 < r["timed_s"] < wall and 0 < r["step_ms"] * 1e-3 <= r["timed_s"]
    assert r["tokens_per_s"] >= 32 / r["timed_s"]  # a median step is no longer than the three together
    assert r["peak_mem_mb"] > 100  # the process's peak RSS (torch alone is more)
    # 6 per weight of every matmul (all but the 5 norm weights of width 32) + causal attention 6 L T d
    assert r["flops_per_token"] == 6 * (r["params"] - 5 * 32) + 6 * 2 * 16 * 32
    assert r["loss_at_init"] == pytest.approx(math.log(129280), abs=0.5)  # before any update: ~uniform


def test_bench_peer_same_shape_and_consistent_ratios(tmp_path):
    cfg = write_config(tmp_path / "c.py", tmp_path, vocab_size=512)
    out = subprocess.run(BENCH + [cfg, "--steps", "2", "--warmup", "1", "--batch_size", "2", "--seq_len", "16",
                                  "--device", "cpu", "--dtype", "float32", "--peer", "--repeats", "1", "--json"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    ours, peer = r["ours"], r["peer"]
    assert ours["model"] == "xmodel" and peer["model"] == "hf_llama"
    assert ours["params"] == peer["params"]  # the peer really is our shape (tied embedding, GQA, SwiGLU)
    # HF's loss at its small init is ln(vocab) to a few hundredths (its labels shift is right)
    assert peer["loss_at_init"] == pytest.approx(math.log(512), abs=0.05)
    assert r["speedup"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"])
    assert r["mem_ratio"] == pytest.approx(ours["peak_mem_mb"] / peer["peak_mem_mb"])
    assert ours["peak_mem_mb"] > 0 and peer["peak_mem_mb"] > 0 and ours["tokens"] == peer["tokens"] == 64
    # the cap: the output layer's 3 GEMMs over one step's 2 x 16 tokens, vocab 512, hidden 32, timed apart
    assert r["bound"]["bound_gflop"] == pytest.approx(3 * 2 * 32 * 512 * 32 / 1e9)
    assert r["bound"]["bound_ms"] > 0
    assert r["speedup_cap"] == pytest.approx(peer["step_ms"] / r["bound"]["bound_ms"])


def test_help_names_every_mode(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = capsys.readouterr().out
    for mode in ("scaling", "muon", "fp8", "data"):
        assert f"python -m tools.bench {mode} " in out, out


def test_bench_bad_config(tmp_path):
    p = subprocess.run(BENCH + [str(tmp_path / "none.py")], capture_output=True, text=True)
    assert p.returncode != 0 and "config file not found" in p.stderr


def test_layer_shapes_at_the_1p3b_config():
    mcfg = train.load_config(["configs/xmodel25.py"])["model"]
    assert bench.layer_shapes(mcfg) == [("qkv", 1536, 2560), ("attn_out", 1536, 1536),
                                        ("mlp_gate_up", 1536, 7680), ("mlp_down", 3840, 1536)]
    proxy = train.load_config(["configs/proxy20m.py"])["model"]
    shapes = bench.hidden_matrix_shapes(proxy)
    # configs/proxy20m.py: 172,288 per block = 2-D matrices + two 128-wide norm weights; [q; k; v] and
    # [gate; up] are one matrix each to Muon, or 3 and 2 under muon_fused=False
    assert len(shapes) == 8 * 4 and sum(r * c for r, c in shapes) == 8 * (172288 - 2 * 128)
    apart = bench.hidden_matrix_shapes(dataclasses.replace(proxy, muon_fused=False))
    assert len(apart) == 8 * 7 and sum(r * c for r, c in apart) == 8 * (172288 - 2 * 128)


def test_muon_cost_report(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.py", tmp_path)
    r = bench.main(["muon", cfg, "--steps", "1", "--device", "cpu", "--dtype", "float32"])
    # the tiny config: 2 layers of [q; k; v] 64x32, o 32x32, [gate; up] 160x32, down 32x80
    per_layer = [(64, 32), (32, 32), (160, 32), (32, 80)]
    assert r["ns_flops"] == 2 * sum(muon.newton_schulz_flops(a, b) for a, b in per_layer)
    assert r["dense_flops"] == 6 * r["params"] * 4 * 32  # the decay phase: batch 4 x 32 tokens
    assert r["muon_step_ms"] > 0 and r["adamw_step_ms"] > 0
    assert r["ns_per_matrix_ms"] > 0 and r["ns_batched_ms"] > 0 and r["ns_chains"] == 4  # 8 matrices, 4 shapes
    out = capsys.readouterr().out
    assert "Newton-Schulz" in out and "one batched chain per shape (4)" in out


def test_fp8_gemm_bench_needs_cuda(tmp_path):
    cfg = write_config(tmp_path / "c.py", tmp_path)
    p = subprocess.run(BENCH + ["fp8", cfg, "--device", "cpu"], capture_output=True, text=True)
    assert p.returncode == 1 and "CUDA" in p.stderr
