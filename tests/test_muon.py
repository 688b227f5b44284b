"""Tests for muon.py: Newton-Schulz orthogonalization, the Muon update, its state and its sharding.

The band. zeropower_via_newtonschulz5 maps each singular value x of G / ||G||_F to p(x) = f^5(x),
f(x) = 3.4445 x - 4.7750 x^3 + 2.0315 x^5 (float64 scan of x in [2e-3, 1]: p(x) in [0.682, 1.203]).
Inputs are built as U diag(s) V^T with known U, V, so every singular value is checked along its own
direction (D = U^T O V): D_ii in the band, D_ii close to p(x_i), off-diagonal small. bf16 rounding adds
about 0.02 (measured <= 0.012), hence BAND = [0.66, 1.23].
"""

import copy
import datetime
import io
import math
import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import muon
import runtime
from muon import Muon, newton_schulz_flops, shard_by_shape, update_scale, zeropower_via_newtonschulz5

BAND = (0.66, 1.23)
X_MIN = 2e-3  # normalized singular values above this reach the band in 5 steps


def quintic5(x, steps=5):
    for _ in range(steps):
        x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
    return x


def random_orthogonal(n, gen):
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))[0]


def with_spectrum(rows, cols, s, seed=0):
    """G = U diag(s) V^T (float32) with random orthonormal U (rows x k), V (cols x k)."""
    gen = torch.Generator().manual_seed(seed)
    k = len(s)
    U = random_orthogonal(rows, gen)[:, :k]
    V = random_orthogonal(cols, gen)[:, :k]
    return ((U * s) @ V.T).float(), U, V


def check_directions(G, U, V, s, O):
    """Every input singular direction i with x_i >= X_MIN comes out with gain in BAND, close to p(x_i)."""
    x = s / torch.linalg.vector_norm(G.double())
    D = U.T @ O.double() @ V
    gains = D.diagonal()
    off = D - torch.diag(gains)
    assert off.abs().max() < 0.05, "output is not aligned with the input's singular vectors"
    big = x >= X_MIN
    assert big.any()
    assert gains[big].min() >= BAND[0] and gains[big].max() <= BAND[1], gains[big]
    torch.testing.assert_close(gains[big], quintic5(x[big]), atol=0.04, rtol=0)


# ---------------------------------------------------------------- Newton-Schulz


def test_band_of_the_quintic_itself():
    x = torch.logspace(math.log10(X_MIN), 0, 100_001, dtype=torch.float64)
    y = quintic5(x)
    assert 0.68 < y.min() < 0.69 and 1.20 < y.max() < 1.21
    assert quintic5(torch.tensor(1e-3, dtype=torch.float64)) < 0.5  # below X_MIN 5 steps are not enough


@pytest.mark.parametrize("rows,cols", [(64, 256), (256, 64), (128, 128), (320, 128), (128, 320)])
def test_random_gaussian_directions_in_band(rows, cols):
    G = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    U, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    O = zeropower_via_newtonschulz5(G)
    assert O.dtype == torch.bfloat16 and O.shape == G.shape
    check_directions(G, U, Vh.T, s, O)
    if rows != cols:  # well conditioned: every singular value is in the band
        sv = torch.linalg.svdvals(O.double())
        assert sv.min() >= BAND[0] and sv.max() <= BAND[1]


def test_ill_conditioned_condition_100():
    s = torch.logspace(0, -2, 64, dtype=torch.float64)
    G, U, V = with_spectrum(64, 96, s)
    assert (s / s.norm()).min() > X_MIN
    O = zeropower_via_newtonschulz5(G)
    check_directions(G, U, V, s, O)
    sv = torch.linalg.svdvals(O.double())
    assert sv.min() >= BAND[0] and sv.max() <= BAND[1]


