"""The trainer: curriculum arithmetic, dry run, a tiny real run, exact resume, config errors, NaN stop."""
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import model as model_mod
import muon
import mup
import runtime
import train
from conftest import HostReads, write_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: a tiny model trains faster on one thread


def load(name, *extra):
    return train.load_config([f"configs/{name}.py", *extra])


# ---------------------------------------------------------------- curriculum arithmetic

def test_xmodel25_schedule_at_every_boundary():
    cfg = load("xmodel25")["train"]
    ph = {p["name"]: p for p in cfg.phases}
    assert [p["name"] for p in cfg.phases] == ["warmup", "stable1", "stable2", "decay", "rewarm8k", "long8k", "long16k"]
    assert train.total_steps(cfg.phases) == 560_000
    assert train.phase_at(cfg.phases, 1999) == (0, 1999) and train.phase_at(cfg.phases, 2000) == (1, 0)
    assert train.phase_at(cfg.phases, 270_000) == (2, 0) and train.phase_at(cfg.phases, 530_000) == (3, 0)
    assert train.phase_at(cfg.phases, 550_000) == (4, 0)
    with pytest.raises(IndexError):
        train.phase_at(cfg.phases, 560_000)
    f = train.lr_factor
    assert f(ph["warmup"], 0) == pytest.approx(1 / 2000) and f(ph["warmup"], 1999) == 1.0
    assert f(ph["stable1"], 0) == f(ph["stable1"], 267_999) == f(ph["stable2"], 259_999) == 1.0
    # the recipe's decay: min + (2 * 0.5**r - 1) * (peak - min), r = (i+1)/steps
    r = 1 / 20000
    assert f(ph["decay"], 0) == pytest.approx(1 / 16 + (2 * 0.5 ** r - 1) * (1 - 1 / 16))
    assert f(ph["decay"], 9999) == pytest.approx(1 / 16 + (2 * 0.5 ** 0.5 - 1) * (15 / 16))
    assert f(ph["decay"], 19_999) == pytest.approx(1 / 16)
    assert f(ph["rewarm8k"], 499) == pytest.approx(1 / 16) and f(ph["long16k"], 6999) == pytest.approx(6e-3)
    assert f(ph["long8k"], 2499) == pytest.approx(f(ph["long16k"], 0), rel=1e-3)  # linear across the two
    tokens = sum(p["steps"] * p["batch"] * p["seq_len"] for p in cfg.phases)
    assert tokens == pytest.approx(1.518e12, rel=1e-3)
    assert [p["optimizer"] for p in cfg.phases] == ["adamw"] * 3 + ["muon"] * 4
    assert [p["mix"] for p in cfg.phases] == ["stable"] * 3 + ["decay"] * 4
    assert (ph["long16k"]["batch"], ph["long16k"]["seq_len"], ph["long8k"]["seq_len"]) == (240, 16384, 8192)


def test_proxy_schedule_has_every_phase_and_is_continuous():
    cfg = load("proxy20m")["train"]
    names = [p["name"] for p in cfg.phases]
    assert names[:4] == ["warmup", "stable1", "stable2", "decay"] and len(names) >= 5
    assert cfg.phases[0]["lr"][0] == "linear" and cfg.phases[3]["lr"][0] == "exp"
    assert cfg.phases[3]["optimizer"] == "muon" and cfg.phases[3]["mix"] == "decay"
    assert cfg.phases[2]["batch"] == 2 * cfg.phases[1]["batch"]
    assert max(p["seq_len"] for p in cfg.phases[4:]) > cfg.phases[3]["seq_len"]  # a sequence-length stretch
    for a, b in zip(cfg.phases[1:], cfg.phases[2:]):  # no jump in LR at a boundary
        assert train.lr_factor(b, 0) == pytest.approx(train.lr_factor(a, a["steps"] - 1), rel=0.1)
    assert train.lr_factor(cfg.phases[3], cfg.phases[3]["steps"] - 1) == pytest.approx(1 / 16)


