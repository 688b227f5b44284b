"""Ready for the GPU: one script that checks, on a GPU machine, what the CPU cannot.

    python -m tools.gpu_check --out DIR [--sections sm90,kernel,gemm,train,ns,attn,dist,fixed] [--device auto]
                              [--dtype auto] [--layers N] [--steps 4] [--micro_batches 2] [--train_runs ...]
                              [--fixed_steps 20]

writes DIR/gpu_check.json and DIR/gpu_check.md (rewritten after every section, so a run cut short still
leaves what it measured). The sections, each time-boxed, each recording device, versions and the command
that reruns it; a failure in one is recorded and the next one runs:

    sm90    the Triton FP8 kernel compiled ahead of time for Hopper (sm_90a), on any machine, GPU or not:
            every autotune config for the forward, dgrad and wgrad GEMMs, read from the PTX and the cubin:
            fp8 wgmma of the right formats, a pipelined K loop, the split accumulator's fp32 adds, no spills;
            and the fused cast kernel in each launch mode (no spills, its rounding kept, div.rn for scales)
    kernel  fp8.fp8_matmul (the Triton FP8 GEMM, compiled) and fp8.torch_fp8_matmul (torch._scaled_mm) vs a
            float64 reference, e4m3 x e4m3 and e5m2 x e4m3, b K-major and row-major, with and without fast
            accumulation, K up to 14,848; the error is reported against the fp32-summation bound (ratio <= 1
            passes; with fast accumulation <= FAST_ACCUM_SLACK); and the eager chunked loss (aten's softmax in
            place) in fp32 and bf16 against float64 cross-entropy, loss and gradients
    gemm    TFLOP/s at the 1.3B layer shapes (M = 4 x 3712, K/N from 1536/2560/3840/7680; forward, dgrad,
            wgrad, with FP8Linear's accumulation): the Triton FP8 kernel, torch._scaled_mm, bf16 torch.mm, and
            for the backward GEMMs the Triton kernel with fast accumulation (the split accumulator's cost); the
            fused cast (fp8.cast_transpose) against the separate ops on x, dY and W of each layer (ms, GB/s,
            the same bytes on the device: a difference fails the section); each block linear's forward and
            backward in FP8 (weight cache warm and cold) against bf16: the measurement behind fp8_layers
    train   xmodel25's width with as many layers as fit (Xmodel.memory_estimate_gb vs the free memory),
            micro-batch 4 x 3712, --micro_batches per optimizer step (2: FP8's weight cache is used), compiled,
            bf16 vs FP8 (both kernels; cuBLASLt also without the fused cast and the weight cache, without FP8
            in the attention output projection, with each block replayed as a CUDA graph, and with the casts
            launched by compiled code itself): tokens/s (the
            step, and forward + backward alone), MFU vs the device's bf16 peak, peak memory, weight casts and
            cast launches per step, and the losses of the same steps on the same synthetic batches, finite and
            equal within FP8 tolerance
    ns      the Newton-Schulz step (muon.zeropower_via_newtonschulz5) at every 1.3B hidden-matrix shape:
            ms, TFLOP/s, and the whole Muon orthogonalization per step on one device, one matrix at a time
            and batched by shape (as Muon runs it)
    attn    xmodel25's attention alone (model.sdpa: 24 query heads, 8 K/V heads, head dim 64, causal, bf16) at each
            phase's seq_len x micro-batch (3712 x 4, 8192 x 2, 16384 x 1), forward + backward, with each SDPA kernel
            (auto, flash, efficient, cudnn) and the K/V heads un-repeated (enable_gqa) or repeated: ms, TFLOP/s by
            the model's FLOP count, the kernel auto picks, a kernel that refuses the call as a row with PyTorch's
            reasons; then the whole model at 8192 x 2 with auto and with the fastest: what attn_backend and gqa choose
    dist    torchrun with one process: a DDP step (nccl) against the same step without DDP, and the FP8
            amax all-reduce (MAX) of fp8.FP8Linear's statistics
    fixed   FP8 vs bf16 memorizing ONE fixed batch at the recipe's peak LR (no warmup), xmodel25's width,
            compiled, micro-batches 4 and 8 x 3712, --fixed_steps steps from the same init: the per-step losses
            within FIXED_BATCH_RTOL of each other, both falling below FIXED_BATCH_DROP x the first, neither
            climbing back (the scales' delayed-scaling lag under the fastest change training sees); each FP8 step's
            range use (amax x scale / fp8_max of x, W, dY: above 1 = clipped); where FP8 fails, the FIXED_BISECT
            variants (eager, no weight cache, separate casts, the other GEMM, margin 1) each run once, to name
            the culprit
    trainer the real train.py under torchrun --standalone on the embedded corpus: xmodel25 (FP8, compiled)
            through every phase kind in 18 steps (warmup, stable, the batch doubling, the decay with the switch to
            Muon, 8k and 16k context), uninterrupted and stopped + resumed: per-phase tokens/s and MFU from the
            runs' metrics, the resumed losses against the uninterrupted ones, launch and checkpoint-read seconds

Without CUDA the same sequence runs at tiny shapes on the CPU, so tests/test_gpu_check.py proves the script
in CI: sm90 exactly as on the GPU, the kernel under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors),
torch._scaled_mm where the CPU build has it (else recorded as unavailable), FP8 emulated in training, no
compile, the CPU's attention kernels (flash, math; the CUDA ones as unavailable rows), gloo instead of nccl.
Synthetic token batches everywhere but the trainer section (the embedded corpus, which needs no download).
"""
import argparse
import gc
import itertools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import warnings

import torch

from tools import gpu_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("sm90", "kernel", "gemm", "train", "ns", "attn", "dist", "fixed", "trainer")
# s; the first seven fit one 10-minute command on an H100 ("fixed" and "trainer" come last, so that the --budget_s
# cut falls on them: run each on its own)
TIME_BOX = {"sm90": 60, "kernel": 90, "gemm": 150, "train": 360, "ns": 30, "attn": 90, "dist": 60, "fixed": 540,
            "trainer": 480}
# fast accumulation on Hopper: errors up to 2^10 x the fp32 bound, as if its accumulator kept ~14 of fp32's
# 24 mantissa bits (DeepSeek-V3's measurement); exactly the fp32 bound wherever accumulation is fp32
FAST_ACCUM_SLACK = 2.0 ** 10
# FP8 vs bf16 from the same init: the mean loss over a few steps (the paper: no visible change). The mean, not
# each step: at the peak LR on random tokens single steps swing (bf16 itself: 12.1 -> 12.8 -> 12.1), and two runs
# a few 1e-3 apart early drift to a few 1e-2 apart by step 6 (seen on an H200); a broken FP8 backward (all
# gradients 0, seen there too) moves the mean by ~20%.
FP8_LOSS_RTOL = 0.02
# The fixed-batch check (section "fixed"): on one batch the loss falls smoothly, so FP8 is held to bf16 at every
# step. Measured on a CPU only (emulated GEMM; tests/test_fp8.py, test_fp8_follows_bf16_on_a_fixed_batch_at_the_
# peak_lr): at most 0.0022 apart per step at width 96, 0.0012 at this section's tiny shape; the band is 0.02, as
# FP8_LOSS_RTOL, for the H200's fast-accumulating forward. In 20 steps the tiny shape reaches 0.49-0.56 of its
# first loss; 0.75 asks for a clear fall without guessing the 1.3B model's speed (its numbers are recorded).
FIXED_BATCH_RTOL = 0.02
FIXED_BATCH_DROP = 0.75
FIXED_MICRO_BATCHES = (4, 8)


class SectionTimeout(Exception):
    pass


def versions(device: torch.device) -> dict:
    v = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
             device=str(device), platform=platform.platform())
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    if device.type == "cuda":
        v.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                 gpu_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1))
    else:
        v["cpu"] = torch.backends.cpu.get_cpu_capability()
    return v


def bench_ms(fn, device, reps=None) -> float:
    """Milliseconds of fn(): triton.testing.do_bench's (its mean) on CUDA, a plain timer's median on the CPU."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=50)
    fn()
    times = []
    for _ in range(reps or 1):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def shapes_config(device):
    """The model config whose shapes the sections use: xmodel25's on CUDA, a tiny one on the CPU."""
    import train
    mcfg = train.load_config([os.path.join(ROOT, "configs", "xmodel25.py")])["model"]
    if device.type == "cuda":
        return mcfg, dict(micro_batch=4, seq_len=3712)
    import dataclasses
    tiny = dataclasses.replace(mcfg, vocab_size=512, n_layer=2, hidden=32, ffn_hidden=80, n_head=2, n_kv_head=1,
                               base_width=16, loss_chunk=64)
    return tiny, dict(micro_batch=1, seq_len=32)


# ----------------------------------------------------------------------------------------------------
# sm90: the Triton kernel compiled ahead of time for Hopper, on any machine (no GPU needed)

