"""Benchmark: training throughput, step-time split, peak memory, FLOPs and MFU of one config.

A training step is forward (blocks + the chunked output layer/loss, which also forms the output layer's
gradients, see model._ChunkedCrossEntropy), backward (the blocks and the embedding) and the optimizer.
This tool times each part over N steps after a warm-up, on random tokens (data loading is not measured),
and reports:

    tokens/s       batch * seq_len / mean step time
    peak memory    CPU: the process's peak resident set (getrusage ru_maxrss), so each measured model runs
                   in its own subprocess when compared; CUDA: torch.cuda.max_memory_allocated
    FLOPs/token    model.flops_per_token(seq_len): 6 per matmul weight + causal attention
    MFU (CUDA)     FLOPs/token * tokens/s / the device's dense peak (bf16, or FP8 with fp8=True)

    python -m tools.bench configs/proxy20m.py [--batch_size 8] [--seq_len 512] [--dtype auto|bfloat16|float32]
                    [--device auto|cpu|cuda] [--steps 5] [--compile] [--optimizer adamw|muon] [--json] [--peer]
                    [--repeats 2]
    python -m tools.bench scaling configs/proxy20m.py  # tokens/s and peak memory vs sequence length and width
    python -m tools.bench muon configs/xmodel25.py     # Newton-Schulz FLOPs vs the step's; Muon vs AdamW step time;
                                                       # Newton-Schulz per matrix vs batched per shape
    python -m tools.bench fp8 configs/xmodel25.py      # FP8 vs bf16 GEMM TFLOP/s at the config's layer shapes (CUDA)
    python -m tools.bench data PATH [--workers 1 2] [--text-key text] [--synthetic MB]
                                                       # data.py prepare's MB/s and tokens/s per core vs the bare
                                                       # tokenizer's encode_batch on the same text

--device and --dtype default to auto (runtime.resolve_machine: CUDA, else MPS, else CPU; bf16 where native).

--peer runs Hugging Face transformers' LlamaForCausalLM of the same shape (tied embeddings, SDPA
attention, bf16 autocast, torch.optim.AdamW as it comes) with the same timing loop, each model in its own
subprocess, alternating ours/peer --repeats times (the machine may be shared: alternation puts both
under the same load), and prints both with the ratios, and a cap: the output layer's three GEMMs and one
exp per logit timed alone (work both steps must do), so peer step / that time is the most any exact
implementation could gain over the peer at this shape, dtype and thread count. With --json the last
printed line is one JSON object (tokens_per_s, peak_mem_mb, step_ms, flops_per_token, ...). `tokens`
counts the tokens the timed steps actually fed the model and `timed_s` is their total wall time.
"""
import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import muon
import mup
import runtime
import train
from model import COMPILE_MODES, ModelConfig, Xmodel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense tensor-core peaks (FLOP/s, no sparsity) for MFU; matched against torch.cuda.get_device_name().
GPU_PEAK = {
    "H100": {"bf16": 989e12, "fp8": 1979e12},   # SXM; the PCIe card is ~756 / 1513
    "H200": {"bf16": 989e12, "fp8": 1979e12},
    "A100": {"bf16": 312e12, "fp8": None},
}


def device_peak(device: torch.device, kind: str = "bf16") -> float | None:
    """The card's dense peak FLOP/s for kind "bf16" or "fp8"; None off CUDA or for an unknown card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAK.items():
        if key in name:
            return peaks[kind]
    return None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work before reading a clock (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_ours(mcfg: ModelConfig, tcfg, args, device):
    """Our model with exactly the trainer's optimizers (muon.Optimizers on the μP groups: fused AdamW, Muon)."""
    model = mup.build_model(mcfg, device)
    if args.compile:
        model.compile_for_training(args.compile_mode)
    groups = mup.param_groups(model, tcfg.lr, tcfg.emb_lr, tcfg.weight_decay)
    return model, muon.Optimizers(groups, tcfg, args.optimizer).all(), lambda x, y: model(x, y)


