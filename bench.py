"""Benchmark of ActiveQueryAttention (attn_kernel.py) and of one BoE sampler step (boe.py).

On one CUDA GPU it measures:
  1. Kernel. For each sequence length L, head dim D and active fraction rho: forward, backward and
     both, of active_query_attention with the Triton kernels (backend="triton") and with the
     pure-PyTorch active-row path (backend="torch"), next to dense torch SDPA with the flash backend
     pinned (what one would use instead). Sizes follow FlashAttention-2's benchmark, B*L = 16k tokens
     and H*D = 2048, so B = 16384 // L and H = 2048 // D. Inputs and dOut are random normal; the
     active set is round(rho * L) random rows per sequence.
  2. BoE step. One confidence step (a predict forward + score_confidence) against one BoE step (a
     predict forward + score_boe: a surrogate forward and one backward), with the Triton sparse
     backward and with a dense backward, on a 12-layer, d_model 768 model with random weights (L 1024,
     batch 8, budget 32 reveals, 64 candidates, probes capped at rho = 1/4: 320 active rows); and the
     peak memory of each (torch.cuda.max_memory_allocated, reset before each).

Timing: every number is the median of triton.testing.do_bench (CUDA events, after warm-up, L2
flushed before each run). Its budget is 100 ms per measurement, so at L >= 8192 a median holds only
a few runs; at L = 1024 and small rho the sparse backward is bound by launches and host work, well
short of its ideal L/|A|. The BoE-step times are end to end, host work included. "fwd" runs with
inputs that require grad (the forward a backward follows); "bwd" calls torch.autograd.grad(out,
(q, k, v), dOut, retain_graph=True) repeatedly on one saved graph, which isolates the backward better
than subtracting two noisy times; "both" is a fresh forward + backward.

FLOPs (a multiply-add counts 2): dense forward 4*B*H*L*L*D (QK^T and PV); dense backward 2.5x that,
10*B*H*L*L*D (five matmuls: recompute QK^T, dV, dP, dQ, dK), FlashAttention's convention. A sparse
backward is credited only with what it must do, the same five matmuls over the |A| active rows:
10*B*H*|A|*L*D. The backward speed-up is dense flash backward time / backward time, beside its
ideal L/|A|. The Triton backward in fact runs seven matmuls over |A|: without atomics, its dK/dV and
dQ kernels each recompute QK^T and dP, where FlashAttention-2 accumulates dQ atomically and runs five.
At flash's efficiency per FLOP its speed-up would be 5L/(7|A|), 2.9x at rho = 1/4, so the 3x goal
asks it to do better per FLOP than flash.

Before timing, the Triton forward is checked against a float64 reference on rows spread over every
block (within twice flash's own error), and its gradients against the PyTorch path's; a mismatch
prints a WARNING row. Without a GPU it runs a small CPU comparison of the PyTorch active-row path
against dense autograd instead (triton is not needed for it); those wall times say nothing about a GPU.

    python bench.py            # the full sweep and the BoE step; about 1.5 minutes expected on an H100
    python bench.py --quick    # L 1024 and 4096, rho 1/16, 1/4 and 1, and the BoE step
    python bench.py --json results.json --dtype fp16 --seq-lens 4096 --head-dims 64 --fractions 1/4
"""
import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import fields, replace
from fractions import Fraction
from functools import partial

import torch
import torch.nn.functional as F

import attn_kernel
from attn_kernel import active_query_attention, reference_attention

DEFAULTS = {  # (seq lens, head dims, active fractions) by (device type, --quick)
    ("cuda", False): ((1024, 2048, 4096, 8192, 16384), (64, 128), ("1/16", "1/8", "1/4", "1/2", "1")),
    ("cuda", True): ((1024, 4096), (64, 128), ("1/16", "1/4", "1")),
    ("cpu", False): ((256, 512, 1024), (64,), ("1/8", "1/2")),
    ("cpu", True): ((256, 512), (64,), ("1/8", "1/2")),
}
TOKENS, WIDTH = 16384, 2048  # B*L and H*D of every GPU size
CPU_BATCH, CPU_HEADS, CPU_RUNS = 1, 8, 5
WARMUP_MS, REP_MS = 25, 100  # do_bench budgets per measurement (BoE steps get 3x REP_MS)
GRAD_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4}  # max error / max |grad|
BOE_MODEL = dict(vocab_size=8192, mask_id=8191, seq_len=1024, n_layer=12, n_head=12, d_model=768)
BOE_BATCH, BOE_PROMPT, BOE_BUDGET, BOE_CANDIDATES, BOE_RHO = 8, 32, 32, 64, 0.25
ERRORS = []  # every failed measurement, for --json


