"""The Triton kernel behind :mod:`meswitch.engine.kernels.sgmv_triton` (semantics, shapes and layout: there).

Kept apart because Triton resolves a kernel's helpers from its module's globals and imports at
definition time; :mod:`~meswitch.engine.kernels.sgmv_triton` imports this module on first use only.
"""

import triton
import triton.language as tl


@triton.jit
def unpack_tile(codes, offs_n, n_mask, k0, stride_c, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    # Levels c - m [BLOCK_N, BLOCK_K] (float32) from the packed rows: a group of 8 codes is exactly BITS bytes.
    G: tl.constexpr = BLOCK_K // 8
    g = k0 // 8 + tl.arange(0, G)  # [G] group index in the row
    row = codes + offs_n[:, None].to(tl.int64) * stride_c
    word = tl.zeros((offs_n.shape[0], G), dtype=tl.int32)
    for i in tl.static_range(BITS):
        at = g * BITS + i
        byte = tl.load(row + at[None, :], mask=n_mask[:, None] & (at < stride_c)[None, :], other=0)
        word |= byte.to(tl.int32) << (8 * i)
    shift = tl.arange(0, 8) * BITS  # code j of a group sits at bits [j*BITS, (j+1)*BITS)
    c = (word[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)  # [BLOCK_N, G, 8]
    return tl.reshape(c, (offs_n.shape[0], BLOCK_K)).to(tl.float32) - ((1 << BITS) - 1) * 0.5  # c - m

@triton.jit
def accumulate(acc, xsum, x_ptr, rows, m_mask, stride_x, codes, offs_n, n_mask, stride_c, k_lo, k_hi, idx, has_idx,
               BITS: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr):
    # acc [BLOCK_M, BLOCK_N] += x_r @ (c - m)^T over quantized columns [k_lo, k_hi); xsum [BLOCK_M] += x_r.sum(1).
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        cols = offs_k
        if has_idx != 0:  # salient columns are skipped: x is gathered through rest_idx
            cols = tl.load(idx + offs_k, mask=k_mask, other=0)
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = unpack_tile(codes, offs_n, n_mask, k0, stride_c, BITS, BLOCK_K)  # float32 [BLOCK_N, BLOCK_K]
        if DOT:  # segments of many rows (prefill): the matrix units, levels exact in 16 bit
            if IEEE:  # noqa: SIM108 - a compile-time branch; Triton takes no keyword from a conditional
                acc = tl.dot(xt, tl.trans(w.to(xt.dtype)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(w.to(xt.dtype)), acc)
        else:  # decode-sized segments: multiply and reduce in registers, no shared-memory staging
            acc += tl.sum(xt.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
        xsum += tl.sum(xt.to(tl.float32), axis=1)
    return acc, xsum


@triton.jit
def sgmv(x_ptr, y_ptr, order_ptr, seg_ptr, ptrs_ptr, ints_ptr, n_experts, OUT, stride_x, stride_y,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
         DOT: tl.constexpr, IEEE: tl.constexpr):
    # Grid: (cdiv(OUT, BLOCK_N), segments, row tiles * SPLIT); SPLIT > 1 splits K and adds atomically
    # into a float32 y.
    pid_n, pid_s, pid_2 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_m, part = pid_2 // SPLIT, pid_2 % SPLIT
    start = tl.load(seg_ptr + pid_s * 3)
    end = tl.load(seg_ptr + pid_s * 3 + 1)
    e = tl.load(seg_ptr + pid_s * 3 + 2)
    row0 = start + pid_m * BLOCK_M
    if (row0 < end) & (e >= 0) & (e < n_experts):
        bits = tl.load(ints_ptr + e * 6)
        if bits > 0:
            stride_c = tl.load(ints_ptr + e * 6 + 1)
            K = tl.load(ints_ptr + e * 6 + 2)
            has_idx = tl.load(ints_ptr + e * 6 + 3)
            has_zq = tl.load(ints_ptr + e * 6 + 4)
            s_stride = tl.load(ints_ptr + e * 6 + 5)
            codes = tl.load(ptrs_ptr + e * 4).to(tl.pointer_type(tl.uint8))
            scale = tl.load(ptrs_ptr + e * 4 + 1).to(tl.pointer_type(tl.float32))
            idx = tl.load(ptrs_ptr + e * 4 + 3).to(tl.pointer_type(tl.int32))
            chunk = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K  # this program's columns, whole tiles
            k_lo = part * chunk
            k_hi = tl.minimum(k_lo + chunk, K)
            offs_m = row0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < end
            rows = tl.load(order_ptr + offs_m, mask=m_mask, other=0)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < OUT
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            # One branch per bit width, outside the K loop, so each loop is specialised and pipelined.
            if bits == 1:
                acc, xsum = accumulate(acc, xsum, x_ptr, rows, m_mask, stride_x, codes, offs_n, n_mask, stride_c,
                                       k_lo, k_hi, idx, has_idx, 1, BLOCK_K, DOT, IEEE)
            elif bits == 2:
                acc, xsum = accumulate(acc, xsum, x_ptr, rows, m_mask, stride_x, codes, offs_n, n_mask, stride_c,
                                       k_lo, k_hi, idx, has_idx, 2, BLOCK_K, DOT, IEEE)
            elif bits == 3:
                acc, xsum = accumulate(acc, xsum, x_ptr, rows, m_mask, stride_x, codes, offs_n, n_mask, stride_c,
                                       k_lo, k_hi, idx, has_idx, 3, BLOCK_K, DOT, IEEE)
            else:
                acc, xsum = accumulate(acc, xsum, x_ptr, rows, m_mask, stride_x, codes, offs_n, n_mask, stride_c,
                                       k_lo, k_hi, idx, has_idx, 4, BLOCK_K, DOT, IEEE)
            s = tl.load(scale + offs_n * s_stride, mask=n_mask, other=0.0)
            res = acc * s[None, :]
            if has_zq != 0:
                zq = tl.load(ptrs_ptr + e * 4 + 2).to(tl.pointer_type(tl.float32))
                z = tl.load(zq + offs_n, mask=n_mask, other=0.0)
                res += xsum[:, None] * z[None, :]
            yp = y_ptr + rows[:, None].to(tl.int64) * stride_y + offs_n[None, :]
            y_mask = m_mask[:, None] & n_mask[None, :]
            if SPLIT > 1:
                if k_lo < k_hi:
                    tl.atomic_add(yp, res, mask=y_mask)
            else:
                prev = tl.load(yp, mask=y_mask, other=0.0)
                tl.store(yp, (prev.to(tl.float32) + res).to(prev.dtype), mask=y_mask)
