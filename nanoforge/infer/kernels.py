"""Compiled (numba) pieces of the CPU decode step: everything between the matrix multiplications.

One decode step on a CPU is ~30 matrix products (MKL, through torch) and, between them, norms, RoPE, the
KV-cache write, attention over the cache and the MLP activation. In eager PyTorch those are ~30 small ops
per layer, each a few microseconds of dispatch for a few hundred floats of work: at batch 1 on the
benchmark's 7.7 M-parameter model they cost about half as much as the matrix products. Here they are four
compiled calls per layer (norm, attention, norm, activation) on numpy views of the engine's torch buffers
(`nanoforge.infer.engine.CpuDecodeStep` drives them), so the step costs little more than its matrix
products. Attention, which reads the whole cache (as many bytes as the weights at batch 16), and the
activation spread their rows over the cores (numba's thread pool, sized to torch's thread count).

Every kernel is float32 in and out, with the math of `nanoforge.model` (same formulas and order of the
operations; float32 sums may round differently from torch's, ~1e-7 relative). Absent parts (no bias, no
RoPE, no QK-norm) are passed as empty arrays so each kernel compiles once.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from nanoforge.jit import jit

# reassociation (vectorized sums) and fused multiply-add; never "no infs": attention starts its max at -inf
_FAST = {"nsz", "arcp", "contract", "reassoc"}
_GELU_C = np.float32(0.7978845608028654)  # sqrt(2 / pi)
_GELU_A = np.float32(0.044715)


@jit(fastmath=_FAST)
def embed(tokens, wte, wpe, positions, out):
    """out[b] = wte[tokens[b]] (+ wpe[positions[b]] when the learned position table is not empty)."""
    B, D = out.shape
    for b in range(B):
        t = tokens[b]
        for i in range(D):
            out[b, i] = wte[t, i]
        if wpe.shape[0]:
            p = positions[b]
            for i in range(D):
                out[b, i] += wpe[p, i]


@jit(fastmath=_FAST)
def norm(x, weight, bias, eps, centered, out):
    """Per row of x (B, D): LayerNorm (`centered`, with bias) or RMSNorm (bias unused), times the gain."""
    B, D = x.shape
    for b in range(B):
        mean = np.float32(0.0)
        if centered:
            for i in range(D):
                mean += x[b, i]
            mean /= D
        var = np.float32(0.0)
        for i in range(D):
            d = x[b, i] - mean
            var += d * d
        r = np.float32(1.0) / np.sqrt(var / D + eps)
        if centered:
            for i in range(D):
                out[b, i] = (x[b, i] - mean) * r * weight[i] + bias[i]
        else:
            for i in range(D):
                out[b, i] = x[b, i] * r * weight[i]


@jit(fastmath=_FAST)
def _head(row, offset, gain, eps, cos, sin, position, out):
    """One query or key head `row[offset : offset + hd]` into out (hd,): RMSNorm over the head with `gain`
    (QK-norm, when gain is not empty), then RoPE at `position` (when the cos/sin tables are not empty)."""
    hd = out.shape[0]
    if gain.shape[0]:
        var = np.float32(0.0)
        for i in range(hd):
            var += row[offset + i] * row[offset + i]
        r = np.float32(1.0) / np.sqrt(var / hd + eps)
        for i in range(hd):
            out[i] = row[offset + i] * r * gain[i]
    else:
        for i in range(hd):
            out[i] = row[offset + i]
    if cos.shape[0]:  # x·cos + rotate_half(x)·sin: pairs (i, i + hd/2)
        half = hd // 2
        for i in range(half):
            a, b = out[i], out[i + half]
            c, s = cos[position, i], sin[position, i]
            out[i] = a * c - b * s
            out[i + half] = b * c + a * s


@jit(fastmath=_FAST, parallel=True)
def attend(qkv, k_cache, v_cache, slot, pad, cos, sin, q_gain, k_gain, eps, n_head, out):
    """Attention of one new token per row, for one layer.

    qkv (B, (H + 2·KV)·hd) is the fused projection `[q heads; k heads; v heads]`; each row's key and value
    heads (QK-normed and rotated like the queries) are written to cache slot `slot` of k_cache/v_cache
    (B, KV, S, hd), then each query head attends over the row's slots `pad[b] .. slot` (left padding is
    skipped, not masked) with the key/value head it shares under GQA (query head h reads KV head
    h // (H / KV)). out (B, H·hd) gets the softmax-weighted values, scaled by 1/sqrt(hd) as SDPA does.
    The (row, query head) pairs are spread over the cores: reading the cache is most of the work."""
    B = qkv.shape[0]
    KV, hd = k_cache.shape[1], k_cache.shape[3]
    group = n_head // KV
    scale = np.float32(1.0 / np.sqrt(hd))
    vec = np.empty(hd, np.float32)
    for b in range(B):
        for g in range(KV):
            _head(qkv[b], (n_head + g) * hd, k_gain, eps, cos, sin, slot - pad[b], vec)
            v_at = (n_head + KV + g) * hd
            for i in range(hd):
                k_cache[b, g, slot, i] = vec[i]
                v_cache[b, g, slot, i] = qkv[b, v_at + i]
    for task in prange(B * n_head):
        b, h = task // n_head, task % n_head
        first = pad[b]
        keys, values = k_cache[b, h // group], v_cache[b, h // group]  # (S, hd)
        q = np.empty(hd, np.float32)
        _head(qkv[b], h * hd, q_gain, eps, cos, sin, slot - first, q)
        scores = np.empty(slot + 1, np.float32)
        top = np.float32(-np.inf)
        for s in range(first, slot + 1):
            d = np.float32(0.0)
            for i in range(hd):
                d += q[i] * keys[s, i]
            scores[s] = d * scale
            top = max(top, scores[s])
        total = np.float32(0.0)
        for s in range(first, slot + 1):
            scores[s] = np.exp(scores[s] - top)
            total += scores[s]
        acc = np.zeros(hd, np.float32)
        for s in range(first, slot + 1):
            e = scores[s]
            for i in range(hd):
                acc[i] += e * values[s, i]
        inv = np.float32(1.0) / total
        for i in range(hd):
            out[b, h * hd + i] = acc[i] * inv


@jit(fastmath=_FAST, parallel=True)
def activate(h, swiglu, out):
    """The MLP's nonlinearity into out (B, N): SwiGLU `silu(h[:, :N]) · h[:, N:]`, else GELU (tanh) of h."""
    B, N = out.shape
    for b in prange(B):
        if swiglu:
            for j in range(N):
                g = h[b, j]
                out[b, j] = g / (np.float32(1.0) + np.exp(-g)) * h[b, N + j]
        else:
            for j in range(N):
                x = h[b, j]
                out[b, j] = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(_GELU_C * (x + _GELU_A * x * x * x)))
