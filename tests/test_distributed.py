"""Data-parallel training under torch.distributed: 2 CPU processes (gloo) against 1, resume, ZeRO-1, FP8, failures.

One spawned pair of ranks runs every 2-rank scenario in a row (one process group, started once: spawning
is the expensive part) and saves, per rank, the losses, the final weights and what the optimizers hold;
the tests compare those files against each other and against a 1-rank run in this process. The tiny
curriculum has 6 steps: warmup 1, stable 2 (AdamW), decay 2, long 1 (Muon from step 3 on), micro-batch 1,
so a 2-rank step accumulates 2 micro-batches (DDP's no_sync path) and a 1-rank step 4.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from conftest import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
SHORT = ["--phase.warmup.steps=1", "--phase.stable.steps=2", "--phase.decay.steps=2", "--phase.long.steps=1",
         "--micro_batch=1", "--eval_windows=2", "--sample_tokens=2", "--dist_timeout_s=60"]
N_STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _capture():
    """Patch mup.build_model and train.Optimizers so a run's model and optimizers can be inspected after it."""
    import mup
    seen = {"model": [], "opts": []}
    real_build, real_init = mup.build_model, train.Optimizers.__init__

    def build(*a, **k):
        seen["model"].append(real_build(*a, **k))
        return seen["model"][-1]

    def init(self, *a, **k):
        real_init(self, *a, **k)
        seen["opts"].append(self)
    mup.build_model, train.Optimizers.__init__ = build, init
    return seen


def _result(summary, seen) -> dict:
    opts = seen["opts"][-1]
    return {"losses": summary["losses"], "evals": summary["evals"],
            "model": {k: v.detach().clone() for k, v in seen["model"][-1].state_dict().items()},
            "rest_type": type(opts.rest).__name__, "hidden_type": type(opts.hidden).__name__,
            "muon_sharded": getattr(opts.hidden, "shard_state", None),
            "hidden_states": len(opts.hidden.state)}


def _worker(rank, port, jobs, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    seen = _capture()
    import fp8
    results = {}
    try:
        for name, argv in jobs:
            real_max = fp8._all_reduce_max
            if name == "fp8_local_amax":  # the control: without the MAX all-reduce the scales must drift apart
                fp8._all_reduce_max = lambda t: t
            try:
                results[name] = _result(train.train(argv), seen)
            finally:
                fp8._all_reduce_max = real_max
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """{"single": 1-rank result, "ddp"/...: [rank 0 result, rank 1 result]} plus the run directories."""
    d = tmp_path_factory.mktemp("dist")
    cfg = write_config(d / "c.py", tiny_data)
    out = {name: str(d / name) for name in ("single", "ddp", "res", "zero", "zres", "fp8", "fp8l")}
    jobs = [
        ("ddp", [cfg, *SHORT, f"--out_dir={out['ddp']}"]),
        ("stop", [cfg, *SHORT, f"--out_dir={out['res']}", "--max_steps=2"]),      # resume crosses the switch
        ("resume", [cfg, *SHORT, f"--out_dir={out['res']}", "--resume"]),
        ("zero", [cfg, *SHORT, f"--out_dir={out['zero']}", "--zero1=True"]),
        ("zstop", [cfg, *SHORT, f"--out_dir={out['zres']}", "--zero1=True", "--max_steps=4"]),  # inside Muon
        ("zresume", [cfg, *SHORT, f"--out_dir={out['zres']}", "--zero1=True", "--resume"]),
        ("fp8", [cfg, *SHORT, f"--out_dir={out['fp8']}", "--fp8=True", "--max_steps=2"]),
        ("fp8_local_amax", [cfg, *SHORT, f"--out_dir={out['fp8l']}", "--fp8=True", "--max_steps=2"]),
    ]
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(free_port(), jobs, str(d)), nprocs=WORLD, join=True)
    t_dist = time.perf_counter() - t0
    per_rank = [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]
    res = {name: [per_rank[r][name] for r in range(WORLD)] for name, _ in jobs}

    import mup
    real_build, real_init = mup.build_model, train.Optimizers.__init__
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen = _capture()
        res["single"] = _result(train.train([cfg, *SHORT, f"--out_dir={out['single']}"]), seen)
    finally:
        mup.build_model, train.Optimizers.__init__ = real_build, real_init
        torch.set_num_threads(threads)
    print(f"2-rank scenarios: {t_dist:.1f} s")
    return res, out


def global_losses(pair):
    """The loss of the global batch per step: each rank's loss is the mean over its equal half."""
    return [(a + b) / 2 for a, b in zip(pair[0]["losses"], pair[1]["losses"])]


def assert_models_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- 2 ranks = 1 rank

