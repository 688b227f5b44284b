"""The Xmodel-2.5 decoder: a deep-and-thin Llama-style transformer written for μP.

Xmodel-2.5 (arXiv 2511.19496) is a 1.3B-parameter decoder: 48 blocks of width 1536, each a pre-RMSNorm
grouped-query attention (24 query heads sharing 8 key/value heads, head dim 64, RoPE base 500,000)
followed by a pre-RMSNorm SwiGLU MLP (3840 wide), no biases anywhere, and a 129,280-row token embedding
that doubles as the output projection (tied embeddings). "Deep and thin" means many narrow layers; at
this width the embedding alone is 15% of the parameters and the 129,280-way softmax is most of the
cost of a small proxy, which is why the loss here is computed in chunks (see `chunked_cross_entropy`).
As in the original (Megatron's linear_qkv and linear_fc1), q, k, v are one linear and gate, up another
(`fused_parts`): fewer, larger GEMMs, and under FP8 one quantization of their shared input. Attention is one
F.scaled_dot_product_attention call (`sdpa`) that gets the 8 K/V heads un-repeated (enable_gqa); which fused
kernel runs it (flash, cuDNN, ...) is PyTorch's choice unless `attn_backend` forces one.

What makes it μP (the maximal-update parameterization, Yang et al.) is a handful of multipliers in the
forward pass, all read from `ModelConfig` and written out below where they act:

    x      = embed(ids) * input_scale                    (x12: the embedding output is O(1) at any width)
    x      = x + attn(norm(x)) * residual_scale/sqrt(L)  (1.4/sqrt(48): each branch, both kinds)
    x      = x + mlp(norm(x))  * residual_scale/sqrt(L)
    logits = embed.weight @ norm(x) * output_scale / m   (m = hidden / base_width: width multiplier)
    attn   = softmax(q k^T / head_dim) v                 (1/d instead of 1/sqrt(d): q.k grows like d
                                                          once q and k become correlated in training)

The other two μP rules, the initialisation (embedding N(0, 0.1), hidden matrices N(0, 0.1/sqrt(m)),
attention-out and MLP-down N(0, 0.1/sqrt(2 n_layer)) as in the original) and the per-group Adam learning
rates (hidden and norms 0.01/m, embedding 0.01), live in mup.py, which is also
where a model is built (`mup.build_model`): a bare `Xmodel(cfg)` keeps torch's default init.
With `use_mup=False` the same code is the standard parameterization (1/sqrt(head_dim), no multipliers,
one width-independent init std), for side-by-side comparisons.
"""
import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint


# The block linears fp8_layers can name: attn.wqkv ([q;k;v]), attn.wo (the attention output projection),
# mlp.w_gate_up ([gate;up]), mlp.w_down. Which run in FP8 is a measured choice (docs/FP8.md, "Which layers
# run in FP8")
FP8_LAYERS = ("qkv", "out", "gate_up", "down")
# The SDPA kernels attn_backend can force ("auto": PyTorch picks, per call, the first of its priority order whose
# checks pass); GQA_MODES: how the shared K/V heads reach it (`sdpa`)
ATTN_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
GQA_MODES = ("native", "repeat")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass
class ModelConfig:
    vocab_size: int = 129280      # DeepSeek-V3 tokenizer's 128,815 tokens, padded
    n_layer: int = 48             # transformer blocks (deep and thin)
    hidden: int = 1536            # model width (the μP width: m = hidden / base_width)
    ffn_hidden: int = 3840        # SwiGLU inner size
    n_head: int = 24              # attention (query) heads; head_dim = hidden / n_head
    n_kv_head: int = 8            # grouped-query attention: n_head / n_kv_head queries share a K/V head
    rope_base: float = 500000.0   # RoPE frequency base
    max_seq_len: int = 131072     # the longest sequence the model accepts (RoPE tables, generation)
    norm_eps: float = 1e-5        # RMSNorm epsilon
    tie_embeddings: bool = True   # the embedding doubles as the output projection
    # μP: every constant of the parameterization is here and nowhere else
    use_mup: bool = True          # μP multipliers and init; False = the standard parameterization
    base_width: int = 256         # the width at which base learning rates are tuned (m = hidden / base_width)
    input_scale: float = 12.0     # embedding output multiplier
    output_scale: float = 1.0     # logits multiplier, divided by m
    residual_scale: float = 1.4   # residual branch multiplier, divided by sqrt(n_layer)
    init_std: float = 0.1         # embedding std; hidden matrices get init_std / sqrt(m) under μP
    # the original's choice (default) or the μP-pure one; docs/MUP.md "Recipe fidelity" argues it
    muon_fused: bool = True       # Muon orthogonalizes [q;k;v] and [gate;up] as one matrix each, as the original
    norm_lr: str = "hidden"       # norm weights' LR: "hidden" (lr/m, as the original) | "embedding" (emb_lr, μP)
    init_out: str = "depth"       # attn-out/MLP-down std: "depth" (init_std/sqrt(2 n_layer), original) | "mup" (/sqrt(m))
    # execution
    fp8: bool = False             # the blocks' linear layers in FP8 (fp8.py)
    fp8_backend: str = "torch"    # FP8 GEMM: "torch" (torch._scaled_mm, cuBLASLt; the faster) | "triton" (fp8.py)
    fp8_layers: str = "qkv,out,gate_up,down"  # with fp8: the block linears in FP8 (the rest bf16), docs/FP8.md
    fp8_margin: int = 0           # delayed scaling's margin: scale = fp8_max / max(history) / 2^margin (TE's, 0)
    act_ckpt: bool = False        # activation checkpointing per block (recompute in backward)
    loss_chunk: int = 1024        # tokens per chunk of the chunked cross-entropy (fp32 on a CPU: at most 256)
    # attention kernel (docs/PERFORMANCE.md, "Attention backends"; tools/gpu_check.py's section "attn" times them).
    # gqa="repeat" is for the efficient kernel: PyTorch's dispatch (aten sdp_utils.cpp) lets flash (since 2.5) and
    # cuDNN take n_head != n_kv_head, but efficient's checks (check_batch_size_and_num_heads_dense<false>) refuse
    # it in every release up to at least 2.11, the H200's: with enable_gqa it never runs there (forced: "No
    # available kernel"). pytorch PR 191085 (July 2026, after 2.12) gives CUDA's efficient kernel GQA; ROCm's has
    # none. torch 2.13's CPU build runs flash and math with enable_gqa (tests/test_model.py)
    attn_backend: str = "auto"    # SDPA kernel: "auto" (PyTorch's choice) | "flash" | "efficient" | "cudnn" | "math"
    gqa: str = "native"           # K/V heads: "native" (enable_gqa, never copied) | "repeat" (copied to n_head first)

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "hidden", "ffn_hidden", "n_head", "n_kv_head", "max_seq_len",
                     "base_width", "loss_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"model config: {name} must be a positive integer, got {v!r}")
        for name in ("rope_base", "norm_eps", "input_scale", "output_scale", "residual_scale", "init_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"model config: {name} must be a positive number, got {v!r}")
        if not isinstance(self.fp8_margin, int) or isinstance(self.fp8_margin, bool) or not 0 <= self.fp8_margin <= 8:
            raise ValueError(f"model config: fp8_margin must be an integer in 0..8, got {self.fp8_margin!r}")
        if not isinstance(self.muon_fused, bool):
            raise ValueError(f"model config: muon_fused must be true or false, got {self.muon_fused!r}")
        for name, choices in (("norm_lr", ("hidden", "embedding")), ("init_out", ("depth", "mup")),
                              ("attn_backend", tuple(ATTN_BACKENDS)), ("gqa", GQA_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"model config: {name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.hidden % self.n_head:
            raise ValueError(f"model config: n_head={self.n_head} does not divide hidden={self.hidden}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model config: n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
        if self.fp8_backend not in ("triton", "torch"):
            raise ValueError(f"model config: fp8_backend must be 'triton' or 'torch', got {self.fp8_backend!r}")
        self._check_fp8_layers()
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim = hidden/n_head = {self.head_dim} must be even for RoPE "
                             f"(hidden={self.hidden}, n_head={self.n_head})")

    def _check_fp8_layers(self):
        if not isinstance(self.fp8_layers, str):
            raise ValueError(f"model config: fp8_layers must be a string such as 'qkv,gate_up,down', got "
                             f"{self.fp8_layers!r}")
        names = self.fp8_layer_names
        unknown = [n for n in names if n not in FP8_LAYERS]
        problem = (f"unknown names {unknown}" if unknown else "a layer named twice" if len(set(names)) < len(names)
                   else "no layer, with fp8=True (set fp8=False for none)" if self.fp8 and not names else None)
        if problem:
            raise ValueError(f"model config: fp8_layers must be comma-separated names from {','.join(FP8_LAYERS)}; "
                             f"{self.fp8_layers!r} has {problem}")

    @property
    def fp8_layer_names(self) -> tuple:
        """The names in fp8_layers (FP8_LAYERS: which linear of each block each one is)."""
        return tuple(n.strip() for n in self.fp8_layers.split(",") if n.strip())

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head

    @property
    def width_mult(self) -> float:
        """m = hidden / base_width: how much wider than the proxy-tuning width this model is."""
        return self.hidden / self.base_width

    # The forward-pass multipliers. Under the standard parameterization they are all 1 (and the
    # attention scale is the usual 1/sqrt(d)).
    @property
    def embed_mult(self) -> float:
        return self.input_scale if self.use_mup else 1.0

    @property
    def residual_mult(self) -> float:
        return self.residual_scale / math.sqrt(self.n_layer) if self.use_mup else 1.0

    @property
    def logit_mult(self) -> float:
        return self.output_scale / self.width_mult if self.use_mup else 1.0

    @property
    def attn_scale(self) -> float:
        return 1.0 / self.head_dim if self.use_mup else 1.0 / math.sqrt(self.head_dim)


def _linear(cfg: ModelConfig, n_in: int, n_out: int, name: str) -> nn.Module:
    """The block linear `name` (FP8_LAYERS): FP8 when cfg.fp8 and fp8_layers names it, else a plain (bf16) one."""
    if cfg.fp8 and name in cfg.fp8_layer_names:
        from fp8 import FP8Linear  # only FP8 runs pay for importing it (and Triton)
        return FP8Linear(n_in, n_out, gemm=cfg.fp8_backend, margin=cfg.fp8_margin)
    return nn.Linear(n_in, n_out, bias=False)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), with the statistics in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, base: float, device=None, start: int = 0):
    """cos, sin of shape [seq_len, head_dim/2] for positions start..start+seq_len-1 (fp32)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + d/2]) of the last dim by the angle pos * base^(-2i/d).

    The half-split pairing is Hugging Face Llama's, so exported q/k weights need no permutation.
    x: [B, H, T, d]; cos, sin: [T, d/2]."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    y = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return y.to(x.dtype)


def fused_parts(cfg: ModelConfig) -> dict[str, tuple[str, dict[str, int]]]:
    """The linears each block stores fused, as the original does: {submodule: (fused linear, {part: rows})}.

    q, k and v read the same normed input, and so do gate and up, so each group is one linear whose weight
    stacks the parts' rows: attn.wqkv = [wq; wk; wv] (the original's linear_qkv, 2560 x 1536 at 1.3B) and
    mlp.w_gate_up = [w_gate; w_up] (its linear_fc1, 7680 x 1536). One GEMM instead of three (or two) reads
    the input once and, under FP8, quantizes it once. The part names are the weights' names before fusing:
    old checkpoints hold them (`fuse_state_dict`), and the Llama export writes them apart (`split_state_dict`).
    The original interleaves q, k, v rows per K/V group; plain stacking is a permutation of its rows, which
    changes neither the function (the output is split to match) nor Muon's update (orthogonalization
    commutes with row permutations)."""
    kv = cfg.n_kv_head * cfg.head_dim
    return {"attn": ("wqkv", {"wq": cfg.n_head * cfg.head_dim, "wk": kv, "wv": kv}),
            "mlp": ("w_gate_up", {"w_gate": cfg.ffn_hidden, "w_up": cfg.ffn_hidden})}


def _fuse_parts(sd: dict, prefix: str, fused: str, parts) -> None:
    """In place: a state dict's separate part weights under `prefix` become the fused one. FP8 scaling state
    merges exactly: each part recorded its amaxes at the same steps, and the fused tensor's amax is the
    largest of its parts', so its history is their elementwise max and its scale (fp8_max / max(history))
    their minimum. A state dict without (all) the parts is left as it is."""
    keys = {name: prefix + name + ".weight" for name in parts}
    if prefix + fused + ".weight" in sd or not all(k in sd for k in keys.values()):
        return
    sd[prefix + fused + ".weight"] = torch.cat([sd.pop(k) for k in keys.values()])
    for buf, merge in (("amax_history", torch.amax), ("scale", torch.amin)):
        bufs = [prefix + name + "." + buf for name in parts]
        if all(k in sd for k in bufs):
            sd[prefix + fused + "." + buf] = merge(torch.stack([sd.pop(k) for k in bufs]), 0)


def fuse_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """A state dict in this model's layout from one that may hold separate q/k/v and gate/up weights (written
    before they were fused); a model's load_state_dict does the same by itself."""
    sd = dict(sd)
    for i in range(cfg.n_layer):
        for sub, (fused, parts) in fused_parts(cfg).items():
            _fuse_parts(sd, f"blocks.{i}.{sub}.", fused, parts)
    return sd


