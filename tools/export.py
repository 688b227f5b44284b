"""Export to (and import from) the Hugging Face Llama format: μP multipliers folded into the weights.

    python -m tools.export CHECKPOINT OUT_DIR [--dtype float32|bfloat16] [--overwrite] [--max_position_embeddings N]
    python -m tools.export --import HF_DIR OUT_CKPT_DIR [--mup key=value ...]
    python -m tools.export --to_file CHECKPOINT OUT.pt          # the trainer's checkpoint directory as one file

Why this works without custom code. The Xmodel-2.5 block is a Llama block (pre-RMSNorm, GQA, RoPE with
the half-split pairing, SwiGLU, no biases); μP adds only constant multipliers (model.py). Every one of
them multiplies the output of a linear map, so it can be moved *into* that map's weight, and the stock
`LlamaForCausalLM` then computes exactly our function:

    ours                                    stock Llama, after folding
    x = E[ids] * input_scale                embed_tokens = E * input_scale
    x += wo(attn) * residual_scale/sqrt(L)  o_proj    = wo * residual_scale/sqrt(L)
    x += w_down(mlp) * residual_scale/sqrt(L) down_proj = w_down * residual_scale/sqrt(L)
    softmax(q.k / d)                        q_proj    = wq / sqrt(d)   (Llama divides q.k by sqrt(d):
                                                                         (q/sqrt(d)).k/sqrt(d) = q.k/d;
                                                                         RoPE is linear, so the scale
                                                                         passes through the rotation)
    logits = h E^T * output_scale / m       lm_head   = E * output_scale / m   (untied: the embedding
                                                                         and the output projection now
                                                                         carry different multipliers)

Our fused [q; k; v] and [gate; up] weights (model.fused_parts) are written apart, as Llama's q_proj, k_proj,
v_proj and gate_proj, up_proj, and concatenated again on import. RMSNorm gains, k_proj, v_proj, gate_proj and
up_proj are copied as they are. Folding is done in float64
and rounded once to the export dtype. RoPE needs no permutation of q/k (our `apply_rope` pairs x[i]
with x[i + d/2], Llama's `rotate_half`).

Import is the inverse: divide by the multipliers. The export writes them, with our full ModelConfig, the
training step and the tokenizer identity, into config.json under "xmodel_mup" (stock loaders ignore an
unknown key), so an import restores the same config. Exactness: for each tensor the import picks a
float32 weight w with fold(w) == the stored tensor (a few nextafter steps around stored / c; for a tied
embedding, a w that reproduces both embed_tokens and lm_head), so export -> import -> export reproduces
the exported tensors bit for bit, in float32 and in bfloat16. The original checkpoint is recovered
exactly where the multiplier is a power of two and otherwise to within one float32 ulp (|dw| <= 2^-23 |w|):
rounding w * c to float32 can map two neighbouring floats to one, and then no import can tell them apart.
A Llama folder without "xmodel_mup" (any other Llama) is imported into our
μP defaults (base width 256, x12, 1.4/sqrt(L), ...) or whatever `--mup key=value` sets; the imported
model computes the same logits either way.

The folder is for others to read (serving containers, other users): files 0644, the folder 0755,
whatever the umask. max_position_embeddings (and the tokenizer's model_max_length) is the longest context
the checkpoint was trained at, the largest seq_len of the curriculum phases its step reached, not the
RoPE table's size (model.max_seq_len, 131072): what a server may promise (--max_position_embeddings sets
another).

An imported checkpoint holds weights only: "optim" and "rng" are None, so continued training starts
with fresh optimizer state (fresh Adam moments / Muon momentum, fresh FP8 amax histories).

This is the one place of the Llama <-> Xmodel weight mapping: tools.eval and tools.sample load checkpoints
and Hugging Face folders through `load_any`.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

import data
import runtime
import tools
from model import ModelConfig, Xmodel, fuse_state_dict, split_state_dict

EXPORT_FORMAT = "xmodel25-hf-export-v1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLAMA_ARCH = "LlamaForCausalLM"
SAFETENSORS = "model.safetensors"


# ----------------------------------------------------------------------------------------------------
# the name map and the multipliers

def multipliers(cfg: ModelConfig) -> dict:
    """The constant each exported Llama tensor is multiplied by (1.0 where nothing is folded)."""
    q = cfg.attn_scale * math.sqrt(cfg.head_dim)  # our scale / Llama's 1/sqrt(d)
    if abs(q - 1.0) < 1e-12:
        q = 1.0  # SP: exactly nothing to fold, not 0.9999999999999999
    return {"embed_tokens": cfg.embed_mult, "q_proj": q, "o_proj": cfg.residual_mult,
            "down_proj": cfg.residual_mult, "lm_head": cfg.logit_mult}


def name_map(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(our state_dict key, Llama key, multiplier name or "") for every exported tensor except lm_head; the
    keys of the fused weights' parts are those of `split_state_dict`."""
    rows = [("tok_emb.weight", "model.embed_tokens.weight", "embed_tokens")]
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        rows += [(o + "attn_norm.weight", h + "input_layernorm.weight", ""),
                 (o + "attn.wq.weight", h + "self_attn.q_proj.weight", "q_proj"),
                 (o + "attn.wk.weight", h + "self_attn.k_proj.weight", ""),
                 (o + "attn.wv.weight", h + "self_attn.v_proj.weight", ""),
                 (o + "attn.wo.weight", h + "self_attn.o_proj.weight", "o_proj"),
                 (o + "mlp_norm.weight", h + "post_attention_layernorm.weight", ""),
                 (o + "mlp.w_gate.weight", h + "mlp.gate_proj.weight", ""),
                 (o + "mlp.w_up.weight", h + "mlp.up_proj.weight", ""),
                 (o + "mlp.w_down.weight", h + "mlp.down_proj.weight", "down_proj")]
    rows.append(("norm.weight", "model.norm.weight", ""))
    return rows