def test_two_ranks_equal_one_rank_with_the_same_global_batch(runs):
    res, out = runs
    ddp, single = res["ddp"], res["single"]
    assert len(single["losses"]) == len(ddp[0]["losses"]) == N_STEPS
    assert ddp[0]["losses"] != ddp[1]["losses"]  # each rank really trains on its own windows
    two = global_losses(ddp)
    rel = max(abs(a - b) / abs(b) for a, b in zip(two, single["losses"]))
    print(f"max relative loss difference, 2 ranks vs 1: {rel:.2e}")
    assert rel < 1e-5
    rows = {n: [r for r in map(json.loads, open(os.path.join(out[n], "metrics.jsonl"))) if "loss" in r]
            for n in ("ddp", "single")}
    assert [r["loss"] for r in rows["ddp"]] == pytest.approx(two, rel=1e-6)  # rank 0 logs the all-reduced mean
    # Adam and Muon are blind to the gradient's scale; the norm is not: DDP averages, it does not sum
    assert [r["grad_norm"] for r in rows["ddp"]] == pytest.approx([r["grad_norm"] for r in rows["single"]], rel=1e-5)
    assert ddp[0]["evals"] == ddp[1]["evals"]      # held-out loss is all-reduced
    assert ddp[0]["evals"][-1][1] == pytest.approx(single["evals"][-1][1], rel=1e-5)
    # the weights: bit-identical across ranks, and the 1-rank run's up to summation order
    assert_models_equal(ddp[0]["model"], ddp[1]["model"])
    diff = max((ddp[0]["model"][k] - v).abs().max().item() for k, v in single["model"].items())
    print(f"max abs weight difference, 2 ranks vs 1: {diff:.2e}")
    worst = [0.0]
    for k, v in single["model"].items():
        d = (ddp[0]["model"][k] - v).abs()
        if k == "tok_emb.weight":
            # Adam divides by sqrt(v): an embedding entry whose gradient is at rounding-noise level (a token
            # that never occurs only gets the tiny softmax pull) moves by a noise-dependent fraction of the
            # LR, so a handful of its 4M entries differ by up to ~1e-3; all the others agree to 1e-5
            assert (d > 1e-5).sum() <= 16 and d.max() < 2e-3, ((d > 1e-5).sum(), d.max())
        elif v.dim() == 2:
            # Muon's Newton-Schulz runs in bf16 and multiplies small singular values by up to 3.44^5: a
            # last-bit difference in the summed gradient can flip bf16 roundings, so single entries differ
            # by up to ~5e-4 while the matrix as a whole agrees to ~1e-3 (a wrong update would be ~1e-1)
            rel_fro = (d.norm() / v.norm()).item()
            worst[0] = max(worst[0], rel_fro)
            assert rel_fro < 3e-3 and d.max() < 2e-3, (k, rel_fro, d.max())
        else:
            torch.testing.assert_close(ddp[0]["model"][k], v, rtol=1e-5, atol=1e-6)
    print(f"hidden matrices, 2 ranks vs 1: max relative Frobenius difference {worst[0]:.2e}")
    assert ddp[0]["hidden_type"] == "Muon" and ddp[0]["muon_sharded"] is False


def test_two_rank_resume_across_the_switch_is_exact(runs):
    res, out = runs
    for r in range(WORLD):
        stop, resume, full = res["stop"][r], res["resume"][r], res["ddp"][r]
        assert len(stop["losses"]) == 2 and stop["hidden_type"] == "AdamW" and resume["hidden_type"] == "Muon"
        assert stop["losses"] + resume["losses"] == full["losses"], r  # bit for bit
        assert_models_equal(resume["model"], full["model"])
    assert [os.path.basename(p) for p in train.list_checkpoints(out["res"])] == ["ckpt_00000002.pt", "ckpt_00000006.pt"]


# ---------------------------------------------------------------- ZeRO-1: AdamW and Muon state sharded

def test_zero1_equals_unsharded_and_shards_the_state(runs):
    res, _ = runs
    for r in range(WORLD):
        zero, plain = res["zero"][r], res["ddp"][r]
        assert zero["rest_type"] == "ZeroRedundancyOptimizer" and zero["muon_sharded"] is True
        assert zero["losses"] == plain["losses"], r
        assert_models_equal(zero["model"], plain["model"])
    n_hidden = res["ddp"][0]["hidden_states"]  # unsharded: every rank holds every matrix's momentum
    held = [res["zero"][r]["hidden_states"] for r in range(WORLD)]
    assert n_hidden == 2 * 7 and sum(held) == n_hidden and all(0 < h < n_hidden for h in held), held


def test_zero1_checkpoint_is_consolidated_and_resume_is_exact(runs):
    res, out = runs
    for r in range(WORLD):
        assert res["zstop"][r]["losses"] + res["zresume"][r]["losses"] == res["zero"][r]["losses"], r
        assert_models_equal(res["zresume"][r]["model"], res["zero"][r]["model"])
    ck = torch.load(os.path.join(out["zres"], "ckpt_00000004.pt"), weights_only=True)
    assert ck["optim"]["kind"] == "muon"
    hidden = ck["optim"]["hidden"]["state"]  # every matrix's momentum, gathered from both ranks on rank 0
    assert sorted(hidden) == list(range(14)) and all(s["momentum_buffer"].dtype == torch.float32 for s in hidden.values())
    rest = ck["optim"]["rest"]["state"]      # ZeroRedundancyOptimizer's consolidated AdamW state
    assert len(rest) == 6 and all("exp_avg_sq" in s for s in rest.values())
    # the consolidated file is an ordinary (unsharded) Muon state dict: a 1-process Muon loads all of it
    sd = ck["optim"]["hidden"]
    m = train.Muon([{"params": [torch.nn.Parameter(torch.zeros(hidden[i]["momentum_buffer"].shape)) for i in g["params"]]}
                    for g in sd["param_groups"]])
    m.load_state_dict(sd)
    params = [q for g in m.param_groups for q in g["params"]]
    assert all(torch.equal(m.state[q]["momentum_buffer"], hidden[i]["momentum_buffer"]) for i, q in enumerate(params))