def build_peer(mcfg: ModelConfig, args, device):
    """LlamaForCausalLM at the same shape: tied embeddings, SDPA, HF's own loss; stock AdamW."""
    from transformers import LlamaConfig, LlamaForCausalLM  # optional dependency, peer only
    cfg = LlamaConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden, intermediate_size=mcfg.ffn_hidden,
                      num_hidden_layers=mcfg.n_layer, num_attention_heads=mcfg.n_head,
                      num_key_value_heads=mcfg.n_kv_head, max_position_embeddings=args.seq_len,
                      rope_theta=mcfg.rope_base, rms_norm_eps=mcfg.norm_eps, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device)
    if args.compile:
        model.compile()
    opts = [torch.optim.AdamW(model.parameters(), lr=1e-3)]

    def loss_fn(x, y):  # HF shifts labels itself: pass the inputs as labels
        return model(input_ids=x, labels=x).loss
    return model, opts, loss_fn


def run(args) -> dict:
    """Build, warm up, time args.steps training steps; returns the measurements."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    conf = train.load_config([args.config])
    mcfg, tcfg = conf["model"], conf["train"]
    overrides = {k: getattr(args, k) for k in ("hidden", "fp8") if getattr(args, k, None) is not None}
    if "hidden" in overrides:  # the scaling table's width axis: heads of 64 (the recipe's proxy family)
        h = overrides["hidden"]
        overrides.update(n_head=max(1, h // 64), n_kv_head=1, ffn_hidden=int(2.5 * h))
    mcfg = dataclasses.replace(mcfg, **overrides)
    B = args.batch_size or tcfg.micro_batch
    T = args.seq_len
    mcfg = dataclasses.replace(mcfg, max_seq_len=max(mcfg.max_seq_len, T))
    model, opts, loss_fn = (build_peer(mcfg, args, device) if args.run_peer else build_ours(mcfg, tcfg, args, device))
    model.train()
    after_backward = getattr(model, "update_fp8_scales", lambda: None)  # ours: FP8 delayed scaling, as train.py
    data = torch.randint(0, mcfg.vocab_size, (B, T + 1), device=device)
    x, y = data[:, :-1], data[:, 1:]
    autocast = runtime.autocast(device, args.dtype)
    seen = [0]  # tokens that reached the model

    def step():
        t0 = time.perf_counter()
        seen[0] += x.numel()
        with autocast:
            loss = loss_fn(x, y)
        synchronize(device)
        t1 = time.perf_counter()
        loss.backward()
        after_backward()
        synchronize(device)
        t2 = time.perf_counter()
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        synchronize(device)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, loss

    t_build = time.perf_counter()
    warm = [step() for _ in range(args.warmup)]
    warm_s = time.perf_counter() - t_build
    seen[0] = 0
    t_timed = time.perf_counter()
    times = [step() for _ in range(args.steps)]
    timed_s = time.perf_counter() - t_timed
    loss_at_init = float((warm or times)[0][3].detach())  # computed before any optimizer step
    loss = float(times[-1][3].detach())
    fwd, bwd, optim = (statistics.median(t[k] for t in times) for k in range(3))
    step_s = statistics.median(sum(t[:3]) for t in times)
    # our model's FLOPs formula also describes the peer: same shapes, same matmuls
    with torch.device("meta"):
        flops_tok = Xmodel(mcfg).flops_per_token(T)
    tok_s = B * T / step_s
    # MFU against the bf16 peak for every run (so bf16 and FP8 runs compare directly); FP8 runs also
    # get it against the card's FP8 peak
    peak, peak8 = device_peak(device, "bf16"), (device_peak(device, "fp8") if mcfg.fp8 else None)
    return dict(model="hf_llama" if args.run_peer else "xmodel", config=os.path.basename(args.config),
                device=device.type, dtype=args.dtype, batch_size=B, seq_len=T, hidden=mcfg.hidden,
                compile=bool(args.compile), optimizer="adamw" if args.run_peer else args.optimizer,
                threads=torch.get_num_threads(), steps=args.steps, tokens=seen[0], timed_s=timed_s,
                tokens_per_s=tok_s, step_ms=step_s * 1e3, fwd_ms=fwd * 1e3,
                bwd_ms=bwd * 1e3, opt_ms=optim * 1e3, warmup_s=warm_s, peak_mem_mb=peak_mem_mb(device),
                flops_per_token=flops_tok, mfu=(flops_tok * tok_s / peak) if peak else None,
                mfu_fp8_peak=(flops_tok * tok_s / peak8) if peak8 else None, fp8=mcfg.fp8, loss=loss,
                loss_at_init=loss_at_init,
                params=sum(p.numel() for p in model.parameters()))


def describe(r: dict) -> str:
    mfu = f"  MFU {100 * r['mfu']:.1f}% of bf16 peak" if r.get("mfu") is not None else ""
    if r.get("mfu_fp8_peak") is not None:
        mfu += f" ({100 * r['mfu_fp8_peak']:.1f}% of FP8 peak)"
    return (f"{r['model']:9s} {r['tokens_per_s']:8.0f} tok/s  step {r['step_ms']:7.0f} ms "
            f"(fwd {r['fwd_ms']:.0f} / bwd {r['bwd_ms']:.0f} / opt {r['opt_ms']:.0f})  "
            f"peak {r['peak_mem_mb']:7.0f} MiB  {r['flops_per_token'] / 1e6:.1f} MFLOP/token{mfu}  loss {r['loss']:.3f}")


def subprocess_run(argv: list[str]) -> dict:
    """Run this tool in a fresh process (clean peak RSS) and return its JSON line."""
    cmd = [sys.executable, "-m", "tools.bench"] + argv + ["--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def common_argv(args) -> list[str]:
    argv = [os.path.abspath(args.config), "--seq_len", str(args.seq_len), "--dtype", args.dtype, "--device", args.device,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--optimizer", args.optimizer]
    if args.batch_size:
        argv += ["--batch_size", str(args.batch_size)]
    if args.compile:
        argv += ["--compile", "--compile_mode", args.compile_mode]
    if args.fp8 is not None:
        argv.append("--fp8" if args.fp8 else "--no-fp8")
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def output_layer_bound(args, vocab: int, hidden: int, tokens: int) -> dict:
    """The part of a training step that no exact implementation can skip, timed alone: the output layer's
    three GEMMs, logits = h W^T, dh = G W, dW = G^T h ([tokens, hidden] x [hidden, vocab] each), and one exp
    per logit (the softmax), in the bench's device, dtype and threads, at the better of two chunk sizes.
    Our step and the peer's both contain this work, so peer step / bound caps the speed-up over the peer
    that any implementation could reach (the blocks and attention cost more on top: a cap, not a forecast)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    h = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.02  # logits ~0.2: exp stays finite
    dh, dw = torch.empty_like(h), torch.zeros_like(w)
    best = float("inf")
    for rows in (256, 1024):
        buf = torch.empty(min(rows, tokens), vocab, device=device, dtype=dtype)
        times = []
        for _ in range(3):
            synchronize(device)
            t0 = time.perf_counter()
            for i in range(0, tokens, rows):
                hc = h[i:i + rows]
                g = torch.mm(hc, w.t(), out=buf[:len(hc)]).exp_()
                torch.mm(g, w, out=dh[i:i + rows])
                dw.addmm_(g.t(), hc)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        best = min(best, *times[1:])  # the first is a warm-up
    return dict(bound_ms=best * 1e3, bound_gflop=3 * 2 * tokens * vocab * hidden / 1e9)