def split_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """The fused weights of a state dict written apart again, under their part names (the fused layers' FP8
    scaling state is kept as it is: it has no per-part equivalent)."""
    sd = dict(sd)
    for i in range(cfg.n_layer):
        for sub, (fused, parts) in fused_parts(cfg).items():
            key = f"blocks.{i}.{sub}.{fused}.weight"
            if key in sd:
                w = sd.pop(key)
                sd.update({f"blocks.{i}.{sub}.{n}.weight": p for n, p in zip(parts, w.split(list(parts.values())))})
    return sd


class _Fused(nn.Module):
    """A block submodule holding one fused linear (`fused_parts`): old checkpoints with the parts apart load."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _fuse_parts(state_dict, prefix, self.fused, self.parts)  # load_state_dict hands each module a copy
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Attention(_Fused):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale, self.attn_backend, self.gqa = cfg.attn_scale, cfg.attn_backend, cfg.gqa
        self.fused, self.parts = fused_parts(cfg)["attn"]
        self.wqkv = _linear(cfg, cfg.hidden, sum(self.parts.values()), "qkv")
        self.wo = _linear(cfg, cfg.n_head * cfg.head_dim, cfg.hidden, "out")

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(list(self.parts.values()), dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal, mask = True, None
        if cache is not None:  # generation: append to this layer's K/V and attend to all of it
            if "k" in cache:
                k, v = torch.cat((cache["k"], k), 2), torch.cat((cache["v"], v), 2)
                # new token i is at position P + i: it sees the P cached ones and new ones 0..i (SDPA's
                # is_causal would align the triangle top-left instead)
                P = k.shape[2] - T
                causal = False
                mask = None if T == 1 else torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
            cache["k"], cache["v"] = k, v.contiguous()  # not a view that keeps the prompt's q and k alive
        # generation leaves the kernel to PyTorch: a forced one may refuse its mask (CUDA's flash takes none)
        y = sdpa(q, k, v, self.scale, self.attn_backend if cache is None else "auto", self.gqa, mask, causal)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


# PyTorch's words when no allowed SDPA kernel takes a call: on CUDA (after a warning per kernel saying why), on a CPU
NO_KERNEL = ("No available kernel", "No viable backend for scaled_dot_product_attention")


def no_kernel_message(cfg: ModelConfig, device) -> str:
    """Why a forced attn_backend failed, in the config's words (the kernel's own reasons: PyTorch's warnings)."""
    hint = " or gqa='repeat' (its kernel refuses enable_gqa in torch up to at least 2.11)" if \
        cfg.attn_backend == "efficient" and cfg.gqa == "native" and cfg.n_head != cfg.n_kv_head else ""
    return (f"model config: attn_backend={cfg.attn_backend!r} has no SDPA kernel for this model's attention on "
            f"{device} (torch {torch.__version__}; on CUDA PyTorch's warnings above say why). Choose "
            f"attn_backend='auto' (PyTorch's choice){hint}, or another of {tuple(ATTN_BACKENDS)}")