# FP8Linear's three GEMMs as the kernel sees them in training: operand formats, output dtype, fast accumulation
SM90_GEMMS = (("fwd", "fp8e4nv", "fp8e4nv", "bf16", True), ("dgrad", "fp8e5", "fp8e4nv", "bf16", False),
              ("wgrad", "fp8e5", "fp8e4nv", "fp32", False))
SM90_SHARED_LIMIT = 232448  # bytes of shared memory one H100 block may use (227 KB)


def sm90(device, args, rec):
    """Compile fp8.fp8_matmul's kernel for sm_90a with every autotune config, specialised as the JIT does
    for the training shapes (16-byte aligned pointers, sizes and strides divisible by 16, K-major unit
    strides), and read what Hopper will run: fp8 wgmma instructions of the right formats, a software
    pipeline (one shared-memory buffer per stage), the split accumulator's fp32 adds where asked, and from
    the cubin the registers and spills (LOCAL bytes); then the fused cast kernel the same way (sm90_cast).
    A failure here costs no GPU time."""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import fp8
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # a compiled kernel, not an interpreted one
    try:
        fn = fp8.build_kernel(interpret=False).fn
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    names = fn.arg_names
    try:
        import triton.knobs
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    except Exception:  # older Triton, or no bundled tool: registers and spills are not read
        cuobjdump = None
    rows = rec.setdefault("results", [])
    for role, ta, tb, tc, fast in SM90_GEMMS:
        for bm, bn, bk, gm, warps, stages in fp8.H100_CONFIGS:
            if not fp8.accumulator_fits(bm, bn, warps, fast):  # the autotuner never tries it (it would spill)
                rec.setdefault("pruned", []).append([role, bm, bn, bk, gm, warps, stages])
                continue
            const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, OUT_BF16=tc == "bf16", FAST_ACCUM=fast,
                         stride_ak=1, stride_bk=1, stride_cn=1)
            sig = dict(a_ptr="*" + ta, b_ptr="*" + tb, c_ptr="*" + tc, scale_a_ptr="*fp32", scale_b_ptr="*fp32")
            sig.update({n: "constexpr" if n in const else "i32" for n in names if n not in sig})
            row = dict(gemm=role, a=ta, b=tb, out=tc, fast_accum=fast, config=[bm, bn, bk, gm, warps, stages])
            try:
                src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                                attrs={(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                                       if t != "constexpr"})
                ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=warps, num_stages=stages))
                ptx = ck.asm["ptx"]
                wgmma = re.findall(r"wgmma\.mma_async\S*", ptx)
                tile_bytes = bm * bk + bk * bn  # one stage of a and b, 1 byte each
                row.update(wgmma=sorted(set(wgmma)), n_wgmma=len(wgmma), shared=ck.metadata.shared,
                           stage_buffers=ck.metadata.shared // tile_bytes,
                           fp32_adds=len(re.findall(r"\badd(?:\.rn)?\.f32", ptx)))
                row.update(cubin_usage(ck.asm["cubin"], cuobjdump))
                fmt = {"fp8e4nv": "e4m3", "fp8e5": "e5m2"}
                problems = [why for bad, why in (
                    (not any(f".{fmt[ta]}.{fmt[tb]}" in w for w in wgmma), "no fp8 wgmma of these formats"),
                    (row["stage_buffers"] < 2, "not pipelined (one shared-memory stage)"),
                    (row["shared"] > SM90_SHARED_LIMIT, "shared memory over the H100's 227 KB"),
                    (not fast and row["fp32_adds"] == 0, "no split-accumulator adds"),
                    (row.get("local", 0) or row.get("stack", 0), "register spills")) if bad]
                row.update(status="failed" if problems else "ok", **({"problems": problems} if problems else {}))
            except Exception as e:
                row.update(status="failed", error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
    rec["cuobjdump"] = cuobjdump
    sm90_cast(rec, cuobjdump)
    bad = [r for r in rows + rec["cast"] if r["status"] != "ok"]
    if bad:
        raise AssertionError(f"{len(bad)} of {len(rows) + len(rec['cast'])} sm_90 compilations not as expected: "
                             f"{bad[:3]}")


def cubin_usage(cubin, cuobjdump) -> dict:
    """Registers and spills (local memory, stack) of a compiled kernel, read with cuobjdump ({} without it)."""
    import re
    import tempfile
    if not cuobjdump:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               timeout=60).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|LOCAL|STACK):(\d+)", usage)}


# The fused cast kernel's launches as FP8Linear makes them: (what, x's type, fp8 format, the kernel's mode flags)
_CAST = dict(STEP_SCALE=False, SKIP=0, CAST=True, TRANSPOSE=True, AMAX=True)
SM90_CASTS = (("x", "bf16", "e4m3", _CAST), ("dy", "bf16", "e5m2", _CAST), ("weight", "fp32", "e4m3", _CAST),
              ("jit_amax", "bf16", "e4m3", dict(_CAST, SKIP=1, CAST=False, TRANSPOSE=False)),
              ("weight_recast", "fp32", "e4m3", dict(_CAST, STEP_SCALE=True, SKIP=2, AMAX=False)))


