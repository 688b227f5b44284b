"""Tests for model.py, mup.py and configs/: the decoder, its μP parameterization and the two configs.

Every forward-pass piece is checked against a plain reference written here from the math, not from the
model's own helpers: a functional forward (naive softmax(q k^T * scale) v with K/V heads repeated,
RoPE as a complex rotation, explicit multipliers computed from the config fields by hand), the plain
F.cross_entropy for the chunked loss, and a no-cache forward for generation. Where a test checks that
something happens (a multiplier, a chunked allocation, a recompute), it also checks that the reference
would tell the difference, so a broken model cannot pass by accident.
"""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import mup  # noqa: E402
import model as model_mod  # noqa: E402
from model import ModelConfig, Xmodel, apply_rope, chunked_cross_entropy, rope_tables  # noqa: E402

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one intra-op thread


def load_config(name: str) -> dict:
    """The config file's namespace (it is plain Python assignments)."""
    ns: dict = {}
    with open(os.path.join(ROOT, "configs", f"{name}.py")) as f:
        exec(f.read(), ns)
    return ns


def model_config(name: str, **override) -> ModelConfig:
    ns = load_config(name)
    kw = {k: v for k, v in ns.items() if k in MODEL_FIELDS}
    kw.update(override)
    return ModelConfig(**kw)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, n_layer=2, hidden=64, ffn_hidden=96, n_head=4, n_kv_head=2, max_seq_len=128,
                base_width=256, loss_chunk=16)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed=0, **kw) -> Xmodel:
    torch.manual_seed(seed)
    return mup.build_model(tiny(**kw))


class AllocRecorder(TorchDispatchMode):
    """Records every aten op and the element count of the largest new storage any op returns
    (views of an input, such as w.t(), allocate nothing and are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func)
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out

    def count(self, *names):
        return sum(1 for op in self.ops if op.overloadpacket.__name__ in names)


# ----------------------------------------------------------------------------------------------------------
# references written from the math

def ref_rms(x, w, eps):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def ref_rope(x, base, start=0):
    """Pairs (x_i, x_{i+d/2}) as complex numbers z_i, times exp(i * pos * theta_i), theta_i = base^(-2i/d)."""
    d = x.shape[-1]
    xd = x.double()
    z = torch.complex(xd[..., : d // 2], xd[..., d // 2:])
    theta = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    pos = torch.arange(start, start + x.shape[-2], dtype=torch.float64)
    rot = torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64), torch.outer(pos, theta))
    z = z * rot
    return torch.cat((z.real, z.imag), -1)


def ref_attention(q, k, v, scale):
    """Naive causal attention with the K/V heads repeated to the query heads. q [B,H,T,d], k/v [B,Hkv,T,d]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def part_weights(module) -> dict:
    """The separate matrices a fused linear stacks (wq, wk, wv or w_gate, w_up), by name, as float64."""
    w = getattr(module, module.fused).weight.detach().double()
    return dict(zip(module.parts, w.split(list(module.parts.values()))))


def ref_attn_block(attn, x, base, scale):
    B, T, _ = x.shape
    H, Hkv, d = attn.n_head, attn.n_kv_head, attn.head_dim
    w = part_weights(attn)
    q = (x @ w["wq"].T).view(B, T, H, d).transpose(1, 2)
    k = (x @ w["wk"].T).view(B, T, Hkv, d).transpose(1, 2)
    v = (x @ w["wv"].T).view(B, T, Hkv, d).transpose(1, 2)
    y = ref_attention(ref_rope(q, base), ref_rope(k, base), v, scale)
    return y.transpose(1, 2).reshape(B, T, H * d) @ attn.wo.weight.double().T


def hand_multipliers(cfg: ModelConfig) -> dict:
    """RECIPE.md's multipliers, from the raw config fields (not the config's own properties)."""
    d = cfg.hidden // cfg.n_head
    if cfg.use_mup:
        return dict(embed=cfg.input_scale, residual=cfg.residual_scale / math.sqrt(cfg.n_layer),
                    logit=cfg.output_scale / (cfg.hidden / cfg.base_width), attn=1.0 / d)
    return dict(embed=1.0, residual=1.0, logit=1.0, attn=1.0 / math.sqrt(d))


@torch.no_grad()
def ref_forward(model: Xmodel, idx, mult: dict):
    """The whole decoder, functionally, in float64, with the model's weights and explicit multipliers."""
    cfg = model.config
    g = lambda p: p.detach().double()  # noqa: E731
    x = g(model.tok_emb.weight)[idx] * mult["embed"]
    for b in model.blocks:
        h = ref_rms(x, g(b.attn_norm.weight), cfg.norm_eps)
        x = x + ref_attn_block(b.attn, h, cfg.rope_base, mult["attn"]) * mult["residual"]
        h = ref_rms(x, g(b.mlp_norm.weight), cfg.norm_eps)
        m, w = b.mlp, part_weights(b.mlp)
        y = (F.silu(h @ w["w_gate"].T) * (h @ w["w_up"].T)) @ g(m.w_down.weight).T
        x = x + y * mult["residual"]
    h = ref_rms(x, g(model.norm.weight), cfg.norm_eps)
    return (h @ g(model.output_weight).T) * mult["logit"]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------------------
# configs and parameter counts

def test_xmodel25_config_is_the_recipe():
    cfg = model_config("xmodel25")
    assert (cfg.n_layer, cfg.hidden, cfg.ffn_hidden, cfg.n_head, cfg.n_kv_head) == (48, 1536, 3840, 24, 8)
    assert (cfg.vocab_size, cfg.rope_base, cfg.max_seq_len, cfg.norm_eps) == (129280, 500000.0, 131072, 1e-5)
    assert cfg.tie_embeddings and cfg.use_mup and cfg.head_dim == 64 and cfg.width_mult == 6.0
    assert (cfg.input_scale, cfg.output_scale, cfg.residual_scale, cfg.init_std) == (12.0, 1.0, 1.4, 0.1)


def test_xmodel25_parameter_count_on_meta():
    # fp8 off: FP8Linear holds the same weights; the count must not depend on fp8.py being importable
    cfg = model_config("xmodel25", fp8=False)
    model = mup.build_model(cfg, device="meta")
    assert model.tok_emb.weight.is_meta
    n = model.num_params()
    assert abs(n - 1.35e9) / 1.35e9 < 0.01, n
    # the breakdown, from the shapes: embedding 198.6M + 48 x 24.0M + final norm
    d, f, kv = 1536, 3840, 8 * 64
    per_block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    assert sum(p.numel() for p in model.blocks[0].parameters()) == per_block == 23_989_248
    assert model.num_params(embedding=False) == n - 129280 * d
    assert n == 129280 * d + 48 * per_block + d == 1_350_059_520


