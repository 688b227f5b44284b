"""Data-parallel training under torch.distributed: 2 CPU processes (gloo) against 1, resume (also with another
world size), ZeRO-1, FP8, one rank preempted, failures.

One spawned pair of ranks runs every 2-rank scenario in a row (one process group, started once: spawning
is the expensive part) and saves, per rank, the losses, the final weights and what the optimizers hold;
the tests compare those files against each other and against a 1-rank run in this process. The tiny
curriculum has 6 steps: warmup 1, stable 2 (AdamW), decay 2, long 1 (Muon from step 3 on), micro-batch 1,
so a 2-rank step accumulates 2 micro-batches (DDP's no_sync path) and a 1-rank step 4.

Nothing here is a tolerance measured on one CPU (CPUs differ: AMX, AVX512-BF16, AVX2 with emulated bf16).
2 ranks against 1 is compared where the arithmetic is known: the first step's gradient (same weights,
same windows, only the summation order differs) under a floating-point summation bound; across ranks,
across resumes and against ZeRO-1 the comparison is bit for bit. No rendezvous port is chosen by the tests
(a port found free can be taken before it is bound): spawned ranks meet in a file, torchrun picks and holds
its own port (--standalone), and hand-launched ranks use a TCP store this process holds, as torchrun's agent.
"""
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import muon
import runtime
import train
from conftest import HostReads, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
SHORT = ["--phase.warmup.steps=1", "--phase.stable.steps=2", "--phase.decay.steps=2", "--phase.long.steps=1",
         "--micro_batch=1", "--eval_windows=2", "--sample_tokens=2"]
N_STEPS = 6
# The world-size change: every phase's global batch is 2 sequences, so a 2-rank step is 1 micro-batch per rank
# and a 1-rank step 2 micro-batches. Then 1 rank and 2 ranks compute bit for bit the same numbers: the 1-rank
# gradient is g0/2 + g1/2 (each micro-batch's backward of loss/2, the halving exact), the 2-rank one DDP's
# g0/2 + g1/2 (each rank's bucket divided by the world size, then summed by the all-reduce): one rounding of
# the same two addends (IEEE addition commutes), and the logged loss likewise. So a run may change its world
# size at a checkpoint and must still equal the uninterrupted run exactly.
WS = ["--phase.warmup.steps=1", "--phase.stable.steps=2", "--phase.decay.steps=2", "--phase.long.steps=1",
      *(f"--phase.{p}.batch=2" for p in ("warmup", "stable", "decay", "long")), "--micro_batch=1",
      "--zero1=True", "--eval_windows=2", "--sample_tokens=0"]