def sm90_cast(rec, cuobjdump):
    """fp8.cast_transpose's kernel compiled for sm_90a in each mode FP8Linear launches, into rec["cast"]: no spills;
    its hand-made rounding still in the PTX (the 2^23 constant added and subtracted: not folded away); the
    weight's scale divided with div.rn.f32 as torch divides (not an approximate division); the shared memory
    the transposed store goes through."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    import fp8
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        fn = fp8.build_cast_kernel(interpret=False)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    names, fmts = fn.arg_names, {"e4m3": fp8.E4M3, "e5m2": fp8.E5M2}
    # The kernel reduces with tl.max's combine function, which Triton binds when it is imported: an interpreted
    # one if that was under TRITON_INTERPRET=1 (this check on a CPU), which the compiler cannot use. Compile
    # against a compiled twin of it (the interpreter only compares it by identity: it never calls it).
    combine = tl.standard._elementwise_max
    tl.standard._elementwise_max = combine if isinstance(combine, JITFunction) else JITFunction(combine.fn)
    try:
        for what, xt, fmt, flags in SM90_CASTS:
            rec.setdefault("cast", []).append(_sm90_cast_one(fn, names, what, xt, fmts[fmt], flags, cuobjdump))
    finally:
        tl.standard._elementwise_max = combine


def _sm90_cast_one(fn, names, what, xt, fmt, flags, cuobjdump) -> dict:
    """One launch mode of the cast kernel compiled for sm_90a (sm90_cast): its row."""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import fp8
    bm, bn, warps = fp8.CAST_TILE
    e_min, mant = fp8.FORMAT_BITS[fmt]
    const = dict(BLOCK_M=bm, BLOCK_N=bn, FP8_MAX=fp8.FP8_MAX[fmt], E_MIN=e_min, MANT=mant, INV_MARGIN=1.0,
                 stride_xn=1, **flags)
    sig = {n: "*u8" if n in ("q_ptr", "t_ptr") else "*" + xt if n == "x_ptr" else "*fp32" for n in names
           if n.endswith("_ptr")}
    sig.update({n: "constexpr" if n in const else "i32" for n in names if n not in sig})
    row = dict(launch=what, x=xt, fp8=str(fmt)[6:], tile=[bm, bn, warps])
    try:
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t != "constexpr"}
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
        ptx = ck.asm["ptx"]
        row.update(shared=ck.metadata.shared, rounding_adds=ptx.count("0f4B000000"),
                   div_rn=len(re.findall(r"div\.rn\.f32", ptx)), **cubin_usage(ck.asm["cubin"], cuobjdump))
        problems = [why for bad, why in (
            (flags["CAST"] and not row["rounding_adds"], "the rounding's 2^23 add is gone"),
            (flags["STEP_SCALE"] and not row["div_rn"], "no div.rn.f32 for the scale"),
            (row.get("local", 0) or row.get("stack", 0), "register spills")) if bad]
        row.update(status="failed" if problems else "ok", **({"problems": problems} if problems else {}))
    except Exception as e:
        row.update(status="failed", error=f"{type(e).__name__}: {e}"[:300])
    return row


# ----------------------------------------------------------------------------------------------------
# kernel: both FP8 GEMMs against float64

def kernel(device, args, rec):
    import fp8
    # on CUDA a forward-like shape and a wgrad-like one (K = the micro-batch's 14,848 tokens); the row-major b
    # (which FP8Linear never passes) only at the first, to keep the autotuning that each new case costs short
    shapes = [(1024, 1536, 2560), (1536, 14848, 1536)] if device.type == "cuda" else [(48, 64, 32)]
    g = torch.Generator().manual_seed(0)
    sa, sb = 3.5, 0.0625
    rows = rec.setdefault("results", [])
    for (M, K, N), (fa, fb) in itertools.product(shapes, ((fp8.E4M3, fp8.E4M3), (fp8.E5M2, fp8.E4M3))):
        a = fp8.quantize(torch.randn(M, K, generator=g) / sa, torch.tensor(sa), fa).to(device)
        b_km = fp8.quantize(torch.randn(N, K, generator=g) / sb, torch.tensor(sb), fb).to(device).t()  # K-major
        layouts = [("k_major", b_km, (False, True))]
        if (M, K, N) == shapes[0]:
            layouts.append(("row_major", b_km.contiguous(), (False,)))
        for layout, b, accumulations in layouts:
            a64, b64 = a.float().double(), b.float().double()  # fp8 -> fp32 is exact
            ref = (a64 @ b64) / sa / sb
            # two fp32 summation orders of K exact products, plus the scale operations (tests/test_fp8.py)
            bound = (2 * K + 8) * 2.0 ** -24 * (a64.abs() @ b64.abs()) / sa / sb
            for (name, fn), fast in itertools.product((("triton", fp8.fp8_matmul), ("torch", fp8.torch_fp8_matmul)),
                                                      accumulations):
                row = dict(kernel=name, a=str(fa)[6:], b=str(fb)[6:], layout=layout, shape=[M, K, N], fast_accum=fast)
                try:
                    c = fn(a, b, torch.tensor(sa, device=device), torch.tensor(sb, device=device), torch.float32, fast)
                    ratio = float(((c.double() - ref).abs() / bound).max())
                    row.update(status="ok" if ratio <= (FAST_ACCUM_SLACK if fast else 1) else "failed",
                               error_over_bound=ratio, max_abs_error=float((c.double() - ref).abs().max()))
                except Exception as e:  # e.g. _scaled_mm without a CPU kernel, or a layout cuBLASLt refuses
                    row.update(status="unavailable" if name == "torch" else "failed", error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
    # the eager chunked loss (evaluation, and training without compile) runs aten's softmax in place over its
    # logits (model._chunk_loss): check the device's softmax kernel allows that, loss and gradients vs float64
    from model import chunked_cross_entropy
    h = torch.randn(300, 64, generator=g).to(device)
    w = (torch.randn(5000, 64, generator=g) * 0.3).to(device)
    y = torch.randint(0, 5000, (300,), generator=g).to(device)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(0.5 * h64 @ w64.T, y)
    ref.backward()
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):  # bf16: its GEMM inputs round to 8 bits
        hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = chunked_cross_entropy(hx.to(dt), wx, y, 0.5, 128)
        loss.backward()
        errs = [float((loss.detach().double() - ref.detach()).abs() / ref.detach().abs())] + [
            float((a.grad.double() - b.grad).norm() / b.grad.norm()) for a, b in ((hx, h64), (wx, w64))]
        rows.append(dict(kernel="chunked_ce", dtype=str(dt)[6:], rel_err_loss_dh_dw=errs,
                         status="ok" if max(errs) <= tol else "failed"))
    bad = [r for r in rows if r["status"] == "failed"]
    if bad:
        raise AssertionError(f"{len(bad)} kernel checks outside their bound: {bad}")


# ----------------------------------------------------------------------------------------------------
# gemm: TFLOP/s at the layer shapes

def gemm(device, args, rec):
    from tools.bench import fp8_gemm_rows
    mcfg, run = shapes_config(device)
    tokens, ms_of = run["micro_batch"] * run["seq_len"], lambda fn: bench_ms(fn, device)
    rec["results"] = fp8_gemm_rows(mcfg, tokens, device, ms_of)
    rec["cast"] = cast_rows(mcfg, tokens, device, ms_of)
    rec["layers"] = layer_rows(mcfg, tokens, device, ms_of)
    bad = [r for r in rec["cast"] if not r.get("bit_equal")]
    if bad:
        raise AssertionError(f"the fused cast differs from the separate ops on this device: {bad[:3]}")


def rounding_cases(dtype, device):
    """Every finite value of the fp8 `dtype`, the midpoints between neighbours (ties), one fp32 ulp either side
    of each, both signs, beyond the maximum, +-inf, nan: a [n, 16] fp32 tensor to cast with scale 1."""
    import fp8
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = codes[torch.isfinite(codes) & (codes >= 0)].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mid, torch.nextafter(mid, torch.tensor(0.0)), torch.nextafter(mid, torch.tensor(1e9)),
                      torch.tensor([fp8.FP8_MAX[dtype] * 1.01, 3e38, float("inf"), float("nan"), 1e-40])])
    vals = torch.cat([vals, -vals])
    return torch.nn.functional.pad(vals, (0, -len(vals) % 16)).reshape(-1, 16).to(device)


def cast_rows(mcfg, tokens, device, ms_of) -> list[dict]:
    """The fused cast (fp8.cast_transpose: FP8 copy, transposed copy and amax in one pass) against the separate
    ops it replaces (amax, quantize, transposed copy) on every tensor FP8Linear casts at the layer shapes: x and
    dY (bf16, `tokens` rows), W (fp32): ms each, the fused pass's GB/s (x read, two fp8 copies written), and
    whether both give the same bytes and amax on this device; first every fp8 value and tie of both formats."""
    import fp8
    from tools.bench import layer_shapes
    rows = []

    def same(a, b):
        return bool(torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
                    and torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))
                    and (torch.equal(a[2], b[2]) or bool(a[2].isnan() & b[2].isnan())))

    for fmt in (fp8.E4M3, fp8.E5M2):
        x, one = rounding_cases(fmt, device), torch.ones((), device=device)
        rows.append(dict(layer="-", tensor="every value and tie", fp8=str(fmt)[6:], M=x.shape[0], N=x.shape[1],
                         bit_equal=same(fp8.cast_transpose(x, one, fmt, kernel=True),
                                        fp8.cast_transpose(x, one, fmt, kernel=False))))
    g = torch.Generator(device=device).manual_seed(0)
    for name, n_in, n_out in layer_shapes(mcfg):
        for what, shape, src, fmt in (("x", (tokens, n_in), torch.bfloat16, fp8.E4M3),
                                      ("dy", (tokens, n_out), torch.bfloat16, fp8.E5M2),
                                      ("weight", (n_out, n_in), torch.float32, fp8.E4M3)):
            x = torch.randn(shape, device=device, generator=g).to(src)
            scale = torch.full((), fp8.FP8_MAX[fmt], device=device) / fp8.amax(x) * 2  # the largest saturate
            fused = lambda: fp8.cast_transpose(x, scale, fmt, kernel=True)  # noqa: E731
            separate = lambda: fp8.cast_transpose(x, scale, fmt, kernel=False)  # noqa: E731
            row = dict(layer=name, tensor=what, fp8=str(fmt)[6:], M=shape[0], N=shape[1],
                       bit_equal=same(fused(), separate()), fused_ms=ms_of(fused), separate_ms=ms_of(separate))
            row.update(speedup=row["separate_ms"] / row["fused_ms"],
                       fused_gb_s=x.numel() * (x.element_size() + 2) / row["fused_ms"] / 1e6)
            rows.append(row)
    return rows


def layer_rows(mcfg, tokens, device, ms_of) -> list[dict]:
    """Each block linear's forward and backward (plus the delayed-scaling update) at the layer shapes: FP8Linear
    with each GEMM kernel, its weight cache warm (as on every micro-batch of a step but the first) and cold (a new
    weight: the first), against nn.Linear under bf16 autocast. The measurement behind fp8_layers: a linear pays
    in FP8 where its FP8 time is below bf16's (docs/FP8.md, "Which layers run in FP8")."""
    import fp8
    from model import FP8_LAYERS
    from tools.bench import layer_shapes
    rows = []
    for key, (name, n_in, n_out) in zip(FP8_LAYERS, layer_shapes(mcfg)):
        x = torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(tokens, n_out, device=device, dtype=torch.bfloat16)

        def step(layer, cold=False):
            def fn():
                if cold:
                    layer.forget_fp8_weight()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    y = layer(x)
                y.backward(dy)
                if isinstance(layer, fp8.FP8Linear):
                    fp8.update_scales([layer])
            return fn

        row = dict(layer=name, fp8_layers_name=key, M=tokens, K=n_in, N=n_out,
                   bf16_ms=ms_of(step(torch.nn.Linear(n_in, n_out, bias=False, device=device))))
        for gemm_kind in fp8.GEMMS:
            layer = fp8.FP8Linear(n_in, n_out, device=device, gemm=gemm_kind)
            try:
                step(layer)()  # calibrates the scales and fills the cache
                row[f"fp8_{gemm_kind}_ms"] = ms_of(step(layer))
                row[f"fp8_{gemm_kind}_cold_ms"] = ms_of(step(layer, cold=True))
                row[f"fp8_{gemm_kind}_vs_bf16"] = row["bf16_ms"] / row[f"fp8_{gemm_kind}_ms"]
            except Exception as e:
                row[f"fp8_{gemm_kind}_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# train: bf16 vs FP8 (both kernels), compiled, at xmodel25's width

def fit_layers(mcfg, run, device) -> int:
    """The most layers (<= the config's) whose training memory (Xmodel.memory_estimate_gb) fits 90% of the GPU."""
    import dataclasses
    from model import Xmodel
    free = torch.cuda.mem_get_info(device)[0] / 1e9 * 0.9
    for n in range(mcfg.n_layer, 0, -1):
        cfg = dataclasses.replace(mcfg, n_layer=n)
        with torch.device("meta"):
            m = Xmodel(cfg)
        if m.memory_estimate_gb(run["micro_batch"], run["seq_len"]) < free:
            return n
    return 1


def train_section(device, args, rec):
    import dataclasses
    import runtime
    import train
    from tools.bench import device_peak
    mcfg, run = shapes_config(device)
    tcfg = train.load_config([os.path.join(ROOT, "configs", "xmodel25.py")])["train"]
    n_layer = args.layers or (fit_layers(mcfg, run, device) if device.type == "cuda" else mcfg.n_layer)
    compile_ = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    B, T, accum = run["micro_batch"], run["seq_len"], args.micro_batches
    rec.update(n_layer=n_layer, hidden=mcfg.hidden, micro_batch=B, seq_len=T, micro_batches=accum, compiled=compile_,
               dtype=args.dtype, steps=args.steps)
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randint(0, mcfg.vocab_size, (B, T + 1), generator=g).to(device) for _ in range(accum)]
               for _ in range(args.steps + 2)]  # per optimizer step, its micro-batches
    setting = dict(tcfg=tcfg, batches=batches, device=device, autocast=runtime.autocast(device, args.dtype),
                   peak=device_peak(device, "bf16"))
    runs = rec.setdefault("runs", {})
    for label in args.train_runs.split(","):
        over, flags, mode = TRAIN_RUNS[label]
        cfg = dataclasses.replace(mcfg, n_layer=n_layer, max_seq_len=max(mcfg.max_seq_len, T), **over)
        r = runs.setdefault(label, {})
        # a run that fails to compile is measured again eagerly, so the kernel's numbers survive a compiler problem
        for compiled in ((True, False) if compile_ else (False,)):
            try:
                torch.manual_seed(0)
                with fp8_switches(**flags):
                    r.update(train_run(cfg, compiled=compiled, mode=mode, **setting), status="ok", compiled=compiled)
                if not all(math.isfinite(x) for x in r["losses"]):
                    r.update(status="failed", error="non-finite loss")
                break
            except SectionTimeout:
                r.update(status="timeout")
                raise
            except Exception as e:
                r.update(status="failed", **{"compile_error" if compiled else "error": f"{type(e).__name__}: {e}"[:500]})
            finally:  # free this run's model for the next: Dynamo's caches keep compiled modules alive
                if compiled:
                    torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    r["left_allocated_gb"] = torch.cuda.memory_allocated(device) / 1e9
    judge_train_runs(runs)