def test_proxy20m_exact_parameter_count():
    cfg = model_config("proxy20m")
    model = mup.build_model(cfg, device="meta")
    assert model.num_params() == 17_926_272  # the count stated in configs/proxy20m.py
    assert model.tok_emb.weight.numel() == 16_547_840
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 172_288


def test_proxy_shares_xmodel25_mup_constants_and_base_lrs():
    """Transfer only holds if everything but width and depth is the same."""
    p, x = load_config("proxy20m"), load_config("xmodel25")
    for k in ("vocab_size", "base_width", "input_scale", "output_scale", "residual_scale", "init_std",
              "use_mup", "rope_base", "norm_eps", "tie_embeddings", "lr", "emb_lr", "weight_decay"):
        assert p[k] == x[k], k
    assert p["hidden"] // p["n_head"] == 64  # the recipe's proxy family: heads = hidden / 64


# ----------------------------------------------------------------------------------------------------------
# μP: learning rates and initialisation

def test_param_groups_resolved_lrs_for_xmodel25():
    ns = load_config("xmodel25")
    model = mup.build_model(model_config("xmodel25", fp8=False), device="meta")
    groups = mup.param_groups(model, ns["lr"], ns["emb_lr"], ns["weight_decay"])
    by = {g["name"]: g for g in groups}
    assert set(by) == {"hidden", "embedding", "norm"}
    assert by["hidden"]["lr"] == pytest.approx(1.6667e-3, rel=1e-4)
    assert by["embedding"]["lr"] == pytest.approx(0.01, rel=1e-12)
    assert by["hidden"]["weight_decay"] == by["embedding"]["weight_decay"] == 0.1
    assert by["norm"]["weight_decay"] == 0.0
    for g in groups:
        assert g["base_lr"] == g["lr"]
    # each parameter in exactly one group, and the right one
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    hidden = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert {id(p) for p in by["hidden"]["params"]} == hidden and len(hidden) == 48 * 4  # [q;k;v], o, [gate;up], down
    # the fused weights' parts, by position in the group: [q; k; v] 1536 + 512 + 512 rows, [gate; up] 2 x 3840
    params = by["hidden"]["params"]
    assert [(params[i].shape, rows) for i, rows in by["hidden"]["parts"]] == [
        ((2560, 1536), [1536, 512, 512]), ((7680, 1536), [3840, 3840])] * 48
    assert [id(p) for p in by["embedding"]["params"]] == [id(model.tok_emb.weight)]
    assert all(p.dim() == 1 for p in by["norm"]["params"]) and len(by["norm"]["params"]) == 48 * 2 + 1


def test_param_groups_sp_does_not_scale_lr():
    model = mup.build_model(model_config("xmodel25", fp8=False, use_mup=False), device="meta")
    by = {g["name"]: g for g in mup.param_groups(model, 3e-3, 5e-3, 0.1)}
    assert by["hidden"]["lr"] == 3e-3 and by["embedding"]["lr"] == 5e-3


@pytest.mark.parametrize("use_mup", [True, False])
def test_init_stds(use_mup):
    """Embedding N(0, 0.1) always; hidden matrices N(0, 0.1/sqrt(m)) under μP, N(0, 0.1) under SP; under μP
    attention-out and MLP-down N(0, 0.1/sqrt(2 n_layer)) (init_out="depth", tests/test_mup.py has both)."""
    for hidden in (128, 512):  # m = 0.5 and 2
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=2000, n_layer=1, hidden=hidden, ffn_hidden=hidden * 2, n_head=hidden // 64,
                          n_kv_head=1, max_seq_len=64, use_mup=use_mup)
        model = mup.build_model(cfg)
        want_hidden = 0.1 / math.sqrt(hidden / 256) if use_mup else 0.1
        # 5 standard errors of the estimates from n samples: the std's relative se is 1/sqrt(2n), the mean's std/sqrt(n)
        rel = lambda p: 5 / math.sqrt(2 * p.numel())  # noqa: E731
        emb = model.tok_emb.weight
        assert emb.std().item() == pytest.approx(0.1, rel=rel(emb))  # n = 256k or 1M: within 0.7% or 0.35%
        assert abs(emb.mean().item()) < 5 * 0.1 / math.sqrt(emb.numel())
        n2d = 0
        parts = {id(w): rows for w, rows in model.fused_weights()}
        for name, p in model.blocks.named_parameters():
            if p.dim() == 2:
                out = use_mup and name.endswith(("attn.wo.weight", "mlp.w_down.weight"))
                want = 0.1 / math.sqrt(2 * cfg.n_layer) if out else want_hidden
                for part in p.split(parts.get(id(p), [len(p)])):  # each of q, k, v, gate, up on its own
                    n2d += 1
                    assert part.std().item() == pytest.approx(want, rel=rel(part)), (hidden, name)
            else:
                assert torch.equal(p, torch.ones_like(p)), name
        assert n2d == 7
        assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


# ----------------------------------------------------------------------------------------------------------
# the pieces: RoPE, attention, GQA

def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    for start in (0, 1000):
        x = torch.randn(2, 3, 16, 32)
        cos, sin = rope_tables(16, 32, 500000.0, start=start)
        got = apply_rope(x, cos, sin)
        want = ref_rope(x, 500000.0, start)
        assert (got.double() - want).abs().max() < 1e-4 * max(1.0, start / 100)
        # rotation preserves each pair's length, and position 0 is the identity
        assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    cos0, sin0 = rope_tables(1, 32, 500000.0)
    assert torch.equal(apply_rope(x[..., :1, :], cos0, sin0), x[..., :1, :])
    # the reference can tell an interleaved pairing (x_2i, x_2i+1) from the half-split one
    xi = x.view(*x.shape[:-1], 16, 2)
    inter = torch.complex(xi[..., 0], xi[..., 1]).to(torch.complex128) * torch.polar(
        torch.ones(16, 16, dtype=torch.float64),
        torch.outer(torch.arange(1000, 1016.0, dtype=torch.float64),
                    500000.0 ** (-torch.arange(16, dtype=torch.float64) * 2 / 32)))
    assert (torch.view_as_real(inter).flatten(-2) - got.double()).abs().max() > 0.1


@pytest.mark.parametrize("use_mup", [True, False])
def test_attention_matches_naive_reference(use_mup):
    torch.manual_seed(0)
    cfg = tiny(use_mup=use_mup)
    attn = mup.build_model(cfg).blocks[0].attn
    d = cfg.hidden // cfg.n_head
    scale = 1.0 / d if use_mup else 1.0 / math.sqrt(d)
    assert attn.scale == scale
    x = torch.randn(2, 12, cfg.hidden)
    cos, sin = rope_tables(12, d, cfg.rope_base)
    with torch.no_grad():
        got = attn(x, cos, sin)
    want = ref_attn_block(attn, x.double(), cfg.rope_base, scale)
    assert rel_err(got, want) < 1e-5
    other = ref_attn_block(attn, x.double(), cfg.rope_base, 1.0 / math.sqrt(d) if use_mup else 1.0 / d)
    assert rel_err(other, want) > 1e-2  # the reference does see the scale
    # causal: a change in the last token leaves the earlier outputs alone
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        got2 = attn(x2, cos, sin)
    assert torch.allclose(got2[:, :-1], got[:, :-1], atol=1e-6) and not torch.allclose(got2[:, -1], got[:, -1])


