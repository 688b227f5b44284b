"""The embedded SFT source (data.sft_problems), its probe (tools.eval --task sft), the same test set as an
lm-evaluation-harness task, and the AdamW-vs-Muon experiment (tools.muon_sft) end to end at a tiny size.

Answers are checked against independent references (Python's own evaluation of the expression or the
program, the list operations on the parsed numbers); the tiny runs use a 300-id byte-level BPE so that the
output layer, which dominates the real vocabulary's cost, stays small.
"""
import contextlib
import io
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import data
import mup
import runtime
from model import ModelConfig
from tools import eval as ev
from tools import muon_sft, sample

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "docs" / "lm_eval" / "xmodel_sft"


@pytest.fixture(scope="module")
def tok():
    return data.get_tokenizer()


# ---------------------------------------------------------------------------------------------------
# the generator

def reference_answer(family: str, q: str) -> str:
    """What the question asks, computed from its text alone."""
    if family == "arith":
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", q).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if family == "word":
        n = int(re.search(r"has (\d+) ", q).group(1))
        for verb, k in re.findall(r"(gives away|gets) (\d+)", q):
            n += int(k) if verb == "gets" else -int(k)
        return str(n)
    if family == "code":
        head, program = q.split("\n", 1)
        assert head == "What does this Python code print?"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(program, {})
        return out.getvalue().strip()
    xs = [int(t) for t in q.rstrip("?").split(": ")[1].split()]
    if q.startswith("Sort"):
        return " ".join(map(str, sorted(xs)))
    if q.startswith("What is the largest"):
        return str(max(xs))
    return str(xs.count(int(re.match(r"How many times does (\d) appear", q).group(1))))


def test_answers_match_independent_references_at_every_level():
    problems = data.sft_problems("train", 300, seed=5) + data.sft_problems("test", 100, seed=5)
    for p in problems:
        assert p["answer"] == reference_answer(p["family"], p["question"]), p
    seen = {(p["family"], p["level"]) for p in problems}
    assert seen == {(f, v) for f in data.SFT_FAMILIES for v in range(data.SFT_LEVELS)}
    assert {p["question"].split()[0] for p in problems if p["family"] == "list"} == {"Sort", "What", "How"}
    assert any(p["answer"].startswith("-") for p in problems if p["family"] == "code")  # x goes below zero too


def test_problems_are_deterministic_and_train_and_test_disjoint():
    test = data.sft_problems("test", 250, seed=ev.SFT_TEST_SEED)
    assert test == data.sft_problems("test", 250, seed=ev.SFT_TEST_SEED)
    assert data.sft_problems("test", 40, seed=ev.SFT_TEST_SEED) == [p for k, p in enumerate(test) if k % 250 < 40]
    assert [p["family"] for p in test] == [f for f in data.SFT_FAMILIES for _ in range(250)]
    assert len({p["question"] for p in test}) == len(test)  # distinct
    train_q = {p["question"] for seed in (0, 1, 2) for p in data.sft_problems("train", 3000, seed)}
    assert not train_q & {p["question"] for p in test}
    # by construction: a question's side is its hash, whatever the seed or the count
    assert all(data._is_heldout("sft:" + q, data.SFT_TEST_FRAC) for q in {p["question"] for p in test})
    assert not any(data._is_heldout("sft:" + q, data.SFT_TEST_FRAC) for q in train_q)
    # easy levels are small spaces: training repeats them, the test set keeps each question once
    easy = [p["question"] for p in data.sft_problems("train", 3000) if p["family"] == "arith" and p["level"] == 0]
    assert len(set(easy)) < 200 < len(easy)  # 1-digit sums and differences: 155 questions, ~80% of them train
    with pytest.raises(ValueError, match="split"):
        data.sft_problems("dev", 1)
    with pytest.raises(ValueError, match="family"):
        data.sft_problem("poetry", 0, __import__("random").Random(0))


def test_chat_rendering_of_a_problem():
    p = {"question": "What is 2 + 3?", "answer": "5"}
    assert data.render_chat(data.sft_chat(p)) == f"{data.USER}What is 2 + 3?{data.ASSISTANT}5{data.EOS_TEXT}"


# ---------------------------------------------------------------------------------------------------
# the probe

def wilson_by_bisection(k: int, n: int, z: float) -> list[float]:
    """The two p with |k/n - p| = z sqrt(p (1 - p) / n): the definition of the Wilson interval, solved numerically."""
    f = lambda p: (k / n - p) ** 2 - z * z * p * (1 - p) / n  # noqa: E731

    def root(lo, hi):  # f changes sign on [lo, hi]
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (f(lo) > 0) == (f(mid) > 0) else (lo, mid)
        return (lo + hi) / 2

    p = k / n
    return [0.0 if k == 0 else root(0.0, p), 1.0 if k == n else root(p, 1.0)]


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (137, 250), (1, 1000)])
def test_wilson_interval(k, n):
    lo, hi = ev.wilson(k, n)
    ref = wilson_by_bisection(k, n, ev.Z95)
    assert abs(lo - ref[0]) < 1e-12 and abs(hi - ref[1]) < 1e-12
    assert ev.wilson(5, 5)[1] == 1.0 and ev.wilson(0, 5)[0] == 0.0