def attempt(label, thunk):
    """thunk(), or None after printing an ERROR row: one failure must not end the benchmark."""
    try:
        return thunk()
    except Exception as err:
        message = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        print(f"ERROR   {label}: {message}", flush=True)
        ERRORS.append(dict(what=label, error=message))
        return None


def gpu_median_ms(fn, rep_ms=REP_MS):
    from triton.testing import do_bench  # imported here: the CPU path runs without triton

    return do_bench(fn, warmup=WARMUP_MS, rep=rep_ms, return_mode="median")


def cpu_median_ms(fn):
    fn()  # warm-up
    times = []
    for _ in range(CPU_RUNS):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def implementations(gpu):
    """(impls, candidate, reference): impls maps a name to (attn(q, k, v, active), sparse backward?),
    the dense baseline first; the checks put `candidate` on trial, and its gradients must match
    `reference`'s."""
    torch_path = partial(active_query_attention, backend="torch")
    if not gpu:
        return {"sdpa": (lambda q, k, v, active: F.scaled_dot_product_attention(q, k, v), False),
                "reference": (reference_attention, False), "torch": (torch_path, True)}, "torch", "reference"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(q, k, v, active):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)  # [B, H, L, D]

    return {"flash": (flash, False), "triton": (partial(active_query_attention, backend="triton"), True),
            "torch": (torch_path, True)}, "triton", "torch"


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
    error = max(((g - w).float().abs().max() / w.float().abs().max()).item() for g, w in zip(*grads))
    ok = error <= GRAD_TOLERANCE[q.dtype]  # False on NaN
    print(f"{'check' if ok else 'WARNING'} {label} gradients: max error / max |grad| {error:.2e}"
          f"{'' if ok else ' -- this backward is wrong, its timings mean nothing'}", flush=True)
    return dict(check="gradients", what=label, error=error, ok=ok)


def measure(name, attn, q, k, v, dout, active, rho, timer):
    """One row: fwd, bwd (autograd.grad on one retained graph) and both, in ms and TFLOP/s."""
    batch, heads, seq_len, head_dim = q.shape
    n_active = int(active.sum(1).max())  # rows per sequence (all sequences have the same count)
    label = f"{name} L={seq_len} D={head_dim} rho={rho}"

    def backward_only():
        out = attn(q, k, v, active)  # [B, H, L, D]; its graph is kept for every timed backward
        return timer(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))

    ms = {"fwd": attempt(f"{label} fwd", lambda: timer(lambda: attn(q, k, v, active))),
          "bwd": attempt(f"{label} bwd", backward_only),
          "both": attempt(f"{label} both", lambda: timer(lambda: torch.autograd.grad(
              attn(q, k, v, active), (q, k, v), dout)))}
    flops = {"fwd": 4 * batch * heads * seq_len * seq_len * head_dim,
             "bwd": 10 * batch * heads * n_active * seq_len * head_dim}
    flops["both"] = flops["fwd"] + flops["bwd"]
    row = dict(impl=name, L=seq_len, D=head_dim, B=batch, H=heads, rho=rho, n_active=n_active)
    for kind in ms:
        row[f"{kind}_ms"] = ms[kind]
        row[f"{kind}_tflops"] = None if ms[kind] is None else flops[kind] / ms[kind] / 1e9
    return row


COLUMNS = [  # (key, title, width, format) of a kernel row
    ("impl", "impl", 10, "s"), ("L", "L", 6, "d"), ("D", "D", 5, "d"), ("B", "B", 4, "d"), ("H", "H", 4, "d"),
    ("rho", "rho", 7, "s"), ("n_active", "|A|", 7, "d"), ("fwd_ms", "fwd ms", 9, ".3f"),
    ("bwd_ms", "bwd ms", 9, ".3f"), ("both_ms", "both ms", 9, ".3f"), ("fwd_tflops", "fwd TF", 9, ".3g"),
    ("bwd_tflops", "bwd TF", 9, ".3g"), ("bwd_speedup", "bwd x", 8, ".2f"), ("ideal", "ideal", 7, ".1f")]