def test_rank_deficient_keeps_null_directions_small():
    # f(0) = 0: the iteration puts nothing into G's null space. Where that null space is spanned by
    # coordinate axes (zero rows and columns of G) every entry there is a sum of products with a zero
    # factor, exactly 0 in any arithmetic, so the check is exact on every CPU. (In a rotated null space
    # bf16 rounding noise lands there and is amplified by up to 3.4445^5 = 485; its size depends on the
    # CPU's bf16 GEMM, and the worst case, ||bf16 rounding of X_0||_2 <= 2^-8 > X_MIN, bounds nothing.)
    gen = torch.Generator().manual_seed(1)
    s = torch.logspace(0, -1, 16, dtype=torch.float64)
    rows, cols = torch.randperm(64, generator=gen)[:16], torch.randperm(96, generator=gen)[:16]
    U, V = torch.zeros(64, 16, dtype=torch.float64), torch.zeros(96, 16, dtype=torch.float64)
    U[rows], V[cols] = random_orthogonal(16, gen), random_orthogonal(16, gen)
    G = ((U * s) @ V.T).float()
    O = zeropower_via_newtonschulz5(G).double()
    check_directions(G, U, V, s, O)
    null_rows, null_cols = torch.ones(64, dtype=torch.bool), torch.ones(96, dtype=torch.bool)
    null_rows[rows], null_cols[cols] = False, False
    assert O[null_rows].count_nonzero() == 0 and O[:, null_cols].count_nonzero() == 0
    sv = torch.linalg.svdvals(O)
    assert sv[:16].min() >= BAND[0]  # and rank 16: the zero rows leave no room for more


def test_tall_is_transposed_wide():
    # W.mT holds W's memory: the tall path's transpose gives back W's layout, so both run the same bf16
    # GEMMs on the same layouts and must agree bit for bit on any CPU (a contiguous tall copy may take
    # another GEMM kernel, whose bf16 rounding differs between CPUs)
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(3))
    assert torch.equal(zeropower_via_newtonschulz5(W.mT), zeropower_via_newtonschulz5(W).mT)


def test_batched_normalizes_each_matrix_on_its_own():
    gen = torch.Generator().manual_seed(4)
    scales = torch.tensor([1e-3, 1.0, 1e3]).view(3, 1, 1)
    B = torch.randn(3, 40, 96, generator=gen) * scales  # a batch-wide norm would zero the first one
    O = zeropower_via_newtonschulz5(B)
    assert O.shape == B.shape
    for i in range(3):
        sv = torch.linalg.svdvals(O[i].double())
        assert sv.min() >= BAND[0] and sv.max() <= BAND[1]
        torch.testing.assert_close(O[i].float(), zeropower_via_newtonschulz5(B[i]).float(), atol=2e-2, rtol=0)
    tall = zeropower_via_newtonschulz5(B.mT)
    torch.testing.assert_close(tall.float(), O.mT.float(), atol=2e-2, rtol=0)


def test_zero_and_tiny_matrices_give_no_nan():
    assert torch.equal(zeropower_via_newtonschulz5(torch.zeros(5, 7)), torch.zeros(5, 7, dtype=torch.bfloat16))
    for tiny in (1e-30, 1e-20):
        O = zeropower_via_newtonschulz5(torch.full((7, 5), tiny))
        assert torch.isfinite(O).all() and O.abs().max() < 1e-6
    assert torch.isfinite(zeropower_via_newtonschulz5(torch.zeros(2, 3, 4))).all()


def test_rejects_vectors():
    with pytest.raises(ValueError, match=r"\(5,\)"):
        zeropower_via_newtonschulz5(torch.ones(5))


# ---------------------------------------------------------------- the Muon update


def reference_ns(G, steps=5):
    X = G.bfloat16()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = -4.7750 * A + 2.0315 * (A @ A)
        X = 3.4445 * X + B @ X
    return X.T if tall else X


def reference_step(p, buf, g, lr, momentum, nesterov, wd, scale, ns_steps=5):
    buf = momentum * buf + g.float()
    u = g.float() + momentum * buf if nesterov else buf
    O = reference_ns(u, ns_steps)
    p = p * (1 - lr * wd)
    p = p - O.float() * (lr * scale)
    return p, buf


SHAPES = [(48, 32), (32, 48), (40, 40)]


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(r, c, generator=gen) * 0.05).to(dtype)) for r, c in shapes]


