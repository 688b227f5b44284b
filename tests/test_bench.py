"""bench.py end to end on a tiny config: the --json contract and the optimizers it times."""
import json
import subprocess
import sys

import pytest

from conftest import write_config


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bench_json_last_line(tmp_path, optimizer):
    cfg = write_config(tmp_path / "c.py", tmp_path)  # bench uses random tokens: the data dir is never read
    out = subprocess.run([sys.executable, "bench.py", cfg, "--steps", "2", "--warmup", "1", "--batch_size", "2",
                          "--seq_len", "16", "--optimizer", optimizer, "--json"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    for k in ("tokens_per_s", "peak_mem_mb", "step_ms", "flops_per_token"):
        assert r[k] > 0, k
    assert r["optimizer"] == optimizer and r["batch_size"] * r["seq_len"] == 32
    assert r["step_ms"] == pytest.approx(32 / r["tokens_per_s"] * 1e3)
    assert r["fwd_ms"] + r["bwd_ms"] + r["opt_ms"] == pytest.approx(r["step_ms"], rel=0.5)


def test_bench_bad_config(tmp_path):
    p = subprocess.run([sys.executable, "bench.py", str(tmp_path / "none.py")], capture_output=True, text=True)
    assert p.returncode != 0 and "config file not found" in p.stderr