def print_row(row):
    print("".join(f"{fmt(row.get(key), spec):>{width}}" for key, _, width, spec in COLUMNS), flush=True)


def finish_row(row, base):
    """Adds the backward speed-up over `base` (the dense baseline's row) and its ideal L/|A|; prints."""
    both = base["bwd_ms"] and row["bwd_ms"]
    row["bwd_speedup"] = base["bwd_ms"] / row["bwd_ms"] if both else None
    row["ideal"] = row["L"] / row["n_active"]
    print_row(row)
    return row


def kernel_sweep(impls, candidate, reference, shapes, fractions, device, dtype, timer):
    """Per (B, H, L, D): checks, the dense paths once, the sparse paths at each rho; returns (rows, checks)."""
    dense = [name for name, (_, sparse) in impls.items() if not sparse]
    print(f"times in ms; TF = TFLOP/s of the FLOPs above; bwd x = {dense[0]} bwd time / bwd time, ideal L/|A|")
    print("".join(f"{title:>{width}}" for _, title, width, _ in COLUMNS))
    rows, checks = [], []
    for shape in shapes:  # a failure (out of memory, say) loses that shape's rows, not the run's
        attempt(f"B, H, L, D = {shape}", lambda: sweep_shape(
            impls, candidate, dense, reference, shape, fractions, device, dtype, timer, rows, checks))
        if cuda_broken():
            print("stopping: after a CUDA error the process cannot launch anything reliably", flush=True)
            break
    return rows, [c for c in checks if c is not None]


def cuda_broken():
    """True once a measurement failed with a CUDA error, which poisons every later launch."""
    return any("CUDA error" in e["error"] or "illegal memory access" in e["error"] for e in ERRORS)


def sweep_shape(impls, candidate, dense, reference, shape, fractions, device, dtype, timer, rows, checks):
    """One (B, H, L, D): appends its check results to `checks` and its timing rows to `rows`."""
    batch, heads, seq_len, head_dim = shape
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))  # [B, H, L, D] each
    dout = torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype)  # [B, H, L, D]
    label = f"{candidate} L={seq_len} D={head_dim}"
    checks.append(attempt(f"{label} forward check", lambda: check_forward(
        impls[candidate][0], impls[dense[0]][0], q, k, v, label)))
    everything = torch.ones(batch, seq_len, dtype=torch.bool, device=device)  # [B, L]
    base, *others = [measure(name, impls[name][0], q, k, v, dout, everything, "dense", timer)
                     for name in dense]
    rows += [finish_row(row, base) for row in (base, *others)]
    for rho in fractions:
        active = random_active(batch, seq_len, float(Fraction(rho)), device)  # [B, L]
        checks.append(attempt(f"{label} rho={rho} gradient check", lambda: check_gradients(
            impls[candidate][0], impls[reference][0], q, k, v, dout, active, f"{label} rho={rho}")))
        rows += [finish_row(measure(name, attn, q, k, v, dout, active, rho, timer), base)
                 for name, (attn, sparse) in impls.items() if sparse]


