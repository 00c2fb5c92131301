"""weights.py: official FP8/FP4 checkpoints -> mxfp8/mxfp4 exactly, transformers names,
our own MLX format, laziness, and one clear error per broken checkpoint."""

import json
import re
import struct

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_v4.draft.mtp import attach_mtp
from mlx_v4.model import Model
from mlx_v4.testing.tiny import TINY_CONFIG, tiny_args
from mlx_v4.weights import (
    INDEX_FILE,
    WeightsError,
    apply_quantization,
    load_weights,
    read_index,
    rename_weights,
    validate_weights,
)

# ---- helpers -----------------------------------------------------------------------------------


def expected_shapes(args, quantization=None, mtp=False):
    model = Model(args)
    if mtp:
        attach_mtp(model)
    apply_quantization(model, quantization or {})
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def our_random_weights(args, seed=0):
    """Random float weights in our names (what a dense checkpoint should load to)."""
    out = {}
    for i, (name, shape) in enumerate(sorted(expected_shapes(args).items())):
        k = mx.random.key(seed * 1000 + i)
        if name.endswith("tid2eid"):
            out[name] = mx.random.randint(0, args.n_routed_experts, shape, key=k).astype(mx.int32)
        else:
            out[name] = mx.random.normal(shape, key=k) * 0.1
    return out


_HF_LAYER = [  # ours -> transformers, written out by hand (independent of weights.RENAMES)
    ("hc_attn.", "attn_hc."), ("hc_ffn.", "ffn_hc."), ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."), ("attn.wq_a.", "self_attn.q_a_proj."),
    ("attn.q_norm.", "self_attn.q_a_norm."), ("attn.wq_b.", "self_attn.q_b_proj."),
    ("attn.wkv.", "self_attn.kv_proj."), ("attn.kv_norm.", "self_attn.kv_norm."),
    ("attn.wo_a.", "self_attn.o_a_proj."), ("attn.wo_b.", "self_attn.o_b_proj."),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.indexer.compressor.wkv.", "self_attn.compressor.indexer.kv_proj."),
    ("attn.indexer.compressor.wgate.", "self_attn.compressor.indexer.gate_proj."),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.norm.", "self_attn.compressor.indexer.kv_norm."),
    ("attn.indexer.wq_b.", "self_attn.compressor.indexer.q_b_proj."),
    ("attn.indexer.weights_proj.", "self_attn.compressor.indexer.scorer.weights_proj."),
    ("attn.compressor.wkv.", "self_attn.compressor.kv_proj."),
    ("attn.compressor.wgate.", "self_attn.compressor.gate_proj."),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.norm.", "self_attn.compressor.kv_norm."),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"), ("ffn.gate.", "mlp.gate."),
    ("ffn.shared_experts.w1.", "mlp.shared_experts.gate_proj."),
    ("ffn.shared_experts.w3.", "mlp.shared_experts.up_proj."),
    ("ffn.shared_experts.w2.", "mlp.shared_experts.down_proj."),
    ("ffn.experts.w2.weight", "mlp.experts.down_proj"),
]
_HF_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "head.weight": "lm_head.weight", "hc_head.fn": "model.hc_head.hc_fn",
           "hc_head.base": "model.hc_head.hc_base", "hc_head.scale": "model.hc_head.hc_scale"}


def to_transformers(ours: dict) -> dict:
    out = {}
    for name, a in ours.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = a
            continue
        i, rest = re.fullmatch(r"layers\.(\d+)\.(.*)", name).groups()
        if rest in ("ffn.experts.w1.weight", "ffn.experts.w3.weight"):
            if rest.endswith("w1.weight"):
                out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = mx.concatenate(
                    [a, ours[f"layers.{i}.ffn.experts.w3.weight"]], axis=1)
            continue
        for old, new in _HF_LAYER:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        else:
            raise AssertionError(rest)
        out[f"model.layers.{i}.{rest}"] = a
    return out


