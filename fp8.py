"""FP8 hybrid mixed precision with delayed scaling: the linear layers of the blocks in 8-bit floats.

Xmodel-2.5 trains the linear layers of its transformer blocks in FP8 with Transformer Engine's
"hybrid" recipe and reports about +30% training throughput with no observable accuracy loss
(RECIPE.md, "FP8 mixed precision"). This module is that recipe, from scratch, in one file.

The two 8-bit formats (the "hybrid" part)
    E4M3 (torch.float8_e4m3fn): 4 exponent bits, 3 mantissa bits, max 448, smallest normal 2^-6.
        Relative rounding error <= 2^-4. More precision, little range: used for the FORWARD
        tensors, the activations x and the weights W.
    E5M2 (torch.float8_e5m2):   5 exponent bits, 2 mantissa bits, max 57344, smallest normal 2^-14.
        Relative rounding error <= 2^-3. More range, less precision: used for the GRADIENTS dY,
        whose magnitudes spread over many more octaves than activations do.

Per-tensor scaling
    Eight bits cover only a narrow window of magnitudes, so every tensor is multiplied by a scale s
    before the cast so that its largest value lands near the format's maximum:
        q = saturate(x * s) = clamp(x * s, -fp8_max, fp8_max).to(fp8)
    and a GEMM of two quantized operands undoes both scales on its fp32 accumulator:
        C = (q_a @ q_b) / (s_a * s_b)          (every product of two fp8 numbers is exact in fp32)
    Saturating instead of overflowing means an outlier larger than expected is clipped to +-max,
    never turned into inf/nan.

Delayed scaling (Transformer Engine's DelayedScaling, algorithm "max", margin 0)
    The "right" scale is fp8_max / amax(x), but computing amax(x) before quantizing x costs an extra
    pass over the tensor and a synchronisation. Delayed scaling uses the PAST instead: each linear
    layer keeps, for each of its three tensor roles (input, weight, grad_output), a history of the
    last `history_len` (128) amaxes, and
        scale_{t+1} = fp8_max / max(amax_history) / 2^margin.
    The amax observed at step t is pushed into the history and sets the scale of step t+1; step t
    itself is quantized with the scale computed at step t-1 (the first step, with an empty history, scales
    just in time by its own amax: step_scale says why, and where this departs from Transformer Engine). A zero
    or non-finite amax (an all-zero batch, an overflowed gradient) is not pushed and leaves the
    scale unchanged. The history and the scales are registered buffers: they live in the state_dict
    and a resumed run continues bit-exactly.

    What is a "step"? One forward and backward of a training micro-batch (Transformer Engine's
    behaviour without grouping micro-batches), so the 128-entry window spans 128 micro-batches.
    A training forward (module in training mode, autograd on) and its backward only RECORD their
    amaxes (FP8Linear.pending_amax); `update_scales(layers)`, called once after each backward
    (Xmodel.update_fp8_scales; the trainer does), pushes them all into the histories and sets the
    scales of the next micro-batch. Under torch.distributed that is also where the amaxes are
    all-reduced with MAX, so every data-parallel rank quantizes with the same scales: one collective
    per micro-batch for all the layers (Transformer Engine's global amax reduction) instead of two
    per layer (672 latency-bound all-reduces per micro-batch at 1.3B), and none inside the compiled
    blocks. Deferring changes no number (nothing reads a layer's new scale before its backward is
    done), and it makes activation recomputation exact: a block re-run in backward quantizes with
    the scales its first forward used and records the same amaxes again. Modules in eval mode, and
    forwards without autograd (sampling), quantize with their current scales and record nothing.

The FP8 linear layer (FP8Linear), y = x W^T, and its backward:
    forward   y  = x   @ W^T   q(x) E4M3  x  q(W) E4M3
    backward  dX = dY  @ W     q(dY) E5M2 x  q(W) E4M3
              dW = dY^T @ x    q(dY) E5M2 x  q(x) E4M3
    Only the 1-byte quantized x and W (their transposed copies where a kernel runs the GEMMs) are saved for
    backward (half the memory of bf16). The master
    weight stays in its own (higher) precision; only its quantized copy enters the GEMMs, and
    dW is returned in the weight's dtype. That copy (and its transpose and amax) is made once per
    optimizer step and reused by every micro-batch of the step ("The weight cache" below): the same
    numbers as quantizing it in every forward, since its amax is still recorded every micro-batch and
    the copy is cast again whenever the weight's delayed scale moves.

The GEMM (fp8_matmul)
    A Triton kernel: tiles of a and b are loaded as fp8, tl.dot accumulates in fp32 on the tensor
    cores (Ada/Hopper, compute capability >= 8.9; older GPUs have no fp8 tensor cores and are
    refused), the epilogue divides by both scales and casts to bf16/fp32. It takes strides, so a
    transposed view is a valid operand without a copy. Hopper's fp8 wgmma, however, reads both
    operands from shared memory only in "K-major" layout: the reduction dimension K must be the
    contiguous one, i.e. a [M, K] row-major and b [K, N] column-major (b^T contiguous). The forward
    x @ W^T is K-major as stored; the two backward GEMMs are not (dY @ W reduces over W's rows,
    dY^T @ x reduces over the token dimension of both), so they read transposed copies q(x)^T, q(W)^T
    and q(dY)^T, which the fused cast writes in the same pass as q and the amax (cast_transpose, a
    Triton kernel like Transformer Engine's cast+transpose: one read of the tensor instead of three).
    On the CPU the same scaling logic runs with an emulated GEMM (dequantize to fp32, matmul): the
    same numbers up to fp32 accumulation order.

Accumulation (Transformer Engine's "split accumulator")
    Hopper's fp8 wgmma does not add its products into a true fp32 accumulator: it keeps fewer mantissa
    bits (DeepSeek-V3 measured ~14 on H800; relative errors near 2% for K = 4096). Triton calls that
    "imprecise accumulation" and does it for the whole K loop by default on sm_90, cuBLASLt when asked for
    fast accumulation. The remedy is to add each block of BLOCK_K (64-128) products into a separate fp32
    accumulator (Triton's max_num_imprecise_acc = BLOCK_K, DeepSeek-V3's "promotion" every 128 products,
    cuBLASLt's default): a few fp32 adds per tile. Transformer Engine, whose recipe the paper uses, keeps
    fast accumulation for the forward (K = the layer's input width, 1536-3840 here) and splits it for the
    two backward GEMMs (dgrad; wgrad, whose K is every token of the micro-batch, 14,848 and more), and so
    does FP8Linear (fast_accum=True for y only). Ada GPUs and the CPU accumulate in fp32 either way.

Two GEMM kernels (FP8Linear(gemm=...), the model's `fp8_backend`), same quantization and delayed scaling:
"torch" = torch._scaled_mm (cuBLASLt on CUDA, the faster on an H200; torch also has a CPU kernel), which
takes dequantization scales 1/s_a, 1/s_b, K-major operands and K, N in multiples of 16 (a GEMM that has not
goes to Triton); "triton" = fp8_matmul above, a torch custom op that torch.compile calls whole.
Where they run (module-level BACKEND): "auto" = the chosen kernel on CUDA with capability >= 8.9, a
RuntimeError on older CUDA GPUs, emulation on the CPU; "emulate" = always the emulated GEMM; "kernel" =
always the chosen kernel, which for "triton" on CPU tensors needs the Triton interpreter
(TRITON_INTERPRET=1; used by the tests). Triton is imported lazily, so CPU-only runs never import it.

`python -m tools.bench fp8 configs/xmodel25.py` reports FP8 vs bf16 GEMM TFLOP/s at the 1.3B model's layer
shapes (CUDA), and `python -m tools.gpu_check` checks kernel, GEMMs and FP8 training on a GPU.
"""

