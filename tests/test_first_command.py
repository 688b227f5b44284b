"""The first command keeps its promises: `python train.py configs/proxy20m.py`, here with tiny
overrides, prints the machine, the model and the plan first, and ends with the numbers, the paths of what it
wrote (which exist) and the commands to run next; without matplotlib it says the plot was skipped."""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--hidden=32", "--ffn_hidden=64", "--n_head=1", "--n_kv_head=1", "--base_width=16",
        "--max_steps=3", "--micro_batch=2", "--eval_windows=2", "--eval_batch=2", "--log_interval=1",
        "--dtype=float32", "--device=cpu", "--phase.warmup.batch=2", "--phase.warmup.seq_len=32"]


def run_proxy(tmp_path, extra_env=None, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [(extra_env or {}).get("PYTHONPATH"), ROOT])))
    env.update({k: v for k, v in (extra_env or {}).items() if k != "PYTHONPATH"})
    p = subprocess.run([sys.executable, "train.py", "configs/proxy20m.py", f"--out_dir={tmp_path / 'run'}", *TINY, *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def closing_paths(out: str) -> dict:
    return dict(re.findall(r"^  (checkpoint|metrics|loss curve|config)\s+(\S.*)$", out, re.M))


def test_first_lines_then_closing_lines_name_real_files(tmp_path):
    out = run_proxy(tmp_path)
    lines = out.splitlines()
    assert lines[0] == "device cpu (as configured)" and lines[1] == "dtype float32 (as configured)"
    head = "\n".join(lines[:15])
    assert "config: " in head and "model: " in head and "plan: 3 steps to run" in head
    assert '"train"' not in out  # the config is written to config.json, not dumped (only with --verbose)
    paths = closing_paths(out)
    assert set(paths) == {"checkpoint", "metrics", "loss curve", "config"}
    for what, path in paths.items():
        assert os.path.isfile(path) or what == "checkpoint" and os.path.isdir(path), (what, path)
    assert paths["loss curve"].endswith("loss.png") and os.path.getsize(paths["loss curve"]) > 1000
    assert paths["checkpoint"].endswith("ckpt_00000003")
    assert re.search(r"^done: 3 steps in [\d.]+ min", out, re.M) and "final held-out loss" in out
    for cmd in ("python -m tools.sample", "python -m tools.export", "python -m tools.eval"):
        assert cmd in out
    # the evaluation it suggests runs as printed (here on 1 problem per family)
    evals = re.findall(r"^  python (-m tools\.eval .*)$", out, re.M)
    assert len(evals) == 1, out
    p = subprocess.run([sys.executable, *shlex.split(evals[0]), "--per_family=1", "--device=cpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "overall" in p.stdout, p.stderr[-3000:]
    assert "note: matplotlib" not in out


def test_without_matplotlib_the_run_says_the_plot_was_skipped(tmp_path):
    blocker = tmp_path / "no_matplotlib"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib blocked for this test')\n")
    out = run_proxy(tmp_path, {"PYTHONPATH": str(blocker)}, "--verbose")
    assert "note: matplotlib is not installed: no loss.png will be drawn (pip install matplotlib)" in out
    assert "loss curve  not drawn: matplotlib is not installed" in out
    assert not (tmp_path / "run" / "loss.png").exists()
    assert os.path.isdir(closing_paths(out)["checkpoint"])
    assert '"train": {' in out  # --verbose: the whole config as well
