"""Tests for tools/eval.py (windows, confidence interval, determinism) and tools/sample.py (greedy = generate,
streaming).

Tiny model (2 layers, hidden 32, vocab 300) with a byte-level BPE tokenizer trained here; all CPU, fp32 (passed
explicitly: the tools' "auto" dtype is bf16 on CPUs with native bf16, and the references here are fp32).
"""
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import mup
import train
from model import ModelConfig
from tools import eval as ev
from tools import export, sample

FP32 = {"device": "cpu", "dtype": "float32"}

CFG = ModelConfig(vocab_size=300, n_layer=2, hidden=32, ffn_hidden=64, n_head=2, n_kv_head=1, max_seq_len=256)
CORPUS = "hello world, the quick brown fox jumps over the lazy dog. naïve café – 数学 "


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, model, tokenizer, tmp dir): a checkpoint as train.py writes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tmp = tmp_path_factory.mktemp("evs")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([CORPUS] * 20, trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp / "tokenizer.json"))
    tok = data.get_tokenizer(str(tmp / "tokenizer.json"))
    torch.manual_seed(0)
    model = mup.build_model(CFG).eval()
    state = {"model": model.state_dict(), "model_config": asdict(CFG), "tokenizer": tok.identity,
             "config": {"tokenizer": str(tmp / "tokenizer.json")}, "tokens": 0, "optim": None, "rng": None}
    train.save_checkpoint(str(tmp / "run"), 3, state, keep=1)
    return str(tmp / "run"), model, tok, tmp


# ---------------------------------------------------------------------------------------------------
# tools/eval.py

def test_windows_start_after_eos_and_are_deterministic():
    eos, T = 0, 9
    toks = np.arange(1, 201) % 50 + 1  # no zeros
    pos = [20, 55, 90, 130, 193, 195]  # the last two leave no room for a whole window after them
    toks[pos] = eos
    starts, aligned = ev.window_starts(toks, eos, T, 4, seed=3)
    assert aligned == 4 and len(set(starts.tolist())) == 4
    assert set(starts.tolist()) <= {0, 21, 56, 91, 131}  # the text start or right after an EOS
    again, _ = ev.window_starts(toks, eos, T, 4, seed=3)
    other, _ = ev.window_starts(toks, eos, T, 4, seed=4)
    assert np.array_equal(starts, again) and not np.array_equal(starts, other)
    starts, aligned = ev.window_starts(toks, eos, T, 8, seed=0)  # only 5 aligned starts exist
    assert aligned == 5 and set(starts[:5].tolist()) == {0, 21, 56, 91, 131}
    assert all(0 <= s <= len(toks) - T - 1 for s in starts.tolist())
    with pytest.raises(ValueError, match="fewer than one window"):
        ev.window_starts(toks[:5], eos, T, 1, 0)


def test_confidence_interval_known_case():
    r = ev.confidence([1.0, 2.0, 3.0, 4.0])  # mean 2.5, sample std sqrt(5/3)
    half = 1.959963984540054 * math.sqrt(5 / 3) / 2
    assert r["loss"] == 2.5 and r["n"] == 4
    assert r["loss_ci"] == pytest.approx([2.5 - half, 2.5 + half], abs=1e-12)
    assert r["ppl"] == pytest.approx(math.exp(2.5)) and r["ppl_ci"] == pytest.approx([math.exp(2.5 - half), math.exp(2.5 + half)])
    with pytest.raises(ValueError):
        ev.confidence([1.0, float("nan")])


def test_eval_equals_plain_cross_entropy_and_is_deterministic(run, tmp_path):
    path, model, tok, _ = run
    text = tmp_path / "t.txt"
    text.write_text((CORPUS + "<|endoftext|>") * 12)
    r = ev.evaluate(path, text=str(text), seq_len=16, windows=7, batch=3, seed=5, **FP32)
    assert r == ev.evaluate(path, text=str(text), seq_len=16, windows=7, batch=3, seed=5, **FP32)
    assert r["aligned"] == 7 and len(r["per_window"]) == 7
    toks = np.asarray(tok.encode(text.read_text()))
    ref = []
    with torch.no_grad():
        for s in r["starts"]:
            assert s == 0 or toks[s - 1] == tok.eos_id
            w = torch.from_numpy(toks[s:s + 17])[None]
            ref.append(torch.nn.functional.cross_entropy(model(w[:, :-1])[0], w[0, 1:]).item())
    assert r["per_window"] == pytest.approx(ref, abs=1e-5)
    assert r["loss"] == pytest.approx(float(np.mean(ref)), abs=1e-5)
    assert ev.evaluate(path, text=str(text), seq_len=16, windows=7, batch=3, seed=6, **FP32)["starts"] != r["starts"]


def test_eval_on_export_and_dataset(run, tmp_path):
    path, _, tok, tmp = run
    text = tmp_path / "t.txt"
    text.write_text((CORPUS + "<|endoftext|>") * 12)
    hf = tmp_path / "hf"
    export.export(path, str(hf))
    a = ev.evaluate(path, text=str(text), seq_len=16, windows=5, batch=5, **FP32)
    b = ev.evaluate(str(hf), text=str(text), seq_len=16, windows=5, batch=5, **FP32)
    assert b["starts"] == a["starts"] and b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    pytest.importorskip("transformers")
    c = ev.evaluate(str(hf), text=str(text), seq_len=16, windows=5, batch=5, backend="transformers", **FP32)
    assert c["loss"] == pytest.approx(a["loss"], abs=1e-4)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": CORPUS * (k + 1)}) + "\n" for k in range(40)))
    ds = data.prepare({"prose": [str(docs)]}, tmp_path / "ds", tokenizer=str(tmp / "tokenizer.json"),
                      heldout_frac=0.5, workers=1)
    d = ev.evaluate(path, dataset=str(ds), seq_len=16, windows=6, batch=4, **FP32)
    assert d["aligned"] == 6 and math.isfinite(d["loss"])


