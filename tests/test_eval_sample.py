"""Tests for tools/eval.py (windows, confidence interval, determinism) and tools/sample.py (greedy = generate,
streaming).

Tiny model (2 layers, hidden 32, vocab 300) with a byte-level BPE tokenizer trained here (EOS <|endoftext|> = 0,
BOS <s> = 290, so documents and prompts open with BOS as with DeepSeek-V3's); all CPU, fp32 (passed
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
import runtime
from model import ModelConfig
from tools import eval as ev
from tools import export, sample

FP32 = {"device": "cpu", "dtype": "float32"}

# init_out="mup": the depth init leaves a random 2-layer model nearly deterministic (the x12 embedding
# dominates the residual stream), and the sampling tests need a spread-out distribution
CFG = ModelConfig(vocab_size=300, n_layer=2, hidden=32, ffn_hidden=64, n_head=2, n_kv_head=1, max_seq_len=256,
                  init_out="mup")
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
    tk.add_special_tokens(["<s>"])
    tk.save(str(tmp / "tokenizer.json"))
    tok = data.get_tokenizer(str(tmp / "tokenizer.json"))
    assert (tok.eos_id, tok.bos_id) == (0, 290)
    torch.manual_seed(0)
    model = mup.build_model(CFG).eval()
    state = {"model": model.state_dict(), "model_config": asdict(CFG), "tokenizer": tok.identity,
             "config": {"tokenizer": str(tmp / "tokenizer.json")}, "tokens": 0, "optim": None, "rng": None}
    runtime.save_checkpoint(str(tmp / "run"), 3, state, keep=1)
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
    bos = 51  # with BOS, documents start at their BOS (as prepared data has them), not after an EOS
    toks[[0, 30, 100, 150, 192]] = bos
    starts, aligned = ev.window_starts(toks, eos, T, 6, seed=1, bos_id=bos)
    assert aligned == 4 and set(starts[:4].tolist()) == {0, 30, 100, 150}


def test_confidence_interval_known_case():
    r = ev.confidence([1.0, 2.0, 3.0, 4.0])  # mean 2.5, sample std sqrt(5/3)
    half = 1.959963984540054 * math.sqrt(5 / 3) / 2
    assert r["loss"] == 2.5 and r["n"] == 4
    assert r["loss_ci"] == pytest.approx([2.5 - half, 2.5 + half], abs=1e-12)
    assert r["ppl"] == pytest.approx(math.exp(2.5)) and r["ppl_ci"] == pytest.approx([math.exp(2.5 - half), math.exp(2.5 + half)])
    with pytest.raises(ValueError):
        ev.confidence([1.0, float("nan")])
    one = ev.confidence([2.0])  # one window: no interval exists (null in JSON, not NaN)
    assert one["loss"] == 2.0 and one["loss_ci"] is one["ppl_ci"] is one["ci_half_width"] is None


def test_eval_json_is_strict(run, tmp_path, capsys):
    path, _, _, _ = run
    (tmp_path / "t.txt").write_text((CORPUS + "<|endoftext|>") * 12)
    args = [path, "--text", str(tmp_path / "t.txt"), "--seq_len", "16", "--batch", "1", "--device", "cpu",
            "--dtype", "float32"]

    def strict(s):  # json.loads accepts NaN and Infinity unless told otherwise
        return json.loads(s, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))

    for windows in ("1", "3"):
        ev.main(args + ["--windows", windows, "--json"])
        r = strict(capsys.readouterr().out)
        assert r["n"] == int(windows) and math.isfinite(r["loss"]) and (r["loss_ci"] is None) == (windows == "1")
    ev.main(args + ["--windows", "1"])
    assert "95% CI n/a (one window)" in capsys.readouterr().out


def test_eval_equals_plain_cross_entropy_and_is_deterministic(run, tmp_path):
    path, model, tok, _ = run
    text = tmp_path / "t.txt"
    text.write_text((CORPUS + "<|endoftext|>") * 12)
    r = ev.evaluate(path, text=str(text), seq_len=16, windows=7, batch=3, seed=5, **FP32)
    assert r == ev.evaluate(path, text=str(text), seq_len=16, windows=7, batch=3, seed=5, **FP32)
    assert r["aligned"] == 7 and len(r["per_window"]) == 7
    toks = np.asarray(([tok.bos_id] + tok.encode(CORPUS) + [tok.eos_id]) * 12)  # laid out as prepared documents
    assert np.array_equal(ev.text_tokens(str(text), tok), toks)
    ref = []
    with torch.no_grad():
        for s in r["starts"]:
            assert toks[s] == tok.bos_id
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
    with pytest.raises(ValueError, match="is a directory, not a text file"):
        ev.evaluate(path, text=str(tmp_path), seq_len=16, **FP32)
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
    assert ids == [tok.bos_id] + tok.encode("the quick") and tok2.bos_id == tok.bos_id == 290
    assert sample.prompt_ids(tok2, "the quick", chat=False, bos=False) == tok.encode("the quick")
    out = io.StringIO()
    new = sample.stream(loaded, tok2, ids, 30, temperature=0, out=out)
    ref = model.generate(torch.tensor([ids]), 30, temperature=0, eos_id=tok.eos_id)[0, len(ids):].tolist()
    want = ref[:ref.index(tok.eos_id)] if tok.eos_id in ref else ref  # everything up to the EOS that stops it
    assert len(want) > 0 and new == want  # an empty or cut-short stream fails
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
    assert ids[0] == tok.bos_id
    assert tok.decode(ids[1:]) == data.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    sample.main([path, "--prompt", "the", "--max_tokens", "12", "--temperature", "0", "--device", "cpu",
                 "--dtype", "float32"])
    printed = capsys.readouterr().out
    ref = sample.stream(model, tok, sample.prompt_ids(tok, "the", False), 12, temperature=0)
    assert printed == "the" + tok.decode(ref) + "\n"
    sample.main([path, "--prompt", "the", "--max_tokens", "12", "--temperature", "0", "--no_bos", "--device", "cpu",
                 "--dtype", "float32"])
    ref = sample.stream(model, tok, tok.encode("the"), 12, temperature=0)
    assert capsys.readouterr().out == "the" + tok.decode(ref) + "\n"
    with pytest.raises(ValueError, match="--no_bos"):
        sample.prompt_ids(tok, "", chat=False, bos=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        sample.stream(model, tok, [1, 2], 1000, temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        sample.stream(model, tok, [1, 2], 5, temperature=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample.main([path + "_missing", "--prompt", "x"])



def test_sample_refuses_bad_values_before_printing(run, capsys):
    """A sampling value out of range (nan included) stops at argument parsing, and a prompt the model cannot
    run (an id beyond its vocabulary: another tokenizer; too long for max_seq_len) stops in one line naming
    it, before the prompt is echoed, not with a traceback from the embedding lookup or the sampler."""
    path, model, tok, tmp = run
    base = [path, "--prompt", "the", "--max_tokens", "4", "--device", "cpu", "--dtype", "float32"]
    for flag, value in (("--top_p", "0"), ("--top_p", "1.5"), ("--top_p", "nan"), ("--repetition_penalty", "nan"),
                        ("--repetition_penalty", "inf"), ("--repetition_penalty", "0")):
        with pytest.raises(SystemExit):
            sample.main([*base, flag, value])
        assert flag in capsys.readouterr().err
    with pytest.raises(ValueError, match="repetition_penalty"):
        sample.stream(model, tok, [1, 2], 5, repetition_penalty=float("nan"))
    big = "the quick 数学 " * 3
    wide = tmp / "wide.json"  # a tokenizer with ids beyond the model's 300
    from tokenizers import Tokenizer, models, pre_tokenizers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.add_tokens([f"word{i}" for i in range(400)] + ["数学"])
    tk.add_special_tokens(["<|endoftext|>"])
    tk.save(str(wide))
    tok_wide = data.get_tokenizer(str(wide))
    assert max(tok_wide.encode(big)) >= CFG.vocab_size
    with pytest.raises(ValueError, match="vocab_size 300"):
        sample.stream(model, tok_wide, tok_wide.encode(big), 4)
    with pytest.raises(ValueError, match="--max_tokens 300 exceed the model's max_seq_len 256"):
        sample.main([*base[:3], "--max_tokens", "300"])
    assert capsys.readouterr().out == ""  # the prompt was not echoed

def test_top_p_keeps_the_nucleus_of_a_hand_built_distribution(run):
    from model import Xmodel
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    for top_p, kept in ((0.2, {1}), (0.7, {1, 3}), (0.85, {0, 1, 3}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})):
        got = Xmodel.sample_next(logits, temperature=1.0, top_p=top_p, generator=g)
        assert set(got.tolist()) == kept, top_p
    # the kept tokens keep their relative odds: 0.5 : 0.3 renormalized to 0.625 : 0.375
    got = Xmodel.sample_next(probs.log().expand(40000, 4), temperature=1.0, top_p=0.7, generator=g)
    assert abs((got == 1).float().mean().item() - 0.625) < 0.01
    # a tiny top_p leaves the most likely token only: sampling is then greedy decoding
    path, _, _, _ = run
    model, tok, _ = export.load_any(path)
    ids = sample.prompt_ids(tok, "the quick", chat=False)
    greedy = sample.stream(model, tok, ids, 20, temperature=0)
    assert sample.stream(model, tok, ids, 20, temperature=1.5, top_p=1e-6, seed=3) == greedy
    assert sample.stream(model, tok, ids, 20, temperature=1.5, seed=3) != greedy  # so the line above can fail


def test_repetition_penalty_by_hand():
    from model import Xmodel
    pick = lambda logits, ctx, pen: Xmodel.sample_next(torch.tensor([logits]), torch.tensor([ctx]),  # noqa: E731
                                                       temperature=0, repetition_penalty=pen).item()
    # positive logits of seen tokens are divided: 3 / 1.49 = 2.013 > 2 keeps token 0, 3 / 1.51 = 1.987 < 2 does not
    assert pick([3.0, 2.0, -1.0], [0], 1.0) == 0 and pick([3.0, 2.0, -1.0], [0], 1.49) == 0
    assert pick([3.0, 2.0, -1.0], [0], 1.51) == 1
    assert pick([3.0, 2.0, -1.0], [0, 0, 0, 2], 1.49) == 0  # once per token, however often it was seen
    assert pick([3.0, 2.0, -1.0], [1], 1.51) == 0  # only seen tokens are penalized
    # negative logits are multiplied: -1 * 1.49 = -1.49 > -1.5 keeps token 0, -1 * 1.51 = -1.51 does not
    assert pick([-1.0, -1.5, -3.0], [0], 1.49) == 0 and pick([-1.0, -1.5, -3.0], [0], 1.51) == 1
    # sampled: the probabilities are softmax of the penalized logits [1, 2, -1] (hand-computed)
    g = torch.Generator().manual_seed(0)
    got = Xmodel.sample_next(torch.tensor([[3.0, 2.0, -1.0]]).expand(40000, 3), torch.zeros(40000, 1).long(),
                             temperature=1.0, repetition_penalty=3.0, generator=g)
    want = math.exp(2) / (math.exp(1) + math.exp(2) + math.exp(-1))
    assert abs((got == 1).float().mean().item() - want) < 0.01


def greedy_reply(model, tok, ids, n):
    """The independent reference: greedy decoding of the whole context from scratch (no cache kept)."""
    out = model.generate(torch.tensor([ids]), n, temperature=0, eos_id=tok.eos_id)[0, len(ids):].tolist()
    return [t for t in out if t != tok.eos_id], tok.eos_id in out


def test_chat_loop_keeps_the_conversation_in_the_cache(run):
    path, model, tok, _ = run
    turns = ["hello world", "the quick brown fox"]
    p = subprocess.run([sys.executable, "-m", "tools.sample", path, "--chat", "--temperature", "0", "--max_tokens",
                        "9", "--device", "cpu", "--dtype", "float32"], input="\n".join(turns) + "\n",
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    ctx, replies, lengths = [], [], []
    for k, turn in enumerate(turns):
        ctx += sample.prompt_ids(tok, turn, chat=True, bos=k == 0)
        reply, stopped = greedy_reply(model, tok, ctx, 9)
        replies.append(reply)
        lengths.append(len(ctx) + len(reply) - (not stopped))  # the last token drawn is not run yet
        ctx += reply + [tok.eos_id]
    want = "".join(tok.decode(r) + "\n" for r in replies)
    assert p.stdout == want.replace("\r\n", "\n").replace("\r", "\n")  # text mode reads \r as a newline
    assert [int(line.split()[0][1:]) for line in p.stderr.splitlines() if "KV cache" in line] == lengths
    assert lengths[1] > lengths[0] > 0
    # in process: every token of the conversation runs through the model exactly once (nothing re-encoded)
    fed, real = [], model.hidden_states
    model.hidden_states = lambda idx, pos=0, caches=None: fed.append(idx.shape[1]) or real(idx, pos, caches)
    try:
        out, err = io.StringIO(), io.StringIO()
        sample.chat(model, tok, 9, io.StringIO("\n".join(turns) + "\n"), out, err, temperature=0)
    finally:
        del model.hidden_states
    assert out.getvalue() == want and sum(fed) == lengths[1]


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
