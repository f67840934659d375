"""ActiveQueryAttention: exact softmax attention whose backward pass only follows a set of active query rows.

Backward-on-Entropy steering (TABES, "Trajectory-Aware Backward-on-Entropy Steering for Masked Diffusion
Models", arXiv 2602.00250) needs one backward pass per denoising step in which only some query rows A
(candidates and probes) carry gradient. For q, k, v of shape [B, H, L, D] (non-causal, no mask) and
`active`, a bool [B, L]:

    forward   S = scale * Q K^T,  P = softmax(S) (row-wise),  out = P V           for every row
    gradient  of  where(active[row], out[row], out[row].detach()),  i.e. dOut[j] = 0 for j not in A

With dOut zero off A, the usual attention backward only needs the active rows j in A:

    Delta_j = sum_d out[j, d] * dOut[j, d]
    dV      = P[A]^T dOut[A]                      dP[A] = dOut[A] V^T
    dS[A]   = P[A] * (dP[A] - Delta[A])           (row-wise Delta)
    dQ[A]   = scale * dS[A] K,    dQ[j] = 0 off A
    dK      = scale * dS[A]^T Q[A]

which costs O(|A| L D) instead of O(L^2 D). P[A] is rebuilt from Q[A], K and the per-row log-sum-exp
that the forward stores, as in FlashAttention.

Two implementations share this contract: Triton kernels and a pure PyTorch path. The Triton path is a
flash-style forward, then a backward of two launches: a prepare kernel (Delta of the active rows, and per
sequence a compact list of its active rows, built with a prefix sum) and one backward launch whose
programs each compute either dQ for a block of active rows or dK, dV for a block of keys. It uses no
atomics, so its results are deterministic, and it never synchronises with the host, so it can be captured
in a CUDA graph. `reference_attention` is the dense oracle.

Triton is optional: where it is not installed (there are no triton wheels for macOS or Windows) the module
still imports, backend="auto" takes the PyTorch path and backend="triton" raises an ImportError that says
how to get it. Likewise where Triton's interpreter is on and cannot run (Triton 3.6 with NumPy 2.4), with a
RuntimeError that names both versions. The Triton path gives first derivatives only (differentiating its
gradient again is an error); the PyTorch path's second derivatives are SDPA's (its fused kernels refuse
them). Inside torch.func's transforms backend="auto" takes the PyTorch path.
"""
import contextlib
import contextvars
import math
import numbers
import os
import re
import threading

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
HAS_TRITON = triton is not None
TRITON_MISSING = ("backend='triton' needs the triton package, which is not installed. On Linux: pip install "
                  "triton (a CUDA build of torch brings the matching version along). macOS and Windows have no "
                  "triton wheels: use backend='torch', or 'auto', which takes the PyTorch path without triton")

# Triton decides at decoration time whether @triton.jit functions run in its CPU interpreter.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_conflict(triton_version, numpy_version):
    """Why Triton's CPU interpreter cannot run the kernels with these versions (a message), or None. Before
    3.7 it turns one-element arrays into Python ints where a loop bound is a kernel argument, which NumPy 2.4
    and later refuse: every interpreted kernel fails at its first loop. (Compiled for a GPU, 3.6 runs them.)"""
    def major_minor(version):
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter cannot run with NumPy {numpy_version} (fixed in "
                f"Triton 3.7): pip install 'triton>=3.7' or 'numpy<2.4', or use backend='torch'")
    return None


# Where it holds, backend="auto" takes the PyTorch path and backend="triton" raises it.
INTERPRETER_CONFLICT = None
if INTERPRETED:
    import numpy  # the interpreter runs on NumPy arrays

    INTERPRETER_CONFLICT = _interpreter_conflict(triton.__version__, numpy.__version__)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_GRID_AXIS = 65535  # CUDA's limit on grid axes 1 and 2, which carry H and B
_LOG2E = 1.4426950408889634  # the kernels use exp2/log2, so logits are scaled by log2(e)