WS_STOP = 4  # inside "decay": Muon has momentum (sharded across 2 ranks) and AdamW its moments
U32 = 2.0 ** -24  # unit roundoff of float32 (round to nearest)
U64 = 2.0 ** -53


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n roundings in a row."""
    return n * u / (1 - n * u)


def _capture():
    """Patch mup.build_model, train.Optimizers and the gradient clipping so that a run's model, optimizers
    and first-step gradient (before clipping, with the norm clipping returned) can be inspected after it.
    The gradient is taken before clipping: the clip factor comes from each run's own norm, whose last bits
    differ between 2 ranks and 1, and would add an error the summation bound does not cover."""
    import mup
    seen = {"model": [], "opts": [], "first_grad": {}}
    real_build, real_init, real_clip = mup.build_model, train.Optimizers.__init__, torch.nn.utils.clip_grad_norm_

    def clip(params, *a, **k):
        run = len(seen["opts"])  # the run training now: its first clipping is its first step
        first = run not in seen["first_grad"]
        if first:
            grad = {n: p.grad.detach().clone() for n, p in seen["model"][-1].named_parameters()}
        norm = real_clip(params, *a, **k)
        if first:
            seen["first_grad"][run] = (grad, norm.detach().clone())  # read after the run (no read of the loop's)
        return norm

    def build(*a, **k):
        seen["model"].append(real_build(*a, **k))
        return seen["model"][-1]

    def init(self, *a, **k):
        real_init(self, *a, **k)
        seen["opts"].append(self)

    def undo():
        mup.build_model, train.Optimizers.__init__, torch.nn.utils.clip_grad_norm_ = real_build, real_init, real_clip
    mup.build_model, train.Optimizers.__init__, torch.nn.utils.clip_grad_norm_ = build, init, clip
    seen["undo"] = undo
    return seen


def _result(summary, seen, grad=False) -> dict:
    opts = seen["opts"][-1]
    first_grad, first_norm = seen["first_grad"].pop(len(seen["opts"]))  # popped: 16 MB a run
    return {"losses": summary["losses"], "evals": summary["evals"], "step": summary["step"],
            "preempted": summary["preempted"],
            "model": {k: v.detach().clone() for k, v in seen["model"][-1].state_dict().items()},
            "rest_type": type(opts.rest).__name__, "hidden_type": type(opts.hidden).__name__,
            "muon_sharded": getattr(opts.hidden, "shard_state", None),
            "hidden_states": len(opts.hidden.state),
            "grad": first_grad if grad else None, "grad_norm": first_norm.item()}


SIGTERM_STEP = 2  # the preemption scenarios: rank 1 gets SIGTERM during this 0-based step (the 3rd)


def _signalled(rank, argv) -> tuple[dict, dict]:
    """train.train(argv) with rank 1 sending itself SIGTERM during step SIGTERM_STEP; (the summary, the host's
    reads of each step: conftest.HostReads)."""
    real = train.train_step

    def train_step(r, params, phase, step, *a, **k):
        if rank == 1 and step == SIGTERM_STEP:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(r, params, phase, step, *a, **k)
    train.train_step = train_step
    try:
        with HostReads() as reads:
            return train.train(argv), reads.steps
    finally:
        train.train_step = real


def _worker(rank, init_file, jobs, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # the ranks meet in a file (no port to race for); runtime.setup_distributed keeps a group it finds
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    seen = _capture()
    import fp8
    results = {}
    try:
        for name, argv in jobs:
            real_max = fp8._all_reduce_max
            reductions = []
            if name == "fp8_local_amax":  # the control: without the MAX all-reduce the scales must drift apart
                fp8._all_reduce_max = lambda t: t
            else:
                fp8._all_reduce_max = lambda t: reductions.append(t.shape) or real_max(t)
            try:
                signalled = name in ("preempt", "preempt_ckpt")
                summary, reads = _signalled(rank, argv) if signalled else (train.train(argv), None)
                results[name] = _result(summary, seen, grad=name == "ddp")
                results[name].update(amax_reductions=reductions, reads=reads)
            finally:
                fp8._all_reduce_max = real_max
    except BaseException:
        dist.destroy_process_group()
        raise
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    runtime.exit_distributed()  # (not a return: gloo's threads can abort Python's finalization)


def micro_gradients(cfg_path):
    """Step 1's per-micro-batch losses and gradients, computed here the way the trainer starts: the model
    built after torch.manual_seed(seed), the global batch's windows as a 1-rank run reads them, fp32."""
    import mup
    conf = train.load_config([cfg_path, *SHORT])
    cfg, mcfg = conf["train"], conf["model"]
    phase = cfg.phases[0]
    torch.manual_seed(cfg.seed)
    _, mixture = train.build_data(cfg, mcfg, 0)
    model = mup.build_model(mcfg)
    mixture = mixture.with_weights(cfg.mixtures[phase["mix"]])
    mb, n = train.batch_split(phase, cfg.micro_batch, 1)
    losses, grads = [], []
    for micro in range(n):
        x, y = mixture.batch(0, micro, 0, 1, mb, phase["seq_len"])
        loss = model(x, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    return losses, grads


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """{"single": 1-rank result, "ddp"/...: [rank 0 result, rank 1 result], "micro": micro_gradients} plus
    the run directories."""
    d = tmp_path_factory.mktemp("dist")
    cfg = write_config(d / "c.py", tiny_data)
    out = {name: str(d / name) for name in ("single", "ddp", "res", "zero", "zres", "fp8", "fp8l", "w1", "w21", "w12",
                                            "pre", "prec")}
    jobs = [
        ("ddp", [cfg, *SHORT, f"--out_dir={out['ddp']}"]),
        ("stop", [cfg, *SHORT, f"--out_dir={out['res']}", "--max_steps=2"]),      # resume crosses the switch
        ("resume", [cfg, *SHORT, f"--out_dir={out['res']}", "--resume"]),
        ("zero", [cfg, *SHORT, f"--out_dir={out['zero']}", "--zero1=True"]),
        ("zstop", [cfg, *SHORT, f"--out_dir={out['zres']}", "--zero1=True", "--max_steps=4"]),  # inside Muon
        ("zresume", [cfg, *SHORT, f"--out_dir={out['zres']}", "--zero1=True", "--resume"]),
        ("fp8", [cfg, *SHORT, f"--out_dir={out['fp8']}", "--fp8=True"]),  # to the end: rank 0 samples alone
        ("fp8_local_amax", [cfg, *SHORT, f"--out_dir={out['fp8l']}", "--fp8=True", "--max_steps=2"]),
        ("w2stop", [cfg, *WS, f"--out_dir={out['w21']}", f"--max_steps={WS_STOP}"]),  # then 1 rank resumes it
        ("w2resume", [cfg, *WS, f"--out_dir={out['w12']}", "--resume"]),             # 1 rank's checkpoint
        ("preempt", [cfg, *SHORT, f"--out_dir={out['pre']}", "--log_interval=100"]),  # rank 1: SIGTERM in step 3
        ("preempt_resume", [cfg, *SHORT, f"--out_dir={out['pre']}", "--log_interval=100", "--resume"]),
        ("preempt_ckpt", [cfg, *SHORT, f"--out_dir={out['prec']}", "--log_interval=100", "--ckpt_interval=3"]),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same kernels, so the same per-micro-batch gradients
    seen = _capture()
    try:
        res = {"w1stop": _result(train.train([cfg, *WS, f"--out_dir={out['w12']}", f"--max_steps={WS_STOP}"]), seen)}
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(str(d / "rendezvous"), jobs, str(d)), nprocs=WORLD, join=True)
        t_dist = time.perf_counter() - t0
        per_rank = [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]
        res.update({name: [per_rank[r][name] for r in range(WORLD)] for name, _ in jobs})
        res["single"] = _result(train.train([cfg, *SHORT, f"--out_dir={out['single']}"]), seen, grad=True)
        res["micro"] = micro_gradients(cfg)
        res["w1"] = _result(train.train([cfg, *WS, f"--out_dir={out['w1']}"]), seen)
        res["w1resume"] = _result(train.train([cfg, *WS, f"--out_dir={out['w21']}", "--resume"]), seen)
    finally:
        seen["undo"]()
        torch.set_num_threads(threads)
    print(f"2-rank scenarios: {t_dist:.1f} s")
    return res, out


def assert_models_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- 2 ranks = 1 rank

def test_two_ranks_equal_one_rank_with_the_same_global_batch(runs):
    res, out = runs
    ddp, single = res["ddp"], res["single"]
    losses, grads = res["micro"]
    n = len(grads)  # micro-batches in step 1's global batch: 4 on 1 rank, 2 on each of 2 ranks
    assert len(single["losses"]) == len(ddp[0]["losses"]) == N_STEPS and n == 2 * WORLD

    # Step 1's losses, exactly: sequence i of the global batch is micro-batch i of the 1-rank run and
    # micro-batch i // 2 of rank i % 2 (data.Mixture.batch); each run adds loss / accumulation count in order.
    def accumulate(ls, count):
        acc = torch.zeros(())
        for loss in ls:
            acc += loss / count
        return acc.item()
    assert single["losses"][0] == accumulate(losses, n)
    for r in range(WORLD):
        assert ddp[r]["losses"][0] == accumulate(losses[r::WORLD], n // WORLD), r
    assert ddp[0]["losses"] != ddp[1]["losses"]  # each rank really trains on its own windows
    rows = {k: [r for r in map(json.loads, open(os.path.join(out[k], "metrics.jsonl"))) if "loss" in r]
            for k in ("ddp", "single")}
    # rank 0 logs the all-reduced mean: one float32 addition of the two ranks' losses, then / 2 (exact)
    mean = [((torch.tensor(a) + torch.tensor(b)) / WORLD).item() for a, b in zip(ddp[0]["losses"], ddp[1]["losses"])]
    assert [r["loss"] for r in rows["ddp"]] == mean

    # Step 1's gradient (before clipping). Both runs add the same n gradients g_i / n (same weights, same
    # windows: bitwise the g_i computed here; the division by n, a power of two, is exact) in another
    # order. 1 rank: g_0 + g_1 + g_2 + g_3 in a row, so each term passes through at most d = 3 roundings.
    # 2 ranks: each rank adds its 2 (1 rounding), DDP divides by the world size (2: exact) and the
    # all-reduce adds the 2 ranks' sums (1 rounding): d = 2. A float sum whose terms each pass through at
    # most d roundings is within gamma_d * sum_i |x_i| of the exact sum (Higham, Accuracy and Stability of
    # Numerical Algorithms, 2nd ed., eq. 4.4 with Lemma 3.1), elementwise; the exact sum is taken here in
    # float64, whose own 3 roundings add gamma_3(2^-53). A wrong split (ranks on the same windows) or a
    # missing average (DDP summing) is off by a whole g_i or by 2x: orders of magnitude past the bound.
    exact = {k: sum(g[k].double() for g in grads) / n for k in grads[0]}
    size = {k: sum(g[k].double().abs() for g in grads) / n for k in grads[0]}
    for name, run, d in (("1 rank", single, n - 1), ("2 ranks", ddp[0], 2)):
        worst, bound_sq, exact_sq = 0.0, 0.0, 0.0
        for k in exact:
            bound = (gamma(d) + gamma(n - 1, U64)) * size[k]
            err = (run["grad"][k].double() - exact[k]).abs()
            assert bool((err <= bound).all()), (name, k, (err - bound).max().item())
            worst = max(worst, (err / bound.clamp_min(1e-300)).max().item())
            bound_sq += bound.square().sum().item()
            exact_sq += exact[k].square().sum().item()
        print(f"step 1 gradient, {name}: at most {worst:.2f} of the summation bound")
        # The norm clipping returned (and the log shows): the averaged gradient's, not one rank's or the sum's.
        # ||g_run|| is within ||bound|| of ||exact||, and a float32 2-norm of N numbers (a sum of squares,
        # square roots; clip_grad_norm_ takes the norm of the per-tensor norms) is within gamma_{N+4} of it:
        # loose (N is millions), but a sum is off by 2x and one rank's gradient alone by a whole g_i.
        N = sum(v.numel() for v in exact.values())
        norm, slack = math.sqrt(exact_sq), math.sqrt(bound_sq)
        assert abs(run["grad_norm"] - norm) <= gamma(N + 4) * (norm + slack) + slack, (name, run["grad_norm"], norm)
    assert [r["grad_norm"] for r in rows["single"]][0] == single["grad_norm"]
    assert [r["grad_norm"] for r in rows["ddp"]][0] == ddp[0]["grad_norm"] == ddp[1]["grad_norm"]
    for k in exact:  # the all-reduce leaves every rank the same gradient
        assert torch.equal(ddp[0]["grad"][k], ddp[1]["grad"][k]), k

    # After step 1 nothing bounds how far the last-bit differences carry: Adam divides by sqrt(v) (an entry
    # whose gradient is rounding noise moves by a noise-dependent fraction of the LR) and Muon's bf16
    # Newton-Schulz amplifies small singular values up to 485x, so later losses, the final weights and
    # the final held-out loss of 2 ranks and 1 differ by what the CPU's rounding makes of them. A loose
    # bound there would catch nothing step 1 does not (Adam and Muon are blind to a missing average), so
    # across the ranks of one run, the comparisons are bit for bit instead.
    assert ddp[0]["evals"] == ddp[1]["evals"]      # held-out loss is all-reduced
    assert_models_equal(ddp[0]["model"], ddp[1]["model"])
    assert ddp[0]["hidden_type"] == "Muon" and ddp[0]["muon_sharded"] is False


def test_two_rank_resume_across_the_switch_is_exact(runs):
    res, out = runs
    for r in range(WORLD):
        stop, resume, full = res["stop"][r], res["resume"][r], res["ddp"][r]
        assert len(stop["losses"]) == 2 and stop["hidden_type"] == "AdamW" and resume["hidden_type"] == "Muon"
        assert stop["losses"] + resume["losses"] == full["losses"], r  # bit for bit
        assert_models_equal(resume["model"], full["model"])
    assert [os.path.basename(p) for p in runtime.list_checkpoints(out["res"])] == ["ckpt_00000002", "ckpt_00000006"]


# ---------------------------------------------------------------- one rank signalled: both stop after the same step

def test_one_rank_signalled_both_stop_after_the_same_step_and_resume_exactly(runs):
    """Rank 1 alone gets SIGTERM during step 3, with no log row until the end. The ranks' stop vote is read a
    step late (runtime.Preemption.vote: no step waits for the device to agree), so both stop after step 4
    with its checkpoint; resumed, the run ends with the uninterrupted run's weights, bit for bit. With a checkpoint due at step 3 the vote is read at once (the host waits for the device there
    anyway): both stop after step 3. Before the stop, the only values either rank's host reads are the votes:
    a host tensor all-reduced over gloo (conftest.HostReads), never the device's."""
    res, out = runs
    for r in range(WORLD):
        pre, resumed, at_ckpt = res["preempt"][r], res["preempt_resume"][r], res["preempt_ckpt"][r]
        assert (pre["step"], at_ckpt["step"], resumed["step"]) == (4, 3, N_STEPS), r
        for run in (pre, at_ckpt):
            assert run["preempted"].startswith("preempted (SIGTERM, " if r == 1 else
                                               "preempted (a signal to another rank, "), (r, run["preempted"])
            ago = run["preempted"].split(", ")[1]  # rank 0 states the time since rank 1's signal, as rank 1 does
            assert ago == res["preempt" if run is pre else "preempt_ckpt"][1]["preempted"].split(", ")[1], (r, ago)
        assert not resumed["preempted"]
        assert_models_equal(resumed["model"], res["ddp"][r]["model"])
        before = [pre["reads"][step] for step in range(3)]  # steps 1-3 and what follows each; step 4 stops
        assert all(set(reads) <= {"gloo"} for reads in before) and any(before), (r, pre["reads"])
        assert sorted(pre["reads"]) == [0, 1, 2, 3] and set(pre["reads"][3]) - {"gloo"}  # the stop's row is read
    names = {k: [os.path.basename(p) for p in runtime.list_checkpoints(out[k])] for k in ("pre", "prec")}
    assert names == {"pre": ["ckpt_00000004", "ckpt_00000006"], "prec": ["ckpt_00000003"]}


# ---------------------------------------------------------------- resume with another world size

def test_resume_with_another_world_size_equals_the_uninterrupted_run(runs):
    """2 ranks (ZeRO-1: AdamW and Muon state sharded) checkpoint at step 4, inside the Muon phase, and 1 rank
    continues; and the other way round. Both equal the uninterrupted 1-rank run bit for bit (WS above says why
    1 and 2 ranks compute the same numbers): the logged losses and gradient norms of every step, the final
    weights, and the optimizer state each run ends with (so the consolidated checkpoint was re-sharded, or
    un-sharded, without losing a matrix's momentum or an AdamW moment)."""
    res, out = runs

    def rows(run):
        return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"], r["optimizer"])
                for r in map(json.loads, open(os.path.join(out[run], "metrics.jsonl"))) if "loss" in r]
    full = rows("w1")
    assert [r[0] for r in full] == list(range(1, N_STEPS + 1)) and full[-1][-1] == "muon"
    assert rows("w21") == full  # steps 1-4 on 2 ranks, 5-6 on 1 rank
    assert rows("w12") == full  # steps 1-4 on 1 rank, 5-6 on 2 ranks
    assert res["w1stop"]["losses"] + res["w1resume"]["losses"] == res["w1"]["losses"]  # 1-rank parts: their own
    final = {k: runtime.load_checkpoint(out[k]) for k in ("w1", "w21", "w12")}
    for k in ("w21", "w12"):
        assert final[k]["step"] == N_STEPS and final[k]["tokens"] == final["w1"]["tokens"], k
        assert_models_equal(final[k]["model"], final["w1"]["model"])
        for opt in ("rest", "hidden"):
            a, b = final[k]["optim"][opt], final["w1"]["optim"][opt]
            assert sorted(a["state"]) == sorted(b["state"]), (k, opt)
            for i in a["state"]:
                assert a["state"][i].keys() == b["state"][i].keys(), (k, opt, i)
                for name in a["state"][i]:
                    assert torch.equal(a["state"][i][name], b["state"][i][name]), (k, opt, i, name)
    # after the change each run held the state its world size calls for: 2 ranks a share each, 1 rank all
    held = [res["w2resume"][r]["hidden_states"] for r in range(WORLD)]
    assert all(res["w2resume"][r]["muon_sharded"] for r in range(WORLD))
    assert sum(held) == res["w1resume"]["hidden_states"] == 2 * 4 and all(0 < h < 2 * 4 for h in held), held  # 4 per block
    assert res["w1resume"]["muon_sharded"] is False


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
    assert n_hidden == 2 * 4 and sum(held) == n_hidden and all(0 < h < n_hidden for h in held), held


def test_zero1_checkpoint_holds_each_ranks_shard_and_resume_is_exact(runs):
    """Each rank wrote its own optimizer shard, nothing gathered: the momentum of the matrices a rank
    orthogonalizes and the AdamW state of its ZeRO-1 partition lie in that rank's file; the weights (alike on
    both) are split between the two files. Read whole, the checkpoint is the unsharded optimizer state."""
    res, out = runs
    for r in range(WORLD):
        assert res["zstop"][r]["losses"] + res["zresume"][r]["losses"] == res["zero"][r]["losses"], r
        assert_models_equal(res["zresume"][r]["model"], res["zero"][r]["model"])
    path = os.path.join(out["zres"], "ckpt_00000004")
    index = runtime._dcp()[1](path).read_metadata().storage_data  # DCP's index: where each tensor lies
    where = {i.fqn: s.relative_path for i, s in index.items()}
    for r in range(WORLD):
        mine = [k for k, f in where.items() if f == f"__{r}_0.distcp"]
        assert sum(k.startswith("optim/hidden/") for k in mine) == res["zstop"][r]["hidden_states"], r
        assert any(k.startswith("model/") for k in mine) and any(k.startswith("optim/rest/") for k in mine), r
    ck = runtime.load_checkpoint(path)
    assert ck["optim"]["kind"] == "muon"
    hidden = ck["optim"]["hidden"]["state"]  # every matrix's momentum, gathered from both ranks on rank 0
    assert sorted(hidden) == list(range(2 * 4)) and all(s["momentum_buffer"].dtype == torch.float32 for s in hidden.values())
    rest = ck["optim"]["rest"]["state"]      # ZeroRedundancyOptimizer's consolidated AdamW state
    assert len(rest) == 6 and all("exp_avg_sq" in s for s in rest.values())
    # the consolidated file is an ordinary (unsharded) Muon state dict: a 1-process Muon loads all of it
    sd = ck["optim"]["hidden"]
    m = muon.Muon([{"params": [torch.nn.Parameter(torch.zeros(hidden[i]["momentum_buffer"].shape)) for i in g["params"]]}
                   for g in sd["param_groups"]])
    m.load_state_dict(sd)
    params = [q for g in m.param_groups for q in g["params"]]
    assert all(torch.equal(m.state[q]["momentum_buffer"], hidden[i]["momentum_buffer"]) for i, q in enumerate(params))


# ---------------------------------------------------------------- FP8: amax reduced with MAX across ranks

def test_fp8_scales_are_identical_across_ranks(runs):
    """The whole curriculum with FP8 on 2 ranks, to the end (where rank 0 alone draws a sample: it must not
    enter a collective), with one amax all-reduce per micro-batch for all 8 FP8 layers."""
    res, out = runs
    conf = train.load_config([os.path.join(os.path.dirname(out["fp8"]), "c.py"), *SHORT])
    micro_batches = sum(p["steps"] * train.batch_split(p, conf["train"].micro_batch, WORLD)[1]
                        for p in conf["train"].phases)
    for r in range(WORLD):
        assert len(res["fp8"][r]["losses"]) == N_STEPS
        assert res["fp8"][r]["amax_reductions"] == [(2 * 4, 3)] * micro_batches, r
    assert os.path.exists(os.path.join(out["fp8"], "sample.txt"))
    keys = [k for k in res["fp8"][0]["model"] if k.endswith((".scale", ".amax_history"))]
    assert len(keys) == 2 * 2 * 4  # [q;k;v], out, [gate;up], down in 2 blocks: a scale and a history each
    for k in keys:
        assert torch.equal(res["fp8"][0]["model"][k], res["fp8"][1]["model"][k]), k
    assert any((res["fp8"][0]["model"][k] != 1).any() for k in keys if k.endswith(".scale"))
    assert_models_equal(res["fp8"][0]["model"], res["fp8"][1]["model"])
    # the control run without the all-reduce: the same check fails, so it does test the reduction
    local = res["fp8_local_amax"]
    assert any(not torch.equal(local[0]["model"][k], local[1]["model"][k]) for k in keys)


# ---------------------------------------------------------------- every rank resumes from the same checkpoint

def _view_worker(rank, init_file, argv, cases, results):
    """One resume per case, rank 1 seeing out_dir through `case` (rank 0 sees it as it is); the error each
    rank stops with, per case, into results/rank<R>.json."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    real, errors = runtime.list_checkpoints, {}
    views = {"missing": lambda d: [], "older": lambda d: real(d)[:1], "same": real}
    for case, out_dir in cases:
        if rank == 1:
            runtime.list_checkpoints = views[case]
        try:
            train.train([*argv, f"--out_dir={out_dir}", "--resume"])
            errors[case] = None
        except ValueError as e:
            errors[case] = str(e)
        runtime.list_checkpoints = real
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(errors, f)
    runtime.exit_distributed()


def test_ranks_that_see_different_checkpoints_stop_naming_the_ranks(tmp_path, tiny_data):
    """A 1-rank run leaves checkpoints of steps 1 and 2; then 2 ranks resume it while rank 1 sees no checkpoint
    (a node with its own out_dir), or only the older one, or (a copy) with a flipped byte in the file its share
    of the verification holds. Every time both ranks stop before training, with the same error naming the
    ranks and the likely cause; nothing was written into out_dir."""
    cfg = write_config(tmp_path / "c.py", tiny_data)
    argv = [cfg, *WS, "--ckpt_interval=1"]
    out = tmp_path / "out"
    train.train([*argv, f"--out_dir={out}", "--max_steps=2"])
    corrupt = tmp_path / "corrupt"
    shutil.copytree(out, corrupt)
    files = sorted(json.load(open(corrupt / "ckpt_00000002" / "manifest.json"))["files"])
    victim = corrupt / "ckpt_00000002" / files[1]  # the 2nd file: rank 1's to verify
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(raw)
    before = sorted(os.listdir(out))
    cases = [("missing", str(out)), ("older", str(out)), ("same", str(corrupt))]
    mp.start_processes(_view_worker, args=(str(tmp_path / "rendezvous"), argv, cases, str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="fork")
    errors = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(WORLD)]
    assert errors[0] == errors[1]  # every rank stops, with the same words
    first, second = (str(out / f"ckpt_{s:08d}") for s in (1, 2))
    shared = f"out_dir {str(out)!r} is probably not shared: every rank must see the same one"
    assert errors[0]["missing"].startswith(f"rank(s) [1] found no checkpoint to resume from, while rank(s) [0] "
                                           f"found {second}: {shared}"), errors[0]["missing"]
    assert errors[0]["older"].startswith(f"the ranks disagree on the checkpoint to resume from: rank(s) [0]: {second} "
                                         f"(step 2, 128 tokens); rank(s) [1]: {first} (step 1, 64 tokens): {shared}")
    previous = corrupt / "ckpt_00000001"
    assert errors[0]["same"] == (f"rank 1: {corrupt / 'ckpt_00000002'}: corrupt checkpoint ({files[1]}: sha256 "
                                 f"differs from manifest.json); the previous checkpoint is {previous}: move the "
                                 f"corrupt one aside to resume from it")
    assert sorted(os.listdir(out)) == before


def _own_argv_worker(rank, init_file, argvs, results):
    """A fresh start of train.py with argvs[rank] (a node that sees its own out_dir or data): the error it stops
    with."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        train.train(argvs[rank])
        error = None
    except ValueError as e:
        error = str(e)
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(error, f)
    runtime.exit_distributed()


def test_a_fresh_start_with_an_out_dir_per_rank_stops_before_training(tmp_path, tiny_data):
    """Each rank given its own out_dir on a fresh start (no checkpoint to disagree on) would write each
    checkpoint's shares into different directories and publish in rank 0's one a checkpoint missing rank 1's
    file. Both ranks stop before training, naming rank 1 and both directories; no checkpoint is written."""
    cfg = write_config(tmp_path / "c.py", tiny_data)
    out = tmp_path / "out"
    argvs = [[cfg, *WS, "--ckpt_interval=1", f"--out_dir={out}{r}"] for r in range(WORLD)]
    mp.start_processes(_own_argv_worker, args=(str(tmp_path / "rendezvous"), argvs, str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="fork")
    errors = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(WORLD)]
    assert errors[0] == errors[1] == (f"rank(s) [1] do not see rank 0's out_dir {str(out) + '0'!r} (the .lock rank 0 "
                                      f"holds in it; they use {str(out) + '1'!r}): every rank must see the same one, "
                                      f"a directory on a file system all nodes mount")
    assert not runtime.list_checkpoints(f"{out}0") and not os.path.exists(f"{out}1/metrics.jsonl")


def test_a_rank_that_reads_other_data_stops_before_training(tmp_path, tiny_data):
    """Rank 1 reads its own copy of the dataset, prepared otherwise (another fingerprint: other text, another
    Python's standard library for the default corpus): both ranks stop before training, naming rank 1, the
    source and both directories, instead of training on data that differs per rank."""
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    manifest = json.load(open(other / "manifest.json"))
    ours, manifest["fingerprint"] = manifest["fingerprint"], "0" * 64
    json.dump(manifest, open(other / "manifest.json", "w"))
    out = tmp_path / "out"
    argvs = [[write_config(tmp_path / f"c{r}.py", d), *WS, f"--out_dir={out}"]
             for r, d in enumerate((tiny_data, other))]
    mp.start_processes(_own_argv_worker, args=(str(tmp_path / "rendezvous"), argvs, str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="fork")
    errors = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(WORLD)]
    assert errors[0] == errors[1] == (f"rank(s) [1] read other data than rank 0: source 'code' is {other} (fingerprint "
                                      f"000000000000) on rank 1, {tiny_data} (fingerprint {ours[:12]}) on rank 0: "
                                      f"every rank must read the same prepared data (the same `data`, `data_cache` / "
                                      f"$XMODEL_CACHE on a file system all nodes mount, the same Python for the "
                                      f"default corpus)")
    assert not runtime.list_checkpoints(out) and not os.path.exists(out / "metrics.jsonl")


# ---------------------------------------------------------------- real launches: torchrun, a dead rank, a hung rank

def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    return env


def _launch(cmd, env, hang_guard_s=300):
    """Run cmd in its own process group and wait; whatever is left of the group (torchrun's workers
    included) is killed at the end, also when the wait expires. hang_guard_s only stops a hung test: it is
    no bound on the speed of the machine."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=hang_guard_s)
    finally:
        _kill_group(p)
    return p.returncode, out, err


def _kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone: every process in it has exited
        pass
    p.communicate()


def test_torchrun_smoke_only_rank0_writes(tmp_path, tiny_data):
    cfg = write_config(tmp_path / "c.py", tiny_data)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), cfg, *SHORT, f"--out_dir={out}", "--max_steps=3"]
    rc, stdout, stderr = _launch(cmd, _env())
    assert rc == 0, stderr[-3000:]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # one writer: no row twice
    assert stdout.count("step 3/6") == 1 and "2 ranks" in stdout
    files = os.listdir(out)
    assert {"ckpt_00000003", "config.json", "metrics.jsonl"} <= set(files) and not any(".tmp" in f for f in files)
    assert [os.path.basename(c) for c in runtime.list_checkpoints(str(out))] == ["ckpt_00000003"]
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(json.load(open(out / "ckpt_00000003" / "manifest.json"))["files"])


def test_a_time_limit_under_torchrun_stops_both_ranks_and_names_the_torchrun_command(tmp_path, tiny_data):
    """torchrun (its console script) with a time limit no second step fits into: both ranks stop after step 1
    with a checkpoint and exit 0, and the hint repeats torchrun's own command line, flags and all, plus --resume."""
    cfg = write_config(tmp_path / "c.py", tiny_data)
    out = tmp_path / "out"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = ["--standalone", "--nproc_per_node=2", "--signals_to_handle=SIGTERM,SIGINT,SIGUSR1",
            os.path.join(ROOT, "train.py"), cfg, *SHORT, f"--out_dir={out}", "--time_limit=1"]
    rc, stdout, stderr = _launch([sys.executable, torchrun, *args], _env())
    assert rc == 0, stderr[-3000:]
    again = shlex.join(["torchrun", *args, "--resume"])
    hint = f"time limit (1 s): stopped after step 1 with a checkpoint; continue with: {again}"
    assert hint in stdout.splitlines(), stdout[-3000:]
    assert [os.path.basename(c) for c in runtime.list_checkpoints(str(out))] == ["ckpt_00000001"]


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


def test_dead_rank_fails_the_torchrun_job(tmp_path, tiny_data):
    """Rank 1 dies inside step 3: rank 0's collective fails at once (the peer's connection closes), it
    exits 1 with our error line naming the step both ranks reached, and the torchrun job fails."""
    cfg = write_config(tmp_path / "c.py", tiny_data)
    (tmp_path / "fail.py").write_text(FAILING_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "fail.py"), os.path.join(ROOT, "train.py"), cfg, *SHORT, f"--out_dir={tmp_path / 'out'}"]
    t0 = time.perf_counter()
    rc, _, err = _launch(cmd, _env(XM_FAIL="die"))
    elapsed = time.perf_counter() - t0
    assert rc != 0
    line = [l for l in err.splitlines() if l.startswith("error: rank 0: a collective failed")]
    assert len(line) == 1 and "last step started per rank: {0: 2, 1: 2}" in line[0], err[-3000:]
    print(f"dead rank: job exited {rc} after {elapsed:.1f} s")


