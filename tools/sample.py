"""Sample text from a checkpoint or a Hugging Face export, streaming tokens as they are produced.

    python -m tools.sample CHECKPOINT|HF_DIR [--prompt TEXT] [--max_tokens 200] [--temperature 0.8] [--top_k 50]
                           [--seed 0] [--chat] [--no_eos_prefix] [--device auto] [--dtype auto]

Generation is `Xmodel.generate_stream`: the prompt is run once, then one token at a time against the
per-layer K/V cache. Temperature 0 is greedy (argmax); otherwise logits / T, optionally cut to the top k,
are sampled with a torch.Generator seeded by --seed, so a run is reproducible. Generation stops at the
tokenizer's EOS or after --max_tokens. --device/--dtype "auto" pick as train.py does (train.resolve_machine;
the choice is printed on stderr, stdout carries the text only); bfloat16 runs the model under autocast.

Context. Training documents are separated by EOS only (no BOS), so a document's first token is always
predicted right after an EOS; the prompt is therefore prefixed with EOS (--no_eos_prefix turns it off).
With --chat the prompt becomes one user turn in the DeepSeek-V3 template the SFT data was rendered with
(data.render_chat, generation prompt "<｜Assistant｜>"), and only the reply is printed.

Streaming. Byte-level BPE tokens need not end on a character boundary: a multi-byte character can be
split across tokens, and decoding a prefix then yields U+FFFD for the incomplete bytes. So the generated
ids are decoded as a whole after every token and only the new suffix is printed, holding it back while it
ends in an incomplete character; the concatenation of everything printed equals decode(all ids).
"""
import argparse
import sys

import torch

import data
import train
from tools import export

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


def prompt_ids(tok: data.Tokenizer, prompt: str, chat: bool, eos_prefix: bool = True) -> list[int]:
    text = data.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True) if chat else prompt
    ids = ([tok.eos_id] if eos_prefix else []) + tok.encode(text)
    if not ids:
        raise ValueError("empty prompt and --no_eos_prefix: nothing to condition on")
    return ids


def stream(model, tok: data.Tokenizer, ids: list[int], max_tokens: int, temperature: float = 0.8,
           top_k: int | None = None, seed: int = 0, out=None, device="cpu") -> list[int]:
    """Generate, writing text to `out` (a file object) as it becomes final; returns the new token ids
    (without the EOS that stopped it)."""
    if max_tokens <= 0:
        raise ValueError(f"--max_tokens must be positive, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"--top_k must be positive, got {top_k}")
    g = torch.Generator(device=device).manual_seed(seed)
    dec, new = StreamDecoder(tok), []
    idx = torch.tensor([ids], device=device)
    for t in model.generate_stream(idx, max_tokens, temperature=temperature, top_k=top_k, eos_id=tok.eos_id,
                                   generator=g):
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.sample",
                                 description="Stream generated text from a checkpoint or a Hugging Face export.")
    ap.add_argument("model", help="checkpoint (ckpt_*.pt or run directory) or Hugging Face folder")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--max_tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (SFT checkpoints)")
    ap.add_argument("--no_eos_prefix", action="store_true", help="do not start the context with EOS")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the model's")
    ap.add_argument("--device", default="auto", choices=train.DEVICES)
    ap.add_argument("--dtype", default="auto", choices=train.DTYPES)
    a = ap.parse_args(argv)
    device, dtype = train.resolve_machine(a.device, a.dtype, say=lambda msg: print(msg, file=sys.stderr))
    model, tok, _ = export.load_any(a.model, a.tokenizer, device)
    ids = prompt_ids(tok, a.prompt, a.chat, not a.no_eos_prefix)
    if not a.chat:
        sys.stdout.write(a.prompt)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        stream(model, tok, ids, a.max_tokens, a.temperature, a.top_k, a.seed, sys.stdout, device)
    sys.stdout.write("\n")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