import itertools
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}

BACKEND = "auto"  # "auto" | "kernel" | "emulate": where the GEMM runs (see the module docstring)
BACKENDS = ("auto", "kernel", "emulate")
GEMMS = ("triton", "torch")  # which kernel: the Triton one here, or torch._scaled_mm
# Where a GEMM kernel runs, quantize with the fused cast kernel (cast_transpose); False: the separate torch ops
# (amax, quantize, transposed copy), the same bytes, kept to measure one against the other (tools.gpu_check)
FUSED_CAST = True

# tensor roles: the rows of FP8Linear.amax_history and the entries of FP8Linear.scale
INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2
ROLE_FORMAT = (E4M3, E4M3, E5M2)


# ----------------------------------------------------------------------------------------------
# Quantization (plain torch ops, so torch.compile can fuse scale, clamp, cast and amax)

def amax(x):
    """amax(x) = max |x_i|, as a 0-d fp32 tensor (no host sync; nan if x holds a nan)."""
    return x.detach().abs().amax().float()


def quantize(x, scale, dtype):
    """q = clamp(x * scale, -fp8_max, fp8_max) cast to the fp8 `dtype` (round to nearest even).

    The product is formed in fp32; saturating first turns values beyond the format (inf too) into
    +-fp8_max instead of inf/nan."""
    if dtype not in FP8_MAX:
        raise ValueError(f"quantize: dtype must be {E4M3} or {E5M2}, got {dtype}")
    fp8_max = FP8_MAX[dtype]
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)


def dequantize(q, scale):
    """x ~= q / scale, in fp32."""
    return q.float() / scale


# ----------------------------------------------------------------------------------------------
# Delayed scaling