def fold(w: torch.Tensor, c: float, dtype: torch.dtype) -> torch.Tensor:
    """round_dtype(w * c), the product taken in float64 (one rounding, identical on every machine)."""
    if c == 1.0:
        return w.to(dtype, copy=True).contiguous()  # a copy: tied tensors must not share storage
    return (w.double() * c).to(dtype).contiguous()


def unfold(y: torch.Tensor, c: float, steps: int = 6) -> torch.Tensor:
    """A float32 w with fold(w, c, y.dtype) == y, found by nextafter steps from y / c.

    fold is monotone in w, and y / c rounded to float32 is within a step or two of a preimage, so a few
    steps suffice; where y has no preimage (it was not produced by fold) the nearest neighbour is kept."""
    if c == 1.0:
        return y.float()
    w = (y.double() / c).float()
    inf = torch.tensor(float("inf"))
    for _ in range(steps):
        r = fold(w, c, y.dtype)
        lo, hi = r < y, r > y
        if not (lo.any() or hi.any()):
            break
        w = torch.where(lo, torch.nextafter(w, inf), torch.where(hi, torch.nextafter(w, -inf), w))
    return w


def _rounding_interval(y: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] (float64) of the w that round to y after multiplying by c: y's rounding interval / c."""
    inf = torch.tensor(float("inf"), dtype=y.dtype)
    up, dn = torch.nextafter(y, inf).double(), torch.nextafter(y, -inf).double()
    return (y.double() + dn) / 2 / c, (y.double() + up) / 2 / c


def unfold_tied(emb: torch.Tensor, ce: float, head: torch.Tensor, cl: float) -> tuple[torch.Tensor, int]:
    """The tied embedding E from its two exported images emb = fold(E, ce) and head = fold(E, cl).

    Both images constrain E to an interval (the values that round to them); the original lies in the
    overlap. Candidates per element: the preimage of emb, the preimage of head, and the midpoint and the
    float32 ends of the overlap; the first that reproduces both images wins. Returns (E, number of
    elements no candidate reproduced: 0 for anything this exporter wrote)."""
    both = lambda w: (fold(w, ce, emb.dtype) == emb) & (fold(w, cl, head.dtype) == head)
    lo_e, hi_e = _rounding_interval(emb, ce)
    lo_h, hi_h = _rounding_interval(head, cl)
    lo, hi = torch.maximum(lo_e, lo_h), torch.minimum(hi_e, hi_h)
    inf = torch.tensor(float("inf"))
    lo32, hi32 = lo.float(), hi.float()
    candidates = [unfold(emb, ce), unfold(head, cl), ((lo + hi) / 2).float(),
                  torch.where(lo32.double() < lo, torch.nextafter(lo32, inf), lo32),
                  torch.where(hi32.double() > hi, torch.nextafter(hi32, -inf), hi32)]
    w, done = candidates[0], torch.zeros(emb.shape, dtype=torch.bool)
    for cand in candidates:
        ok = both(cand) & ~done
        w, done = torch.where(ok, cand, w), done | ok
    return w, int((~done).sum())