def test_gqa_shapes_and_no_repeated_kv(monkeypatch):
    cfg = tiny(n_head=8, n_kv_head=2, hidden=128)  # head dim 16, 4 queries per K/V head
    model = tiny_model(n_head=8, n_kv_head=2, hidden=128)
    a = model.blocks[0].attn
    w = part_weights(a)
    assert a.wqkv.weight.shape == (128 + 2 * 2 * 16, 128) and a.wo.weight.shape == (128, 128)
    assert w["wq"].shape == (128, 128) and w["wk"].shape == w["wv"].shape == (2 * 16, 128)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        seen.append((q.shape, k.shape, v.shape, kw.get("enable_gqa", False), kw.get("scale")))
        return sdpa(q, k, v, *args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    idx = torch.randint(0, cfg.vocab_size, (3, 10))
    out = model(idx)
    assert out.shape == (3, 10, cfg.vocab_size) and out.dtype == torch.float32
    assert len(seen) == cfg.n_layer
    for qs, ks, vs, gqa, scale in seen:
        assert qs == (3, 8, 10, 16) and ks == vs == (3, 2, 10, 16)  # K/V handed over un-repeated
        assert gqa and scale == 1 / 16
    caches = [{} for _ in model.blocks]
    with torch.no_grad():
        model.hidden_states(idx, 0, caches)
    assert caches[0]["k"].shape == caches[0]["v"].shape == (3, 2, 10, 16)


# ----------------------------------------------------------------------------------------------------------
# attention kernels (attn_backend) and K/V heads copied or not (gqa)

CPU_BACKENDS = ("auto", "math", "flash")  # what torch's CPU build runs; "efficient" and "cudnn" are CUDA kernels
CPU_FLASH_OP = "_scaled_dot_product_flash_attention_for_cpu"


def attn_leaves(dtype, seed=0):
    """q [2, 4, 12, 16], k and v [2, 2, 12, 16] (two query heads per K/V head) and an output gradient, in dtype."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dy = (torch.randn(2, h, 12, 16, generator=g) for h in (4, 2, 2, 4))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], dy.to(dtype)


def attn_and_grads(fn, leaves, dy):
    """fn(q, k, v) and the gradients of q, k, v for the output gradient dy, on fresh copies of the leaves."""
    q, k, v = (t.detach().clone().requires_grad_() for t in leaves)
    y = fn(q, k, v)
    y.backward(dy)
    return [y.detach(), q.grad, k.grad, v.grad]


def compiled_with_ops(fn, ops: set):
    """torch.compile(fn) without graph breaks, adding the aten ops of its forward and backward graphs to ops
    (AOT autograd's graphs, run as they are: Dynamo and the kernel choice without Inductor's C++ build)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def keep(gm, inputs):
        ops.update(str(n.target).split(".")[1] for n in gm.graph.nodes if n.op == "call_function"
                   and str(n.target).startswith("aten."))
        return make_boxed_func(gm.forward)
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("gqa", ["native", "repeat"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_backend_runs_its_kernel_and_equals_float64(backend, gqa, compiled):
    """model.sdpa with each kernel the CPU has, eager and compiled (torch.compile traces sdpa_kernel): output and
    gradients against the float64 softmax reference, and the kernel that ran read from the aten ops (math has
    no fused op: softmax and bmm)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        leaves, dy = attn_leaves(dtype)
        fn = lambda q, k, v: model_mod.sdpa(q, k, v, 0.25, backend, gqa)  # noqa: E731
        ops = set()
        if compiled:
            got = attn_and_grads(compiled_with_ops(fn, ops), leaves, dy)
        else:
            with AllocRecorder() as rec:
                got = attn_and_grads(fn, leaves, dy)
            ops = {op.overloadpacket.__name__ for op in rec.ops}
        want = attn_and_grads(lambda q, k, v: ref_attention(q, k, v, 0.25), [t.double() for t in leaves],
                              dy.double())
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert a.dtype == dtype and rel_err(a, b) < tol, (name, dtype, rel_err(a, b))
        assert (CPU_FLASH_OP in ops) == (backend != "math"), sorted(ops)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gqa_repeat_equals_native(backend):
    """K/V copied to every query head (gqa="repeat") against enable_gqa (native): the same numbers, output and
    gradients (the copies' gradients summed back onto the shared heads), in fp32."""
    leaves, dy = attn_leaves(torch.float32, seed=1)
    native, repeat = (attn_and_grads(lambda q, k, v: model_mod.sdpa(q, k, v, 0.25, backend, g), leaves, dy)
                      for g in ("native", "repeat"))
    for a, b in zip(native, repeat):
        assert (a - b).abs().max() <= 1e-6
    x = torch.arange(6.0).view(1, 3, 1, 2)  # the pairing: query head h reads K/V head h // n_rep
    assert torch.equal(model_mod.repeat_kv(x, 2), x.repeat_interleave(2, 1))


@pytest.mark.parametrize("gqa", ["native", "repeat"])
def test_attn_backends_give_the_models_loss_and_gradients(gqa):
    """A whole model with each kernel the CPU has: its loss equals the float64 functional forward's (fp32),
    its gradients "auto"'s, and under bf16 autocast its loss is auto's within bf16 rounding."""
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    tgt = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    out = {}
    for backend in CPU_BACKENDS:
        model = tiny_model(attn_backend=backend, gqa=gqa)
        loss = model(idx, tgt)
        loss.backward()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(idx, tgt)
        out[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()}, bf16)
        want = F.cross_entropy(ref_forward(model, idx, hand_multipliers(model.config)).flatten(0, 1), tgt.flatten())
        assert abs(loss.item() - want.item()) < 1e-5 * want.item(), backend
    for backend in CPU_BACKENDS[1:]:
        loss, grads, bf16 = out[backend]
        assert abs(bf16 - out["auto"][2]) < 1e-2 * out["auto"][2], backend
        for n, g in grads.items():
            assert rel_err(g, out["auto"][1][n]) < 1e-5, (backend, n)


@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
def test_a_backend_without_a_kernel_names_the_key_and_generation_still_runs(backend):
    """A CUDA kernel forced on the CPU: the forward fails naming attn_backend, eager and compiled (Dynamo meets
    it while tracing); generation, which leaves the kernel to PyTorch, still runs and equals the default's."""
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(7))
    model = tiny_model(attn_backend=backend)
    hint = "gqa='repeat'" if backend == "efficient" else "attn_backend='auto'"
    with pytest.raises(RuntimeError, match=rf"attn_backend='{backend}'.*{hint}") as err:
        model(idx, idx)
    assert "No viable backend" in str(err.value.__cause__)  # PyTorch's own error, kept as the cause
    torch._dynamo.reset()
    model.compile_for_training()
    with pytest.raises(RuntimeError, match=rf"attn_backend='{backend}'"):
        model(idx, idx)
    torch._dynamo.reset()
    default = tiny_model().eval()
    prompt = idx[:, :4]
    want = no_cache_greedy(default, prompt, 6)
    assert torch.equal(tiny_model(attn_backend=backend).eval().generate(prompt, 6, temperature=0), want)
    for forced in ("math", "flash"):  # and with a kernel the CPU has, generation is unchanged too
        assert torch.equal(tiny_model(attn_backend=forced, gqa="repeat").eval().generate(prompt, 6, temperature=0), want)


# ----------------------------------------------------------------------------------------------------------
# fused linears: [q; k; v] and [gate; up] against the separate layout they replaced

class LegacyAttention(torch.nn.Module):
    """Attention as it was before q, k, v were fused (three linears, the old code): the reference below."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.scale = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.attn_scale
        self.wq = model_mod._linear(cfg, cfg.hidden, cfg.n_head * cfg.head_dim, "qkv")
        self.wk = model_mod._linear(cfg, cfg.hidden, cfg.n_kv_head * cfg.head_dim, "qkv")
        self.wv = model_mod._linear(cfg, cfg.hidden, cfg.n_kv_head * cfg.head_dim, "qkv")
        self.wo = model_mod._linear(cfg, cfg.n_head * cfg.head_dim, cfg.hidden, "out")

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class LegacySwiGLU(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w_gate = model_mod._linear(cfg, cfg.hidden, cfg.ffn_hidden, "gate_up")
        self.w_up = model_mod._linear(cfg, cfg.hidden, cfg.ffn_hidden, "gate_up")
        self.w_down = model_mod._linear(cfg, cfg.ffn_hidden, cfg.hidden, "down")

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def legacy_model(cfg) -> Xmodel:
    """An Xmodel with the separate q/k/v and gate/up linears of old checkpoints (torch's default init)."""
    model = Xmodel(cfg)
    for b in model.blocks:
        b.attn, b.mlp = LegacyAttention(cfg), LegacySwiGLU(cfg)
    if cfg.fp8:
        from fp8 import FP8Linear
        model._fp8_layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    return model


def test_fused_linears_equal_the_separate_ones():
    """The fused model against the old layout with the same weights: loss and every gradient (the fused
    weights' gradients are the parts' stacked), forward and backward, to fp32 rounding; the weights go from
    one layout to the other and back exactly."""
    cfg = tiny()
    fused, legacy = tiny_model(), legacy_model(cfg)
    legacy.load_state_dict(model_mod.split_state_dict(fused.state_dict(), cfg))  # strict: every key, both ways
    back = model_mod.fuse_state_dict(legacy.state_dict(), cfg)
    sd = fused.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())
    idx = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(5))
    losses = [m(idx[:, :-1], idx[:, 1:]) for m in (fused, legacy)]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    grads = model_mod.split_state_dict({n: p.grad for n, p in fused.named_parameters()}, cfg)
    legacy_grads = {n: p.grad for n, p in legacy.named_parameters()}
    assert grads.keys() == legacy_grads.keys() and len(grads) == len(fused.state_dict()) + 3 * cfg.n_layer
    for n, g in legacy_grads.items():
        assert rel_err(grads[n], g) < 1e-5, n


def test_old_checkpoint_with_separate_weights_loads():
    """An FP8 model of the old layout after two training steps: its state dict loads strictly into the fused
    model (q/k/v and gate/up concatenated; amax histories merged by max, scales by min, which is what the fused
    layer would have recorded), the caller's dict is left as it was, and the loaded model computes the same
    forward in fp32 as the old one would with the merged scales."""
    from fp8 import FP8_MAX, E4M3, E5M2
    torch.manual_seed(0)
    cfg = tiny(fp8=True)
    legacy = legacy_model(cfg)
    idx = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(6))
    for _ in range(2):
        legacy(idx[:, :-1], idx[:, 1:]).backward()
        legacy.update_fp8_scales()
    sd = legacy.state_dict()
    keys = set(sd)
    fused = Xmodel(cfg)
    fused.load_state_dict(sd)  # strict
    assert set(sd) == keys  # not consumed
    a, b = legacy.blocks[1].attn, fused.blocks[1].attn
    assert torch.equal(b.wqkv.weight, torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
    hist = torch.stack([a.wq.amax_history, a.wk.amax_history, a.wv.amax_history])
    assert len({tuple(h[:, 0].tolist()) for h in hist}) == 3  # the parts did record different amaxes
    assert torch.equal(b.wqkv.amax_history, hist.amax(0))
    fmax = torch.tensor([FP8_MAX[E4M3], FP8_MAX[E4M3], FP8_MAX[E5M2]])
    for m in (b.wqkv, fused.blocks[0].mlp.w_gate_up):
        assert torch.equal(m.scale, fmax / m.amax_history.amax(1))  # the merged scale is the merged history's
    assert torch.equal(fused.blocks[0].mlp.w_gate_up.weight,
                       torch.cat([legacy.blocks[0].mlp.w_gate.weight, legacy.blocks[0].mlp.w_up.weight]))
    assert model_mod.fuse_state_dict(sd, cfg).keys() == fused.state_dict().keys()


# ----------------------------------------------------------------------------------------------------------
# the whole forward: μP multipliers present and absent

@pytest.mark.parametrize("use_mup", [True, False])
def test_forward_matches_functional_reference(use_mup):
    model = tiny_model(use_mup=use_mup, n_layer=4)
    idx = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    mult = hand_multipliers(model.config)
    if use_mup:  # the recipe's numbers for this tiny model: m = 64/256
        assert mult == dict(embed=12.0, residual=0.7, logit=4.0, attn=1 / 16)
    with torch.no_grad():
        got = model(idx)
    want = ref_forward(model, idx, mult)
    assert rel_err(got, want) < 1e-5
    # the reference notices each multiplier: dropping any one of them (SP value) changes the output
    sp = hand_multipliers(dataclasses.replace(model.config, use_mup=False))
    for k in mult:
        if mult[k] != sp[k]:
            assert rel_err(ref_forward(model, idx, {**mult, k: sp[k]}), want) > 1e-2, k
    if use_mup:
        assert all(mult[k] != sp[k] for k in mult)


@pytest.mark.parametrize("field,value", [("input_scale", 5.0), ("residual_scale", 0.6), ("output_scale", 3.0),
                                         ("base_width", 128)])
def test_changing_a_mup_field_changes_the_output(field, value):
    base = tiny_model()
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y0 = base(idx)
        for use_mup in (True, False):
            cfg = dataclasses.replace(base.config, use_mup=use_mup, **{field: value})
            m = Xmodel(cfg)
            m.load_state_dict(base.state_dict())
            y = m(idx)
            assert rel_err(y, ref_forward(m, idx, hand_multipliers(cfg))) < 1e-5
            if use_mup:
                assert rel_err(y, y0) > 1e-2, field  # the field acts under μP
            else:
                sp = Xmodel(dataclasses.replace(base.config, use_mup=False))
                sp.load_state_dict(base.state_dict())
                assert torch.equal(y, sp(idx)), field  # and is ignored under SP


def test_bf16_autocast_forward_finite_and_close():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    tgt = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_logits, ref_loss = model(idx), model(idx, tgt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(idx), model(idx, tgt)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all() and torch.isfinite(loss)
    assert rel_err(logits, ref_logits) < 3e-2
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2


# ----------------------------------------------------------------------------------------------------------
# the chunked cross-entropy

def ce_inputs(N=50, V=300, D=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.2] = -1
    y[0] = -1
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 7, 16, 50, 64])
def test_chunked_ce_and_grads_equal_plain(chunk):
    scale = 0.37
    h, w, y = ce_inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_cross_entropy(h1, w1, y, scale, chunk)
    (loss * 2.5).backward()  # an upstream gradient != 1 reaches the stored gradients
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(scale * h2 @ w2.T, y, ignore_index=-1)
    (ref * 2.5).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(h1.grad[y < 0] == 0)  # ignored rows get no gradient
    # the comparison can fail: the unscaled or un-masked loss is different
    assert not torch.allclose(loss, F.cross_entropy(h @ w.T, y, ignore_index=-1), rtol=1e-3)
    assert not torch.allclose(loss, F.cross_entropy(scale * h @ w.T, y.clamp(min=0)), rtol=1e-5, atol=0)


