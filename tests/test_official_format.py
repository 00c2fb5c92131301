"""mlx_v4.testing.official: the official DeepSeek V4 checkpoint format, bit for bit.

FP8 e4m3 with 128x128 E8M0 tiles and packed FP4 e2m1 with 32-wide E8M0 groups are checked
against independent ml_dtypes casts (scales computed in float64 with log2), the nibble order
against a hand-built byte, and the written shards against MLX's own safetensors reader.
"""

from __future__ import annotations

import json
import math
import re

import ml_dtypes
import numpy as np
import pytest

from mlx_v4.testing import official
from mlx_v4.testing.tiny import TINY_CONFIG

_E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _ref_exponent(amax: float, qmax: float, floor: float) -> int:
    return math.ceil(math.log2(max(float(amax), floor) / qmax))


def _ref_fp8(w: np.ndarray):
    """Independent reference: per tile, exponent in float64, ml_dtypes cast of w / 2**e."""
    out, inp = w.shape
    ro, ri = -(-out // 128), -(-inp // 128)
    q = np.zeros((out, inp), np.uint8)
    s = np.zeros((ro, ri), np.uint8)
    for i in range(ro):
        for j in range(ri):
            tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            e = _ref_exponent(np.abs(tile).max(), 448.0, 1e-4)
            s[i, j] = e + 127
            scaled = (tile.astype(np.float64) / 2.0**e).astype(np.float32)  # exact: power of two
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = scaled.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return q, s


@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (200, 96), (130, 260), (1, 5), (64, 100)])
def test_fp8_block_matches_ml_dtypes(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    # rows with very different magnitudes so tiles get different scales
    w = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, (shape[0], 1))).astype(np.float32)
    q, s = official.quantize_fp8_block(w)
    assert q.dtype == np.uint8 and q.shape == shape
    assert s.dtype == np.uint8 and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    rq, rs = _ref_fp8(w)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(q, rq)
    deq = official.dequantize_fp8_block(q, s)
    want = q.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * np.repeat(
        np.repeat(2.0 ** (s.astype(np.float64) - 127), 128, 0), 128, 1)[:shape[0], :shape[1]]
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, want.astype(np.float32))
    # round-to-nearest: within half an e4m3 step (3 mantissa bits) of the input, never NaN
    assert np.isfinite(deq).all()
    scale = np.repeat(np.repeat(2.0 ** (s.astype(np.float64) - 127), 128, 0), 128, 1)[:shape[0], :shape[1]]
    assert (np.abs(deq - w) <= np.maximum(np.abs(w) * 2.0**-4, scale * 2.0**-10) + 1e-30).all()
    # idempotent on values (bytes may differ where a tile's amax rounded down to a power of two)
    np.testing.assert_array_equal(official.dequantize_fp8_block(*official.quantize_fp8_block(deq)), deq)


@pytest.mark.parametrize("amax,byte,back", [(448.0, 127, 448.0), (449.0, 128, 448.0), (56.0, 124, 56.0),
                                            (1.0, 119, 1.0), (896.0, 128, 896.0), (0.0, 105, 0.0)])
def test_fp8_e8m0_scale_bytes(amax, byte, back):
    """scale = 2**ceil(log2(amax / 448)), amax floored at 1e-4; byte = exponent + 127."""
    w = np.zeros((128, 128), np.float32)
    w[3, 7] = -amax
    q, s = official.quantize_fp8_block(w)
    assert s.tolist() == [[byte]]
    assert official.dequantize_fp8_block(q, s)[3, 7] == -back  # 449 / 2 = 224.5 rounds to even 224