# ----------------------------------------------------------------------------------------------------
# tokenizer files

def chat_template(bos: bool = True) -> str:
    """A Jinja chat template that renders as DeepSeek-V3's: {{ bos_token }} (when bos), then exactly
    data.render_chat (system prompts joined by a blank line, then <｜User｜>u and
    <｜Assistant｜>a<｜end▁of▁sentence｜> turns)."""
    return ("{{- bos_token -}}" * bos +
            "{%- set sys = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list -%}"
            "{{- sys | join('\\n\\n') -}}"
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'user' -%}{{- '" + data.USER + "' + m['content'] -}}"
            "{%- elif m['role'] == 'assistant' -%}{{- '" + data.ASSISTANT + "' + m['content'] + '"
            + data.EOS_TEXT + "' -}}"
            "{%- elif m['role'] != 'system' -%}{{- raise_exception('unknown chat role ' + m['role']) -}}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '" + data.ASSISTANT + "' -}}{%- endif -%}")


def with_bos(blob: bytes, bos: str) -> bytes:
    """A tokenizer.json whose post-processor prepends `bos` (after the one it has), the way Llama 3's does:
    transformers >= 5 ignores add_bos_token where a tokenizer.json exists and asks this instead. Only
    tokenization with special tokens changes (data.Tokenizer.encode adds none): the ids of a text do not."""
    from tokenizers import Tokenizer as HFTokenizer, processors
    hf, j = HFTokenizer.from_str(blob.decode("utf-8")), json.loads(blob)
    bos_pp = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                           special_tokens=[(bos, hf.token_to_id(bos))])
    hf.post_processor = processors.Sequence([hf.post_processor, bos_pp]) if hf.post_processor else bos_pp
    j["post_processor"] = json.loads(hf.to_str())["post_processor"]  # the other fields exactly as they were
    return json.dumps(j, ensure_ascii=False).encode()


def tokenizer_files(tok: data.Tokenizer, max_len: int) -> tuple[dict, dict]:
    """({file name: bytes}, {"bos_token_id", "eos_token_id"}) for the export folder.

    Training documents open with BOS (data.py), and so does Hugging Face tokenization of the export:
    tokenizer_config.json has add_bos_token (read by llama.cpp's converter and older transformers) and the
    tokenizer.json a BOS post-processor (`with_bos`, unless it has one already; read by transformers and
    so vLLM), so `tok(text)` is [BOS] + data.Tokenizer.encode(text), the context tools.sample gives a
    prompt. Otherwise tokenizer.json is the training tokenizer's, unchanged (byte for byte for a tokenizer
    without BOS); the chat template is DeepSeek-V3's. A tiktoken encoding has no tokenizer.json: its .tiktoken file is copied when it is a
    file, and HF tokenizer files must then be supplied by the user."""
    blob = data.tokenizer_json(tok)
    ids = {"eos_token_id": tok.eos_id, "bos_token_id": tok.bos_id}
    if blob is None:
        p = Path(tok.spec)
        return ({p.name: p.read_bytes()} if p.is_file() else {}), ids
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_str(blob.decode("utf-8"))
    eos = hf.id_to_token(tok.eos_id)
    bos = hf.id_to_token(tok.bos_id) if tok.bos_id is not None else None
    if bos and hf.encode("a").ids[:1] != [tok.bos_id]:  # a Llama 3 tokenizer.json adds BOS by itself
        blob = with_bos(blob, bos)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bos is not None, "add_eos_token": False,
           "bos_token": bos, "eos_token": eos, "pad_token": eos, "unk_token": None,
           "clean_up_tokenization_spaces": False, "model_max_length": max_len}
    if hf.token_to_id(data.USER) is not None and hf.token_to_id(data.ASSISTANT) is not None:
        cfg["chat_template"] = chat_template(bos is not None)
    special = {"bos_token": bos, "eos_token": eos, "pad_token": eos}
    return {"tokenizer.json": blob, "tokenizer_config.json": _json(cfg),
            "special_tokens_map.json": _json({k: v for k, v in special.items() if v is not None})}, ids


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode()


