"""Tests for the μP tools (tools/coord_check.py, lr_sweep.py, search.py, proxy.py) against mup.py's rules.

The coordinate check is the test of μP itself: train 2-layer proxies of width 64/128/256 for 3 Adam
steps at lr 0.005 (2 seeds, vocabulary 256, head dim 32) and fit log2(mean |activation|) against log2(width) at the last step. Under μP every
hidden type (embedding, attention, MLP, block output) has |slope| <= SLOPE_BOUND = 0.25 and the logits do
not grow; under SP at least one type grows (measured slopes ~1.2-1.5); and each deliberately broken rule
(logits without 1/m, LRs and init without m, residual branch scaled by sqrt(m)) is caught.
Measured slopes at these settings: μP embedding 0.00, attention -0.11, mlp -0.09, block -0.09, logits -0.48.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import mup
import train
from model import ModelConfig, split_state_dict
import tools
from tools import coord_check, lr_sweep, proxy, search

WIDTHS = (64, 128, 256)


def small_check(params=("mup",)):
    return coord_check.coord_check(widths=WIDTHS, steps=3, n_layer=2, lr=0.005, vocab_size=256, batch=4, seq_len=32,
                           seeds=2, head_dim=32, parameterizations=params)


@pytest.fixture(scope="module")
def check():
    torch.set_num_threads(1)
    return small_check(("mup", "sp"))


def test_coord_check_mup_flat_sp_grows(check):
    ok, slopes = coord_check.coord_check_ok(check, "mup")
    assert ok, slopes
    ok_sp, sp = coord_check.coord_check_ok(check, "sp")
    assert not ok_sp, sp
    assert max(sp[t] for t in coord_check.HIDDEN_TYPES) > 2 * coord_check.SLOPE_BOUND, sp
    assert len(check["scales"]["mup"]["block"]) == 4 and len(check["scales"]["mup"]["block"][0]) == len(WIDTHS)


def test_coord_check_mup_pure_variant_is_flat_too():
    """The μP-pure choices (init_out="mup", norm_lr="embedding") pass the same check; the overrides reach
    every model and are recorded."""
    torch.set_num_threads(1)
    res = coord_check.coord_check(widths=WIDTHS, steps=3, n_layer=2, lr=0.005, vocab_size=256, batch=4, seq_len=32,
                                  seeds=2, head_dim=32, parameterizations=("mup",),
                                  overrides=tools.model_overrides(["init_out=mup", "norm_lr=embedding"]))
    ok, slopes = coord_check.coord_check_ok(res, "mup")
    assert ok, slopes
    assert res["config"]["model_overrides"] == {"init_out": "mup", "norm_lr": "embedding"}


def test_model_overrides_are_parsed_and_checked():
    assert tools.model_overrides(["muon_fused=false", "init_std=0.05"]) == {"muon_fused": False, "init_std": 0.05}
    assert tools.model_overrides([]) == {}
    for bad, msg in ((["nope=1"], "ModelConfig field"), (["init_out"], "KEY=VALUE"), (["init_out=x"], "init_out")):
        with pytest.raises(ValueError, match=msg):
            tools.model_overrides(bad)


def _plain_forward(model, idx):
    """The decoder recomputed from its weights and the paper's formulas alone (none of model.py's modules,
    multipliers or RoPE code), in float64: {layer type: per-block activations} and the logits."""
    cfg = model.config
    W = {k: v.double() for k, v in split_state_dict(model.state_dict(), cfg).items()}  # q, k, v, gate, up apart
    T, d, H, Hkv = idx.shape[1], cfg.hidden // cfg.n_head, cfg.n_head, cfg.n_kv_head
    m = cfg.hidden / cfg.base_width                       # width multiplier
    branch = cfg.residual_scale / cfg.n_layer ** 0.5      # residual branch multiplier 1.4 / sqrt(L)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * cfg.rope_base ** (-torch.arange(0, d, 2) / d)

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps)

    def rope(x):  # pairs (x_i, x_{i+d/2}) rotated by pos * base^(-2i/d)
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()), -1)

    h = W["tok_emb.weight"][idx] * cfg.input_scale
    acts = {"embedding": [h], "attention": [], "mlp": [], "block": []}
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = lambda n: W[f"blocks.{i}.{n}"]  # noqa: E731
        x = norm(h, p("attn_norm.weight"))
        q = rope((x @ p("attn.wq.weight").T).view(*idx.shape, H, d).transpose(1, 2))
        k = rope((x @ p("attn.wk.weight").T).view(*idx.shape, Hkv, d).transpose(1, 2)).repeat_interleave(H // Hkv, 1)
        v = (x @ p("attn.wv.weight").T).view(*idx.shape, Hkv, d).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        att = (q @ k.transpose(-1, -2) / d).masked_fill(~causal, float("-inf")).softmax(-1)  # μP: 1/d, not 1/sqrt(d)
        a = ((att @ v).transpose(1, 2).reshape(*idx.shape, H * d) @ p("attn.wo.weight").T) * branch
        x = norm(h + a, p("mlp_norm.weight"))
        gate, up = x @ p("mlp.w_gate.weight").T, x @ p("mlp.w_up.weight").T
        mlp = ((gate * torch.sigmoid(gate) * up) @ p("mlp.w_down.weight").T) * branch
        h = h + a + mlp
        acts["attention"].append(a), acts["mlp"].append(mlp), acts["block"].append(h)
    logits = norm(h, W["norm.weight"]) @ W["tok_emb.weight"].T * cfg.output_scale / m
    return acts, logits


def test_coord_scales_match_plain_forward():
    """The hooks measure exactly what a plain re-computation of the forward gives: embedding x input_scale,
    each branch x residual multiplier as added to the stream, block outputs, logits x output_scale/m."""
    torch.manual_seed(0)
    model = mup.build_model(proxy.proxy_config(64, 2, 128, head_dim=32))  # 2 heads sharing 1 K/V head
    idx = torch.randint(128, (2, 16))
    loss, sc = coord_check.coord_scales(model, idx, idx)
    acts, logits = _plain_forward(model, idx)
    for k, v in acts.items():
        assert sc[k] == pytest.approx(sum(a.abs().mean().item() for a in v) / len(v), rel=1e-4), k
    assert sc["logits"] == pytest.approx(logits.abs().mean().item(), rel=1e-4)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).item(),
                                        rel=1e-5)


def _broken_logits(monkeypatch):
    monkeypatch.setattr(ModelConfig, "logit_mult", property(lambda self: self.output_scale))  # forgot / m


def _broken_lr_and_init(monkeypatch):
    monkeypatch.setattr(mup, "width_mult", lambda cfg: 1.0)  # hidden LR and init std not scaled by m


def _broken_residual(monkeypatch):
    monkeypatch.setattr(ModelConfig, "residual_mult",
                        property(lambda self: self.residual_scale * math.sqrt(self.width_mult / self.n_layer)))


@pytest.mark.parametrize("breakage", [_broken_logits, _broken_lr_and_init, _broken_residual])
def test_coord_check_catches_broken_mup(monkeypatch, breakage):
    torch.set_num_threads(1)
    breakage(monkeypatch)
    ok, slopes = coord_check.coord_check_ok(small_check(), "mup")
    assert not ok, slopes


def test_log_slope():
    assert coord_check.log_slope([64, 128, 256], [1.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert coord_check.log_slope([64, 128, 256], [3.0, 3.0, 3.0]) == pytest.approx(0.0, abs=1e-12)
    assert coord_check.log_slope([64, 128], [1.0, float("nan")]) == float("inf")


TEXT = [
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "The quick brown fox jumps over the lazy dog. A module docstring explains what the module does.\n",
    "for i in range(10):\n    print(i * i)\nwhile True:\n    break\n",
    "Return the sum of two numbers. Raise ValueError if the input is not a number.\n",
]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """A miniature corpus (two sources, many small documents) with a 300-id BPE trained on it."""
    root = tmp_path_factory.mktemp("tiny")
    docs = {"code": [], "prose": []}
    for i in range(80):
        for j, t in enumerate(TEXT):
            src = "code" if j % 2 == 0 else "prose"
            p = root / src / f"doc{i}_{j}.txt"
            p.parent.mkdir(exist_ok=True)
            p.write_text(t.replace("10", str(i)) * 3)
            docs[src].append(str(p))
    tok = proxy.small_bpe(300, cache_dir=root, texts=TEXT * 4)
    out = data.prepare({"code": str(root / "code"), "prose": str(root / "prose")}, root / "ds", tokenizer=tok,
                       heldout_frac=0.1, workers=1, progress=False)
    return out


def test_sweep_end_to_end(tiny_dataset, tmp_path):
    out = tmp_path / "lr_sweep.json"
    res = lr_sweep.lr_sweep(widths=(64, 128), lrs=[1e-3, 1e-2], steps=3, n_layer=1, batch=2, seq_len=16, eval_windows=4,
                       dataset=tiny_dataset, jobs=1, out_json=out)
    assert len(res["runs"]) == 2 * 2 * 2
    saved = json.loads(out.read_text())
    assert saved["runs"] == json.loads(json.dumps(res["runs"]))
    for p in ("mup", "sp"):
        for w in ("64", "128"):
            best = res["optimum"][p][w]
            runs = [r for r in res["runs"] if r["param"] == p and str(r["width"]) == w]
            assert best["loss"] == min(r["loss"] for r in runs)
    # resuming with the same config repeats nothing (the stored losses come back unchanged)
    again = lr_sweep.lr_sweep(widths=(64, 128), lrs=[1e-3, 1e-2], steps=3, n_layer=1, batch=2, seq_len=16,
                         eval_windows=4, dataset=tiny_dataset, jobs=1, out_json=out)
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in res["runs"]]
    assert "width" in lr_sweep.format_sweep_table(res)
    assert lr_sweep.plot_sweep(res, tmp_path / "lr_sweep.png") and (tmp_path / "lr_sweep.png").stat().st_size > 1000


def test_train_proxy_lr_matters_and_is_deterministic(tiny_dataset):
    mix, n_vocab = proxy.corpus_mixture(dataset=tiny_dataset)
    ev = mix.eval_batches(4, 2, 16)
    cfg = proxy.proxy_config(64, 1, n_vocab)
    a = proxy.train_proxy(cfg, 1e-2, 1e-2, mix, 5, 2, 16, ev)
    b = proxy.train_proxy(cfg, 1e-2, 1e-2, mix, 5, 2, 16, ev)
    c = proxy.train_proxy(cfg, 1e-5, 1e-5, mix, 5, 2, 16, ev)
    assert a["loss"] == b["loss"] and a["train"] == b["train"]
    assert a["loss"] < c["loss"]  # 5 steps at 1e-5 barely move; at 1e-2 the loss drops


def test_search_writes_loadable_best_config(tiny_dataset, tmp_path):
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "proxy20m.py")
    study, out = tmp_path / "study.db", tmp_path / "best.py"
    kw = dict(base_config=base, study_path=study, out_path=out, steps=2, batch=2, seq_len=16, eval_windows=2,
              width=64, n_layer=1, dataset=tiny_dataset, space=search.parse_space(["init_std=off"]))
    res = search.search(trials=2, **kw)
    assert res["trials"] == 2
    loaded, base_loaded = train.load_config([str(out)]), train.load_config([base])  # the trainer's own loader
    for k, v in res["best"].items():  # the tuned values, each in the config it belongs to
        assert getattr(loaded["train" if k in search.OPTIMIZER_KEYS else "model"], k) == v
    assert set(res["best"]) == {"lr", "emb_lr", "input_scale", "residual_scale"}
    assert loaded["train"].phases == base_loaded["train"].phases
    assert loaded["model"].init_std == base_loaded["model"].init_std
    assert loaded["model"].vocab_size == base_loaded["model"].vocab_size  # the proxy's small vocabulary does not leak out
    # resumable: a second call with a larger budget continues the same study
    res2 = search.search(trials=3, **kw)
    assert res2["trials"] == 3
    # another setup on the same study file is refused, naming what differs
    with pytest.raises(ValueError, match="steps"):
        search.search(trials=3, **{**kw, "steps": 3})


def test_parse_space_errors():
    assert search.parse_space(["lr=0.001:0.1"])["lr"] == (0.001, 0.1)
    with pytest.raises(ValueError, match="bogus"):
        search.parse_space(["bogus=1:2"])
    with pytest.raises(ValueError, match="LOW < HIGH"):
        search.parse_space(["lr=0.1:0.01"])
    with pytest.raises(ValueError, match="head_dim"):
        proxy.proxy_config(100, 1, 64)


def test_coord_check_command_line(tmp_path):
    """`python -m tools.coord_check` from the repository root: the machine is resolved and said, JSON + PNG."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "tools.coord_check", "--out", str(tmp_path), "--widths", "64", "128",
                        "--steps", "1", "--seeds", "1", "--n-layer", "1", "--vocab", "64", "--threads", "1",
                        "--device", "cpu", "--dtype", "float32"], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "device cpu (as configured)" in r.stdout and "dtype float32 (as configured)" in r.stdout
    res = json.loads((tmp_path / "coord_check.json").read_text())
    assert res["widths"] == [64, 128] and res["steps"] == [0, 1] and set(res["slopes"]) == {"mup", "sp"}
    assert (res["config"]["device"], res["config"]["dtype"]) == ("cpu", "float32")
    assert (tmp_path / "coord_check.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "tools.coord_check", "--out", str(tmp_path), "--steps", "0"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "need steps >= 1" in bad.stderr


def test_sweep_and_search_command_lines(tiny_dataset, tmp_path, capsys):
    res = lr_sweep.main(["--out", str(tmp_path), "--widths", "64", "--lrs", "0.01", "--steps", "2", "--n-layer", "1",
                         "--batch", "2", "--seq-len", "16", "--eval-windows", "2", "--jobs", "1",
                         "--dataset", tiny_dataset, "--device", "cpu", "--dtype", "float32"])
    assert json.loads((tmp_path / "lr_sweep.json").read_text())["runs"] == json.loads(json.dumps(res["runs"]))
    assert res["config"]["dtype"] == "float32" and len(res["runs"]) == 2
    assert (tmp_path / "lr_sweep.png").stat().st_size > 1000
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "proxy20m.py")
    res = search.main(["--base", base, "--trials", "1", "--study", str(tmp_path / "s.db"), "--out",
                       str(tmp_path / "best.py"), "--steps", "1", "--batch", "2", "--seq-len", "16", "--eval-windows",
                       "2", "--width", "64", "--n-layer", "1", "--dataset", tiny_dataset, "--device", "cpu",
                       "--dtype", "float32"])
    assert res["trial"] == 0 and res["best"]["lr"] == train.load_config([base])["train"].lr  # trial 0: the base values
    assert train.load_config([str(tmp_path / "best.py")])["train"].lr == res["best"]["lr"]
    out = capsys.readouterr().out
    assert "device cpu (as configured)" in out and f"wrote {tmp_path / 'best.py'}" in out
    # a count or an LR out of range is refused naming its flag (an LR of -1 said "math domain error", --steps 0
    # wrote a sweep of untrained models, --trials 0 blamed the study), before any run or study file
    for tool, flag, value in ((lr_sweep, "--lrs", "-1"), (lr_sweep, "--steps", "0"), (search, "--trials", "0"),
                              (search, "--steps", "0")):
        with pytest.raises(SystemExit):
            tool.main(["--out", str(tmp_path / "bad"), flag, value])
        assert f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- the original's choices vs μP-pure (ModelConfig)