def grads_for(shapes, step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(r, c, generator=gen).to(dtype) for r, c in shapes]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("rms_scale", [0.2, None])
def test_two_steps_equal_hand_written_reference(nesterov, rms_scale):
    params = make_params(SHAPES)
    frozen = torch.nn.Parameter(torch.ones(8, 8))  # no grad: untouched, no state
    opt = Muon([{"params": params[:2]}, {"params": [params[2], frozen], "lr": 0.03, "weight_decay": 0.0}],
               lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1, rms_scale=rms_scale)
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros(p.shape) for p in params]
    hyper = [(0.05, 0.1), (0.05, 0.1), (0.03, 0.0)]
    for step in range(2):
        if step == 1:  # a schedule writes group["lr"] between steps
            opt.param_groups[0]["lr"] = 0.02
            hyper[0] = hyper[1] = (0.02, 0.1)
        for p, g in zip(params, grads_for(SHAPES, step)):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads_for(SHAPES, step)):
            lr, wd = hyper[i]
            scale = 0.2 * math.sqrt(max(SHAPES[i])) if rms_scale else max(1.0, SHAPES[i][0] / SHAPES[i][1]) ** 0.5
            ref[i], bufs[i] = reference_step(ref[i], bufs[i], g, lr, 0.9, nesterov, wd, scale)
        for i, p in enumerate(params):
            assert torch.equal(p.detach(), ref[i]), (step, i)
            assert torch.equal(opt.state[p]["momentum_buffer"], bufs[i])
    assert torch.equal(frozen.detach(), torch.ones(8, 8)) and len(opt.state[frozen]) == 0


def test_update_scale_values():
    assert update_scale((3840, 1536)) == pytest.approx(0.2 * math.sqrt(3840))
    assert update_scale((1536, 3840)) == pytest.approx(0.2 * math.sqrt(3840))
    assert update_scale((3840, 1536), None) == pytest.approx(math.sqrt(2.5))
    assert update_scale((1536, 3840), None) == 1.0


@pytest.mark.parametrize("rows,cols", [(128, 320), (320, 128), (96, 96)])
def test_update_rms_matches_0p2(rows, cols):
    """With lr = 1 and no decay the step is 0.2 sqrt(max(r, c)) O, whose RMS is 0.2 * RMS(sigma(O)).

    RMS(sigma(O)) is inside the band, so the update RMS is in 0.2 * [0.66, 1.23] whatever the gradient;
    checked also exactly against the singular values of O (float64 SVD, 1e-4 relative).
    """
    p = torch.nn.Parameter(torch.zeros(rows, cols))
    p.grad = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols))
    Muon([p], lr=1.0, momentum=0.95, weight_decay=0.0).step()
    rms = p.detach().double().pow(2).mean().sqrt().item()
    assert 0.2 * BAND[0] <= rms <= 0.2 * BAND[1]
    u = p.grad.float() + 0.95 * p.grad.float()  # first step: buf = g, Nesterov u = g + 0.95 g
    sigma = torch.linalg.svdvals(zeropower_via_newtonschulz5(u).double())
    expected = 0.2 * math.sqrt(max(rows, cols)) * math.sqrt(sigma.pow(2).sum().item() / (rows * cols))
    assert rms == pytest.approx(expected, rel=1e-4)
    assert expected == pytest.approx(0.2 * sigma.pow(2).mean().sqrt().item(), rel=1e-9)


def test_bf16_params_keep_fp32_momentum():
    params = make_params(SHAPES, dtype=torch.bfloat16)
    opt = Muon(params, lr=0.01, momentum=0.95)
    grads = [grads_for(SHAPES, s, torch.bfloat16) for s in range(2)]
    for s in range(2):
        for p, g in zip(params, grads[s]):
            p.grad = g
        opt.step()
    for i, p in enumerate(params):
        assert p.dtype == torch.bfloat16
        buf = opt.state[p]["momentum_buffer"]
        assert buf.dtype == torch.float32
        assert torch.equal(buf, 0.95 * grads[0][i].float() + grads[1][i].float())


def test_rejects_non_matrices_naming_the_parameter():
    ok = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"parameter 1 \(param group 0\) has shape \(4,\)"):
        Muon([ok, torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match=r"parameter 2 \(param group 1\) has shape \(2, 3, 4\)"):
        Muon([{"params": [ok]}, {"params": [torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(2, 3, 4))]}])


