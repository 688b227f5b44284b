"""Held-out loss and perplexity, the way Xmodel-2.5 reports WikiText-2 (RECIPE.md, Evaluation).

    python -m tools.eval CHECKPOINT|HF_DIR --text FILE       [--seq_len 3776] [--windows 100] [--batch 5] [--seed 0]
                                                             [--device auto] [--dtype auto] [--json]
    python -m tools.eval CHECKPOINT|HF_DIR --data DATASET_DIR [--source NAME] ...
    python -m tools.eval CHECKPOINT|HF_DIR --task sft [--per_family 250] [--max_tokens 16] ...
    python -m tools.eval suite commands|score ...     the paper's 13 lm-eval tasks and their average (tools/suite.py)

The text is tokenized into one stream laid out as the prepared data is: its end-of-text tokens, if any,
separate documents, and each document opens with BOS (or a prepared dataset's held-out split is read,
where they already do). `windows` windows of seq_len + 1 tokens are scored, `batch` at a time: input
w[:-1], targets w[1:], the mean next-token cross-entropy of each window is one sample.

Window placement. A window should start where a document starts, as the model saw documents begin during
training, so the first tokens are not scored mid-sentence without context. The candidate starts are the
positions of BOS (for a tokenizer without BOS: 0 and p + 1 for every EOS at p, where its documents
begin), kept if a whole window fits. If there are at least `windows` of them, `windows` distinct ones
are drawn at random; otherwise all are used and the rest are uniform random offsets. A numpy Generator
seeded with --seed does all drawing, so the result is a function of (text, tokenizer, model, arguments)
alone.

Statistics over the n windows (all of equal length, so their mean is the token mean):

    loss = mean(l_i)        CI95(loss) = loss -+ 1.96 * std(l_i, ddof=1) / sqrt(n)
    ppl  = exp(loss)        CI95(ppl)  = exp(CI95(loss))        (exp is monotone)

The interval covers the window-sampling noise only (windows may overlap, so it is slightly optimistic).
The per-window losses are what the interval needs, so they are computed here (from the hidden states, with
model.chunked_cross_entropy) rather than with runtime.heldout_loss, which returns only the token mean.
A Hugging Face folder (an export of this project, or any Llama) is read through tools.export.load_any into
the same model code; --backend transformers runs it through transformers' LlamaForCausalLM instead, as a
check of the exported folder in the stack people use. --device/--dtype "auto" pick as train.py does
(runtime.resolve_machine: CUDA, else MPS, else CPU; bf16 where native), the choice printed on stderr.

Downstream probe (--task sft). The fixed test side of the embedded SFT source (data.sft_problems("test",
per_family, seed=SFT_TEST_SEED): never trained on, 4 families x 250 problems by default). Each question is
asked as one user turn after an EOS (tools.sample.prompt_ids, the context training documents start in) and
answered greedily until the end of the assistant turn (EOS) or max_tokens; the reply is correct iff it
equals the answer after stripping whitespace. Accuracy per family, per level and overall, with the Wilson
95% interval for k correct of n:

    center = (p + z^2/2n) / (1 + z^2/n),  half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n),  p = k/n

Questions whose prompts have the same length run as one batch (no padding: each row computes what it would
alone). The same problems are the lm-evaluation-harness task docs/lm_eval/xmodel_sft (sft_task_rows).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

import data
import runtime
import tools
from model import chunked_cross_entropy
from tools import export, positive_int
from tools.sample import check_context, prompt_ids

Z95 = 1.959963984540054  # two-sided 95% normal quantile
SFT_TEST_SEED = 1         # the probe's test problems: data.sft_problems("test", per_family, seed=1)
SFT_PER_FAMILY = 250


def window_starts(tokens: np.ndarray, eos_id: int, seq_len: int, n: int, seed: int,
                  bos_id: int | None = None) -> tuple[np.ndarray, int]:
    """(n start offsets of (seq_len + 1)-token windows, how many of them start a document)."""
    N = len(tokens)
    length = seq_len + 1
    if N < length:
        raise ValueError(f"the text has {N} tokens, fewer than one window of seq_len + 1 = {length}; "
                         f"use a longer text or a smaller --seq_len")
    if n <= 0:
        raise ValueError(f"--windows must be positive, got {n}")
    rng = np.random.default_rng(seed)
    if bos_id is not None:
        doc = np.flatnonzero(np.asarray(tokens) == bos_id)
    else:
        doc = np.concatenate(([0], np.flatnonzero(np.asarray(tokens) == eos_id) + 1))
    doc = np.unique(doc[doc + length <= N])
    if len(doc) >= n:
        return rng.choice(doc, size=n, replace=False).astype(np.int64), n
    rest = rng.integers(0, N - length + 1, size=n - len(doc))
    return np.concatenate((rng.permutation(doc), rest)).astype(np.int64), len(doc)


def confidence(losses) -> dict:
    """Mean, 95% interval of the mean, perplexity and its interval, for per-window losses; the intervals
    are None (JSON null) for a single window, which has no spread to estimate."""
    x = np.asarray(losses, dtype=np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"cannot summarize losses {x[:5].tolist()}...: empty or not finite")
    mean = float(x.mean())
    half = Z95 * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else None
    return {"loss": mean, "loss_ci": None if half is None else [mean - half, mean + half], "ci_half_width": half,
            "ppl": math.exp(mean), "ppl_ci": None if half is None else [math.exp(mean - half), math.exp(mean + half)],
            "n": int(x.size)}


def text_tokens(path: str, tok: data.Tokenizer) -> np.ndarray:
    p = Path(path)
    if p.is_dir():  # a dataset directory belongs to --data
        raise ValueError(f"--text {path!r} is a directory, not a text file (a prepared dataset: --data)")
    if not p.is_file():
        raise FileNotFoundError(f"--text file {path!r} does not exist")
    ids = np.asarray(tok.encode(p.read_text(encoding="utf-8")), dtype=np.int64)
    if tok.bos_id is not None:  # BOS at the text's start and after each of its EOS, as in prepared data
        after = np.flatnonzero(ids == tok.eos_id) + 1
        ids = np.insert(ids, np.concatenate(([0], after[after < len(ids)])), tok.bos_id)
    return ids


def dataset_tokens(dataset_dir: str, tok: data.Tokenizer, source: str | None = None) -> np.ndarray:
    """The held-out split of a prepared dataset (all sources in manifest order, or one)."""
    m = data.read_manifest(dataset_dir)
    if m["tokenizer"]["sha256"] != tok.sha256:
        raise ValueError(f"{dataset_dir!r} was prepared with tokenizer {m['tokenizer']['name']} "
                         f"(sha256 {m['tokenizer']['sha256'][:12]}), the model uses {tok.name} "
                         f"(sha256 {tok.sha256[:12]})")
    names = list(m["sources"])
    if source is not None:
        if source not in m["sources"]:
            raise ValueError(f"--source {source!r} is not in {dataset_dir!r} (it has {names})")
        names = [source]
    parts = []
    for name in names:
        for shard in m["sources"][name]["splits"]["heldout"]["shards"]:
            parts.append(np.fromfile(Path(dataset_dir) / shard["file"], dtype=data.TOKEN_DTYPE).astype(np.int64))
    if not parts:
        raise ValueError(f"{dataset_dir!r} has no held-out tokens (sources {names})")
    return np.concatenate(parts)


@torch.no_grad()
def window_losses(model, tokens: np.ndarray, starts: np.ndarray, seq_len: int, batch: int, device="cpu",
                  dtype: torch.dtype = torch.float32) -> list[float]:
    """Mean cross-entropy of each window (our Xmodel or a transformers LlamaForCausalLM)."""
    if batch <= 0:
        raise ValueError(f"--batch must be positive, got {batch}")
    hf = not hasattr(model, "hidden_states")
    vocab = model.config.vocab_size
    if int(tokens.max()) >= vocab:
        raise ValueError(f"token id {int(tokens.max())} >= the model's vocab_size {vocab} (wrong tokenizer?)")
    out = []
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    for k in range(0, len(starts), batch):
        w = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts[k:k + batch]])).to(device)
        x, y = w[:, :-1], w[:, 1:]
        with autocast:
            if hf:
                h, weight, scale = model.model(input_ids=x).last_hidden_state, model.lm_head.weight, 1.0
            else:
                h, weight, scale = model.hidden_states(x), model.output_weight, model.config.logit_mult
            for b in range(len(x)):
                out.append(chunked_cross_entropy(h[b].to(weight.dtype), weight, y[b], scale).item())
    return out


def evaluate(path: str, text: str | None = None, dataset: str | None = None, source: str | None = None,
             seq_len: int = 3776, windows: int = 100, batch: int = 5, seed: int = 0, device: str = "auto",
             dtype: str = "auto", backend: str = "xmodel", tokenizer: str | None = None) -> dict:
    """Loss, perplexity and their 95% intervals over `windows` windows of a text file or a dataset's
    held-out split (see the module docstring); also the per-window losses and the window starts."""
    if (text is None) == (dataset is None):
        raise ValueError("give exactly one of --text FILE or --data DATASET_DIR")
    if backend not in ("xmodel", "transformers"):
        raise ValueError(f"--backend must be xmodel or transformers, got {backend!r}")
    device, dtype = runtime.resolve_machine(device, dtype, say=lambda msg: print(msg, file=sys.stderr))
    model, tok, info = export.load_any(path, tokenizer, device)
    if backend == "transformers":
        if info["kind"] != "hf":
            raise ValueError("--backend transformers needs a Hugging Face folder (run python -m tools.export first)")
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokens = text_tokens(text, tok) if text is not None else dataset_tokens(dataset, tok, source)
    max_len = model.config.max_position_embeddings if backend == "transformers" else model.config.max_seq_len
    if seq_len > max_len:
        raise ValueError(f"--seq_len {seq_len} exceeds the model's maximum sequence length {max_len}")
    starts, aligned = window_starts(tokens, tok.eos_id, seq_len, windows, seed, tok.bos_id)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    losses = window_losses(model, tokens, starts, seq_len, batch, device, dt)
    return {**confidence(losses), "windows": windows, "aligned": aligned, "seq_len": seq_len, "batch": batch,
            "seed": seed, "tokens": int(len(tokens)), "model": str(path), "backend": backend,
            "device": device, "dtype": dtype,
            "text": text, "data": dataset, "source": source, "per_window": losses,
            "starts": starts.tolist()}


def wilson(k: int, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval of a binomial proportion k/n (stays inside [0, 1], sane at k = 0 or n)."""
    p, d = k / n, 1 + z * z / n
    center, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, center - half), min(1.0, center + half)]


