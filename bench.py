"""Benchmark of ActiveQueryAttention (attn_kernel.py) and of one BoE sampler step (boe.py).

On one CUDA GPU it measures:
  1. Kernel. For each sequence length L, head dim D and active fraction rho, three timings of each
     implementation: "both", a forward with inputs that require grad and then one backward (what a BoE
     step runs in every attention layer); "fwd", the forward alone; "bwd", the backward alone. They are
       flash   dense SDPA, flash backend pinned: the baseline of every speed-up
       cudnn   dense SDPA, cuDNN backend pinned, where this GPU and PyTorch build have it
       triton  active_query_attention(backend="triton"): the Triton kernels
       torch   active_query_attention(backend="torch"), the PyTorch active-row path, its SDPA calls
               pinned to flash
     Sizes follow FlashAttention-2's benchmark, B*L = 16k tokens and H*D = 2048, so B = 16384 // L and
     H = 2048 // D. Inputs and dOut are random normal; the active set is round(rho * L) random rows per
     sequence. The kernels one forward + backward of each implementation launched are listed once
     (torch.profiler), so a reader sees which kernels the rows time.
  2. BoE step. One confidence step against one BoE step (boe.boe_step with the default configuration,
     whose backward runs through the active rows: the step's forward with gradient tracking and one
     backward, active rows = the masked positions)
     with the Triton sparse backward, one with a dense backward and one in the paper's configuration (a
     second forward at the surrogate state), on a 12-layer, d_model 768 model with random weights
     (L 1024, batch 8, a quarter of the positions after the prompt masked): time, peak memory
     (torch.cuda.max_memory_allocated, reset before each) and the share of the step's time spent in
     attention kernels (torch.profiler), beside the time in all GPU kernels.

The headline is the fwd+bwd speed-up, flash's fwd+bwd time / fwd+bwd time, beside its ideal
14L / (4L + 10|A|): the credited FLOPs below of a dense fwd+bwd against a sparse one. The backward-only
speed-up, beside its ideal L/|A|, is a diagnostic.

Timing: triton.testing.do_bench (CUDA events, after warm-up, L2 flushed before each run) with a budget of
100 ms per measurement (300 ms per BoE step), so at L = 8192 a measurement holds only a few runs. Its
min, median and max are kept; every ratio uses the median. "bwd" calls torch.autograd.grad(out,
(q, k, v), dOut, retain_graph=True) repeatedly on one saved graph, which isolates the backward better
than subtracting two noisy times. BoE-step times are end to end, host work included.

FLOPs (a multiply-add counts 2; one matmul of r query rows against L keys is 2 r L D per head):
  credited, what the function needs ("TF cred"): the forward, 2 matmuls over all L rows, 4 L^2 D; the
  backward, 5 matmuls over the |A| active rows (recompute QK^T, dV, dP, dQ, dK), 10 |A| L D
  (FlashAttention's convention; a dense backward's |A| is L).
  executed, what each path really computes ("TF exec"): flash and cuDNN as credited. The Triton backward
  runs 7 matmuls over |A|: without atomics its dQ and dK/dV programs each recompute QK^T and dP. The
  PyTorch path's forward adds a second forward over the |A| rows (2 matmuls, the graph its backward
  follows) to the full one; its backward is flash's over |A| rows.

Before timing, the Triton forward is checked against a float64 reference on rows spread over every
block (within twice flash's own error), and its gradients against the PyTorch path's; a mismatch
prints a WARNING row, and a size whose check failed counts for no goal. Without a GPU it runs a small
CPU comparison of the PyTorch active-row path against dense autograd instead (triton is not needed for
it); those wall times say nothing about a GPU.

    python bench.py            # the default sweep and the BoE step; estimated 2 minutes on an H100 (not yet run)
    python bench.py --quick    # L 2048 and 4096, rho 1/16, 1/4 and 1/2 (every goal's size), the BoE step
    python bench.py --json results.json --dtype fp16 --seq-lens 4096 --head-dims 64 --fractions 1/4
    python bench.py --compile  # no GPU needed: registers, spills and shared memory of every launch

--compile compiles the three Triton launches (forward, backward prepare, backward) with their default tiles
and options, for each dtype and head dim, for this GPU's compute capability or, without a GPU, an H100's
(9.0), and reads ptxas's report; nothing runs, so it needs triton (Linux) but no GPU.
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

import attn_kernel
from attn_kernel import active_query_attention, reference_attention

DEFAULTS = {  # (seq lens, head dims, active fractions) by (device type, --quick)
    ("cuda", False): ((1024, 2048, 4096, 8192), (64, 128), ("1/16", "1/8", "1/4", "1/2", "1")),
    ("cuda", True): ((2048, 4096), (64, 128), ("1/16", "1/4", "1/2")),
    ("cpu", False): ((256, 512, 1024), (64,), ("1/8", "1/2")),
    ("cpu", True): ((256, 512), (64,), ("1/8", "1/2")),
}
TOKENS, WIDTH = 16384, 2048  # B*L and H*D of every GPU size
CPU_BATCH, CPU_HEADS, CPU_RUNS = 1, 8, 5
WARMUP_MS, REP_MS = 25, 100  # do_bench budgets per measurement (BoE steps get 3x REP_MS)
GRAD_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4}  # max error / max |grad|
BOE_MODEL = dict(vocab_size=8192, mask_id=8191, seq_len=1024, n_layer=12, n_head=12, d_model=768)
BOE_BATCH, BOE_PROMPT, BOE_BUDGET, BOE_CANDIDATES, BOE_MASKED = 8, 32, 32, 64, 0.25
BOE_GOAL_STEP = "BoE step, Triton sparse backward"  # the step the BoE-step goal measures
# A kernel or op is counted as attention if its name holds one of these: the Triton kernels here
# (_attention_*), flash (pytorch_flash::flash_*), cuDNN (*_sdpa_*), memory-efficient (fmha_*), and on a CPU
# aten::scaled_dot_product_attention and the interpreted kernels' _ActiveQueryAttention.
ATTENTION_NAMES = ("attention", "flash", "fmha", "sdpa")
ERRORS = []  # every failed measurement, for --json


@dataclass(frozen=True)
class Impl:
    """One implementation under test."""
    attn: object  # attn(q, k, v, active) -> out [B, H, L, D]
    sparse: bool  # its backward follows only the active rows
    # The matmuls it executes: (forward over all L rows, forward over the |A| active rows, backward over
    # the |A| active rows), where a dense backward's active rows are all L.
    matmuls: tuple


CREDITED = (2, 0, 5)  # the matmuls every implementation is credited with (see the FLOPs above)


def attempt(label, thunk):
    """thunk(), or None after printing an ERROR row: one failure must not end the benchmark."""
    try:
        return thunk()
    except Exception as err:
        message = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        print(f"ERROR   {label}: {message}", flush=True)
        ERRORS.append(dict(what=label, error=message))
        return None


def gpu_times_ms(fn, rep_ms=REP_MS):
    """The time of every run of fn in ms, from triton.testing.do_bench."""
    from triton.testing import do_bench  # imported here: the CPU path runs without triton

    return do_bench(fn, warmup=WARMUP_MS, rep=rep_ms, return_mode="all")


def cpu_times_ms(fn, rep_ms=REP_MS):
    """The wall time of CPU_RUNS runs of fn in ms, after one warm-up. rep_ms, do_bench's budget, is taken
    so that the two timers are interchangeable, and ignored."""
    fn()
    times = []
    for _ in range(CPU_RUNS):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def spread(times):
    """Median, min and max of run times (ms), and the number of runs; all None for a failed measurement."""
    if not times:
        return dict(ms=None, ms_min=None, ms_max=None, runs=0)
    return dict(ms=statistics.median(times), ms_min=min(times), ms_max=max(times), runs=len(times))


def ratio(a, b):
    return None if a is None or not b else a / b


def implementations(gpu, device, dtype):
    """(impls, candidate, reference): impls maps a name to an Impl, dense baselines first (the first is
    the baseline of every speed-up); the checks put `candidate` on trial, and its gradients must match
    `reference`'s."""
    torch_path = partial(active_query_attention, backend="torch")
    dense = lambda q, k, v, active: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    if not gpu:
        return {"sdpa": Impl(dense, False, (2, 0, 5)), "reference": Impl(reference_attention, False, (2, 0, 4)),
                "torch": Impl(torch_path, True, (2, 2, 5))}, "torch", "reference"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pinned(backend, attn):
        def run(q, k, v, active):
            with sdpa_kernel(backend):
                return attn(q, k, v, active)
        return run

    impls = {"flash": Impl(pinned(SDPBackend.FLASH_ATTENTION, dense), False, (2, 0, 5))}
    cudnn = pinned(SDPBackend.CUDNN_ATTENTION, dense)
    missing = unavailable(cudnn, device, dtype)
    if missing is None:
        impls["cudnn"] = Impl(cudnn, False, (2, 0, 5))
    else:
        print(f"cuDNN attention is not available here, so no cudnn rows: {missing}", flush=True)
    impls["triton"] = Impl(partial(active_query_attention, backend="triton"), True, (2, 0, 7))
    impls["torch"] = Impl(pinned(SDPBackend.FLASH_ATTENTION, torch_path), True, (2, 2, 5))
    return impls, "triton", "torch"


