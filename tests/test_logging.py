"""Where the numbers go: TensorBoard event files read back, Weights & Biases calls, the run report."""
import json
import os
import sys
import types

import pytest

import runtime
import train
from conftest import write_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: a tiny model trains faster on one thread


def rows(out):
    return runtime.read_metrics(os.path.join(out, "metrics.jsonl"))


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path, tiny_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "run")
    train.train([write_config(tmp_path / "c.py", tiny_data, out_dir=out, log_to=["jsonl", "tensorboard"])])
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    want = [(r["step"], r["loss"]) for r in rows(out) if "loss" in r]
    assert [s for s, _ in loss] == [s for s, _ in want]
    assert [v for _, v in loss] == pytest.approx([v for _, v in want], rel=1e-6)  # TB stores float32
    ev = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    assert ev == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in rows(out) if "eval_loss" in r]
    switch = [r for r in rows(out) if r.get("event")]
    assert [e.step for e in acc.Scalars("event/optimizer_switch")] == [r["step"] for r in switch] == [5]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(acc.Tags()["scalars"])


def test_wandb_is_called_with_the_rows_and_resumes_its_run(tmp_path, tiny_data, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, scalars, step):
            calls["log"].append((step, scalars))

        def finish(self):
            calls["finish"] += 1
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = str(tmp_path / "my run")
    train.train([write_config(tmp_path / "c.py", tiny_data, out_dir=out, log_to=["wandb"], max_steps=4, fp8=True)])
    assert calls["init"][0]["id"] == "my-run" and calls["init"][0]["resume"] == "allow"
    assert calls["init"][0]["project"] == "xmodel25" and calls["finish"] == 1
    logged = [(s, v["train/loss"]) for s, v in calls["log"] if "train/loss" in v]
    assert logged == [(r["step"], r["loss"]) for r in rows(out) if "loss" in r]
    # a field of several numbers (FP8's range use) as one scalar each
    fp8 = [(s, {k[len("train/fp8_range/"):]: x for k, x in v.items() if k.startswith("train/fp8_range/")})
           for s, v in calls["log"] if "train/loss" in v]
    assert fp8 == [(r["step"], r["fp8_range"]) for r in rows(out) if "loss" in r] and fp8[0][1].keys() == {"x", "w", "dy"}


def test_a_missing_logging_package_is_an_error_before_step_1(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="config key 'log_to': wandb needs the wandb package"):
        train.train([write_config(tmp_path / "c.py", tiny_data, out_dir=str(out), log_to=["wandb"])])
    assert not [r for r in rows(str(out)) if "loss" in r] and not runtime.list_checkpoints(str(out))
    with pytest.raises(ValueError, match="config key 'log_to'"):
        train.load_config([write_config(tmp_path / "d.py", tiny_data, log_to=["csv"])])


def test_report_at_the_end_of_a_run_and_on_demand(tmp_path, tiny_data):
    out = str(tmp_path / "run")
    s = train.train([write_config(tmp_path / "c.py", tiny_data, out_dir=out)])
    text = open(os.path.join(out, "report.md")).read()
    steps = [r for r in rows(out) if "loss" in r]
    assert f"Final held-out loss: {s['evals'][-1][1]:.4f}" in text
    assert f"{steps[-1]['tokens']:,} of {steps[-1]['tokens']:,} tokens (100%)" in text
    for p in ("warmup", "stable", "decay", "long"):  # one row per phase, with its last logged loss
        last = [r for r in steps if r["phase"] == p][-1]
        assert f"| {p} | " in text and f"| {last['loss']:.4f} |" in text
    assert "## Sample" in text and s["sample"].strip() in text and "![loss](loss.png)" in text
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["machine"]["world_size"] == 1 and conf["machine"]["device"] == "cpu"
    os.remove(os.path.join(out, "report.md"))
    json.dump({"accuracy": 0.25}, open(os.path.join(out, "probe.json"), "w"))
    import subprocess
    p = subprocess.run([sys.executable, "-m", "tools.report", out], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0 and p.stdout.strip() == os.path.join(out, "report.md")
    assert "## Downstream probe" in open(os.path.join(out, "report.md")).read()
    p = subprocess.run([sys.executable, "-m", "tools.report", str(tmp_path)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 1 and "no config.json (not a run directory)" in p.stderr
