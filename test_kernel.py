"""Tests of attn_kernel: both backends against a float64 dense reference, by the same properties.

Without a GPU the "triton" backend runs its kernels in Triton's CPU interpreter (conftest.py sets
TRITON_INTERPRET=1 before this module imports attn_kernel), so shapes stay small. On a GPU the "gpu"
hypothesis profile (HYPOTHESIS_PROFILE=gpu, the default there) also draws long sequences and bfloat16.
Without triton installed the Triton tests skip, and one test checks the module without it on any machine.
"""
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from typing import Optional
from unittest import mock

import numpy
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st

import attn_kernel
from attn_kernel import active_query_attention, reference_attention
from conftest import WORST_RELATIVE_ERROR, needs_triton, run_without_triton

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]
MAX_LEN = 4096 if ON_GPU else 160
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# Explicit tile sizes are drawn on the CPU only: on a GPU every new size means another compilation.
BLOCK_CHOICES = [None] if ON_GPU else [None, 32, 64]
ROW_PADDING = 129  # NaN rows after each sequence's view: more than any tile can overrun

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


@dataclasses.dataclass(frozen=True)
class Problem:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: torch.dtype
    # One active-set pattern per sequence: ("empty",), ("all",), ("single", row), ("run", start, length),
    # ("random", percent) or ("strided", offset, step); rows are taken modulo seq_len.
    patterns: tuple
    block_m: Optional[int] = None
    block_n: Optional[int] = None
    sharpness: float = 1.0  # multiplies q: larger values give peakier softmax rows
    seed: int = 0


def active_rows(pattern, seq_len, generator):
    """bool [seq_len] for one pattern of Problem.patterns."""
    kind, *args = pattern
    rows = torch.arange(seq_len)
    if kind == "empty":
        return torch.zeros(seq_len, dtype=torch.bool)
    if kind == "all":
        return torch.ones(seq_len, dtype=torch.bool)
    if kind == "single":
        return rows == args[0] % seq_len
    if kind == "run":
        start = args[0] % seq_len
        return (rows >= start) & (rows < start + args[1])
    if kind == "strided":
        return rows % args[1] == args[0] % args[1]
    return torch.rand(seq_len, generator=generator) < args[0] / 100  # "random"


def nan_padded_view(shape, dtype, generator):
    """Random [B, H, L, D] values inside a NaN-filled [B, L + padding, H, D + 16] buffer.

    The view has a model-like layout (heads interleaved along a sequence) and any read outside it,
    past the last row or column, returns NaN, which the finiteness checks then catch.
    """
    batch, heads, seq_len, head_dim = shape
    buffer = torch.full((batch, seq_len + ROW_PADDING, heads, head_dim + 16), float("nan"), dtype=dtype, device=DEVICE)
    view = buffer[:, 1:seq_len + 1, :, :head_dim].transpose(1, 2)  # [B, H, L, D]
    view.copy_(torch.randn(shape, generator=generator).to(dtype))
    return view


def make_inputs(problem):
    generator = torch.Generator().manual_seed(problem.seed)
    shape = (problem.batch, problem.heads, problem.seq_len, problem.head_dim)
    q, k, v = (nan_padded_view(shape, problem.dtype, generator) for _ in range(3))
    q.mul_(problem.sharpness)
    active = torch.stack([active_rows(p, problem.seq_len, generator) for p in problem.patterns]).to(DEVICE)
    dout = torch.randn(shape, generator=generator).to(problem.dtype).to(DEVICE)  # also nonzero on inactive rows
    return q, k, v, active, dout