def unavailable(attn, device, dtype):
    """None if attn runs a small forward and backward here, else why not (the first line of its error)."""
    q = torch.randn(1, 1, 128, 64, device=device, dtype=dtype, requires_grad=True)  # [B, H, L, D]
    try:
        with warnings.catch_warnings():  # SDPA warns about each backend it cannot use, then raises
            warnings.simplefilter("ignore")
            torch.autograd.grad(attn(q, q, q, None), q, torch.ones_like(q))
        return None
    except RuntimeError as err:
        return (str(err).strip().splitlines() or [""])[0][:200]


def random_inputs(shape, device, dtype):
    """q, k, v (requiring grad) and dOut, random normal: [B, H, L, D] each."""
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(shape, device=device, dtype=dtype)


def random_active(batch, seq_len, rho, device):
    """round(rho * L) distinct random rows per sequence, at least one: bool [B, L]."""
    count = max(1, round(rho * seq_len))
    rows = torch.rand(batch, seq_len, device=device).argsort(dim=1)[:, :count]  # [B, count]
    return torch.zeros(batch, seq_len, dtype=torch.bool, device=device).scatter_(1, rows, True)  # [B, L]


def check_forward(candidate, baseline, q, k, v, label):
    """ok if candidate's forward is within twice baseline's error of a float64 reference (+ 1 eps)."""
    seq_len = q.shape[2]
    rows = torch.arange(0, seq_len, max(1, seq_len // 256), device=q.device)  # [R] spread over all blocks
    logits = q[:, :, rows].double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, R, L]
    want = logits.softmax(-1) @ v.double()  # [B, H, R, D]
    everything = torch.ones(q.shape[0], seq_len, dtype=torch.bool, device=q.device)  # [B, L]
    with torch.no_grad():
        errors = [(attn(q, k, v, everything)[:, :, rows].double() - want).abs().max().item()
                  for attn in (candidate, baseline)]
    ok = errors[0] <= 2 * errors[1] + torch.finfo(q.dtype).eps * want.abs().max().item()  # False on NaN
    print(f"{'check' if ok else 'WARNING'} {label} forward: max error {errors[0]:.2e} vs baseline's "
          f"{errors[1]:.2e}{'' if ok else ' -- this forward is wrong, its timings mean nothing'}", flush=True)
    return dict(check="forward", what=label, error=errors[0], baseline_error=errors[1], ok=ok)


def check_gradients(candidate, baseline, q, k, v, dout, active, label):
    """ok if candidate's dq, dk, dv match baseline's within GRAD_TOLERANCE of their largest entry."""
    grads = [torch.autograd.grad(attn(q, k, v, active), (q, k, v), dout) for attn in (candidate, baseline)]
    # a gradient that is 0 everywhere (dq and dk at L = 1) is matched by 0, not compared as 0 / 0
    error = max(((g - w).float().abs().max() / w.float().abs().max().clamp_min(torch.finfo(torch.float32).tiny)).item()
                for g, w in zip(*grads))
    ok = error <= GRAD_TOLERANCE[q.dtype]  # False on NaN
    print(f"{'check' if ok else 'WARNING'} {label} gradients: max error / max |grad| {error:.2e}"
          f"{'' if ok else ' -- this backward is wrong, its timings mean nothing'}", flush=True)
    return dict(check="gradients", what=label, error=error, ok=ok)


def flops(matmuls, batch, heads, seq_len, head_dim, n_active):
    """FLOPs of fwd, bwd and both for `matmuls` (as in Impl.matmuls)."""
    full, forward_active, backward_active = matmuls
    per_row = 2 * batch * heads * seq_len * head_dim  # one matmul, per query row
    fwd = per_row * (full * seq_len + forward_active * n_active)
    bwd = per_row * backward_active * n_active
    return dict(fwd=fwd, bwd=bwd, both=fwd + bwd)


def measure(name, impl, q, k, v, dout, active, rho, timer):
    """One row: fwd, bwd (autograd.grad on one retained graph) and both, each in ms (median, min, max)
    and in credited and executed TFLOP/s (at the median)."""
    batch, heads, seq_len, head_dim = q.shape
    n_active = int(active.sum(1).max())  # rows per sequence (all sequences have the same count)
    label = f"{name} L={seq_len} D={head_dim} rho={rho}"
    attn = impl.attn

    def backward_only():
        out = attn(q, k, v, active)  # [B, H, L, D]; its graph is kept for every timed backward
        return timer(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))

    times = {"fwd": attempt(f"{label} fwd", lambda: timer(lambda: attn(q, k, v, active))),
             "bwd": attempt(f"{label} bwd", backward_only),
             "both": attempt(f"{label} both", lambda: timer(lambda: torch.autograd.grad(
                 attn(q, k, v, active), (q, k, v), dout)))}
    credited = flops(CREDITED, batch, heads, seq_len, head_dim, n_active)
    executed = flops(impl.matmuls, batch, heads, seq_len, head_dim, n_active)
    row = dict(impl=name, L=seq_len, D=head_dim, B=batch, H=heads, rho=rho, n_active=n_active)
    for kind, kind_times in times.items():
        row.update({f"{kind}_{key}": value for key, value in spread(kind_times).items()})  # fwd_ms, fwd_ms_min, ...
        row[f"{kind}_tflops"] = ratio(credited[kind] / 1e9, row[f"{kind}_ms"])
        row[f"{kind}_tflops_executed"] = ratio(executed[kind] / 1e9, row[f"{kind}_ms"])
    return row


