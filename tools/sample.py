"""Sample text from a checkpoint or a Hugging Face export, streaming tokens as they are produced.

    python -m tools.sample CHECKPOINT|HF_DIR [--prompt TEXT] [--max_tokens 200] [--temperature 0.8] [--top_k 50]
                           [--top_p 0.9] [--repetition_penalty 1.1] [--seed 0] [--chat] [--no_bos]
                           [--device auto] [--dtype auto]

Generation is `Xmodel.generate_stream`: the prompt is run once, then one token at a time against the
per-layer K/V cache. Each token is drawn by `Xmodel.sample_next`: the repetition penalty (off by
default) first, then temperature 0 is greedy (argmax); otherwise logits / T, optionally cut to the top k
and to the top-p nucleus, are sampled with a torch.Generator seeded by --seed, so a run is
reproducible. Generation stops at the tokenizer's EOS or after --max_tokens. --device/--dtype "auto" pick
as train.py does (runtime.resolve_machine; the choice is printed on stderr, stdout carries the text only);
bfloat16 runs the model under autocast.

Context. Every training document opens with BOS, so the context starts with BOS as a document does
(`Tokenizer.doc_start`: EOS for a tokenizer without BOS, whose documents follow the previous one's EOS);
--no_bos leaves it out. This is what a Hugging Face export's tokenizer adds by default (add_bos_token),
so `tok(prompt)` + greedy `generate` there continues as --temperature 0 here. With --chat the prompt
becomes one user turn in the DeepSeek-V3 template the SFT data was rendered with (BOS, then
data.render_chat, generation prompt "<｜Assistant｜>"), and only the reply is printed. --chat without
--prompt is a conversation: each line read from stdin is a user turn, each reply is printed on stdout,
and the conversation stays in the KV cache, so a turn runs only its own tokens (plus the previous reply's
closing EOS), never the conversation again; stderr reports the cache's length. "/reset" starts over.

Streaming. Byte-level BPE tokens need not end on a character boundary: a multi-byte character can be
split across tokens, and decoding a prefix then yields U+FFFD for the incomplete bytes. So the generated
ids are decoded as a whole after every token and only the new suffix is printed, holding it back while it
ends in an incomplete character; the concatenation of everything printed equals decode(all ids).
"""
import argparse
import sys

import torch

import data
import runtime
import tools
from tools import export, nonnegative_float, positive_float, positive_int

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Incremental detokenization: push(id) returns the text that became final with that token."""

    def __init__(self, tok: data.Tokenizer):
        self.tok, self.ids, self.printed = tok, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith(REPLACEMENT):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            return ""
        return self._advance(text)

    def flush(self) -> str:
        return self._advance(self.tok.decode(self.ids))

    def _advance(self, text: str) -> str:
        # what is printed cannot be taken back: should a later token re-decode earlier bytes differently
        # (it does not with byte-level BPE over complete characters), print from the first difference
        k = 0
        while k < min(len(text), len(self.printed)) and text[k] == self.printed[k]:
            k += 1
        self.printed = text
        return text[k:]


def prompt_ids(tok: data.Tokenizer, prompt: str, chat: bool, bos: bool = True) -> list[int]:
    """The context for a prompt: a document's start (BOS) unless bos=False, then the prompt or its chat turn."""
    text = data.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True) if chat else prompt
    ids = (tok.doc_start if bos else []) + tok.encode(text)
    if not ids:
        raise ValueError("empty prompt and --no_bos: nothing to condition on")
    return ids


def check_context(model, ids: list[int], max_tokens: int) -> None:
    """A context the model can run: every id inside its vocabulary (a tokenizer larger than the model's, given
    with --tokenizer or shipped with a foreign folder, fails here, not in the embedding lookup), and the
    context plus max_tokens within max_seq_len."""
    cfg = model.config
    if ids and max(ids) >= cfg.vocab_size:
        raise ValueError(f"the prompt has token id {max(ids)}, beyond the model's vocab_size {cfg.vocab_size} "
                         f"(a tokenizer other than the model's? see --tokenizer)")
    if len(ids) + max_tokens > cfg.max_seq_len:
        raise ValueError(f"the prompt's {len(ids)} tokens + --max_tokens {max_tokens} exceed the model's "
                         f"max_seq_len {cfg.max_seq_len}")