def _addmm_into_fp32(monkeypatch, how):
    """torch.addmm with out_dtype (cuBLASLt's, absent on the CPU) as `how` says: "exact" sums the bf16 product in
    fp32 into the fp32 tensor as the GPU kernel does, "bf16" rounds the sum to bf16, "missing" raises."""
    real, calls = torch.addmm, []

    def addmm(acc, a, b, *args, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return real(acc, a, b, *args, out=out, **kw)
        calls.append((acc.dtype, a.dtype, out is acc))
        if how == "missing":
            raise RuntimeError("Could not run 'aten::addmm.dtype_out' with arguments from the 'CPU' backend")
        got = acc + a.float() @ b.float()
        return out.copy_(got.bfloat16() if how == "bf16" else got)

    monkeypatch.setattr(torch, "addmm", addmm)
    return calls


@pytest.mark.parametrize("how,works", [("exact", True), ("bf16", False), ("missing", False)])
def test_fp32_accumulating_addmm_is_tried_and_checked(monkeypatch, how, works):
    import model
    monkeypatch.setattr(model, "_ADDMM_INTO_FP32", {})
    calls = _addmm_into_fp32(monkeypatch, how)
    assert model.fp32_accumulating_addmm("cpu") is works and len(calls) == 1
    assert model.fp32_accumulating_addmm(torch.device("cpu")) is works and len(calls) == 1  # once per device


def test_chunked_ce_bf16_gradient_added_into_fp32_by_the_gemm(monkeypatch):
    """Where addmm adds a bf16 product into the fp32 accumulator (CUDA), the output layer's gradient takes that
    path (no bf16 scratch): the same loss and dh as the scratch path, dW at least as close to float64."""
    import model
    h, w, y = ce_inputs(N=96, V=300, D=32)
    hb = h.bfloat16()

    def run():
        h1, w1 = hb.clone().requires_grad_(), w.clone().requires_grad_()
        loss = chunked_cross_entropy(h1, w1, y, 0.37, 16)
        loss.backward()
        return loss, h1.grad, w1.grad

    ref_loss, ref_dh, ref_dw = run()
    monkeypatch.setattr(model, "_ADDMM_INTO_FP32", {torch.device("cpu"): True})
    calls = _addmm_into_fp32(monkeypatch, "exact")
    loss, dh, dw = run()
    assert calls == [(torch.float32, torch.bfloat16, True)] * 6  # one per chunk, into the accumulator itself
    assert torch.equal(loss, ref_loss) and torch.equal(dh, ref_dh) and dw.dtype == torch.float32
    h64, w64 = hb.double().requires_grad_(), w.double().requires_grad_()
    F.cross_entropy(0.37 * h64 @ w64.T, y, ignore_index=-1).backward()
    err, ref_err = ((dw - w64.grad).norm() / w64.grad.norm()).item(), ((ref_dw - w64.grad).norm() / w64.grad.norm()).item()
    assert err <= ref_err * 1.01 and err < 2e-2


def test_chunked_ce_only_one_input_needs_grad_and_all_ignored():
    h, w, y = ce_inputs()
    hr = h.clone().requires_grad_()
    chunked_cross_entropy(hr, w, y, 0.5, 8).backward()
    ref_h = h.clone().requires_grad_()
    F.cross_entropy(0.5 * ref_h @ w.T, y, ignore_index=-1).backward()
    assert torch.allclose(hr.grad, ref_h.grad, rtol=1e-5, atol=1e-7)
    # a batch with every target ignored: a finite zero, not NaN
    hz, wz = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_cross_entropy(hz, wz, torch.full_like(y, -1), 1.0, 8)
    loss.backward()
    assert loss.item() == 0.0 and not hz.grad.any() and not wz.grad.any()


def test_chunked_ce_never_materializes_n_by_vocab():
    N, V, D, chunk = 64, 5000, 32, 16
    h, w, y = ce_inputs(N, V, D)
    h.requires_grad_(), w.requires_grad_()
    with AllocRecorder() as rec:
        loss = chunked_cross_entropy(h, w, y, 1.0, chunk)
        loss.backward()
    assert rec.count("mm") > 0 and h.grad is not None and w.grad is not None  # backward was recorded
    assert rec.largest <= max(chunk * V, V * D) < N * V
    # the recorder does see a full [N, V] when the plain loss makes one
    with AllocRecorder() as plain:
        F.cross_entropy(h @ w.T, y, ignore_index=-1).backward()
    assert plain.largest >= N * V


def test_model_loss_forward_backward_never_materializes_n_by_vocab():
    model = tiny_model(vocab_size=4096, hidden=32, n_head=2, n_kv_head=1, ffn_hidden=64, loss_chunk=32)
    idx = torch.randint(0, 4096, (2, 64))
    with AllocRecorder() as rec:
        loss = model(idx, idx.roll(-1, 1))
        loss.backward()
    N, V = idx.numel(), 4096
    assert model.tok_emb.weight.grad is not None
    assert rec.largest <= max(32 * V, V * 32) < N * V


def test_chunked_ce_under_no_grad_does_forward_work_only():
    """Evaluation (torch.no_grad) must not pay for the gradients: one GEMM per chunk, no [V, D] buffer."""
    N, V, D, chunk = 64, 5000, 32, 16
    h, w, y = ce_inputs(N, V, D)
    h.requires_grad_(), w.requires_grad_()  # parameters require grad, but no backward will follow
    with torch.no_grad(), AllocRecorder() as rec:
        loss = chunked_cross_entropy(h, w, y, 1.0, chunk)
    assert torch.allclose(loss, F.cross_entropy(h.detach() @ w.detach().T, y, ignore_index=-1), rtol=1e-6)
    assert rec.count("mm", "addmm", "matmul", "bmm") == math.ceil(N / chunk)
    assert rec.largest <= chunk * V < V * D  # one chunk of logits; no [V, D] gradient buffer


def test_chunked_loss_bf16_autocast_through_model_close_to_plain():
    model = tiny_model(vocab_size=500, loss_chunk=24)  # 40 tokens: chunks of 24 and 16
    idx = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(5))
    tgt = idx.roll(-1, 1)
    tgt[:, -1] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, tgt)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten(), ignore_index=-1)
    ref.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 2e-3 * ref.item()
    for n, p in model.named_parameters():
        assert rel_err(got[n], p.grad) < 3e-2, n