# ----------------------------------------------------------------------------------------------------
# export

def checkpoint_tokenizer(ckpt: dict, override: str | None = None) -> data.Tokenizer:
    """The tokenizer a checkpoint was trained with (its train config's spec, checked against the recorded
    sha256), or `override`, which must have the same sha256."""
    ident = ckpt.get("tokenizer") or {}
    spec = override or (ckpt.get("config") or {}).get("tokenizer") or ident.get("name")
    if not spec:
        raise ValueError("the checkpoint records no tokenizer; pass --tokenizer PATH")
    try:
        tok = data.get_tokenizer(spec)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ValueError(f"cannot load the checkpoint's tokenizer {spec!r} ({e}); pass --tokenizer PATH "
                         f"to its tokenizer.json") from None
    if ident.get("sha256") and ident["sha256"] != tok.sha256:
        raise ValueError(f"tokenizer {spec!r} (sha256 {tok.sha256[:12]}) is not the one the checkpoint was trained "
                         f"with ({ident.get('name')}, sha256 {ident['sha256'][:12]})")
    if ident and ident.get("bos_id") != tok.bos_id:  # no bos_id recorded: trained before documents had BOS
        tok = replace(tok, bos_id=ident.get("bos_id"))
    return tok


def checked_state_dict(ckpt: dict, where: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, state_dict) of a checkpoint, the state dict checked against its own config."""
    for key in ("model", "model_config"):
        if key not in ckpt:
            raise ValueError(f"{where}: checkpoint has no {key!r} entry")
    try:
        cfg = ModelConfig(**ckpt["model_config"])
    except TypeError as e:
        raise ValueError(f"{where}: model_config does not fit this ModelConfig ({e})") from None
    sd = fuse_state_dict(ckpt["model"], cfg)  # a checkpoint from before q/k/v and gate/up were fused too
    with torch.device("meta"):
        expect = Xmodel(cfg).state_dict()
    missing = [k for k in expect if k not in sd]
    extra = [k for k in sd if k not in expect]
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expect.items()
           if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or extra or bad:
        raise ValueError(f"{where}: the weights do not match its model config (hidden={cfg.hidden}, "
                         f"n_layer={cfg.n_layer}, vocab_size={cfg.vocab_size}): missing {missing[:4]}, "
                         f"unexpected {extra[:4]}, shape mismatches {bad[:4]}")
    return cfg, sd


def trained_context(ckpt: dict, cfg: ModelConfig) -> int:
    """The largest seq_len among the phases of the checkpoint's curriculum that its step reached (the
    first phase at step 0), capped by max_seq_len; max_seq_len when the checkpoint records no phases."""
    phases = (ckpt.get("config") or {}).get("phases") or []
    step, start, longest = int(ckpt.get("step", 0)), 0, 0
    for p in phases:
        if start < step or not longest:
            longest = max(longest, int(p.get("seq_len", 0)))
        start += int(p.get("steps", 0))
    return min(longest, cfg.max_seq_len) if longest else cfg.max_seq_len


def llama_config(cfg: ModelConfig, dtype: str, ids: dict, max_positions: int) -> dict:
    """config.json for LlamaForCausalLM; rope_theta and rope_parameters both, for old and new transformers."""
    return {"architectures": [LLAMA_ARCH], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": max_positions, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": float(cfg.rope_base), "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
            "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"],
            "pad_token_id": ids["eos_token_id"], "torch_dtype": dtype, "dtype": dtype}


def export_tensors(cfg: ModelConfig, sd: dict, dtype: torch.dtype) -> dict:
    """Our state dict -> Llama tensors with the multipliers folded in."""
    mult, sd = multipliers(cfg), split_state_dict(sd, cfg)
    out = {hf: fold(sd[ours].detach().cpu(), mult[m] if m else 1.0, dtype) for ours, hf, m in name_map(cfg)}
    head = sd["tok_emb.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    out["lm_head.weight"] = fold(head.detach().cpu(), mult["lm_head"], dtype)
    return out


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output that the export would destroy: a file, a non-empty folder without --overwrite, and,
    even with it, anything but a model folder (config.json naming a model type or architecture, no
    checkpoint): replacing the folder deletes all it holds, and a run directory (checkpoints, metrics), a
    checkpoint or an unrelated folder given as the output by mistake must survive."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"output {str(out_dir)!r} is a file, not a folder: choose another output folder")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"output {str(out_dir)!r} exists and is not empty (pass --overwrite to replace it)")
    try:
        conf = _json_file(out_dir / "config.json")
    except ValueError:
        conf = {}
    if runtime.list_checkpoints(str(out_dir)) or (out_dir / runtime.MANIFEST).exists() or \
            not (conf.get("model_type") or conf.get("architectures")):
        raise ValueError(f"output {str(out_dir)!r} is not a Hugging Face model folder (a run directory, a "
                         f"checkpoint or another folder): --overwrite replaces only a previous export; "
                         f"choose another output folder")


def _write_dir_atomic(out_dir: Path, files: dict, overwrite: bool) -> None:
    """Write {name: bytes or tensors-dict} into a temporary sibling directory, then rename it to out_dir."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is for serving containers too
    try:
        for name, content in files.items():
            if isinstance(content, dict):
                save_file(content, str(tmp / name), metadata={"format": "pt"})
            else:
                (tmp / name).write_bytes(content)
            os.chmod(tmp / name, 0o644)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export(checkpoint: str, out_dir: str, dtype: str = "float32", tokenizer: str | None = None,
           overwrite: bool = False, max_position_embeddings: int | None = None) -> dict:
    """Write a LlamaForCausalLM folder for a checkpoint (a ckpt_*.pt file or a run directory).
    Returns the config.json written."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_replaceable(Path(out_dir), overwrite)  # before the checkpoint is read, which takes long
    ckpt = runtime.load_checkpoint(checkpoint)
    cfg, sd = checked_state_dict(ckpt, checkpoint)
    tok = checkpoint_tokenizer(ckpt, tokenizer)
    if tok.n_vocab > cfg.vocab_size:
        print(f"warning: tokenizer has {tok.n_vocab} ids but the model only {cfg.vocab_size}", file=sys.stderr)
    max_positions = max_position_embeddings or trained_context(ckpt, cfg)
    if not 0 < max_positions <= cfg.max_seq_len:
        raise ValueError(f"--max_position_embeddings must be in [1, max_seq_len={cfg.max_seq_len}], "
                         f"got {max_positions}")
    files, ids = tokenizer_files(tok, max_positions)
    if "tokenizer.json" not in files:
        print(f"warning: tokenizer {tok.name!r} is not a Hugging Face tokenizer; the export has no "
              f"tokenizer.json (supply one to use the folder with transformers)", file=sys.stderr)
    conf = llama_config(cfg, dtype, ids, max_positions)
    conf["xmodel_mup"] = {"format": EXPORT_FORMAT, "model_config": asdict(cfg), "multipliers": multipliers(cfg),
                          "step": int(ckpt.get("step", 0)), "tokens": int(ckpt.get("tokens", 0)),
                          "tokenizer": ckpt.get("tokenizer") or tok.identity, "train_config": ckpt.get("config")}
    if "tokenizer.json" in files:  # how hf_dir_tokenizer recognizes the training tokenizer in it
        conf["xmodel_mup"]["tokenizer_json_sha256"] = hashlib.sha256(files["tokenizer.json"]).hexdigest()
    gen = {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"],
           "pad_token_id": ids["eos_token_id"]}
    files.update({"config.json": _json(conf), "generation_config.json": _json(gen),
                  SAFETENSORS: export_tensors(cfg, sd, DTYPES[dtype])})
    _write_dir_atomic(Path(out_dir), files, overwrite)
    return conf


# ----------------------------------------------------------------------------------------------------
# import

def _read_llama_weights(d: Path) -> dict:
    from safetensors.torch import load_file as _load

    def load_file(path):  # a truncated or foreign file: one line naming it, not a traceback from the reader
        try:
            return _load(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:120]})") from None
    if (d / SAFETENSORS).is_file():
        return load_file(str(d / SAFETENSORS))
    index = d / (SAFETENSORS + ".index.json")
    if index.is_file():
        out = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(d / shard)))
        return out
    for name in ("pytorch_model.bin", "model.pt", "consolidated.pth"):
        if (d / name).is_file():
            sd = torch.load(d / name, map_location="cpu", weights_only=True)
            return sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    raise FileNotFoundError(f"{str(d)!r}: no weights ({SAFETENSORS}, its .index.json, or pytorch_model.bin)")


def _foreign_config(conf: dict, overrides: dict, where: str) -> ModelConfig:
    """Our ModelConfig for a Llama config.json that was not written by this exporter."""
    if conf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {conf['hidden_act']!r} is not supported (SwiGLU needs silu)")
    for key in ("attention_bias", "mlp_bias"):
        if conf.get(key):
            raise ValueError(f"{where}: {key}=true is not supported (this model has no biases)")
    rp = conf.get("rope_parameters") or {}
    rope_type = (conf.get("rope_scaling") or {}).get("rope_type") or rp.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"{where}: RoPE scaling {rope_type!r} is not supported (plain RoPE only)")
    try:
        hidden, n_head = conf["hidden_size"], conf["num_attention_heads"]
        kw = dict(vocab_size=conf["vocab_size"], n_layer=conf["num_hidden_layers"], hidden=hidden,
                  ffn_hidden=conf["intermediate_size"], n_head=n_head,
                  n_kv_head=conf.get("num_key_value_heads") or n_head,
                  rope_base=float(conf.get("rope_theta") or rp.get("rope_theta") or 10000.0),
                  max_seq_len=conf.get("max_position_embeddings", 4096),
                  norm_eps=conf.get("rms_norm_eps", 1e-6), tie_embeddings=False)
    except KeyError as e:
        raise ValueError(f"{where}: config.json lacks {e.args[0]!r}") from None
    if conf.get("head_dim") not in (None, hidden // n_head):
        raise ValueError(f"{where}: head_dim {conf['head_dim']} != hidden_size/num_attention_heads = "
                         f"{hidden // n_head} is not supported")
    kw.update(overrides)
    return ModelConfig(**kw)


def import_hf(path: str, overrides: dict | None = None) -> tuple[ModelConfig, dict, dict]:
    """A Llama-format folder -> (ModelConfig, our state_dict (float32), info).

    info: {"step", "tokens", "tokenizer" (identity or None), "train_config", "inexact" (elements of a tied
    embedding whose two exported images could not both be reproduced; 0 for our exports)}.
    overrides: ModelConfig fields for a folder without "xmodel_mup" (e.g. {"use_mup": False})."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{str(d)!r} is not a Hugging Face model folder (no config.json)")
    try:
        conf = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    arch = conf.get("architectures") or [conf.get("model_type")]
    if arch != [LLAMA_ARCH]:
        raise ValueError(f"{d / 'config.json'}: architecture {arch} is not supported; import reads "
                         f"{LLAMA_ARCH} folders only (convert the model to the Llama layout first)")
    meta = conf.get("xmodel_mup")
    if meta is not None:
        if meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{d}: xmodel_mup format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
        known = {f.name for f in fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in meta["model_config"].items() if k in known}, **(overrides or {}))
        if multipliers(cfg) != meta["multipliers"]:
            raise ValueError(f"{d}: the recorded multipliers {meta['multipliers']} do not follow from the recorded "
                             f"model config ({multipliers(cfg)})")
    else:
        cfg = _foreign_config(conf, dict(overrides or {}), str(d / "config.json"))
    hf = {k: v for k, v in _read_llama_weights(d).items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in hf and conf.get("tie_word_embeddings") and "model.embed_tokens.weight" in hf:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]  # a tied Llama stores one tensor
    rows = name_map(cfg) + [("lm_head.weight", "lm_head.weight", "lm_head")]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in split_state_dict(Xmodel(cfg).state_dict(), cfg).items()}
    shapes["lm_head.weight"] = shapes["tok_emb.weight"]
    missing = [h for _, h, _ in rows if h not in hf]
    extra = sorted(set(hf) - {h for _, h, _ in rows})
    if missing or extra:
        raise ValueError(f"{d}: not a Llama state dict of this shape (n_layer={cfg.n_layer}): missing tensors "
                         f"{missing[:4]}, unexpected tensors {extra[:4]}")
    bad = [f"{h} {tuple(hf[h].shape)} (expected {shapes[o]})" for o, h, _ in rows if tuple(hf[h].shape) != shapes[o]]
    if bad:
        raise ValueError(f"{d}: tensor shapes do not match config.json: {bad[:4]}")
    mult = multipliers(cfg)
    sd = {o: unfold(hf[h], mult[m] if m else 1.0) for o, h, m in rows if o != "lm_head.weight"}
    inexact = 0
    if cfg.tie_embeddings:
        sd["tok_emb.weight"], inexact = unfold_tied(hf["model.embed_tokens.weight"], mult["embed_tokens"],
                                                    hf["lm_head.weight"], mult["lm_head"])
    else:
        sd["lm_head.weight"] = unfold(hf["lm_head.weight"], mult["lm_head"])
    sd = fuse_state_dict(sd, cfg)
    meta = meta or {}
    info = {"step": meta.get("step", 0), "tokens": meta.get("tokens", 0), "tokenizer": meta.get("tokenizer"),
            "train_config": meta.get("train_config"), "inexact": inexact}
    if info["tokenizer"] is None and (d / "tokenizer.json").is_file():
        info["tokenizer"] = hf_dir_tokenizer(d).identity
    return cfg, sd, info