class Scripted(torch.nn.Module):
    """A stand-in model whose greedy continuation of row b is script[b], then EOS forever."""

    def __init__(self, scripts, eos):
        super().__init__()
        self.scripts, self.eos = scripts, eos

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, **kw):
        assert temperature == 0
        rows = [self.scripts[int(r[0])] for r in idx]  # the prompt's first id says which script
        for t in range(max_new_tokens):
            yield torch.tensor([s[t] if t < len(s) else self.eos for s in rows])


def test_greedy_replies_stop_at_the_end_of_the_turn(tok):
    a, b = tok.encode(" 42 "), tok.encode("7" + data.USER + "8")
    model = Scripted({0: a, 1: b, 2: tok.encode("123456789") * 5}, tok.eos_id)
    prompts = [[0, 5], [1, 5], [2, 5, 5]]
    assert ev.greedy_replies(model, tok, prompts, max_tokens=6) == [" 42 ", "7", tok.decode(model.scripts[2][:6])]


# ---------------------------------------------------------------------------------------------------
# tiny runs with a small tokenizer

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(dir, tokenizer path, {source: dataset}): a 300-id BPE and code/prose/sft datasets tokenized with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from pydoc_data.topics import topics
    tmp = tmp_path_factory.mktemp("sft")
    chats = [data.render_chat(data.sft_chat(p)) for p in data.sft_problems("train", 60)]
    prose = [t for _, t in sorted(topics.items())[:40]]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(chats + prose, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp / "tokenizer.json"))
    (tmp / "prose").mkdir()
    for i, t in enumerate(prose):
        (tmp / "prose" / f"{i:02d}.txt").write_text(t)
    with open(tmp / "sft.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": data.sft_chat(p)}) + "\n" for p in data.sft_problems("train", 60))
    code = sorted(Path(json.__file__).parent.glob("*.py"))
    kw = dict(tokenizer=str(tmp / "tokenizer.json"), heldout_frac=0.25, workers=1, progress=False)
    sets = {"code": data.prepare({"code": [str(p) for p in code]}, tmp / "code", **kw),
            "prose": data.prepare({"prose": str(tmp / "prose")}, tmp / "prose_ds", **kw),
            "sft": data.prepare({"sft": str(tmp / "sft.jsonl")}, tmp / "sft_ds", **kw)}
    return tmp, str(tmp / "tokenizer.json"), sets


def test_batched_greedy_equals_one_at_a_time(small):
    """Prompts of one length run as a batch; each reply equals greedy sampling of that prompt alone (float64,
    so that a batched and a single matmul cannot round an argmax apart)."""
    tmp, tok_path, _ = small
    tok = data.get_tokenizer(tok_path)
    torch.manual_seed(0)
    model = mup.build_model(ModelConfig(vocab_size=300, n_layer=2, hidden=32, ffn_hidden=64, n_head=2, n_kv_head=1,
                                        max_seq_len=512)).double().eval()
    rows = ev.sft_task_rows(3)
    prompts = [sample.prompt_ids(tok, r["question"], True) for r in rows]
    assert len({len(p) for p in prompts}) < len(prompts)  # some prompts do share a batch
    got = ev.greedy_replies(model, tok, prompts, 10)
    for p, reply in zip(prompts, got):
        ref = tok.decode(sample.stream(model, tok, p, 10, temperature=0)).split(data.USER)[0]
        assert reply == ref


def test_probe_command_on_a_checkpoint(small, capsys):
    tmp, tok_path, _ = small
    tok = data.get_tokenizer(tok_path)
    cfg = ModelConfig(vocab_size=300, n_layer=2, hidden=32, ffn_hidden=64, n_head=2, n_kv_head=1, max_seq_len=512)
    model = mup.build_model(cfg)
    state = {"model": model.state_dict(), "model_config": asdict(cfg), "tokenizer": tok.identity,
             "config": {"tokenizer": tok_path}, "tokens": 0, "optim": None, "rng": None}
    runtime.save_checkpoint(str(tmp / "run"), 1, state, keep=1)
    ev.main([str(tmp / "run"), "--task", "sft", "--per_family", "3", "--max_tokens", "4", "--json",
             "--device", "cpu", "--dtype", "float32"])
    r = json.loads(capsys.readouterr().out)
    assert r["n"] == 12 and set(r["families"]) == set(data.SFT_FAMILIES)
    assert [g["n"] for g in r["families"].values()] == [3] * 4 and sum(g["n"] for g in r["levels"].values()) == 12
    assert r["correct"] == sum(p["correct"] for p in r["per_problem"])
    assert all(p["correct"] == (p["reply"].strip() == p["answer"]) for p in r["per_problem"])
    assert r["ci"] == ev.wilson(r["correct"], 12)
    ev.main([str(tmp / "run"), "--task", "sft", "--per_family", "1", "--max_tokens", "2", "--device", "cpu",
             "--dtype", "float32"])
    assert "overall" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# the lm-evaluation-harness task