def train_run(cfg, tcfg, batches, device, autocast, peak, compiled, mode) -> dict:
    """One of TRAIN_RUNS: a fresh model stepped over `batches` (each an optimizer step's micro-batches) as train.py
    steps it; the median step after the first two (compilation, calibration), forward+backward alone, the losses,
    the host syncs and the profile of one more step, the cast launches, the peak memory."""
    import fp8
    import muon
    import mup
    from tools.bench import synchronize
    model = mup.build_model(cfg, device)
    if compiled:
        model.compile_for_training(mode)
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    opts = muon.Optimizers(mup.param_groups(model, tcfg.lr, tcfg.emb_lr, tcfg.weight_decay), tcfg, "adamw")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = lambda micro, marks=None: train_step(model, opts, autocast, device, micro, marks)  # noqa: E731
    losses, times, fwd_bwd = [], [], []
    casts, launches = count_calls("_cast_weight"), count_calls("_launch_cast")
    try:
        for micro in batches:
            synchronize(device)
            t0, marks = time.perf_counter(), []
            loss = step(micro, marks)
            synchronize(device)
            times.append(time.perf_counter() - t0)
            fwd_bwd.append(marks[0] - t0)
            losses.append(float(loss))
    finally:
        weight_casts, cast_launches = casts.stop() / len(batches), launches.stop() / len(batches)
    syncs = host_syncs(device, lambda: step(batches[-1]))  # one more step, after the timed ones
    where = profile_step(device, lambda: step(batches[-1]))  # and one under the profiler
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):  # FP8: the delayed-scaling step every micro-batch pays (one batched update)
        model.update_fp8_scales()
    synchronize(device)
    update_ms = (time.perf_counter() - t0) * 100 if cfg.fp8 else None
    step_s = sorted(times[2:])[len(times[2:]) // 2]  # the first two steps compile and calibrate
    fwd_bwd_s = sorted(fwd_bwd[2:])[len(fwd_bwd[2:]) // 2]
    tokens = batches[0][0].shape[0] * (batches[0][0].shape[1] - 1) * len(batches[0])
    flops = model.flops_per_token(batches[0][0].shape[1] - 1) * tokens / step_s
    return dict(gemm=fp8.resolve_backend(device, cfg.fp8_backend) if cfg.fp8 else None, losses=losses,
                tokens_per_s=tokens / step_s, step_ms=step_s * 1e3, fwd_bwd_ms=fwd_bwd_s * 1e3,
                fwd_bwd_tokens_per_s=tokens / fwd_bwd_s, warmup_s=sum(times[:2]), tflops=flops / 1e12,
                mfu=flops / peak if peak else None, params=model.num_params(),
                host_syncs_per_step=None if syncs is None else len(syncs), host_sync_sites=syncs,
                update_fp8_scales_ms=update_ms, profile=where, weight_casts_per_step=weight_casts,
                cast_launches_per_step=cast_launches, compile_mode=mode,
                cudagraph_skips=torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips,
                peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)


def train_step(model, opts, autocast, device, micro, marks=None):
    """As train.py's train_step: the micro-batches' gradients summed, one optimizer step; `marks` gets the time the
    forwards and backwards end. Returns the step's loss (on the device)."""
    from tools.bench import synchronize
    total = 0.0
    for batch in micro:
        with autocast:
            loss = model(batch[:, :-1], batch[:, 1:]) / len(micro)
        loss.backward()
        model.update_fp8_scales()
        total = total + loss.detach()
    if marks is not None:
        synchronize(device)
        marks.append(time.perf_counter())
    opts.step()
    opts.zero_grad()
    return total


def judge_train_runs(runs: dict) -> None:
    """Each FP8 run against bf16 (speed, losses within FP8_LOSS_RTOL), fp8_torch against the code before the fused
    cast and the weight cache (fp8_torch_uncached); raises if a run is not ok."""
    base = runs.get("bf16", {}).get("losses")
    for label in [k for k in runs if k != "bf16"]:
        got = runs[label].get("losses")
        if base and got:
            diff = abs(sum(got) - sum(base)) / abs(sum(base))
            runs[label].update(mean_loss_rel_diff_vs_bf16=diff,
                               max_loss_rel_diff_vs_bf16=max(abs(a - b) / abs(b) for a, b in zip(got, base)),
                               speedup_vs_bf16=runs[label]["tokens_per_s"] / runs["bf16"]["tokens_per_s"],
                               fwd_bwd_speedup_vs_bf16=runs[label]["fwd_bwd_tokens_per_s"]
                               / runs["bf16"]["fwd_bwd_tokens_per_s"])
            if diff > FP8_LOSS_RTOL:  # the speedup is read with both runs' "compiled"
                runs[label]["status"] = "failed"
                runs[label]["error"] = f"mean loss differs from bf16 by {diff:.3g} > {FP8_LOSS_RTOL}"
    new, old = runs.get("fp8_torch", {}), runs.get("fp8_torch_uncached", {})
    if new.get("tokens_per_s") and old.get("tokens_per_s"):
        new["speedup_vs_uncached"] = new["tokens_per_s"] / old["tokens_per_s"]
        new["max_loss_rel_diff_vs_uncached"] = max(abs(a - b) / abs(b) for a, b in zip(new["losses"], old["losses"]))
    failed = [k for k, v in runs.items() if v.get("status") != "ok"]
    if failed:
        raise AssertionError(f"train runs not ok: {failed}")


# The train section's runs: label -> (ModelConfig overrides, fp8 module switches, compile mode). fp8_torch_uncached is
# the code before the fused cast and the weight cache (the same numbers: fp8.FUSED_CAST, fp8.WEIGHT_CACHE),
# fp8_torch_no_out leaves the attention output projection in bf16 (fp8_layers; docs/FP8.md, "Which layers run in
# FP8"), fp8_torch_graphs replays each compiled block as a CUDA graph (fewer launches where the GPU idles),
# fp8_torch_direct has compiled code launch the cast kernels itself (fp8.DIRECT_LAUNCH: no Python per launch).
TRAIN_RUNS = {"bf16": (dict(fp8=False), {}, "default"),
              "fp8_triton": (dict(fp8=True, fp8_backend="triton"), {}, "default"),
              "fp8_torch": (dict(fp8=True, fp8_backend="torch"), {}, "default"),
              "fp8_torch_uncached": (dict(fp8=True, fp8_backend="torch"), dict(FUSED_CAST=False, WEIGHT_CACHE=False),
                                     "default"),
              "fp8_torch_no_out": (dict(fp8=True, fp8_backend="torch", fp8_layers="qkv,gate_up,down"), {}, "default"),
              "fp8_torch_graphs": (dict(fp8=True, fp8_backend="torch"), {}, "reduce-overhead"),
              "fp8_torch_direct": (dict(fp8=True, fp8_backend="torch"), dict(DIRECT_LAUNCH=True), "default")}


class fp8_switches:
    """with fp8_switches(FUSED_CAST=False, ...): fp8.py's module switches set for the block, then restored."""

    def __init__(self, **flags):
        self.flags, self.saved = flags, {}

    def __enter__(self):
        import fp8
        self.saved = {k: getattr(fp8, k) for k in self.flags}
        for k, v in self.flags.items():
            setattr(fp8, k, v)

    def __exit__(self, *exc):
        import fp8
        for k, v in self.saved.items():
            setattr(fp8, k, v)


class count_calls:
    """Counts the calls of fp8.NAME until stop(): "_cast_weight", the passes that quantize a new weight into
    FP8Linear's cache; "_launch_cast", the fused cast kernel's launches (each a Python launch on the host)."""

    def __init__(self, name):
        import fp8
        self.name, self.n, self.real = name, 0, getattr(fp8, name)

        def counted(*a, **k):
            self.n += 1
            return self.real(*a, **k)
        setattr(fp8, name, counted)

    def stop(self) -> int:
        import fp8
        setattr(fp8, self.name, self.real)
        return self.n


KERNEL_CLASSES = (("gemm", ("gemm", "xmma", "cutlass", "nvjet", "fp8_matmul", "cublas", "aten::mm", "aten::addmm",
                             "aten::bmm", "_scaled_mm")),
                  ("attention", ("flash", "fmha", "attention")))


def profile_step(device, fn, top=12):
    """Run fn() under torch.profiler: where its time went, as ms per kernel class (KERNEL_CLASSES by name, the
    rest "other": norms, quantization, elementwise, loss, optimizer) and the `top` kernels by time. On CUDA
    the GPU kernels' own durations; on a CPU the ops' self times."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from tools.bench import synchronize
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        synchronize(device)
    per_name = {}
    for e in prof.events():
        if cuda and e.device_type != DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
        n, t = per_name.get(e.name, (0, 0.0))
        per_name[e.name] = (n + 1, t + us / 1e3)
    classes = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for name, (_, ms) in per_name.items():
        low = name.lower()
        # Inductor's fused kernels (triton_poi_fused__scaled_mm_...) name the ops they were fused next to: "other"
        cls = "other" if low.startswith("triton_") else next(
            (c for c, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")
        classes[cls] += ms
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(clock="gpu kernels" if cuda else "cpu self", total_ms=sum(classes.values()), ms=classes,
                top=[[name[:100], n, ms] for name, (n, ms) in ranked])


def host_syncs(device, fn):
    """Run fn() and return where it made the host wait for the GPU (torch.cuda's sync debug mode flags .item(),
    device-to-host copies, nonzero, ...: each one stalls the CPU that should be queueing the next kernels), as
    "file:line" per occurrence; None on a CPU, where there is nothing to wait for."""
    if device.type != "cuda":
        fn()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = lambda f: f.split("site-packages/")[-1] if "site-packages/" in f else os.path.relpath(f, ROOT)  # noqa: E731
    return [f"{where(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


# ----------------------------------------------------------------------------------------------------
# ns: the Newton-Schulz step at the hidden-matrix shapes

def ns(device, args, rec):
    import muon
    from tools.bench import hidden_matrix_shapes
    mcfg, _ = shapes_config(device)
    shapes = hidden_matrix_shapes(mcfg)
    rows, total_ms, batched_ms = rec.setdefault("results", []), 0.0, 0.0
    for shape in sorted(set(shapes)):
        G = torch.randn(*shape, device=device)
        ms = bench_ms(lambda: muon.zeropower_via_newtonschulz5(G), device)
        count = shapes.count(shape)
        # as Muon runs them: all matrices of the shape in batched chains of at most NS_BATCH_ELEMENTS elements
        per_chain = max(1, muon.NS_BATCH_ELEMENTS // math.prod(shape))
        Gs = torch.randn(count, *shape, device=device, dtype=torch.bfloat16)
        b_ms = bench_ms(lambda: [muon.zeropower_via_newtonschulz5(Gs[i:i + per_chain])
                                 for i in range(0, count, per_chain)], device)
        total_ms, batched_ms = total_ms + ms * count, batched_ms + b_ms
        flops = muon.newton_schulz_flops(*shape)
        rows.append(dict(shape=list(shape), count=count, ms=ms, tflops=flops / ms / 1e9, batched_ms=b_ms,
                         batched_tflops=count * flops / b_ms / 1e9))
    rec.update(matrices=len(shapes), ms_per_step_one_device=total_ms, batched_ms_per_step_one_device=batched_ms,
               flops_per_step=sum(muon.newton_schulz_flops(*s) for s in shapes))


# ----------------------------------------------------------------------------------------------------
# attn: the SDPA kernels at the phases' sequence lengths

# The kernels the section times (model.ATTN_BACKENDS); math also on the CPU, where the fused CUDA kernels are error
# rows (on a GPU its T x T scores, 25 GB at 16k, would only be slow)
ATTN_TIMED = ("auto", "flash", "efficient", "cudnn")
ATTN_CPU_SHAPES = ((32, 4), (64, 2), (128, 1))  # (seq_len, micro-batch): the phases' three shapes, tiny
ATTN_RTOL = 0.02  # a forced kernel's output vs auto's (relative norm): bf16 rounding is ~0.004


def attn_shapes(device) -> list[tuple[int, int]]:
    """(seq_len, micro-batch) of xmodel25's phases, each once: 3712 x 4, 8192 x 2, 16384 x 1 on CUDA."""
    if device.type != "cuda":
        return list(ATTN_CPU_SHAPES)
    import train
    tcfg = train.load_config([os.path.join(ROOT, "configs", "xmodel25.py")])["train"]
    return list(dict.fromkeys((p["seq_len"], p.get("micro_batch", tcfg.micro_batch)) for p in tcfg.phases))


def attn_flops_per_token(mcfg, seq_len: int) -> float:
    """One layer's causal attention FLOPs per token, fwd + bwd, as Xmodel.flops_per_token counts them (the part
    that grows with seq_len): 6 * seq_len * n_head * head_dim, i.e. q k^T and p v at 2 * T * d each per head,
    halved by the causal mask, times 3 for forward + backward."""
    from model import Xmodel
    with torch.device("meta"):
        m = Xmodel(mcfg)
    return (m.flops_per_token(seq_len) - m.flops_per_token(0)) / mcfg.n_layer


def attn_leaves(mcfg, B, T, device, dtype, g):
    """q [B, H, T, d], k, v [B, Hkv, T, d] in the model's layouts (q, k: RoPE's new tensors; v: a view of the
    fused qkv output, [B, T, Hkv, d] in memory), leaves that take gradients, and an output gradient."""
    H, Hkv, d = mcfg.n_head, mcfg.n_kv_head, mcfg.head_dim
    q, k = (torch.randn(B, h, T, d, device=device, generator=g, dtype=dtype).requires_grad_() for h in (H, Hkv))
    v = torch.randn(B, T, Hkv, d, device=device, generator=g, dtype=dtype).requires_grad_()
    return q, k, v, torch.randn(B, H, T, d, device=device, generator=g, dtype=dtype)


def sdpa_choice(q, k, v, scale: float, gqa: str) -> str:
    """The kernel PyTorch picks for model.sdpa's call under "auto": torch._fused_sdp_choice, which
    F.scaled_dot_product_attention asks, on the same arguments."""
    import model
    k, v = model.kv_heads(q, k, v, gqa)
    got = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return {int(b): n for n, b in model.ATTN_BACKENDS.items() if b is not None}.get(int(got), str(got))


def attn_case(mcfg, B, T, backend, gqa, device, dtype, ref) -> tuple[dict, torch.Tensor | None]:
    """One kernel and K/V mode at one shape: its row (median ms of forward + backward, TFLOP/s by
    attn_flops_per_token, its output against ref, auto's with native GQA; for auto, the kernel PyTorch picked and
    the profiler's longest three) and its output."""
    import model
    q, k, v, dy = attn_leaves(mcfg, B, T, device, dtype, torch.Generator(device=device).manual_seed(T))
    row = dict(seq_len=T, micro_batch=B, backend=backend, gqa=gqa)

    def fwd_bwd():
        y = model.sdpa(q, k, v.transpose(1, 2), mcfg.attn_scale, backend, gqa)
        torch.autograd.grad(y, (q, k, v), dy)
        return y
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # on CUDA a refusing kernel's reasons come as warnings
            warnings.simplefilter("always")
            y = fwd_bwd().detach().float()
        row.update(status="ok", ms=bench_ms(fwd_bwd, device, reps=3))
        row["tflops"] = B * T * attn_flops_per_token(mcfg, T) / row["ms"] / 1e9
        if backend == "auto":
            row["ran"] = sdpa_choice(q, k, v.transpose(1, 2), mcfg.attn_scale, gqa)
            row["kernels"] = [name for name, *_ in profile_step(device, fwd_bwd, top=3)["top"]]
        if ref is not None:
            row["rel_err_vs_auto"] = float((y - ref).norm() / ref.norm())
            if row["rel_err_vs_auto"] > ATTN_RTOL:
                row.update(status="failed", error=f"output {row['rel_err_vs_auto']:.3g} from auto's > {ATTN_RTOL}")
        return row, y
    except SectionTimeout:
        raise
    except Exception as e:  # a kernel that refuses the call is a finding, not a failure of the section
        no_kernel = any(w in str(e) for w in model.NO_KERNEL)
        reasons = " ".join(dict.fromkeys(str(w.message).strip() for w in caught))
        return dict(row, status="unavailable" if no_kernel else "failed", error=f"{type(e).__name__}: {e}"[:300],
                    **({"reasons": reasons[:1000]} if reasons else {})), None


def attn_model_rows(mcfg, rows, device, args) -> list[dict]:
    """The whole model's forward + backward (eager, the config's FP8 and autocast) at the first long phase's shape
    (the second of attn_shapes), with the default (auto, native) and with the fastest other kernel and K/V mode of
    `rows` there: tokens/s and MFU. As many layers as fit (--layers sets them); eager, since compiling twice would
    not fit the time box."""
    import dataclasses
    import mup
    import runtime
    from tools.bench import device_peak
    T, B = attn_shapes(device)[1]
    timed = sorted((r for r in rows if r["seq_len"] == T and r["status"] == "ok"), key=lambda r: r["ms"])
    # the default against the fastest other setting (when the default is the fastest: its runner-up)
    runs = [("auto", "native")] + [(r["backend"], r["gqa"]) for r in timed if (r["backend"], r["gqa"]) !=
                                   ("auto", "native")][:1]
    if device.type == "cuda":
        torch.cuda.empty_cache()  # fit_layers reads the free memory: the attention cases' cached blocks count as used
    n_layer = args.layers or (fit_layers(mcfg, dict(micro_batch=B, seq_len=T), device) if device.type == "cuda"
                              else mcfg.n_layer)
    batch = torch.randint(0, mcfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    peak, out = device_peak(device, "bf16"), []
    for backend, gqa in runs:
        cfg = dataclasses.replace(mcfg, n_layer=n_layer, max_seq_len=max(mcfg.max_seq_len, T), attn_backend=backend,
                                  gqa=gqa)
        row = dict(seq_len=T, micro_batch=B, n_layer=n_layer, backend=backend, gqa=gqa, compiled=False)
        try:
            torch.manual_seed(0)
            model = mup.build_model(cfg, device)

            def step():
                with runtime.autocast(device, args.dtype):
                    loss = model(batch[:, :-1], batch[:, 1:])
                loss.backward()
                model.update_fp8_scales()
            ms = bench_ms(step, device)
            flops = model.flops_per_token(T) * B * T / ms * 1e3
            row.update(status="ok", step_ms=ms, tokens_per_s=B * T / ms * 1e3, mfu=flops / peak if peak else None)
        except SectionTimeout:
            raise
        except Exception as e:
            row.update(status="failed", error=f"{type(e).__name__}: {e}"[:300])
        finally:
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out.append(row)
    if len(out) == 2 and out[0].get("step_ms") and out[1].get("step_ms"):
        out[1]["speedup_vs_auto"] = out[0]["step_ms"] / out[1]["step_ms"]
    return out


def attn_section(device, args, rec):
    """xmodel25's attention alone (model.sdpa: q [B, 24, T, 64], k, v [B, 8, T, 64], causal, the model's scale, bf16
    on CUDA) at each phase's seq_len x micro-batch, forward + backward, for every kernel in ATTN_TIMED (and math on
    the CPU) with K/V un-repeated (enable_gqa) and repeated: ms, TFLOP/s, which kernel auto ran; a kernel that
    refuses the call is an "unavailable" row with PyTorch's error. Then the whole model at the first long phase's
    shape with auto and with the fastest (attn_model_rows). The numbers behind attn_backend and gqa."""
    mcfg, _ = shapes_config(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda or args.dtype == "bfloat16" else torch.float32
    rec.update(n_head=mcfg.n_head, n_kv_head=mcfg.n_kv_head, head_dim=mcfg.head_dim, dtype=str(dtype)[6:],
               scale=mcfg.attn_scale)
    rows = rec.setdefault("results", [])
    for T, B in attn_shapes(device):
        ref = None
        for backend, gqa in itertools.product(ATTN_TIMED + (() if cuda else ("math",)), ("native", "repeat")):
            row, y = attn_case(mcfg, B, T, backend, gqa, device, dtype, ref)
            ref = y if ref is None else ref
            rows.append(row)
    rec["model"] = attn_model_rows(mcfg, rows, device, args)
    bad = [r for r in rows if r["status"] == "failed" or r["backend"] == "auto" and r["status"] != "ok"]
    bad += [r for r in rec["model"] if r["status"] != "ok"]
    if bad:
        raise AssertionError(f"{len(bad)} attention cases failed: {bad[:3]}")


# ----------------------------------------------------------------------------------------------------
# dist: a one-process torchrun (nccl on CUDA, gloo on the CPU)

def dist_worker(args):
    """Run under torchrun: a DDP step of a tiny FP8 model against the same step without DDP, and the amax
    all-reduce with MAX. Writes its findings to --out/dist_worker.json."""
    import dataclasses
    import torch.distributed as dist
    import fp8
    import mup
    import runtime
    from torch.nn.parallel import DistributedDataParallel
    cuda = torch.cuda.is_available() and args.device != "cpu"
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    out = dict(backend=backend, world=dist.get_world_size(), device=str(device))
    mcfg, _ = shapes_config(torch.device("cpu"))  # tiny on both: this is a smoke test of the plumbing
    cfg = dataclasses.replace(mcfg, fp8=True)
    torch.manual_seed(0)
    ref, net = mup.build_model(cfg, device), mup.build_model(cfg, device)
    net.load_state_dict(ref.state_dict())
    ddp = DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    x = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1)).to(device)
    for m in (ref, ddp):
        m(x[:, :-1], x[:, 1:]).backward()
    diffs = [float((a.grad - b.grad).abs().max()) for a, b in zip(ref.parameters(), net.parameters())]
    out["ddp_max_grad_diff"] = max(diffs)
    # the collective of fp8.update_scales (skipped in a world of 1): every layer's recorded amaxes in one MAX
    recorded = torch.stack([m.pending_amax for m in ref.modules() if isinstance(m, fp8.FP8Linear)])
    reduced = recorded * (rank + 1)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    out["amax_all_reduce_equal"] = bool(torch.equal(reduced, recorded * dist.get_world_size()))
    out["amax_layers"] = recorded.shape[0]
    ref.update_fp8_scales()
    out["amax_local"] = ref.blocks[0].attn.wqkv.amax_history[:, 0].tolist()
    dist.barrier()
    if rank == 0:
        with open(os.path.join(args.out, "dist_worker.json"), "w") as f:
            json.dump(out, f)
    runtime.exit_distributed()


def dist_section(device, args, rec):
    path = os.path.join(args.out, "dist_worker.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
           "tools.gpu_check", "--dist_worker", "--out", os.path.abspath(args.out), "--device", device.type]
    rec["worker_command"] = " ".join(cmd)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=rec["time_box_s"])
    if p.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"torchrun exited {p.returncode}: {p.stderr[-1500:]}")
    with open(path) as f:
        rec.update(json.load(f))
    if rec["ddp_max_grad_diff"] != 0.0:
        raise AssertionError(f"DDP on one process changed the gradients by {rec['ddp_max_grad_diff']}")
    if not rec["amax_all_reduce_equal"] or not any(rec["amax_local"]):
        raise AssertionError("the amax all-reduce (MAX over every layer's amaxes) did not return the expected maxima")