# --------------------------------------------------------------------------------------------------
# Triton kernels. Each program works on one (batch, head): grid axes 1 and 2 are the head h and the
# batch b, since CUDA caps those axes at 65535 and one axis of B*H would overflow first. b, h,
# bh = b * H + h and the row indices are int64 before they meet a stride, so offsets past 2^31
# elements (a large tensor, or a view such as [L, B, H, D] permuted to [B, H, L, D]) stay exact.
# q, k, v and dOut are addressed through (batch, head, row) strides with unit stride along D; out, lse,
# Delta, dQ, dK and dV are contiguous. Accumulators and statistics are fp32, dot operands keep the input
# dtype. The log-sum-exp is stored in base 2: lse2 = log2(sum_n exp2(s_n)).
#
# The kernels are defined only where triton imports. Stand-ins for triton.jit and tl.constexpr would
# spare this block its indentation, but they would also make the kernels look callable where they are not.
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _load_rows(base, rows, row_mask, stride_row, HEAD_DIM: tl.constexpr):
        """Rows `rows` of a [L, HEAD_DIM] matrix; masked rows read as 0."""
        cols = tl.arange(0, HEAD_DIM)
        offsets = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]  # [ROWS, HEAD_DIM]
        return tl.load(base + offsets, mask=row_mask[:, None], other=0.0)

    @triton.jit
    def _store_rows(base, rows, row_mask, stride_row, values, HEAD_DIM: tl.constexpr):
        cols = tl.arange(0, HEAD_DIM)
        offsets = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]  # [ROWS, HEAD_DIM]
        tl.store(base + offsets, values, mask=row_mask[:, None])

    @triton.jit
    def _attention_forward_kernel(
        Q, K, V, Out, Lse,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        num_heads, seq_len, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One block of BLOCK_M query rows of one (batch, head): online softmax over all key blocks."""
        pid_m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        bh = b * num_heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < seq_len
        q = _load_rows(q_base, rows, row_valid, stride_ql, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]

        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 logits
        row_sum = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(logit - row_max)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running sum of exp2(logit - row_max) * v
        for start_n in range(0, seq_len, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            key_valid = keys < seq_len
            k = _load_rows(k_base, keys, key_valid, stride_kl, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
            v = _load_rows(v_base, keys, key_valid, stride_vl, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
            logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            # The first key block always holds key 0, so row_max is finite from then on and no row
            # (padded rows included) ever evaluates exp2(-inf - -inf).
            logits = tl.where(key_valid[None, :], logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, 1))
            p = tl.exp2(logits - new_max[:, None])  # [BLOCK_M, BLOCK_N]
            rescale = tl.exp2(row_max - new_max)  # [BLOCK_M]
            row_sum = row_sum * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_max = new_max

        out = acc / row_sum[:, None]
        _store_rows(Out + bh * seq_len * HEAD_DIM, rows, row_valid, HEAD_DIM,
                    out.to(Out.dtype.element_ty), HEAD_DIM)
        tl.store(Lse + bh * seq_len + rows, row_max + tl.log2(row_sum), mask=row_valid)

    @triton.jit
    def _list_active_rows(active_base, stride_al, rows_base, count_ptr, seq_len, BLOCK: tl.constexpr):
        """Writes one sequence's active rows in ascending order to slots 0, 1, ... of rows_base and its
        inactive rows to the slots after them (filled from slot L-1 down), and the count to count_ptr.

        One pass in blocks of BLOCK rows with a running count: row r, preceded by `before` active rows and
        so by r - before inactive ones, goes to slot `before` if active, else to slot L-1 - (r - before).
        A prefix sum instead of a sort; distinct slots, so the dQ programs' stores never collide.
        """
        n_active = tl.full([], 0, tl.int32)
        for start in range(0, seq_len, BLOCK):
            rows = start + tl.arange(0, BLOCK)
            valid = rows < seq_len
            is_active = tl.load(active_base + rows.to(tl.int64) * stride_al, mask=valid, other=0) != 0
            flags = is_active.to(tl.int32)  # [BLOCK]
            before = n_active + tl.cumsum(flags, 0) - flags  # [BLOCK] active rows before each row
            slots = tl.where(is_active, before, seq_len - 1 - (rows - before))  # [BLOCK]
            tl.store(rows_base + slots, rows, mask=valid)
            n_active += tl.sum(flags, 0)
        tl.store(count_ptr, n_active)

    @triton.jit
    def _attention_backward_prepare_kernel(
        Out, DOut, Active, Delta, ActiveRows, ActiveCounts,
        stride_dob, stride_doh, stride_dol, stride_ab, stride_al,
        num_heads, seq_len,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, SCAN_BLOCK: tl.constexpr,
    ):
        """Two small jobs in one launch. Every program: Delta of the active rows among its BLOCK_M rows, stored
        by row. Program (0, 0, b) also lists sequence b's active rows for the backward launch."""
        pid_m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        bh = b * num_heads + h
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < seq_len
        is_active = tl.load(Active + b * stride_ab + rows.to(tl.int64) * stride_al, mask=row_valid, other=0) != 0
        out = _load_rows(Out + bh * seq_len * HEAD_DIM, rows, is_active, HEAD_DIM, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
        dout = _load_rows(DOut + b * stride_dob + h * stride_doh, rows, is_active, stride_dol, HEAD_DIM)
        tl.store(Delta + bh * seq_len + rows, tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1), mask=is_active)
        if (pid_m == 0) & (h == 0):
            _list_active_rows(Active + b * stride_ab, stride_al, ActiveRows + b * seq_len, ActiveCounts + b,
                              seq_len, SCAN_BLOCK)

    @triton.jit
    def _dq_program(
        pid_m, q_base, k_base, v_base, do_base, lse_base, delta_base, rows_base, n_active, dq_base,
        stride_ql, stride_kl, stride_vl, stride_dol, seq_len, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """dQ of BLOCK_M slots of the row list. Active rows: their gradient, with the rows resident while all
        key blocks stream by. The slots past the count hold the inactive rows: zeros. So every row of dQ is
        written exactly once, and dQ needs no zero fill beforehand."""
        slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot_used = slots < seq_len
        slot_valid = slots < n_active
        rows = tl.load(rows_base + slots, mask=slot_used, other=0)  # [BLOCK_M]
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

        if pid_m * BLOCK_M < n_active:  # the block holds active rows
            q = _load_rows(q_base, rows, slot_valid, stride_ql, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
            dout = _load_rows(do_base, rows, slot_valid, stride_dol, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
            lse = tl.load(lse_base + rows, mask=slot_valid, other=0.0)  # [BLOCK_M]
            delta = tl.load(delta_base + rows, mask=slot_valid, other=0.0)  # [BLOCK_M]
            for start_n in range(0, seq_len, BLOCK_N):
                keys = start_n + tl.arange(0, BLOCK_N)
                key_valid = keys < seq_len
                k = _load_rows(k_base, keys, key_valid, stride_kl, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
                v = _load_rows(v_base, keys, key_valid, stride_vl, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
                logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
                # A padded key reads as logit 0, which can lie far above lse: mask before exp2, not after.
                logits = tl.where(key_valid[None, :], logits, float("-inf"))
                p = tl.exp2(logits - lse[:, None])  # [BLOCK_M, BLOCK_N]
                dp = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            dq = tl.where(slot_valid[:, None], dq * sm_scale, 0.0)  # inactive slots of this block: zeros

        _store_rows(dq_base, rows, slot_used, HEAD_DIM, dq.to(dq_base.dtype.element_ty), HEAD_DIM)

    @triton.jit
    def _dkdv_program(
        pid_n, q_base, k_base, v_base, do_base, lse_base, delta_base, rows_base, n_active, dk_base, dv_base,
        stride_ql, stride_kl, stride_vl, stride_dol, seq_len, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """dK, dV of BLOCK_N keys: the K/V tile stays resident while the listed active rows stream by.

        Works in the transposed orientation (keys x rows) so that P^T and dS^T come out of the dots directly.
        """
        keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        key_valid = keys < seq_len
        k = _load_rows(k_base, keys, key_valid, stride_kl, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        v = _load_rows(v_base, keys, key_valid, stride_vl, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

        for start in range(0, n_active, BLOCK_M):
            slots = start + tl.arange(0, BLOCK_M)
            slot_valid = slots < n_active
            rows = tl.load(rows_base + slots, mask=slot_valid, other=0)  # [BLOCK_M]
            q = _load_rows(q_base, rows, slot_valid, stride_ql, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
            dout = _load_rows(do_base, rows, slot_valid, stride_dol, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
            lse = tl.load(lse_base + rows, mask=slot_valid, other=0.0)  # [BLOCK_M]
            delta = tl.load(delta_base + rows, mask=slot_valid, other=0.0)  # [BLOCK_M]

            logits_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            # Padded keys and padded slots must contribute nothing: their logits are not meaningful (and a padded
            # key's can overflow exp2), so they are masked before it.
            logits_t = tl.where(key_valid[:, None] & slot_valid[None, :], logits_t, float("-inf"))
            p_t = tl.exp2(logits_t - lse[None, :])  # [BLOCK_N, BLOCK_M]
            dv += tl.dot(p_t.to(dout.dtype), dout, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

        _store_rows(dk_base, keys, key_valid, HEAD_DIM, (dk * sm_scale).to(dk_base.dtype.element_ty), HEAD_DIM)
        _store_rows(dv_base, keys, key_valid, HEAD_DIM, dv.to(dv_base.dtype.element_ty), HEAD_DIM)

    @triton.jit
    def _attention_backward_kernel(
        Q, K, V, DOut, Lse, Delta, ActiveRows, ActiveCounts, DQ, DK, DV,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_dob, stride_doh, stride_dol,
        num_heads, seq_len, num_dq_programs, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, DQ_BLOCK_M: tl.constexpr, DQ_BLOCK_N: tl.constexpr,
        KV_BLOCK_M: tl.constexpr, KV_BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """The whole backward of one (batch, head) in one launch: programs 0 .. num_dq_programs - 1 each
        compute dQ for DQ_BLOCK_M slots of the row list, the others dK and dV for KV_BLOCK_N keys. The two
        kinds write disjoint outputs and read only what the prepare kernel wrote, so none waits for another;
        dQ and dK/dV each recompute QK^T and dP (seven matmuls over |A| against flash's five), the price of
        having no atomics."""
        pid = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        bh = b * num_heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        do_base = DOut + b * stride_dob + h * stride_doh
        grad_offset = bh * seq_len * HEAD_DIM
        n_active = tl.load(ActiveCounts + b)
        if pid < num_dq_programs:
            _dq_program(pid, q_base, k_base, v_base, do_base, Lse + bh * seq_len, Delta + bh * seq_len,
                        ActiveRows + b * seq_len, n_active, DQ + grad_offset,
                        stride_ql, stride_kl, stride_vl, stride_dol, seq_len, qk_scale, sm_scale,
                        HEAD_DIM, DQ_BLOCK_M, DQ_BLOCK_N, DOT_PRECISION)
        else:
            _dkdv_program(pid - num_dq_programs, q_base, k_base, v_base, do_base, Lse + bh * seq_len,
                          Delta + bh * seq_len, ActiveRows + b * seq_len, n_active, DK + grad_offset,
                          DV + grad_offset, stride_ql, stride_kl, stride_vl, stride_dol, seq_len, qk_scale,
                          sm_scale, HEAD_DIM, KV_BLOCK_M, KV_BLOCK_N, DOT_PRECISION)


# --------------------------------------------------------------------------------------------------
# Launch wrappers and the autograd Function of the Triton path. Nothing here waits for the GPU: every
# size comes from shapes, never from tensor values.
# --------------------------------------------------------------------------------------------------


def _tile_sizes(kernel, head_dim, dtype, block_m, block_n):
    """(BLOCK_M query rows, BLOCK_N keys) for `kernel`; explicit block_m / block_n override both.

    On a GPU the resident tile (queries in the forward and dQ programs, keys in dK/dV) is large and the
    streamed one small, as in FlashAttention-2; fp32 halves the resident tile (quarters it at D = 128) to fit
    shared memory. The tiles are sized for compute capability 8.0 and newer (python bench.py --compile
    checks them): a Turing GPU (7.5) gives a program 64 KiB, and there the half-precision kernels would
    spill kilobytes a thread, so "auto" takes the PyTorch path on it. The CPU interpreter pays per loop
    iteration, so it uses moderate square tiles. For "prepare" it is (rows per Delta program, rows per
    step of the row listing), which no override changes: that kernel does no matmul, and a long listing
    step keeps its serial pass over L short on a GPU.
    """
    if kernel == "prepare":
        return 32, 32 if INTERPRETED else 1024
    if INTERPRETED:
        default_m, default_n = 32, 32
    else:
        # fp32 at D = 128 keeps 32 resident rows or keys: with 64 its launches need 100 to 104 KiB of shared
        # memory, more than the 99 KiB that GPUs of compute capability 8.6, 8.9 and 12.0 give a program.
        resident = 128 if dtype.itemsize == 2 else 32 if head_dim == 128 else 64
        if kernel == "forward":
            streamed = 64 if head_dim <= 64 else 32
        else:  # fp32 at D >= 64 spills registers with 32 streamed rows or keys, even with 8 warps
            streamed = 16 if dtype.itemsize == 4 and head_dim >= 64 else 32
        default_m, default_n = (streamed, resident) if kernel == "dkdv" else (resident, streamed)
    return block_m or default_m, block_n or default_n


def _launch_options(q):
    # fp32 dots would run in TF32 on a GPU; "ieee" keeps them exact. For fp16/bf16 operands the
    # precision setting has no effect and Triton's default ("tf32") is passed. fp32 is the exact path,
    # not the fast one. Its exact dots hold more in registers: with 4 warps its forward and backward spill
    # from D = 32 on (kilobytes per thread at D = 64), with 8 warps (and the tiles above) nothing does, as
    # compiled for an H100 by Triton 3.6 and 3.9 (python bench.py --compile).
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    wide = q.shape[-1] == 128 or (q.dtype == torch.float32 and q.shape[-1] >= 32)
    return dict(DOT_PRECISION=dot_precision, num_warps=8 if wide else 4, num_stages=3)


_PREPARE_WARPS = 4  # the prepare kernel does no matmul


def _row_strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _triton_forward(q, k, v, scale, block_m, block_n):
    batch, heads, seq_len, head_dim = q.shape
    out = torch.empty((batch, heads, seq_len, head_dim), dtype=q.dtype, device=q.device)  # [B, H, L, D]
    lse = torch.empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)  # [B, H, L], base 2
    tile_m, tile_n = _tile_sizes("forward", head_dim, q.dtype, block_m, block_n)
    grid = (triton.cdiv(seq_len, tile_m), heads, batch)
    _attention_forward_kernel[grid](
        q, k, v, out, lse, *_row_strides(q), *_row_strides(k), *_row_strides(v),
        heads, seq_len, scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=tile_m, BLOCK_N=tile_n, **_launch_options(q),
    )
    return out, lse


def _triton_backward(q, k, v, out, lse, dout, active, scale, block_m, block_n, need_dq, need_dkdv):
    batch, heads, seq_len, head_dim = q.shape
    # Written by the prepare kernel: per sequence its active rows, ascending, then its inactive rows; and
    # their count. int32: compiled for an H100 (Triton 3.6), int64 indices made the dK/dV code spill registers.
    active_rows = torch.empty((batch, seq_len), dtype=torch.int32, device=q.device)  # [B, L] by slot
    active_counts = torch.empty((batch,), dtype=torch.int32, device=q.device)  # [B]
    delta = torch.empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)  # [B, H, L], active rows
    rows_per_program, listing_step = _tile_sizes("prepare", head_dim, q.dtype, None, None)
    _attention_backward_prepare_kernel[(triton.cdiv(seq_len, rows_per_program), heads, batch)](
        out, dout, active, delta, active_rows, active_counts, *_row_strides(dout), *active.stride(),
        heads, seq_len, HEAD_DIM=head_dim, BLOCK_M=rows_per_program, SCAN_BLOCK=listing_step, num_warps=_PREPARE_WARPS,
    )

    dq_m, dq_n = _tile_sizes("dq", head_dim, q.dtype, block_m, block_n)
    kv_m, kv_n = _tile_sizes("dkdv", head_dim, q.dtype, block_m, block_n)
    # The grid covers all L slots: sizing it by max(counts) would need a host sync. dQ programs past a
    # sequence's count only write the zeros of its inactive rows; dK/dV programs loop over the count.
    dq_programs = triton.cdiv(seq_len, dq_m) if need_dq else 0
    kv_programs = triton.cdiv(seq_len, kv_n) if need_dkdv else 0
    # Every row of dQ and every key row of dK, dV is written: no zero fill. A gradient nobody needs gets no
    # programs, and an empty tensor stands in for it.
    dq = torch.empty_like(out) if need_dq else out.new_empty(0)  # [B, H, L, D]
    dk = torch.empty_like(out) if need_dkdv else out.new_empty(0)  # [B, H, L, D]
    dv = torch.empty_like(out) if need_dkdv else out.new_empty(0)  # [B, H, L, D]
    _attention_backward_kernel[(dq_programs + kv_programs, heads, batch)](
        q, k, v, dout, lse, delta, active_rows, active_counts, dq, dk, dv,
        *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(dout),
        heads, seq_len, dq_programs, scale * _LOG2E, scale,
        HEAD_DIM=head_dim, DQ_BLOCK_M=dq_m, DQ_BLOCK_N=dq_n, KV_BLOCK_M=kv_m, KV_BLOCK_N=kv_n, **_launch_options(q),
    )
    return (dq if need_dq else None), (dk if need_dkdv else None), (dv if need_dkdv else None)


def _on_device_of(x):
    """Triton launches on the current CUDA device: make it x's (a no-op in the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class _ActiveQueryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, active, scale, block_m, block_n):
        with _on_device_of(q):
            out, lse = _triton_forward(q, k, v, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse, active)
        ctx.settings = (scale, block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, active = ctx.saved_tensors
        dq, dk, dv = _TritonBackward.apply(q, k, v, out, lse, dout, active, ctx.settings, ctx.needs_input_grad[:3])
        return dq, dk, dv, None, None, None, None


class _TritonBackward(torch.autograd.Function):
    """The backward kernels as a function of q, k, v (and what the forward saved): a gradient taken with
    create_graph=True stays connected to them, so that differentiating it again, by .backward() or by
    autograd.grad(..., q), gets this error rather than a None or torch's "not used in the graph"."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, dout, active, settings, needs_input_grad):
        need_dq, need_dk, need_dv = needs_input_grad
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()  # any layout with unit stride along D
        with _on_device_of(q):
            dq, dk, dv = _triton_backward(q, k, v, out, lse, dout, active, *settings,
                                          need_dq=need_dq, need_dkdv=need_dk or need_dv)
        return dq, dk if need_dk else None, dv if need_dv else None

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("active_query_attention gives first derivatives only: its Triton backward cannot be "
                           "differentiated (for second derivatives use plain attention)")


def active_query_attention(q, k, v, active, scale=None, backend="auto", block_m=None, block_n=None):
    """Softmax attention over all rows whose backward only follows the rows where `active` is True.

    q, k, v: [B, H, L, D], same dtype and device; active: bool [B, L]; scale defaults to 1 / sqrt(D).
    backend: "triton" (kernels; needs triton installed; on CPU tensors only in Triton's interpreter,
    TRITON_INTERPRET=1 set before import), "torch", or "auto" (Triton for CUDA tensors, or CPU tensors when
    interpreted, if triton is installed and supports the shape and dtype; PyTorch otherwise). block_m /
    block_n override the Triton tile sizes (query rows, keys; 16, 32, 64 or 128) of the forward and backward
    launches; they are checked whatever the backend, and the torch backend does not use them. The defaults
    are tuned per kernel; on a GPU, large explicit tiles with fp32 or D = 128 can exceed shared memory,
    which Triton reports as an out-of-resources error.
    """
    _check_inputs(q, k, v, active)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'triton' or 'torch'")
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block is not None and (isinstance(block, bool) or not isinstance(block, numbers.Integral)
                                  or block not in (16, 32, 64, 128)):
            raise ValueError(f"{name} must be a power of two from 16 to 128, got {block!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not abs(scale) <= torch.finfo(torch.float64).max):  # NaN, inf, 10**400
        raise ValueError(f"scale must be None (1 / sqrt(D)) or a finite number, got {scale!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    block_m, block_n = (None if block is None else int(block) for block in (block_m, block_n))

    # CUDA tensors, and CPU tensors in Triton's interpreter (which runs CUDA tensors' kernels too)
    triton_device = q.is_cuda or (INTERPRETED and q.device.type == "cpu")
    # torch.func's transforms (grad, vmap, jacrev, ...) wrap tensors that Triton's launches cannot read
    under_torch_func = torch._C._are_functorch_transforms_active()
    if backend == "auto":
        usable = HAS_TRITON and triton_device and not INTERPRETER_CONFLICT and _triton_unsupported_reason(q) is None
        backend = "triton" if usable and not under_torch_func else "torch"
    if backend == "torch":
        return _torch_attention(q, k, v, active, scale)

    if not HAS_TRITON:
        raise ImportError(TRITON_MISSING)
    if q.device.type == "cpu" and not INTERPRETED:
        raise ValueError("backend='triton' on CPU tensors needs Triton's interpreter: set the environment "
                         "variable TRITON_INTERPRET=1 before importing attn_kernel, or use backend='torch'")
    if not triton_device:
        raise ValueError(f"backend='triton' runs on CUDA tensors (and CPU tensors in Triton's interpreter), got "
                         f"tensors on {q.device}: use backend='torch'")
    if INTERPRETER_CONFLICT:  # with TRITON_INTERPRET=1 CUDA tensors are interpreted too
        raise RuntimeError(INTERPRETER_CONFLICT)
    if under_torch_func:
        raise RuntimeError("backend='triton' cannot run inside torch.func transforms (grad, vmap, jacrev, ...): "
                           "use backend='torch' or 'auto', which take the PyTorch path there")
    reason = _triton_unsupported_reason(q)
    if reason is not None:
        raise TypeError(reason) if "dtype" in reason else ValueError(reason)
    # The kernels need unit stride along D; any other layout is handled through strides.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _ActiveQueryAttention.apply(q, k, v, active, scale, block_m, block_n)


def _check_inputs(q, k, v, active):
    for name, x in (("q", q), ("k", k), ("v", v), ("active", active)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, H, L, D], got shape {tuple(q.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"q must have a head dim D >= 1, got shape {tuple(q.shape)}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v must be floating point, got dtype {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
    if active.dtype != torch.bool:
        raise TypeError(f"active must be a bool tensor, got dtype {active.dtype}")
    if active.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"active must have shape [B, L] = {(q.shape[0], q.shape[2])}, got {tuple(active.shape)}")
    if active.device != q.device:
        raise ValueError(f"active must be on the device of q ({q.device}), got {active.device}")


def _triton_unsupported_reason(q):
    """Why the Triton kernels cannot take q (a message), or None."""
    batch, heads, _, head_dim = q.shape
    if max(batch, heads) > MAX_GRID_AXIS:
        return (f"backend='triton' supports B and H up to {MAX_GRID_AXIS} (CUDA's grid limit), got B={batch}, "
                f"H={heads}; use backend='torch'")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"backend='triton' supports head dim D in {SUPPORTED_HEAD_DIMS}, got D={head_dim}; use backend='torch'"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"backend='triton' supports dtype float16, bfloat16 and float32, got {q.dtype}"
    if q.dtype == torch.bfloat16 and INTERPRETED:
        return "backend='triton' does not support dtype bfloat16 in Triton's CPU interpreter; use a GPU or float32"
    capability = _cuda_capability(q)
    if capability is not None and capability < (8, 0):  # see _tile_sizes
        return (f"backend='triton' needs a GPU of compute capability 8.0 or newer (Ampere on); this one has "
                f"{capability[0]}.{capability[1]}: use backend='torch'")
    return None


def _cuda_capability(x):
    """(major, minor) of the GPU that holds x, or None for a CPU tensor."""
    return torch.cuda.get_device_capability(x.device) if x.is_cuda else None


# --------------------------------------------------------------------------------------------------
# PyTorch path: the same function from two SDPA calls; its backward also costs O(|A| L D).
# --------------------------------------------------------------------------------------------------

# torch's own SDPA, taken at import: sdpa_active_rows below replaces the public name for a while, and
# the PyTorch path must not route itself.
_SDPA = F.scaled_dot_product_attention



def _torch_attention(q, k, v, active, scale):
    if q.numel() == 0:  # B, H or L is 0: an empty output, kept in the graph so that backward() works
        return q + k + v  # [B, H, L, D], empty
    with torch.no_grad():
        out = _SDPA(q, k, v, scale=scale)  # [B, H, L, D], every row
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return out

    batch, heads, seq_len, head_dim = q.shape
    # Per sequence, the active rows in ascending order, then the inactive ones: a stable sort on "row is
    # inactive". Gathering needs a static width, so this path syncs the host once for max(counts) (the
    # Triton path never does). At least one slot keeps the graph connected (with all-zero gradients) when
    # no row is active.
    rows = torch.argsort((~active).to(torch.uint8), dim=1, stable=True)  # [B, L]
    counts = active.sum(dim=1)  # [B]
    width = max(int(counts.max()), 1)
    slots = torch.arange(width, device=q.device)
    # Padding slots point at row L, an extra zero row of q whose output lands in a dump row.
    rows = torch.where(slots[None, :] < counts[:, None], rows[:, :width], seq_len)  # [B, width]
    index = rows[:, None, :, None].expand(batch, heads, width, head_dim)  # [B, H, width, D]
    q_active = F.pad(q, (0, 0, 0, 1)).gather(2, index)  # [B, H, width, D]
    out_active = _SDPA(q_active, k, v, scale=scale)  # [B, H, width, D]
    # Zero-valued but carrying the gradient of the active rows: adding it keeps the returned values
    # bit-identical to the full SDPA call above while dOut flows back only through the active rows. An
    # infinite output (from an infinite value in v) gets no carrier, since inf - inf would turn it into NaN.
    carrier = (out_active - out_active.detach()).where(out_active.isfinite(), 0.0)  # [B, H, width, D]
    scattered = out.new_zeros(batch, heads, seq_len + 1, head_dim).scatter(2, index, carrier)  # [B, H, L+1, D]
    return out + scattered[:, :, :seq_len]


# --------------------------------------------------------------------------------------------------
# Reference: dense attention, then stop the gradient of inactive rows.
# --------------------------------------------------------------------------------------------------


def reference_attention(q, k, v, active, scale=None):
    """Dense softmax attention whose output rows outside `active` are detached; O(L^2 D) both ways."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    probs = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)  # [B, H, L, L]
    out = probs @ v  # [B, H, L, D]
    return torch.where(active[:, None, :, None], out, out.detach())


# --------------------------------------------------------------------------------------------------
# A model one did not write: route its own SDPA calls through active_query_attention.
# --------------------------------------------------------------------------------------------------


# The innermost open sdpa_active_rows block of this thread (or asyncio task): (active, backend, counts), or
# None. While any block is open in any thread, F.scaled_dot_product_attention is _dispatch, which serves each
# call from its own thread's block, so blocks in several threads neither see each other's active sets nor,
# exiting in any order, leave SDPA patched.
_ROUTE = contextvars.ContextVar("sdpa_active_rows", default=None)
_PATCH_LOCK = threading.Lock()
_PATCH = {"blocks": 0, "previous": None}  # open blocks that route, and the SDPA in place before the first


@contextlib.contextmanager
def sdpa_active_rows(active, backend="auto"):
    """Inside the block, torch.nn.functional.scaled_dot_product_attention runs the calls it can serve
    exactly through active_query_attention(q, k, v, active): the model's forward is unchanged and its
    backward follows only the active rows, without editing the model.

    active : bool [B, L], or None to route nothing (so one code path serves both kinds of forward)
    yields : a dict counting the calls, {"routed": n, "passed": m}; a model that calls SDPA once per
             layer routes one call per layer and forward, which shows the sparse path really ran

    Served: attention with q, k, v of shape [B, H, L, D] for this B and L on the device of `active` (keys
    and values may have fewer heads with enable_gqa=True; they are repeated to the query heads as SDPA
    does), no attn_mask or an all-true boolean one that broadcasts to [B, H, L, L] (checking it syncs with
    the host), dropout_p = 0, is_causal = False. Under torch.autocast q, k and v are cast to the autocast
    dtype first, as SDPA does. Every other call goes to the SDPA that was in place before, unchanged. The
    block routes the calls of its own thread only (an inner block, None included, takes over from an outer
    one until it exits). Not reached: a reference to SDPA taken before the block (`from
    torch.nn.functional import scaled_dot_product_attention` at a module's import), and attention that does
    not call SDPA (flash_attn, xformers, an explicit softmax). The original function is restored when the
    last block exits, also on an exception."""
    if active is not None and (not isinstance(active, torch.Tensor) or active.dtype != torch.bool
                               or active.dim() != 2):
        raise TypeError(f"active must be None or a bool tensor [B, L]; got {getattr(active, 'dtype', type(active))} "
                        f"of shape {tuple(getattr(active, 'shape', ()))}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'triton' or 'torch'")
    counts = {"routed": 0, "passed": 0}
    token = _ROUTE.set(None if active is None else (active, backend, counts))
    try:
        if active is None:  # nothing to route: SDPA is left as it is (an outer block's dispatch passes through)
            yield counts
            return
        with _PATCH_LOCK:
            if _PATCH["blocks"] == 0:
                _PATCH["previous"] = F.scaled_dot_product_attention
                F.scaled_dot_product_attention = _dispatch
            _PATCH["blocks"] += 1
        try:
            yield counts
        finally:
            with _PATCH_LOCK:
                _PATCH["blocks"] -= 1
                if _PATCH["blocks"] == 0:
                    F.scaled_dot_product_attention = _PATCH["previous"]
    finally:
        _ROUTE.reset(token)


def _dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention while a block is open: this thread's block serves what it can."""
    route = _ROUTE.get()
    if route is not None:
        active, backend, counts = route
        if _servable(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, active):
            counts["routed"] += 1
            device_type = query.device.type
            autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
            if autocast:  # SDPA computes in the autocast dtype (float64 is left alone): so does the route
                dtype = torch.get_autocast_dtype(device_type)
                query, key, value = (x if x.dtype == torch.float64 else x.to(dtype) for x in (query, key, value))
            groups = query.shape[1] // key.shape[1]  # 1 without grouped key/value heads
            key, value = (x.repeat_interleave(groups, dim=1) if groups > 1 else x for x in (key, value))
            with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
                return active_query_attention(query, key, value, active, scale=scale, backend=backend)
        counts["passed"] += 1
    return _PATCH["previous"](query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)


def _servable(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, active):
    """Whether active_query_attention computes exactly what this SDPA call asks for."""
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (query, key, value)):
        return False
    (batch, heads, seq_len, head_dim), kv_heads = query.shape, key.shape[1]
    grouped = heads > 0 and (kv_heads == heads or (enable_gqa and kv_heads > 0 and heads % kv_heads == 0))
    if not (grouped and key.shape == value.shape == (batch, kv_heads, seq_len, head_dim)
            and active.shape == (batch, seq_len) and active.device == query.device
            and dropout_p == 0 and not is_causal):
        return False
    if attn_mask is None:
        return True
    if not isinstance(attn_mask, torch.Tensor):
        return False
    full = (batch, heads, seq_len, seq_len)
    try:
        broadcasts = torch.broadcast_shapes(attn_mask.shape, full) == full
    except RuntimeError:
        broadcasts = False
    return attn_mask.dtype == torch.bool and broadcasts and bool(attn_mask.all())