def _json_file(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return obj if isinstance(obj, dict) else {}


def hf_dir_tokenizer(path, override: str | None = None) -> data.Tokenizer:
    """The tokenizer of a Hugging Face folder: its tokenizer.json (or `override`), with BOS as its
    tokenizer_config.json says (add_bos_token and bos_token; the token names decide where it says
    nothing). The tokenizer.json this exporter wrote (sha256 recorded in config.json) is read back as
    the training tokenizer, whose identity config.json records; the bundled DeepSeek-V3 tokenizer when
    it is that, so datasets prepared with it match."""
    d = Path(path)
    f = Path(override) if override else d / "tokenizer.json"
    if not f.is_file():
        raise FileNotFoundError(f"no tokenizer: {str(f)!r} does not exist (pass --tokenizer PATH)")
    tok = data.get_tokenizer(str(f))
    meta = _json_file(d / "config.json").get("xmodel_mup") or {}
    trained = meta.get("tokenizer") or {}
    if trained.get("sha256") and meta.get("tokenizer_json_sha256") == tok.sha256:
        tok = replace(tok, name=trained.get("name", tok.name), sha256=trained["sha256"])
    ds = data.get_tokenizer(data.DEFAULT_TOKENIZER)
    tok = ds if ds.sha256 == tok.sha256 else tok
    cfg = _json_file(d / "tokenizer_config.json")
    if "add_bos_token" in cfg:
        name = cfg.get("bos_token")
        name = name.get("content") if isinstance(name, dict) else name
        ids = tok.encode(name) if cfg["add_bos_token"] and isinstance(name, str) else []
        if (ids[0] if len(ids) == 1 else None) != tok.bos_id:
            tok = replace(tok, bos_id=ids[0] if len(ids) == 1 else None)
    return tok


def build(cfg: ModelConfig, sd: dict, device="cpu") -> Xmodel:
    """An Xmodel holding sd; buffers sd lacks (FP8 amax histories) keep their fresh values."""
    with torch.device(device):
        model = Xmodel(cfg)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("amax_history", "scale"))]
    if missing or result.unexpected_keys:
        raise ValueError(f"state dict does not fit the model: missing {missing[:4]}, unexpected "
                         f"{result.unexpected_keys[:4]}")
    return model