def run_with_grads(fn, q, k, v, dout, dtype=None):
    """fn's output and the gradients of <output, dout> w.r.t. q, k, v (cast to dtype first if given)."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), *(x.grad for x in leaves)


def run_backend(backend, problem, q, k, v, active, dout):
    def fn(q, k, v):
        out = active_query_attention(q, k, v, active, backend=backend,
                                     block_m=problem.block_m, block_n=problem.block_n)
        if backend == "triton":  # the kernels ran, not a silent fallback to PyTorch
            assert type(out.grad_fn).__name__ == "_ActiveQueryAttentionBackward"
        return out

    if backend == "triton":
        with mock.patch.object(attn_kernel, "_torch_attention", side_effect=AssertionError("torch path taken")):
            return run_with_grads(fn, q, k, v, dout)
    return run_with_grads(fn, q, k, v, dout)


def detach_inactive(out, active):
    return torch.where(active[:, None, :, None], out, out.detach())  # [B, H, L, D]


def assert_close(name, actual, expected, bound):
    error = (actual.double() - expected).norm().item()
    assert error <= bound, f"{name}: error norm {error:.3g} > bound {bound:.3g} (reference norm {expected.norm():.3g})"


PATTERNS = st.one_of(
    st.just(("empty",)),
    st.just(("all",)),
    st.tuples(st.just("single"), st.integers(0, MAX_LEN - 1)),
    st.tuples(st.just("run"), st.integers(0, MAX_LEN - 1), st.integers(1, MAX_LEN)),
    st.tuples(st.just("random"), st.integers(1, 99)),
    st.tuples(st.just("strided"), st.integers(0, 7), st.integers(2, 8)),
)


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 3))
    return Problem(
        batch=batch,
        heads=draw(st.integers(1, 4 if ON_GPU else 2)),
        seq_len=draw(st.one_of(st.integers(1, 70), st.integers(1, MAX_LEN))),
        head_dim=draw(st.sampled_from(attn_kernel.SUPPORTED_HEAD_DIMS)),
        dtype=draw(st.sampled_from(DTYPES)),
        patterns=tuple(draw(PATTERNS) for _ in range(batch)),
        block_m=draw(st.sampled_from(BLOCK_CHOICES)),
        block_n=draw(st.sampled_from(BLOCK_CHOICES)),
        sharpness=draw(st.sampled_from([1.0, 4.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def single(seq_len, patterns, dtype=torch.float32, **kwargs):
    return Problem(batch=len(patterns), heads=2, seq_len=seq_len, head_dim=32, dtype=dtype, patterns=patterns, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=problems())
@example(problem=single(1, (("all",),)))
@example(problem=single(1, (("empty",), ("all",))))
@example(problem=single(33, (("random", 50), ("all",)), block_m=32, block_n=32))  # L = block + 1
@example(problem=single(100, (("run", 5, 33), ("single", 99)), block_m=32, block_n=32))  # nA = block + 1
@example(problem=single(40, (("random", 30), ("strided", 1, 3)), dtype=torch.float16, block_m=16, block_n=16))
@example(problem=single(70, (("empty",), ("empty",))))
@example(problem=single(70, (("all",), ("all",)), dtype=torch.float16, sharpness=4.0))
@example(problem=single(70, (("random", 50), ("single", 3)), sharpness=30.0))  # nearly one-hot rows
@example(problem=single(70, (("random", 50), ("single", 3)), dtype=torch.float16, sharpness=30.0))
def test_matches_float64_reference_and_only_active_rows_carry_gradient(backend, problem):
    check_against_float64(backend, problem, *make_inputs(problem))


def check_against_float64(backend, problem, q, k, v, active, dout):
    """The properties every input must have: out, dq, dk, dv close to the float64 reference (and
    finite), dq exactly zero on inactive rows, zero dk and dv for a sequence with no active row."""
    results = run_backend(backend, problem, q, k, v, active, dout)
    expected = run_with_grads(lambda q, k, v: reference_attention(q, k, v, active), q, k, v, dout, torch.float64)

    if problem.dtype == torch.float32:
        bounds = [1e-4 * e.norm().item() + 1e-5 * math.sqrt(e.numel()) for e in expected]
    else:
        # Twice the error of PyTorch's own attention in this dtype, the larger of two: plain matmul and
        # softmax, and SDPA. SDPA builds Delta from the rounded output, as these kernels do (as
        # FlashAttention does); where dq is small next to the terms of dP - Delta that cancel, as with
        # a single nearly one-hot row, that costs more than the plain softmax backward does.
        plain = run_with_grads(lambda q, k, v: reference_attention(q, k, v, active), q, k, v, dout)
        fused = run_with_grads(lambda q, k, v: detach_inactive(F.scaled_dot_product_attention(q, k, v), active),
                               q, k, v, dout)
        eps = torch.finfo(problem.dtype).eps
        bounds = [(2 * max((p.double() - e).norm(), (f.double() - e).norm()) + 2 * eps * e.norm()).item()
                  + 1e-5 * math.sqrt(e.numel()) for p, f, e in zip(plain, fused, expected)]
    for name, actual, reference, bound in zip(["out", "dq", "dk", "dv"], results, expected, bounds):
        assert torch.isfinite(actual).all(), f"{name} has NaN or inf"
        assert_close(name, actual, reference, bound)
        if reference.norm() > 0:  # reported at the end of the run (conftest.py)
            key = (backend, str(problem.dtype).removeprefix("torch."), name)
            relative = ((actual.double() - reference).norm() / reference.norm()).item()
            WORST_RELATIVE_ERROR[key] = max(WORST_RELATIVE_ERROR.get(key, 0.0), relative)

    out, dq, dk, dv = results
    assert not dq.masked_select(~active[:, None, :, None]).any(), "dq must be exactly zero on inactive rows"
    for b, pattern_rows in enumerate(active):
        if not pattern_rows.any():
            assert not dk[b].any() and not dv[b].any(), "an empty active set must give zero dk, dv"


@needs_triton
@pytest.mark.skipif(ON_GPU, reason="on a GPU every test already runs the GPU's tiles")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_default_tiles_are_right_in_the_interpreter(head_dim, dtype, monkeypatch):
    # The interpreter defaults to 32 x 32 tiles; a GPU uses oblong ones (up to 128 rows or keys).
    interpreter_tiles = attn_kernel._tile_sizes

    def gpu_tiles(*args):
        with mock.patch.object(attn_kernel, "INTERPRETED", False):
            return interpreter_tiles(*args)

    monkeypatch.setattr(attn_kernel, "_tile_sizes", gpu_tiles)
    assert gpu_tiles("dkdv", head_dim, dtype, None, None) != (32, 32)  # really not the interpreter's tiles
    problem = Problem(batch=2, heads=1, seq_len=150, head_dim=head_dim, dtype=dtype,
                      patterns=(("random", 60), ("run", 10, 129)))
    check_against_float64("triton", problem, *make_inputs(problem))


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_past_2_to_the_31_elements_are_exact(backend):
    # q as a view whose last head starts 2^31 elements into its buffer (4 GiB of fp16, allocated but
    # barely touched): offsets computed in int32 would wrap around.
    problem = Problem(batch=1, heads=3, seq_len=17, head_dim=16, dtype=torch.float16, patterns=(("random", 50),))
    _, k, v, active, dout = make_inputs(problem)
    buffer = torch.empty(2**31 + 2**20, dtype=torch.float16, device=DEVICE)
    q = buffer.as_strided((1, 3, 17, 16), (0, 2**30, 16, 1))  # [B, H, L, D]
    q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(q.dtype))
    check_against_float64(backend, problem, q, k, v, active, dout)


class RecordLaunches:
    """Stands in for a @triton.jit kernel: notes each launch's (name, grid, arguments) in `log`, then launches it."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def record_and_launch(*args, **kwargs):
            self.log.append((self.name, grid, args))
            return launch(*args, **kwargs)
        return record_and_launch


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_k_v_in_three_different_layouts(backend):
    # Every other test gives k and v one layout, so reading v with k's strides would pass them.
    problem = single(45, (("random", 40), ("run", 3, 20)))
    q, k, v, active, dout = make_inputs(problem)
    q = q.contiguous()  # [B, H, L, D]
    # D not the fastest axis: the kernels read rows of D contiguous values, so k must be copied first
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # [B, H, L, D], stored as [B, H, D, L]
    buffer = torch.full((45 + 7, 2, 2, 32 + 8), float("nan"), device=DEVICE)  # [L + pad, B, H, D + pad]
    v = buffer[2:47, :, :, :32].permute(1, 2, 0, 3).copy_(v)  # [B, H, L, D], rows B * H * (D + pad) apart
    assert len({q.stride(), k.stride(), v.stride()}) == 3 and k.stride(-1) != 1
    check_against_float64(backend, problem, q, k, v, active, dout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_far_below_zero_with_a_padded_key_tile(backend):
    # Softmax is shift invariant, so rows whose every logit lies near -115 are ordinary attention. A padded
    # key of the last tile then reads as logit 0, far above the row's log-sum-exp (below -128 in base 2 for
    # every row here), where exp overflows: only masking it keeps inf * 0 = NaN out of dq.
    problem = single(33, (("random", 50), ("all",)))  # L = a 32-key tile + 1
    q, k, v, active, dout = make_inputs(problem)
    q.add_(4.5)  # q.k about -20 D, scaled by 1 / sqrt(D): -115 for every key
    k.sub_(4.5)
    check_against_float64(backend, problem, q, k, v, active, dout)


@needs_triton
@pytest.mark.parametrize("block_m, block_n", [(None, None), (16, 64), (64, 16)])
def test_explicit_tiles_reach_the_launches(block_m, block_n, monkeypatch):
    # Ignored tiles would still give right results, and the tests drawing tiles would test one tiling only.
    launched = []
    for name in ("_attention_forward_kernel", "_attention_backward_kernel"):
        monkeypatch.setattr(attn_kernel, name, RecordLaunches(getattr(attn_kernel, name), name, launched))
    seq_len = 70
    q, k, v, active, dout = make_inputs(single(seq_len, (("random", 50),)))
    q.requires_grad_(), k.requires_grad_()
    active_query_attention(q, k, v, active, backend="triton", block_m=block_m, block_n=block_n).backward(dout)
    forward_rows = attn_kernel._tile_sizes("forward", 32, q.dtype, block_m, block_n)[0]  # the defaults where None
    rows = attn_kernel._tile_sizes("dq", 32, q.dtype, block_m, block_n)[0]
    keys = attn_kernel._tile_sizes("dkdv", 32, q.dtype, block_m, block_n)[1]
    if block_m is not None:
        assert forward_rows == rows == block_m and keys == block_n
    (_, forward_grid, _), (_, backward_grid, _) = launched
    assert forward_grid[0] == math.ceil(seq_len / forward_rows)  # one program per BLOCK_M query rows
    assert backward_grid[0] == math.ceil(seq_len / rows) + math.ceil(seq_len / keys)  # dQ, then dK/dV programs


@needs_triton
def test_prepare_kernel_lists_the_active_rows_and_sums_delta_in_float32():
    # The prepare kernel alone, on buffers filled with garbage: per sequence the count of active rows, the
    # active rows ascending then the inactive ones descending, and Delta = rowsum(out * dOut) of the active
    # rows summed in float32 (an fp16 sum stays within the end-to-end tolerances, so only this sees it).
    batch, heads, seq_len, head_dim = 3, 2, 75, 64  # 75 rows: three listing steps of 32 in the interpreter
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(batch, heads, seq_len, head_dim, generator=gen).half().to(DEVICE)  # [B, H, L, D]
    dout = (30 * torch.randn(batch, heads, seq_len, head_dim, generator=gen)).half().to(DEVICE)  # [B, H, L, D]
    active = torch.stack([torch.zeros(seq_len, dtype=torch.bool), torch.rand(seq_len, generator=gen) < 0.4,
                          torch.ones(seq_len, dtype=torch.bool)]).to(DEVICE)  # [B, L]
    rows = torch.full((batch, seq_len), -1, dtype=torch.int32, device=DEVICE)  # [B, L]
    counts = torch.full((batch,), -1, dtype=torch.int32, device=DEVICE)  # [B]
    delta = torch.full((batch, heads, seq_len), math.nan, device=DEVICE)  # [B, H, L]
    per_program, listing_step = attn_kernel._tile_sizes("prepare", head_dim, out.dtype, None, None)
    attn_kernel._attention_backward_prepare_kernel[(math.ceil(seq_len / per_program), heads, batch)](
        out, dout, active, delta, rows, counts, *attn_kernel._row_strides(dout), *active.stride(), heads, seq_len,
        HEAD_DIM=head_dim, BLOCK_M=per_program, SCAN_BLOCK=listing_step)
    for b in range(batch):
        on, off = active[b].nonzero().flatten(), (~active[b]).nonzero().flatten()
        assert counts[b].item() == len(on)
        assert torch.equal(rows[b, : len(on)].long(), on) and torch.equal(rows[b, len(on) :].long(), off.flip(0))
    terms = out.double() * dout.double()  # [B, H, L, D] the fp16 values' products, exact
    on_rows = active[:, None, :].expand(batch, heads, seq_len)  # [B, H, L]
    error = (delta.double() - terms.sum(-1))[on_rows].abs()
    assert (error <= 1e-6 * terms.abs().sum(-1)[on_rows]).all(), error.max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_shared_across_heads_and_transposed_dout(backend):
    # k and v expanded over heads (stride 0, as in multi-query attention); dOut not contiguous along D, so
    # the Triton path has to copy it.
    problem = single(45, (("random", 40), ("strided", 2, 5)))
    q, k, v, active, dout = make_inputs(problem)
    k, v = (x[:, :1].expand(x.shape) for x in (k, v))  # [B, H, L, D], stride 0 along H
    dout = dout.transpose(2, 3).contiguous().transpose(2, 3)  # [B, H, L, D], unit stride along L
    check_against_float64(backend, problem, q, k, v, active, dout)


@needs_triton
def test_triton_backward_reads_a_strided_dout_in_place(monkeypatch):
    # A dOut with unit stride along D but heads interleaved, inside a NaN-padded buffer: the kernels take it
    # through its strides, without a copy, and read nothing outside it.
    problem = single(45, (("random", 40), ("run", 3, 20)))
    q, k, v, active, _ = make_inputs(problem)
    dout = nan_padded_view(q.shape, q.dtype, torch.Generator().manual_seed(1))  # [B, H, L, D], not contiguous
    launched = []
    monkeypatch.setattr(attn_kernel, "_attention_backward_kernel",
                        RecordLaunches(attn_kernel._attention_backward_kernel, "backward", launched))
    check_against_float64("triton", problem, q, k, v, active, dout)
    (_, _, args), = launched
    assert args[3].data_ptr() == dout.data_ptr() and args[3].stride() == dout.stride()


@needs_triton
def test_triton_path_writes_every_row_and_reads_only_what_it_wrote(monkeypatch):
    # Every buffer the Triton path allocates (out, lse, the row list and its counts, Delta, dQ, dK, dV) comes
    # unfilled from torch.empty or torch.empty_like. Here those hand out NaN (floats) and -1 (integers), so a
    # row that no kernel writes, or a read of an entry that no kernel wrote, shows up as NaN or as a wrong
    # gradient (a row index of -1 reads the NaN padding before q, k, v and dOut).
    def with_garbage(allocate):
        def allocate_garbage(*args, **kwargs):
            x = allocate(*args, **kwargs)
            return x.fill_(float("nan") if x.is_floating_point() else -1)
        return allocate_garbage

    problem = single(75, (("empty",), ("run", 3, 40), ("all",)), block_m=32, block_n=32)
    q, k, v, active, _ = make_inputs(problem)
    dout = nan_padded_view(q.shape, q.dtype, torch.Generator().manual_seed(1))  # [B, H, L, D]
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", with_garbage(torch.empty))
        patch.setattr(torch, "empty_like", with_garbage(torch.empty_like))
        check_against_float64("triton", problem, q, k, v, active, dout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_active_set_gives_dense_attention_gradients(backend):
    problem = single(50, (("all",), ("all",)))
    q, k, v, active, dout = make_inputs(problem)
    results = run_backend(backend, problem, q, k, v, active, dout)
    dense = run_with_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v, dout)
    for name, actual, expected in zip(["out", "dq", "dk", "dv"], results, dense):
        assert_close(name, actual, expected.double(), 1e-4 * expected.norm().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs_grad", ["q", "kv", "v", ""])
def test_gradients_only_for_inputs_that_require_them(backend, needs_grad, monkeypatch):
    seq_len = 40
    q, k, v, active, dout = make_inputs(single(seq_len, (("random", 40), ("single", 3))))
    leaves = {name: x.detach().clone().requires_grad_(name in needs_grad) for name, x in zip("qkv", (q, k, v))}
    launched = []  # the Triton backward's launches: (name, grid, arguments)
    if backend == "triton":
        for name in ("_attention_backward_prepare_kernel", "_attention_backward_kernel"):
            monkeypatch.setattr(attn_kernel, name, RecordLaunches(getattr(attn_kernel, name), name, launched))
    out = active_query_attention(leaves["q"], leaves["k"], leaves["v"], active, backend=backend)
    expected = run_with_grads(lambda q, k, v: reference_attention(q, k, v, active), q, k, v, dout, torch.float64)
    assert_close("out", out.detach(), expected[0], 1e-4 * expected[0].norm().item())
    if not needs_grad:
        assert not out.requires_grad
        return
    out.backward(dout)
    if backend == "triton":
        # Two launches, the second with a dQ program per block of rows only if q needs a gradient and a
        # dK/dV program per block of keys only if k or v does.
        dq_rows, _ = attn_kernel._tile_sizes("dq", q.shape[-1], q.dtype, None, None)
        _, kv_keys = attn_kernel._tile_sizes("dkdv", q.shape[-1], q.dtype, None, None)
        programs = (math.ceil(seq_len / dq_rows) * ("q" in needs_grad)
                    + math.ceil(seq_len / kv_keys) * bool({"k", "v"} & set(needs_grad)))
        assert [name for name, _, _ in launched] == ["_attention_backward_prepare_kernel", "_attention_backward_kernel"]
        assert launched[1][1][0] == programs
    for name, reference in zip("qkv", expected[1:]):
        grad = leaves[name].grad
        if name in needs_grad:
            assert_close(f"d{name}", grad, reference, 1e-4 * reference.norm().item() + 1e-7)
        else:
            assert grad is None


def test_torch_backend_forward_is_bitwise_plain_attention():
    q, k, v, active, _ = make_inputs(single(60, (("random", 25), ("empty",))))
    q.requires_grad_()
    out = active_query_attention(q, k, v, active, backend="torch")
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


@needs_triton
def test_auto_backend_picks_triton_when_it_can_and_torch_otherwise(monkeypatch):
    q, k, v, active, _ = make_inputs(single(20, (("all",), ("empty",))))
    q.requires_grad_()
    backward_name = lambda x: type(active_query_attention(x, x, x, active).grad_fn).__name__
    assert backward_name(q) == "_ActiveQueryAttentionBackward"  # CUDA tensors, or interpreted on the CPU
    assert backward_name(torch.randn(2, 2, 20, 24, device=DEVICE, requires_grad=True)) == "AddBackward0"
    monkeypatch.setattr(attn_kernel, "INTERPRETED", False)
    active = active.cpu()
    assert backward_name(q.detach().cpu().requires_grad_()) == "AddBackward0"


@needs_gpu
@needs_triton
def test_backward_is_bitwise_deterministic_on_gpu():
    problem = single(3000, (("random", 25), ("run", 7, 900)), dtype=torch.float16)
    q, k, v, active, dout = make_inputs(problem)
    first, second = (run_backend("triton", problem, q, k, v, active, dout) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_gpu
@needs_triton
def test_forward_and_backward_replayed_from_a_cuda_graph_match_eager():
    # Capturing fails on any host synchronisation, so this also shows that the Triton path has none.
    problem = single(300, (("random", 25), ("run", 7, 90)), dtype=torch.float16)
    q, k, v, active, dout = make_inputs(problem)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]  # [B, H, L, D] each, static
    active, dout = active.clone(), dout.clone()  # static too

    def step():
        out = active_query_attention(*leaves, active, backend="triton")
        return (out.detach(), *torch.autograd.grad(out, leaves, dout))

    side = torch.cuda.Stream()  # warm up (compile) outside the capture, on a side stream, as CUDA graphs ask
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    # New values and a new active set, written into the captured inputs: the replay must compute with them.
    new = make_inputs(dataclasses.replace(problem, patterns=(("strided", 1, 3), ("all",)), seed=1))
    with torch.no_grad():
        for static, value in zip((*leaves, active, dout), new):
            static.copy_(value)
    graph.replay()
    for replayed, eager in zip(captured, step()):
        assert torch.equal(replayed, eager)


def _bad_call(**overrides):
    """Keyword arguments of a call that is valid except for `overrides`."""
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    call = dict(q=q, k=k, v=v, active=torch.ones(2, 8, dtype=torch.bool), backend="triton")
    call.update(overrides)
    return call


@pytest.mark.parametrize("call, error, match", [
    (_bad_call(q=torch.randn(2, 8, 16)), ValueError, "q must be 4-D"),
    (_bad_call(k=torch.randn(2, 2, 9, 16)), ValueError, "k must have the shape of q"),
    (_bad_call(v=torch.randn(2, 2, 8, 16, dtype=torch.float64)), TypeError, "v must have the dtype of q"),
    (_bad_call(v=torch.randn(2, 2, 8, 16, device="meta")), ValueError, "v must be on the device of q"),
    (_bad_call(active=torch.ones(2, 9, dtype=torch.bool)), ValueError, r"active must have shape \[B, L\]"),
    (_bad_call(active=torch.ones(2, 8)), TypeError, "active must be a bool tensor"),
    (_bad_call(active=torch.ones(2, 8, dtype=torch.bool, device="meta")), ValueError, "active must be on the device"),
    pytest.param(_bad_call(**{x: torch.randn(2, 2, 8, 24) for x in "qkv"}), ValueError, "supports head dim D",
                 marks=needs_triton),
    (_bad_call(**{x: torch.randn(2, 2, 8, 0) for x in "qkv"}, backend="torch"), ValueError, "head dim D >= 1"),
    (_bad_call(backend="cuda"), ValueError, "unknown backend"),
    (_bad_call(block_m=24), ValueError, "block_m must be a power of two"),
    (_bad_call(block_n=256), ValueError, "block_n must be a power of two from 16 to 128"),
    (_bad_call(block_m=32.0), ValueError, "block_m must be a power of two"),
    (_bad_call(scale=math.nan, backend="torch"), ValueError, "scale must be None"),
    (_bad_call(scale=10**400, backend="torch"), ValueError, "scale must be None"),  # a Real no float holds
    (_bad_call(scale=torch.tensor([1.0, 2.0])), ValueError, "scale must be None"),
    (_bad_call(scale="0.5", backend="torch"), ValueError, "scale must be None"),
    pytest.param(_bad_call(**{x: torch.randn(2, 2, 8, 16, device="meta") for x in "qkv"},
                           active=torch.ones(2, 8, dtype=torch.bool, device="meta")),
                 ValueError, "runs on CUDA tensors .* got tensors on meta", marks=needs_triton),
])
def test_bad_inputs_raise_clear_errors(call, error, match, monkeypatch):
    monkeypatch.setattr(attn_kernel, "INTERPRETED", True)  # reach the checks behind the interpreter check
    with pytest.raises(error, match=match):
        active_query_attention(**call)


def test_auto_takes_the_torch_path_on_devices_triton_does_not_run_on(monkeypatch):
    monkeypatch.setattr(attn_kernel, "INTERPRETED", True)  # the interpreter runs CPU tensors, not others
    q, k, v = (torch.randn(2, 2, 8, 16, device="meta") for _ in range(3))  # meta stands in for mps or xpu
    out = active_query_attention(q, k, v, torch.ones(2, 8, dtype=torch.bool, device="meta"))
    assert out.device.type == "meta" and out.shape == q.shape


def test_tile_sizes_may_be_any_integer_type():
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    active = torch.ones(1, 8, dtype=torch.bool)
    for block in (numpy.int64(32), torch.tensor(32).item()):
        assert torch.equal(active_query_attention(q, k, v, active, backend="torch", block_m=block, block_n=block),
                           active_query_attention(q, k, v, active, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_infinite_output_stays_infinite_when_inputs_require_grad(backend):
    # An infinite value in v gives infinite outputs; the torch path's zero-valued gradient carrier must not
    # turn them into inf - inf = NaN.
    q, k, v = (torch.randn(1, 1, 8, 16, device=DEVICE) for _ in range(3))
    v[0, 0, 3, 5] = math.inf
    active = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    want = reference_attention(q, k, v, active)  # [1, 1, 8, 16]
    got = active_query_attention(q.requires_grad_(), k, v, active, backend=backend)
    assert want[..., 5].isinf().all() and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[..., 5], want[..., 5])


@needs_triton
def test_batch_past_the_cuda_grid_limit_is_refused_by_triton_and_auto_uses_torch(monkeypatch):
    monkeypatch.setattr(attn_kernel, "INTERPRETED", True)
    batch = attn_kernel.MAX_GRID_AXIS + 1
    # On the CPU everywhere: the refusal comes before any launch, and the PyTorch path's own limits
    # on a GPU are SDPA's.
    q, k, v = (torch.randn(batch, 1, 1, 16, requires_grad=True) for _ in range(3))
    active = torch.ones(batch, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="CUDA's grid limit"):
        active_query_attention(q, k, v, active, backend="triton")
    out = active_query_attention(q, k, v, active)  # auto: the torch path, exact (one key: out = v)
    assert type(out.grad_fn).__name__ == "AddBackward0" and torch.equal(out, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 8, 16), (2, 0, 8, 16), (2, 2, 0, 16)])
def test_empty_batch_heads_or_length_give_empty_output_and_gradients(backend, shape):
    q, k, v = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(3))
    active = torch.ones(shape[0], shape[2], dtype=torch.bool, device=DEVICE)
    out = active_query_attention(q, k, v, active, backend=backend)
    assert out.shape == shape
    out.sum().backward()
    assert all(x.grad.shape == shape for x in (q, k, v))