def nucleus(text: str) -> float:
    """argparse type of --top_p: a probability mass in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def stream(model, tok: data.Tokenizer, ids: list[int], max_tokens: int, temperature: float = 0.8,
           top_k: int | None = None, seed: int = 0, out=None, device="cpu", top_p: float | None = None,
           repetition_penalty: float = 1.0, caches: list | None = None) -> list[int]:
    """Generate, writing text to `out` (a file object) as it becomes final; returns the new token ids
    (without the EOS that stopped it). `caches` (see Xmodel.generate_stream) continues a conversation."""
    if max_tokens <= 0:
        raise ValueError(f"--max_tokens must be positive, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"--top_k must be positive, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}")
    if not 0 < repetition_penalty < float("inf"):
        raise ValueError(f"--repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty}")
    check_context(model, ids, max_tokens)
    g = torch.Generator(device=device).manual_seed(seed)
    dec, new = StreamDecoder(tok), []
    idx = torch.tensor([ids], device=device)
    for t in model.generate_stream(idx, max_tokens, eos_id=tok.eos_id, caches=caches, temperature=temperature,
                                   top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, generator=g):
        t = int(t[0])
        if t == tok.eos_id:
            break
        new.append(t)
        piece = dec.push(t)
        if out is not None and piece:
            out.write(piece)
            out.flush()
    tail = dec.flush()
    if out is not None and tail:
        out.write(tail)
        out.flush()
    return new


def chat(model, tok: data.Tokenizer, max_tokens: int, inp, out, err, bos: bool = True, **sampling) -> None:
    """The conversation loop of --chat without --prompt (see the module docstring)."""
    limit, ids, caches = model.config.max_seq_len, [], [{} for _ in model.blocks]
    for line in inp:
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            ids, caches = [], [{} for _ in model.blocks]
        if text.strip() in ("", "/reset"):
            continue
        turn = prompt_ids(tok, text, chat=True, bos=bos and not ids)  # BOS once, as the template does
        if len(ids) + len(turn) >= limit:
            print(f"(the conversation fills the model's {limit} tokens of context: starting a new one)", file=err)
            ids, caches = [], [{} for _ in model.blocks]
            turn = prompt_ids(tok, text, chat=True, bos=bos)
        ids += turn
        new = stream(model, tok, ids, min(max_tokens, limit - len(ids)), out=out, caches=caches, **sampling)
        out.write("\n")
        out.flush()
        ids += new + [tok.eos_id]  # the template closes every assistant turn, also one cut by --max_tokens
        print(f"[{caches[0]['k'].shape[2]} tokens in the KV cache]", file=err, flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.sample",
                                 description="Stream generated text from a checkpoint or a Hugging Face export.")
    ap.add_argument("model", help="checkpoint (ckpt_*.pt or run directory) or Hugging Face folder")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--max_tokens", type=positive_int, default=200)
    ap.add_argument("--temperature", type=nonnegative_float, default=0.8, help="0 = greedy")
    ap.add_argument("--top_k", type=positive_int, default=None)
    ap.add_argument("--top_p", type=nucleus, default=None, help="nucleus sampling: keep the most likely tokens "
                    "whose probabilities sum to this (default: all)")
    ap.add_argument("--repetition_penalty", type=positive_float, default=1.0,
                    help="> 1 discourages tokens already in the context (CTRL); 1 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (SFT checkpoints); "
                    "without --prompt: a conversation on stdin")
    ap.add_argument("--no_bos", action="store_true", help="do not start the context as a document starts "
                    "(BOS; EOS for a tokenizer without BOS)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the model's")
    ap.add_argument("--device", default="auto", choices=runtime.DEVICES)
    ap.add_argument("--dtype", default="auto", choices=runtime.DTYPES)
    a = ap.parse_args(argv)
    device, dtype = runtime.resolve_machine(a.device, a.dtype, say=lambda msg: print(msg, file=sys.stderr))
    model, tok, _ = export.load_any(a.model, a.tokenizer, device)
    sampling = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    repetition_penalty=a.repetition_penalty, seed=a.seed, device=device)
    with runtime.autocast(device, dtype):
        if a.chat and a.prompt is None:
            if sys.stdin.isatty():
                print("chat: one line per turn; /reset starts over; Ctrl-D ends", file=sys.stderr)
            return chat(model, tok, a.max_tokens, sys.stdin, sys.stdout, sys.stderr, not a.no_bos, **sampling)
        prompt = a.prompt or ""
        ids = prompt_ids(tok, prompt, a.chat, not a.no_bos)
        check_context(model, ids, a.max_tokens)  # before the prompt is echoed
        if not a.chat:
            sys.stdout.write(prompt)
        stream(model, tok, ids, a.max_tokens, out=sys.stdout, **sampling)
    sys.stdout.write("\n")


if __name__ == "__main__":
    tools.run(main)
