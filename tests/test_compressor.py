"""The KV compressor at ratios other than 4 and 128 (the official Compressor is generic: only
ratio 4 overlaps), against a numpy transcription of the pooling (paper §2.3.2 eqs. 20-23)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_v4.layers.compressor import Compressor, CompressorState
from mlx_v4.layers.rope import RoPE
from mlx_v4.testing.tiny import tiny_args


def _reference(x, wkv, wgate, ape, norm_w, eps, inv_freq, ratio, rope_dim):
    """Entry i pools tokens ratio*i .. ratio*i+ratio-1 with a per-channel softmax over the gates
    plus ape, RMS-normalises, and rotates the last rope_dim dims at position ratio*i."""
    x = x.astype(np.float64)
    kv, score = x @ wkv.T, x @ wgate.T
    n = x.shape[0] // ratio
    out = []
    for i in range(n):
        s = score[i * ratio:(i + 1) * ratio] + ape
        w = np.exp(s - s.max(axis=0))
        w /= w.sum(axis=0)
        pooled = (w * kv[i * ratio:(i + 1) * ratio]).sum(axis=0)
        pooled = norm_w * pooled / np.sqrt((pooled ** 2).mean() + eps)
        rope = pooled[-rope_dim:].reshape(-1, 2)
        ang = ratio * i * inv_freq
        c, s_ = np.cos(ang), np.sin(ang)
        pooled[-rope_dim:] = np.stack([rope[:, 0] * c - rope[:, 1] * s_, rope[:, 0] * s_ + rope[:, 1] * c], -1).ravel()
        out.append(pooled)
    return np.array(out)


@pytest.mark.parametrize("ratio", [1, 2, 8, 16, 64])
def test_generic_ratio_matches_the_reference_in_any_chunking(ratio):
    args = tiny_args()
    D, hd, rd = args.hidden_size, args.head_dim, args.qk_rope_head_dim
    inv_freq = args.rope_inv_freq(compressed=True)
    comp = Compressor(D, hd, ratio, RoPE(inv_freq, rd), args.rms_norm_eps, for_indexer=False, fake_quant=False)
    rng = np.random.default_rng(ratio)
    params = dict(wkv=rng.normal(size=(hd, D)) * D ** -0.5, wgate=rng.normal(size=(hd, D)) * D ** -0.5,
                  ape=rng.normal(size=(ratio, hd)) * 0.5, norm_w=1 + 0.1 * rng.normal(size=hd))
    comp.wkv.weight, comp.wgate.weight = mx.array(params["wkv"], mx.float32), mx.array(params["wgate"], mx.float32)
    comp.ape, comp.norm.weight = mx.array(params["ape"], mx.float32), mx.array(params["norm_w"], mx.float32)
    L = 3 * ratio + ratio // 2 + 1
    x = rng.normal(size=(L, D)).astype(np.float32)
    expected = _reference(x, eps=args.rms_norm_eps, inv_freq=np.array(inv_freq), ratio=ratio, rope_dim=rd, **params)
    assert comp.wkv.weight.shape == (hd, D) and comp.ape.shape == (ratio, hd)  # no overlap half
    for sizes in ([L], [1] * L, [ratio + 1, 2, L - ratio - 3]):
        state, got, pos = CompressorState(), [], 0
        for n in sizes:
            values, _, state = comp(mx.array(x[None, pos:pos + n]), pos, state)
            if values is not None:
                got.append(np.array(values[0]))
            pos += n
        got = np.concatenate(got)
        assert got.shape == expected.shape, (sizes, got.shape)
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
        assert state.kv.shape[1] == L % ratio and state.prev_kv is None