def _ref_fp4(w: np.ndarray):
    out, inp = w.shape
    codes = np.zeros((out, inp), np.uint8)
    s = np.zeros((out, inp // 32), np.uint8)
    for r in range(out):
        for g in range(inp // 32):
            blk = w[r, g * 32:(g + 1) * 32]
            e = _ref_exponent(np.abs(blk).max(), 6.0, 6 * 2.0**-126)
            s[r, g] = e + 127
            scaled = (blk.astype(np.float64) / 2.0**e).astype(np.float32)
            codes[r, g * 32:(g + 1) * 32] = scaled.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F
    return codes, s


@pytest.mark.parametrize("shape", [(1, 32), (64, 128), (96, 160), (7, 64)])
def test_fp4_matches_ml_dtypes(shape):
    rng = np.random.default_rng(shape[0] + 7 * shape[1])
    w = (rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 3, (shape[0], 1))).astype(np.float32)
    packed, s = official.quantize_fp4_e2m1(w)
    assert packed.dtype == np.int8 and packed.shape == (shape[0], shape[1] // 2)
    assert s.dtype == np.uint8 and s.shape == (shape[0], shape[1] // 32)
    codes, rs = _ref_fp4(w)
    np.testing.assert_array_equal(s, rs)
    b = packed.view(np.uint8)
    np.testing.assert_array_equal(b & 0x0F, codes[:, 0::2])  # low nibble = even input
    np.testing.assert_array_equal(b >> 4, codes[:, 1::2])
    deq = official.dequantize_fp4_e2m1(packed, s)
    want = _E2M1[codes] * np.repeat(2.0 ** (s.astype(np.float64) - 127), 32, 1)
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, want.astype(np.float32))
    np.testing.assert_array_equal(official.dequantize_fp4_e2m1(*official.quantize_fp4_e2m1(deq)), deq)


def test_fp4_nibble_order_by_hand():
    """[0.5, -6, 0, ...]: amax 6 -> scale 2**0 (byte 127); 0.5 = code 1, -6 = code 0xF -> byte 0xF1."""
    w = np.zeros((1, 32), np.float32)
    w[0, :2] = [0.5, -6.0]
    packed, s = official.quantize_fp4_e2m1(w)
    assert s.tolist() == [[127]]
    assert packed.view(np.uint8)[0, 0] == 0xF1 and packed[0, 0] == np.int8(-15)
    assert (packed.view(np.uint8)[0, 1:] == 0).all()
    w[0, :2] = [3.0, 1.5]  # amax 3 -> scale 2**-1: 3 -> 6 (code 7), 1.5 -> 3 (code 5) -> 0x57
    packed, s = official.quantize_fp4_e2m1(w)
    assert s.tolist() == [[126]] and packed.view(np.uint8)[0, 0] == 0x57
    assert official.dequantize_fp4_e2m1(packed, s)[0, :3].tolist() == [3.0, 1.5, 0.0]
    zeros, s0 = official.quantize_fp4_e2m1(np.zeros((2, 64), np.float32))
    assert (zeros == 0).all() and (s0 == 1).all()  # amax floored at 6 * 2**-126 -> exponent -126


def test_random_weights_deterministic_and_healthy():
    a = official.random_official_weights(TINY_CONFIG, seed=5)
    b = official.random_official_weights(TINY_CONFIG, seed=5)
    c = official.random_official_weights(TINY_CONFIG, seed=6)
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["embed.weight"], c["embed.weight"])
    assert any(k.startswith("mtp.0.") for k in a)
    assert not any(k.startswith("mtp.") for k in official.random_official_weights(TINY_CONFIG, include_mtp=False))
    hc, D, E, k = 4, TINY_CONFIG["hidden_size"], TINY_CONFIG["n_routed_experts"], TINY_CONFIG["num_experts_per_tok"]
    assert a["layers.0.hc_attn_fn"].shape == ((2 + hc) * hc, hc * D)
    assert a["layers.1.attn.compressor.wkv.weight"].shape == (2 * 128, D)  # ratio 4: two halves
    assert a["layers.2.attn.compressor.ape"].shape == (128, 128)  # ratio 128
    assert "layers.2.attn.indexer.wq_b.weight" not in a and "layers.1.attn.indexer.wq_b.weight" in a
    assert "mtp.0.attn.compressor.wkv.weight" not in a  # MTP ratio 0
    tid = a["layers.0.ffn.gate.tid2eid"]
    assert tid.dtype == np.int64 and tid.shape == (TINY_CONFIG["vocab_size"], k)
    assert ((tid >= 0) & (tid < E)).all() and (np.sort(tid, 1)[:, 1:] != np.sort(tid, 1)[:, :-1]).all()
    assert "layers.1.ffn.gate.bias" in a and "layers.1.ffn.gate.tid2eid" not in a
    for name, v in a.items():
        if v.dtype != np.int64:
            assert v.dtype == np.float32 and np.isfinite(v).all(), name


_KIND = [  # (pattern, dtype stored, has .scale)
    (r"ffn\.experts\.\d+\.w[123]\.weight$", "I8", True),
    (r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|indexer\.wq_b|shared_experts\.w[123]|[eh]_proj)\.weight$", "F8_E4M3", True),
    (r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$", "F32", False),
    (r"tid2eid$", "I64", False),
    (r".", "BF16", False),
]


def _kind(name):
    return next((d, sc) for p, d, sc in _KIND if re.search(p, name))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("official")
    raw = official.random_official_weights(TINY_CONFIG, seed=1)
    exact = official.write_official_checkpoint(path, TINY_CONFIG, raw, max_shard_bytes=1 << 19)
    return path, raw, exact


def test_checkpoint_layout(tiny_ckpt):
    path, raw, exact = tiny_ckpt
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                          "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    assert cfg["expert_dtype"] == "fp4" and cfg["compress_ratios"] == TINY_CONFIG["compress_ratios"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert sorted(p.name for p in path.iterdir()) == sorted(shards + ["config.json", "model.safetensors.index.json"])
    stored = {}
    for s in shards:
        for name, (dtype, shape, data) in official.read_safetensors(path / s).items():
            assert index["weight_map"][name] == s
            stored[name] = (dtype, shape, data)
    assert index["metadata"]["total_size"] == sum(d.nbytes for _, _, d in stored.values())
    assert set(exact) == set(raw)
    expected_names = set(raw) | {n[: -len(".weight")] + ".scale" for n in raw if _kind(n)[1]}
    assert set(stored) == expected_names
    for name, w in raw.items():
        dtype, has_scale = _kind(name)
        assert stored[name][0] == dtype, name
        if dtype == "I8":
            assert stored[name][1] == (w.shape[0], w.shape[1] // 2)
            sdt, sshape, _ = stored[name[:-7] + ".scale"]
            assert (sdt, sshape) == ("F8_E8M0", (w.shape[0], w.shape[1] // 32))
        elif dtype == "F8_E4M3":
            sdt, sshape, _ = stored[name[:-7] + ".scale"]
            assert (sdt, sshape) == ("F8_E8M0", (-(-w.shape[0] // 128), -(-w.shape[1] // 128)))
        else:
            assert stored[name][1] == w.shape
        if dtype == "BF16":
            np.testing.assert_array_equal(exact[name], w.astype(ml_dtypes.bfloat16).astype(np.float32))
        elif dtype in ("F32", "I64"):
            np.testing.assert_array_equal(exact[name], w)
        assert exact[name].shape == w.shape


def test_unquantized_variants(tmp_path):
    raw = official.random_official_weights(TINY_CONFIG, seed=2, include_mtp=False)
    exact = official.write_official_checkpoint(tmp_path / "a", TINY_CONFIG, raw, expert_fp4=False)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "expert_dtype" not in cfg and "quantization_config" in cfg
    name = "layers.1.ffn.experts.3.w2.weight"
    (shard,) = {json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"][name]}
    assert official.read_safetensors(tmp_path / "a" / shard)[name][0] == "F8_E4M3"
    q, s = official.quantize_fp8_block(raw[name])
    np.testing.assert_array_equal(exact[name], official.dequantize_fp8_block(q, s))
    exact = official.write_official_checkpoint(tmp_path / "b", TINY_CONFIG, raw, fp8=False, expert_fp4=False)
    assert "quantization_config" not in json.loads((tmp_path / "b" / "config.json").read_text())
    np.testing.assert_array_equal(exact[name], raw[name].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_mlx_reads_the_shards(tiny_ckpt):
    """mx.load reads every shard; F8 tensors come back as uint8 and from_fp8 * 2**(scale-127)
    is the writer's exact value; BF16/F32/I64 come back as written."""
    import mlx.core as mx
    path, raw, exact = tiny_ckpt
    loaded = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        loaded |= mx.load(str(shard))
    checked = set()
    for name, want in exact.items():
        arr = loaded[name]
        dtype = _kind(name)[0]
        if dtype == "F8_E4M3":
            scale = loaded[name[:-7] + ".scale"]
            assert arr.dtype == mx.uint8 and scale.dtype == mx.uint8
            s = mx.power(mx.array(2.0), scale.astype(mx.float32) - 127)
            s = mx.repeat(mx.repeat(s, 128, axis=0), 128, axis=1)[: arr.shape[0], : arr.shape[1]]
            got = mx.from_fp8(arr, dtype=mx.float32) * s
        elif dtype == "I8":
            scale = loaded[name[:-7] + ".scale"]
            assert arr.dtype == mx.int8 and scale.dtype == mx.uint8
            b = np.array(arr).view(np.uint8)
            codes = np.stack([b & 0x0F, b >> 4], -1).reshape(b.shape[0], -1)
            got = mx.array(_E2M1[codes]) * mx.repeat(mx.power(mx.array(2.0), scale.astype(mx.float32) - 127), 32, 1)
        elif dtype == "BF16":
            assert arr.dtype == mx.bfloat16
            got = arr.astype(mx.float32)
        elif dtype == "F32":
            assert arr.dtype == mx.float32
            got = arr
        else:
            assert arr.dtype == mx.int64
            got = arr
        np.testing.assert_array_equal(np.array(got), want, err_msg=name)
        checked.add(dtype)
    assert checked == {"F8_E4M3", "I8", "BF16", "F32", "I64"}


def test_write_read_safetensors_roundtrip(tmp_path):
    tensors = {"a": ("F32", np.arange(6, dtype=np.float32).reshape(2, 3)),
               "b": ("F8_E8M0", np.array([[127, 1]], np.uint8)),
               "c": ("I64", np.array([5, -1], np.int64))}
    official.write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    back = official.read_safetensors(tmp_path / "x.safetensors")
    assert list(back) == ["a", "b", "c"] and not list(tmp_path.glob("*.tmp"))
    for k, (dt, arr) in tensors.items():
        assert back[k][0] == dt and back[k][1] == arr.shape
        assert back[k][2].tobytes() == arr.tobytes()


def test_bf16_names(tmp_path):
    raw = official.random_official_weights(TINY_CONFIG, seed=3, include_mtp=False)
    for i, spec in enumerate([r"attn\.wo_a\.weight$", {"layers.1.attn.wo_a.weight", "layers.2.ffn.experts.0.w1.weight"}]):
        exact = official.write_official_checkpoint(tmp_path / str(i), TINY_CONFIG, raw, bf16_names=spec)
        wm = json.loads((tmp_path / str(i) / "model.safetensors.index.json").read_text())["weight_map"]
        forced = [n for n in raw if (re.search(spec, n) if isinstance(spec, str) else n in spec)]
        assert forced and "layers.1.attn.wo_a.scale" not in wm
        for n in forced:
            assert official.read_safetensors(tmp_path / str(i) / wm[n])[n][0] == "BF16"
            np.testing.assert_array_equal(exact[n], raw[n].astype(ml_dtypes.bfloat16).astype(np.float32))
        assert official.read_safetensors(tmp_path / str(i) / wm["layers.1.attn.wq_a.weight"])["layers.1.attn.wq_a.weight"][0] == "F8_E4M3"