def test_batch_split():
    p = dict(name="x", batch=480, seq_len=8)
    assert train.batch_split(p, 4, 8) == (4, 15)
    assert train.batch_split(p, 4, 1) == (4, 120)
    assert train.batch_split(dict(p, batch=4), 8, 2) == (2, 1)  # micro-batch capped by the per-rank share
    assert train.batch_split(dict(p, micro_batch=2), 4, 8) == (2, 30)
    assert train.batch_split(p, 7, 1) == (6, 80)  # the largest micro-batch <= 7 that divides 480
    assert train.batch_split(p, 4, 64 // 2) == (3, 5)
    with pytest.raises(ValueError, match="not divisible by the world size 64"):
        train.batch_split(p, 4, 64)


def test_dry_run_xmodel25(capsys):
    conf = load("xmodel25", "--dry_run")
    plan = train.dry_run(conf["train"], conf["model"], 1)
    out = capsys.readouterr().out
    conf = load("xmodel25")
    c, m = conf["train"], conf["model"]
    # by hand from the config: the blocks' matmul weights (q, k, v, o with grouped K/V; gate, up, down),
    # the tied embedding (the output projection), the RMSNorm weights (two per block, one final)
    h, L, hd, V = m.hidden, m.n_layer, m.hidden // m.n_head, m.vocab_size
    per_block = 2 * h * h + 2 * h * m.n_kv_head * hd + 3 * h * m.ffn_hidden
    n_hidden, n = L * per_block, V * h + L * (per_block + 2 * h) + h
    assert plan["params"] == n == 1_350_059_520
    # training FLOPs per token: 6 per matmul weight (blocks + output layer) + causal attention 6 L T n_head hd
    fpt = lambda T: 6 * (n_hidden + V * h) + 6 * L * T * m.n_head * hd  # noqa: E731
    assert plan["tokens"] == sum(p["steps"] * p["batch"] * p["seq_len"] for p in c.phases) and plan["steps"] == 560_000
    flops = sum(p["steps"] * p["batch"] * p["seq_len"] * fpt(p["seq_len"]) for p in c.phases)
    assert plan["flops"] == pytest.approx(flops, rel=1e-12)
    # each phase at its own (measured) MFU; a phase without one at the config's
    assert {p["name"]: p["mfu"] for p in c.phases} == dict(warmup=0.46, stable1=0.46, stable2=0.46, decay=0.38,
                                                           rewarm8k=0.25, long8k=0.25, long16k=0.25)
    hours = sum(p["steps"] * p["batch"] * p["seq_len"] * fpt(p["seq_len"]) / (989e12 * p["mfu"]) / 3600 for p in c.phases)
    assert plan["gpu_hours"] == pytest.approx(hours, rel=1e-12)
    assert (c.gpus, c.gpu_peak_tflops, c.mfu) == (16, 989.0, 0.4)
    without = dataclasses.replace(c, phases=[{k: v for k, v in p.items() if k != "mfu"} for p in c.phases])
    assert train.dry_run(without, m, 1)["gpu_hours"] == pytest.approx(flops / (989e12 * 0.4) / 3600, rel=1e-12)
    # memory per GPU (Xmodel.memory_estimate_gb's docstring): 8 B/param weights + grads; AdamW 8 B/param, Muon 4 B
    # per hidden weight, / world under ZeRO-1; FP8's weight cache 2 B per hidden weight; activations 34 x tokens x
    # hidden per layer (checkpointing: 4 B x tokens x hidden per layer + one block's); the loss: a chunk of fp32
    # logits twice + fp32 grad of x
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    with torch.device("meta"):
        meta = model_mod.Xmodel(m)
    for p in c.phases:
        share = p["batch"] // c.gpus
        mb = max(d for d in range(1, p.get("micro_batch", c.micro_batch) + 1) if share % d == 0)
        tokens = mb * p["seq_len"]
        opt = 8 * (n - n_hidden) + (4 if p["optimizer"] == "muon" else 8) * n_hidden
        loss = 2 * 4 * m.loss_chunk * V + 2 * tokens * h * 4
        cache = 2 * n_hidden if m.fp8 else 0  # FP8: every hidden weight's FP8 copy and transpose
        gb = (8 * n + opt + cache + 34 * tokens * h * L + loss) / 1e9
        lean = (8 * n + opt / c.gpus + cache + 4 * tokens * h * L + 34 * tokens * h + loss) / 1e9
        assert rows[p["name"]][-2:] == [f"{gb:.1f}", f"{lean:.1f}"], p["name"]
        assert meta.memory_estimate_gb(mb, p["seq_len"], p["optimizer"] == "muon", c.gpus) == pytest.approx(gb, rel=1e-12)
    for name in ("warmup", "stable1", "stable2", "decay", "long16k", "GPU-hours", "1.52T", "hidden 0.001667"):
        assert name in out


# ---------------------------------------------------------------- configuration errors

@pytest.mark.parametrize("args,match", [
    (["--no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--n_layer=two"], "config key 'n_layer'"),
    (["--lr=fast"], "config key 'lr'"),
    (["--compile=3"], "config key 'compile'"),
    (["--device=tpu"], "config key 'device'"),
    (["--phase.decay.optimizer=sgd"], "optimizer must be one of"),
    (["--phase.nope.steps=3"], "no phase named 'nope'"),
    (["--phase.decay.lr=('cosine', 1, 0)"], "lr must be"),
    (["--phase.decay.mix=unknown"], "mix 'unknown'"),
    (["--phase.decay.batch=0"], "batch must be a positive integer"),
    (["--phase.decay.mfu=1.5"], r"\(decay\): mfu must be in \(0, 1\]"),
    (["--compile_mode=fastest"], "config key 'compile_mode'"),
    (["--hidden=129"], "n_head=2 does not divide hidden=129"),
    (["--eval_mix=zzz"], "eval_mix"),
    (["--data={'prose': 'p', 'code': 'c'}"], r"\(decay\): mixture 'decay' names source 'sft', which the data does not"),
    (["--mixtures={'stable': {'nosuch': 1}, 'decay': {'sft': 1}}"],  # data = None: the embedded corpus's sources
     r"\(warmup\): mixture 'stable' names source 'nosuch', which the data does not have \(sources: \['code'"),
    (["--time_limit=0.5"], r"config key 'time_limit': expected int or str, got 0.5"),
    (["--data=3"], r"config key 'data': expected dict, got 3"),
    (["--out_dir="], r"config key 'out_dir': a directory path, got ''"),
    (["--phases=[1]"], r"config key 'phases': phases\[0\] must be a dict of phase keys, got 1"),
    (["--phases=['warmup']"], r"config key 'phases': phases\[0\] must be a dict of phase keys, got 'warmup'"),
    (["--mixtures={'stable': {'code': '0.5'}, 'decay': {'sft': 1}}"], r"'stable' must map sources to finite weights"),
    (["--phase.decay.mix=['decay']"], r"phases\[3\]: mix must be a string, got \['decay'\]"),
    (["--phase.decay.name=[1]"], r"phases\[3\]: name must be a string, got \[1\]"),
])
def test_config_errors(args, match):
    with pytest.raises(ValueError, match=match):
        load("proxy20m", *args)


def test_config_overrides_and_missing_file():
    conf = load("proxy20m", "--lr=0.02", "--compile=True", "--phase.decay.optimizer=adamw", "--n_layer=4")
    assert conf["train"].lr == 0.02 and conf["train"].compile is True and conf["model"].n_layer == 4
    assert [p["optimizer"] for p in conf["train"].phases if p["name"] == "decay"] == ["adamw"]
    assert {p["optimizer"] for p in load("xmodel25", "--phase.*.optimizer=adamw")["train"].phases} == {"adamw"}
    assert load("proxy20m", "--grad_clip=inf")["train"].grad_clip == math.inf  # no clipping, as --help says
    with pytest.raises(ValueError, match="config key 'lr' must be a finite number > 0, got nan"):
        load("proxy20m", "--lr=nan")
    with pytest.raises(ValueError, match=r"phases\[0\] \(warmup\): optimizer must be one of"):
        load("proxy20m", "--phase.*.optimizer=sgd")
    for bad, why in (("--phase.nope.steps=3", "no phase named 'nope'"), ("--phase.decay.nope=3", "unknown phase key "
                     "'nope'"), ("--model.n_layer=3", "only phase keys are dotted")):  # the wrong part alone
        with pytest.raises(ValueError, match=rf"^config override {re.escape(bad[:bad.index('=')])}: {why}[^;]*; "
                                             rf"the form is --phase.NAME.KEY=value$"):
            load("proxy20m", bad)
    with pytest.raises(ValueError, match="config file not found"):
        train.load_config(["configs/nope.py"])
    with pytest.raises(ValueError, match=r"the curriculum is empty \(the defaults have none: give a config file"):
        train.load_config(["--dry_run"])  # no config file at all


# ---------------------------------------------------------------- running

def test_tiny_run_loss_falls_and_logs(tmp_path, tiny_data, capsys):
    cfg = write_config(tmp_path / "c.py", tiny_data, out_dir=str(tmp_path / "out"))
    s = train.train([cfg, "--phase.stable.steps=12"])
    out = capsys.readouterr().out
    assert s["step"] == 19 and all(math.isfinite(l) for l in s["losses"])
    assert sum(s["losses"][-3:]) / 3 < s["losses"][0] - 0.5  # batch-to-batch noise is about 0.1
    rows = [json.loads(l) for l in open(tmp_path / "out" / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 19
    for k in ("step", "phase", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "seq_len", "global_batch", "optimizer"):
        assert k in steps[0]
    assert steps[-1]["tokens"] == 2 * 4 * 32 + 12 * 4 * 32 + 3 * 4 * 32 + 2 * 2 * 64
    assert [r["optimizer"] for r in steps].count("muon") == 5 and steps[-1]["seq_len"] == 64
    switch = [r for r in rows if r.get("event") == "optimizer_switch"]
    assert switch == [{"step": 14, "event": "optimizer_switch", "from": "adamw", "to": "muon", "phase": "decay"}]
    assert "eval_loss" in rows[-1] and "final held-out loss" in out and s["sample"]
    assert json.load(open(tmp_path / "out" / "config.json"))["model"]["hidden"] == 32
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000  # the loss curve, drawn at the end


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data):
    d = tmp_path_factory.mktemp("full")
    return d, train.train([write_config(d / "a.py", tiny_data, out_dir=str(d / "a"))])


@pytest.mark.parametrize("stop_at", [4, 6])  # inside "stable" (resume crosses the switch) and inside "decay"
def test_resume_is_exact(tmp_path, tiny_data, uninterrupted, stop_at, monkeypatch):
    full_dir, full = uninterrupted
    cfg_b = write_config(tmp_path / "b.py", tiny_data, out_dir=str(tmp_path / "b"))
    first = train.train([cfg_b, f"--max_steps={stop_at}"])
    assert first["step"] == stop_at and os.path.isdir(tmp_path / "b" / f"ckpt_{stop_at:08d}")
    with monkeypatch.context() as m, pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        m.setattr(train, "build_data", None)  # refused before the data is read, the model built
        train.train([cfg_b])  # a fresh start never writes over another run
    rest = train.train([cfg_b, "--resume"])
    assert first["losses"] + rest["losses"] == full["losses"]  # bit for bit
    a, b = runtime.load_checkpoint(str(full_dir / "a")), runtime.load_checkpoint(str(tmp_path / "b"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rows = lambda d: [r for r in map(json.loads, open(d / "metrics.jsonl")) if "loss" in r]  # noqa: E731
    assert [r["step"] for r in rows(tmp_path / "b")] == [r["step"] for r in rows(full_dir / "a")]


def _schedule(shape, start, end, i, steps):
    """The phase's LR factor written out from the definitions, independently of train.lr_factor."""
    r = (i + 1) / steps
    if shape == "constant":
        return start
    return start + (end - start) * r if shape == "linear" else end + (2 * 0.5 ** r - 1) * (start - end)


def test_applied_lr_of_every_group_at_every_step(tmp_path, tiny_data, monkeypatch):
    """The LR each optimizer's param_groups hold when it steps, across warmup, the phase boundaries, the
    AdamW->Muon switch and a resume, against the schedule times each group's μP peak (m = 32/16 = 2)."""
    applied, real = [], train.Optimizers.step

    def recording(self):
        applied.append({g["name"]: (type(opt).__name__, g["lr"]) for opt in self.all() for g in opt.param_groups})
        real(self)
    monkeypatch.setattr(train.Optimizers, "step", recording)
    cfg = write_config(tmp_path / "c.py", tiny_data, out_dir=str(tmp_path / "out"), lr=0.05, emb_lr=0.02)
    train.train([cfg, "--max_steps=6"])  # stops inside "decay", after the switch
    train.train([cfg, "--resume"])
    peak = {"hidden": 0.05 / 2, "embedding": 0.02, "norm": 0.05 / 2}  # norm_lr="hidden"
    expected = []
    for p in train.load_config([cfg])["train"].phases:
        for i in range(p["steps"]):
            f = _schedule(*p["lr"], i, p["steps"])
            hidden_opt = "Muon" if p["optimizer"] == "muon" else "AdamW"
            expected.append({"hidden": (hidden_opt, peak["hidden"] * f), "embedding": ("AdamW", peak["embedding"] * f),
                             "norm": ("AdamW", peak["norm"] * f)})
    assert len(applied) == len(expected) == 10
    for step, (got, want) in enumerate(zip(applied, expected)):
        assert got.keys() == want.keys(), step
        for name in want:
            assert got[name][0] == want[name][0], (step, name)
            assert got[name][1] == pytest.approx(want[name][1], rel=1e-12, abs=0), (step, name)


def test_phase_mixtures_clipping_and_pruning_reach_the_run(tmp_path, tiny_data, monkeypatch):
    """In one tiny run: each phase's mixture weights are those the batches are drawn with, each step drawing
    each source its apportioned count; a huge gradient is clipped to grad_clip before the
    optimizers step (the log keeps the norm before clipping); keep_checkpoints=2 leaves exactly the last two."""
    drawn, norms = {}, []
    real_batch, real_step, real_fwd = data.Mixture.batch, train.Optimizers.step, model_mod.Xmodel.forward

    def batch(self, step, *a, **k):
        drawn.setdefault(step, self)
        return real_batch(self, step, *a, **k)

    def step(self):
        grads = [p.grad.double() for g in self.groups for p in g["params"]]
        norms.append(math.sqrt(sum(float(v.pow(2).sum()) for v in grads)))
        real_step(self)
    monkeypatch.setattr(data.Mixture, "batch", batch)
    monkeypatch.setattr(train.Optimizers, "step", step)
    monkeypatch.setattr(model_mod.Xmodel, "forward",
                        lambda self, idx, targets=None: real_fwd(self, idx, targets) * (1e4 if self.training else 1))
    cfg = write_config(tmp_path / "c.py", tiny_data, out_dir=str(tmp_path / "out"), ckpt_interval=1, keep_checkpoints=2)
    train.train([cfg])
    phases = train.load_config([cfg])["train"].phases
    mixes = {"stable": {"code": 0.5, "prose": 0.5}, "decay": {"code": 0.3, "prose": 0.7}}
    assert sorted(drawn) == list(range(10))
    for s, mix in drawn.items():  # each step draws each source its count by its phase's weights
        p, at = phases[train.phase_at(phases, s)[0]], mix.phase_of(s)
        w = tuple(mixes[p["mix"]][name] for name in mix.names)
        assert at.weights == w and at.batch == p["batch"], s
        n0 = (s - at.start) * p["batch"]
        want = np.array(data.apportion(w, n0 + p["batch"])) - np.array(data.apportion(w, n0))
        assert np.bincount(mix.sources_for(s, 0, p["batch"]), minlength=len(w)).tolist() == want.tolist(), s
    assert len(norms) == 10 and all(v == pytest.approx(1.0, rel=1e-5) for v in norms)  # grad_clip = 1.0
    logged = [r["grad_norm"] for r in map(json.loads, open(tmp_path / "out" / "metrics.jsonl")) if "loss" in r]
    assert len(logged) == 10 and min(logged) > 100
    out = tmp_path / "out"
    assert sorted(f for f in os.listdir(out) if "ckpt_" in f) == ["ckpt_00000009", "ckpt_00000010"]
    for d in ("ckpt_00000009", "ckpt_00000010"):  # the manifest names every other file, with its sha256
        manifest = json.load(open(out / d / "manifest.json"))
        assert manifest["step"] == int(d[5:]) and set(manifest["files"]) == set(os.listdir(out / d)) - {"manifest.json"}
        for f, digest in manifest["files"].items():
            assert hashlib.sha256((out / d / f).read_bytes()).hexdigest() == digest, (d, f)


def test_switch_keeps_adamw_state_of_embedding_and_norms(tmp_path, tiny_data):
    conf = train.load_config([write_config(tmp_path / "c.py", tiny_data)])
    m = model_mod.Xmodel(conf["model"])
    c = conf["train"]
    opts = muon.Optimizers(mup.param_groups(m, c.lr, c.emb_lr, c.weight_decay), c)
    m(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))).backward()
    opts.step()
    rest, before = opts.rest, {p: s for p, s in opts.rest.state.items()}
    hidden = {id(p) for n, p in m.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert {id(p) for p in opts.hidden.state} == hidden and not hidden & {id(p) for p in before}
    opts.use("muon")
    assert opts.rest is rest and all(opts.rest.state[p] is before[p] for p in before) and len(before) == 6  # embedding + 2 x 2 block norms + final norm
    assert isinstance(opts.hidden, muon.Muon) and not opts.hidden.state
    assert {id(p) for g in opts.hidden.param_groups for p in g["params"]} == hidden
    assert opts.hidden.param_groups[0]["lr"] == opts.groups[0]["lr"] == 0.05 / 2  # μP: base lr / m
    opts.use("adamw")
    assert isinstance(opts.hidden, torch.optim.AdamW) and not opts.hidden.state


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    cfg = write_config(tmp_path / "c.py", tiny_data, out_dir=str(tmp_path / "out"), ckpt_interval=2)
    real, calls = model_mod.Xmodel.forward, []

    def poisoned(self, idx, targets=None):
        out = real(self, idx, targets)
        calls.append(1)
        return out * float("nan") if self.training and len(calls) == 5 else out  # step 3 (two micro-batches each)
    monkeypatch.setattr(model_mod.Xmodel, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="at step 3"):
        train.train([cfg])
    assert [os.path.basename(p) for p in runtime.list_checkpoints(str(tmp_path / "out"))] == ["ckpt_00000002"]
    ck = runtime.load_checkpoint(str(tmp_path / "out"))
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.parametrize("extra", [[], ["--fp8=True"]], ids=["plain", "fp8"])
def test_steps_between_log_rows_never_read_the_device(tmp_path, tiny_data, extra):
    """On a GPU the host queues a step's kernels while earlier ones run; a read of a device value (.item(),
    bool(), a boolean mask, ...) makes it wait for all of them, and the GPU idles while the next step is
    queued and its batch loaded. The loop reads the device only for a log row, a checkpoint, an evaluation
    and at the end: with log_interval past the run's end no step but the last reads anything (the phase
    changes, the switch to Muon and FP8's scale updates included), and the last one does (its log row: so
    the count sees reads). conftest.HostReads says what counts as a read."""
    cfg = write_config(tmp_path / "c.py", tiny_data, out_dir=str(tmp_path / "out"), log_interval=100)
    with HostReads() as reads:
        s = train.train([cfg, *extra])
    last = s["step"] - 1
    assert sorted(reads.steps) == list(range(s["step"])) and s["step"] == 10
    assert {step: r for step, r in reads.steps.items() if r and step != last} == {}
    assert "aten._local_scalar_dense.default" in reads.steps[last]


def test_checkpoint_loading_rejects_bad_files(tmp_path):
    good = runtime.save_checkpoint(str(tmp_path), 1, {"model": {"w": torch.ones(3)}}, keep=2)
    assert runtime.load_checkpoint(good)["model"]["w"].sum() == 3
    raw = open(good, "rb").read()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.pt: not a readable checkpoint"):
        runtime.load_checkpoint(str(tmp_path / "trunc.pt"))
    torch.save({"w": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an Xmodel-2.5 checkpoint"):
        runtime.load_checkpoint(str(tmp_path / "foreign.pt"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "code.pt")  # a pickled module: refused by weights_only
    with pytest.raises(ValueError, match="code.pt: not a readable checkpoint"):
        runtime.load_checkpoint(str(tmp_path / "code.pt"))
    for s in (2, 3, 4):
        runtime.save_checkpoint(str(tmp_path), s, {}, keep=2)
    (tmp_path / "ckpt_00000009.pt.tmp").write_bytes(b"partial")  # a crash mid-write is never "latest"
    assert [os.path.basename(p) for p in runtime.list_checkpoints(str(tmp_path))] == ["ckpt_00000003.pt", "ckpt_00000004.pt"]


def test_raw_text_sources_are_prepared_from_the_config(tmp_path, tiny_data):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("def f(x):\n    return x + 1\n" * 400)
    (raw / "b.jsonl").write_text("\n".join('{"text": "The quick brown fox %d jumps over the lazy dog."}' % i
                                           for i in range(400)))
    cfg = write_config(tmp_path / "c.py", tiny_data, out_dir=str(tmp_path / "out"), data_cache=str(tmp_path / "cache"),
                       data={"code": str(tiny_data), "prose": str(raw)})
    s = train.train([cfg, "--max_steps=2"])
    assert s["step"] == 2 and all(math.isfinite(l) for l in s["losses"])
    manifest = json.load(open(tmp_path / "cache" / "prepared" / "prose" / "manifest.json"))
    assert manifest["sources"]["prose"]["documents"] == 401  # one .txt document + 400 jsonl lines


# ---------------------------------------------------------------- the machine: both bf16 paths on any CPU
# These machines change between CPUs with native bf16 (AMX, AVX512-BF16) and AVX2-only ones where bf16 is
# emulated: each path is forced here, so both are tested whichever CPU runs the suite.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.mark.parametrize("native", [False, True])
def test_dtype_auto_follows_native_bf16(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    dtype, why = runtime.resolve_dtype("auto", "cpu")
    if native:
        assert dtype == "bfloat16" and why.startswith("dtype auto -> bfloat16: this CPU (")
        assert why.endswith("has native bf16 kernels")
    else:
        assert dtype == "float32" and why.startswith("dtype auto -> float32: this CPU (")
        assert "has no native bf16 kernels" in why and "8x slower" in why
    assert runtime.resolve_dtype("float32", "cpu") == ("float32", "dtype float32 (as configured)")


def test_explicit_bf16_is_kept_with_a_warning_where_emulated(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    dtype, why = runtime.resolve_dtype("bfloat16", "cpu")
    assert dtype == "bfloat16" and why.startswith("warning: dtype bfloat16 as configured")
    assert "no native bf16 kernels" in why and "--dtype=float32" in why
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_dtype("bfloat16", "cpu") == ("bfloat16", "dtype bfloat16 (as configured)")
    said = []
    assert runtime.resolve_machine("cpu", "auto", said.append) == ("cpu", "bfloat16")
    assert said == ["device cpu (as configured)", runtime.resolve_dtype("auto", "cpu")[1]]


def test_device_cuda_without_cuda_names_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    with pytest.raises(ValueError, match="config key 'device': cuda requested but torch.cuda.is_available"):
        runtime.resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    device, why = runtime.resolve_device("auto")
    assert device == "cpu" and why.startswith("device auto -> cpu (no CUDA or MPS device")


def _cli(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA, also on a GPU machine
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # a hang guard only


def test_cli_dry_run_xmodel25_needs_no_cuda():
    p = _cli("configs/xmodel25.py", "--dry_run")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "total: 560,000 steps, 1.52T tokens" in p.stdout and "GPU-hours" in p.stdout, p.stdout[-3000:]
    assert p.stdout.strip().endswith("needs the prepared data, which is not on this machine "
                                     "(docs/DATA.md: how to prepare it)")  # no data here: one line


def test_dry_run_shows_the_data_where_it_is_prepared(tmp_path, tiny_data, capsys):
    """Per source: train tokens, tokens the curriculum draws, passes; a source drawn over 4 times is named."""
    conf = train.load_config([write_config(tmp_path / "c.py", tiny_data), "--dry_run"])
    train.dry_run(conf["train"], conf["model"], 1)
    out = capsys.readouterr().out
    m = data.read_manifest(tiny_data)
    for s in ("code", "prose"):
        assert f"  {s:<20}{m['sources'][s]['splits']['train']['tokens']:>16,}" in out
    conf = train.load_config([write_config(tmp_path / "c.py", tiny_data), "--dry_run", "--phase.*.steps=3000"])
    train.dry_run(conf["train"], conf["model"], 1)
    assert "warning: source 'prose' is drawn" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help_lists_every_key_with_its_meaning(flag):
    p = _cli(flag)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("usage: python train.py") and p.stdout.rstrip("\n") == train.config_help()
    for line in ("--dist_timeout_s=300", "a dead or hung rank fails the job after this long"), \
                ("--zero1=False", "shard optimizer state across ranks"), \
                ("--vocab_size=129280", "DeepSeek-V3 tokenizer's 128,815 tokens, padded"):
        assert any(line[0] in l and line[1] in l for l in p.stdout.splitlines()), line


def test_help_has_a_meaning_for_every_field():
    """The help is generated from the comments beside the dataclass fields: a field added without one
    shows up here."""
    # a line: "  --key=default", padded, then the meaning (a default shows no run of two spaces)
    rows = dict(re.match(r"  --(\w+)=(?:\S| (?! ))*\s*(.*)$", l).groups() for l in train.config_help().splitlines()
                if l.startswith("  --"))
    keys = [f.name for cls in (train.TrainConfig, model_mod.ModelConfig) for f in dataclasses.fields(cls)]
    assert sorted(rows) == sorted(keys)
    empty = [k for k in keys if not rows[k].strip()]
    assert not empty, f"fields without a comment (their --help line is empty): {empty}"


# ---------------------------------------------------------------- resume across configs, FP8 and bf16 runs

SHORT = ["--phase.warmup.steps=1", "--phase.stable.steps=1", "--phase.decay.steps=1", "--phase.long.steps=1",
         "--eval_windows=2", "--sample_tokens=0"]


def test_resume_refuses_another_model_but_not_another_execution(tmp_path, tiny_data):
    cfg = write_config(tmp_path / "c.py", tiny_data, out_dir=str(tmp_path / "out"))
    train.train([cfg, *SHORT, "--max_steps=2"])
    with pytest.raises(ValueError, match=r"checkpoint was written for another model config \(fields \['n_layer'\]\)"):
        train.train([cfg, *SHORT, "--resume", "--n_layer=3"])
    # how the model is computed may change on resume: the chunk of the loss is not the model
    assert train.train([cfg, *SHORT, "--resume", "--loss_chunk=32"])["step"] == 4
    cfg = write_config(tmp_path / "d.py", tiny_data, out_dir=str(tmp_path / "other_kernel"))
    train.train([cfg, *SHORT, "--max_steps=2"])  # nor the attention kernel (the long phases may want another)
    assert train.train([cfg, *SHORT, "--resume", "--attn_backend=math", "--gqa=repeat"])["step"] == 4


def test_fp8_run_resumes_exactly(tmp_path, tiny_data):
    """FP8 (emulated on the CPU) inside the trainer: the amax histories and scales are checkpointed, so a
    stopped and resumed FP8 run equals the uninterrupted one bit for bit."""
    full = train.train([write_config(tmp_path / "a.py", tiny_data, out_dir=str(tmp_path / "a")), *SHORT, "--fp8=True"])
    cfg = write_config(tmp_path / "b.py", tiny_data, out_dir=str(tmp_path / "b"))
    first = train.train([cfg, *SHORT, "--fp8=True", "--max_steps=2"])
    rest = train.train([cfg, *SHORT, "--fp8=True", "--resume"])
    assert first["losses"] + rest["losses"] == full["losses"]
    a, b = runtime.load_checkpoint(str(tmp_path / "a")), runtime.load_checkpoint(str(tmp_path / "b"))
    scales = [k for k in a["model"] if k.endswith((".scale", ".amax_history"))]
    assert scales and any((a["model"][k] != 1).any() for k in scales if k.endswith(".scale"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_bf16_autocast_run_keeps_fp32_masters(tmp_path, tiny_data):
    s = train.train([write_config(tmp_path / "c.py", tiny_data, out_dir=str(tmp_path / "out")), *SHORT,
                     "--dtype=bfloat16"])
    assert s["step"] == 4 and all(math.isfinite(l) for l in s["losses"])
    ck = runtime.load_checkpoint(str(tmp_path / "out"))
    assert {v.dtype for k, v in ck["model"].items() if not k.endswith("amax_history")} == {torch.float32}
    assert ck["config"]["dtype"] == "bfloat16"


FP8_HISTORY = 128  # RECIPE.md, "FP8 mixed precision": history length 128, algorithm "max", margin 0


def _record_fp8_amaxes(monkeypatch) -> dict:
    """Hooks on every FP8 layer of the model the trainer builds: {layer name: ([input], [weight], [grad_output])}
    amaxes, max |.| read from the tensors themselves at each training-mode forward and backward (not from fp8.py)."""
    import fp8
    import mup
    seen, real_build = {}, mup.build_model

    def build(*a, **k):
        m = real_build(*a, **k)
        for name, mod in m.named_modules():
            if isinstance(mod, fp8.FP8Linear):
                rec = seen.setdefault(name, ([], [], []))

                def pre(mod, args, rec=rec):
                    if mod.training:
                        rec[0].append(float(args[0].detach().abs().max()))
                        rec[1].append(float(mod.weight.detach().abs().max()))

                def post(mod, args, out, rec=rec):
                    if mod.training:
                        out.register_hook(lambda g: rec[2].append(float(g.abs().max())))
                mod.register_forward_pre_hook(pre)
                mod.register_forward_hook(post)
        return m
    monkeypatch.setattr(mup, "build_model", build)
    return seen


def test_fp8_history_advances_per_micro_batch_and_rolls_over_at_128(tmp_path, tiny_data, monkeypatch):
    """Delayed scaling inside the trainer, against amaxes recorded by hooks: after every step each FP8 layer's
    history (newest first, zero-padded) holds exactly the last 128 amaxes of its input, weight and grad_output,
    one per micro-batch forward/backward (fp8.py: "once per micro-batch", not once per optimizer step), and its
    scale is fp8_max / max(that window) (448 for E4M3, 57344 for E5M2). Steps of 2 and then 4 micro-batches:
    4 + 4 * 50 = 204 > 128, so the last checkpoints have evicted the oldest 76 amaxes."""
    seen = _record_fp8_amaxes(monkeypatch)
    phases = [dict(name="warmup", steps=2, lr=("linear", 0.5, 1.0), batch=2, seq_len=8, mix="stable", optimizer="adamw"),
              dict(name="stable", steps=50, lr=("constant", 1.0, 1.0), batch=4, seq_len=8, mix="stable", optimizer="adamw")]
    cfg = write_config(tmp_path / "c.py", tiny_data, out_dir=str(tmp_path / "out"), phases=phases, micro_batch=1,
                       fp8=True, ckpt_interval=1, keep_checkpoints=100, eval_windows=2, sample_tokens=0)
    train.train([cfg])
    micro = [2] * 2 + [4] * 50  # micro-batches of each step (batch / micro_batch, one rank)
    assert len(seen) == 2 * 4 and all(len(r) == sum(micro) for rec in seen.values() for r in rec)
    fp8_max = (448.0, 448.0, 57344.0)  # E4M3 for input and weight, E5M2 for grad_output
    evicted = 0
    for step in range(1, len(micro) + 1):
        sd = runtime.load_checkpoint(str(tmp_path / "out" / f"ckpt_{step:08d}"))["model"]
        n = sum(micro[:step])
        for name, rec in seen.items():
            hist, scale = sd[f"{name}.amax_history"], sd[f"{name}.scale"]
            assert hist.shape == (3, FP8_HISTORY), name
            for role in range(3):
                pushed = [a for a in rec[role][:n] if 0 < a < math.inf]  # fp8.py: a zero amax is not pushed
                window = pushed[::-1][:FP8_HISTORY]
                want = window + [0.0] * (FP8_HISTORY - len(window))
                assert hist[role].tolist() == want, (step, name, role)
                # fp32 division of fp32 numbers; rounding the float64 quotient is the same (53 >= 2 * 24 + 2)
                assert scale[role].item() == float(np.float32(fp8_max[role] / max(window))), (step, name, role)
                evicted += step == len(micro) and max(pushed) > max(window)
    # the rollover shows in the scales: for some layers the largest amax has left the window
    assert evicted > 0
    # each row's fp8_range: per role the largest amax / (largest of the window before it) over the step's
    # micro-batches and the layers (1 for a layer's first, scaled just in time)
    rows = [r for r in map(json.loads, open(tmp_path / "out" / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, len(micro) + 1))
    for row, step in zip(rows, range(1, len(micro) + 1)):
        first = sum(micro[:step - 1])
        for role, key in enumerate(("x", "w", "dy")):
            want = 0.0
            for rec in seen.values():
                for k in range(first, first + micro[step - 1]):
                    before = [a for a in rec[role][:k] if 0 < a < math.inf][::-1][:FP8_HISTORY]
                    want = max(want, rec[role][k] / max(before) if before else 1.0)
            assert row["fp8_range"][key] == pytest.approx(want, rel=1e-5), (step, key)
    assert max(r["fp8_range"]["x"] for r in rows) > 1  # a growing input outgrew its window: clipped
    print(f"roles whose largest amax was evicted by the end: {evicted} of {3 * len(seen)}")


def test_compiled_training_equals_eager(tmp_path, tiny_data):
    """compile=True (Inductor, C++ codegen: CI has gcc) trains the same model as eager: each block compiled
    (the loss chunk stays eager in fp32 on a CPU; its compiled form is checked against the eager one in
    test_model), 3 AdamW steps of the smallest model (1 block). Not bitwise:
    Inductor fuses RMSNorm, SiLU and RoPE into loops of its own summation order, so each loss
    moves by a few fp32 ulps (2^-23 relative each). The bound, 2^-13 relative (1024 ulps), is a budget of
    roundings, not a measurement: a real difference under compile (a dropped multiplier, mask or RoPE, a
    wrong loss scale or gradient) moves the loss by 1e-3 or more within these 3 steps."""
    torch._dynamo.reset()
    phases = [dict(name="stable", steps=3, lr=("constant", 1.0, 1.0), batch=2, seq_len=16, mix="stable", optimizer="adamw")]
    cfg = write_config(tmp_path / "c.py", tiny_data, phases=phases, n_layer=1, eval_windows=2, sample_tokens=0)
    eager = train.train([cfg, f"--out_dir={tmp_path / 'eager'}"])["losses"]
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = train.train([cfg, f"--out_dir={tmp_path / 'compiled'}", "--compile=True"])["losses"]
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])  # the block
    assert len(eager) == len(compiled) == 3 and abs(eager[2] - eager[0]) > 1e-2  # the steps did train
    for step, (e, c) in enumerate(zip(eager, compiled)):
        assert abs(c - e) <= 2.0 ** -13 * abs(e), (step, e, c)