def test_eval_bad_inputs(run, tmp_path):
    path, _, _, tmp = run
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        ev.evaluate(path, text=str(tmp_path / "nope.txt"), seq_len=16, **FP32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.evaluate(str(tmp_path / "missing_ckpt"), text=str(tmp_path / "nope.txt"), **FP32)
    (tmp_path / "t.txt").write_text(CORPUS)
    with pytest.raises(ValueError, match="max"):
        ev.evaluate(path, text=str(tmp_path / "t.txt"), seq_len=4096, **FP32)
    with pytest.raises(ValueError, match="exactly one"):
        ev.evaluate(path, seq_len=16, **FP32)
    with pytest.raises(ValueError, match="deepseek-v3"):  # a dataset from another tokenizer
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "x.txt").write_text(CORPUS * 10)
        ds = data.prepare({"x": [str(tmp_path / "d")]}, tmp_path / "ds", heldout_frac=0.5, workers=1)
        ev.evaluate(path, dataset=str(ds), seq_len=16, **FP32)
    hf = tmp_path / "hf"
    export.export(path, str(hf))
    os.remove(hf / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        ev.evaluate(str(hf), text=str(tmp_path / "t.txt"), seq_len=16, **FP32)


# ---------------------------------------------------------------------------------------------------
# tools/sample.py

def test_greedy_stream_equals_generate(run):
    path, model, tok, _ = run
    loaded, tok2, _ = export.load_any(path)
    ids = sample.prompt_ids(tok2, "the quick", chat=False)
    assert ids[0] == tok.eos_id and ids[1:] == tok.encode("the quick")
    out = io.StringIO()
    new = sample.stream(loaded, tok2, ids, 30, temperature=0, out=out)
    ref = model.generate(torch.tensor([ids]), 30, temperature=0, eos_id=tok.eos_id)[0, len(ids):].tolist()
    assert new == [t for t in ref if t != tok.eos_id][:len(new)] and len(new) + (tok.eos_id in ref) <= 30
    assert out.getvalue() == tok.decode(new)


def test_sampling_is_seeded(run):
    path, _, _, _ = run
    model, tok, _ = export.load_any(path)
    ids = sample.prompt_ids(tok, "hello", chat=False)
    a = sample.stream(model, tok, ids, 20, temperature=1.0, top_k=50, seed=1)
    assert a == sample.stream(model, tok, ids, 20, temperature=1.0, top_k=50, seed=1)
    assert a != sample.stream(model, tok, ids, 20, temperature=1.0, top_k=50, seed=2)


def test_stream_decoder_holds_back_partial_characters(run):
    _, _, tok, _ = run
    text = "naïve café – 数学 quick"
    ids = tok.encode(text)
    assert any(tok.decode(ids[:k]).endswith("\ufffd") for k in range(len(ids)))  # characters split across tokens
    dec, pieces = sample.StreamDecoder(tok), []
    for t in ids:
        pieces.append(dec.push(t))
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_prompt_and_cli(run, capsys):
    path, model, tok, _ = run
    ids = sample.prompt_ids(tok, "hi", chat=True)
    assert tok.decode(ids[1:]) == data.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    sample.main([path, "--prompt", "the", "--max_tokens", "12", "--temperature", "0", "--device", "cpu",
                 "--dtype", "float32"])
    printed = capsys.readouterr().out
    ref = sample.stream(model, tok, sample.prompt_ids(tok, "the", False), 12, temperature=0)
    assert printed == "the" + tok.decode(ref) + "\n"
    with pytest.raises(ValueError, match="max_seq_len"):
        sample.stream(model, tok, [1, 2], 1000, temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        sample.stream(model, tok, [1, 2], 5, temperature=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample.main([path + "_missing", "--prompt", "x"])


def test_eval_cli_runs_as_a_module(run, tmp_path):
    """`python -m tools.eval ... --json` from the repository root prints exactly evaluate()'s result on stdout
    (the device/dtype choice goes to stderr)."""
    path, _, _, _ = run
    text = tmp_path / "t.txt"
    text.write_text((CORPUS + "<|endoftext|>") * 12)
    args = ["--text", str(text), "--seq_len", "16", "--windows", "4", "--batch", "2", "--device", "cpu",
            "--dtype", "float32"]
    p = subprocess.run([sys.executable, "-m", "tools.eval", path, *args, "--json"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    got, want = json.loads(p.stdout), ev.evaluate(path, text=str(text), seq_len=16, windows=4, batch=2, **FP32)
    assert got.keys() == want.keys() and got["starts"] == want["starts"] and got["dtype"] == "float32"
    assert got["per_window"] == pytest.approx(want["per_window"], abs=1e-6)  # another process, same CPU
    assert "dtype float32" in p.stderr