# ----------------------------------------------------------------------------------------------------
# fixed: FP8 vs bf16 on one fixed batch at the peak LR

def fixed_batch_losses(cfg, tcfg, batch, device, autocast, steps, compiled) -> tuple[list[float], list | None]:
    """The losses of `steps` training steps on `batch`, as the trainer takes them at the peak LR (μP groups, fused
    AdamW, gradients clipped at grad_clip, update_fp8_scales after each backward), from seed 0's init; with FP8
    also each step's range use per role (x, W, dY: fp8.update_scales; above 1 = clipped), else None."""
    import muon
    import mup
    torch.manual_seed(0)
    model = mup.build_model(cfg, device)
    if compiled:
        model.compile_for_training()
    opts = muon.Optimizers(mup.param_groups(model, tcfg.lr, tcfg.emb_lr, tcfg.weight_decay), tcfg, "adamw")
    losses, ranges = [], []
    for _ in range(steps):
        with autocast:
            loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        ranges.append(model.update_fp8_scales())
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opts.step()
        opts.zero_grad()
        losses.append(loss.detach())  # read at the end: no host sync per step
    use = [[round(v, 4) for v in r.tolist()] for r in ranges] if cfg.fp8 else None
    return [float(x) for x in losses], use


# What differs between FP8 runs, tried one at a time on a micro-batch where FP8 does not follow bf16 (the first that
# also follows bf16 names the culprit): compiling, the weight cache, the fused cast, the other GEMM kernel, and the
# delayed scales' lag (margin 1: twice the headroom for a tensor that outgrows its history)
FIXED_BISECT = ("eager", "no_weight_cache", "separate_casts", "other_gemm", "margin_1")