# ----------------------------------------------------------------------------------------------------------
# compile, activation checkpointing, FLOPs

def test_block_compiles_fullgraph_and_equals_eager():
    """No graph breaks in a block, forward and backward. The aot_eager backend runs Dynamo (which is what
    fullgraph=True checks) and AOT autograd without Inductor's C++ codegen, which costs ~30 s on 2 cores."""
    torch._dynamo.reset()
    model = tiny_model(n_layer=1)
    block = model.blocks[0]
    cos, sin = rope_tables(8, 16, model.config.rope_base)
    x = torch.randn(2, 8, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y1 = compiled(x1, cos, sin)
    y1.square().sum().backward()
    g1 = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    y2 = block(x2, cos, sin)
    y2.square().sum().backward()
    assert torch.allclose(y1, y2, atol=1e-6)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    for n, p in block.named_parameters():
        assert torch.allclose(g1[n], p.grad, rtol=1e-5, atol=1e-6), n


def test_fp8_sampling_never_reduces_amaxes(monkeypatch):
    """Rank 0 samples alone at the end of a run: neither a sample nor an evaluation may enter the amax
    all-reduce, not even when a training micro-batch's amaxes are still pending (a loop that skipped
    update_fp8_scales); the next training forward applies them."""
    import fp8
    model = tiny_model(fp8=True)
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    model(idx[:, :-1], idx[:, 1:]).backward()
    recorded = model.blocks[0].attn.wqkv.pending_amax.clone()
    calls = []
    monkeypatch.setattr(fp8, "_all_reduce_max", lambda t: calls.append(t) or t)
    model.generate(idx[:, :3], 2)  # training mode, no autograd
    model.eval()
    model(idx[:, :-1], idx[:, 1:])
    assert calls == [] and torch.equal(model.blocks[0].attn.wqkv.pending_amax, recorded)
    model.train()
    model(idx[:, :-1], idx[:, 1:])
    assert len(calls) == 1 and model.blocks[0].attn.wqkv.amax_history[:, 0].tolist() == recorded.tolist()


@pytest.mark.parametrize("gemm", ["emulate", "triton"])
def test_fp8_block_compiles_fullgraph_and_records_like_eager(gemm, monkeypatch):
    """An FP8 block under Dynamo with fullgraph=True (the amax records are in-place writes into buffers inside
    an autograd.Function, forward and backward): outputs, gradients, recorded amaxes and the scales after
    update_fp8_scales equal the eager block's over 3 steps, bit for bit (aot_eager: no Inductor codegen;
    under Inductor they agree to rounding, ~1e-7 relative, measured on an AMD Zen 4). fp32, so the GEMM's
    output cast is a no-op: torch 2.11's Dynamo made every gradient 0 then (fp8._cast). "triton": the kernel
    under the interpreter, through its custom op (Dynamo of torch 2.11 failed tracing into the autotuner)."""
    import fp8
    from fp8 import FP8Linear
    if gemm == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(fp8, "BACKEND", "kernel")
    torch._dynamo.reset()
    cos, sin = rope_tables(8, 16, 500000.0)
    runs = []
    for compiled in (False, True):
        model = tiny_model(n_layer=1, fp8=True)
        block = model.blocks[0]
        f = torch.compile(block, fullgraph=True, backend="aot_eager") if compiled else block
        steps = []
        for step in range(3):
            x = (torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(step)) * (step + 1)).requires_grad_()
            y = f(x, cos, sin)
            y.square().sum().backward()
            layers = [m for m in block.modules() if isinstance(m, FP8Linear)]
            recorded = torch.stack([m.pending_amax.clone() for m in layers])
            model.update_fp8_scales()
            scales = torch.stack([m.scale.clone() for m in layers])
            steps.append([y.detach(), x.grad, recorded, scales] + [p.grad.clone() for p in block.parameters()])
            block.zero_grad()
        runs.append(steps)
    for step, (eager, comp) in enumerate(zip(*runs)):
        assert all(torch.equal(a, b) for a, b in zip(eager, comp)), step
    assert (runs[0][-1][3] != 1).all() and runs[0][0][2].shape == (4, 3)