def _all_reduce_max(t):
    """Under torch.distributed (initialized, world > 1), t <- max over ranks, in place."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def update_delayed_scale(history, scale, new_amax, fp8_max, margin=0):
    """Push the amax of this step into `history` (newest first) and set
    scale = fp8_max / max(history) / 2^margin, in place and without a host sync.

    Batched: history [..., H], scale and new_amax [...], fp8_max a number or a tensor that broadcasts to
    scale's shape, margin a number. A zero or non-finite amax changes nothing (that history and scale are
    kept), and so does a scale that would not be finite (amax so small that fp8_max / amax overflows)."""
    new_amax = new_amax.to(history.dtype)
    pushed = torch.cat([new_amax.unsqueeze(-1), history[..., :-1]], -1)
    # a true fp32 division, as Transformer Engine's: `fp8_max / tensor` is torch's reciprocal(tensor) * fp8_max,
    # two roundings, 1 ulp off fp8_max / amax for some amaxes
    window_max = pushed.amax(-1)
    fp8_max = fp8_max if torch.is_tensor(fp8_max) else torch.full_like(window_max, fp8_max)  # not a host copy
    new_scale = fp8_max / window_max / 2.0 ** margin
    ok = torch.isfinite(new_amax) & (new_amax > 0) & torch.isfinite(new_scale)
    history.copy_(torch.where(ok.unsqueeze(-1), pushed, history))
    scale.copy_(torch.where(ok, new_scale, scale))


def step_scale(scale, history, amax_now, fp8_max, margin=0):
    """A training micro-batch's scale for a tensor: the delayed `scale` once its `history` [H] holds an amax;
    before that (a fresh run's first micro-batch) fp8_max / amax_now / 2^margin, from the tensor's own amax. Not
    Transformer Engine's initial 1.0: at 1.3B the first output gradients (~1e-6) lie below E5M2's smallest
    subnormal (2^-16), so every FP8 weight gradient of the first step would be 0 (seen on an H200). Ranks
    each use their own amax for this one micro-batch; the all-reduced histories agree from then on."""
    jit = torch.full_like(amax_now, fp8_max) / amax_now.clamp_min(1e-30) / 2.0 ** margin  # 0 amax: finite
    return torch.where(history[0] > 0, scale, jit)


def update_scales(layers):
    """The delayed-scaling step of every FP8Linear in `layers`, after a micro-batch's backward: the amaxes they
    recorded are all-reduced with MAX across ranks in ONE collective, pushed into their histories, their
    scales recomputed (update_delayed_scale), and the records cleared. A layer that recorded nothing (no
    training forward since the last call) keeps its state. Consecutive layers of the same history length and
    margin (a model's are all alike) make one batched update; no step of it waits for the device.

    Returns the micro-batch's range use per role (INPUT, WEIGHT, GRAD_OUTPUT), a [3] device tensor (None without
    layers): the largest amax x scale / fp8_max over the layers, with the scale the micro-batch was quantized
    with. Delayed scaling keeps it <= 1 while tensors do not outgrow their history; above 1 the largest values
    were saturated (clipped to +-fp8_max) by up to that factor. A layer scaled just in time counts 1."""
    layers = list(layers)
    if not layers:
        return None
    pending = [m.pending_amax for m in layers]
    amaxes = _all_reduce_max(torch.stack(pending))
    start, use = 0, []
    for (_, margin), run in itertools.groupby(layers, key=lambda m: (m.amax_history.shape, m.margin)):
        run = list(run)
        histories, scales = [m.amax_history for m in run], [m.scale for m in run]
        history, scale = torch.stack(histories), torch.stack(scales)  # [n, 3, H], [n, 3]
        fp8_max = torch.full_like(scale, FP8_MAX[E4M3])  # filled on the device: a host->GPU copy would sync
        fp8_max[:, GRAD_OUTPUT] = FP8_MAX[E5M2]
        amax_run = amaxes[start:start + len(run)]
        use.append(torch.where(history[..., 0] > 0, amax_run * scale / fp8_max, (amax_run > 0).float()))
        update_delayed_scale(history, scale, amax_run, fp8_max, margin)
        torch._foreach_copy_(histories, history.unbind(0))
        torch._foreach_copy_(scales, scale.unbind(0))
        start += len(run)
    torch._foreach_zero_(pending)
    return torch.cat(use).amax(0)


# ----------------------------------------------------------------------------------------------
# The Triton GEMM (built lazily: importing this module never imports Triton)

def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Hopper (H100) configurations for fp8 (the tensor-core K step of fp8 wgmma is 32, so BLOCK_K >= 32;
# 128x128 or 128x256 tiles with BLOCK_K 128 keep the 4th-gen tensor cores busy, 3-4 pipeline stages
# hide the global-memory latency, 8 warps = 2 warpgroups). The autotuner skips those whose accumulator
# would spill (accumulator_fits): with the split accumulator the largest tile is 128x128 on 8 warps.
H100_CONFIGS = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
    (128, 256, 128, 8, 8, 3),
    (256, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
    (64, 128, 128, 8, 4, 4),
    (128, 64, 128, 8, 4, 4),
    (64, 64, 128, 8, 4, 5),
]


def accumulator_fits(block_m, block_n, num_warps, fast_accum):
    """Whether a tile's fp32 accumulator stays in registers: BLOCK_M x BLOCK_N / (32 num_warps) values per
    thread, twice that with the split accumulator; past 128 of a thread's 255 registers ptxas spills
    (seen compiling for sm_90a: 128x256 and 8 warps spills with the split accumulator, not without)."""
    return block_m * block_n // (32 * num_warps) * (1 if fast_accum else 2) <= 128


# The interpreter runs one program at a time in numpy: one tiny tile, no autotuning sweep.
_INTERPRET_CONFIG = (16, 16, 32, 2, 1, 1)

_KERNELS = {}  # interpret? -> launchable kernel


def build_kernel(interpret):
    """The autotuned Triton FP8 GEMM (its .fn is the kernel itself): H100_CONFIGS for the GPU, one tiny
    tile for the interpreter. Whether Triton interprets it is decided by TRITON_INTERPRET at this call."""
    import triton
    import triton.language as tl

    def fp8_matmul_kernel(a_ptr, b_ptr, c_ptr, scale_a_ptr, scale_b_ptr, M, N, K,
                          stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, OUT_BF16: tl.constexpr, FAST_ACCUM: tl.constexpr):
        # Only builtins here (no tl.cdiv / tl.zeros): those are @triton.jit helpers bound when Triton
        # is imported, so if Triton was imported before TRITON_INTERPRET=1 was set (another test
        # file, torch._inductor) the interpreter could not call them; builtins work either way.
        # Grouped launch order: GROUP_M consecutive row-tiles share the same b column-tiles, so
        # those stay in L2 while the group sweeps them.
        pid = tl.program_id(0)
        num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
        num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
        pid_n = (pid % num_pid_in_group) // group_size_m

        # int64 offsets: M * stride can pass 2^31 for long token batches
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
            k_left = K - k * BLOCK_K
            # masked lanes load 0, which adds nothing to the dot product
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
            # Hopper: FAST_ACCUM keeps the whole K loop in the tensor cores' own accumulator; else every
            # BLOCK_K products are added into a true fp32 one (the split accumulator, docstring)
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=None if FAST_ACCUM else BLOCK_K, out_dtype=tl.float32)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        # epilogue: undo both quantization scales on the fp32 accumulator, then cast
        c = acc / tl.load(scale_a_ptr) / tl.load(scale_b_ptr)
        if OUT_BF16:
            # Round to nearest even by hand (add 0x7FFF plus the lowest kept bit, keep the high 16
            # bits): bit-identical to torch's .to(bfloat16) on every backend; the Triton
            # interpreter's own float32 -> bfloat16 cast truncates. A few integer ops per output.
            bits = c.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            c = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, c, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    def config(bm, bn, bk, gm, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                             num_warps=warps, num_stages=stages)

    def prune(configs, named_args, **kwargs):
        return [c for c in configs if accumulator_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                       kwargs["FAST_ACCUM"])]

    configs = [config(*_INTERPRET_CONFIG)] if interpret else [config(*c) for c in H100_CONFIGS]
    # the K-contiguity of the operands (stride_ak, stride_bk) changes which tile is fastest
    return triton.autotune(configs=configs, key=["M", "N", "K", "stride_ak", "stride_bk", "FAST_ACCUM"],
                           prune_configs_by={"early_config_prune": prune})(triton.jit(fp8_matmul_kernel))


def _check_cuda_capability(device):
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise RuntimeError(
            f"fp8: {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; FP8 tensor "
            "cores need Ada or Hopper (>= 8.9). Train without fp8 on this GPU (config fp8=False).")


def _check_operands(who, a, b, scale_a, scale_b, out_dtype):
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in FP8_MAX:
            raise ValueError(f"{who}: {name} must be float8_e4m3fn or float8_e5m2, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{who}: {name} must be 2-D, got shape {tuple(t.shape)}")
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if not torch.is_tensor(s) or s.numel() != 1 or s.dtype != torch.float32:
            raise ValueError(f"{who}: {name} must be a one-element fp32 tensor")
        if s.device != a.device:
            raise ValueError(f"{who}: {name} is on {s.device}, a on {a.device}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{who}: inner dimensions differ, a {tuple(a.shape)} @ b {tuple(b.shape)}")
    if b.device != a.device:
        raise ValueError(f"{who}: a is on {a.device}, b on {b.device}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"{who}: out_dtype must be torch.bfloat16 or torch.float32, got {out_dtype}")


def fp8_matmul(a, b, scale_a, scale_b, out_dtype=torch.bfloat16, fast_accum=False):
    """C = (a @ b) / (scale_a * scale_b) with the Triton kernel, accumulated in fp32 (on Hopper, with
    fast_accum, in the tensor cores' own accumulator: see "Accumulation" in the module docstring).

    a [M, K] and b [K, N] are float8_e4m3fn or float8_e5m2 tensors (any pair), with any strides
    (transposed views are fine; on Hopper K-contiguous operands are fastest, see the docstring);
    scale_a, scale_b are the 0-d fp32 scales the operands were quantized with; out_dtype is
    torch.bfloat16 or torch.float32. CUDA (capability >= 8.9) or, under TRITON_INTERPRET=1, CPU."""
    _check_operands("fp8_matmul", a, b, scale_a, scale_b, out_dtype)
    interpret = _interpreting()
    if a.device.type == "cuda":
        _check_cuda_capability(a.device)
    elif not interpret:
        raise RuntimeError(f"fp8_matmul: tensors on {a.device}; the Triton kernel needs CUDA, "
                           "or TRITON_INTERPRET=1 to run on the CPU")
    return _triton_fp8_mm(a, b, scale_a.reshape(()), scale_b.reshape(()), out_dtype, bool(fast_accum))


# A custom op, so that torch.compile calls the kernel as one opaque function instead of tracing into Triton's
# autotuner (which Dynamo of torch 2.11 fails on: "ListVariable ... is already tracked for mutation", seen on
# an H200); register_fake gives the compiler the output's shape and dtype.
@torch.library.custom_op("xmodel::fp8_matmul", mutates_args=())
def _triton_fp8_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                   out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    interpret = _interpreting()
    if interpret not in _KERNELS:
        _KERNELS[interpret] = build_kernel(interpret)
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    grid = lambda meta: (math.ceil(M / meta["BLOCK_M"]) * math.ceil(N / meta["BLOCK_N"]),)
    _KERNELS[interpret][grid](a, b, c, scale_a, scale_b, M, N, K,
                              a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                              OUT_BF16=out_dtype == torch.bfloat16, FAST_ACCUM=fast_accum)
    return c


@_triton_fp8_mm.register_fake
def _(a, b, scale_a, scale_b, out_dtype, fast_accum):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def torch_fp8_matmul(a, b, scale_a, scale_b, out_dtype=torch.bfloat16, fast_accum=False):
    """The same product as fp8_matmul with torch._scaled_mm (cuBLASLt on CUDA, torch's own kernel on the
    CPU). _scaled_mm multiplies by dequantization scales, so it gets 1/scale_a and 1/scale_b. On CUDA it
    needs a row-major and b column-major (K-major, as FP8Linear feeds them), sizes that are multiples
    of 16, and not both operands E5M2; torch raises its own error otherwise."""
    _check_operands("torch_fp8_matmul", a, b, scale_a, scale_b, out_dtype)
    if a.device.type == "cuda":
        _check_cuda_capability(a.device)
    one = torch.ones((), dtype=torch.float32, device=a.device)
    return torch._scaled_mm(a, b, scale_a=one / scale_a.reshape(()), scale_b=one / scale_b.reshape(()),
                            out_dtype=out_dtype, use_fast_accum=bool(fast_accum))


# ----------------------------------------------------------------------------------------------
# The fused cast: one pass over a tensor writes its FP8 copy, its transposed FP8 copy and its amax
#
# Quantizing with separate ops reads a tensor for its amax, again for the cast, and reads the FP8 copy once
# more for the K-major transpose a backward GEMM needs: three passes and three kernel launches where one
# suffices (Transformer Engine's cast+transpose). The kernel below loads a tile of x once, reduces its
# |max| into one partial per tile, casts it and stores the tile twice, at [m, n] and at [n, m]. The
# delayed scale is known before the pass (the amax it records sets the NEXT scale), so nothing waits.
#
# Its rounding is done by hand so that the bytes are torch's on every backend: v = clamp(x * s) is rounded
# to the fp8 grid in fp32 (the grid step of v's binade, 2^(max(e, e_min) - mantissa bits), by the 2^23
# round-to-nearest-even trick) and the fp8 code is assembled from the rounded mantissa and exponent. (The
# Triton 3.9 interpreter's own fp32 -> fp8 cast loses the carry into the exponent: 7.93 -> 4.0 in e4m3.)

CAST_TILE = (64, 64, 4)  # BLOCK_M, BLOCK_N, num_warps of the cast on the GPU: 4 KB of fp8 out per tile
_INTERPRET_CAST_TILE = (16, 32, 1)  # small, so that the tests' odd shapes cover ragged tiles both ways
FORMAT_BITS = {E4M3: (-6, 3), E5M2: (-14, 2)}  # (smallest normal exponent, mantissa bits)
# when a launch leaves the tensor alone (each program reads one or two scalars first): never; when the
# history already holds an amax (the just-in-time amax of a fresh layer, step_scale); when the scale equals
# the one the cached copy was made with (the weight cache: FP8Linear.refresh_fp8_weight)
SKIP_NEVER, SKIP_IF_CALIBRATED, SKIP_IF_SAME_SCALE = 0, 1, 2

_CAST_KERNELS = {}  # interpret? -> kernel


def build_cast_kernel(interpret):
    """The fused cast kernel (one program per tile of x [M, N]; see the section comment). The scale is
    *scale_ptr, or with STEP_SCALE step_scale's (the delayed scale, or fp8_max / amax / 2^margin while the
    history at hist_ptr is empty), which a SKIP_IF_SAME_SCALE launch also writes to scale_out_ptr."""
    import triton
    import triton.language as tl

    def fp8_cast_transpose_kernel(x_ptr, q_ptr, t_ptr, amax_ptr, scale_ptr, hist_ptr, amax_in_ptr, ref_ptr,
                                  scale_out_ptr, M, N, stride_xm, stride_xn, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, FP8_MAX: tl.constexpr, E_MIN: tl.constexpr,
                                  MANT: tl.constexpr, INV_MARGIN: tl.constexpr, STEP_SCALE: tl.constexpr,
                                  SKIP: tl.constexpr, CAST: tl.constexpr, TRANSPOSE: tl.constexpr,
                                  AMAX: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        s = tl.load(scale_ptr)
        if STEP_SCALE:  # as step_scale: a true division (div_rn, as torch's), a nan amax kept by the clamp
            w_amax = tl.load(amax_in_ptr)  # (a name of its own: the compiler types each name once, across an `if`)
            jit = tl.math.div_rn(tl.full((), FP8_MAX, tl.float32),
                                 tl.where(w_amax != w_amax, w_amax, tl.maximum(w_amax, 1e-30)))
            s = tl.where(tl.load(hist_ptr) > 0, s, jit * INV_MARGIN)
        run = True
        if SKIP == 1:
            run = tl.load(hist_ptr) == 0.0
            if AMAX:  # a skipped tile leaves 0, which takes nothing from the max
                tl.store(amax_ptr + pid_m * tl.num_programs(1) + pid_n, 0.0)
        if SKIP == 2:
            tl.store(scale_out_ptr, s, mask=(pid_m == 0) & (pid_n == 0))
            run = s != tl.load(ref_ptr)
        if run:
            offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
            x = x.to(tl.float32)
            if AMAX:  # over the bits of |x|: ordered as the values, and a nan above inf (torch's amax keeps a nan)
                bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
                # tl.max's combine function, not tl.max: that is a jit helper bound when Triton is imported, which
                # the interpreter cannot call if that was without TRITON_INTERPRET; this one it reduces with numpy
                tile_max = tl.reduce(bits, None, tl.standard._elementwise_max)
                tl.store(amax_ptr + pid_m * tl.num_programs(1) + pid_n, tile_max.to(tl.float32, bitcast=True))
            if CAST:
                v = x * s
                nan = v != v
                a = tl.minimum(tl.where(nan, 0.0, tl.abs(v)), FP8_MAX)  # saturate (inf too)
                e = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 127, E_MIN)  # binade; subnormals share E_MIN's
                step_inv = ((MANT + 127 - e) << 23).to(tl.float32, bitcast=True)  # 1 / grid step, a power of 2
                r = (a * step_inv + 8388608.0) - 8388608.0  # round half to even to an integer (exact: r < 2^23)
                code = r.to(tl.int32) + ((e - E_MIN) << MANT)  # a carry into the next binade is a carry here too
                code = tl.where(nan, 0x7F, code) | ((v.to(tl.int32, bitcast=True) >> 24) & 0x80)  # nan; sign
                code = code.to(tl.uint8)
                tl.store(q_ptr + offs_m[:, None] * N + offs_n[None, :], code, mask=mask)
                if TRANSPOSE:  # the same tile at [n, m]: the compiler stages it through shared memory
                    tl.store(t_ptr + offs_n[None, :] * M + offs_m[:, None], code, mask=mask)

    return triton.jit(fp8_cast_transpose_kernel)


def _cast_tile():
    return _INTERPRET_CAST_TILE if _interpreting() else CAST_TILE


def _cast_grid(M, N):
    bm, bn, _ = _cast_tile()
    return (M + bm - 1) // bm, (N + bn - 1) // bn


def _launch_cast(x, scale, skip_mode, q=None, t=None, amax_parts=None, history=None, amax_in=None, ref=None,
                 scale_out=None, margin=0, direct=False):
    """Launch the fused cast kernel on x [M, N] with *scale: the cast into q (and t) where given, the per-tile
    amaxes into amax_parts where given; history and amax_in (step_scale in the kernel), ref and scale_out as
    the kernel's SKIP and STEP_SCALE modes read them. Pointers a mode does not read get `scale`. direct: from a
    torch.library.triton_op (wrap_triton: compiled code launches the kernel itself, DIRECT_LAUNCH)."""
    interpret = _interpreting()
    if interpret not in _CAST_KERNELS:
        _CAST_KERNELS[interpret] = build_cast_kernel(interpret)
    M, N = x.shape
    if M == 0 or N == 0:
        return
    bm, bn, warps = _cast_tile()
    e_min, mant = FORMAT_BITS[q.dtype if q is not None else E4M3]
    fmt_max = FP8_MAX[q.dtype if q is not None else E4M3]
    ptr = lambda t_, as_bytes=False: scale if t_ is None else (t_.view(torch.uint8) if as_bytes else t_)  # noqa: E731
    kernel = _CAST_KERNELS[interpret]
    if direct and not interpret:  # for tracing only (compiled code on CUDA launches it itself): eager calls it as is
        kernel = torch.library.wrap_triton(kernel)
    kernel[_cast_grid(M, N)](
        x, ptr(q, True), ptr(t, True), ptr(amax_parts), scale, ptr(history), ptr(amax_in), ptr(ref), ptr(scale_out),
        M, N, x.stride(0), x.stride(1), BLOCK_M=bm, BLOCK_N=bn, FP8_MAX=fmt_max, E_MIN=e_min, MANT=mant,
        INV_MARGIN=2.0 ** -margin, STEP_SCALE=amax_in is not None, SKIP=skip_mode, CAST=q is not None,
        TRANSPOSE=t is not None, AMAX=amax_parts is not None, num_warps=warps)


def _amax_partials(x):
    """The per-tile amaxes a launch fills (every tile writes its own: no fill kernel); one 0 for an empty x."""
    gm, gn = _cast_grid(*x.shape)
    if gm * gn == 0:
        return torch.zeros(1, device=x.device, dtype=torch.float32)
    return torch.empty(gm * gn, device=x.device, dtype=torch.float32)


# Custom ops, as the GEMM: torch.compile calls each launch whole (register_fake gives it the shapes). Each is a
# Python call on the host per launch (dispatch, then Triton's launcher), ~960 per micro-batch at 1.3B; with
# DIRECT_LAUNCH the same kernels go through triton_op twins instead, which Inductor launches from its compiled
# code itself (CUDA; the GPU check's train section measures fp8_torch_direct against fp8_torch)
DIRECT_LAUNCH = False


def _cast_launch(x, scale, dtype, transpose, direct):
    M, N = x.shape
    q = torch.empty((M, N), device=x.device, dtype=dtype)
    t = torch.empty((N, M) if transpose else (0, 0), device=x.device, dtype=dtype)
    amax_parts = _amax_partials(x)
    _launch_cast(x, scale, SKIP_NEVER, q=q, t=t if transpose else None, amax_parts=amax_parts, direct=direct)
    return q, t, amax_parts


def _jit_amax_launch(x, history, direct):
    amax_parts = _amax_partials(x)
    _launch_cast(x, history, SKIP_IF_CALIBRATED, amax_parts=amax_parts, history=history, direct=direct)
    return amax_parts


@torch.library.custom_op("xmodel::fp8_cast_transpose", mutates_args=())
def _triton_cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 transpose: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cast_launch(x, scale, dtype, transpose, False)


@_triton_cast.register_fake
def _(x, scale, dtype, transpose):
    M, N = x.shape
    gm, gn = _cast_grid(M, N)
    return (x.new_empty((M, N), dtype=dtype), x.new_empty((N, M) if transpose else (0, 0), dtype=dtype),
            x.new_empty((max(1, gm * gn),), dtype=torch.float32))


@torch.library.custom_op("xmodel::fp8_amax_if_uncalibrated", mutates_args=())
def _triton_jit_amax(x: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    return _jit_amax_launch(x, history, False)


@_triton_jit_amax.register_fake
def _(x, history):
    gm, gn = _cast_grid(*x.shape)
    return x.new_empty((max(1, gm * gn),), dtype=torch.float32)


@torch.library.triton_op("xmodel::fp8_cast_transpose_direct", mutates_args=())
def _direct_cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 transpose: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cast_launch(x, scale, dtype, transpose, True)


@torch.library.triton_op("xmodel::fp8_amax_if_uncalibrated_direct", mutates_args=())
def _direct_jit_amax(x: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    return _jit_amax_launch(x, history, True)


def _cast_ops():
    """(cast, just-in-time amax): the custom ops, or their triton_op twins with DIRECT_LAUNCH."""
    return (_direct_cast, _direct_jit_amax) if DIRECT_LAUNCH else (_triton_cast, _triton_jit_amax)


def cast_transpose(x, scale, dtype, transpose=True, kernel=None):
    """One pass over x [M, N] (bf16 or fp32): (q, t, amax) with q = quantize(x, scale, dtype) [M, N], its
    transpose t = q^T [N, M] as a contiguous copy (transpose=True; else the view q.t()) and amax = amax(x).
    kernel: the fused Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1) or the same ops in torch
    (False); None = the kernel where it runs. The two give the same bytes and the same amax."""
    if dtype not in FP8_MAX:
        raise ValueError(f"cast_transpose: dtype must be {E4M3} or {E5M2}, got {dtype}")
    if x.dim() != 2:
        raise ValueError(f"cast_transpose: x must be 2-D, got shape {tuple(x.shape)}")
    if kernel is None:
        kernel = x.device.type == "cuda" or _interpreting()
    if not kernel:
        q = quantize(x, scale, dtype)
        return q, q.t().contiguous() if transpose else q.t(), amax(x)
    q, t, amax_parts = _cast_ops()[0](x, scale.reshape(()).float(), dtype, transpose)
    return q, t if transpose else q.t(), amax_parts.amax()


def scaled_cast(x, scale, history, dtype, margin, jit, transpose, kernel, want_amax=None):
    """x [M, N] quantized for this micro-batch: (q, t, amax(x) or None, the scale used), t as in cast_transpose.
    jit: the training scale, step_scale (a fresh history scales by x's own amax); else `scale` as it is, and
    no amax unless want_amax (the separate ops would read x once more for it; the kernel has it for free).
    With the kernel the just-in-time amax must be known before the cast, so a first pass computes it only
    while the history is empty: once it holds an amax, that launch reads one number per tile and exits."""
    fp8_max = FP8_MAX[dtype]
    want_amax = jit if want_amax is None else want_amax
    if not kernel:
        a = amax(x) if jit or want_amax else None
        s = step_scale(scale, history, a, fp8_max, margin) if jit else scale.clone()
        q = quantize(x, s, dtype)
        return q, q.t().contiguous() if transpose else q.t(), a, s
    cast, jit_amax = _cast_ops()
    s = step_scale(scale, history, jit_amax(x, history).amax(), fp8_max, margin) if jit else scale.clone()
    q, t, amax_parts = cast(x, s, dtype, transpose)
    return q, t if transpose else q.t(), amax_parts.amax() if want_amax else None, s


# ----------------------------------------------------------------------------------------------
# Backend choice and the GEMM used by FP8Linear

def resolve_backend(device, gemm="triton"):
    """'triton', 'torch' or 'emulate' for tensors on `device` and the kernel `gemm`, following BACKEND
    (module docstring)."""
    if BACKEND not in BACKENDS:
        raise ValueError(f"fp8.BACKEND must be one of {BACKENDS}, got {BACKEND!r}")
    if gemm not in GEMMS:
        raise ValueError(f"fp8 GEMM must be one of {GEMMS}, got {gemm!r}")
    device = torch.device(device)
    if BACKEND == "emulate":
        return "emulate"
    if device.type == "cuda":
        _check_cuda_capability(device)
        return gemm
    if BACKEND == "kernel":
        if gemm == "triton" and not _interpreting():
            raise RuntimeError(f"fp8.BACKEND='kernel' with the Triton GEMM on {device} needs the Triton "
                               "interpreter (TRITON_INTERPRET=1)")
        return gemm
    return "emulate"


def emulated_matmul(a, b, scale_a, scale_b, out_dtype=torch.bfloat16):
    """The CPU stand-in for fp8_matmul: (a.float() @ b.float()) / scale_a / scale_b, then cast.
    fp8 x fp8 products are exact in fp32, so it differs from the kernel only in summation order."""
    return _cast(a.float() @ b.float() / scale_a / scale_b, out_dtype)


def _cast(c, dtype):
    # not c.to(dtype) when the dtypes agree: Dynamo of torch 2.11 turns an autograd.Function whose output is
    # such a no-op .to() into one whose backward sees dY = 0 (every compiled FP8 gradient 0, seen on an H200)
    return c if c.dtype == dtype else c.to(dtype)


def _k_major(t, dim):
    """t with dimension `dim` (the GEMM's reduction dimension) contiguous, copying only if needed."""
    if t.stride(dim) == 1:
        return t
    return t.contiguous() if dim == 1 else t.t().contiguous().t()


def scaled_gemm(a, b, scale_a, scale_b, out_dtype, gemm="triton", fast_accum=False):
    """(a @ b) / (scale_a * scale_b) with the kernel `gemm` where it runs for a's device (else emulated),
    returned in out_dtype. Kernel operands are made K-major first (Hopper's fp8 wgmma and cuBLASLt).
    fast_accum: the forward's choice (module docstring, "Accumulation"); the emulation is exact either way."""
    gemm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.float32
    backend = resolve_backend(a.device, gemm)
    if backend == "torch" and (a.shape[1] % 16 or b.shape[1] % 16):
        backend = "triton"  # cuBLASLt's FP8 GEMM needs K and N in multiples of 16 (e.g. wgrad over 4 x 1001 tokens)
    if backend != "emulate":
        kernel = fp8_matmul if backend == "triton" else torch_fp8_matmul
        c = kernel(_k_major(a, 1), _k_major(b, 0), scale_a, scale_b, gemm_dtype, fast_accum)
    else:
        c = emulated_matmul(a, b, scale_a, scale_b, gemm_dtype)
    return _cast(c, out_dtype)


# ----------------------------------------------------------------------------------------------
# The weight cache: the weight quantized once per optimizer step, not once per micro-batch
#
# With gradient accumulation every micro-batch of a step multiplies by the same weight, so its FP8 copy, the
# transposed copy dgrad reads and its amax are made once, when the weight changes, and reused (Transformer
# Engine caches its FP8 weights across micro-batches too). Delayed scaling is kept exactly: a weight's amax is
# still recorded every micro-batch (the same number while the weight is the same), and the weight's scale can
# move between two micro-batches of a step (update_scales pushes the amax: a new maximum, or an old one leaving
# the window), so each micro-batch recasts the copy whenever its scale differs from the one the copy was made
# with. Which weights changed: an optimizer's step() (fused AdamW writes without bumping the parameters'
# version counters, ZeRO-1 through .data) or an in-place change torch counts (load_state_dict, no_grad edits).

# False: every forward quantizes its weight as before (kept to compare against: tests, tools.gpu_check)
WEIGHT_CACHE = True
_optimizer_steps = 0  # every torch.optim optimizer's completed steps (a global post-hook): part of the cache key
_watching = None


def _count_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


def _watch_optimizer_steps():
    """Register _count_step once, as a post-hook of every optimizer's step (ZeroRedundancyOptimizer's too, which
    broadcasts the weights a rank does not own inside its step)."""
    global _watching
    if _watching is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _watching = register_optimizer_step_post_hook(_count_step)


@torch.library.custom_op("xmodel::fp8_recast_if_rescaled", mutates_args=("q", "t"))
def _triton_recast(x: torch.Tensor, scale: torch.Tensor, history: torch.Tensor, amax: torch.Tensor,
                   ref: torch.Tensor, q: torch.Tensor, t: torch.Tensor, margin: int, step: bool) -> torch.Tensor:
    """The scale of this forward for x (step: step_scale(scale, history, amax), else scale), computed in the
    kernel; q (and t, unless empty) are cast again from x with it, in place, only if it differs from ref."""
    s = torch.empty((), device=x.device, dtype=torch.float32)
    _launch_cast(x, scale, SKIP_IF_SAME_SCALE, q=q, t=t if t.numel() else None, history=history,
                 amax_in=amax if step else None, ref=ref, scale_out=s, margin=margin)
    return s


def _cast_weight(w, scale, history, margin, record, k_major, fused):
    """A new weight's (q, t or None, amax, scale). The fused cast runs with the delayed scale first, then the
    recast with step_scale's (the kernel exits at once unless the history is empty and the weight is scaled
    just in time by the amax the cast found): three launches, one pass over the weight."""
    if not fused:
        q, t, a, s = scaled_cast(w, scale, history, E4M3, margin, record, k_major, False, want_amax=True)
        return q, t if k_major else None, a, s
    q, t, amax_parts = _triton_cast(w, scale, E4M3, k_major)
    a = amax_parts.amax()
    s = _triton_recast(w, scale, history, a, scale, q, t, margin, record)
    return q, t if k_major else None, a, s


def _recast_weight(w, scale, history, margin, record, fused, q, t, a, s_before):
    """The same weight with possibly another scale: (q, t, scale), recast only where the scale moved."""
    if fused:
        s = _triton_recast(w, scale, history, a, s_before, q, t if t is not None else q[:0], margin, record)
        return q, t, s
    s = step_scale(scale, history, a, FP8_MAX[E4M3], margin) if record else scale.clone()
    if s.device.type == "cpu" and torch.equal(s, s_before):  # free to ask on a CPU; elsewhere it would sync
        return q, t, s
    q = quantize(w, s, E4M3)
    return q, q.t().contiguous() if t is not None else None, s


# ----------------------------------------------------------------------------------------------
# The FP8 linear layer

class _FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with x, W in E4M3; backward dX = dY W, dW = dY^T x with dY in E5M2. w_q, w_t, w_amax, w_scale:
    the weight's FP8 copies, amax and scale from FP8Linear's cache, or None: quantize the weight here."""

    @staticmethod
    def forward(ctx, x, weight, w_q, w_t, w_amax, w_scale, pending, scale, history, margin, out_dtype, record, gemm):
        k_major, fused = _cast_path(x.device, gemm)
        dgrad, wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # this step's scales, set by the steps before (step_scale); new tensors, since update_scales overwrites
        # `scale` in place. Without a record (sampling, eval) the delayed scales alone and no amaxes
        x_q, x_t, amax_x, scale_x = scaled_cast(x, scale[INPUT], history[INPUT], E4M3, margin, record,
                                                k_major and wgrad, fused)
        if w_q is None:
            w_q, w_t, w_amax, w_scale = scaled_cast(weight, scale[WEIGHT], history[WEIGHT], E4M3, margin, record,
                                                    k_major and dgrad, fused)
        elif w_t is None:
            w_t = w_q.t()
        if record:
            pending[INPUT:GRAD_OUTPUT].copy_(torch.stack([amax_x, w_amax]))
        y = scaled_gemm(x_q, w_q.t(), scale_x, w_scale, out_dtype, gemm, fast_accum=True)
        ctx.save_for_backward(x_t, w_t, scale_x, w_scale)  # 1-byte copies only (x_t is x_q's transpose or view)
        ctx.state = (pending, scale, history, margin, record, gemm, k_major, fused)  # mutated in place: not saved
        ctx.dtypes = (x.dtype, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_t, w_t, scale_x, scale_w = ctx.saved_tensors
        pending, scale, history, margin, record, gemm, k_major, fused = ctx.state
        x_dtype, w_dtype = ctx.dtypes
        dgrad, wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy_q, dy_t, amax_dy, scale_dy = scaled_cast(dy, scale[GRAD_OUTPUT], history[GRAD_OUTPUT], E5M2, margin, True,
                                                    k_major and wgrad, fused)
        if record:
            pending[GRAD_OUTPUT].copy_(amax_dy)
        dx = dw = None
        if dgrad:
            dx = scaled_gemm(dy_q, w_t.t(), scale_dy, scale_w, x_dtype, gemm)       # [T, out] @ [out, in]
        if wgrad:
            dw = scaled_gemm(dy_t, x_t.t(), scale_dy, scale_x, w_dtype, gemm)       # [out, T] @ [T, in]
        return dx, dw, None, None, None, None, None, None, None, None, None, None, None


def _cast_path(device, gemm):
    """(k_major, fused): whether the GEMMs run a kernel, which wants the backward GEMMs' operands K-major (x^T for
    wgrad, W^T for dgrad, dY^T for wgrad: module docstring), and whether the fused cast writes them (else the
    separate ops)."""
    k_major = resolve_backend(device, gemm) != "emulate"
    return k_major, k_major and FUSED_CAST and (torch.device(device).type == "cuda" or _interpreting())


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear(in_features, out_features, bias=False) computing y = x W^T in FP8.

    weight [out_features, in_features] is the master weight (its own dtype, fp32 usually);
    amax_history [3, history_len] and scale [3] (fp32 buffers, rows INPUT, WEIGHT, GRAD_OUTPUT) are
    the delayed-scaling state; pending_amax [3] holds what a training forward and backward recorded until
    update_scales takes it (not saved: it is empty between micro-batches). x may be [..., in_features]; the
    output has the autocast dtype when autocast is on, else x's dtype. gemm: "triton" or "torch", the kernel
    (module docstring). The weight's FP8 copies are cached between forwards (refresh_fp8_weight)."""

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None, history_len=128, margin=0,
                 gemm="triton"):
        super().__init__()
        if bias:
            raise ValueError("FP8Linear: bias=True is not supported (the blocks' linear layers have no bias)")
        if history_len < 1:
            raise ValueError(f"FP8Linear: history_len must be >= 1, got {history_len}")
        if gemm not in GEMMS:
            raise ValueError(f"FP8Linear: gemm must be one of {GEMMS}, got {gemm!r}")
        self.in_features, self.out_features = in_features, out_features
        self.margin, self.gemm = margin, gemm
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.register_buffer("amax_history", torch.zeros(3, history_len, device=device, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(3, device=device, dtype=torch.float32))
        self.register_buffer("pending_amax", torch.zeros(3, device=device, dtype=torch.float32), persistent=False)
        # set by a model that calls refresh_fp8_weight before every forward (Xmodel): then compiled forwards,
        # which cannot read version counters, use the cache too
        self.owner_refreshes_weight = False
        self.forget_fp8_weight()
        _watch_optimizer_steps()
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def _apply(self, fn, *args, **kwargs):
        # .to(bfloat16) / .half() must not round the scaling state: keep it fp32, move the device only
        state = {name: getattr(self, name) for name in ("amax_history", "scale", "pending_amax")}
        super()._apply(fn, *args, **kwargs)
        for name, t in state.items():
            setattr(self, name, t.to(getattr(self, name).device))
        self.forget_fp8_weight()
        return self

    def forget_fp8_weight(self):
        """Drop the weight's cached FP8 copies (the next forward makes them again). Plain attributes, not
        buffers: neither saved nor broadcast by DDP, whose forward sends rank 0's buffers to every rank."""
        self._w_key = self._w_state = None
        self._w_q = self._w_t = self._w_amax = self._w_scale = None

    @torch.compiler.disable
    def refresh_fp8_weight(self, record):
        """Bring the weight's cached FP8 copy (and its transpose where the GEMMs want it), amax and scale up to date
        for a forward that records amaxes (training) or not, with delayed scaling exactly as without a cache.
        The weight changed (the cache key: an optimizer step anywhere, see _watch_optimizer_steps; an in-place
        change torch counts, as load_state_dict's; new storage): one pass over it, the fused cast. The same
        weight: only its scale can have moved (update_scales ran, or record flipped), and the copy is recast
        in place only if it did (in the kernel, which reads the scales and exits at once when they agree:
        one launch per micro-batch, no host sync). Neither: nothing. An update through `.data` outside an
        optimizer step is not seen: call forget_fp8_weight then."""
        if not WEIGHT_CACHE:
            return
        w = self.weight.detach()
        k_major, fused = _cast_path(w.device, self.gemm)
        key = (_optimizer_steps, w._version, w.data_ptr(), w.device, w.dtype, w.shape, k_major, fused)
        state = (self.scale._version, self.amax_history._version, record)
        if key == self._w_key and state == self._w_state:
            return
        scale, history = self.scale[WEIGHT], self.amax_history[WEIGHT]
        if key != self._w_key:
            self._w_q, self._w_t, self._w_amax, self._w_scale = _cast_weight(w, scale, history, self.margin, record,
                                                                             k_major, fused)
        else:
            self._w_q, self._w_t, self._w_scale = _recast_weight(w, scale, history, self.margin, record, fused,
                                                                 self._w_q, self._w_t, self._w_amax, self._w_scale)
        self._w_key, self._w_state = key, state

    def _weight_operands(self, record):
        """(w_q, w_t, w_amax, w_scale) for _FP8LinearFunction: the cache, or Nones (the forward quantizes the
        weight itself) without a cache or when compiled outside a model that refreshes it. A layer alone
        refreshes its own cache; one in a model that refreshes it (Xmodel.hidden_states) is already fresh."""
        compiling = torch.compiler.is_compiling()
        if not WEIGHT_CACHE or (compiling and not self.owner_refreshes_weight):
            return None, None, None, None
        if not compiling and not self.owner_refreshes_weight:
            self.refresh_fp8_weight(record)
        return self._w_q, self._w_t, self._w_amax, self._w_scale

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear: input has last dimension {x.shape[-1]}, expected {self.in_features}")
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            out_dtype = torch.get_autocast_dtype(device_type)
        else:
            out_dtype = x.dtype
        x2d = x.reshape(-1, self.in_features)
        with torch.autocast(device_type, enabled=False):  # our GEMMs choose their own precisions
            record = self.training and torch.is_grad_enabled()
            y = _FP8LinearFunction.apply(x2d, self.weight, *self._weight_operands(record), self.pending_amax,
                                          self.scale, self.amax_history, self.margin, out_dtype, record, self.gemm)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias=False, "
                f"history_len={self.amax_history.shape[1]}, margin={self.margin}, gemm={self.gemm}")