def fixed_run(label, mcfg, n_layer, T, tcfg, batch, device, autocast, args, compile_, row, variant=None):
    """One curve of the fixed section into row["losses"][label] (and its FP8 range use into row["range_use"]),
    compiled where asked (a run that fails to compile is repeated eagerly), under a FIXED_BISECT `variant`."""
    import dataclasses
    over = dict(fp8=label != "bf16")
    if variant == "other_gemm":
        over["fp8_backend"] = other_gemm(mcfg.fp8_backend)
    if variant == "margin_1":
        over["fp8_margin"] = 1
    cfg = dataclasses.replace(mcfg, n_layer=n_layer, max_seq_len=max(mcfg.max_seq_len, T), **over)
    flags = dict(no_weight_cache=dict(WEIGHT_CACHE=False), separate_casts=dict(FUSED_CAST=False)).get(variant, {})
    with fp8_switches(**flags):
        for compiled in ((True, False) if compile_ and variant != "eager" else (False,)):
            try:
                row["losses"][label], use = fixed_batch_losses(cfg, tcfg, batch, device, autocast, args.fixed_steps,
                                                               compiled)
                row[label + "_compiled"] = compiled
                if use:
                    row.setdefault("range_use", {})[label] = use
                return
            except SectionTimeout:
                raise
            except Exception as e:
                row[f"{label}_{'compile_' if compiled else ''}error"] = f"{type(e).__name__}: {e}"[:500]
            finally:
                if compiled:
                    torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def other_gemm(backend: str) -> str:
    return "triton" if backend == "torch" else "torch"