def test_act_ckpt_same_loss_and_grads_and_recomputes():
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    results = {}
    for ckpt in (False, True):
        model = tiny_model(act_ckpt=ckpt)
        model.train()
        calls = []
        for b in model.blocks:
            b.register_forward_pre_hook(lambda *a: calls.append(1))  # recompute stops early
        loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        results[ckpt] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls))
    (l0, g0, c0), (l1, g1, c1) = results[False], results[True]
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-6, atol=1e-8), n
    assert c0 == 2 and c1 == 4  # with checkpointing each block's forward runs again in backward


def test_fp8_act_ckpt_and_a_bare_loop_equal_the_trainers_steps():
    """FP8 training steps as train.py runs them (update_fp8_scales after each backward) against the same steps
    with activation checkpointing (each block's forward re-run in backward: it must quantize with the scales
    its first forward used and record the same amaxes), and against a bare loop that never calls
    update_fp8_scales (the next forward applies what is pending): the losses, gradients and FP8 state of every
    step bit for bit."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 97, (2, 13), generator=g) for _ in range(3)]

    def run(act_ckpt, call_update):
        model = tiny_model(fp8=True, act_ckpt=act_ckpt)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = []
        for b in batches:
            loss = model(b[:, :-1], b[:, 1:])
            loss.backward()
            if call_update:
                model.update_fp8_scales()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            out.append((loss.detach(), grads))
        model.update_fp8_scales()  # the bare loop's last micro-batch
        return out, {k: v for k, v in model.state_dict().items() if k.endswith((".scale", ".amax_history"))}

    ref, ref_state = run(False, True)
    assert all((v != 1).any() for k, v in ref_state.items() if k.endswith(".scale"))  # the scales did move
    for act_ckpt, call_update in ((True, True), (False, False)):
        got, state = run(act_ckpt, call_update)
        for (l0, g0), (l1, g1) in zip(ref, got):
            assert torch.equal(l0, l1), (act_ckpt, call_update)
            assert all(torch.equal(g0[n], g1[n]) for n in g0), (act_ckpt, call_update)
        assert all(torch.equal(ref_state[k], state[k]) for k in ref_state), (act_ckpt, call_update)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fp8_weight_cache_equals_quantizing_every_micro_batch(compiled, monkeypatch):
    """Weights quantized once per optimizer step (fp8.WEIGHT_CACHE) against once per micro-batch, as before:
    3 steps of 2 micro-batches with fused AdamW (which changes the weights without bumping their version
    counters) give the same losses, gradients, weights and FP8 state bit for bit, eager and with the blocks
    compiled (aot_eager, fullgraph: one graph, no recompiles). The weight is cast once per step and layer, and
    its delayed scale does move between the two micro-batches of a step (the copy is recast then)."""
    import fp8
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 97, (2, 13), generator=g) for _ in range(6)]
    casts, real_cast = [], fp8._cast_weight
    monkeypatch.setattr(fp8, "_cast_weight", lambda w, *a: casts.append(w.shape) or real_cast(w, *a))

    def run(cache, compile_blocks):
        monkeypatch.setattr(fp8, "WEIGHT_CACHE", cache)
        torch._dynamo.reset()
        model = tiny_model(fp8=True)
        if compile_blocks:
            for b in model.blocks:
                b.compile(backend="aot_eager", fullgraph=True)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        out, w_scales = [], []
        for step in range(3):
            for b in batches[2 * step:2 * step + 2]:
                w_scales.append(model.blocks[0].mlp.w_down.scale[1].item())  # what this micro-batch uses
                loss = model(b[:, :-1], b[:, 1:])
                loss.backward()
                model.update_fp8_scales()
                out.append(loss.detach())
            out += [p.grad.clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
        return out + [v.clone() for v in model.state_dict().values()], w_scales

    ref, w_scales = run(False, False)
    assert casts == [] and w_scales[2] != w_scales[3] and w_scales[4] != w_scales[5]  # moved within steps 1, 2
    torch._dynamo.utils.counters.clear()
    got, _ = run(True, compiled)
    assert len(ref) == len(got) and all(torch.equal(a, b) for a, b in zip(ref, got))
    assert len(casts) == 3 * 4 * 2  # per step, each of the 4 FP8 linears of the 2 blocks
    if compiled:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        assert not torch._dynamo.utils.counters["recompiles"]


def test_fp8_layers_keep_the_rest_bf16_and_leave_checkpoints_and_export_alone():
    """fp8_layers = "qkv, gate_up,down" (the attention output projection in bf16): exactly those linears are
    FP8Linear (and the ones update_fp8_scales steps); the weights keep their names and shapes (the FP8 state
    is there for the FP8 ones only); two training steps later the state dict loads strictly into a fresh
    model of its config and computes the same, and the export reads the checkpoint and writes the tensors a
    bf16 model with the same weights gives. The default is all four."""
    from fp8 import FP8Linear
    from tools import export
    assert ModelConfig().fp8_layer_names == ("qkv", "out", "gate_up", "down") == model_mod.FP8_LAYERS
    cfg = tiny(fp8=True, fp8_layers="qkv, gate_up,down")
    model = tiny_model(fp8=True, fp8_layers="qkv, gate_up,down")
    fp8_names = sorted(n for n, m in model.named_modules() if isinstance(m, FP8Linear))
    assert fp8_names == [f"blocks.{i}.{s}" for i in range(2) for s in ("attn.wqkv", "mlp.w_down", "mlp.w_gate_up")]
    assert type(model.blocks[1].attn.wo) is torch.nn.Linear and len(model._fp8_layers) == 6
    sd = model.state_dict()
    fp8_state = sorted(k for k in sd if k.endswith((".scale", ".amax_history")))
    assert fp8_state == sorted(n + s for n in fp8_names for s in (".scale", ".amax_history"))
    assert {k: v.shape for k, v in sd.items() if k not in fp8_state} == {
        k: v.shape for k, v in tiny_model(fp8=False).state_dict().items()}
    idx = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(idx[:, :-1], idx[:, 1:]).backward()
        model.update_fp8_scales()
        opt.step()
        opt.zero_grad()
    assert all((model.state_dict()[k] != 1).any() for k in fp8_state if k.endswith(".scale"))
    fresh = Xmodel(cfg)
    fresh.load_state_dict(model.state_dict())  # strict
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))
    ckpt = {"model": model.state_dict(), "model_config": dataclasses.asdict(cfg)}
    got_cfg, got_sd = export.checked_state_dict(ckpt, "checkpoint")
    weights = {k: v for k, v in got_sd.items() if k not in fp8_state}
    ours = export.export_tensors(got_cfg, got_sd, torch.float32)
    plain = export.export_tensors(dataclasses.replace(cfg, fp8=False), weights, torch.float32)
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in ours)


def test_flops_per_token():
    cfg = model_config("xmodel25", fp8=False)
    model = mup.build_model(cfg, device="meta")
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)  # tied: counted once
    attn = 6 * 48 * 24 * 64  # per token per position of context, causal (half of 12 L d)
    assert model.flops_per_token(3712) == pytest.approx(6 * matmul + attn * 3712, rel=1e-12)
    assert model.flops_per_token(2 * 3712) - model.flops_per_token(3712) == pytest.approx(attn * 3712)
    six_n = 6 * model.num_params()
    assert model.flops_per_token(1) / six_n == pytest.approx(1.0, abs=1e-3)  # 6N dominated at short context
    assert 1.0 < model.flops_per_token(3712) / six_n < 1.25


# ----------------------------------------------------------------------------------------------------------
# generation with a KV cache

@torch.no_grad()
def no_cache_greedy(model, idx, n):
    for _ in range(n):
        idx = torch.cat((idx, model(idx)[:, -1].argmax(-1, keepdim=True)), 1)
    return idx


def test_kv_cache_logits_equal_full_forward():
    model = tiny_model().eval()
    idx = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(idx)
        caches = [{} for _ in model.blocks]
        steps = [model.logits(model.hidden_states(idx[:, :6], 0, caches))]
        for t in range(6, 10):
            steps.append(model.logits(model.hidden_states(idx[:, t:t + 1], t, caches)))
        steps.append(model.logits(model.hidden_states(idx[:, 10:], 10, caches)))  # a chunk (a new chat turn)
    assert caches[0]["k"].shape[2] == 14
    assert torch.allclose(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_greedy_equals_no_cache_and_top_k_1():
    model = tiny_model().eval()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(8))
    want = no_cache_greedy(model, prompt, 12)
    assert torch.equal(model.generate(prompt, 12, temperature=0), want)
    assert torch.equal(model.generate(prompt, 12, temperature=0.7, top_k=1), want)
    # generation stops once every sequence has produced eos_id (here the first new token)
    one = prompt[:1]
    first = no_cache_greedy(model, one, 1)[0, -1].item()
    assert torch.equal(model.generate(one, 12, temperature=0, eos_id=first), want[:1, :6])
    streamed = list(model.generate_stream(one, 4, temperature=0))
    assert torch.equal(torch.cat(streamed), want[0, 5:9])


def test_generate_sampling_seeded_and_top_k():
    model = tiny_model().eval()
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(9))
    run = lambda seed, **kw: model.generate(prompt, 16, temperature=2.0,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :4], prompt) and a.shape == (3, 20)
    out = run(2, top_k=3)
    with torch.no_grad():
        logits = model(out[:, :-1])[:, 3:]  # the distribution each new token was drawn from
    top3 = logits.topk(3, -1).indices
    assert (top3 == out[:, 4:, None]).any(-1).all()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 200)


# ----------------------------------------------------------------------------------------------------------
# config errors

@pytest.mark.parametrize("kw,field", [
    (dict(hidden=64, n_head=5), "n_head"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(hidden=12, n_head=4, n_kv_head=2), "head_dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layer=-1), "n_layer"),
    (dict(hidden=0), "hidden"),
    (dict(ffn_hidden=0), "ffn_hidden"),
    (dict(n_head=0), "n_head"),
    (dict(n_kv_head=0), "n_kv_head"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(base_width=0), "base_width"),
    (dict(loss_chunk=0), "loss_chunk"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_base=-1.0), "rope_base"),
    (dict(init_std=0.0), "init_std"),
    (dict(input_scale=-12.0), "input_scale"),
    (dict(hidden=64.0), "hidden"),
    (dict(fp8_backend="cublas"), "fp8_backend"),
    (dict(attn_backend="flash3"), "attn_backend"),
    (dict(attn_backend="FLASH"), "attn_backend"),
    (dict(gqa="expand"), "gqa"),
    (dict(fp8_layers="qkv,attn_out"), "fp8_layers"),
    (dict(fp8_layers="down,qkv,down"), "fp8_layers"),
    (dict(fp8=True, fp8_layers=" , "), "fp8_layers"),
    (dict(fp8_layers=("qkv", "down")), "fp8_layers"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        tiny(**kw)


def test_too_long_input_raises():
    model = tiny_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_compiled_model_compiles_the_loss_chunk_except_fp32_on_cpu(monkeypatch):
    """compile_for_training compiles the loss chunk where it is the faster path (bf16 autocast here; CUDA),
    not for fp32 on a CPU, where aten's row-wise softmax is faster."""
    seen = []
    real = model_mod.chunked_cross_entropy

    def spy(*args, compiled=False):
        seen.append(compiled)
        return real(*args)  # eagerly: the compiled chunk's numbers are the next test's
    monkeypatch.setattr(model_mod, "chunked_cross_entropy", spy)
    m = tiny_model()
    m.compiled = True  # what compile_for_training sets, without compiling the blocks
    x = torch.randint(0, m.config.vocab_size, (1, 8))
    m(x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x, x)
    assert seen == [False, True]