COLUMNS = [  # (key, title, width, format) of a kernel row
    ("impl", "impl", 10, "s"), ("L", "L", 6, "d"), ("D", "D", 5, "d"), ("rho", "rho", 6, "s"),
    ("n_active", "|A|", 6, "d"), ("both_ms", "both ms", 9, ".3f"), ("both_ms_min", "min", 8, ".3f"),
    ("both_ms_max", "max", 8, ".3f"), ("both_speedup", "x", 7, ".2f"), ("both_ideal", "ideal", 6, ".2f"),
    ("both_tflops", "TF cred", 9, ".3g"), ("both_tflops_executed", "TF exec", 9, ".3g"),
    ("fwd_ms", "fwd ms", 8, ".3f"), ("fwd_ratio", "/base", 7, ".2f"), ("bwd_ms", "bwd ms", 8, ".3f"),
    ("bwd_speedup", "bwd x", 7, ".2f"), ("bwd_ideal", "ideal", 6, ".1f")]


def print_row(row):
    print("".join(f"{fmt(row.get(key), spec):>{width}}" for key, _, width, spec in COLUMNS), flush=True)


def finish_row(row, base):
    """Adds the ratios to `base` (the dense baseline's row at this size) and their ideals; prints the row."""
    seq_len, n_active = row["L"], row["n_active"]
    row["both_speedup"] = ratio(base["both_ms"], row["both_ms"])
    row["both_ideal"] = 14 * seq_len / (4 * seq_len + 10 * n_active)
    row["fwd_ratio"] = ratio(row["fwd_ms"], base["fwd_ms"])
    row["bwd_speedup"] = ratio(base["bwd_ms"], row["bwd_ms"])
    row["bwd_ideal"] = seq_len / n_active
    print_row(row)
    return row


def profiled(fn):
    """(torch.profiler's events, wall time in ms) of one call of fn, the GPU's kernels included where there is
    a GPU."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * gpu) as prof:
        start = time.perf_counter()
        fn()
        if gpu:
            torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start)
    return prof.events(), wall_ms


def is_attention(name):
    return any(marker in name.lower() for marker in ATTENTION_NAMES)


def short_name(name):
    """A kernel's name without its template arguments and parameters: 'void ns::kern<...>(...)' -> 'ns::kern'."""
    return re.split(r"[<(]", name.removeprefix("void "), maxsplit=1)[0].strip()