def import_to_checkpoint(hf_dir: str, out_dir: str, overrides: dict | None = None) -> str:
    """Write HF_DIR as a train.py checkpoint (weights only) in out_dir; returns its path."""
    if runtime.list_checkpoints(out_dir):
        raise ValueError(f"{out_dir!r} already holds checkpoints; import into an empty directory")
    cfg, sd, info = import_hf(hf_dir, overrides)
    if info["inexact"]:
        print(f"warning: {info['inexact']} elements of the tied embedding could not reproduce both embed_tokens "
              f"and lm_head exactly (the folder was not written by this exporter?)", file=sys.stderr)
    model = build(cfg, sd)
    state = {"model": model.state_dict(), "model_config": asdict(cfg), "config": info["train_config"] or {},
             "tokenizer": info["tokenizer"], "tokens": info["tokens"], "optim": None, "rng": None,
             "imported_from": str(Path(hf_dir).resolve())}
    return runtime.save_checkpoint(out_dir, info["step"], state, keep=1)


# ----------------------------------------------------------------------------------------------------
# loading anything (used by tools.eval and tools.sample)

def load_any(path: str, tokenizer: str | None = None, device="cpu") -> tuple[Xmodel, data.Tokenizer, dict]:
    """(model in eval mode, tokenizer, info) for a checkpoint file, a run directory or a Llama folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path!r} does not exist")
    if p.is_dir() and (p / "config.json").is_file() and not runtime.list_checkpoints(str(p)):
        cfg, sd, info = import_hf(str(p))
        tok = hf_dir_tokenizer(p, tokenizer)
        if info["tokenizer"] and info["tokenizer"].get("sha256") not in (None, tok.sha256):
            raise ValueError(f"tokenizer {tok.name!r} is not the one {path!r} was trained with "
                             f"({info['tokenizer'].get('name')})")
        info["kind"] = "hf"
    else:
        ckpt = runtime.load_checkpoint(str(p))
        cfg, sd = checked_state_dict(ckpt, str(p))
        tok = checkpoint_tokenizer(ckpt, tokenizer)
        info = {"step": ckpt.get("step", 0), "tokens": ckpt.get("tokens", 0), "kind": "checkpoint"}
    model = build(cfg, sd, device).eval()
    return model, tok, info


def to_file(checkpoint: str, out: str, overwrite: bool = False) -> str:
    """A checkpoint (a directory written by the ranks of a run, or a run directory's latest) as one file in the
    single-file layout (weights, optimizer state, configs; with its sha256 beside it), for tools elsewhere."""
    if os.path.isdir(out) or out.endswith(("/", os.sep)):  # the file's .sha256 would land inside it
        raise ValueError(f"{out!r} is a directory: --to_file writes one file (give its path, e.g. "
                         f"{out.rstrip('/')}/ckpt.pt)")
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out!r} exists (--overwrite replaces it)")
    return runtime.write_checkpoint_file(out, runtime.load_checkpoint(checkpoint))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.export",
                                 description="Export a checkpoint as a stock LlamaForCausalLM folder, or import one.")
    ap.add_argument("src", help="checkpoint (ckpt_*.pt or run directory); with --import, a Llama folder")
    ap.add_argument("out", help="output folder (export) or checkpoint directory (import)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous export (a Hugging Face model folder "
                    "only: never a run directory or a checkpoint); with --to_file, an existing file")
    ap.add_argument("--max_position_embeddings", type=tools.positive_int, default=None,
                    help="the context the export promises (default: the longest the checkpoint was trained at)")
    ap.add_argument("--import", dest="do_import", action="store_true", help="Llama folder -> checkpoint")
    ap.add_argument("--to_file", "--to-file", action="store_true",
                    help="a checkpoint (the trainer's directory, or a run's latest) -> one .pt file with its .sha256")
    ap.add_argument("--mup", action="append", default=[], metavar="KEY=VALUE",
                    help="import: ModelConfig fields for a folder without xmodel_mup (e.g. use_mup=false)")
    args = ap.parse_args(argv)
    if args.to_file:
        path = to_file(args.src, args.out, args.overwrite)
        print(f"wrote {args.src} -> {path} (one file; its sha256 in {path}.sha256)")
    elif args.do_import:
        path = import_to_checkpoint(args.src, args.out, tools.model_overrides(args.mup, "--mup"))
        print(f"imported {args.src} -> {path} (weights only: training from it starts fresh optimizer state)")
    else:
        conf = export(args.src, args.out, args.dtype, args.tokenizer, args.overwrite, args.max_position_embeddings)
        print(f"exported {args.src} -> {args.out} (LlamaForCausalLM, {conf['num_hidden_layers']} layers, "
              f"{args.dtype}, multipliers {conf['xmodel_mup']['multipliers']})")


if __name__ == "__main__":
    tools.run(main)