# ---------------------------------------------------------------- FP8: amax reduced with MAX across ranks

def test_fp8_scales_are_identical_across_ranks(runs):
    res, _ = runs
    keys = [k for k in res["fp8"][0]["model"] if k.endswith((".scale", ".amax_history"))]
    assert len(keys) == 2 * 2 * 7  # 7 FP8 linear layers per block, 2 blocks, scale + history each
    for k in keys:
        assert torch.equal(res["fp8"][0]["model"][k], res["fp8"][1]["model"][k]), k
    assert any((res["fp8"][0]["model"][k] != 1).any() for k in keys if k.endswith(".scale"))
    assert_models_equal(res["fp8"][0]["model"], res["fp8"][1]["model"])
    # the control run without the all-reduce: the same check fails, so it does test the reduction
    local = res["fp8_local_amax"]
    assert any(not torch.equal(local[0]["model"][k], local[1]["model"][k]) for k in keys)


# ---------------------------------------------------------------- real launches: torchrun, a dead rank, a hung rank

def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    return env


def test_torchrun_smoke_only_rank0_writes(tmp_path, tiny_data):
    cfg = write_config(tmp_path / "c.py", tiny_data)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(ROOT, "train.py"), cfg, *SHORT, f"--out_dir={out}", "--max_steps=3"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # one writer: no row twice
    assert p.stdout.count("step 3/6") == 1 and "2 ranks" in p.stdout
    files = os.listdir(out)
    assert {"ckpt_00000003.pt", "config.json", "metrics.jsonl"} <= set(files) and not any(".tmp" in f for f in files)
    assert [os.path.basename(c) for c in train.list_checkpoints(str(out))] == ["ckpt_00000003.pt"]


FAILING_RANK = textwrap.dedent("""
    import os, runpy, sys, time
    import data
    real = data.Mixture.batch
    def batch(self, step, micro, rank, world, *a, **k):
        if rank == 1 and step == 2:
            if os.environ["XM_FAIL"] == "die":
                os._exit(3)
            time.sleep(600)
        return real(self, step, micro, rank, world, *a, **k)
    data.Mixture.batch = batch
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def test_dead_rank_fails_the_torchrun_job_naming_it(tmp_path, tiny_data):
    """torchrun's agent sees the dead worker, stops the others and exits non-zero naming rank 1."""
    cfg = write_config(tmp_path / "c.py", tiny_data)
    (tmp_path / "fail.py").write_text(FAILING_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(tmp_path / "fail.py"), os.path.join(ROOT, "train.py"), cfg, *SHORT, f"--out_dir={tmp_path / 'out'}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(XM_FAIL="die"), capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert p.returncode != 0
    assert "rank      : 1" in p.stderr or "rank: 1" in p.stderr, p.stderr[-3000:]
    assert "exitcode  : 3" in p.stderr or "exitcode: 3" in p.stderr, p.stderr[-3000:]
    print(f"dead rank: job exited {p.returncode} after {elapsed:.1f} s")


def test_hung_rank_makes_rank0_exit_after_the_collective_timeout(tmp_path, tiny_data):
    """No agent to notice a hang: rank 0's collective times out (dist_timeout_s) and it exits naming itself,
    the timeout and the step every rank reached."""
    cfg = write_config(tmp_path / "c.py", tiny_data)
    (tmp_path / "fail.py").write_text(FAILING_RANK)
    port, timeout_s, procs = free_port(), 5, []
    try:
        for r in range(WORLD):
            env = _env(XM_FAIL="hang", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                       WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r))
            procs.append(subprocess.Popen(
                [sys.executable, str(tmp_path / "fail.py"), os.path.join(ROOT, "train.py"), cfg, *SHORT,
                 f"--out_dir={tmp_path / 'out'}", f"--dist_timeout_s={timeout_s}"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        t0 = time.perf_counter()
        _, err = procs[0].communicate(timeout=120)
        elapsed = time.perf_counter() - t0
        assert procs[1].poll() is None  # rank 1 is still hanging: rank 0 did not wait for it
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert f"error: rank 0: a collective failed or timed out (dist_timeout_s={timeout_s})" in err, err[-3000:]
    assert "last step started per rank: {0: 2, 1: 2}" in err and "Timed out" in err
    # start-up (2 x import torch, data) + 2 steps + the 5 s timeout, with room for a loaded machine
    assert elapsed < 60
    print(f"hung rank: rank 0 exited 1 after {elapsed:.1f} s (timeout {timeout_s} s)")
