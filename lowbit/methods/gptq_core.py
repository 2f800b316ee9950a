"""GPTQ: Hessian-based error correction (Frantar, Ashkboos, Hoefler, Alistarh; ICLR 2023).

For a linear layer ``y = x @ W.T`` with ``W (rows=out, cols=in)`` and the Hessian of the layer-wise
reconstruction loss ``H = 2/N sum_n x_n x_n^T (cols, cols)``, GPTQ quantizes ``W`` one column at a
time and spreads each column's rounding error over the not-yet-quantized columns with the inverse
Hessian (Optimal Brain Quantization with a fixed column order)::

    U = chol(inv(H + damp * mean(diag H) * I)), upper      (so inv(H) = U^T U)
    for each column i:  q_i = Q(w_i);  err = (w_i - q_i) / U[i, i];  W[:, i:] -= err U[i, i:]

The pure core :func:`quantize_weight` implements, as a few jitted stages (traceable as a whole):

- dead columns (``H[i, i] == 0``: the input feature never fired) get ``H[i, i] = 1`` so they are
  rounded to nearest and pass no error on (``zero_dead=True`` also zeroes their weights, as the
  reference code does);
- dampening relative to the mean diagonal, with automatic retries at 10x the dampening when the
  float32 Cholesky fails (a singular or zero Hessian is handled; the dampening used is returned);
- lazy block updates: columns are processed in blocks of ``blocksize``; inside a block the column
  loop is a ``lax.fori_loop`` updating only the block; the block's weights are corrected for every
  earlier block's rounding with matrix products against ``R = U^-1`` (the Cholesky factor itself,
  left-looking: ``U`` is never formed, only its diagonal blocks; see the comment above
  :data:`_SEGMENTS`), and the blocks run in a ``lax.fori_loop`` per segment, one compiled segment
  function for every segment of the same shape;
- group-wise parameters computed *on the error-corrected weights* at the start of each group
  (the reference reads the not-yet-updated weights for groups that start inside a block; here the
  block is widened to a multiple of the group size so every group sees all earlier corrections);
- act-order (columns in order of descending ``diag(H)``) with the permutation stored in the
  :class:`~lowbit.core.qtensor.QuantizedTensor` (``perm``) so dequantization and export stay correct;
  ``static_groups=True`` computes every group's parameters up front from the original weights, so
  with act-order the codes are stored in the original column order and no permutation is needed;
- every format whose parameters are per group: ``int`` symmetric/asymmetric at 1-8 bits, ``nf4``,
  ``fp4``, ``codebook`` and ``sign``, optional clipping search, double quantization (static groups or
  per-channel only, since it needs all scales at once). ``onebit`` (two vectors from an SVD) is not a
  column-wise format: use ``lowbit.quantize`` with ``format='onebit'`` for it.

:mod:`lowbit.methods.gptq` wraps this core as the registered method: a
:class:`~lowbit.core.transforms.Transform` whose statistics are the running-mean Hessians of the
layer inputs, with the solves of a block spread over devices and processes. This module imports the
quantizer algebra only (``bench_gptq --baseline`` loads it from another checkout on its own).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.checks import is_int, is_real
from lowbit.core.qtensor import QuantizedTensor, QuantSpec
from lowbit.core.quantizers import (check_matrix, check_scales, compute_params, dequantize_codes, group_params,
                                    pack_result, quantize_codes, resolve_group_size)

__all__ = ["GPTQResult", "HessianStat", "quantize_weight", "quantize_weight_mixed", "hessian_update",
           "inverse_hessian_upper", "gram", "gram_windows", "fold", "solve"]


class GPTQResult(NamedTuple):
    q: QuantizedTensor
    losses: jax.Array   # (cols,) float32: sum over rows of (w - q)^2 / Hinv_ii^2 / 2, original column order
    damp: jax.Array     # relative dampening actually used (> the requested one after a failed Cholesky)


class HessianStat(NamedTuple):
    H: jax.Array        # (cols, cols) float32 running mean of 2 x x^T
    n: jax.Array        # float32 number of rows (tokens) folded in


# ----------------------------------------------------------------------------- Hessian


@jax.jit
def gram(x):
    """``(x^T x, n)`` of inputs ``x (..., cols)`` in float32: one batch's share of the Hessian."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return x.T @ x, jnp.float32(x.shape[0])