def repeat_kv(x, n_rep: int):
    """[B, Hkv, T, d] -> [B, Hkv * n_rep, T, d], each K/V head copied to the n_rep query heads that share it
    (query head h reads K/V head h // n_rep, as SDPA's enable_gqa and torch.repeat_interleave pair them)."""
    B, H, T, d = x.shape
    return x if n_rep == 1 else x[:, :, None].expand(B, H, n_rep, T, d).reshape(B, H * n_rep, T, d)


def kv_heads(q, k, v, gqa: str):
    """k, v as the SDPA call gets them: as they are for gqa "native" (enable_gqa broadcasts them), copied to q's
    heads for "repeat"."""
    if gqa == "repeat" and k.shape[1] != q.shape[1]:
        return repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    return k, v


def sdpa(q, k, v, scale: float, backend: str = "auto", gqa: str = "native", mask=None, causal: bool = True):
    """softmax(q k^T * scale + mask) v over q [B, H, T, d] and k, v [B, Hkv, S, d] (H a multiple of Hkv), with
    F.scaled_dot_product_attention: the model's attention, and what tools/gpu_check.py times (section "attn").
    A backend (ATTN_BACKENDS) other than "auto" allows that one SDPA kernel only (torch.nn.attention.sdpa_kernel,
    which torch.compile traces). gqa "native" hands K/V over un-repeated with enable_gqa, and the kernel
    broadcasts them; "repeat" copies them to H heads first (repeat_kv): the plain multi-head call every kernel
    takes, at the cost of the copies and of summing their gradients."""
    k, v = kv_heads(q, k, v, gqa)
    kernel = ATTN_BACKENDS[backend]
    with contextlib.nullcontext() if kernel is None else sdpa_kernel(kernel):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


class SwiGLU(_Fused):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused, self.parts = fused_parts(cfg)["mlp"]
        self.w_gate_up = _linear(cfg, cfg.hidden, 2 * cfg.ffn_hidden, "gate_up")
        self.w_down = _linear(cfg, cfg.ffn_hidden, cfg.hidden, "down")

    def forward(self, x):
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.residual_mult = cfg.residual_mult
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache) * self.residual_mult
        return x + self.mlp(self.mlp_norm(x)) * self.residual_mult