def fixed_section(device, args, rec):
    """FP8 (the config's GEMM) against bf16 on one fixed batch of random tokens per micro-batch size, same init:
    every step within FIXED_BATCH_RTOL, both below FIXED_BATCH_DROP x the first loss at the end, no step more
    than 5% of the first loss above the one before; each FP8 step's range use (x, W, dY; above 1 = clipped).
    Where FP8 fails, the FIXED_BISECT variants run on that micro-batch while the time box lasts."""
    import runtime
    import train
    mcfg, run = shapes_config(device)
    tcfg = train.load_config([os.path.join(ROOT, "configs", "xmodel25.py")])["train"]
    T, cuda = run["seq_len"], device.type == "cuda"
    big = dict(run, micro_batch=max(FIXED_MICRO_BATCHES))
    n_layer = args.layers or (fit_layers(mcfg, big, device) if cuda else mcfg.n_layer)
    compile_ = args.compile == "on" or (args.compile == "auto" and cuda)
    autocast = runtime.autocast(device, args.dtype)
    rec.update(n_layer=n_layer, hidden=mcfg.hidden, seq_len=T, steps=args.fixed_steps, compiled=compile_,
               dtype=args.dtype, lr=tcfg.lr, emb_lr=tcfg.emb_lr, rtol=FIXED_BATCH_RTOL, drop=FIXED_BATCH_DROP,
               other_gemm=other_gemm(mcfg.fp8_backend))
    rows, t0, longest = rec.setdefault("results", []), time.perf_counter(), 0.0

    def timed_run(*a):
        nonlocal longest
        t = time.perf_counter()
        fixed_run(*a)
        longest = max(longest, time.perf_counter() - t)

    for B in FIXED_MICRO_BATCHES:
        batch = torch.randint(0, mcfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(B)).to(device)
        row = dict(micro_batch=B, losses={})
        rows.append(row)
        for label in ("bf16", "fp8"):
            timed_run(label, mcfg, n_layer, T, tcfg, batch, device, autocast, args, compile_, row)
        row.update(judge_fixed(row["losses"]))
        if row["status"] == "ok" or "bf16" not in row["losses"]:
            continue
        bisect = row["bisect"] = {}
        for variant in FIXED_BISECT:
            if time.perf_counter() - t0 + longest > rec["time_box_s"] * 0.95:
                bisect[variant] = "not run: the time box"
                continue
            one = dict(micro_batch=B, losses=dict(bf16=row["losses"]["bf16"]))
            timed_run("fp8", mcfg, n_layer, T, tcfg, batch, device, autocast, args, compile_, one, variant)
            bisect[variant] = dict(judge_fixed(one["losses"]), fp8=one["losses"].get("fp8"),
                                   range_use=one.get("range_use", {}).get("fp8"))
    bad = [r["micro_batch"] for r in rows if r["status"] != "ok"]
    if bad:
        raise AssertionError(f"fixed batch: FP8 does not follow bf16 at micro-batch {bad}: "
                             + "; ".join(r["problem"] for r in rows if r["status"] != "ok"))


def judge_fixed(losses: dict) -> dict:
    """Status and figures of one micro-batch size's bf16 and fp8 loss curves (fixed_section's criteria)."""
    if set(losses) != {"bf16", "fp8"}:
        return dict(status="failed", problem="a run did not finish")
    ref, got = losses["bf16"], losses["fp8"]
    out = dict(max_rel_diff=max(abs(b - a) / abs(a) for a, b in zip(ref, got)),
               final_over_first={k: v[-1] / v[0] for k, v in losses.items()})
    problems = [f"{k} loss not finite" for k, v in losses.items() if not all(map(math.isfinite, v))]
    problems += [f"{k} {v[0]:.3f} -> {v[-1]:.3f} is not below {FIXED_BATCH_DROP} of the first"
                 for k, v in losses.items() if not v[-1] < FIXED_BATCH_DROP * v[0]]
    problems += [f"{k} climbs back at step {i + 1}" for k, v in losses.items() for i in range(len(v) - 1)
                 if v[i + 1] > v[i] + 0.05 * v[0]][:2]
    if not out["max_rel_diff"] <= FIXED_BATCH_RTOL:
        problems.append(f"a step {out['max_rel_diff']:.3g} apart > {FIXED_BATCH_RTOL}")
    return dict(out, status="failed" if problems else "ok", **({"problem": ", ".join(problems)} if problems else {}))


# ----------------------------------------------------------------------------------------------------
# trainer: the real train.py under torchrun, every phase kind, stopped and resumed

# (name, steps, global batch, seq_len, micro_batch): xmodel25's phases shortened to a few steps each; on the
# CPU the same curriculum at tiny lengths. Every phase kind: warmup, stable (the batch doubles), the decay with
# the switch to Muon, the long-context phases (8k, 16k).
TRAINER_PHASES = {"cuda": [("warmup", 3, 8, 3712, 4), ("stable1", 3, 8, 3712, 4), ("stable2", 3, 16, 3712, 4),
                           ("decay", 4, 16, 3712, 4), ("rewarm8k", 1, 4, 8192, 2), ("long8k", 2, 4, 8192, 2),
                           ("long16k", 2, 2, 16384, 1)],
                  "cpu": [("warmup", 2, 4, 32, 2), ("stable1", 2, 4, 32, 2), ("stable2", 2, 8, 32, 2),
                          ("decay", 2, 8, 32, 2), ("rewarm8k", 1, 2, 64, 1), ("long8k", 1, 2, 64, 1),
                          ("long16k", 1, 2, 128, 1)]}