def boe_steps(device, dtype, timer):
    """Time and peak memory of one confidence step and of one BoE step (sparse / dense backward)."""
    import boe  # imported here so that a boe.py that fails to import only costs this section

    torch.manual_seed(0)
    model = boe.MaskedDiffusionTransformer(boe.ModelConfig(**BOE_MODEL)).to(device=device, dtype=dtype).eval()
    mask_id, seq_len = BOE_MODEL["mask_id"], BOE_MODEL["seq_len"]
    tokens = torch.full((BOE_BATCH, seq_len), mask_id, device=device)  # [B, L], masked after the prompt
    tokens[:, :BOE_PROMPT] = torch.randint(mask_id, (BOE_BATCH, BOE_PROMPT), device=device)
    masked = tokens == mask_id  # [B, L]
    steps_left = math.ceil((seq_len - BOE_PROMPT) / BOE_BUDGET)
    budget = (masked.sum(1) + steps_left - 1) // steps_left  # [B] ceil(masked / steps_left) = BOE_BUDGET
    sparse = boe.SamplerConfig(candidates=BOE_CANDIDATES, rho=BOE_RHO)
    boe.ATTENTION_BACKEND = "triton"
    n_active = BOE_CANDIDATES + min(math.ceil(BOE_RHO * seq_len), seq_len - BOE_PROMPT - BOE_CANDIDATES)
    print(f"\nBoE step: {BOE_MODEL}, batch {BOE_BATCH}, prompt {BOE_PROMPT}, budget {int(budget[0])}, "
          f"candidates {BOE_CANDIDATES}, rho {BOE_RHO}: {n_active} of {seq_len} rows active; peak = max allocated")

    def step(rule, cfg):
        @torch.no_grad()
        def run():  # one step of boe.generate, without the reveal
            logits, probs = boe.predict(model, tokens)  # [B, L, V] float32
            zeros = torch.zeros(BOE_BATCH, dtype=torch.long, device=device)  # [B]
            values = dict(model=model, tokens=tokens, masked=masked, logits=logits, probs=probs, budget=budget,
                          has_choice=budget < masked.sum(1), steps_left=steps_left, steps=steps_left + 1,
                          cfg=cfg, generators=[], forwards=zeros, backwards=zeros.clone())
            # Pass the fields boe.Step has; one it has and this script does not know raises a TypeError.
            s = boe.Step(**{f.name: values[f.name] for f in fields(boe.Step) if f.name in values})
            return rule(s)  # [B, L] scores, under no_grad as in boe.generate
        return run

    def peak_gib(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30

    rows = []
    for name, fn in (("confidence step", step(boe.score_confidence, sparse)),
                     ("BoE step, Triton sparse backward", step(boe.score_boe, sparse)),
                     ("BoE step, dense backward", step(boe.score_boe, replace(sparse, sparse_backward=False)))):
        row = dict(step=name, peak_gib=attempt(f"{name} memory", lambda: peak_gib(fn)),
                   ms=attempt(f"{name} time", lambda: timer(fn, rep_ms=3 * REP_MS)))
        conf_ms = rows[0]["ms"] if rows else row["ms"]
        row["x_confidence"] = None if None in (conf_ms, row["ms"]) else row["ms"] / conf_ms
        rows.append(row)
        print(f"{name:<34}{fmt(row['ms'], '.2f'):>9} ms {fmt(row['x_confidence'], '.2f'):>6}x confidence"
              f"   peak {fmt(row['peak_gib'], '.2f'):>6} GiB", flush=True)
    return rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def find(rows, **where):
    return next((r for r in rows if all(r.get(key) == value for key, value in where.items())), None)


def forward_ratio(rows, impl, seq_len, head_dim):
    """Median over rho of impl's forward time / the dense baseline's forward time, or None."""
    base = find(rows, impl=rows[0]["impl"], L=seq_len, D=head_dim)
    ratios = [r["fwd_ms"] / base["fwd_ms"] for r in rows
              if (r["impl"], r["L"], r["D"]) == (impl, seq_len, head_dim) and r["fwd_ms"] and base["fwd_ms"]]
    return statistics.median(ratios) if ratios else None


def speedup_cell(row):
    return "-" if row is None else f"{fmt(row['bwd_speedup'], '.2f')} ({row['ideal']:.3g})"


def print_summary(rows, seq_lens, head_dims, fractions):
    if not rows:
        return print("\nno kernel rows to summarise")
    baseline = rows[0]["impl"]
    sparse = sorted({r["impl"] for r in rows if r["rho"] != "dense"}, key=lambda name: name != "triton")
    print(f"\nbackward speed-up over the dense {baseline} backward (ideal L/|A| in brackets); "
          f"fwd = forward time / {baseline} forward time, median over rho")
    print(f"{'impl':<8}{'L':>6}{'D':>5}" + "".join(f"{rho:>14}" for rho in fractions) + f"{'fwd':>7}")
    for impl in sparse:
        for seq_len in seq_lens:
            for head_dim in head_dims:
                cells = [speedup_cell(find(rows, impl=impl, L=seq_len, D=head_dim, rho=rho)) for rho in fractions]
                ratio = fmt(forward_ratio(rows, impl, seq_len, head_dim), ".2f")
                print(f"{impl:<8}{seq_len:>6}{head_dim:>5}" + "".join(f"{c:>14}" for c in cells) + f"{ratio:>7}")


def goals(rows, boe_rows, checks):
    """(goal, measured, target, met) for the benchmark targets; measured is None where a size was not
    run, or where the Triton path failed its correctness check there (a fast wrong kernel meets nothing)."""
    passed = {(c["check"], c["what"]) for c in checks if c["ok"]}

    def checked(head_dim, rho=None):
        label = f"triton L=4096 D={head_dim}"
        return ("forward", label) in passed and (rho is None or ("gradients", f"{label} rho={rho}") in passed)

    def speedup(head_dim, rho):
        row = find(rows, impl="triton", L=4096, D=head_dim, rho=rho)
        return row.get("bwd_speedup") if row and checked(head_dim, rho) else None

    def forward(head_dim):
        return forward_ratio(rows, "triton", 4096, head_dim) if checked(head_dim) else None

    boe_ratio = boe_rows[1]["x_confidence"] if len(boe_rows) > 1 else None
    table = [("triton bwd speed-up, L=4096 D=64 rho=1/4 (ideal 4x)", speedup(64, "1/4"), 3.0, True),
             ("triton bwd speed-up, L=4096 D=128 rho=1/4 (ideal 4x)", speedup(128, "1/4"), 2.5, True),
             ("triton bwd speed-up, L=4096 D=64 rho=1/16 (ideal 16x)", speedup(64, "1/16"), 8.0, True),
             ("triton fwd / flash fwd, L=4096 D=64", forward(64), 1.2, False),
             ("triton fwd / flash fwd, L=4096 D=128", forward(128), 1.2, False),
             ("BoE step (Triton) / confidence step", boe_ratio, 2.5, False)]
    return [dict(goal=g, measured=m, target=t, met=None if m is None else (m >= t if up else m <= t),
                 direction=">=" if up else "<=") for g, m, t, up in table]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths L")
    parser.add_argument("--head-dims", type=int, nargs="+", help="head dims D")
    parser.add_argument("--fractions", type=Fraction, nargs="+", help="active fractions rho, e.g. 1/16 0.25 1")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="GPU dtype (CPU uses fp32)")
    parser.add_argument("--quick", action="store_true", help="a few sizes only")
    parser.add_argument("--json", metavar="PATH", help="write every number here")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if gpu and not attn_kernel.HAS_TRITON:
        parser.error(f"on a GPU, bench.py times the Triton kernels: {attn_kernel.TRITON_MISSING}")
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
              f"{results['dtype']}; B = {TOKENS} // L, H = {WIDTH} // D; medians of "
              f"do_bench(warmup={WARMUP_MS}, rep={REP_MS})")
    else:
        results.update(device=f"cpu ({platform.processor() or platform.machine()})")
        print(f"No CUDA GPU: a small CPU comparison of the PyTorch active-row path against dense autograd "
              f"(fp32, {torch.get_num_threads()} threads, median of {CPU_RUNS} wall times); meaningless for a GPU.")
    torch.manual_seed(0)
    start = time.time()
    timer = gpu_median_ms if gpu else cpu_median_ms
    try:
        rows, checks = kernel_sweep(*implementations(gpu), shapes, fractions, device, dtype, timer)
        results.update(kernel=rows, checks=checks)
        run_boe = gpu and not cuda_broken()
        boe_rows = (attempt("BoE step", lambda: boe_steps(device, dtype, timer)) or []) if run_boe else []
        results.update(boe_step=boe_rows)
        print_summary(rows, seq_lens, head_dims, fractions)
        if gpu:
            results["goals"] = goals(rows, boe_rows, checks)
            print(f"\n{'goal':<56}{'measured':>9}{'target':>10}")
            for g in results["goals"]:
                status = "not measured or check failed" if g["met"] is None else "met" if g["met"] else "NOT met"
                print(f"{g['goal']:<56}{fmt(g['measured'], '.2f'):>9}{g['direction']:>6}{g['target']:>4}  {status}")
        failed = [c["what"] for c in checks if not c["ok"]]
        print(f"\n{len(ERRORS)} errors, {len(failed)} failed checks{': ' + ', '.join(failed) if failed else ''}; "
              f"{time.time() - start:.0f} s")
    finally:  # whatever was measured is kept, even if the run breaks off
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(results, errors=ERRORS, seconds=time.time() - start), f, indent=1)


if __name__ == "__main__":
    main()