def compare_with_peer(args) -> dict:
    ours, peer = [], []
    for rep in range(args.repeats):  # alternate, so both see the same background load
        ours.append(subprocess_run(common_argv(args)))
        print(f"[{rep + 1}/{args.repeats}] " + describe(ours[-1]), flush=True)
        peer_argv = common_argv(args)
        if not args.peer_compile and "--compile" in peer_argv:
            peer_argv.remove("--compile")
        peer.append(subprocess_run(peer_argv + ["--run_peer"]))
        print(f"[{rep + 1}/{args.repeats}] " + describe(peer[-1]), flush=True)
    best = lambda rs: max(rs, key=lambda r: r["tokens_per_s"])  # noqa: E731  (least disturbed run)
    o, p = best(ours), best(peer)
    pairs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, peer)]
    print("best of each:")
    print("  " + describe(o))
    print("  " + describe(p))
    speed, mem = o["tokens_per_s"] / p["tokens_per_s"], o["peak_mem_mb"] / p["peak_mem_mb"]
    print(f"  speed x{speed:.2f} best/best, x{statistics.median(pairs):.2f} median of the alternating pairs "
          f"({', '.join(f'{r:.2f}' for r in pairs)});  peak memory x{mem:.3f} of the peer's")
    mcfg = train.load_config([args.config])["model"]
    bound = output_layer_bound(args, mcfg.vocab_size, mcfg.hidden, o["batch_size"] * o["seq_len"])
    cap = p["step_ms"] / bound["bound_ms"]
    print(f"  bound: the output layer's 3 GEMMs ({bound['bound_gflop']:.0f} GFLOP) and one exp per logit take "
          f"{bound['bound_ms']:.0f} ms alone, in any exact implementation: no step can beat the peer's by more "
          f"than x{cap:.2f}; on top of it ours spends {o['step_ms'] - bound['bound_ms']:.0f} ms, "
          f"the peer {p['step_ms'] - bound['bound_ms']:.0f} ms")
    return dict(ours=o, peer=p, speedup=speed, median_pair_speedup=statistics.median(pairs), mem_ratio=mem,
                pair_speedups=pairs, bound=bound, speedup_cap=cap,
                tokens_per_s=o["tokens_per_s"], peak_mem_mb=o["peak_mem_mb"], step_ms=o["step_ms"],
                flops_per_token=o["flops_per_token"])