TRAINER_TINY = ["--n_layer=2", "--hidden=64", "--ffn_hidden=160", "--n_head=1", "--n_kv_head=1", "--base_width=32",
                "--compile=False", "--dtype=float32", "--eval_windows=4", "--eval_batch=2"]


def trainer_argv(device, out_dir: str) -> list[str]:
    """`train.py configs/xmodel25.py` on the embedded corpus with the short curriculum, a row per step."""
    argv = ["train.py", "configs/xmodel25.py", f"--out_dir={out_dir}", "--data=None", "--mixtures="
            "{'stable': {'prose': 0.5, 'code': 0.5}, 'decay': {'sft': 0.6687, 'prose': 0.2209, 'code': 0.1104}}",
            "--log_interval=1", "--eval_interval=0", "--ckpt_interval=0", "--keep_checkpoints=1",
            "--sample_tokens=0", f"--device={device.type}"]
    for name, steps, batch, seq_len, mb in TRAINER_PHASES[device.type]:
        argv += [f"--phase.{name}.steps={steps}", f"--phase.{name}.batch={batch}",
                 f"--phase.{name}.seq_len={seq_len}", f"--phase.{name}.micro_batch={mb}"]
    return argv + (TRAINER_TINY if device.type == "cpu" else [])


def trainer_section(device, args, rec):
    """The real trainer, as users launch it (torchrun --standalone --nproc_per_node=1): xmodel25's model (a tiny
    one on the CPU) through every phase kind, once uninterrupted and once stopped by max_steps and resumed.
    Records per-phase tokens/s and MFU from the runs' own metrics, how far the resumed losses are from the
    uninterrupted ones (0 on the CPU; on a GPU, non-deterministic kernels may move the last digits), the
    wall time of each launch and the seconds to read the final checkpoint."""
    import runtime
    total = sum(p[1] for p in TRAINER_PHASES[device.type])
    stop = sum(p[1] for p in TRAINER_PHASES[device.type][:4]) - 2  # two steps before the end of the decay
    launches = {"whole": [], "stopped": [f"--max_steps={stop}"], "resumed": ["--resume"]}
    runs = {}
    for name, extra in launches.items():
        out = os.path.join(os.path.abspath(args.out), "trainer", "whole" if name == "whole" else "split")
        if name != "resumed" and os.path.isdir(out):
            subprocess.run(["rm", "-rf", out], check=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               *trainer_argv(device, out), *extra]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=rec["time_box_s"])
        runs[name] = dict(command=" ".join(cmd[3:]), wall_s=round(time.perf_counter() - t0, 1), out=out)
        if p.returncode != 0:
            raise RuntimeError(f"{name} run exited {p.returncode}: {p.stderr[-1500:]}")
    whole, split = (runtime.read_metrics(os.path.join(runs[k]["out"], "metrics.jsonl")) for k in ("whole", "resumed"))
    loss = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r}  # noqa: E731
    a, b = loss(whole), loss(split)
    if sorted(a) != list(range(1, total + 1)) or sorted(a) != sorted(b):
        raise AssertionError(f"logged steps: uninterrupted {sorted(a)}, stopped and resumed {sorted(b)}")
    rec.update(steps=total, stopped_at=stop, launches=runs,
               resume_max_loss_diff=max(abs(a[s] - b[s]) for s in a), results=phase_rates(whole))
    t0 = time.perf_counter()
    runtime.load_checkpoint(runs["whole"]["out"])
    rec["checkpoint_read_s"] = round(time.perf_counter() - t0, 2)
    if device.type == "cpu" and rec["resume_max_loss_diff"] != 0.0:
        raise AssertionError(f"resumed losses differ from the uninterrupted run's by {rec['resume_max_loss_diff']}")


def phase_rates(rows: list) -> list:
    """Per phase of a run's metrics rows: steps, tokens/s and MFU as medians over its steps after the first
    (the first step of a phase pays for compiling its shapes); with FP8 the largest range use of x, W and dY."""
    out = []
    for name in dict.fromkeys(r["phase"] for r in rows if "loss" in r):
        mine = [r for r in rows if r.get("phase") == name and "loss" in r]
        steady = mine[1:] or mine
        med = lambda k: sorted(r[k] for r in steady)[len(steady) // 2] if k in steady[0] else None  # noqa: E731
        use = [r["fp8_range"] for r in mine if "fp8_range" in r]
        out.append(dict(phase=name, steps=len(mine), seq_len=mine[0]["seq_len"], batch=mine[0]["global_batch"],
                        optimizer=mine[0]["optimizer"], tokens_per_s=med("tokens_per_s"), mfu=med("mfu"),
                        fp8_range={k: max(u[k] for u in use) for k in use[0]} if use else None))
    return out


RUNNERS = {"sm90": sm90, "kernel": kernel, "gemm": gemm, "train": train_section, "ns": ns, "attn": attn_section,
           "dist": dist_section, "fixed": fixed_section, "trainer": trainer_section}


# ----------------------------------------------------------------------------------------------------

def run_section(name, device, args, seconds_left=math.inf) -> dict:
    rec = dict(section=name, status="running", device=str(device), versions=versions(device),
               command=f"python -m tools.gpu_check --out {args.out} --sections {name} --device {device.type}",
               time_box_s=round(min(TIME_BOX[name] * args.time_scale, seconds_left), 1))
    if seconds_left < 5:
        rec.update(status="skipped", seconds=0, error=f"--budget_s left {seconds_left:.0f} s for section {name}")
        return rec

    def on_alarm(signum, frame):
        raise SectionTimeout(f"section {name} exceeded its time box of {rec['time_box_s']} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(rec["time_box_s"])))
    t0 = time.perf_counter()
    try:
        RUNNERS[name](device, args, rec)
        rec["status"] = "ok"
    except (SectionTimeout, subprocess.TimeoutExpired) as e:
        rec.update(status="timeout", error=str(e))
    except Exception as e:
        rec.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="the train section's autocast dtype (FP8 runs use it outside the FP8 GEMMs)")
    p.add_argument("--layers", type=int, default=None, help="train section: layers (default: as many as fit)")
    p.add_argument("--steps", type=int, default=None, help="train section: timed steps after two warm-up steps "
                   "(default 4 on CUDA, 1 on the CPU)")
    p.add_argument("--micro_batches", type=int, default=2, help="train section: micro-batches per optimizer step "
                   "(gradient accumulation: FP8's weight cache is reused from the second on)")
    p.add_argument("--train_runs", default=",".join(TRAIN_RUNS), help="train section: comma-separated runs of "
                   f"{','.join(TRAIN_RUNS)}")
    p.add_argument("--fixed_steps", type=int, default=20, help="fixed section: steps on the fixed batch")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="train and fixed sections: torch.compile the models (auto: on CUDA); a run that fails to "
                   "compile is measured again eagerly")
    p.add_argument("--time_scale", type=float, default=1.0, help="multiplies every section's time box")
    p.add_argument("--budget_s", type=float, default=540, help="seconds for the whole check: a section gets "
                   "at most what is left, and one that would get under 5 s is skipped (a shared GPU machine's command "
                   "limit is 600 s; the report is written before it)")
    p.add_argument("--dist_worker", action="store_true", help=argparse.SUPPRESS)  # internal: under torchrun
    args = p.parse_args(argv)
    if args.dist_worker:
        return dist_worker(args)
    unknown = set(args.train_runs.split(",")) - set(TRAIN_RUNS)
    if unknown or args.micro_batches < 1:
        raise ValueError(f"--train_runs: unknown {sorted(unknown)}; choose from {','.join(TRAIN_RUNS)}" if unknown
                         else f"--micro_batches must be >= 1, got {args.micro_batches}")
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    import runtime
    dev, args.dtype = runtime.resolve_machine(args.device, args.dtype)
    if dev not in ("cuda", "cpu"):
        raise ValueError(f"gpu_check runs on cuda or cpu, got {dev}")
    device = torch.device(dev)
    args.steps = args.steps or (4 if device.type == "cuda" else 1)
    if device.type == "cpu":  # the Triton kernel on CPU tensors: the interpreter, set before it is built
        os.environ["TRITON_INTERPRET"] = "1"
    os.makedirs(args.out, exist_ok=True)
    report = dict(device=str(device), versions=versions(device), command="python -m tools.gpu_check " + " ".join(argv),
                  sections=[])
    deadline = time.perf_counter() + args.budget_s
    for name in sections:
        print(f"[gpu_check] {name} ...", flush=True)
        rec = run_section(name, device, args, deadline - time.perf_counter())
        report["sections"].append(rec)
        gpu_report.write(report, args.out)
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']} s  {gpu_report.summary(rec)[:300]}"
              + (f"\n  {rec['error'][:500]}" if rec.get("error") else ""), flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