def write_raw_safetensors(path, tensors):
    """tensors: name -> (safetensors dtype string, numpy array whose bytes are the data)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def small_official(tmp_path, sharded=True):
    """Two bf16 shards with an index (official names), for the error tests."""
    a = {"embed.weight": mx.ones((16, 8), mx.bfloat16), "layers.0.attn_norm.weight": mx.ones((8,), mx.bfloat16)}
    b = {"norm.weight": mx.ones((8,), mx.bfloat16), "layers.0.ffn_norm.weight": mx.ones((8,), mx.bfloat16)}
    files = {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b}
    for f, t in files.items():
        mx.save_safetensors(str(tmp_path / f), t)
    wm = {n: f for f, t in files.items() for n in t}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return wm


# ---- transformers names and our own format -----------------------------------------------------


def test_transformers_names_bf16(tmp_path):
    args = tiny_args()
    ours = our_random_weights(args, seed=1)
    hf = {}
    for k, v in to_transformers(ours).items():
        hf[k] = v.astype(mx.int64) if k.endswith("tid2eid") else v.astype(mx.bfloat16)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), hf)
    weights, quantization = load_weights(tmp_path, args, dtype=mx.float32, expected=expected_shapes(args))
    assert quantization == {}
    assert set(weights) == set(ours)
    for name, a in ours.items():
        want = a if name.endswith("tid2eid") else a.astype(mx.bfloat16).astype(mx.float32)
        assert weights[name].dtype == (mx.int32 if name.endswith("tid2eid") else mx.float32), name
        assert mx.array_equal(weights[name], want), name
    # mlx-lm's sanitize hook gives the same names and values
    sanitized = rename_weights(mx.load(str(tmp_path / "model.safetensors")), args, dtype=mx.float32)
    assert set(sanitized) == set(ours)
    assert mx.array_equal(sanitized["layers.1.ffn.experts.w3.weight"], weights["layers.1.ffn.experts.w3.weight"])


def test_dtype_policy_bf16(tmp_path):
    args = tiny_args()
    ours = our_random_weights(args)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), ours)  # our names, float32 on disk
    weights, _ = load_weights(tmp_path, args, dtype=mx.bfloat16)
    kept_f32 = ("hc_head.fn", "layers.1.hc_attn.base", "layers.1.attn.attn_sink", "layers.1.attn.compressor.ape",
                "layers.1.ffn.gate.bias", "layers.1.attn.compressor.wkv.weight",
                "layers.1.attn.indexer.compressor.wgate.weight")
    for name in kept_f32:
        assert weights[name].dtype == mx.float32, name
    for name in ("embed.weight", "layers.1.attn.wo_a.weight", "layers.1.attn.q_norm.weight",
                 "layers.1.ffn.experts.w2.weight"):
        assert weights[name].dtype == mx.bfloat16, name


def test_own_mlx_format_roundtrip(tmp_path):
    """Our quantize/ output: our names, .scales/.biases, per-module config.json quantization."""
    args = tiny_args()
    ours = our_random_weights(args)
    q = {"layers.1.attn.wq_b": {"group_size": 64, "bits": 4, "mode": "affine"},
         "layers.1.ffn.experts.w1": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
         "layers.1.attn.wo_a": {"group_size": 32, "bits": 8, "mode": "mxfp8"}}  # read back dense
    files = dict(ours)
    for module, p in q.items():
        w = files.pop(module + ".weight")
        packed = mx.quantize(w, **p)
        files[module + ".weight"], files[module + ".scales"] = packed[0], packed[1]
        if len(packed) > 2 and packed[2] is not None:
            files[module + ".biases"] = packed[2]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), files)
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG | {"quantization": {"group_size": 64, "bits": 4,
                                                                                     "mode": "affine", **q}}))
    weights, quantization = load_weights(tmp_path, args, dtype=mx.float32)
    assert quantization == {k: v for k, v in q.items() if "wo_a" not in k}
    validate_weights(weights, expected_shapes(args, quantization))
    assert mx.array_equal(weights["layers.1.attn.wq_b.scales"], files["layers.1.attn.wq_b.scales"])
    wo_a = mx.dequantize(files["layers.1.attn.wo_a.weight"], files["layers.1.attn.wo_a.scales"], **q["layers.1.attn.wo_a"])
    assert weights["layers.1.attn.wo_a.weight"].dtype == mx.float32
    assert mx.array_equal(weights["layers.1.attn.wo_a.weight"], wo_a.astype(mx.float32))
    model = Model(args)
    apply_quantization(model, quantization)
    model.load_weights(list(weights.items()), strict=True)


# ---- errors ------------------------------------------------------------------------------------


def test_missing_shard_file(tmp_path):
    small_official(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"model-00002-of-00002\.safetensors: shard file does not exist "
                                           r"\(the index places tensor '(norm\.weight|layers\.0\.ffn_norm\.weight)'"):
        read_index(tmp_path)


def test_index_names_tensor_absent_from_shard(tmp_path):
    wm = small_official(tmp_path)
    wm["layers.0.attn.attn_sink"] = "model-00001-of-00002.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(WeightsError) as e:
        read_index(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'model-00001-of-00002.safetensors'}: has no tensor "
                            f"'layers.0.attn.attn_sink', which {INDEX_FILE} places there")


def test_truncated_shard(tmp_path):
    small_official(tmp_path)
    f = tmp_path / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(WeightsError, match=r"model-00002-of-00002\.safetensors: truncated: tensor '[\w.]+' ends at"):
        read_index(tmp_path)
    f.write_bytes(f.read_bytes()[:20])  # cut inside the header
    with pytest.raises(WeightsError, match=r"model-00002-of-00002\.safetensors: truncated or not a safetensors"):
        read_index(tmp_path)


def test_corrupt_header_json(tmp_path):
    small_official(tmp_path)
    f = tmp_path / "model-00001-of-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[8] = ord("[")  # the header's opening brace
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"model-00001-of-00002\.safetensors: corrupt safetensors header \(invalid JSON"):
        load_weights(tmp_path, tiny_args())


def test_inconsistent_data_offsets(tmp_path):
    write_raw_safetensors(tmp_path / "model.safetensors", {"norm.weight": ("BF16", np.zeros(8, np.uint16))})
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes().replace(b'"shape": [8]', b'"shape": [9]'))
    with pytest.raises(WeightsError, match=r"model\.safetensors: corrupt header: tensor 'norm\.weight' has "
                                           r"data_offsets \[0, 16\] \(16 bytes\) but BF16 \[9\] needs 18 bytes"):
        read_index(tmp_path)


def test_unsupported_dtype(tmp_path):
    write_raw_safetensors(tmp_path / "model.safetensors", {"norm.weight": ("F64", np.zeros(8, np.float64))})
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'norm\.weight' has dtype F64, which is "
                                           r"not supported for 'norm\.weight'"):
        load_weights(tmp_path, tiny_args())


def test_wrong_shape_and_missing(tmp_path):
    small_official(tmp_path)
    args = tiny_args()
    weights, _ = load_weights(tmp_path, args)
    expected = {"embed.weight": (16, 9), "norm.weight": (8,), "layers.0.attn_norm.weight": (8,),
                "layers.0.ffn_norm.weight": (8,), "head.weight": (16, 8)}
    with pytest.raises(WeightsError) as e:
        validate_weights(weights, expected)
    lines = str(e.value).splitlines()
    assert lines[0] == (f"{tmp_path / 'model-00001-of-00002.safetensors'}: tensor 'embed.weight' [16, 8] gives "
                        f"'embed.weight' shape [16, 8], but the model expects [16, 9]")
    assert lines[1] == f"{tmp_path}: no tensor for parameter 'head.weight' (not in {INDEX_FILE})"


def test_unknown_tensor_and_mtp(tmp_path, caplog):
    args = tiny_args()
    # The MTP block (mtp.0) is kept under our names; a second block (V4 has one) and V3-style
    # MTP layers past num_hidden_layers are dropped with one log line.
    t = {"norm.weight": mx.ones((8,)), "mtp.0.attn_norm.weight": mx.ones((8,)), "mtp.0.e_proj.weight": mx.ones((8, 8)),
         "mtp.0.hc_head_fn": mx.ones((4, 32)), "mtp.1.enorm.weight": mx.ones((8,)),
         "layers.4.enorm.weight": mx.ones((8,))}
    mx.save_safetensors(str(tmp_path / "model.safetensors"), t)
    with caplog.at_level("INFO", logger="mlx_v4.weights"):
        weights, _ = load_weights(tmp_path, args)
    assert sorted(weights.skipped) == ["layers.4.enorm.weight", "mtp.1.enorm.weight"]
    assert "dropping 2 drafter tensors this mlx-v4 does not run" in caplog.text
    assert sorted(weights) == ["mtp.0.attn_norm.weight", "mtp.0.e_proj.weight", "mtp.0.hc_head.fn", "norm.weight"]
    del t["layers.4.enorm.weight"]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), t)
    assert sorted(load_weights(tmp_path, tiny_args(num_nextn_predict_layers=0))[0]) == ["norm.weight"]
    t = {"norm.weight": mx.ones((8,))}
    mx.save_safetensors(str(tmp_path / "model.safetensors"), t | {"layers.0.attn.rotary.inv_freq": mx.ones((4,))})
    with pytest.raises(WeightsError, match=r"model\.safetensors: unknown tensor 'layers\.0\.attn\.rotary\.inv_freq'"):
        load_weights(tmp_path, args)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"layers.9.attn_norm.weight": mx.ones((8,))})
    with pytest.raises(WeightsError, match=r"tensor 'layers\.9\.attn_norm\.weight' is for layer 9, but the config "
                                           r"has num_hidden_layers=4"):
        load_weights(tmp_path, args)


def test_resolve_model_path_errors(tmp_path, monkeypatch):
    from mlx_v4.weights import resolve_model_path

    assert resolve_model_path(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(WeightsError, match=r"'\./nowhere': no such directory or repo id"):
        resolve_model_path("./nowhere")
    with pytest.raises(WeightsError, match=r"'not a repo': no such directory or repo id"):
        resolve_model_path("not a repo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match=r"'someone/absent-model': no such directory, and the repo is not in the "
                                           r"Hugging Face cache \(HF_HUB_OFFLINE is set\)"):
        resolve_model_path("someone/absent-model")


# ---- byte layouts, from raw bytes (independent of the official-checkpoint writer) --------------


def _e4m3_bytes(rng, shape):
    b = rng.integers(0, 256, shape, dtype=np.uint8)
    return np.where((b & 0x7F) == 0x7F, b & 0xF0, b).astype(np.uint8)  # no NaN codes


def _decode_e4m3(b):
    import ml_dtypes

    return b.view(ml_dtypes.float8_e4m3fn).astype(np.float32)


_E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


@pytest.mark.parametrize("out,inp", [(256, 256), (200, 96), (130, 160), (64, 100)])
def test_fp8_tiles_to_mxfp8_bytes(tmp_path, out, inp):
    """FP8 e4m3 + 128x128 E8M0 tiles -> mxfp8 whose mx.dequantize is the official value exactly
    (ragged edges too); in-dims not a multiple of 32 and fp8='dequantize' give the same values."""
    rng = np.random.default_rng(out + inp)
    q = _e4m3_bytes(rng, (out, inp))
    s = rng.integers(117, 137, (-(-out // 128), -(-inp // 128)), dtype=np.uint8)
    want = _decode_e4m3(q) * np.repeat(np.repeat(2.0 ** (s.astype(np.float64) - 127), 128, 0), 128, 1)[:out, :inp]
    write_raw_safetensors(tmp_path / "model.safetensors", {"layers.0.attn.wq_b.weight": ("F8_E4M3", q),
                                                           "layers.0.attn.wq_b.scale": ("F8_E8M0", s)})
    weights, quantization = load_weights(tmp_path, tiny_args(), fp8="mxfp8")
    if inp % 32 == 0:
        assert quantization == {"layers.0.attn.wq_b": {"mode": "mxfp8", "group_size": 32, "bits": 8}}
        w, sc = weights["layers.0.attn.wq_b.weight"], weights["layers.0.attn.wq_b.scales"]
        assert (w.dtype, w.shape, sc.dtype, sc.shape) == (mx.uint32, (out, inp // 4), mx.uint8, (out, inp // 32))
        got = mx.dequantize(w, sc, group_size=32, bits=8, mode="mxfp8", dtype=mx.float32)
        np.testing.assert_array_equal(np.array(got), want.astype(np.float32))
    else:
        assert quantization == {}
    dense, quantization = load_weights(tmp_path, tiny_args(), fp8="dequantize", dtype=mx.float32)
    assert quantization == {} and dense["layers.0.attn.wq_b.weight"].dtype == mx.float32
    np.testing.assert_array_equal(np.array(dense["layers.0.attn.wq_b.weight"]), want.astype(np.float32))


@pytest.mark.parametrize("out,inp", [(64, 128), (48, 96), (8, 40)])
def test_packed_fp4_to_mxfp4_bytes(tmp_path, out, inp):
    """Packed e2m1 (low nibble = even element) + E8M0 per 32 -> mxfp4 bytes unchanged."""
    rng = np.random.default_rng(inp)
    packed = rng.integers(0, 256, (out, inp // 2), dtype=np.uint8)
    s = rng.integers(120, 134, (out, -(-inp // 32)), dtype=np.uint8)
    vals = np.stack([_E2M1[packed & 15], _E2M1[packed >> 4]], -1).reshape(out, inp)
    want = (vals * np.repeat(2.0 ** (s.astype(np.float64) - 127), 32, 1)[:, :inp]).astype(np.float32)
    write_raw_safetensors(tmp_path / "model.safetensors", {"layers.0.ffn.shared_experts.w1.weight": ("I8", packed.view(np.int8)),
                                                           "layers.0.ffn.shared_experts.w1.scale": ("F8_E8M0", s)})
    weights, quantization = load_weights(tmp_path, tiny_args(), dtype=mx.float32)
    w = weights["layers.0.ffn.shared_experts.w1.weight"]
    if inp % 32 == 0:
        assert quantization == {"layers.0.ffn.shared_experts.w1": {"mode": "mxfp4", "group_size": 32, "bits": 4}}
        w = mx.dequantize(w, weights["layers.0.ffn.shared_experts.w1.scales"], group_size=32, bits=4, mode="mxfp4",
                          dtype=mx.float32)
    np.testing.assert_array_equal(np.array(w), want)
    dense, q = load_weights(tmp_path, tiny_args(), fp4="dequantize", dtype=mx.float32)
    assert q == {}
    np.testing.assert_array_equal(np.array(dense["layers.0.ffn.shared_experts.w1.weight"]), want)


def test_wo_a_and_compressor_always_dense(tmp_path):
    rng = np.random.default_rng(0)
    q = _e4m3_bytes(rng, (128, 256))
    s = rng.integers(120, 134, (1, 2), dtype=np.uint8)
    write_raw_safetensors(tmp_path / "model.safetensors", {
        "layers.1.attn.wo_a.weight": ("F8_E4M3", q), "layers.1.attn.wo_a.scale": ("F8_E8M0", s),
        "layers.1.attn.compressor.wkv.weight": ("F8_E4M3", q), "layers.1.attn.compressor.wkv.scale": ("F8_E8M0", s)})
    weights, quantization = load_weights(tmp_path, tiny_args(), fp8="mxfp8", dtype=mx.bfloat16)
    assert quantization == {}
    assert weights["layers.1.attn.wo_a.weight"].dtype == mx.bfloat16
    assert weights["layers.1.attn.compressor.wkv.weight"].dtype == mx.float32


def test_fp8_scale_shape_checked(tmp_path):
    q = _e4m3_bytes(np.random.default_rng(0), (256, 256))
    write_raw_safetensors(tmp_path / "model.safetensors", {"layers.0.attn.wq_b.weight": ("F8_E4M3", q),
                                                           "layers.0.attn.wq_b.scale": ("F8_E8M0", np.zeros((2, 3), np.uint8))})
    with pytest.raises(WeightsError, match=r"model\.safetensors: scale 'layers\.0\.attn\.wq_b\.scale' has shape \[2, 3\], "
                                           r"expected \[2, 2\] for FP8 'layers\.0\.attn\.wq_b\.weight' \[256, 256\]"):
        load_weights(tmp_path, tiny_args())


def test_loading_is_lazy(tmp_path):
    """load_weights reads headers only; evaluating afterwards peaks near the kept size."""
    rng = np.random.default_rng(0)
    q = _e4m3_bytes(rng, (2048, 4096))
    write_raw_safetensors(tmp_path / "model.safetensors", {
        "head.weight": ("F8_E4M3", q), "head.scale": ("F8_E8M0", rng.integers(120, 134, (16, 32), dtype=np.uint8)),
        "embed.weight": ("BF16", rng.integers(0, 2**14, (2048, 4096), dtype=np.uint16))})
    mx.synchronize()
    base = mx.get_active_memory()
    weights, _ = load_weights(tmp_path, tiny_args(), fp8="mxfp8", dtype=mx.float32)
    assert mx.get_active_memory() - base < 1 << 20  # nothing read yet (the data is ~24 MiB)
    kept = sum(a.nbytes for a in weights.values())
    mx.reset_peak_memory()
    mx.eval(list(weights.values()))
    assert mx.get_active_memory() - base <= kept * 1.05
    assert mx.get_peak_memory() - base <= kept * 1.5


def test_sanitize_passes_our_names_through():
    w = {"layers.0.attn.wq_b.weight": mx.zeros((4, 8), mx.uint32), "layers.0.attn.wq_b.scales": mx.zeros((4, 1), mx.uint8)}
    assert rename_weights(w, tiny_args()) == w


# ---- whole official checkpoints (mlx_v4.testing.official writes them) ---------------------------

# Not multiples of 128 (ragged FP8 tiles); FP4 experts need in-dims in whole blocks of 32.
RAGGED_CONFIG = TINY_CONFIG | dict(hidden_size=160, moe_intermediate_size=96, q_lora_rank=96)


def _dense(weights, quantization, name):
    module = name.rsplit(".", 1)[0]
    if module in quantization:
        q = quantization[module]
        return mx.dequantize(weights[name], weights[module + ".scales"], weights.get(module + ".biases"),
                             group_size=q["group_size"], bits=q["bits"], mode=q["mode"], dtype=mx.float32)
    return weights[name]


@pytest.mark.parametrize("cfg", [TINY_CONFIG, RAGGED_CONFIG], ids=["tiny", "ragged"])
@pytest.mark.parametrize("fp8", ["mxfp8", "dequantize"])
def test_official_checkpoint(tmp_path, cfg, fp8):
    """FP8 + FP4 official shards load to exactly the official dequantised values (mxfp8/mxfp4
    through mx.dequantize, or dequantised), experts stacked, MTP dropped, every parameter present."""
    from mlx_v4.config import ModelArgs
    from mlx_v4.testing import official

    raw = official.random_official_weights(cfg, seed=2, include_mtp=True)
    exact = official.write_official_checkpoint(tmp_path, cfg, raw, fp8=True, expert_fp4=True, max_shard_bytes=1 << 18)
    assert len(set(read_index(tmp_path).values())) > 1  # really sharded
    args = ModelArgs.from_dict(cfg)
    weights, quantization = load_weights(tmp_path, args, fp8=fp8, dtype=mx.float32)
    validate_weights(weights, expected_shapes(args, quantization, mtp=True))
    assert not weights.skipped and "mtp.0.e_proj.weight" in weights and "mtp.0.ffn.experts.w1.weight" in weights
    modes = {q["mode"] for q in quantization.values()}
    assert "mxfp4" in modes and (("mxfp8" in modes) == (fp8 == "mxfp8"))
    assert not any(k.endswith(("wo_a", "compressor.wkv", "compressor.wgate")) for k in quantization)
    if cfg is RAGGED_CONFIG:  # in-dim 96 is whole FP4 blocks: w2 stays mxfp4
        assert quantization["layers.1.ffn.experts.w2"]["mode"] == "mxfp4"
    checked = 0
    for name, want in exact.items():
        if name.endswith(".scale") and name[:-6] + ".weight" in exact:
            continue
        m = re.fullmatch(r"((?:layers|mtp)\.\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight", name)
        ours = f"{m[1]}.ffn.experts.{m[3]}.weight" if m else (
            re.sub(r"^((?:layers|mtp)\.\d+\.)?hc_(head|attn|ffn)_(fn|base|scale)$",
                   lambda g: f"{g[1] or ''}hc_{g[2]}.{g[3]}", name))
        got = _dense(weights, quantization, ours)
        if m:
            got = got[int(m[2])]
        want = mx.array(np.asarray(want)) if not isinstance(want, mx.array) else want
        if name.endswith("tid2eid"):
            assert got.dtype == mx.int32 and mx.array_equal(got, want.astype(mx.int32)), name
        else:
            assert got.dtype == mx.float32, name
            np.testing.assert_array_equal(np.array(got), np.array(want.astype(mx.float32)), err_msg=name)
        checked += 1
    assert checked > 100