def scaling(args) -> list[dict]:
    """tokens/s and peak RSS vs sequence length (fixed tokens per step) and width, one subprocess each."""
    rows = []
    tokens = (args.batch_size or 8) * 512
    points = [dict(seq_len=T) for T in (512, 1024, 2048, 4096)] + [dict(seq_len=512, hidden=h) for h in (256, 512)]
    print(f"{'seq_len':>7} {'batch':>5} {'hidden':>6} {'tok/s':>8} {'step ms':>8} {'peak MiB':>9}")
    for pt in points:
        T = pt["seq_len"]
        argv = common_argv(args)
        argv[argv.index("--seq_len") + 1] = str(T)
        argv = [a for i, a in enumerate(argv) if a != "--batch_size" and (i == 0 or argv[i - 1] != "--batch_size")]
        argv += ["--batch_size", str(max(1, tokens // T))]
        if "hidden" in pt:
            argv += ["--hidden", str(pt["hidden"])]
        r = subprocess_run(argv)
        rows.append(r)
        print(f"{T:7d} {r['batch_size']:5d} {r['hidden']:6d} {r['tokens_per_s']:8.0f} {r['step_ms']:8.0f} "
              f"{r['peak_mem_mb']:9.0f}", flush=True)
    return rows


def layer_shapes(mcfg: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of a block's linear layers as a fused implementation runs them
    (q/k/v as one GEMM, gate/up as one): the GEMM shapes FP8 kernels are judged at (1.3B: K/N from
    1536, 2560, 3840, 7680)."""
    h, d = mcfg.hidden, mcfg.head_dim
    return [("qkv", h, (mcfg.n_head + 2 * mcfg.n_kv_head) * d), ("attn_out", mcfg.n_head * d, h),
            ("mlp_gate_up", h, 2 * mcfg.ffn_hidden), ("mlp_down", mcfg.ffn_hidden, h)]


def hidden_matrix_shapes(mcfg: ModelConfig) -> list[tuple[int, int]]:
    """[rows, cols] of every matrix Muon orthogonalizes, all layers: the blocks' 2-D weights, the fused
    [q; k; v] and [gate; up] each one matrix, or under muon_fused=False each of their parts alone."""
    with torch.device("meta"):
        model = Xmodel(dataclasses.replace(mcfg, fp8=False, n_layer=1))
    split = {} if mcfg.muon_fused else {id(w): rows for w, rows in model.fused_weights()}
    return [(rows, p.shape[1]) for p in model.blocks.parameters() if p.dim() == 2
            for rows in split.get(id(p), [p.shape[0]])] * mcfg.n_layer


def muon_cost(args) -> dict:
    """Newton-Schulz FLOPs per optimizer step of the config's decay phase against its 6 N T (+ causal
    attention), the measured Muon vs fused-AdamW step time on the config's hidden matrices, and Newton-Schulz
    alone per matrix vs batched per shape (newton_schulz_times)."""
    conf = train.load_config([args.config])
    mcfg, tcfg = conf["model"], conf["train"]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = hidden_matrix_shapes(mcfg)
    decay = next((p for p in tcfg.phases if p["optimizer"] == "muon"), tcfg.phases[-1])
    tokens, T = decay["batch"] * decay["seq_len"], decay["seq_len"]
    with torch.device("meta"):
        model = Xmodel(mcfg)
    ns_flops = sum(muon.newton_schulz_flops(r, c) for r, c in shapes)
    dense = 6 * model.num_params() * tokens
    with_attn = model.flops_per_token(T) * tokens
    print(f"{os.path.basename(args.config)} ({decay['name']}: {decay['batch']} x {T} tokens): Newton-Schulz "
          f"{ns_flops:.3e} FLOPs/step (all matrices, one device); 6NT {dense:.3e} -> {100 * ns_flops / dense:.3f}%; "
          f"model FLOPs with attention {with_attn:.3e} -> {100 * ns_flops / with_attn:.3f}%. Over R data-parallel "
          f"ranks each pays 1/R of it.")

    def time_steps(make_opt):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(r, c, device=device) * 0.02) for r, c in shapes]
        opt = make_opt(params)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # warm-up (state allocation)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        synchronize(device)
        return (time.perf_counter() - t0) / args.steps

    ns = newton_schulz_times(shapes, device, args.steps)
    t_muon = time_steps(lambda ps: muon.Muon(ps, lr=1e-3, weight_decay=0.1))
    t_adamw = time_steps(lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                                      fused=device.type in ("cpu", "cuda")))
    n = sum(r * c for r, c in shapes)
    print(f"hidden matrices ({len(shapes)}, {n / 1e6:.2f}M params, {device}, {torch.get_num_threads()} threads): "
          f"Muon step {1e3 * t_muon:.2f} ms, fused AdamW step {1e3 * t_adamw:.2f} ms")
    print(f"Newton-Schulz alone: one chain per matrix ({len(shapes)}) {ns['ns_per_matrix_ms']:.2f} ms, one batched "
          f"chain per shape ({ns['ns_chains']}) {ns['ns_batched_ms']:.2f} ms "
          f"(x{ns['ns_per_matrix_ms'] / ns['ns_batched_ms']:.2f})")
    return dict(ns_flops=ns_flops, params=model.num_params(), dense_flops=dense, model_flops=with_attn,
                ns_share=ns_flops / dense, muon_step_ms=1e3 * t_muon, adamw_step_ms=1e3 * t_adamw, matrices=len(shapes),
                device=device.type, **ns)


def newton_schulz_times(shapes, device, steps) -> dict:
    """Milliseconds of muon.zeropower_via_newtonschulz5 over matrices of `shapes`, the median of `steps` repeats after
    one warm-up: one chain per matrix (as Muon ran before batching) against one batched chain per shape (Muon's
    now: the matrices copied into one bf16 batch, the copy included)."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(r, c, generator=gen).to(device) for r, c in shapes]
    by_shape = {}
    for m in mats:
        by_shape.setdefault(tuple(m.shape), []).append(m)

    def per_matrix():
        for m in mats:
            muon.zeropower_via_newtonschulz5(m)

    def batched():
        for ms in by_shape.values():
            muon.zeropower_via_newtonschulz5(torch.stack([m.bfloat16() for m in ms]))

    times = {"ns_per_matrix_ms": [], "ns_batched_ms": []}
    per_matrix(), batched()  # warm-up
    for _ in range(steps):  # alternating, so that both see the same load on a shared machine
        for name, fn in (("ns_per_matrix_ms", per_matrix), ("ns_batched_ms", batched)):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(1e3 * (time.perf_counter() - t0))
    return dict({k: statistics.median(v) for k, v in times.items()}, ns_chains=len(by_shape))


def fp8_gemm_rows(mcfg: ModelConfig, tokens: int, device: torch.device, ms_of) -> list[dict]:
    """TFLOP/s of the three GEMMs of each block linear (forward, dgrad, wgrad) at the config's layer shapes with
    `tokens` rows, as FP8Linear runs them (K-major operands, its output dtypes, fast accumulation for the
    forward only: fp8.py, "Accumulation"): bf16 torch.mm, the Triton FP8 kernel, torch._scaled_mm, and for
    the backward GEMMs the Triton kernel with fast accumulation (what the split accumulator costs).
    ms_of(fn) times one call in milliseconds; a kernel that raises is recorded as its error."""
    import fp8
    one = torch.ones((), device=device)
    rows = []
    for name, n_in, n_out in layer_shapes(mcfg):
        for kind, m, k, n, out, fast in (("fwd", tokens, n_in, n_out, torch.bfloat16, True),
                                         ("dgrad", tokens, n_out, n_in, torch.bfloat16, False),
                                         ("wgrad", n_out, tokens, n_in, torch.float32, False)):
            a16 = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            b16 = torch.randn(n, k, device=device, dtype=torch.bfloat16).t()  # K-major, as FP8Linear feeds them
            a8, b8 = a16.to(fp8.E4M3 if kind == "fwd" else fp8.E5M2), b16.to(fp8.E4M3)
            row = dict(layer=name, gemm=kind, M=m, K=k, N=n, fast_accum=fast)
            runs = [("bf16_mm", lambda: torch.mm(a16, b16)),
                    ("triton_fp8", lambda: fp8.fp8_matmul(a8, b8, one, one, out, fast)),
                    ("torch_scaled_mm", lambda: fp8.torch_fp8_matmul(a8, b8, one, one, out, fast))]
            if not fast:
                runs.append(("triton_fp8_fast", lambda: fp8.fp8_matmul(a8, b8, one, one, out, True)))
            for label, fn in runs:
                try:
                    row[label + "_tflops"] = 2.0 * m * k * n / ms_of(fn) / 1e9
                except Exception as e:
                    row[label + "_error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
    return rows


def fp8_gemms(args) -> list[dict]:
    """fp8_gemm_rows on the GPU with batch_size x seq_len rows (default: micro_batch x 3712), printed as a
    table. Needs a CUDA GPU with capability >= 8.9."""
    if args.device != "cuda":
        raise ValueError(f"fp8 GEMM benchmark: needs a CUDA GPU with compute capability >= 8.9 (H100/Ada); "
                         f"device is {args.device}")
    import triton.testing
    conf = train.load_config([args.config])
    mcfg, tcfg = conf["model"], conf["train"]
    tokens = (args.batch_size or tcfg.micro_batch) * args.seq_len
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, tokens={tokens}")
    cols = ("bf16_mm", "triton_fp8", "torch_scaled_mm", "triton_fp8_fast")
    print(f"{'layer':<14}{'gemm':<7}{'M x K x N':>20}" + "".join(f"{c:>17}" for c in cols) + "  TFLOP/s")
    rows = fp8_gemm_rows(mcfg, tokens, device, triton.testing.do_bench)
    for r in rows:
        shape = f"{r['M']}x{r['K']}x{r['N']}"
        print(f"{r['layer']:<14}{r['gemm']:<7}{shape:>20}"
              + "".join(f"{r[c + '_tflops']:>17.0f}" if c + "_tflops" in r else f"{'-':>17}" for c in cols))
    return rows


# ---------------------------------------------------------------------------------------------------
# data preparation: is prepare as fast as its tokenizer?

def cpu_seconds(who=resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def synthetic_dolma(path: str, mb: float) -> str:
    """A Dolma-style .json.gz of about `mb` MB of text ({"id", "text", "source", "metadata"} lines) from the
    embedded corpus's documents, repeated: a measurable input on a machine without the real data."""
    import gzip
    import data
    docs = [t for items in data.default_corpus_documents().values() for _, t in items]
    with gzip.open(path, "wt", compresslevel=6) as f:
        written, k = 0, 0
        while written < mb * 1e6:
            text = docs[k % len(docs)]
            f.write(json.dumps({"id": str(k), "text": text, "source": "stdlib", "metadata": {}}) + "\n")
            written, k = written + len(text.encode()), k + 1
    return path


def bare_tokenizer(path: str, text_key: str, tokenizer: str) -> dict:
    """encode_batch alone (its own threads, as data.py's workers call it) on the input's documents, read first."""
    import data
    files = data.source_files("bench", path, progress=False)
    texts = [t for f in files for _, t, _ in data.file_documents(str(f), f.name, text_key)]
    tok = data.get_tokenizer(tokenizer)
    nbytes = sum(len(t.encode()) for t in texts)
    t0, c0 = time.perf_counter(), cpu_seconds()
    tokens = sum(len(ids) for k in range(0, len(texts), 256) for ids in tok.encode_batch(texts[k:k + 256]))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return dict(what="encode_batch", text_mb=nbytes / 1e6, tokens=tokens, wall_s=wall, cpu_s=cpu)


def prepare_run(path: str, text_key: str, tokenizer: str, workers: int) -> dict:
    """`python data.py prepare` on the input in a fresh process: wall time, and CPU time of it and its workers."""
    import tempfile
    import data
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "data.py"), "prepare", "--out", out, "--source", f"bench={path}",
               "--text-key", text_key, "--tokenizer", tokenizer, "--workers", str(workers), "--heldout-frac", "0.01"]
        t0, c0 = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        wall, cpu = time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_CHILDREN) - c0
        m = data.read_manifest(out)
    return dict(what=f"prepare --workers {workers}", text_mb=None, tokens=m["tokens"] - 2 * m["documents"],
                input_mb=m["sources"]["bench"]["bytes"] / 1e6, wall_s=wall, cpu_s=cpu)


def data_bench(argv: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m tools.bench data", description="data.py prepare vs its tokenizer")
    p.add_argument("path", nargs="?", help="a file or directory data.py reads (default: --synthetic)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--text-key", default="text")
    p.add_argument("--tokenizer", default="deepseek-v3")
    p.add_argument("--synthetic", type=float, default=20.0, help="MB of Dolma-style .json.gz text without a path")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import tempfile
    import data
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or synthetic_dolma(os.path.join(tmp, "synthetic.json.gz"), args.synthetic)
        rows = [bare_tokenizer(path, args.text_key, args.tokenizer)]
        rows += [prepare_run(path, args.text_key, args.tokenizer, w) for w in args.workers]
        on_disk = sum(f.stat().st_size for f in data.source_files("bench", path, progress=False))
    text_mb = rows[0]["text_mb"]
    print(f"input {args.path or f'synthetic Dolma-style .json.gz'}: {on_disk / 1e6:.1f} MB on disk, {text_mb:.1f} MB "
          f"of text, {rows[0]['tokens']:,} tokens; {len(os.sched_getaffinity(0))} cores")
    print(f"  {'':<22}{'wall s':>8}{'CPU s':>8}{'text MB/s':>11}{'tokens/s':>12}{'tokens/CPU-s':>14}")
    for r in rows:
        print(f"  {r['what']:<22}{r['wall_s']:>8.2f}{r['cpu_s']:>8.2f}{text_mb / r['wall_s']:>11.2f}"
              f"{r['tokens'] / r['wall_s']:>12,.0f}{r['tokens'] / r['cpu_s']:>14,.0f}")
    if args.json:
        print(json.dumps(rows))
    return rows


MODES = """other tables (a first argument; scaling, muon and fp8 take the options above):
  python -m tools.bench scaling CONFIG   tokens/s and peak memory vs sequence length and width
  python -m tools.bench muon CONFIG      Newton-Schulz FLOPs vs the step's; Muon vs AdamW step time
  python -m tools.bench fp8 CONFIG       FP8 vs bf16 GEMM TFLOP/s at the config's layer shapes (CUDA)
  python -m tools.bench data [PATH]      data.py prepare's throughput vs the bare tokenizer (data --help)"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data":
        return data_bench(argv[1:])
    mode = "bench"
    if argv and argv[0] in ("scaling", "muon", "fp8"):
        mode, argv = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=MODES)
    p.add_argument("config")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=None, help="default 512 (fp8: 3712)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks and the loss chunk")
    p.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                   help="with --compile: torch.compile's mode for the blocks (reduce-overhead: CUDA graphs)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="last printed line: one JSON object")
    p.add_argument("--peer", action="store_true", help="also run HF LlamaForCausalLM, side by side")
    p.add_argument("--peer_compile", action="store_true", help="with --peer and --compile: compile the peer too")
    p.add_argument("--repeats", type=int, default=2, help="alternating ours/peer pairs with --peer")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                   help="FP8 block linears (fp8.py); default: the config's fp8")
    p.add_argument("--hidden", type=int, default=None, help=argparse.SUPPRESS)  # scaling table's width axis
    p.add_argument("--run_peer", action="store_true", help=argparse.SUPPRESS)   # internal: be the peer
    args = p.parse_args(argv)
    if args.seq_len is None:
        args.seq_len = 3712 if mode == "fp8" else 512
    for k in ("steps", "seq_len", "repeats"):
        if getattr(args, k) <= 0:
            raise ValueError(f"--{k} must be positive, got {getattr(args, k)}")
    args.device, args.dtype = runtime.resolve_machine(args.device, args.dtype)  # subprocesses get the result
    if mode == "muon":
        result = muon_cost(args)
    elif mode == "fp8":
        result = dict(gemms=fp8_gemms(args))
    elif mode == "scaling":
        result = dict(scaling=scaling(args))
    elif args.peer:
        result = compare_with_peer(args)
    else:
        result = run(args)
        if not args.json:
            print(describe(result))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