def kernels_of(fn):
    """What one call of fn ran, by short name in order of first appearance: its GPU kernels, or without a
    GPU its CPU ops named for attention."""
    events, _ = profiled(fn)
    names = [e.name for e in events if e.device_type != DeviceType.CPU]
    names = names or [e.name for e in events if is_attention(e.name)]
    return list(dict.fromkeys(short_name(name) for name in names))


def attention_times_ms(fn):
    """(attention, all kernels, the whole call) in ms, from one profiled call of fn. On a GPU: the summed
    durations of its kernels named for attention, and of all its kernels. Without one, the CPU time of its
    outermost ops named for attention (their nested ops not counted twice), and None."""
    events, wall_ms = profiled(fn)
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    if kernels:
        return (sum(e.time_range.elapsed_us() for e in kernels if is_attention(e.name)) / 1e3,
                sum(e.time_range.elapsed_us() for e in kernels) / 1e3, wall_ms)

    def inside_attention(event):
        while event.cpu_parent is not None:
            event = event.cpu_parent
            if is_attention(event.name):
                return True
        return False

    outermost = [e for e in events if is_attention(e.name) and not inside_attention(e)]
    return sum(e.time_range.elapsed_us() for e in outermost) / 1e3, None, wall_ms


def kernel_listing(impls, shape, rho, device, dtype):
    """{name: what one forward + backward of it ran} at one size (see kernels_of); printed."""
    batch, heads, seq_len, head_dim = shape
    q, k, v, dout = random_inputs(shape, device, dtype)
    active = random_active(batch, seq_len, float(Fraction(rho)), device)  # [B, L]
    print(f"what one forward + backward runs at L={seq_len} D={head_dim} rho={rho} (torch.profiler):")
    listing = {}
    for name, impl in impls.items():
        listing[name] = attempt(f"{name} kernel listing", lambda: kernels_of(
            lambda: torch.autograd.grad(impl.attn(q, k, v, active), (q, k, v), dout)))
        print(f"  {name:<10}{'-' if listing[name] is None else ', '.join(listing[name]) or '(none)'}", flush=True)
    return listing


def kernel_sweep(impls, candidate, reference, shapes, fractions, device, dtype, timer):
    """Per (B, H, L, D): checks, the dense paths once, the sparse paths at each rho; returns (rows, checks,
    listing), the listing from kernel_listing at the first size."""
    listing = kernel_listing(impls, shapes[0], fractions[0], device, dtype)
    base = next(iter(impls))
    print(f"\ntimes in ms. both = fwd + bwd: median, min and max of the runs; x = {base} both / both, ideal "
          f"14L/(4L+10|A|);\nTF cred, TF exec = TFLOP/s of the credited and executed FLOPs of both; "
          f"/base = fwd / {base} fwd; bwd x = {base} bwd / bwd, ideal L/|A|")
    print("".join(f"{title:>{width}}" for _, title, width, _ in COLUMNS))
    rows, checks = [], []
    for shape in shapes:  # a failure (out of memory, say) loses that shape's rows, not the run's
        attempt(f"B, H, L, D = {shape}", lambda: sweep_shape(
            impls, candidate, reference, shape, fractions, device, dtype, timer, rows, checks))
        if cuda_broken():
            print("stopping: after a CUDA error the process cannot launch anything reliably", flush=True)
            break
    return rows, [c for c in checks if c is not None], listing