def test_hung_rank_makes_rank0_exit_after_the_collective_timeout(tmp_path, tiny_data):
    """No agent to notice a hang: rank 0's collective times out (dist_timeout_s) and it exits naming itself,
    the timeout and the step every rank reached, while rank 1 still hangs."""
    cfg = write_config(tmp_path / "c.py", tiny_data)
    (tmp_path / "fail.py").write_text(FAILING_RANK)
    # the rendezvous store is held here, as torchrun's agent holds it: bound to a port it picked, no race
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout_s, procs = 5, []
    try:
        for r in range(WORLD):
            env = _env(XM_FAIL="hang", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), RANK=str(r),
                       WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r), TORCHELASTIC_USE_AGENT_STORE="True")
            procs.append(subprocess.Popen(
                [sys.executable, str(tmp_path / "fail.py"), os.path.join(ROOT, "train.py"), cfg, *SHORT,
                 f"--out_dir={tmp_path / 'out'}", f"--dist_timeout_s={timeout_s}"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
        t0 = time.perf_counter()
        _, err = procs[0].communicate(timeout=300)  # a hang guard, no bound on the machine's speed
        elapsed = time.perf_counter() - t0
        assert procs[1].poll() is None  # rank 1 is still hanging (600 s): rank 0 did not wait for it
    finally:
        for p in procs:
            _kill_group(p)
    assert procs[0].returncode == 1, err[-3000:]
    assert f"error: rank 0: a collective failed or timed out (dist_timeout_s={timeout_s})" in err, err[-3000:]
    assert "last step started per rank: {0: 2, 1: 2}" in err
    assert elapsed >= timeout_s  # a lower bound holds on any machine: it did wait for the timeout
    print(f"hung rank: rank 0 exited 1 after {elapsed:.1f} s (timeout {timeout_s} s)")


# ---------------------------------------------------------------- two nodes, one lost, both relaunched with --resume

SLOW_STEPS = textwrap.dedent("""
    import os, runpy, sys, time
    import data
    real = data.Mixture.batch
    def batch(self, step, micro, *a, **k):  # XM_STEP_S longer per step: time to kill a node mid-run
        if micro == 0:
            time.sleep(float(os.environ.get("XM_STEP_S", "0")))
        return real(self, step, micro, *a, **k)
    data.Mixture.batch = batch
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")
# 10 steps of 4 sequences: each of the 4 ranks takes one per step; the AdamW -> Muon switch at step 6
NODES = ["--phase.warmup.steps=2", "--phase.stable.steps=4", "--phase.decay.steps=3", "--phase.long.steps=1",
         *(f"--phase.{p}.batch=4" for p in ("warmup", "stable", "decay", "long")), "--phase.long.seq_len=32",
         "--micro_batch=1", "--ckpt_interval=2", "--eval_windows=4", "--sample_tokens=0"]


def _start_node(tmp_path, name, store_port, run_id, argv, **env):
    """One "node": torchrun for 2 local ranks of a 2-node job, meeting through the c10d rendezvous in the
    store this test holds (bound to a port the OS chose: no port to race for). Output goes to NAME.log."""
    log = open(tmp_path / f"{name}.log", "a")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{store_port}", f"--rdzv-id={run_id}", str(tmp_path / "slow.py"), *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_node(p):
    """A node lost: its torchrun agent and the ranks it started, SIGKILLed (the ranks are in sessions of
    their own, so the agent's death alone would leave them running)."""
    with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
        ranks = [int(pid) for pid in f.read().split()]
    for pid in [p.pid, *ranks]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_nodes_one_killed_both_relaunched_with_resume_end_as_the_uninterrupted_run(tmp_path, tiny_data):
    """2 nodes x 2 gloo ranks on localhost (two torchrun agents, c10d rendezvous), a checkpoint every 2 steps.
    Once the checkpoint of step 4 is complete, one node is killed; the other node's ranks fail (a peer's
    connection closed) and its torchrun exits. Both are relaunched with --resume: the run continues from the
    latest complete checkpoint, across the AdamW -> Muon switch, and ends with the weights, the optimizer
    state and the logged losses of an uninterrupted 4-rank run, bit for bit."""
    cfg = write_config(tmp_path / "c.py", tiny_data)
    (tmp_path / "slow.py").write_text(SLOW_STEPS)
    argv = [os.path.join(ROOT, "train.py"), cfg, *NODES]
    full, out = tmp_path / "full", tmp_path / "out"
    rc, _, err = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                          *argv, f"--out_dir={full}"], _env())
    assert rc == 0, err[-3000:]
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    t0 = time.perf_counter()
    nodes = [_start_node(tmp_path, n, store.port, "first", [*argv, f"--out_dir={out}", "--resume"], XM_STEP_S="0.5")
             for n in ("a", "b")]
    try:
        deadline = time.monotonic() + 300  # a hang guard, no bound on the machine's speed
        while not any(c.endswith("ckpt_00000004") for c in runtime.list_checkpoints(str(out))):
            assert all(p.poll() is None for p in nodes) and time.monotonic() < deadline, \
                (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.05)
        _kill_node(nodes[1])
        assert nodes[0].wait(timeout=300) != 0  # the surviving node's job failed: a rank was lost
        nodes[1].wait(timeout=60)
        stopped = runtime.load_checkpoint(str(out))["step"]
        assert 4 <= stopped < 10, stopped  # killed mid-run
        nodes = [_start_node(tmp_path, n, store.port, "second", [*argv, f"--out_dir={out}", "--resume"])
                 for n in ("a", "b")]
        assert [p.wait(timeout=300) for p in nodes] == [0, 0], (tmp_path / "a.log").read_text()[-3000:]
    finally:
        for p in nodes:
            _kill_group(p)
    print(f"2 nodes x 2 ranks: killed after the checkpoint of step {stopped}, resumed and finished; "
          f"{time.perf_counter() - t0:.0f} s")
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert f"resumed from {out / f'ckpt_{stopped:08d}'} at step {stopped}" in logs
    a, b = runtime.load_checkpoint(str(full)), runtime.load_checkpoint(str(out))
    assert a["step"] == b["step"] == 10 and a["optim"]["kind"] == b["optim"]["kind"] == "muon"
    assert_models_equal(a["model"], b["model"])
    for slot in ("rest", "hidden"):
        sa, sb = a["optim"][slot]["state"], b["optim"][slot]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]), slot
    def rows(d):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(d / "metrics.jsonl"))
                if "loss" in r]
    assert rows(out) == rows(full) and [r[0] for r in rows(full)] == list(range(1, 11))