@needs_triton
@pytest.mark.parametrize("how", ["backward", "grad", "grad allow_unused"])
def test_triton_backward_refuses_to_be_differentiated_again(how):
    # However a second derivative is asked for: an error that says why, not torch's "not used in the graph"
    # or, with allow_unused=True, a silent None that reads as a zero second derivative.
    q, k, v, active, _ = make_inputs(single(16, (("all",),)))
    q.requires_grad_()
    out = active_query_attention(q, k, v, active, backend="triton")
    dq, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        if how == "backward":
            dq.sum().backward()
        else:
            torch.autograd.grad(dq.sum(), q, allow_unused=how == "grad allow_unused")


def test_torch_func_takes_the_torch_path_under_auto_and_is_refused_by_triton():
    q, k, v, active, _ = make_inputs(single(16, (("random", 0.5),)))

    def loss(q, backend="auto"):
        return active_query_attention(q, k, v, active, backend=backend).pow(2).sum()

    q = q.detach().requires_grad_()
    expected, = torch.autograd.grad(loss(q, "torch"), q)
    torch.testing.assert_close(torch.func.grad(loss)(q.detach()), expected)
    if attn_kernel.HAS_TRITON and attn_kernel.INTERPRETED:
        with pytest.raises(RuntimeError, match="cannot run inside torch.func"):
            torch.func.grad(lambda q: loss(q, "triton"))(q.detach())