def test_lm_eval_task_data_is_the_probe_test_set(tok):
    rows = [json.loads(line) for line in (TASK_DIR / "test.jsonl").read_text().splitlines()]
    assert rows == ev.sft_task_rows(), (
        "regenerate: python -c \"from tools.eval import write_sft_task_data as w; w()\"")
    yaml = (TASK_DIR / "xmodel_sft.yaml").read_text()
    assert "task: xmodel_sft" in yaml and "test.jsonl" in yaml and "doc_to_target: answer" in yaml
    for r in rows[::97]:  # the harness's context is exactly the probe's prompt
        assert tok.doc_start + tok.encode(r["prompt"]) == sample.prompt_ids(tok, r["question"], True)


# ---------------------------------------------------------------------------------------------------
# the experiment

def test_muon_sft_end_to_end(small, tmp_path):
    from conftest import write_config
    _, tok_path, sets = small
    phases = [
        dict(name="warmup", steps=2, lr=("linear", 0.0, 1.0), batch=4, seq_len=32, mix="stable", optimizer="adamw"),
        dict(name="stable", steps=2, lr=("constant", 1.0, 1.0), batch=4, seq_len=32, mix="stable", optimizer="adamw"),
        dict(name="decay", steps=2, lr=("exp", 1.0, 1 / 16), batch=4, seq_len=32, mix="decay", optimizer="muon"),
        dict(name="long", steps=1, lr=("linear", 1 / 16, 0.01), batch=2, seq_len=64, mix="decay", optimizer="muon"),
    ]
    cfg = write_config(tmp_path / "cfg.py", None, data=sets, phases=phases, tokenizer=tok_path, vocab_size=300,
                       sample_tokens=0, eval_windows=2, mixtures={
                           "stable": {"code": 0.5, "prose": 0.5}, "decay": {"sft": 0.6, "code": 0.2, "prose": 0.2}})
    out, runs = tmp_path / "docs", tmp_path / "runs"
    args = ["--config", cfg, "--seeds", "3", "--out", str(out), "--runs", str(runs), "--per_family", "1",
            "--max_tokens", "2", "--heldout_windows", "2", "--device", "cpu", "--dtype", "float32"]
    muon_sft.main(args)
    r = json.loads((out / "muon_vs_adamw_sft.json").read_text())
    assert (out / "muon_vs_adamw_sft.png").stat().st_size > 0
    assert r["seeds"] == [3] and r["switch_step"] == 4 and r["steps"] == 7
    for name in ("adamw", "muon"):
        for key in ("accuracy", "heldout_loss", "heldout_loss_prose", "heldout_loss_code"):
            assert len(r[name][key]) == 1
        assert r[name]["heldout_loss"] == [(a + b) / 2 for a, b in zip(r[name]["heldout_loss_prose"],
                                                                       r[name]["heldout_loss_code"])]
        assert all(a * 4 == int(a * 4) for a in r[name]["accuracy"])  # k of 4 families x 1 problem
    assert r["difference"]["muon_minus_adamw"]["accuracy"] == [m - a for a, m in zip(r["adamw"]["accuracy"],
                                                                                        r["muon"]["accuracy"])]
    for seed in (3,):
        s = runs / f"s{seed}"
        # both branches continue the same step-4 state: same metrics up to the switch, then their own optimizer
        rows = {b: runtime.read_metrics(str(s / b / "metrics.jsonl")) for b in ("stable", "adamw", "muon")}
        before = [x for x in rows["stable"] if x.get("step", 0) <= 4 and "loss" in x]
        assert [x for x in rows["adamw"] if x.get("step", 0) <= 4 and "loss" in x] == before
        assert [x for x in rows["muon"] if x.get("step", 0) <= 4 and "loss" in x] == before
        for b in ("adamw", "muon"):
            ck = runtime.load_checkpoint(str(s / b))
            assert ck["step"] == 7 and ck["optim"]["kind"] == b
        assert any(x.get("event") == "optimizer_switch" for x in rows["muon"])
        assert not any(x.get("event") == "optimizer_switch" for x in rows["adamw"])
    # a second call reuses every finished run and measures the same numbers
    mtime = (runs / "s3" / "muon" / "ckpt_00000007" / "manifest.json").stat().st_mtime_ns
    again = muon_sft.experiment(cfg, [3], str(tmp_path / "again"), str(runs), [], 1, 2, 2, "cpu", "float32")
    assert (runs / "s3" / "muon" / "ckpt_00000007" / "manifest.json").stat().st_mtime_ns == mtime
    assert again["muon"]["accuracy"] == r["muon"]["accuracy"] and again["muon"]["heldout_loss"] == r["muon"]["heldout_loss"]
    with pytest.raises(ValueError, match="no phase runs Muon"):
        muon_sft.switch_step([dict(phases[0])])
