"""No run lost to a late error: every fault the trainer must survive or refuse early, one test each.

The runs use a 6-step curriculum (warmup 1, stable 2 on AdamW, decay 2 and long 1 on Muon: the switch is at
step 3) of 2 x 16 (long: 1 x 32) on the tiny model of conftest.py; most scenarios stop after one or two steps.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import runtime
import train
from conftest import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--phase.warmup.steps=1", "--phase.stable.steps=2", "--phase.decay.steps=2", "--phase.long.steps=1",
         *(f"--phase.{p}.batch=2" for p in ("warmup", "stable", "decay")), "--phase.long.batch=1",
         *(f"--phase.{p}.seq_len=16" for p in ("warmup", "stable", "decay")), "--eval_windows=2", "--sample_tokens=0"]
SWITCH_STEP = 3  # the first step of "decay", where AdamW hands the hidden matrices to Muon


# one intra-op thread (conftest.py), as in the SIGTERM test's subprocess (OMP_NUM_THREADS=1), so that the runs
# compared bit for bit sum in the same order
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_data):
    return write_config(tmp_path_factory.mktemp("faults") / "c.py", tiny_data)


def run(cfg, out, *extra) -> dict:
    return train.train([cfg, *SHORT, f"--out_dir={out}", *extra])


def ckpt_names(out) -> list[str]:
    return [os.path.basename(p) for p in runtime.list_checkpoints(str(out))]


def loss_rows(out) -> list[tuple]:
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]


# ---------------------------------------------------------------- 1. the final checkpoint comes before the final evaluation

def test_failing_final_evaluation_keeps_the_final_checkpoint(tmp_path, cfg, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("the evaluation died")
    monkeypatch.setattr(train, "evaluate", broken)
    with pytest.raises(RuntimeError, match="the evaluation died"):
        run(cfg, tmp_path / "out", "--max_steps=1")
    assert ckpt_names(tmp_path / "out") == ["ckpt_00000001"]
    assert runtime.load_checkpoint(str(tmp_path / "out"))["step"] == 1


# ---------------------------------------------------------------- 2. a later phase's bad settings, refused before step 1

@pytest.fixture(scope="module")
def short_source(tmp_path_factory, tiny_data):
    """A source "tiny" of a few hundred tokens (tiny_data's tokenizer): (its dataset dir, train tokens, held-out
    tokens)."""
    root = tmp_path_factory.mktemp("tiny_source")
    (root / "docs").mkdir()
    for i in range(16):
        (root / "docs" / f"{i:02d}.txt").write_text(f"Document {i}: " + " ".join(f"word{i * j}" for j in range(12)))
    d = data.prepare({"tiny": str(root / "docs")}, root / "ds", data.read_manifest(tiny_data)["tokenizer"]["spec"],
                     heldout_frac=0.25, workers=1, progress=False)
    m = data.Mixture({"tiny": d}, {"tiny": 1.0})
    n_train, n_heldout = m.split_tokens("tiny", "train"), m.split_tokens("tiny", "heldout")
    assert 33 <= n_heldout + 1 < n_train  # the cases below need: decay's 32 fits, train longer than held-out
    return d, n_train, n_heldout


def _with_tiny(tmp_path, tiny_data, short_source, **overrides):
    d, _, _ = short_source
    return write_config(tmp_path / "c.py", tiny_data, data={"code": str(tiny_data), "prose": str(tiny_data), "tiny": d},
                        mixtures={"stable": {"code": 0.5, "prose": 0.5},
                                  "decay": {"code": 0.3, "prose": 0.5, "tiny": 0.2}}, **overrides)


@pytest.mark.parametrize("case", ["unknown_source", "seq_len_over_max", "train_split_too_short",
                                  "heldout_split_too_short", "negative_phase_lr"])
def test_later_phase_refused_before_step_1(tmp_path, tiny_data, short_source, case):
    _, n_train, n_heldout = short_source
    out = tmp_path / "out"
    if case == "unknown_source":
        c = write_config(tmp_path / "c.py", tiny_data, mixtures={"stable": {"code": 0.5, "prose": 0.5},
                                                                 "decay": {"code": 0.3, "web": 0.7}})
        argv, match = [], r"phases\[2\] \(decay\): mixture 'decay' names source 'web', which the data does not have"
    elif case == "seq_len_over_max":
        c = write_config(tmp_path / "c.py", tiny_data)
        argv, match = ["--max_seq_len=48"], r"phases\[3\] \(long\): seq_len 64 > the model's max_seq_len 48"
    elif case == "train_split_too_short":
        c = _with_tiny(tmp_path, tiny_data, short_source)
        argv = [f"--phase.long.seq_len={n_train}"]
        match = rf"phases\[3\] \(long\): seq_len {n_train} needs .*source 'tiny' has {n_train} in its train split"
    elif case == "heldout_split_too_short":  # evaluated at the end, on the decay mix, which draws on "tiny"
        c = _with_tiny(tmp_path, tiny_data, short_source, eval_mix="decay")
        argv = [f"--phase.long.seq_len={n_heldout}"]
        match = rf"phases\[3\] \(long\): seq_len {n_heldout} needs .*source 'tiny' has {n_heldout} in its heldout split"
    else:
        c = write_config(tmp_path / "c.py", tiny_data)
        argv, match = ["--phase.decay.lr=('exp', 1.0, -0.0625)"], r"phases\[2\] \(decay\): lr must be"
    with pytest.raises(ValueError, match=match):
        train.train([c, f"--out_dir={out}", *argv])
    assert not runtime.list_checkpoints(str(out)) and not os.path.exists(out / "metrics.jsonl")  # nothing trained


def test_global_batch_not_divisible_by_the_world_size(tmp_path, tiny_data):
    conf = train.load_config([write_config(tmp_path / "c.py", tiny_data), "--phase.warmup.batch=6",
                              "--phase.stable.batch=6", "--phase.decay.batch=6"])
    _, mixture = train.build_data(conf["train"], conf["model"], 0)
    train.check_run(conf["train"], mixture, world=2)  # 6, 6, 6 and 2 split over 2 ranks
    with pytest.raises(ValueError, match=r"phases\[3\] \(long\): global batch 2 is not divisible by the world size 3"):
        train.check_run(conf["train"], mixture, world=3)


# ---------------------------------------------------------------- 3. harmful numbers

@pytest.mark.parametrize("args,match", [
    (["--grad_clip=-1.0"], "config key 'grad_clip' must be > 0"),
    (["--lr=-0.01"], "config key 'lr' must be a finite number > 0"),
    (["--emb_lr=-0.01"], "config key 'emb_lr' must be a finite number > 0"),
    (["--lr=1e999"], "config key 'lr' must be a finite number > 0, got inf"),
    (["--max_steps=-1"], "config key 'max_steps' must be an integer >= 0"),
    (["--ckpt_interval=-2"], "config key 'ckpt_interval' must be an integer >= 0"),
    (["--eval_interval=-1"], "config key 'eval_interval' must be an integer >= 0"),
    (["--weight_decay=-0.1"], "config key 'weight_decay' must be a finite number >= 0"),
    (["--phase.decay.lr=('exp', 1e999, 0.0625)"], r"phases\[2\] \(decay\): lr must be .* got \('exp', inf"),
    ("lr = float('nan')", "config key 'lr' must be a finite number > 0, got nan"),  # NaN: no literal, so a config line
    ("grad_clip = float('nan')", "config key 'grad_clip' must be > 0"),
])
def test_harmful_numbers_are_refused_naming_the_key(tmp_path, tiny_data, args, match):
    c = write_config(tmp_path / "c.py", tiny_data)
    if isinstance(args, str):
        with open(c, "a") as f:
            f.write(args + "\n")
        args = []
    with pytest.raises(ValueError, match=match):
        train.load_config([c, *args])


def test_non_finite_weights_never_enter_a_checkpoint(tmp_path, cfg, monkeypatch):
    """An update that writes inf into a weight while the loss and the gradient norm stay finite."""
    real, calls = train.Optimizers.step, []

    def step(self):
        real(self)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.hidden.param_groups[0]["params"][0].view(-1)[0] = float("inf")
    monkeypatch.setattr(train.Optimizers, "step", step)
    with pytest.raises(FloatingPointError, match="non-finite weights after step 2: no checkpoint written"):
        run(cfg, tmp_path / "out", "--max_steps=2", "--ckpt_interval=1")
    assert ckpt_names(tmp_path / "out") == ["ckpt_00000001"]
    ck = runtime.load_checkpoint(str(tmp_path / "out"))  # sha256 verified: untouched
    assert ck["step"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())


# ---------------------------------------------------------------- 4. the tokenizer of a checkpoint

@pytest.fixture(scope="module")
def one_step(tmp_path_factory, cfg):
    """A run stopped after step 1 (its directory, to be copied, never written to)."""
    out = tmp_path_factory.mktemp("one_step") / "out"
    run(cfg, out, "--max_steps=1")
    return out


def test_another_tokenizer_identity_is_refused_unless_allowed(tmp_path, cfg, one_step, capsys):
    out = tmp_path / "out"
    shutil.copytree(one_step, out)
    ck = runtime.load_checkpoint(str(out))
    assert ck["tokenizer"]["n_vocab"] > 0
    ck["tokenizer"] = dict(ck["tokenizer"], name="other-tokenizer", sha256="0" * 64)  # same vocabulary size
    shutil.rmtree(out / "ckpt_00000001")  # in its place the single file of an older run (which still resumes)
    runtime.save_checkpoint(str(out), 1, {k: v for k, v in ck.items() if k not in ("format", "step")}, keep=3)
    ckpt = str(out / "ckpt_00000001.pt")
    for how in (["--resume", f"--out_dir={out}"], [f"--init_from={ckpt}", f"--out_dir={tmp_path / 'b'}"]):
        with pytest.raises(ValueError, match=rf"{re.escape(ckpt)}: trained with tokenizer other-tokenizer .*"
                                             r"--allow_tokenizer_change=True to continue anyway"):
            train.train([cfg, *SHORT, "--max_steps=2", *how])
    capsys.readouterr()
    s = run(cfg, out, "--max_steps=2", "--resume", "--allow_tokenizer_change=True")
    assert s["step"] == 2 and ckpt_names(out) == ["ckpt_00000001.pt", "ckpt_00000002"]
    out = capsys.readouterr().out
    assert re.search(r"warning: .*trained with tokenizer other-tokenizer .*; continuing \(--allow_tokenizer_change\)",
                     out), out[-2000:]


# ---------------------------------------------------------------- 5. one run per out_dir

def test_second_run_into_one_out_dir_is_refused_and_a_dead_holder_does_not_block(tmp_path, cfg):
    out = tmp_path / "out"
    held = runtime.RunLock(str(out))  # the first run (its own open file: flock excludes it like another process)
    try:
        with pytest.raises(ValueError, match=rf"out_dir .* is in use by another run \(PID {os.getpid()} on "):
            run(cfg, out, "--max_steps=1")
    finally:
        held.release()
    pid = os.fork()
    if pid == 0:  # a run that takes the lock and dies without releasing it
        try:
            runtime.RunLock(str(out))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert open(out / ".lock").read().startswith(f"PID {pid} ")  # the stale lock file of the dead process
    lock = runtime.RunLock(str(out))
    assert open(out / ".lock").read().startswith(f"PID {os.getpid()} ")
    lock.release()


def test_an_out_dir_that_cannot_be_written_is_named_as_such(tmp_path, cfg):
    """A file where out_dir should be: the config key and the file, at once (not a bare "File exists")."""
    (tmp_path / "file").write_text("")
    for out, why in ((tmp_path / "file", "File exists"), (tmp_path / "file" / "out", "Not a directory")):
        with pytest.raises(OSError, match=rf"out_dir '{out}' is not a directory this run can write \({why}: "):
            run(cfg, out)


def test_a_checkpoint_directory_as_out_dir_is_refused_untouched(tmp_path, cfg):
    """--out_dir=RUN/ckpt_N --resume ("resume from this one") found no checkpoint in it and trained from step 0
    inside the checkpoint directory: refused, naming the run directory and --init_from, with nothing written."""
    ckpt = tmp_path / "run" / "ckpt_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"out_dir '{ckpt}' is a checkpoint \(or dataset\) directory, not a "
                                         rf"run's: continue its run with --out_dir={tmp_path / 'run'} --resume"):
        run(cfg, ckpt, "--resume")
    assert os.listdir(ckpt) == ["manifest.json"]


# ---------------------------------------------------------------- 6. metrics across a resume: exact rows, no duplicate switch

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cfg):
    out = tmp_path_factory.mktemp("full") / "out"
    run(cfg, out, "--log_interval=2")
    return out


@pytest.fixture(scope="module")
def resumed_at_switch(tmp_path_factory, cfg):
    """Stopped at the switch step (not a multiple of log_interval=2); killed after writing the switch row
    of step 3 and before the next checkpoint (simulated: the row is appended); resumed."""
    out = tmp_path_factory.mktemp("resumed") / "out"
    run(cfg, out, "--log_interval=2", f"--max_steps={SWITCH_STEP}")
    assert ckpt_names(out) == [f"ckpt_{SWITCH_STEP:08d}"]
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": SWITCH_STEP, "event": "optimizer_switch", "from": "adamw", "to": "muon",
                            "phase": "decay"}) + "\n")
    run(cfg, out, "--log_interval=2", "--resume")
    return out


def test_resume_off_the_log_interval_logs_an_uninterrupted_runs_rows(uninterrupted, resumed_at_switch):
    assert [s for s, _ in loss_rows(uninterrupted)] == [2, 4, 6]
    assert loss_rows(resumed_at_switch) == loss_rows(uninterrupted)  # steps and losses, bit for bit


def test_a_kill_after_the_switch_row_does_not_duplicate_it(uninterrupted, resumed_at_switch):
    rows = [r for r in map(json.loads, open(resumed_at_switch / "metrics.jsonl")) if r.get("event")]
    assert rows == [{"step": SWITCH_STEP, "event": "optimizer_switch", "from": "adamw", "to": "muon", "phase": "decay"}]


def test_resume_past_the_runs_end_is_refused_and_touches_nothing(tmp_path, cfg):
    """A checkpoint at step 2 resumed with max_steps=1 (as a curriculum cut shorter): an error before anything
    is written; metrics.jsonl keeps its rows (it lost the last evaluation, and the plan said "-1 steps")."""
    out = tmp_path / "out"
    run(cfg, out, "--max_steps=2")
    rows = open(out / "metrics.jsonl").read()
    with pytest.raises(ValueError, match=r"is at step 2, past this run's end at step 1 \(max_steps=1\): nothing"):
        run(cfg, out, "--resume", "--max_steps=1")
    assert open(out / "metrics.jsonl").read() == rows and ckpt_names(out) == ["ckpt_00000002"]


# ---------------------------------------------------------------- 7. a damaged metrics.jsonl

def test_torn_last_metrics_line_is_dropped_a_bad_middle_line_is_an_error(tmp_path, cfg, one_step, capsys):
    out = tmp_path / "out"
    shutil.copytree(one_step, out)
    path = str(out / "metrics.jsonl")
    good = open(path).read()
    with open(path, "a") as f:
        f.write('{"step": 2, "phase": "sta')  # a crash mid-append
    capsys.readouterr()
    assert run(cfg, out, "--max_steps=2", "--resume")["step"] == 2
    assert f"warning: {path}: dropped a torn last line" in capsys.readouterr().err
    assert [s for s, _ in loss_rows(out)] == [1, 2]
    shutil.rmtree(out)
    shutil.copytree(one_step, out)
    lines = good.splitlines(keepends=True)
    open(path, "w").writelines([lines[0], "garbage\n", *lines[1:]])
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: line 2 is not JSON"):
        run(cfg, out, "--max_steps=2", "--resume")


# ---------------------------------------------------------------- 8. flipped bytes

def test_flipped_bytes_in_a_checkpoint_are_refused_naming_the_previous_one(tmp_path):
    state = {"model": {"w": torch.full((4096,), 1.5)}}
    first = runtime.save_checkpoint(str(tmp_path), 1, state, keep=3)
    second = runtime.save_checkpoint(str(tmp_path), 2, state, keep=3)
    raw = bytearray(open(second, "rb").read())
    at = raw.find(struct.pack("<f", 1.5) * 1024)  # inside the tensor's data
    assert at > 0
    raw[at + 2001] ^= 0x10
    open(second, "wb").write(raw)
    for path in (second, str(tmp_path)):  # the file, or the run directory's latest
        with pytest.raises(ValueError, match=rf"{re.escape(second)}: corrupt checkpoint .*"
                                             rf"the previous checkpoint is {re.escape(first)}"):
            runtime.load_checkpoint(path)
    assert torch.equal(runtime.load_checkpoint(first)["model"]["w"], state["model"]["w"])


def test_data_verify_checks_shard_hashes(tmp_path, tiny_data):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_data, ds)
    data.verify(str(ds))  # an intact dataset passes
    m = data.read_manifest(ds)
    shard = ds / m["sources"]["code"]["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size: only the sha256 in the manifest can tell
    shard.write_bytes(raw)
    with pytest.raises(ValueError, match=re.escape(shard.name)):
        data.verify(str(ds))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "verify", str(ds)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and shard.name in p.stderr, p.stderr[-2000:]


# ---------------------------------------------------------------- 9. a full disk

class FullDisk:
    """A file on a disk that fills after `room` bytes: its writes fail with ENOSPC, where a real full disk
    fails them (inside torch.save, which wraps the OSError in a RuntimeError of its own)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_a_checkpoint(tmp_path, cfg, monkeypatch, capsys):
    """The second checkpoint's data file fills the disk halfway (inside torch.save, inside
    torch.distributed.checkpoint's writer, in the background): said as soon as the write fails, naming the
    reason (not torch's "enforce fail ... unexpected pos"), and the run stops at the next wait for it (the end
    of the run) with one line."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".ckpt_00000007.pt.tmp-123").write_bytes(b"partial")  # left by runs that died mid-write
    (out / ".ckpt_00000008.tmp-dcp").mkdir()
    (out / ".ckpt_00000008.tmp-dcp" / "__0_0.distcp").write_bytes(b"partial")
    from torch.distributed.checkpoint import filesystem
    real = filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def full(self, path, mode):
        with real(self, path, mode) as f:
            yield FullDisk(f, 4096) if "ckpt_00000002" in str(path) and "w" in mode else f
    monkeypatch.setattr(filesystem.FileSystem, "create_stream", full)
    with pytest.raises(OSError) as e:
        run(cfg, out, "--max_steps=2", "--ckpt_interval=1")
    msg = str(e.value)
    assert "\n" not in msg and f"could not write {out / 'ckpt_00000002'} (rank 0: No space left on device;" in msg
    assert re.search(r"\d+\.\d\d GiB free on its file system", msg), msg
    assert not [n for n in os.listdir(out) if ".tmp" in n or n.startswith("ckpt_00000002")]
    assert ckpt_names(out) == ["ckpt_00000001"] and runtime.load_checkpoint(str(out))["step"] == 1
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint 2 failed")]
    assert len(said) == 1 and f"the last good one ({out / 'ckpt_00000001'}) is kept" in said[0], said


def test_disk_full_in_a_single_file_checkpoint_names_the_reason(tmp_path, monkeypatch):
    """The single file (tools.export --to_file, an import) on a full disk: one OSError naming the file and the
    reason, the temporary file removed; a file where its folder should be is named too."""
    out = tmp_path / "ckpt_00000001.pt"
    real = runtime.HashingWriter
    monkeypatch.setattr(runtime, "HashingWriter", lambda f: real(FullDisk(f, 1000)))
    with pytest.raises(OSError, match=rf"could not write {out} \(No space left on device; [\d.]+ GiB free"):
        runtime.write_checkpoint_file(str(out), {"model": {"w": torch.zeros(4096)}})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=rf"could not write {tmp_path}/file/x.pt \(File exists: {tmp_path}/file\)"):
        runtime.write_checkpoint_file(str(tmp_path / "file" / "x.pt"), {})


def test_disk_full_in_metrics_jsonl_names_the_file(tmp_path, monkeypatch):
    """A row that no longer fits: one OSError naming metrics.jsonl and the free space (it was a bare errno)."""
    sinks = runtime.Sinks(str(tmp_path), ["jsonl"])
    monkeypatch.setattr(runtime, "open", lambda p, *a, **k: FullDisk(open(p, *a, **k), 0), raising=False)
    with pytest.raises(OSError, match=rf"could not append to {tmp_path / 'metrics.jsonl'} \(No space left on "
                                      rf"device; [\d.]+ GiB free on its file system\)"):
        sinks.log({"step": 1, "loss": 2.0})


def test_disk_full_while_drawing_the_loss_curve_names_the_file(tmp_path, monkeypatch):
    """loss.png on a full disk: one OSError naming it, and no half-written file left."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "tokens": 64}) + "\n")
    real = runtime.atomic_write

    @contextlib.contextmanager
    def full(path, mode="w"):
        with real(path, mode) as f:
            yield FullDisk(f, 100)
    monkeypatch.setattr(runtime, "atomic_write", full)
    with pytest.raises(OSError, match=rf"could not write {tmp_path / 'loss.png'} \(No space left on device; "):
        runtime.plot_runs({"run": str(tmp_path)}, str(tmp_path / "loss.png"))
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