@needs_triton
def test_bfloat16_is_refused_by_the_cpu_interpreter(monkeypatch):
    monkeypatch.setattr(attn_kernel, "INTERPRETED", True)
    with pytest.raises(TypeError, match="bfloat16 in Triton's CPU interpreter"):
        active_query_attention(**_bad_call(**{x: torch.randn(2, 2, 8, 16, dtype=torch.bfloat16) for x in "qkv"}))


@pytest.mark.parametrize("triton_version, numpy_version, conflict", [
    ("3.6.0", "2.4.6", True), ("3.6.0+git1a2b3c4d", "2.10.0", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False), ("3.10.1", "2.5.0rc1", False)])
def test_interpreter_conflict_is_triton_before_3_7_with_numpy_2_4_or_later(triton_version, numpy_version, conflict):
    message = attn_kernel._interpreter_conflict(triton_version, numpy_version)
    assert (message is not None) == conflict
    if conflict:
        assert triton_version in message and numpy_version in message


@pytest.mark.skipif(not attn_kernel.HAS_TRITON, reason="backend='triton' needs triton installed")
def test_an_interpreter_that_cannot_run_is_named_and_auto_takes_the_torch_path(monkeypatch):
    monkeypatch.setattr(attn_kernel, "INTERPRETED", True)
    monkeypatch.setattr(attn_kernel, "INTERPRETER_CONFLICT", "Triton 3.6.0's CPU interpreter cannot run")
    with pytest.raises(RuntimeError, match="Triton 3.6.0's CPU interpreter cannot run"):
        active_query_attention(**_bad_call())
    q = torch.randn(2, 2, 8, 16, requires_grad=True)
    out = active_query_attention(q, q, q, torch.ones(2, 8, dtype=torch.bool))
    assert type(out.grad_fn).__name__ == "AddBackward0"  # the PyTorch path