class Xmodel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.compiled = False  # set by compile_for_training
        self._fp8_layers = []
        if cfg.fp8:
            from fp8 import FP8Linear
            self._fp8_layers = [m for m in self.modules() if isinstance(m, FP8Linear)]
            for m in self._fp8_layers:  # hidden_states refreshes their cached FP8 weights, for compiled blocks too
                m.owner_refreshes_weight = True
        self._fp8_recorded = False  # a training forward recorded FP8 amaxes that update_fp8_scales has not taken

    @property
    def output_weight(self):
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, idx, start_pos: int = 0, caches=None):
        """Final-normed hidden states [B, T, hidden] for token ids idx [B, T]."""
        cfg = self.config
        T = idx.shape[1]
        if start_pos + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={cfg.max_seq_len}")
        if self._fp8_layers and self.training and torch.is_grad_enabled():  # this forward records amaxes
            if self._fp8_recorded:  # a loop that never calls update_fp8_scales still gets its scales updated
                self.update_fp8_scales()
            self._fp8_recorded = True
        for m in self._fp8_layers:  # the FP8 weights of this forward (fp8.FP8Linear.refresh_fp8_weight), made here:
            m.refresh_fp8_weight(self.training and torch.is_grad_enabled())  # compiled blocks cannot see a change
        cos, sin = rope_tables(T, cfg.head_dim, cfg.rope_base, idx.device, start_pos)
        x = self.tok_emb(idx) * cfg.embed_mult
        try:
            for i, block in enumerate(self.blocks):
                if cfg.act_ckpt and self.training and caches is None:
                    x = checkpoint(block, x, cos, sin, use_reentrant=False)
                else:
                    x = block(x, cos, sin, None if caches is None else caches[i])
        except RuntimeError as e:  # here, not in Attention: the compiled blocks raise it while tracing
            if cfg.attn_backend == "auto" or not any(words in str(e) for words in NO_KERNEL):
                raise
            raise RuntimeError(no_kernel_message(cfg, idx.device)) from e
        return self.norm(x)

    def logits(self, h):
        """Full fp32 logits for hidden states h: for sampling and evaluation of short inputs only."""
        return F.linear(h, self.output_weight.to(h.dtype)).float() * self.config.logit_mult

    def forward(self, idx, targets=None):
        """With targets: the mean next-token cross-entropy (targets < 0 are ignored), computed in chunks.
        Without: the fp32 logits [B, T, vocab]."""
        h = self.hidden_states(idx)
        if targets is None:
            return self.logits(h)
        if torch.is_autocast_enabled(h.device.type):  # the output GEMMs in the autocast dtype, softmax in fp32
            h = h.to(torch.get_autocast_dtype(h.device.type))
        # fp32 on a CPU: aten's row-wise softmax beats Inductor's fused chunk (forward of an 8 x 512 proxy step
        # 3.4 vs 4.0 s, 2 AVX2 threads), so there only the blocks are compiled
        compiled = self.compiled and not (h.dtype == torch.float32 and h.device.type == "cpu")
        return chunked_cross_entropy(h.flatten(0, 1), self.output_weight, targets.flatten(), self.config.logit_mult,
                                     self.config.loss_chunk, compiled=compiled)

    def update_fp8_scales(self):
        """The FP8 delayed-scaling step (fp8.update_scales) of every FP8 layer, after the backward of each
        training micro-batch: the amaxes its forward and backward recorded, all-reduced with MAX across ranks
        in one collective, become the histories and scales of the next micro-batch. train.py calls it after
        every backward; a model whose last training forward was not followed by it runs it at its next training
        forward (so a bare loop is still correct, but its checkpoints and evaluations miss the last micro-batch;
        under DDP, whose forward first broadcasts rank 0's buffers, they would reduce rank 0's amaxes only).
        Only training forwards do: sampling on one rank never enters a collective. Returns fp8.update_scales'
        range use ([3]: inputs, weights, output gradients; above 1 means saturated), None without FP8."""
        use = None
        if self._fp8_layers:
            from fp8 import update_scales
            use = update_scales(self._fp8_layers)
        self._fp8_recorded = False
        return use

    def compile_for_training(self, mode: str = "default"):
        """torch.compile each block (in place: parameter names are unchanged) and, but for fp32 on a CPU, the
        loss's per-chunk softmax/gradient. Opt-in because compiling costs tens of seconds per new shape; it pays back
        within a few steps (see tools/bench.py). mode: torch.compile's for the blocks (COMPILE_MODES; e.g.
        "reduce-overhead" replays each block as a CUDA graph, fewer launches where the GPU would idle)."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        for block in self.blocks:
            block.compile(mode=None if mode == "default" else mode)
        self.compiled = True
        return self

    @staticmethod
    def sample_next(logits, context=None, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, repetition_penalty: float = 1.0, generator=None):
        """Next ids [B] from logits [B, V]. The repetition penalty (CTRL, Keskar et al. 2019) divides the
        positive logits of tokens already in `context` [B, N] by it and multiplies the negative ones;
        temperature 0 is then greedy; else logits / T, cut to the top_k, then to the nucleus (Holtzman et
        al. 2020): the fewest most likely tokens whose probabilities sum to >= top_p."""
        if repetition_penalty != 1.0 and context is not None and context.numel():
            z = logits.gather(1, context)
            logits = logits.scatter(1, context, torch.where(z > 0, z / repetition_penalty, z * repetition_penalty))
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            p, order = logits.softmax(-1).sort(-1, descending=True)
            drop = p.cumsum(-1) - p >= top_p  # the mass before a token already reaches top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens: int, eos_id: int | None = None, caches: list | None = None,
                        **sampling):
        """Yield sampled token ids one at a time (a [B] tensor each), using a KV cache; `sampling` goes to
        sample_next. idx is the whole context; `caches` (a list of per-layer dicts, kept by the caller
        across calls, as a chat does) may already hold the K/V of a prefix of it: only the rest is run."""
        if idx.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {idx.shape[1] + max_new_tokens} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        caches = [{} for _ in self.blocks] if caches is None else caches
        pos = caches[0]["k"].shape[2] if "k" in caches[0] else 0
        if pos >= idx.shape[1]:
            raise ValueError(f"the cache holds {pos} tokens: idx ({idx.shape[1]}) must add at least one")
        x = idx[:, pos:]
        for _ in range(max_new_tokens):
            logits = self.logits(self.hidden_states(x, pos, caches)[:, -1])
            pos += x.shape[1]
            nxt = self.sample_next(logits, idx, **sampling)
            yield nxt
            if eos_id is not None and bool((nxt == eos_id).all()):
                return
            x = nxt[:, None]
            idx = torch.cat((idx, x), 1)

    def generate(self, idx, max_new_tokens: int, **kw):
        """idx [B, T] -> idx with up to max_new_tokens sampled tokens appended."""
        new = list(self.generate_stream(idx, max_new_tokens, **kw))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    def num_params(self, embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embedding else n - self.tok_emb.weight.numel()

    def fused_weights(self) -> list[tuple[nn.Parameter, list[int]]]:
        """Every block's fused weights ([q; k; v], [gate; up]: `fused_parts`) with their parts' row counts, in
        parameter order: μP initialises each part as the matrix it stands for, and Muon may orthogonalize
        the parts apart (mup.param_groups)."""
        return [(getattr(m, m.fused).weight, list(m.parts.values())) for b in self.blocks for m in (b.attn, b.mlp)]

    def num_hidden_params(self) -> int:
        """The blocks' weight matrices: μP's "hidden" group, the matrices Muon takes over at the switch."""
        return sum(p.numel() for p in self.blocks.parameters() if p.dim() == 2)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight of every matmul (blocks and output layer; the embedding
        lookup is free) plus causal attention, 6 * n_layer * seq_len * n_head * head_dim (half of PaLM's
        12 L T d since only the lower triangle is computed)."""
        cfg = self.config
        return 6.0 * (self.num_hidden_params() + cfg.vocab_size * cfg.hidden) + 6.0 * cfg.n_layer * seq_len * \
            cfg.n_head * cfg.head_dim

    def memory_estimate_gb(self, micro_batch: int, seq_len: int, muon: bool = False, world: int = 1,
                           zero1: bool = False, act_ckpt: bool = False) -> float:
        """Per-GPU training memory, in GB: fp32 master weights and gradients (8 B/param), optimizer state
        (AdamW 8 B/param, Muon 4 B per hidden weight; ZeRO-1 divides it by the world size), and activations
        under bf16 autocast with SDPA (about 34 bytes x tokens x hidden per layer, Korthikanti et al. 2022,
        without the s^2 term flash attention removes; with checkpointing only each block's fp32 input plus one
        block's activations), plus the chunked loss (one chunk of fp32 logits, twice), plus with FP8 the weight
        cache (each FP8 layer's weight as an FP8 copy and its transpose: 2 B/param)."""
        cfg, n, n_hidden = self.config, self.num_params(), self.num_hidden_params()
        opt = (8 * (n - n_hidden) + (4 if muon else 8) * n_hidden) / (world if zero1 else 1)
        fp8_cache = 2 * sum(m.weight.numel() for m in self._fp8_layers)
        tokens = micro_batch * seq_len
        per_layer = 34 * tokens * cfg.hidden
        act = (4 * tokens * cfg.hidden * cfg.n_layer + per_layer) if act_ckpt else per_layer * cfg.n_layer
        loss = 2 * 4 * cfg.loss_chunk * cfg.vocab_size + 2 * tokens * cfg.hidden * 4
        return (8 * n + opt + fp8_cache + act + loss) / 1e9


