"""Shared fixtures: a small real dataset (two sources from the standard library) and a tiny run config."""
import sysconfig
from pathlib import Path

import pytest
import torch

import data
from tools.proxy import small_bpe

# The trainer tests are about the trainer, not the tokenizer: a 512-id byte-level BPE of the same text keeps
# the task (next-token prediction on code and prose) while the model stops being 99% embedding (DeepSeek's
# 129,280 x 32 rows: 50 MB checkpoints of a 2 x 32 model). The DeepSeek-V3 tokenizer keeps its own tests
# (test_data.py, test_export.py) and the first command (test_first_command.py) trains with it.
TINY_VOCAB = 512


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): their
    tensors are tiny, so more threads only add OpenMP barriers, which cost seconds per step on a busy 2-core
    machine (a tiny training run: 15 s with 2 threads, 5 s with 1); and runs compared bit for bit sum in the
    same order as a subprocess with OMP_NUM_THREADS=1. Restored afterwards for the other modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared dataset with sources "code" (stdlib .py files) and "prose" (pydoc topics), tokenized with a
    512-id BPE trained on the same text (its manifest names the tokenizer: write_config reads it)."""
    root = tmp_path_factory.mktemp("tiny_data")
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = sorted(p for p in lib.glob("*.py") if 8_000 < p.stat().st_size < 30_000)[:24]
    from pydoc_data.topics import topics
    prose_dir = root / "prose"
    prose_dir.mkdir()
    for i, (name, text) in enumerate(sorted(topics.items())[:60]):
        (prose_dir / f"{i:03d}.txt").write_text(text)
    texts = [p.read_text() for p in code] + [p.read_text() for p in sorted(prose_dir.iterdir())]
    tok = small_bpe(TINY_VOCAB, cache_dir=root, texts=texts)
    return data.prepare({"code": [str(p) for p in code], "prose": str(prose_dir)}, root / "ds", tokenizer=tok,
                        heldout_frac=0.25, workers=1, progress=False)


def write_config(path, data_dir, **overrides) -> str:
    """A tiny model (2 x 32) and a 4-phase curriculum with a sequence stretch and the Muon switch. A prepared
    `data_dir` (tiny_data) also sets the run's tokenizer and vocabulary to the dataset's."""
    cfg = dict(
        n_layer=2, hidden=32, ffn_hidden=80, n_head=2, n_kv_head=1, base_width=16, loss_chunk=64,
        lr=0.05, emb_lr=0.05, device="cpu", dtype="float32", micro_batch=2, log_interval=1, eval_interval=0, eval_windows=4,
        eval_batch=2, sample_tokens=4, data={"code": str(data_dir), "prose": str(data_dir)},
        mixtures={"stable": {"code": 0.5, "prose": 0.5}, "decay": {"code": 0.3, "prose": 0.7}},
        phases=[
            dict(name="warmup", steps=2, lr=("linear", 0.0, 1.0), batch=4, seq_len=32, mix="stable", optimizer="adamw"),
            dict(name="stable", steps=3, lr=("constant", 1.0, 1.0), batch=4, seq_len=32, mix="stable", optimizer="adamw"),
            dict(name="decay", steps=3, lr=("exp", 1.0, 1 / 16), batch=4, seq_len=32, mix="decay", optimizer="muon"),
            dict(name="long", steps=2, lr=("linear", 1 / 16, 0.01), batch=2, seq_len=64, mix="decay", optimizer="muon"),
        ],
    )
    if data_dir is not None and (Path(data_dir) / "manifest.json").is_file():
        tok = data.read_manifest(data_dir)["tokenizer"]
        cfg.update(tokenizer=tok["spec"], vocab_size=tok["n_vocab"])
    cfg.update(overrides)
    with open(path, "w") as f:
        f.writelines(f"{k} = {v!r}\n" for k, v in cfg.items())
    return str(path)