@pytest.mark.parametrize("bad", [dict(momentum=1.0), dict(lr=-1.0), dict(ns_steps=0), dict(weight_decay=-0.1),
                                 dict(rms_scale=0.0)])
def test_rejects_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], **bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    params = make_params(SHAPES, dtype)
    opt = Muon(params, lr=0.02, weight_decay=0.1)
    for s in range(2):
        for p, g in zip(params, grads_for(SHAPES, s, dtype)):
            p.grad = g
        opt.step()
    blob = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, blob)
    for p, g in zip(params, grads_for(SHAPES, 2, dtype)):
        p.grad = g
    opt.step()

    blob.seek(0)
    saved = torch.load(blob)
    resumed = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = Muon(resumed, lr=0.5)  # hyper-parameters come from the state dict
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == 0.02
    for p in resumed:
        assert opt2.state[p]["momentum_buffer"].dtype == torch.float32
    for p, g in zip(resumed, grads_for(SHAPES, 2, dtype)):
        p.grad = g
    opt2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a.detach(), b.detach())
        assert torch.equal(opt.state[a]["momentum_buffer"], opt2.state[b]["momentum_buffer"])


def test_closure_is_called_and_returned():
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = Muon([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and "momentum_buffer" in opt.state[p]


# ---------------------------------------------------------------- fused matrices: one matrix, or split


def float64_ns5(G, steps=5):
    """NewtonSchulz5 in exact arithmetic: the quintic applied to every singular value of G / ||G||_F."""
    G = G.double()
    U, s, Vh = torch.linalg.svd(G / torch.linalg.matrix_norm(G), full_matrices=False)
    return (U * quintic5(s, steps)) @ Vh


def rel(a, b):
    return (torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).item()


QKV_ROWS = [48, 16, 16]  # q, k, v of a fused [q; k; v] (80 x 40)


def qkv_grads(step):
    """Gradients of [q; k; v] and of a lone 24 x 32 matrix; k's dominates, so orthogonalizing [q; k; v] as one
    matrix or block by block differs a lot."""
    g, lone = grads_for([(80, 40), (24, 32)], step)
    q, k, v = g.split(QKV_ROWS)
    return [torch.cat([q, k * 10, v]), lone]


def test_fused_update_is_ns5_of_the_fused_momentum():
    """Two steps on a fused [q; k; v] and a lone matrix: float64 momentum; the update of [q; k; v] is float64
    NS5 of its Nesterov input times 0.2 sqrt(max) of the fused 80 x 40 shape (not of each block's). The bf16
    iteration deviates from the exact one by 3.0-3.7% (relative Frobenius norm, measured over 20 random
    24x32 ... 96x40 matrices), bound 8%; orthogonalizing the blocks one by one, or scaling by a block's shape
    (29% off), would be caught. The lone matrix is checked against its own NS5 the same way."""
    lr, mom, wd = 0.05, 0.9, 0.1
    params = make_params([(80, 40), (24, 32)])
    opt = Muon(params, lr=lr, momentum=mom, weight_decay=wd)
    bufs = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for step in range(2):
        gs = qkv_grads(step)
        before = [p.detach().double().clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        bufs = [mom * b + g.double() for b, g in zip(bufs, gs)]
        u = [g.double() + mom * b for g, b in zip(gs, bufs)]
        for i, p in enumerate(params):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[i].float())  # fp32 rounding
        steps = [(b * (1 - lr * wd) - p.detach().double()) / lr for b, p in zip(before, params)]
        want = float64_ns5(u[0])
        assert rel(steps[0] / (0.2 * math.sqrt(80)), want) < 0.08, step
        separate = torch.cat([float64_ns5(x) * math.sqrt(max(x.shape) / 80) for x in u[0].split(QKV_ROWS)])
        assert rel(separate, want) > 0.3, rel(separate, want)
        assert rel(steps[1] / (0.2 * math.sqrt(32)), float64_ns5(u[1])) < 0.08


def test_splits_equal_separate_parameters():
    """A fused [q; k; v] weight with splits against q, k, v as separate parameters, two steps, bit for bit
    (weights and momentum): each row block is orthogonalized and scaled alone, as separate parameters are
    (muon_fused=False)."""
    parts = [torch.nn.Parameter(x.clone()) for x in make_params([(80, 40)])[0].detach().split(QKV_ROWS)]
    fused = torch.nn.Parameter(torch.cat([p.detach() for p in parts]))
    opt_sep = Muon(parts, lr=0.05, momentum=0.9, weight_decay=0.1)
    opt_fused = Muon([{"params": [fused], "splits": [[0, QKV_ROWS]]}], lr=0.05, momentum=0.9, weight_decay=0.1)
    for step in range(2):
        g = qkv_grads(step)[0]
        for p, x in zip(parts, g.split(QKV_ROWS)):
            p.grad = x
        fused.grad = g
        opt_sep.step()
        opt_fused.step()
        assert torch.equal(fused.detach(), torch.cat([p.detach() for p in parts])), step
        assert torch.equal(opt_fused.state[fused]["momentum_buffer"],
                           torch.cat([opt_sep.state[p]["momentum_buffer"] for p in parts]))
    assert muon.pieces(fused, QKV_ROWS) == [(fused, 0, 48), (fused, 48, 64), (fused, 64, 80)]
    assert muon.pieces(fused) == [(fused, 0, 80)]


def test_splits_are_validated():
    a, b = (torch.nn.Parameter(torch.zeros(r, 6)) for r in (6, 2))
    for splits, msg in (([[0, [4, 3]]], "add up to"), ([[0, [6, 0]]], "positive"),
                        ([[2, [1, 1]]], "position 0..1"), ([[0, [3, 3]], [0, [6]]], "no other split")):
        with pytest.raises(ValueError, match=msg):
            Muon([{"params": [a, b], "splits": splits}])
    opt = Muon([{"params": [a, b], "splits": [[0, [3, 3]]]}])
    sd = opt.state_dict()
    Muon([{"params": [a, b]}]).load_state_dict(sd)  # the file's splits do not travel: structure is the model's
    opt.load_state_dict({**sd, "param_groups": [{**sd["param_groups"][0], "splits": [], "stacks": [[0, 1]]}]})
    assert opt.param_groups[0]["splits"] == [[0, [3, 3]]] and "stacks" not in opt.param_groups[0]


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_optimizer_state_saved_with_separate_parts_loads_for_fused_weights(kind):
    """The hidden matrices' optimizer state of a checkpoint from before q/k/v and gate/up were fused (each part
    its own parameter holding its rows of the state) loads into muon.Optimizers over the fused model: each fused
    weight's state is its parts' concatenated, and the next step equals the uninterrupted run's, bit for bit."""
    from types import SimpleNamespace
    import mup
    from model import ModelConfig
    cfg = ModelConfig(vocab_size=64, n_layer=2, hidden=32, ffn_hidden=48, n_head=4, n_kv_head=2, max_seq_len=16)
    tcfg = SimpleNamespace(beta1=0.9, beta2=0.95, adam_eps=1e-8, weight_decay=0.1, muon_momentum=0.95,
                           muon_ns_steps=5, muon_rms_scale=0.2, zero1=False)
    torch.manual_seed(0)
    model = mup.build_model(cfg)
    groups = mup.param_groups(model, 0.02, 0.01, 0.1)
    hidden, parts = groups[0], dict((i, rows) for i, rows in groups[0]["parts"])
    shapes = [p.shape for p in hidden["params"]]

    def step(opts, s):
        for p, g in zip(hidden["params"], grads_for(shapes, s)):
            p.grad = g
        opts.hidden.step()

    run = muon.Optimizers(groups, tcfg, kind)
    step(run, 0)
    step(run, 1)
    sd, at_2 = copy.deepcopy(run.state_dict()), [p.detach().clone() for p in hidden["params"]]
    state, ids = {}, []  # the same state written apart: the parts of fused weight i are parameters of their own
    for i, p in enumerate(hidden["params"]):
        rows = parts.get(i, [len(p)])
        for j in range(len(rows)):
            state[len(ids)] = {k: v.split(rows)[j].clone() if v.dim() else v
                               for k, v in sd["hidden"]["state"][i].items()}
            ids.append(len(ids))
    assert len(ids) == 7 * 2 and len(hidden["params"]) == 4 * 2
    old = {**sd["hidden"], "state": state, "param_groups": [{**sd["hidden"]["param_groups"][0], "params": ids}]}
    step(run, 2)
    uninterrupted = [p.detach().clone() for p in hidden["params"]]

    buf = io.BytesIO()  # through a file, as a checkpoint: the loaded state shares no tensor with run's
    torch.save({**sd, "hidden": old}, buf)
    resumed = muon.Optimizers(groups, tcfg, "adamw")
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for i, p in enumerate(hidden["params"]):
        for key, value in resumed.hidden.state[p].items():
            assert torch.equal(value, sd["hidden"]["state"][i][key]), (i, key)
    with torch.no_grad():
        for p, w in zip(hidden["params"], at_2):
            p.copy_(w)
    step(resumed, 2)
    for i, p in enumerate(hidden["params"]):
        assert torch.equal(p.detach(), uninterrupted[i]), i
    with pytest.raises(ValueError, match="does not fit"):
        muon.fuse_saved_parts({"state": {}, "param_groups": [{"params": [0, 1]}]}, [hidden])


@pytest.mark.parametrize("max_elements", [muon.NS_BATCH_ELEMENTS, 2 * 32 * 48])
def test_newton_schulz_runs_one_batched_chain_per_shape(monkeypatch, max_elements):
    """Two steps over 8 matrices (one split into 32 + 16 + 32 rows; the second group iterates 3 times, not 5):
    one batched chain per shape and ns_steps (or per NS_BATCH_ELEMENTS-sized chunk of them), and the weights
    equal per-matrix chains (reference_ns, the unbatched iteration) to within a bf16 rounding of the update:
    bit for bit on the CPU here (MKL's batched products compute each matrix as its own), a GPU's batched GEMM
    may sum in another order."""
    monkeypatch.setattr(muon, "NS_BATCH_ELEMENTS", max_elements)
    shapes = [(32, 48)] * 4 + [(48, 32)] * 2 + [(80, 48), (24, 24)]
    params = make_params(shapes, seed=3)
    lr, mom, wd = 0.05, 0.9, 0.1
    opt = Muon([{"params": params[:6]}, {"params": params[6:], "splits": [[0, [32, 16, 32]]], "ns_steps": 3}],
               lr=lr, momentum=mom, weight_decay=wd)
    calls = []
    real = muon.zeropower_via_newtonschulz5
    monkeypatch.setattr(muon, "zeropower_via_newtonschulz5", lambda G, steps=5: calls.append((*G.shape, steps))
                        or real(G, steps))
    ref, bufs = [p.detach().clone() for p in params], [torch.zeros(s) for s in shapes]
    blocks = [[(0, s[0])] for s in shapes[:6]] + [[(0, 32), (32, 48), (48, 80)], [(0, 24)]]  # rows of each piece
    for step in range(2):
        gs = grads_for(shapes, step)
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        for i, (g, steps) in enumerate(zip(gs, [5] * 6 + [3] * 2)):
            bufs[i] = mom * bufs[i] + g
            u = g + mom * bufs[i]
            ref[i] = ref[i] * (1 - lr * wd)
            for lo, hi in blocks[i]:
                O = reference_ns(u[lo:hi], steps).float()
                ref[i][lo:hi] -= O * (lr * 0.2 * math.sqrt(max(hi - lo, u.shape[1])))
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach(), ref[i], rtol=0, atol=lr * 0.2 * math.sqrt(80) * 2 ** -7)
    # (batch, rows, cols, ns_steps) per step; a chain of at most 2 x 32 x 48 elements takes two (32, 48) matrices
    first = {(2, 32, 48, 5): 2} if max_elements == 2 * 32 * 48 else {(4, 32, 48, 5): 1}
    per_step = {**first, (2, 48, 32, 5): 1, (2, 32, 48, 3): 1, (1, 16, 48, 3): 1, (1, 24, 24, 3): 1}
    assert Counter(calls) == Counter({k: 2 * n for k, n in per_step.items()})


# ---------------------------------------------------------------- sharding and distributed


def test_shard_by_shape_is_a_balanced_partition():
    shapes = [(8, 4), (4, 8), (8, 4), (2, 2), (8, 4), (4, 8), (8, 4), (8, 4)]
    for world in (1, 2, 3, 5, 16):
        owners = shard_by_shape(shapes, world)
        assert len(owners) == len(shapes) and all(0 <= o < world for o in owners)
        for shape in set(shapes):
            counts = Counter(o for o, s in zip(owners, shapes) if s == shape)
            per_rank = [counts.get(r, 0) for r in range(world)]
            assert max(per_rank) - min(per_rank) <= 1, (world, shape, per_rank)
        total = Counter(owners)
        assert max(total.values()) - min(total.get(r, 0) for r in range(world)) <= 1
        assert owners == shard_by_shape(list(shapes), world)
    assert shard_by_shape(shapes, 1) == [0] * len(shapes)
    with pytest.raises(ValueError, match="world_size"):
        shard_by_shape(shapes, 0)


DIST_SHAPES = [(32, 48), (48, 32), (32, 48), (16, 48), (32, 48), (48, 32), (24, 24)]
DIST_STEPS = 3


def run_muon(steps, record=None):
    params = make_params(DIST_SHAPES, seed=7)
    opt = Muon([{"params": params[:4]}, {"params": params[4:], "lr": 0.01, "weight_decay": 0.0}],
               lr=0.02, momentum=0.95, weight_decay=0.1)
    for s in range(steps):
        for p, g in zip(params, grads_for(DIST_SHAPES, s)):
            p.grad = g  # identical on every rank, as after DDP's all-reduce
        opt.step()
    return params, opt


def _dist_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    # A timeout turns a broken collective into a failure instead of a hung test suite.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    calls = []
    real = muon.zeropower_via_newtonschulz5

    def counting(G, steps=5, eps=1e-7):
        calls.append(tuple(G.shape))
        return real(G, steps, eps)

    muon.zeropower_via_newtonschulz5 = counting
    try:
        params, opt = run_muon(DIST_STEPS)
    finally:
        muon.zeropower_via_newtonschulz5 = real
    dist.barrier()  # no rank tears the group down while a peer's last all-gather is still in flight
    torch.save({"params": [p.detach() for p in params],
                "bufs": [opt.state[p]["momentum_buffer"] for p in params],
                "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    runtime.exit_distributed()  # (not a return: gloo's threads can abort Python's finalization)


def test_distributed_equals_single_process_and_shards_work(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params, opt = run_muon(DIST_STEPS)
    finally:
        torch.set_num_threads(threads)
    owners = shard_by_shape(DIST_SHAPES, world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r, res in enumerate(results):
        for i, p in enumerate(params):
            assert torch.equal(res["params"][i], p.detach()), (r, i)
            assert torch.equal(res["bufs"][i], opt.state[p]["momentum_buffer"]), (r, i)
        mine = Counter(s for s, o in zip(DIST_SHAPES, owners) if o == r)
        # per step one batched chain for each shape the rank owns, over all its matrices of that shape
        assert Counter(res["calls"]) == Counter({(n, *s): DIST_STEPS for s, n in mine.items()}), r
    assert sum(c[0] for res in results for c in res["calls"]) == len(DIST_SHAPES) * DIST_STEPS  # no repeated work


# Two groups, and an (80, 48) weight split into blocks of 32, 16, 32 rows: matrices (64, 48) x 2, (48, 32) x 2,
# (32, 48) x 3, (24, 24), (16, 48); each is orthogonalized once.
SPLIT_SHAPES = [(64, 48), (48, 32), (32, 48), (24, 24), (64, 48), (48, 32), (80, 48)]
SPLIT_PIECES = [(64, 48), (48, 32), (32, 48), (24, 24), (64, 48), (48, 32), (32, 48), (16, 48), (32, 48)]


def run_split(steps, shard_state=False, params=None, load=None, first_step=0):
    params = params if params is not None else make_params(SPLIT_SHAPES, seed=11)
    opt = Muon([{"params": params[:4]},
                {"params": params[4:], "splits": [[2, [32, 16, 32]]], "lr": 0.01, "weight_decay": 0.0}],
               lr=0.02, momentum=0.95, weight_decay=0.1, shard_state=shard_state)
    if load is not None:
        opt.load_state_dict(load)
    for s in range(first_step, first_step + steps):
        for p, g in zip(params, grads_for(SPLIT_SHAPES, s)):
            p.grad = g
        opt.step()
    return params, opt


def _split_worker(rank, world_size, init_file, out_dir):
    """Unsharded and sharded-state Muon with a split weight; the sharded one's full_state_dict, saved by rank 0,
    is loaded by a fresh sharded optimizer on every rank, which then takes one more step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    calls = []
    real = muon.zeropower_via_newtonschulz5
    muon.zeropower_via_newtonschulz5 = lambda G, steps=5, eps=1e-7: calls.append(tuple(G.shape)) or real(G, steps, eps)
    try:
        plain, _ = run_split(DIST_STEPS)
        sharded, opt = run_split(DIST_STEPS, shard_state=True)
        owned = sorted(i for i, p in enumerate(sharded) if p in opt.state)
        full = opt.full_state_dict(to=0)
        if rank == 0:
            torch.save(full, os.path.join(out_dir, "full.pt"))
        dist.barrier()
        resumed, opt2 = run_split(1, True, [torch.nn.Parameter(p.detach().clone()) for p in sharded],
                                    torch.load(os.path.join(out_dir, "full.pt")), DIST_STEPS)
        owned_after_load = sorted(i for i, p in enumerate(resumed) if p in opt2.state)
    finally:
        muon.zeropower_via_newtonschulz5 = real
    dist.barrier()
    torch.save({"plain": [p.detach() for p in plain], "sharded": [p.detach() for p in sharded],
                "resumed": [p.detach() for p in resumed], "owned": owned, "owned_after_load": owned_after_load,
                "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    runtime.exit_distributed()  # (not a return: gloo's threads can abort Python's finalization)


def test_distributed_with_a_split_weight_equals_single_process(tmp_path):
    """2 gloo ranks, two groups and a split weight: weights bit-identical to one process with and without
    sharded state; a split weight is one unit of work on one rank (each block orthogonalized once in all); with
    shard_state a rank keeps exactly its matrices' momentum; full_state_dict gathers it all and a sharded
    resume from it continues bit-identically."""
    world = 2
    mp.spawn(_split_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params, opt = run_split(DIST_STEPS + 1)
        ref3, opt3 = run_split(DIST_STEPS)
    finally:
        torch.set_num_threads(threads)
    ref3 = [p.detach().clone() for p in ref3]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    owners = opt3.owners(world)
    full = torch.load(tmp_path / "full.pt")
    flat = [p for g in opt3.param_groups for p in g["params"]]
    assert sorted(full["state"]) == list(range(len(SPLIT_SHAPES)))
    for i, p in enumerate(flat):
        assert torch.equal(full["state"][i]["momentum_buffer"], opt3.state[p]["momentum_buffer"]), i
    pieces = Counter()
    for r, res in enumerate(results):
        for i in range(len(SPLIT_SHAPES)):
            assert torch.equal(res["plain"][i], ref3[i]) and torch.equal(res["sharded"][i], ref3[i]), (r, i)
            assert torch.equal(res["resumed"][i], params[i].detach()), (r, i)
        mine = [i for i, p in enumerate(flat) if owners[p] == r]
        assert res["owned"] == res["owned_after_load"] == mine, r
        for n, *shape in res["calls"]:  # a batched chain of n matrices
            pieces[tuple(shape)] += n
    # 2 runs of DIST_STEPS steps and one resumed step: every matrix once per step over both ranks
    assert pieces == Counter({s: n * (2 * DIST_STEPS + 1) for s, n in Counter(SPLIT_PIECES).items()})
    assert all(len(res["calls"]) > 0 for res in results)


# ---------------------------------------------------------------- cost


def test_newton_schulz_flops():
    # 5 steps x (X X^T: 2 m^2 n, A A: 2 m^3, B X: 2 m^2 n), m = min side
    assert newton_schulz_flops(2, 3, steps=1) == 2 * 2 * 2 * 3 + 2 * 2 * 2 * 2 + 2 * 2 * 2 * 3
    assert newton_schulz_flops(3840, 1536) == newton_schulz_flops(1536, 3840) == 5 * (4 * 1536**2 * 3840 + 2 * 1536**3)
    assert isinstance(newton_schulz_flops(10, 20), int)