def _loss_and_grad_fused(logits, y, valid, scale: float, tgt):
    """One chunk of the loss and its gradient as whole-tensor expressions, for torch.compile (the
    compiled path of `_ChunkedCrossEntropy`): the same numbers as `_chunk_loss` with grad=True.
    Inductor turns it into two passes over the chunk (one reduction, one fused exp/subtract/store);
    run eagerly every line would be its own fp32 [chunk, vocab] temporary, hence `_chunk_loss`.
    tgt, the target logits (scaled, fp32), comes from the caller: read here, after the in-place write,
    torch 2.11's CPU Inductor read them from the overwritten logits (a wrong loss, right gradients)."""
    z = logits.float() * scale
    lse = torch.logsumexp(z, dim=-1)
    onehot = torch.arange(z.shape[1], device=z.device) == y[:, None]
    logits.copy_(torch.exp(z - lse[:, None]) - onehot.float())
    return ((lse - tgt) * valid).sum()


def _chunk_loss(logits, y, valid, scale: float, z=None, grad: bool = False):
    """sum_i valid_i * (lse_i - z_{i,y_i}) for z = scale * logits, lse = logsumexp(z), in place over the
    fp32 scratch z (same shape as logits; None: fp32 logits already scaled by the caller are their own
    scratch), so no other [rows, vocab] tensor is allocated. aten's softmax works one row (129,280 floats,
    which fit in L2) at a time, so the rows cross memory about twice rather than once per max, subtract,
    exp, sum and divide. With grad, `logits` is overwritten with dlogits up to a per-row factor:
    softmax(z) - onehot(y)."""
    z = logits if z is None else z.copy_(logits).mul_(scale)
    tgt = z.gather(1, y[:, None]).squeeze(1)
    zmax = z.amax(dim=-1)
    torch.ops.aten._softmax.out(z, -1, False, out=z)  # row-wise kernel: in place is safe
    # at a row's maximum softmax is 1 / sum(exp(z - zmax)), so lse = zmax - log(max softmax); unlike
    # -log(softmax at the target) it cannot underflow (the maximum is at least 1/vocab)
    lse = zmax - z.amax(dim=-1).log()
    if grad:
        z[torch.arange(len(y), device=z.device), y] -= 1
        if z is not logits:
            logits.copy_(z)
    return ((lse - tgt) * valid).sum()