# ---------------------------------------------------------------- 11. a checkpoint's write waits under its own timeout

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slow_save_worker(rank, port, argv, slow_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank == 0:  # slow storage: rank 0's share of the write outlasts the collective timeout
        real = runtime._write_shards
        runtime._write_shards = lambda *a, **k: (time.sleep(slow_s), real(*a, **k))[1]
    runtime.plot_runs = lambda *a, **k: None  # rank 0's drawing is not under test (the other rank waits for it)
    try:
        assert train.train(argv)["step"] == 1
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    runtime.exit_distributed()  # (not a return: gloo's threads can abort Python's finalization)


def test_slow_checkpoint_write_outlasts_the_collective_timeout(tmp_path, cfg):
    timeout_s = 4
    argv = [cfg, *SHORT, f"--out_dir={tmp_path / 'out'}", "--max_steps=1", "--phase.long.batch=2",
            f"--dist_timeout_s={timeout_s}"]  # ckpt_timeout_s: its default, an hour
    # fork: the workers start with everything imported (a fresh interpreter per rank costs seconds)
    mp.start_processes(_slow_save_worker, args=(_free_port(), argv, timeout_s + 2), nprocs=2, join=True,
                       start_method="fork")
    assert ckpt_names(tmp_path / "out") == ["ckpt_00000001"]


# ---------------------------------------------------------------- preemption: SIGTERM, a time limit

SLOW_WRITE = textwrap.dedent("""
    import os, runpy, sys, time
    import runtime
    real = runtime._write_shards
    def slow(*a, **k):  # a slow file system: every rank's share takes XM_SLOW_S longer to write
        time.sleep(float(os.environ["XM_SLOW_S"]))
        return real(*a, **k)
    runtime._write_shards = slow
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.mark.parametrize("slow_s,grace_s,keeps_the_last", [(1.5, 10, False), (3.0, 4, True)])
def test_sigterm_with_a_slow_file_system_exits_0_within_the_grace(tmp_path, cfg, uninterrupted, slow_s, grace_s,
                                                                  keeps_the_last):
    """A checkpoint every step, each write slowed to slow_s; SIGTERM right after step 2's row, while step 2's
    checkpoint is being written. The run finishes step 3, completes the write in flight and then writes step
    3's own if it ends within preempt_grace_s of the signal (1.5 + 1.5 s < 10 s), else keeps step 2's (3 + 3 s
    > 4 s); either way it exits 0 within the grace, and the resumed run equals the uninterrupted one."""
    out = tmp_path / "out"
    (tmp_path / "slow.py").write_text(SLOW_WRITE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, XM_SLOW_S=str(slow_s))
    p = subprocess.Popen([sys.executable, str(tmp_path / "slow.py"), os.path.join(ROOT, "train.py"), cfg, *SHORT,
                          f"--out_dir={out}", "--log_interval=2", "--ckpt_interval=1", f"--preempt_grace_s={grace_s}"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if line.startswith("step 2/6 "):
                p.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                break
        rest, err = p.communicate(timeout=120)
        exited = time.monotonic() - signalled
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    stdout = "".join(lines) + rest
    assert p.returncode == 0, err[-3000:]
    m = re.search(r"^preempted \(SIGTERM, ([\d.]+) s ago\): stopped after step (\d)(?: with a checkpoint|; (\S+) is kept "
                  r"\(this step's own would have ended past preempt_grace_s=\d+\)); continue with: python train\.py .* "
                  r"--resume$", stdout, re.M)
    assert m, stdout[-3000:]
    safe_after, stopped, kept = float(m.group(1)), int(m.group(2)), m.group(3)
    print(f"slow write {slow_s} s, grace {grace_s} s: checkpoint safe {safe_after:.1f} s after the signal, "
          f"process gone after {exited:.1f} s")
    assert stopped == 3 and safe_after <= grace_s and exited <= grace_s + 3  # + the interpreter's exit
    last = runtime.list_checkpoints(str(out))[-1]
    assert (kept == last and last.endswith("ckpt_00000002")) if keeps_the_last else (
        kept is None and last.endswith("ckpt_00000003"))
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert run(cfg, out, "--log_interval=2", "--resume")["step"] == 6
    assert loss_rows(out) == loss_rows(uninterrupted)
    a, b = runtime.load_checkpoint(str(uninterrupted)), runtime.load_checkpoint(str(out))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_time_limit_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, cfg, uninterrupted, capsys):
    """One second (in SLURM's form) with the default stop_margin_s of 60: no second step fits, so the run
    stops after step 1 with its checkpoint, exit status 0; continued without a limit it equals the
    uninterrupted run."""
    out = tmp_path / "out"
    s = run(cfg, out, "--log_interval=2", "--time_limit=00:00:01")
    assert s["step"] == 1 and s["preempted"] == "time limit (1 s)" and ckpt_names(out) == ["ckpt_00000001"]
    assert re.search(r"^time limit \(1 s\): stopped after step 1 with a checkpoint; continue with: python train\.py "
                     r".*--resume$", capsys.readouterr().out, re.M)
    assert run(cfg, out, "--log_interval=2", "--resume")["step"] == 6
    assert loss_rows(out) == loss_rows(uninterrupted)


def test_time_limit_keeps_room_for_a_step_and_the_final_checkpoint(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    p = runtime.Preemption(runtime.parse_duration("0:01:40"), margin_s=10)  # 100 s
    try:
        now[0] += 80
        assert p.poll(step_s=5, ckpt_s=None) == 0                     # 20 s left: a 5 s step and 10 s margin fit
        now[0] += 6
        assert p.poll(step_s=5, ckpt_s=None) == runtime.STOP_TIME     # 14 s left
        now[0] -= 16
        assert p.poll(step_s=5, ckpt_s=30) == runtime.STOP_TIME       # 30 s left, but the last write took 30 s
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.poll(step_s=5, ckpt_s=None) == runtime.STOP_SIGNAL and p.signal == "SIGUSR1"
    finally:
        p.restore()
    assert [runtime.parse_duration(v) for v in (90, 0, "", "1-02:03:04")] == [90.0, 0.0, 0.0, 93784.0]
    for bad in ("1:2", "90s", -5):
        with pytest.raises(ValueError, match="a duration"):
            runtime.parse_duration(bad)
    with pytest.raises(ValueError, match="config key 'time_limit': a duration is seconds or"):
        train.validate(train.TrainConfig(time_limit="2h"))


def test_ctrl_c_completes_the_checkpoint_in_flight_and_says_so_in_one_line(tmp_path, cfg, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) during step 3: the checkpoint of step 2, still being written, completes; one
    line (no traceback) names it and the command that resumes, exit status 130 as a shell's."""
    out, real, calls = tmp_path / "out", train.train_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(SystemExit) as e:
        runtime.run_main(train.main, [cfg, *SHORT, f"--out_dir={out}", "--ckpt_interval=1"])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.count("\n") == 1, err
    assert err.startswith(f"interrupted (SIGINT): stopped without a checkpoint of its own; the latest is "
                          f"{out / 'ckpt_00000002'}; continue with: python train.py "), err
    assert ckpt_names(out) == ["ckpt_00000001", "ckpt_00000002"] and runtime.verify_checkpoint(
        str(out / "ckpt_00000002")) is None


# ---------------------------------------------------------------- 10. the tools refuse nonsense in one line

def test_ranks_vote_to_stop_in_host_memory_a_step_late(monkeypatch):
    """Preemption.vote as rank 0 of 2, rank 1 simulated by the all-reduce: every step's vote is an
    asynchronous MAX all-reduce of a host tensor over the vote's own gloo group (no device tensor, nothing
    that waits for a GPU), and each step returns the previous step's outcome: rank 1's signal during step 3
    stops both after step 4. Where the loop settles (it waits for the device there anyway) the step's own
    vote is read at once. No vote stays in flight after a stop or a settled step. The time limit looks two
    steps ahead (the one after the vote runs before its outcome is read). One process creates no group."""
    now, theirs, calls = [1000.0], [], []

    class Work:  # the all-reduce in flight: its outcome, MAX with rank 1's reason, is there once waited for
        def __init__(self, t, other):
            self.t, self.other = t, other

        def wait(self):
            self.t.clamp_(min=self.other)
            return True

    def all_reduce(t, op=None, group=None, async_op=False):
        calls.append((t.device.type, t.dtype.is_floating_point, int(t), op, group, async_op))
        return Work(t, theirs.pop(0))
    group = object()
    monkeypatch.setattr(runtime.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(runtime, "gloo_group", lambda world, timeout_s: group if world > 1 else None)
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    p = runtime.Preemption(time_limit_s=100, margin_s=10)
    try:
        p.join(2, 60)
        theirs[:] = [0, 0, runtime.STOP_SIGNAL, 0]
        assert [p.vote(step_s=1, ckpt_s=None) for _ in range(4)] == [0, 0, 0, runtime.STOP_SIGNAL]
        assert p.pending is None and not theirs
        assert calls == [("cpu", False, 0, runtime.dist.ReduceOp.MAX, group, True)] * 4
        theirs[:] = [0, runtime.STOP_SIGNAL]
        assert p.vote(1, None) == 0 and p.vote(1, None, settle=True) == runtime.STOP_SIGNAL and p.pending is None
        theirs[:] = [0, 0]
        assert p.vote(1, None, settle=True) == 0 and p.pending is None and p.vote(1, None) == 0
        now[0] += 75  # 25 s left: a 5 s step and the 10 s margin fit, so does a second step
        theirs[:] = [0]
        assert p.vote(step_s=5, ckpt_s=None) == 0 and calls[-1][2] == 0
        now[0] += 6  # 19 s left: one more 5 s step would fit, two would not
        theirs[:] = [0, 0]
        assert p.poll(step_s=5, ckpt_s=None) == 0
        assert p.vote(step_s=5, ckpt_s=None) == 0 and calls[-1][2] == runtime.STOP_TIME
        assert p.vote(step_s=5, ckpt_s=None) == runtime.STOP_TIME and p.pending is None  # read a step late
        os.kill(os.getpid(), signal.SIGUSR1)  # this rank's own signal, read a step late too
        theirs[:] = [0, 0]
        assert p.vote(1, None) == 0 and calls[-1][2] == runtime.STOP_SIGNAL
        assert p.vote(1, None) == runtime.STOP_SIGNAL and p.pending is None
    finally:
        p.restore()
    monkeypatch.undo()  # the real gloo_group, with new_group failing the test if called
    monkeypatch.setattr(runtime.dist, "new_group", lambda *a, **k: pytest.fail("one process created a group"))
    monkeypatch.setattr(runtime.dist, "all_reduce", lambda *a, **k: pytest.fail("one process voted"))
    alone = runtime.Preemption()
    try:
        alone.join(1, 60)
        assert alone.group is None and alone.vote(1, None) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert alone.vote(1, None) == runtime.STOP_SIGNAL  # at once: nobody to agree with
    finally:
        alone.restore()


@pytest.mark.parametrize("argv,culprit", [
    (["tools.eval", "RUN", "--text", "README.md", "--seq_len", "0"], "argument --seq_len: must be > 0, got 0"),
    (["tools.eval", "RUN", "--text", "README.md", "--windows", "-3"], "argument --windows: must be > 0, got -3"),
    (["tools.sample", "RUN", "--max_tokens", "0"], "argument --max_tokens: must be > 0, got 0"),
    (["tools.sample", "RUN", "--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    (["tools.sample", "BROKEN_WEIGHTS", "--prompt", "x"], "model.safetensors: not a readable safetensors file"),
    (["tools.eval", "BROKEN_CONFIG", "--text", "README.md"], "config.json: not valid JSON"),
    (["data.py", "info", "BROKEN_MANIFEST"], "manifest.json: not valid JSON"),
    (["tools.plot", "UNDER_A_FILE", "A=METRICS"], "could not write UNDER_A_FILE (File exists: "),
    (["tools.plot", "NEW_PNG", "A=METRICS", "B=NO_ROWS"], "NO_ROWS: nothing to draw (no loss in metrics.jsonl)"),
    (["tools.plot", "NEW_PNG", "A=METRICS", "--from-tokens", "1000"], "at or after --from-tokens 1000"),
])
def test_tools_refuse_nonsense_in_one_line(tmp_path, argv, culprit):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 1, "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 129280,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 64}))
    (tmp_path / "weights" / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{")  # truncated
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest" / "manifest.json").write_text("{bad")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "tokens": 64}) + "\n")
    (tmp_path / "no_rows").mkdir()
    (tmp_path / "no_rows" / "metrics.jsonl").write_text(json.dumps({"step": 0, "event": "start"}) + "\n")
    where = {"RUN": str(tmp_path / "no_run"), "NEW_PNG": str(tmp_path / "new.png"), "NO_ROWS": str(tmp_path / "no_rows"),
             "B=NO_ROWS": f"B={tmp_path / 'no_rows'}", "BROKEN_WEIGHTS": str(tmp_path / "weights"),
             "BROKEN_CONFIG": str(tmp_path / "config"), "BROKEN_MANIFEST": str(tmp_path / "manifest"),
             "UNDER_A_FILE": str(tmp_path / "manifest" / "manifest.json" / "loss.png"),
             "A=METRICS": f"A={tmp_path / 'metrics'}"}
    argv, culprit = [where.get(a, a) for a in argv], culprit.replace("UNDER_A_FILE", where["UNDER_A_FILE"])
    culprit = culprit.replace("NO_ROWS", where["NO_ROWS"])
    cmd = [sys.executable, *(["-m", argv[0]] if argv[0].startswith("tools.") else [argv[0]]), *argv[1:]]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and culprit in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "new.png").exists()


def test_open_files_limit_is_raised_to_the_hard_limit():
    """A memory map per data shard: the trainer raises its soft limit of open files to the hard one first."""
    code = ("import resource, runtime; s, h = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, h), h)); "
            "print(runtime.raise_open_files_limit() == h, resource.getrlimit(resource.RLIMIT_NOFILE)[0] == h)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.split() == ["True", "True"], p.stderr