def sft_task_rows(per_family: int = SFT_PER_FAMILY) -> list[dict]:
    """The probe's test problems with the prompt text the harness sends (the user turn and the assistant's
    opening; the harness's tokenizer adds BOS in front, as the probe's prompt_ids does)."""
    return [{**p, "prompt": data.render_chat([{"role": "user", "content": p["question"]}], True)}
            for p in data.sft_problems("test", per_family, seed=SFT_TEST_SEED)]


def write_sft_task_data(path: str = "docs/lm_eval/xmodel_sft/test.jsonl") -> None:
    """The lm-evaluation-harness task's data file: sft_task_rows(), one JSON object a line."""
    with runtime.atomic_write(path) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_task_rows())


@torch.no_grad()
def greedy_replies(model, tok: data.Tokenizer, prompts: list[list[int]], max_tokens: int, device="cpu",
                   dtype: torch.dtype = torch.float32, batch: int = 64) -> list[str]:
    """Greedy continuation of each prompt up to the end of its turn (EOS, or a new user turn), decoded."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups = [[i for i in order if len(prompts[i]) == n] for n in sorted({len(p) for p in prompts})]
    replies = [""] * len(prompts)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    for rows in (g[k:k + batch] for g in groups for k in range(0, len(g), batch)):
        x = torch.tensor([prompts[i] for i in rows], device=device)
        new, done = [], torch.zeros(len(rows), dtype=torch.bool, device=device)
        with autocast:
            for t in model.generate_stream(x, max_tokens, temperature=0):
                new.append(t)
                done |= t == tok.eos_id
                if bool(done.all()):
                    break
        for i, ids in zip(rows, torch.stack(new, 1).tolist()):
            ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
            replies[i] = tok.decode(ids).split(data.USER)[0]
    return replies


def sft_accuracy(path: str, per_family: int = SFT_PER_FAMILY, max_tokens: int = 16, device: str = "auto",
                 dtype: str = "auto", tokenizer: str | None = None) -> dict:
    """Exact-match accuracy of greedy replies on the SFT test set, per family, per level and overall."""
    if per_family <= 0 or max_tokens <= 0:
        raise ValueError(f"--per_family and --max_tokens must be positive, got {per_family}, {max_tokens}")
    device, dtype = runtime.resolve_machine(device, dtype, say=lambda msg: print(msg, file=sys.stderr))
    model, tok, _ = export.load_any(path, tokenizer, device)
    rows = sft_task_rows(per_family)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    prompts = [prompt_ids(tok, r["question"], True) for r in rows]
    for ids in prompts:
        check_context(model, ids, max_tokens)
    replies = greedy_replies(model, tok, prompts, max_tokens, device, dt)
    ok = [reply.strip() == r["answer"].strip() for r, reply in zip(rows, replies)]

    def summary(keep) -> dict:
        hits = [o for r, o in zip(rows, ok) if keep(r)]
        return {"accuracy": sum(hits) / len(hits), "ci": wilson(sum(hits), len(hits)), "correct": sum(hits),
                "n": len(hits)}

    return {"task": "sft", "model": str(path), **summary(lambda r: True), "device": device, "dtype": dtype,
            "families": {f: summary(lambda r, f=f: r["family"] == f) for f in data.SFT_FAMILIES},
            "levels": {str(v): summary(lambda r, v=v: r["level"] == v) for v in sorted({r["level"] for r in rows})},
            "per_problem": [{"question": r["question"], "answer": r["answer"], "reply": y, "correct": o}
                            for r, y, o in zip(rows, replies, ok)]}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["suite"]:  # downstream scores from lm-eval's results files: no model to load here
        from tools import suite
        return suite.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m tools.eval",
                                 description="Held-out loss / perplexity over random windows, or SFT accuracy, with a 95% CI.")
    ap.add_argument("model", help="checkpoint (ckpt_*.pt or run directory) or Hugging Face folder")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a UTF-8 text file (e.g. WikiText-2's wiki.test.raw)")
    src.add_argument("--data", help="a prepared dataset directory (its held-out split)")
    src.add_argument("--task", choices=["sft"], help="sft: exact-match accuracy on the SFT test problems")
    ap.add_argument("--per_family", type=positive_int, default=SFT_PER_FAMILY, help="with --task sft: problems per family")
    ap.add_argument("--max_tokens", type=positive_int, default=16, help="with --task sft: longest reply (answers: <= 9)")
    ap.add_argument("--source", default=None, help="with --data: one source only")
    ap.add_argument("--seq_len", type=positive_int, default=3776)
    ap.add_argument("--windows", type=positive_int, default=100)
    ap.add_argument("--batch", type=positive_int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=runtime.DEVICES)
    ap.add_argument("--dtype", default="auto", choices=runtime.DTYPES)
    ap.add_argument("--backend", default="xmodel", choices=["xmodel", "transformers"])
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the model's")
    ap.add_argument("--json", action="store_true", help="print one strict JSON object (null, never NaN)")
    a = ap.parse_args(argv)
    if a.task:
        r = sft_accuracy(a.model, a.per_family, a.max_tokens, a.device, a.dtype, a.tokenizer)
        if a.json:
            return print(json.dumps(r))
        print(f"{r['model']}: {r['n']} SFT test problems, greedy, exact match")
        for name, g in [*r["families"].items(), *((f"level {v}", g) for v, g in r["levels"].items()),
                        ("overall", r)]:
            print(f"  {name:<10}{g['correct']:>5}/{g['n']:<5}{g['accuracy']:7.1%}  95% CI "
                  f"[{g['ci'][0]:.1%}, {g['ci'][1]:.1%}]")
        return
    r = evaluate(a.model, a.text, a.data, a.source, a.seq_len, a.windows, a.batch, a.seed, a.device, a.dtype,
                 a.backend, a.tokenizer)
    if a.json:
        print(json.dumps(r, allow_nan=False))
    else:
        print(f"{r['model']}: {r['windows']} windows x {r['seq_len']} tokens ({r['aligned']} start a document), "
              f"seed {r['seed']}, {r['tokens']:,} tokens in the text")
        def ci(key, fmt):
            return "n/a (one window)" if r[key] is None else f"[{r[key][0]:{fmt}}, {r[key][1]:{fmt}}]"

        print(f"loss {r['loss']:.4f}  95% CI {ci('loss_ci', '.4f')}")
        print(f"perplexity {r['ppl']:.3f}  95% CI {ci('ppl_ci', '.3f')}")


if __name__ == "__main__":
    tools.run(main)