_EAGER_ROWS = 256  # rows per eager softmax pass: the fp32 scratch is a quarter of a 1024-row chunk


@functools.cache
def _compiled_loss_and_grad():
    """`_loss_and_grad_fused` through torch.compile, compiled once per process on first use."""
    return torch.compile(_loss_and_grad_fused)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = s * h W^T without ever holding [N, vocab] logits.

    Forward walks the N rows in chunks; for each chunk it forms the chunk's logits, its log-sum-exp and
    target logit, and, when a backward will follow, the gradients right away: with p = softmax(logits),
    dlogits = (p - onehot(y)) / n_valid, so
        dh = s * dlogits @ W        dW = s * dlogits^T @ h
    Computing them in the forward means the output GEMM is not recomputed in backward (3 GEMMs in all,
    as in a plain implementation), and memory holds one chunk of logits plus dh and dW.
    Backward only scales the stored gradients by the incoming scalar gradient.

    Speed (the output layer is most of a small model's step): the GEMMs run in h's dtype (bf16 under
    autocast) while W stays the fp32 master, so dW is accumulated and returned in fp32 with no bf16
    round trip (on CUDA each chunk's GEMM adds into it, `fp32_accumulating_addmm`); the chunk's logits, and
    then its gradient, live in one buffer reused by every chunk (a
    fresh [chunk, vocab] tensor per chunk costs the kernel's page faults, about as much as the softmax);
    every GEMM writes into preallocated memory (`out=`). Each pass over a [chunk, vocab] tensor costs
    about a tenth of a GEMM here, so there are few: the softmax is aten's row-wise kernel in place,
    and the per-row factors (the logit multiplier in fp32, valid / n_valid always) ride on the [chunk, D]
    operands of the GEMMs rather than on the logits."""

    @staticmethod
    def forward(ctx, h, w, targets, scale, chunk, grad_enabled, compiled):
        N, V = h.shape[0], w.shape[0]
        fp32 = h.dtype == torch.float32
        if fp32 and h.device.type == "cpu" and not compiled:
            # fp32 CPU GEMMs run fastest at about 256 rows (MKL, measured: the loss 5.7 s at 256 vs 6.2 s at
            # 1024 per 8 x 512 proxy step, while bf16 is fastest at 1024), and the logits buffer is 4x smaller
            chunk = min(chunk, _EAGER_ROWS)
        valid = (targets >= 0).float()
        inv_n = 1.0 / valid.sum().clamp(min=1)  # a tensor: no host synchronisation
        y = targets.clamp(min=0)
        # grad mode is always off inside forward: the caller says whether a backward can follow
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        wc = w.to(h.dtype)  # the GEMM operand (a bf16 copy under autocast; w itself when dtypes agree)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        logits_buf = torch.empty(min(chunk, N), V, dtype=h.dtype, device=h.device)
        if need_grad:
            dh = torch.empty_like(h)
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            # bf16 GEMMs: adding into the fp32 accumulator in the GEMM itself where it can, else through a scratch
            into_fp32 = not fp32 and fp32_accumulating_addmm(w.device)
            dw_chunk = None if fp32 or into_fp32 else torch.empty(w.shape, dtype=h.dtype, device=w.device)
            coef = valid * (inv_n * scale)
        # the eager softmax's fp32 scratch covers _EAGER_ROWS rows of a chunk at a time: the GEMMs keep the
        # chunk's efficiency, the scratch stays small; fp32 logits need none (the softmax runs in place)
        z_buf = None if compiled and need_grad or fp32 else \
            torch.empty(min(chunk, N, _EAGER_ROWS), V, dtype=torch.float32, device=h.device)
        # fp32: the logit multiplier rides on the [chunk, D] operand instead of a pass over [chunk, V]
        rest = 1.0 if fp32 else scale
        for i in range(0, N, chunk):
            hc, yc, vc = h[i:i + chunk], y[i:i + chunk], valid[i:i + chunk]
            logits = torch.mm(hc * scale if fp32 else hc, wc.t(), out=logits_buf[:len(hc)])
            if compiled and need_grad:
                tgt = logits.gather(1, yc[:, None]).squeeze(1).float() * rest
                loss += _compiled_loss_and_grad()(logits, yc, vc, rest, tgt)
            else:
                for j in range(0, len(hc), _EAGER_ROWS):
                    r = slice(j, j + _EAGER_ROWS)
                    z = None if z_buf is None else z_buf[:len(yc[r])]
                    loss += _chunk_loss(logits[r], yc[r], vc[r], rest, z, need_grad)
            if not need_grad:
                continue
            # g = softmax - onehot; its row factor coef = valid * s / n_valid is applied to the [chunk, D]
            # sides of the two GEMMs (dh rows after, h rows before), again sparing a pass over [chunk, V]
            g, c = logits, coef[i:i + chunk, None]
            torch.mm(g, wc, out=dh[i:i + chunk]).mul_(c)
            if fp32:
                dw.addmm_(g.t(), hc * c)
            elif into_fp32:  # the bf16 product summed in fp32 and added in the GEMM's epilogue: one kernel
                torch.addmm(dw, g.t(), (hc * c).to(hc.dtype), out_dtype=torch.float32, out=dw)
            else:  # bf16 GEMM into scratch, then one mixed-dtype add into the fp32 accumulator
                dw.add_(torch.mm(g.t(), (hc * c).to(hc.dtype), out=dw_chunk))
        if need_grad:
            ctx.save_for_backward(dh, dw.to(w.dtype))
        return loss * inv_n

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return dh * grad_loss.to(dh.dtype), dw * grad_loss.to(dw.dtype), None, None, None, None, None


_ADDMM_INTO_FP32 = {}  # device -> whether addmm adds a bf16 product into an fp32 tensor in place


def fp32_accumulating_addmm(device) -> bool:
    """Whether torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc) with bf16 a, b and an fp32 acc works on
    `device` (cuBLASLt on CUDA; no CPU kernel): tried once per device on a small product, and its result checked.
    It spares the output layer's gradient a bf16 scratch [vocab, hidden] and a separate add per chunk."""
    device = torch.device(device)
    if device not in _ADDMM_INTO_FP32:
        a = torch.full((16, 16), 0.5, dtype=torch.bfloat16, device=device)
        acc = torch.full((16, 16), 1.0 / 3, dtype=torch.float32, device=device)
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            works = bool((acc == torch.tensor(1.0 / 3, dtype=torch.float32) + 4).all())
        except (RuntimeError, TypeError, NotImplementedError):
            works = False
        _ADDMM_INTO_FP32[device] = works
    return _ADDMM_INTO_FP32[device]


def chunked_cross_entropy(h, w, targets, scale: float = 1.0, chunk: int = 1024, compiled: bool = False):
    """Mean over targets >= 0 of cross_entropy(scale * h @ w.T, targets); h [N, D], w [V, D], targets [N].
    The GEMMs run in h's dtype; w may be wider (the fp32 master), and then its gradient is fp32 too.
    compiled=True fuses each chunk's softmax and gradient with torch.compile (compiles on first use)."""
    return _ChunkedCrossEntropy.apply(h, w, targets, scale, chunk, torch.is_grad_enabled(), compiled)