# The kernels' pointer arguments that do not hold the input dtype; their other arguments are int32 but
# for the two softmax scales.
POINTER_TYPES = {"Lse": "fp32", "Delta": "fp32", "ActiveRows": "i32", "ActiveCounts": "i32", "Active": "i1"}
POINTER_ARGS = {"Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV", *POINTER_TYPES}
FLOAT_ARGS = {"qk_scale", "sm_scale"}
# The shared memory a program may use (opt-in), in bytes, by compute capability (CUDA C++ Programming Guide):
# 163 KiB on A100 (8.0) and Jetson Orin (8.7), 227 KiB on H100/H200 (9.0) and B200 (10.0), 99 KiB on the
# RTX 30, 40 and 50 series and the L4 (8.6, 8.9, 12.0), 64 KiB on Turing (7.5).
SMEM_LIMIT = {(7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448,
              (10, 0): 232448, (12, 0): 101376}


def kernel_launches(dtype, head_dim):
    """(name, kernel, constexprs, launch options) of the three Triton launches for inputs of this dtype and
    head dim, with the tiles and options the launch wrappers in attn_kernel.py choose by default."""
    options = attn_kernel._launch_options(torch.empty(0, head_dim, dtype=dtype))
    precision = dict(DOT_PRECISION=options.pop("DOT_PRECISION"))
    forward_m, forward_n = attn_kernel._tile_sizes("forward", head_dim, dtype, None, None)
    prepare_m, listing_step = attn_kernel._tile_sizes("prepare", head_dim, dtype, None, None)
    dq_m, dq_n = attn_kernel._tile_sizes("dq", head_dim, dtype, None, None)
    kv_m, kv_n = attn_kernel._tile_sizes("dkdv", head_dim, dtype, None, None)
    return [
        ("forward", attn_kernel._attention_forward_kernel,
         dict(HEAD_DIM=head_dim, BLOCK_M=forward_m, BLOCK_N=forward_n, **precision), options),
        ("prepare", attn_kernel._attention_backward_prepare_kernel,
         dict(HEAD_DIM=head_dim, BLOCK_M=prepare_m, SCAN_BLOCK=listing_step), dict(num_warps=attn_kernel._PREPARE_WARPS)),
        ("backward", attn_kernel._attention_backward_kernel,
         dict(HEAD_DIM=head_dim, DQ_BLOCK_M=dq_m, DQ_BLOCK_N=dq_n, KV_BLOCK_M=kv_m, KV_BLOCK_N=kv_n, **precision),
         options),
    ]


def compile_kernel(kernel, dtype, constexprs, options, capability):
    """Compiles a Triton kernel for a CUDA GPU of this compute capability (none needs to be present), with
    16-byte aligned pointers and strides, as for contiguous inputs. Returns (shared memory in bytes, a dict:
    ptxas's registers per thread and bytes spilled, and the tensor-core instructions in the PTX)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    element = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTER_ARGS:
            signature[name] = "*" + POINTER_TYPES.get(name, element)
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
        if name in POINTER_ARGS or name.startswith("stride"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    arch = capability[0] * 10 + capability[1]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as folder:  # ptxas again, for its report (Triton keeps only the binary)
        ptx_path = os.path.join(folder, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        report = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                                 ptx_path, "-o", os.path.join(folder, "kernel.o")], capture_output=True, text=True,
                                check=True)
    registers = re.search(r"Used (\d+) registers", report.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report.stderr)
    # Which tensor-core instructions the matmuls became: Hopper's, Ampere's, or none.
    tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
    return compiled.metadata.shared, dict(registers=int(registers[1]) if registers else None,
                                          spill_stores=int(spills[1]) if spills else None,
                                          spill_loads=int(spills[2]) if spills else None, tensor_cores=tensor_cores)


def compile_report(head_dims, capability):
    """Every launch at every dtype and head dim compiled for `capability`: one row each, printed."""
    import triton

    print(f"The Triton kernels compiled by Triton {triton.__version__} for compute capability "
          f"{capability[0]}.{capability[1]}, with their default tiles (rows x keys; the prepare kernel: rows x rows "
          f"per listing step; the backward: dQ / dK, dV); nothing runs. Per thread: registers and bytes spilled to "
          f"local memory (stores / loads); per program: shared memory; and the tensor-core instructions the "
          f"matmuls became (wgmma: Hopper's; mma: Ampere's; none: FMA).")
    print(f"{'dtype':<9}{'D':>4}  {'kernel':<9}{'tiles':>17}{'warps':>6}{'registers':>10}{'spilled':>15}"
          f"{'shared KiB':>11}{'tensor cores':>14}")
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for head_dim in head_dims:
            for name, kernel, constexprs, options in kernel_launches(dtype, head_dim):
                tiles = " / ".join(f"{constexprs[m]}x{constexprs[n]}" for m, n in (
                    ("BLOCK_M", "BLOCK_N"), ("BLOCK_M", "SCAN_BLOCK"), ("DQ_BLOCK_M", "DQ_BLOCK_N"),
                    ("KV_BLOCK_M", "KV_BLOCK_N")) if m in constexprs and n in constexprs)
                row = dict(dtype=str(dtype).removeprefix("torch."), head_dim=head_dim, kernel=name, tiles=tiles,
                           num_warps=options["num_warps"])
                compiled = attempt(f"compile {name} {row['dtype']} D={head_dim}",
                                   lambda: compile_kernel(kernel, dtype, constexprs, options, capability))
                if compiled is not None:
                    row.update(shared=compiled[0], **compiled[1])
                    limit = SMEM_LIMIT.get(tuple(capability))
                    row["fits"] = None if limit is None else row["shared"] <= limit
                    spilled = f"{fmt(row['spill_stores'], 'd')} / {fmt(row['spill_loads'], 'd')}"
                    print(f"{row['dtype']:<9}{head_dim:>4}  {name:<9}{tiles:>17}{row['num_warps']:>6}"
                          f"{fmt(row['registers'], 'd'):>10}{spilled:>15}{row['shared'] / 1024:>11.1f}"
                          f"{row['tensor_cores']:>14}{'  (over the limit)' if row['fits'] is False else ''}", flush=True)
                rows.append(row)
    return rows


def cuda_broken():
    """True once a measurement failed with a CUDA error, which poisons every later launch."""
    return any("CUDA error" in e["error"] or "illegal memory access" in e["error"] for e in ERRORS)


def sweep_shape(impls, candidate, reference, shape, fractions, device, dtype, timer, rows, checks):
    """One (B, H, L, D): appends its check results to `checks` and its timing rows to `rows`."""
    batch, heads, seq_len, head_dim = shape
    q, k, v, dout = random_inputs(shape, device, dtype)
    dense = [name for name, impl in impls.items() if not impl.sparse]
    label = f"{candidate} L={seq_len} D={head_dim}"
    checks.append(attempt(f"{label} forward check", lambda: check_forward(
        impls[candidate].attn, impls[dense[0]].attn, q, k, v, label)))
    everything = torch.ones(batch, seq_len, dtype=torch.bool, device=device)  # [B, L]
    base, *others = [measure(name, impls[name], q, k, v, dout, everything, "dense", timer) for name in dense]
    rows += [finish_row(row, base) for row in (base, *others)]
    for rho in fractions:
        active = random_active(batch, seq_len, float(Fraction(rho)), device)  # [B, L]
        checks.append(attempt(f"{label} rho={rho} gradient check", lambda: check_gradients(
            impls[candidate].attn, impls[reference].attn, q, k, v, dout, active, f"{label} rho={rho}")))
        rows += [finish_row(measure(name, impl, q, k, v, dout, active, rho, timer), base)
                 for name, impl in impls.items() if impl.sparse]


def boe_step_functions(device, dtype):
    """(what runs, {name: step}): a model with random weights, a decoding state part-way through, and one
    function per rule that runs one step of boe.generate on it (without the reveal). Every use of boe.py's
    API is here; the goal reads the step named BOE_GOAL_STEP."""
    import boe  # imported here so that a boe.py that fails to import only costs this section

    torch.manual_seed(0)
    model = boe.MaskedDiffusionTransformer(boe.ModelConfig(**BOE_MODEL)).to(device=device, dtype=dtype).eval()
    mask_id, seq_len = BOE_MODEL["mask_id"], BOE_MODEL["seq_len"]
    tokens = torch.randint(mask_id, (BOE_BATCH, seq_len), device=device)  # [B, L], every position revealed
    # BoE at the state differentiates its own forward with every masked position active: a state with a
    # fraction BOE_MASKED of the positions after the prompt still masked, chosen at random per sequence.
    n_masked = round(BOE_MASKED * (seq_len - BOE_PROMPT))
    order = torch.rand(BOE_BATCH, seq_len - BOE_PROMPT, device=device).argsort(1)  # [B, L - P]
    tokens[:, BOE_PROMPT:].scatter_(1, order[:, :n_masked], mask_id)
    masked = tokens == mask_id  # [B, L]
    budget = torch.full((BOE_BATCH,), BOE_BUDGET, device=device)  # [B]
    table = model.token_embedding.weight
    boe.ATTENTION_BACKEND = "triton"
    default = boe.SamplerConfig(sparse_backward=True)  # the active-row backward this file times (the default)
    paper = replace(boe.PAPER_BOE, candidates=BOE_CANDIDATES)
    description = (f"{BOE_MODEL}, batch {BOE_BATCH}, {n_masked} of {seq_len} positions masked (the active rows "
                   f"at the state), budget {BOE_BUDGET}; the paper's surrogate with {BOE_CANDIDATES} candidates")

    @torch.no_grad()
    def confidence():  # the forward, then the confidence scores boe.generate ranks by
        _, probs = boe.predict(model, tokens)  # [B, L, V]
        return probs.max(-1).values  # [B, L]

    def step(cfg):
        @torch.no_grad()
        def run():  # the step's forward (with gradient tracking where BoE needs it), one backward, the scores
            return boe.boe_step(tokens, masked, budget, table, model.forward_embeds, mask_id, cfg, progress=0.5)[1]
        return run

    # A BoE step skips its backward where it has nothing to steer (nearly certain predictions); random
    # weights predict far from that, but a timing of a step without its backward would mislead, so check.
    for cfg in (default, paper):
        with torch.no_grad():
            charged = boe.boe_step(tokens, masked, budget, table, model.forward_embeds, mask_id, cfg, progress=0.5)[3]
        if not charged.all():
            raise RuntimeError(f"the BoE step would skip its backward on {int((~charged).sum())} rows; nothing to time")

    return description, {"confidence step": confidence,
                         BOE_GOAL_STEP: step(default),
                         "BoE step, dense backward": step(replace(default, sparse_backward=False)),
                         "BoE step, paper's surrogate": step(paper)}


def peak_gib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def boe_steps(device, dtype, timer):
    """Time, peak memory and attention share of each step of boe_step_functions; the first is the baseline."""
    description, steps = boe_step_functions(device, dtype)
    where = "kernels" if device == "cuda" else "ops (CPU time)"
    print(f"\nBoE step: {description}\nms: median [min, max]; peak = max allocated; attention, all kernels = "
          f"share of one profiled step's wall time in attention {where} and in all GPU kernels (torch.profiler)")
    rows = []
    for name, fn in steps.items():
        row = dict(step=name, **spread(attempt(f"{name} time", lambda: timer(fn, rep_ms=3 * REP_MS))))
        row["peak_gib"] = attempt(f"{name} memory", lambda: peak_gib(fn)) if device == "cuda" else None
        profile = attempt(f"{name} profile", lambda: attention_times_ms(fn))
        row["attention_ms"], row["kernels_ms"], row["profiled_ms"] = profile if profile else (None, None, None)
        row["attention_share"] = ratio(row["attention_ms"], row["profiled_ms"])
        row["kernels_share"] = ratio(row["kernels_ms"], row["profiled_ms"])
        row["x_confidence"] = ratio(row["ms"], rows[0]["ms"] if rows else row["ms"])
        rows.append(row)
        print(f"{name:<34}{fmt(row['ms'], '.2f'):>9} ms [{fmt(row['ms_min'], '.2f')}, {fmt(row['ms_max'], '.2f')}]"
              f"{fmt(row['x_confidence'], '.2f'):>7}x confidence   peak {fmt(row['peak_gib'], '.2f'):>6} GiB   "
              f"attention {fmt(row['attention_share'], '.0%'):>4}, all kernels {fmt(row['kernels_share'], '.0%')}",
              flush=True)
    return rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def find(rows, **where):
    return next((r for r in rows if all(r.get(key) == value for key, value in where.items())), None)


def forward_ratio(rows, impl, seq_len, head_dim):
    """Median over rho of impl's forward time / the dense baseline's forward time, or None."""
    ratios = [r["fwd_ratio"] for r in rows if (r["impl"], r["L"], r["D"]) == (impl, seq_len, head_dim)
              and r["fwd_ratio"] is not None]
    return statistics.median(ratios) if ratios else None


def print_summary(rows, seq_lens, head_dims, fractions):
    if not rows:
        return print("\nno kernel rows to summarise")
    base = rows[0]["impl"]
    sparse = sorted({r["impl"] for r in rows if r["rho"] != "dense"}, key=lambda name: name != "triton")
    tables = [("both_speedup", "both_ideal", f"fwd+bwd speed-up over the dense {base} fwd+bwd (ideal in brackets); "
               f"fwd = forward time / {base} forward time, median over rho"),
              ("bwd_speedup", "bwd_ideal", f"diagnostic: backward-only speed-up over the dense {base} backward "
               f"(ideal L/|A| in brackets)")]
    for key, ideal, title in tables:
        forward = key == "both_speedup"
        print(f"\n{title}")
        print(f"{'impl':<8}{'L':>6}{'D':>5}" + "".join(f"{rho:>14}" for rho in fractions) + f"{'fwd':>7}" * forward)
        for impl in sparse:
            for seq_len in seq_lens:
                for head_dim in head_dims:
                    cells = []
                    for rho in fractions:
                        row = find(rows, impl=impl, L=seq_len, D=head_dim, rho=rho)
                        cells.append("-" if row is None else f"{fmt(row[key], '.2f')} ({row[ideal]:.3g})")
                    ratio_cell = f"{fmt(forward_ratio(rows, impl, seq_len, head_dim), '.2f'):>7}" * forward
                    print(f"{impl:<8}{seq_len:>6}{head_dim:>5}" + "".join(f"{c:>14}" for c in cells) + ratio_cell)


def goals(rows, boe_rows, checks):
    """(goal, measured, target, met) for the benchmark targets; measured is None where a size was not
    run, or where the Triton path failed its correctness check there (a fast wrong kernel meets nothing)."""
    passed = {(c["check"], c["what"]) for c in checks if c["ok"]}

    def checked(seq_len, head_dim, rho=None):
        label = f"triton L={seq_len} D={head_dim}"
        return ("forward", label) in passed and (rho is None or ("gradients", f"{label} rho={rho}") in passed)

    def triton(key, head_dim, rho):
        row = find(rows, impl="triton", L=4096, D=head_dim, rho=rho)
        return row[key] if row and checked(4096, head_dim, rho) else None

    def forward(head_dim):
        return forward_ratio(rows, "triton", 4096, head_dim) if checked(4096, head_dim) else None

    def against_torch_path():
        """The smallest PyTorch-path fwd+bwd time / Triton fwd+bwd time at L >= 2048, rho <= 1/2."""
        ratios = []
        for row in rows:
            if row["impl"] == "triton" and row["L"] >= 2048 and row["rho"] != "dense" \
                    and Fraction(row["rho"]) <= Fraction(1, 2) and checked(row["L"], row["D"], row["rho"]):
                other = find(rows, impl="torch", L=row["L"], D=row["D"], rho=row["rho"])
                ratios.append(ratio(other["both_ms"], row["both_ms"]) if other else None)
        return None if not ratios or None in ratios else min(ratios)  # None: some size was not compared

    boe_ratio = next((row["x_confidence"] for row in boe_rows if row["step"] == BOE_GOAL_STEP), None)
    table = [("fwd+bwd speed-up over flash, L=4096 D=64 rho=1/4 (ideal 2.15)", triton("both_speedup", 64, "1/4"),
              1.9, True),
             ("fwd+bwd speed-up over flash, L=4096 D=128 rho=1/4 (ideal 2.15)", triton("both_speedup", 128, "1/4"),
              1.9, True),
             ("fwd+bwd speed-up over flash, L=4096 D=64 rho=1/16 (ideal 3.03)", triton("both_speedup", 64, "1/16"),
              2.7, True),
             ("fwd+bwd speed-up over flash, L=4096 D=128 rho=1/16 (ideal 3.03)",
              triton("both_speedup", 128, "1/16"), 2.7, True),
             ("bwd speed-up over flash bwd, L=4096 D=64 rho=1/16 (ideal 16)", triton("bwd_speedup", 64, "1/16"),
              8.0, True),
             ("bwd speed-up over flash bwd, L=4096 D=128 rho=1/16 (ideal 16)", triton("bwd_speedup", 128, "1/16"),
              8.0, True),
             ("PyTorch path fwd+bwd / Triton fwd+bwd, worst at L>=2048 rho<=1/2", against_torch_path(), 1.0, True),
             ("triton fwd / flash fwd, L=4096 D=64", forward(64), 1.1, False),
             ("triton fwd / flash fwd, L=4096 D=128", forward(128), 1.1, False),
             ("BoE step (Triton) / confidence step", boe_ratio, 2.5, False)]
    return [dict(goal=g, measured=m, target=t, met=None if m is None else (m >= t if up else m <= t),
                 direction=">=" if up else "<=") for g, m, t, up in table]


def compile_main(parser, args, gpu):
    """python bench.py --compile [--capability M.m] [--head-dims ...] [--json PATH]"""
    if not attn_kernel.HAS_TRITON:
        parser.error(f"--compile compiles the Triton kernels: {attn_kernel.TRITON_MISSING}")
    if attn_kernel.INTERPRETED:
        parser.error("--compile needs the compiler, not Triton's interpreter: unset TRITON_INTERPRET")
    head_dims = args.head_dims or attn_kernel.SUPPORTED_HEAD_DIMS
    if not set(head_dims) <= set(attn_kernel.SUPPORTED_HEAD_DIMS):
        parser.error(f"the Triton kernels take head dims {attn_kernel.SUPPORTED_HEAD_DIMS}; got {head_dims}")
    capability = torch.cuda.get_device_capability() if gpu else (9, 0)
    if args.capability:
        known = {f"{major}.{minor}": (major, minor) for major, minor in SMEM_LIMIT}  # the GPUs it has numbers for
        if args.capability not in known:
            parser.error(f"--capability must be one of {', '.join(known)} (MAJOR.MINOR); got {args.capability!r}")
        capability = known[args.capability]
    rows = compile_report(head_dims, capability)
    print(f"\n{len(ERRORS)} errors")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=attn_kernel.triton.__version__, capability=list(capability), compiled=rows,
                           errors=ERRORS), f, indent=1)
    if ERRORS:
        raise SystemExit(1)


def fraction(text):
    """An active fraction from the command line, e.g. 1/16 or 0.25."""
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r}") from err


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths L")
    parser.add_argument("--head-dims", type=int, nargs="+", help="head dims D")
    parser.add_argument("--fractions", type=fraction, nargs="+", help="active fractions rho, e.g. 1/16 0.25 1")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="GPU dtype (CPU uses fp32)")
    parser.add_argument("--quick", action="store_true", help="a few sizes only")
    parser.add_argument("--json", metavar="PATH", help="write every number here")
    parser.add_argument("--compile", action="store_true", help="only compile the Triton kernels for this GPU, or "
                        "without one for an H100 (compute capability 9.0), and print registers, spills and shared "
                        "memory per dtype, head dim and kernel")
    parser.add_argument("--capability", metavar="MAJOR.MINOR", help="with --compile: compile for GPUs of this "
                        "compute capability instead, e.g. 8.6 (RTX 30 series)")
    args = parser.parse_args()
    if args.json == "":
        parser.error("--json needs a path")
    if min(args.seq_lens or [1]) < 1 or min(args.head_dims or [1]) < 1:
        parser.error("--seq-lens and --head-dims must be >= 1")
    # Beyond this benchmark's scope, and far beyond it a torch allocation error instead of a clear one
    if max(args.seq_lens or [1]) > 2**17 or max(args.head_dims or [1]) > 256:
        parser.error("--seq-lens must be at most 131072 and --head-dims at most 256 (FlashAttention's largest "
                     "head dim)")
    if args.json:  # written at the end, even of a broken run: a place that cannot be written fails now
        try:
            existed = os.path.lexists(args.json)
            open(args.json, "a").close()
            if not existed:  # leave nothing behind where the run is refused below
                os.remove(args.json)
        except OSError as err:
            parser.error(f"cannot write {args.json}: {err.strerror or err}")
    gpu = torch.cuda.is_available()
    if args.capability and not args.compile:
        parser.error("--capability goes with --compile")
    if args.compile:
        return compile_main(parser, args, gpu)
    if gpu and not attn_kernel.HAS_TRITON:
        parser.error(f"on a GPU, bench.py times the Triton kernels: {attn_kernel.TRITON_MISSING}")
    if gpu and torch.cuda.get_device_capability() < (8, 0):
        parser.error("on a GPU, bench.py times the Triton kernels, which need compute capability 8.0 or newer "
                     f"(Ampere on); this GPU has {'.'.join(map(str, torch.cuda.get_device_capability()))}")
    device = "cuda" if gpu else "cpu"
    seq_lens, head_dims, fractions = DEFAULTS[device, args.quick]
    seq_lens, head_dims = args.seq_lens or seq_lens, args.head_dims or head_dims
    fractions = [str(Fraction(f)) for f in args.fractions or fractions]
    if not all(0 < Fraction(f) <= 1 for f in fractions):
        parser.error("--fractions must lie in (0, 1]")
    shapes = [(max(1, TOKENS // L), max(1, WIDTH // D), L, D) if gpu else (CPU_BATCH, CPU_HEADS, L, D)
              for L in seq_lens for D in head_dims]  # (B, H, L, D)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype] if gpu else torch.float32
    triton_version = attn_kernel.triton.__version__ if attn_kernel.HAS_TRITON else None
    results = dict(torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                   dtype=str(dtype).removeprefix("torch."))
    if gpu:
        results.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda)
        print(f"{results['device']}, torch {results['torch']}, Triton {results['triton']}, CUDA {results['cuda']}, "
              f"{results['dtype']}; B = {TOKENS} // L, H = {WIDTH} // D; do_bench(warmup={WARMUP_MS}, rep={REP_MS})")
    else:
        results.update(device=f"cpu ({platform.processor() or platform.machine()})")
        print(f"No CUDA GPU: a small CPU comparison of the PyTorch active-row path against dense autograd "
              f"(fp32, {torch.get_num_threads()} threads, {CPU_RUNS} wall times each); meaningless for a GPU.")
    torch.manual_seed(0)
    start = time.time()
    timer = gpu_times_ms if gpu else cpu_times_ms
    try:
        rows, checks, listing = kernel_sweep(*implementations(gpu, device, dtype), shapes, fractions, device, dtype,
                                             timer)
        results.update(kernel=rows, checks=checks, kernels_run=listing)
        run_boe = gpu and not cuda_broken()
        boe_rows = (attempt("BoE step", lambda: boe_steps(device, dtype, timer)) or []) if run_boe else []
        results.update(boe_step=boe_rows)
        print_summary(rows, seq_lens, head_dims, fractions)
        if gpu:
            results["goals"] = goals(rows, boe_rows, checks)
            print(f"\n{'goal':<68}{'measured':>9}{'target':>10}")
            for g in results["goals"]:
                status = "not measured or check failed" if g["met"] is None else "met" if g["met"] else "NOT met"
                print(f"{g['goal']:<68}{fmt(g['measured'], '.2f'):>9}{g['direction']:>6}{g['target']:>4}  {status}")
        failed = [c["what"] for c in checks if not c["ok"]]
        print(f"\n{len(ERRORS)} errors, {len(failed)} failed checks{': ' + ', '.join(failed) if failed else ''}; "
              f"{time.time() - start:.0f} s")
    finally:  # whatever was measured is kept, even if the run breaks off (also on Ctrl-C or SIGINT)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(results, errors=ERRORS, seconds=time.time() - start), f, indent=1)
    if ERRORS or failed:  # a measurement that broke or a result that is wrong fails the run (goals do not)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