@jax.jit
def gram_windows(x):
    """:func:`gram` summed window by window in one fixed order: ``x (windows, T, cols)`` (or one
    ``(T, cols)`` window), every window's ``x_w^T x_w`` computed alone, then added pairwise
    (``(w0 + w1) + (w2 + w3) ...``, zero windows padding to a power of two: exact). A batch split over
    a mesh's ``data`` axis (contiguous blocks of windows per device, any power-of-two split) gives the
    same bits as one device; the batched :func:`gram` does not (XLA sums each device's token rows, then
    the devices). Costs ``windows x cols x cols`` float32 of memory per batch."""
    x = x.astype(jnp.float32)
    x = x[None] if x.ndim == 2 else x.reshape(-1, *x.shape[-2:])
    b, t, d = x.shape
    # the barrier keeps XLA from folding the pairwise sums back into one contraction over windows
    parts = jax.lax.optimization_barrier(jnp.einsum("btd,bte->bde", x, x))
    n = 1 << (b - 1).bit_length()
    if n > b:
        parts = jnp.concatenate([parts, jnp.zeros((n - b, d, d), parts.dtype)])
    while parts.shape[0] > 1:
        parts = parts.reshape(parts.shape[0] // 2, 2, d, d)
        parts = parts[:, 0] + parts[:, 1]
    return parts[0], jnp.float32(b * t)


@jax.jit
def fold(stat: HessianStat, xtx, m) -> HessianStat:
    """The running mean ``H = 2/n sum x x^T`` with a batch's ``(x^T x, m)`` folded in."""
    n = stat.n + m
    return HessianStat(stat.H * (stat.n / n) + (2.0 / n) * xtx, n)


def hessian_update(stat: HessianStat, x) -> HessianStat:
    """Fold inputs ``x (..., cols)`` into the running mean ``H = 2/n sum x x^T`` (float32)."""
    return fold(stat, *gram(x))


def _reversed_cholesky(H, damp_abs):
    """``R`` upper triangular with ``R R^T = H + damp_abs I``: with ``J`` the reversal,
    ``R = J chol(J H J) J``. Then ``U = R^-1`` is upper with ``U^T U = inv(H + damp_abs I)``: the
    reference's ``chol(inv(H), upper)``, the factor GPTQ's column updates use, from one Cholesky."""
    i = jnp.arange(H.shape[0])
    # one triangle is read (H symmetric; a transposed-read symmetrization cost 4 copies of H on CPU)
    return jnp.linalg.cholesky(H[::-1, ::-1].at[i, i].add(damp_abs), symmetrize_input=False)[::-1, ::-1]


def _diag_block_inverses(R, B: int):
    """``(n // B, B, B)``: the inverses of ``R``'s diagonal ``B x B`` blocks (``R`` upper, ``n % B == 0``),
    which are the diagonal blocks of ``R^-1``."""
    k = R.shape[0] // B
    blocks = R.reshape(k, B, k, B)[jnp.arange(k), :, jnp.arange(k), :]
    eye = jnp.eye(B, dtype=R.dtype)
    # lax.map, not vmap: a batched triangular solve inside the retry loop wedged XLA CPU's thread
    # pool (a jitted apply of two weights hung, idle, in two full runs of tests/test_gptq.py)
    return jax.lax.map(lambda r: jax.scipy.linalg.solve_triangular(r, eye, lower=False), blocks)


def _factor(H, damp, B: int, max_tries: int = 6):
    """``(R, Ub, d)``: ``R`` from :func:`_reversed_cholesky` of ``H + d * mean(diag H) I``, padded with
    the identity to a multiple of ``B``; ``Ub`` its diagonal blocks' inverses; ``d`` the relative
    dampening used: ``damp``, multiplied by 10 while the float32 factorisation is not finite."""
    n = H.shape[0]
    pad = -n % B
    mean_diag = jnp.mean(jnp.diag(H))
    mean_diag = jnp.where(mean_diag > 0, mean_diag, 1.0)

    def attempt(d):
        R = _reversed_cholesky(H, d * mean_diag)
        if pad:  # padded columns: identity, so no error flows to or from them
            R = jnp.pad(R, ((0, pad), (0, pad))) + jnp.diag(jnp.concatenate([jnp.zeros(n), jnp.ones(pad)]))
        return R, _diag_block_inverses(R, B)

    def cond(state):
        _, R, Ub, tries = state
        return ~(jnp.all(jnp.isfinite(R)) & jnp.all(jnp.isfinite(Ub))) & (tries < max_tries)

    def body(state):
        d, _, _, tries = state
        d = jnp.maximum(d * 10.0, 1e-4)
        return (d, *attempt(d), tries + 1)

    d0 = jnp.maximum(jnp.asarray(damp, jnp.float32), 0.0)
    d, R, Ub, _ = jax.lax.while_loop(cond, body, (d0, *attempt(d0), jnp.int32(0)))
    return R, Ub, d


@jax.jit
def inverse_hessian_upper(H, damp: float | jax.Array = 0.01):
    """Upper Cholesky factor ``U`` of ``inv(H + d * mean(diag H) I)`` and the relative ``d`` used
    (``damp``, multiplied by 10 while the float32 factorisation is not finite). The GPTQ core does not
    form ``U``: it works with ``R = U^-1`` and ``U``'s diagonal blocks (see :func:`_segment`)."""
    H = jnp.asarray(H, jnp.float32)
    n = H.shape[0]
    R, _, d = _factor((H + H.T) / 2, damp, min(128, n))
    return jax.scipy.linalg.solve_triangular(R, jnp.eye(R.shape[0], dtype=R.dtype), lower=False)[:n, :n], d


# ----------------------------------------------------------------------------- core
#
# Left-looking blocked GPTQ. With U = R^-1 (R R^T = H), GPTQ's updates give, for the columns of
# block b and the finished columns before it, W_b = W0_b - Err_<b U_<b,b, where W0 are the original
# weights and Err the scaled errors (w - q) / U_ii; and (W0 - Q)_<b = Err_<b U_<b,<b. The block
# inverse U_<b,b = -U_<b,<b R_<b,b U_bb turns this into
#
#     W_b = W0_b + (W0 - Q)_<b R_<b,b U_bb,
#
# so the lazy update of a block needs R (one Cholesky) and the inverse of R's own diagonal block,
# never the whole inverse. The columns of a block are then processed as in the reference (rank-1
# updates inside the block, in sub-blocks). The blocks run in segments of about n_blocks / 8 blocks:
# the contribution of each earlier segment is one matrix product of a fixed shape; inside a segment,
# each block reads the whole segment, its not-yet-finished rows masked by R's zeros.
# The work is that of the reference's right-looking lazy updates (rows x cols^2 flops) times
# (1 + 1/segments), and one compiled segment function serves every segment of the same size.

_SEGMENTS = 8

# Rows per pass through the segments: every row is quantized independently given R, so a tall matrix
# runs as a few chunks of rows, each through the same compiled segments. The column loop then works
# on (16, <= 4096) sub-blocks that stay in cache (14336 x 4096 on 2 cores: 2.9 s -> 2.5 s in the
# segments); the correction products keep >= 1024 rows, large enough to run at matmul speed.
_ROW_CHUNK = 4096


def _row_chunks(rows: int) -> list[tuple[int, int]]:
    """``[(r0, r1), ...]``: ``rows`` split into chunks of at most :data:`_ROW_CHUNK`, of equal size
    where a divisor allows it (one compiled shape), else the last one shorter."""
    n = -(-rows // _ROW_CHUNK)
    n = next((m for m in range(n, 2 * n + 1) if rows % m == 0 and rows // m >= _ROW_CHUNK // 4), n)
    rc = -(-rows // n)
    return [(r0, min(r0 + rc, rows)) for r0 in range(0, rows, rc)]


def _block_size(spec: QuantSpec, cols: int, blocksize: int, dynamic_groups: bool) -> int:
    if not dynamic_groups:
        return min(blocksize, cols)
    g = resolve_group_size(spec, cols)
    return g * max(1, blocksize // g)  # a whole number of groups per block


def _dynamic_groups(spec: QuantSpec, static_groups: bool) -> bool:
    """Group parameters computed during the column loop (from the error-corrected weights), not up
    front: every group-wise spec unless ``static_groups``."""
    return not (spec.per_tensor or spec.group_size is None or static_groups)


def _sub_block_size(B: int, g: int, dynamic: bool) -> int:
    return next(c for c in (16, 8, 4, 2, 1) if B % c == 0 and (not dynamic or g % c == 0))


@functools.partial(jax.jit, static_argnames=("spec", "B", "g", "dynamic"), donate_argnames=("done",))
def _segment(A, Rs, done, s, Ub, n_valid, bits, col_group, fixed_scale_t, fixed_zero_t, *, spec: QuantSpec,
             B: int, g: int, dynamic: bool):
    """GPTQ on segment ``s``: ``k = len(Ub)`` blocks of ``B`` columns (transposed: ``A (k B, rows)``,
    ``rows`` the chunk of rows being worked on).

    ``Rs``: ``R`` with its ``B x B`` diagonal blocks zeroed, ``Ub`` the inverses of this segment's
    diagonal blocks; ``done (segments, SF, rows)``: ``(W0 - Q)^T`` of the finished segments of ``SF``
    columns of these rows (the last segment may be shorter than ``SF``); ``n_valid``: columns from the segment's
    start that are not padding; ``bits`` (``(k B / g,)`` int32, mixed widths) or ``None``;
    ``col_group`` / ``fixed_*``: the group of each column and the fixed group parameters
    (``dynamic=False``). Every argument has the same shape for every full segment: one compilation.
    Returns ``done`` with this segment's ``(W0 - Q)^T``, the codes ``(k B, rows)``, the losses
    ``(k B,)`` and the dynamic groups' ``S, Z``."""
    SB, rows = A.shape
    SF = done.shape[1]
    k = SB // B
    off = s * SF
    # earlier segments' contribution R_<seg,seg^T (W0 - Q)_<seg^T: one (SF x SB) product per segment
    corr = jax.lax.fori_loop(0, s, lambda j, acc: acc + jax.lax.dynamic_slice(Rs, (j * SF, off), (SF, SB)).T
                             @ done[j], jnp.zeros((SB, rows), jnp.float32))
    Rseg = jax.lax.dynamic_slice(Rs, (off, off), (SB, SB))
    rows_s = 1 if spec.per_tensor else rows
    levels = spec.table
    sb = _sub_block_size(B, g, dynamic)

    def sub_block(c0, params_of, state):
        W1, U1, Q1, C1, L1 = state          # W1, Q1, C1: (B, rows): the block's columns, transposed
        Ws = jax.lax.dynamic_slice(W1, (c0, 0), (sb, rows))
        Us = jax.lax.dynamic_slice(U1, (c0, c0), (sb, sb))

        def column(i, st):
            Ws, Es, Qs, Cs, Ls = st
            s, z, b = params_of(c0 + i)
            w = Ws[i]
            d = Us[i, i]
            code = quantize_codes(w, s, z, spec, b)
            q = dequantize_codes(code, s, z, format=spec.format, bits=spec.bits if b is None else b, levels=levels)
            err = (w - q) / d
            Ws = Ws - Us[i][:, None] * err[None, :]   # Us upper triangular: earlier rows untouched
            return (Ws, Es.at[i].set(err), Qs.at[i].set(q), Cs.at[i].set(code),
                    Ls.at[i].set(jnp.sum((w - q) ** 2) / (d * d) / 2))

        zeros = jnp.zeros((sb, rows), jnp.float32)
        init = (Ws, zeros, zeros, jnp.zeros((sb, rows), jnp.uint8), jnp.zeros((sb,), jnp.float32))
        _, Es, Qs, Cs, Ls = jax.lax.fori_loop(0, sb, column, init)
        # the sub-block's errors reach the rest of the block with one small product
        W1 = W1 - jax.lax.dynamic_slice(U1, (c0, 0), (sb, B)).T @ Es
        return (W1, U1, jax.lax.dynamic_update_slice(Q1, Qs, (c0, 0)),
                jax.lax.dynamic_update_slice(C1, Cs, (c0, 0)), jax.lax.dynamic_update_slice(L1, Ls, (c0,)))

    def block(l, carry):
        A, codes, losses, S, Z = carry
        o = l * B
        W0 = A[o:o + B]
        # W_b = W0_b + U_bb^T R_<b,b^T (W0 - Q)_<b^T: the segment's finished blocks are A[:o]
        c = corr[o:o + B] + (Rseg[:o, o:o + B].T @ A[:o] if o else 0.0)
        U1 = Ub[l]
        state = (W0 + U1.T @ c, U1, jnp.zeros((B, rows), jnp.float32), jnp.zeros((B, rows), jnp.uint8),
                 jnp.zeros((B,), jnp.float32))
        if dynamic:
            def group(j, carry):
                state, S, Z = carry
                Wg = jax.lax.dynamic_slice(state[0], (j * g, 0), (g, rows))
                valid = (o + j * g + jnp.arange(g)) < n_valid   # padding columns don't count
                gi = (o + j * g) // g
                b = None if bits is None else bits[gi]
                s, z = compute_params(Wg.T, spec, valid, b)
                S = jax.lax.dynamic_update_slice(S, s[None, :], (gi, 0))
                if z is not None:
                    Z = jax.lax.dynamic_update_slice(Z, z[None, :], (gi, 0))
                state = jax.lax.fori_loop(0, g // sb, lambda t, st: sub_block(j * g + t * sb, lambda i: (s, z, b), st),
                                          state)
                return state, S, Z

            state, S, Z = jax.lax.fori_loop(0, B // g, group, (state, S, Z))
        else:
            def fixed(i):
                gi = col_group[o + i]
                return fixed_scale_t[gi], (None if fixed_zero_t is None else fixed_zero_t[gi]), None

            state = jax.lax.fori_loop(0, B // sb, lambda t, st: sub_block(t * sb, fixed, st), state)
        _, _, Q1, C1, L1 = state
        A = jax.lax.dynamic_update_slice(A, W0 - Q1, (o, 0))   # finished: A holds (W0 - Q)^T
        return (A, jax.lax.dynamic_update_slice(codes, C1, (o, 0)), jax.lax.dynamic_update_slice(losses, L1, (o,)),
                S, Z)

    n_g = SB // g if dynamic else 1
    init = (A, jnp.zeros((SB, rows), jnp.uint8), jnp.zeros((SB,), jnp.float32),
            jnp.zeros((n_g, rows_s), jnp.float32), jnp.zeros((n_g, rows_s), jnp.float32))
    carry = init
    for l in range(k):   # unrolled: block l's in-segment correction reads exactly the l finished blocks
        carry = block(l, carry)
    A, codes, losses, S, Z = carry
    if SB == SF:   # a shorter (last) segment is never read again
        done = jax.lax.dynamic_update_slice(done, A[None], (s, 0, 0))
    return done, codes, losses, S, Z


@functools.partial(jax.jit, static_argnames=("spec", "B", "act_order", "dynamic", "zero_dead"))
def _prepare(W, H, damp, *, spec: QuantSpec, B: int, act_order: bool, dynamic: bool, zero_dead: bool):
    """Dead columns, fixed group parameters, act-order and the factorisation: returns the permuted,
    padded, transposed weights ``(cols_pad, rows)``, ``R`` with its diagonal blocks zeroed, their
    inverses ``Ub``, the permutation, the dampening used and the fixed group parameters (or ``None``)."""
    rows, cols = W.shape
    W = W.astype(jnp.float32)
    H = H.astype(jnp.float32)   # symmetric: the Cholesky reads one triangle, as the reference's does
    diag = jnp.diag(H)
    dead = diag <= 0
    H = H.at[jnp.arange(cols), jnp.arange(cols)].set(jnp.where(dead, 1.0, diag))
    if zero_dead:
        W = jnp.where(dead[None, :], 0.0, W)
    fixed = None if dynamic else group_params(W, spec)   # every group's parameters, original column order
    if act_order:
        perm = jnp.argsort(-jnp.diag(H), stable=True).astype(jnp.int32)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = jnp.arange(cols, dtype=jnp.int32)
    R, Ub, damp_used = _factor(H, damp, B)
    blk = jnp.arange(R.shape[0]) // B
    Rs = jnp.where(blk[:, None] == blk[None, :], 0.0, R)
    Wt = jnp.pad(W, ((0, 0), (0, R.shape[0] - cols))).T
    return Wt, Rs, Ub, perm, damp_used, fixed


def _gptq_impl(W, H, damp, group_bits=None, *, spec: QuantSpec, blocksize: int, act_order: bool,
               static_groups: bool, zero_dead: bool):
    """The GPTQ core (see the comment above :data:`_SEGMENTS`). ``group_bits`` (int32 ``(n_groups,)``,
    dynamic int groups only): a bit width per group instead of ``spec.bits``; the result is then the
    raw ``(codes, scales, zeros, losses, damp)`` (codes as uint8, one width per group:
    :func:`quantize_weight_mixed` packs them)."""
    rows, cols = W.shape
    g = resolve_group_size(spec, cols)
    n_groups = -(-cols // g)  # the last group may be partial (spec.partial_groups)
    dynamic = _dynamic_groups(spec, static_groups)
    B = _block_size(spec, cols, blocksize, dynamic)
    n_blocks = -(-cols // B)
    cols_pad = n_blocks * B
    Wt, Rs, Ub, perm, damp_used, fixed = _prepare(W, H, damp, spec=spec, B=B, act_order=act_order,
                                                  dynamic=dynamic, zero_dead=zero_dead)
    if fixed is None:
        col_group = fixed_scale_t = fixed_zero_t = None
    else:
        fixed_scale, fixed_zero, scales_leaf = fixed
        col_group = jnp.pad(perm // g, (0, cols_pad - cols))   # padded columns read group 0
        fixed_scale_t = fixed_scale.T
        fixed_zero_t = None if fixed_zero is None else fixed_zero.T
    if group_bits is not None:  # padded groups quantize at spec.bits; their output is dropped
        group_bits = jnp.pad(jnp.asarray(group_bits, jnp.int32), (0, cols_pad // g - n_groups),
                             constant_values=spec.bits)
    k = -(-n_blocks // _SEGMENTS)   # blocks per segment (the last one may be shorter)
    codes, losses, S, Z = [], [], [], []
    for r0, r1 in _row_chunks(rows):   # rows are independent given R: one pass per chunk of rows
        def rows_of(t):   # a (groups, rows) table's chunk; per-tensor tables (groups, 1) are shared
            return None if t is None else (t[:, r0:r1] if t.shape[1] == rows else t)

        done = jnp.zeros((n_blocks // k, k * B, r1 - r0), jnp.float32)   # (W0 - Q)^T of the full segments
        chunk = [], [], [], []
        for s, b0 in enumerate(range(0, n_blocks, k)):
            off, end = b0 * B, min(n_blocks, b0 + k) * B
            done, *out = _segment(Wt[off:end, r0:r1], Rs, done, np.int32(s), Ub[b0:b0 + k], np.int32(cols - off),
                                  None if group_bits is None else group_bits[off // g:end // g],
                                  None if col_group is None else col_group[off:end], rows_of(fixed_scale_t),
                                  rows_of(fixed_zero_t), spec=spec, B=B, g=g, dynamic=dynamic)
            for acc, v in zip(chunk, out):
                acc.append(v)
        for acc, v in zip((codes, losses, S, Z), chunk):
            acc.append(v)
    return _finish(codes, losses, S, Z, perm, damp_used, group_bits is not None,
                   None if fixed is None else (scales_leaf, fixed_zero), spec=spec, g=g, cols=cols,
                   act_order=act_order, dynamic=dynamic)


@functools.partial(jax.jit, static_argnames=("mixed", "spec", "g", "cols", "act_order", "dynamic"))
def _finish(codes, losses, S, Z, perm, damp_used, mixed, fixed, *, spec, g, cols, act_order, dynamic):
    """Concatenate the segments, undo the transposition, padding and act-order, and pack."""
    n_groups = -(-cols // g)

    def join(chunks):   # [row chunk][segment] (columns, rows of the chunk) -> (rows, columns)
        return jnp.concatenate([jnp.concatenate(c) for c in chunks], axis=1).T

    codes = join(codes)[:, :cols]
    losses = sum(jnp.concatenate(c) for c in losses)[:cols]   # summed over rows: add the chunks
    losses = jnp.zeros_like(losses).at[perm].set(losses)
    if dynamic:
        S = join(S)[:, :n_groups]
        Z = join(Z)[:, :n_groups]
    if mixed:
        return codes, S, Z, losses, damp_used
    if dynamic:
        zero = Z if (spec.format == "int" and not spec.symmetric) else None
        q = pack_result(codes, S.astype(spec.scale_dtype), zero, spec, group_size=g,
                        perm=perm if act_order else None)
    else:
        scales_leaf, fixed_zero = fixed
        if act_order:  # codes back to the original column order: the groups are the original ones
            codes = jnp.zeros_like(codes).at[:, perm].set(codes)
        q = pack_result(codes, scales_leaf, fixed_zero, spec, group_size=g)
    return GPTQResult(q, losses, damp_used)


def _check_problem(W, H, spec: QuantSpec, blocksize, damp, static_groups: bool):
    """The argument checks of :func:`quantize_weight`; returns ``(W, H)`` as arrays."""
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec: expected a QuantSpec, got {type(spec).__name__}")
    W = check_matrix(W, "W")
    cols = W.shape[1]
    H = jnp.asarray(H)
    if H.shape != (cols, cols):
        raise ValueError(f"H: expected shape ({cols}, {cols}) for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if not jnp.issubdtype(H.dtype, jnp.floating):
        raise ValueError(f"H: expected a floating dtype, got {H.dtype}")
    if not isinstance(H, jax.core.Tracer) and not bool(jnp.isfinite(H).all()):
        raise ValueError("H: contains NaN or Inf values (check the calibration activations)")
    if spec.format == "onebit":
        raise ValueError("spec.format='onebit': GPTQ quantizes column by column with per-group parameters; "
                         "OneBit's two value vectors come from an SVD (use lowbit.quantize or the OneBit method)")
    resolve_group_size(spec, cols)
    if spec.double_quant and _dynamic_groups(spec, static_groups):
        raise ValueError("spec.double_quant=True needs all scales up front: pass static_groups=True "
                         "(or use per-channel / per-tensor scales)")
    if not is_int(blocksize) or blocksize <= 0:
        raise ValueError(f"blocksize={blocksize!r}: expected a positive int")
    if not isinstance(damp, jax.core.Tracer) and not (is_real(damp) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp={damp!r}: expected a finite, non-negative fraction of mean(diag(H))")
    return W, H


def quantize_weight(W, H, spec: QuantSpec, *, blocksize: int = 128, damp: float = 0.01,
                    act_order: bool = False, static_groups: bool = False, zero_dead: bool = False) -> GPTQResult:
    """GPTQ-quantize ``W (out_features, in_features)`` given the input Hessian ``H (in, in)``.

    Returns a :class:`GPTQResult` with the :class:`QuantizedTensor`, the per-column losses and the
    dampening used. See the module docstring for the algorithm and options.
    """
    res = solve(W, H, spec, blocksize=blocksize, damp=damp, act_order=act_order, static_groups=static_groups,
                    zero_dead=zero_dead)
    check_scales(res.q, W, spec, "W")
    return res


def solve(W, H, spec: QuantSpec, *, blocksize, damp, act_order, static_groups, zero_dead) -> GPTQResult:
    """:func:`quantize_weight` up to the result, not waiting for it (no check of its scales): several
    weights on several devices then run at once (:func:`lowbit.dist.spread`)."""
    W, H = _check_problem(W, H, spec, blocksize, damp, static_groups)
    return _gptq_impl(W, H, jnp.float32(damp), spec=spec, blocksize=int(blocksize), act_order=bool(act_order),
                      static_groups=bool(static_groups), zero_dead=bool(zero_dead))


def quantize_weight_mixed(W, H, spec: QuantSpec, widths, *, blocksize: int = 128, damp: float = 0.01,
                          zero_dead: bool = False):
    """GPTQ with a bit width per group: group ``g`` (``spec.group_size`` columns, original order) is
    quantized at ``widths[g]`` bits, and every column's rounding error flows on to the later columns
    through the same inverse Hessian whatever their width (mixed precision inside one matrix, for
    column-block bit allocations). ``spec``: a group-wise int format (``spec.bits`` is ignored);
    dynamic groups, no act-order (groups must stay the original column blocks the widths name).
    With all widths equal to ``spec.bits`` the codes, scales and zeros are those of
    :func:`quantize_weight`. Returns ``(MixedWidthWeight, losses, damp)``."""
    from lowbit.core.mixed import assemble, check_widths

    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec: expected a QuantSpec, got {type(spec).__name__}")
    W = check_matrix(W, "W")
    cols = W.shape[1]
    resolve_group_size(spec, cols)
    widths = check_widths(widths, spec, cols)
    one = dataclasses.replace(spec, bits=max(widths))   # spec.bits is not used: the widths are
    W, H = _check_problem(W, H, one, blocksize, damp, False)
    codes, S, Z, losses, damp_used = _gptq_impl(
        W, H, jnp.float32(damp), jnp.asarray(widths, jnp.int32), spec=one, blocksize=int(blocksize),
        act_order=False, static_groups=False, zero_dead=bool(zero_dead))
    zero = Z if not spec.symmetric else None
    return assemble(codes, S, zero, spec, widths), losses, damp_used


# ----------------------------------------------------------------------------- transform