def test_compiled_loss_chunk_equals_eager():
    """The torch.compile'd per-chunk softmax/gradient (Xmodel.compile_for_training) against the eager path."""
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    y = torch.randint(0, 300, (40,))
    y[3] = -1
    out = {}
    for compiled in (False, True):
        h.grad = w.grad = None
        loss = chunked_cross_entropy(h, w, y, 0.5, 16, compiled=compiled)
        loss.backward()
        out[compiled] = (loss.detach(), h.grad.clone(), w.grad.clone())
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_for_training_passes_the_mode_to_every_block(monkeypatch):
    """compile_mode (train.py) reaches torch.compile of each block: "reduce-overhead" replays a block as a CUDA
    graph; "default" is torch's own default; an unknown mode is refused before anything compiles."""
    import torch.nn as nn
    seen = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    model = Xmodel(ModelConfig(vocab_size=64, n_layer=3, hidden=32, ffn_hidden=64, n_head=2, n_kv_head=1,
                               max_seq_len=16, base_width=16))
    model.compile_for_training("reduce-overhead")
    assert seen == [("Block", {"mode": "reduce-overhead"})] * 3 and model.compiled
    seen.clear()
    model.compile_for_training()
    assert seen == [("Block", {"mode": None})] * 3
    with pytest.raises(ValueError, match="compile mode must be one of"):
        model.compile_for_training("fastest")


def test_fp8_margin_reaches_every_fp8_layer_and_its_scales():
    """fp8_margin (Transformer Engine's margin) gives each FP8 layer headroom: after a training step every scale
    is fp8_max / amax / 2^margin; out of 0..8 (or not an integer) it is refused naming the key."""
    import fp8
    cfg = ModelConfig(vocab_size=64, n_layer=2, hidden=32, ffn_hidden=64, n_head=2, n_kv_head=1, max_seq_len=16,
                      base_width=16, fp8=True, fp8_margin=2)
    model = Xmodel(cfg)
    layers = [m for m in model.modules() if isinstance(m, fp8.FP8Linear)]
    assert len(layers) == 8 and {m.margin for m in layers} == {2}
    idx = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model(idx[:, :-1], idx[:, 1:]).backward()
    model.update_fp8_scales()
    fp8_max = torch.tensor([448.0, 448.0, 57344.0])
    for m in layers:
        torch.testing.assert_close(m.scale * m.amax_history[:, 0] * 4, fp8_max, rtol=1e-6, atol=0)
    for bad in (-1, 9, 1.0, True):
        with pytest.raises(ValueError, match="fp8_margin must be an integer in 0..8"):
            dataclasses.replace(cfg, fp8_margin=bad)