@pytest.mark.parametrize("norm_lr", ["hidden", "embedding"])
def test_norm_group_lr(norm_lr):
    """The 1.3B shape (m = 1536/256 = 6): norms at the hidden LR lr/m (Megatron's) or at emb_lr (μP's vector-like)."""
    model = mup.build_model(ModelConfig(norm_lr=norm_lr), device="meta")
    by = {g["name"]: g for g in mup.param_groups(model, 0.01, 0.03, 0.1)}
    want = 0.01 / 6 if norm_lr == "hidden" else 0.03
    assert by["norm"]["lr"] == by["norm"]["base_lr"] == want and by["norm"]["weight_decay"] == 0.0
    assert by["hidden"]["lr"] == 0.01 / 6 and by["embedding"]["lr"] == 0.03
    assert len(by["norm"]["params"]) == 48 * 2 + 1 and all(p.dim() == 1 for p in by["norm"]["params"])


def test_new_keys_are_validated():
    for bad in (dict(norm_lr="adam"), dict(init_out="megatron"), dict(muon_fused="yes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ModelConfig(**bad)


def test_init_stds_of_the_1p3b_model():
    assert mup.init_stds(ModelConfig())["branch_out"] == pytest.approx(0.0102, abs=5e-5)  # 0.1/sqrt(96)
    assert mup.init_stds(ModelConfig())["hidden"] == 0.1 / math.sqrt(6)
    assert mup.init_stds(ModelConfig(init_out="mup"))["branch_out"] == 0.1 / math.sqrt(6)


@pytest.mark.parametrize("use_mup,init_out", [(True, "depth"), (True, "mup"), (False, "depth")])
def test_init_stds_per_init_out(use_mup, init_out):
    """Measured stds of every block matrix (>= 65,536 draws each) against the rule: attention-out and
    MLP-down 0.1/sqrt(2 n_layer) under init_out="depth" (0.035 here), else like every hidden matrix,
    0.1/sqrt(m) (0.071 at m = 2); SP: 0.1 for all. The sample std of n normal draws has relative standard
    error 1/sqrt(2(n-1)); the bound is 6 of them (a chance failure has probability < 1e-8), at most 1.7%,
    far below the factor 2 between the rules."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, n_layer=4, hidden=512, ffn_hidden=1024, n_head=8, n_kv_head=2, max_seq_len=64,
                      use_mup=use_mup, init_out=init_out)
    model = mup.build_model(cfg)
    hidden = 0.1 / math.sqrt(2) if use_mup else 0.1
    out = 0.1 / math.sqrt(8) if use_mup and init_out == "depth" else hidden
    seen = set()
    blocks = {k: v for k, v in model.named_parameters() if k.startswith("blocks.")}
    for name, p in split_state_dict(blocks, cfg).items():  # q, k, v, gate, up apart
        if p.dim() != 2:
            continue
        kind = name.split(".", 2)[2]
        want = out if kind in ("attn.wo.weight", "mlp.w_down.weight") else hidden
        n = p.numel()
        assert n >= 65536
        assert abs(p.std().item() / want - 1) < 6 / math.sqrt(2 * (n - 1)), (name, p.std().item(), want)
        assert abs(p.mean().item()) < 6 * want / math.sqrt(n), name
        seen.add(kind)
    assert len(seen) == 7


def test_hidden_group_parts_are_the_fused_weights_and_splits_follow_muon_fused():
    """The model's fused weights are the original's linear_qkv (2560 x 1536 at 1.3B) and linear_fc1
    (7680 x 1536); the hidden group's "parts" name them with their parts' rows. muon_fused (default): no
    splits, each is one matrix to Muon; muon_fused=False: every part is orthogonalized alone."""
    import muon
    from muon import Muon
    model = mup.build_model(ModelConfig(), device="meta")
    g = mup.param_groups(model, 0.01, 0.01, 0.1)[0]
    assert g["name"] == "hidden" and len(g["params"]) == 4 * 48 and len(g["parts"]) == 2 * 48
    for b, (qkv, fc1) in zip(model.blocks, zip(g["parts"][0::2], g["parts"][1::2])):
        assert g["params"][qkv[0]] is b.attn.wqkv.weight and qkv[1] == [1536, 512, 512]
        assert g["params"][fc1[0]] is b.mlp.w_gate_up.weight and fc1[1] == [3840, 3840]
        assert b.attn.wqkv.weight.shape == (2560, 1536) and b.mlp.w_gate_up.weight.shape == (7680, 1536)
    assert g["splits"] == []
    unfused = mup.build_model(ModelConfig(muon_fused=False), device="meta")
    g = mup.param_groups(unfused, 0.01, 0.01, 0.1)[0]
    assert g["splits"] == g["parts"]
    opt = Muon([dict(g)])
    assert opt.param_groups[0]["splits"] == g["parts"]
    split_of = dict(g["splits"])
    pieces = [pc for i, p in enumerate(g["params"]) for pc in muon.pieces(p, split_of.get(i))]
    assert len(pieces) == 7 * 48 and sorted({(hi - lo, p.shape[1]) for p, lo, hi in pieces}) == [
        (512, 1536), (1536, 1536), (1536, 3840), (3840, 1536)]