@needs_triton
def test_triton_backend_on_cpu_without_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setattr(attn_kernel, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        active_query_attention(**_bad_call())


def test_without_triton_auto_takes_the_torch_path_and_triton_backend_says_how_to_install():
    # In a fresh Python where `import triton` fails, as on macOS or Windows. TRITON_INTERPRET is inherited
    # as set (on a CPU, to 1): without triton it must not make "auto" choose the kernels.
    code = textwrap.dedent("""
        import json, sys, torch, attn_kernel
        device = sys.argv[1]
        generator = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(2, 2, 40, 32, generator=generator).to(device) for _ in range(4))
        active = (torch.rand(2, 40, generator=generator) < 0.3).to(device)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attn_kernel.active_query_attention(*leaves, active)  # backend "auto"
        results = [out, *torch.autograd.grad(out, leaves, dout)]
        wide = [x.double().requires_grad_() for x in (q, k, v)]
        reference = attn_kernel.reference_attention(*wide, active)
        expected = [reference, *torch.autograd.grad(reference, wide, dout.double())]
        try:
            attn_kernel.active_query_attention(q, k, v, active, backend="triton")
            message = None
        except ImportError as err:
            message = str(err)
        print(json.dumps(dict(has_triton=attn_kernel.HAS_TRITON, backward=type(out.grad_fn).__name__, message=message,
                              errors=[((r.double() - e).norm() / e.norm()).item() for r, e in zip(results, expected)])))
    """)
    result = run_without_triton(code, DEVICE, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert not report["has_triton"] and report["backward"] == "AddBackward0"  # the PyTorch path's
    assert max(report["errors"]) < 1e-5, report["errors"]  # out, dq, dk, dv against float64
    assert "triton package, which is not installed" in report["message"] and "pip install triton" in report["message"]


@pytest.mark.skipif(ON_GPU, reason="on a GPU bench.py runs the full benchmark; run it by hand there")
def test_bench_gradient_check_passes_gradients_that_are_zero_everywhere():
    # At L = 1 a row attends to itself alone: dq and dk are 0 in both implementations, which match (not 0 / 0).
    import bench
    q, k, v, dout = (torch.randn(1, 1, 1, 4, requires_grad=True) for _ in range(4))
    active = torch.ones(1, 1, dtype=torch.bool)
    torch_path = functools.partial(attn_kernel.active_query_attention, backend="torch")
    check = bench.check_gradients(torch_path, attn_kernel.reference_attention, q, k, v, dout.detach(), active, "L=1")
    assert check["ok"] and check["error"] < 1e-6


@pytest.mark.parametrize("wrong", ["scaled", "nan"])
def test_bench_checks_flag_a_wrong_forward_and_wrong_gradients(wrong):
    # The GPU run trusts these checks to say when a timing means nothing: a function 1 % off, or NaN, must fail.
    import bench
    q, k, v, dout = (torch.randn(2, 2, 40, 16, requires_grad=True) for _ in range(4))
    active = torch.rand(2, 40, generator=torch.Generator().manual_seed(0)) < 0.5  # [B, L]
    reference = attn_kernel.reference_attention
    off = (lambda q, k, v, active: reference(q, k, v, active) * 1.01) if wrong == "scaled" else \
        (lambda q, k, v, active: reference(q, k, v, active) * math.nan)
    assert not bench.check_forward(off, reference, q, k, v, "wrong")["ok"]
    assert not bench.check_gradients(off, reference, q, k, v, dout.detach(), active, "wrong")["ok"]
    assert bench.check_forward(reference, reference, q, k, v, "right")["ok"]
    assert bench.check_gradients(reference, reference, q, k, v, dout.detach(), active, "right")["ok"]


def test_bench_goals_count_only_sizes_whose_checks_passed():
    # A fast but wrong kernel meets nothing: a goal is measured only where the Triton forward (and, for a
    # sparse size, its gradients) passed their checks; the targets compare in the goal's direction.
    import bench
    rows = [dict(impl="triton", L=4096, D=64, rho="1/4", both_speedup=2.0, bwd_speedup=5.0, fwd_ratio=1.05,
                 both_ms=1.0),
            dict(impl="torch", L=4096, D=64, rho="1/4", both_speedup=1.0, bwd_speedup=2.0, fwd_ratio=1.3,
                 both_ms=1.0)]
    boe_rows = [dict(step=bench.BOE_GOAL_STEP, x_confidence=2.5)]
    checks = [dict(check="forward", what="triton L=4096 D=64", ok=True),
              dict(check="gradients", what="triton L=4096 D=64 rho=1/4", ok=True)]
    met = {goal["goal"]: (goal["measured"], goal["met"]) for goal in bench.goals(rows, boe_rows, checks)}
    assert met["fwd+bwd speed-up over flash, L=4096 D=64 rho=1/4 (ideal 2.15)"] == (2.0, True)  # >= 1.9
    assert met["fwd+bwd speed-up over flash, L=4096 D=128 rho=1/4 (ideal 2.15)"] == (None, None)  # not run
    assert met["triton fwd / flash fwd, L=4096 D=64"] == (1.05, True)  # <= 1.1
    assert met["PyTorch path fwd+bwd / Triton fwd+bwd, worst at L>=2048 rho<=1/2"] == (1.0, True)  # at the target
    assert met["BoE step (Triton) / confidence step"] == (2.5, True)  # <= 2.5, at the target
    wrong_gradients = [checks[0], dict(checks[1], ok=False)]
    met = {goal["goal"]: (goal["measured"], goal["met"]) for goal in bench.goals(rows, boe_rows, wrong_gradients)}
    assert met["fwd+bwd speed-up over flash, L=4096 D=64 rho=1/4 (ideal 2.15)"] == (None, None)
    assert met["triton fwd / flash fwd, L=4096 D=64"] == (1.05, True)  # the forward's check still passed
    assert met["PyTorch path fwd+bwd / Triton fwd+bwd, worst at L>=2048 rho<=1/2"] == (None, None)
    met = {goal["goal"]: (goal["measured"], goal["met"]) for goal in bench.goals(rows, boe_rows, [])}
    assert met["triton fwd / flash fwd, L=4096 D=64"] == (None, None)


def test_bench_cpu_path_runs_without_triton_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_without_triton("import runpy; runpy.run_path('bench.py', run_name='__main__')",
                                "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "No CUDA GPU" in result.stdout and "0 errors, 0 failed checks" in result.stdout
    report = json.loads(out.read_text())
    assert report["triton"] is None and report["kernel"] and all(check["ok"] for check in report["checks"])


@needs_triton
@pytest.mark.skipif(ON_GPU, reason="on a GPU every kernel test compiles and runs the launches")
def test_kernels_compile_for_an_h100_and_an_rtx_gpu_within_their_shared_memory(tmp_path):
    # The interpreter runs the kernels' semantics, not Triton's compiler: bench.py --compile compiles every
    # launch for a GPU on any machine, here in Pythons without TRITON_INTERPRET. Each launch in every dtype
    # must compile within 255 registers a thread and the shared memory the GPU gives a program: at D = 64
    # for an H100 (9.0), and at D = 128, which needs the most, for the RTX 30 series (8.6, 99 KiB). The two
    # compile side by side.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    targets = {"9.0": "64", "8.6": "128"}
    runs = {capability: subprocess.Popen(
        [sys.executable, "bench.py", "--compile", "--capability", capability, "--head-dims", head_dim, "--json",
         str(tmp_path / f"{capability}.json")], cwd=os.path.dirname(__file__), env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for capability, head_dim in targets.items()}
    for capability, head_dim in targets.items():
        stdout, stderr = runs[capability].communicate(timeout=600)
        assert runs[capability].returncode == 0, stderr
        report = json.loads((tmp_path / f"{capability}.json").read_text())
        assert report["errors"] == [] and "0 errors" in stdout
        assert report["capability"] == [int(part) for part in capability.split(".")]
        launches = {(row["dtype"], row["head_dim"], row["kernel"]) for row in report["compiled"]}
        assert launches == {(dtype, int(head_dim), kernel) for dtype in ("bfloat16", "float16", "float32")
                            for kernel in ("forward", "prepare", "backward")}
        for row in report["compiled"]:
            assert 0 < row["registers"] <= 255 and row["fits"] is True, row


@pytest.mark.skipif(not attn_kernel.HAS_TRITON, reason="backend='triton' needs triton installed")
def test_gpus_before_ampere_are_refused_by_triton_and_auto_takes_the_torch_path(monkeypatch):
    monkeypatch.setattr(attn_kernel, "INTERPRETED", True)
    monkeypatch.setattr(attn_kernel, "INTERPRETER_CONFLICT", None)
    monkeypatch.setattr(attn_kernel, "_cuda_capability", lambda x: (7, 5))
    with pytest.raises(ValueError, match="compute capability 8.0 or newer.*this one has 7.5"):
        active_query_attention(**_bad_call())
    q = torch.randn(2, 2, 8, 16, requires_grad=True)
    out = active_query_attention(q, q, q, torch.ones(2, 8, dtype=torch.bool))
    assert type(out.grad_fn).__name__ == "AddBackward0"  # the PyTorch path


def test_bench_compile_without_triton_says_how_to_get_it():
    result = run_without_triton("import runpy; runpy.run_path('bench.py', run_name='__main__')", "--compile")
    assert result.returncode == 2 and "needs the triton package" in result.stderr, result.stderr


@pytest.mark.skipif(not attn_kernel.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("interpret, args, message", [
    ("1", ["--head-dims", "64"], "unset TRITON_INTERPRET"),
    ("0", ["--head-dims", "64", "48"], "head dims (16, 32, 64, 128)"),
    ("0", ["--capability", "9.9"], "--capability must be one of 7.5, 8.0"),  # LLVM would abort on it
])
def test_bench_compile_refuses_the_interpreter_other_head_dims_and_unknown_gpus(interpret, args, message):
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    result = subprocess.run([sys.executable, "bench.py", "--compile", *args], env=env,
                            cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--fractions", "1/0"], "not a fraction: '1/0'"), (["--seq-lens", "0"], "must be >= 1"),
    (["--head-dims", "-8"], "must be >= 1"), (["--seq-lens", str(10**20)], "at most 131072"),
    (["--head-dims", "512"], "at most 256")])
def test_bench_refuses_bad_sizes_before_the_run(args, message, tmp_path):
    out = tmp_path / "bench.json"
    result = run_without_triton("import runpy; runpy.run_path('bench.py', run_name='__main__')",
                                *args, "--json", str(out))
    assert result.returncode == 2 and message in result.stderr and not result.stdout, result.stderr
    assert not out.exists(), "a refused run leaves no file behind"


def test_bench_json_that_cannot_be_written_fails_before_the_run(tmp_path):
    blocker = tmp_path / "a-file"  # a file where the path wants a folder: unwritable, even for root
    blocker.write_text("")
    result = run_without_triton("import runpy; runpy.run_path('bench.py', run_name='__main__')",
                                "--quick", "--json", str(blocker / "bench.json"))
    assert result.returncode == 2 and "cannot write" in result.stderr and not result.stdout, result.stderr
    result = run_without_triton("import runpy; runpy.run_path('bench.py', run_name='__main__')", "--quick",
                                "--json", "")
    assert result.returncode == 2 and "--json needs a path" in result.stderr and not result.stdout, result.stderr


@needs_triton
@pytest.mark.skipif(ON_GPU, reason="on a GPU bench.py runs for real; run it by hand there")
def test_bench_gpu_code_runs_in_the_interpreter(monkeypatch):
    # bench.py's GPU code (pinned flash baseline, the cuDNN probe, Triton and pinned PyTorch-path rows, the
    # kernel listing, checks, BoE step with its attention share, summary, goals) on tiny sizes, with
    # wall-clock timing for CUDA events, so that a slip in it shows before a GPU run.
    import boe
    import bench

    monkeypatch.setattr(bench, "CPU_RUNS", 2)
    monkeypatch.setattr(bench, "ERRORS", [])
    monkeypatch.setattr(boe, "ATTENTION_BACKEND", boe.ATTENTION_BACKEND)  # boe_step_functions sets it
    monkeypatch.setattr(bench, "BOE_MODEL", dict(vocab_size=64, mask_id=63, seq_len=40, n_layer=1, n_head=2,
                                                 d_model=32))
    # 8 masked: more candidates than the budget (a choice to make), and probes left
    for name, value in dict(BOE_BATCH=2, BOE_PROMPT=8, BOE_BUDGET=4, BOE_CANDIDATES=6).items():
        monkeypatch.setattr(bench, name, value)

    impls, candidate, reference = bench.implementations(True, "cpu", torch.float32)
    assert list(impls) == ["flash", "triton", "torch"]  # no cuDNN attention on a CPU: probed, left out
    seq_len, rhos = 40, ["1/4", "1"]
    rows, checks, listing = bench.kernel_sweep(impls, candidate, reference, [(1, 2, seq_len, 16)], rhos, "cpu",
                                               torch.float32, bench.cpu_times_ms)
    assert len(checks) == 3 and all(check["ok"] for check in checks)
    assert sorted(row["impl"] for row in rows) == ["flash", "torch", "torch", "triton", "triton"]
    assert "_ActiveQueryAttention" in listing["triton"]  # the interpreted kernels, as the profiler names them
    assert any("scaled_dot_product" in name for name in listing["flash"] + listing["torch"])
    for row in rows:
        for kind in ("fwd", "bwd", "both"):
            assert 0 < row[f"{kind}_ms_min"] <= row[f"{kind}_ms"] <= row[f"{kind}_ms_max"] and row[f"{kind}_runs"] == 2
        # Executed against credited FLOPs of fwd + bwd: 4L + 14|A| for Triton's seven backward matmuls,
        # 4L + 4|A| + 10|A| for the PyTorch path's second forward, 4L + 10|A| (= 14L) for flash.
        a = row["n_active"]
        executed = {"triton": 4 * seq_len + 14 * a, "torch": 4 * seq_len + 14 * a, "flash": 14 * seq_len}
        assert row["both_tflops_executed"] / row["both_tflops"] == pytest.approx(
            executed[row["impl"]] / (4 * seq_len + 10 * a))

    boe_rows = bench.boe_steps("cpu", torch.float32, bench.cpu_times_ms)
    assert [row["step"] for row in boe_rows] == ["confidence step", bench.BOE_GOAL_STEP, "BoE step, dense backward",
                                                 "BoE step, paper's surrogate"]
    assert all(row["ms"] > 0 and row["peak_gib"] is None for row in boe_rows)  # peak memory needs CUDA
    assert all(0 < row["attention_share"] <= 1 and row["kernels_share"] is None for row in boe_rows)  # no GPU kernels
    bench.print_summary(rows, [seq_len], [16], rhos)
    goals = bench.goals(rows, boe_rows, checks)
    assert all(goal["met"] is None for goal in goals[:-1])  # the kernel goals: no L = 4096 here
    assert goals[-1]["measured"] == boe_rows[1]["x_confidence"] and goals[-1]["met"] in (True, False)
    assert bench.ERRORS == []
