"""quantize/: every recipe on a tiny official FP8/FP4 checkpoint loads with mlx_v4.load and stays
close to the source; native formats pass through bit for bit; streaming chunks give the same
bytes as whole tensors; resume, no-op, force, bad input, full disk, upload (HTTP mocked), verify."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from mlx_v4.quantize import MANIFEST, MARKER, ConvertError, Quant, convert, is_complete

import mlx_v4
from mlx_v4.testing import official
from mlx_v4.testing.tiny import TINY_CONFIG
from mlx_v4.weights import WeightsError, read_header

SHARD = 1 << 20  # small output shards: several per tiny model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    raw = official.random_official_weights(TINY_CONFIG, seed=3)
    exact = official.write_official_checkpoint(path, TINY_CONFIG, raw, max_shard_bytes=1 << 19)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    return path, exact


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("out"), {}

    def get(recipe):
        if recipe not in cache:
            cache[recipe] = convert(source[0], root / recipe, recipe=recipe, max_shard_bytes=SHARD,
                                    verify=True, progress=False)
        return cache[recipe]
    return get


def _tensors(path):
    """Every output tensor; routed experts (one tensor per expert on disk) also stacked under
    the model's names (layers.N.ffn.experts.w1.weight [E, ...])."""
    out = {}
    for f in sorted(path.glob("model-*.safetensors")):
        out.update(mx.load(str(f)))
    per_expert = re.compile(r"(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123]\.\w+)")
    stacks: dict[str, dict[int, mx.array]] = {}
    for name, a in out.items():
        if m := per_expert.fullmatch(name):
            stacks.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = a
    for name, by_e in stacks.items():
        out[name] = mx.stack([by_e[e] for e in range(len(by_e))])
    return out


def _raw(path, name):
    """Raw bytes of one tensor of an official shard (independent of weights.py's readers)."""
    for f in path.glob("*.safetensors"):
        n = struct.unpack("<Q", f.read_bytes()[:8])[0]
        header = json.loads(f.read_bytes()[8:8 + n])
        if name in header:
            b, e = header[name]["data_offsets"]
            return np.frombuffer(f.read_bytes()[8 + n + b:8 + n + e], np.uint8)
    raise KeyError(name)


# ---- every recipe -----------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["native", "4bit", "8bit", "mixed-4-8", "mxfp4", "mxfp8", "bf16"])
def test_recipe_loads_and_is_complete(converted, recipe):
    r = converted(recipe)
    assert is_complete(r.path) and not (r.path / MANIFEST).exists()
    cfg = json.loads((r.path / "config.json").read_text())
    assert cfg["mlx_v4_conversion"]["recipe"] == recipe and "quantization_config" not in cfg
    classes = cfg["mlx_v4_conversion"]["classes"]
    assert classes["hyper"] == classes["sink"] == classes["router_bias"] == classes["ape"] == "fp32"
    assert classes["tid2eid"] == "int32"
    index = json.loads((r.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (r.path / "tokenizer_config.json").exists() and "mlx" in (r.path / "README.md").read_text()
    assert json.loads((r.path / "tokenizer_config.json").read_text())["model_max_length"] == 4096  # the source's
    for name in ("tokenizer.json", "chat_template.jinja", cfg["model_file"]):  # what mlx-lm needs
        assert (r.path / name).is_file(), name
    model, tokenizer = mlx_v4.load(r.path)
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, TINY_CONFIG["vocab_size"])
    t = _tensors(r.path)
    assert t["layers.0.ffn.gate.tid2eid"].dtype == mx.int32
    assert t["layers.0.hc_attn.fn"].dtype == t["layers.1.attn.attn_sink"].dtype == mx.float32
    if recipe in ("4bit", "mixed-4-8"):
        assert cfg["quantization"]["layers.1.ffn.experts.w1"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    if recipe == "mixed-4-8":
        assert cfg["quantization"]["layers.1.attn.wq_b"]["bits"] == 8 and cfg["quantization"]["embed"]["bits"] == 8
    if recipe == "bf16":
        assert "quantization" not in cfg


def test_native_is_lossless(source, converted):
    """Every tensor keeps its source format (indexer.weights_proj is BF16 in the release and stays
    bf16; FP8 -> mxfp8 and FP4 -> mxfp4 bytes pass through), so the logits are bit-identical to
    the source's loaded with its FP8 kept quantized."""
    r = converted("native")
    cfg = json.loads((r.path / "config.json").read_text())
    t = _tensors(r.path)
    assert t["layers.1.attn.indexer.weights_proj.weight"].dtype == mx.bfloat16
    assert "layers.1.attn.indexer.weights_proj" not in cfg["quantization"]
    assert cfg["quantization"]["layers.1.attn.indexer.wq_b"]["mode"] == "mxfp8"
    assert cfg["quantization"]["layers.2.ffn.experts.w1"]["mode"] == "mxfp4"
    assert cfg["mlx_v4_conversion"]["classes"]["indexer"] == ["bf16", "mxfp8"]
    src_model, _ = mlx_v4.load(source[0], fp8="mxfp8")
    ours, _ = mlx_v4.load(r.path)
    x = mx.array([[0, 5, 17, 300, 9, 1000, 2, 77] * 20])  # past the window and a 128-compression block
    assert mx.array_equal(ours(x), src_model(x))
    # --verify loads the source the default way (on the CPU: FP8 dequantized, other matmul kernels)
    assert r.verify.kl_mean < 1e-6 and r.verify.top1_agreement == 1.0


def test_native_keeps_mlx_and_f16_formats(tmp_path):
    """An mlx-v4 directory (the demo: affine 3/4/8-bit, float16 elsewhere) converts to itself."""
    r = convert(mlx_v4.DEMO_MODEL_PATH, tmp_path / "demo", recipe="native", progress=False)
    got, want = _tensors(r.path), dict(mx.load(str(mlx_v4.DEMO_MODEL_PATH / "model.safetensors")))
    for name, a in want.items():
        if mx.issubdtype(a.dtype, mx.floating) and got[name].dtype == mx.float32:
            a = a.astype(mx.float32)  # fp32 classes (hyper-connections, sinks, ...) are widened exactly
        if name.endswith("tid2eid"):
            a = a.astype(mx.int32)  # conversions store the hash table as int32
        assert got[name].dtype == a.dtype and mx.array_equal(got[name], a), name
    assert got.keys() == want.keys()


def test_recipe_names(source, tmp_path):
    from mlx_v4.quantize.recipes import ALIASES, RECIPE_NAMES, bits_per_weight, get_recipe

    assert RECIPE_NAMES[0] == "native" and {"mxfp4", "mxfp8", "4bit", "8bit", "mixed-4-8", "bf16"} <= set(RECIPE_NAMES)
    assert all(get_recipe(alias).name == name for alias, name in ALIASES.items())
    assert get_recipe("native").keep_source and not get_recipe("mxfp4").keep_source
    assert bits_per_weight(Quant(4, 64)) == 4.5 and bits_per_weight(get_recipe("native").experts) == 4.25
    with pytest.raises(ConvertError, match=r"unknown recipe 'q3': choose one of native, mxfp4"):
        convert(source[0], tmp_path / "x", recipe="q3", progress=False)
    assert not (tmp_path / "x").exists()


def test_quality_ordering(converted):
    kl = {r: converted(r).verify.kl_mean for r in ("4bit", "8bit", "mixed-4-8", "mxfp4", "bf16")}
    top1 = {r: converted(r).verify.top1_agreement for r in kl}
    assert kl["bf16"] < 1e-5 and top1["bf16"] == 1.0  # FP8/FP4 values are exact in bf16
    assert kl["mxfp4"] < 1e-3 and top1["mxfp4"] > 0.95  # the release's own values
    assert kl["8bit"] < kl["4bit"] / 3 and kl["4bit"] < 1.0
    assert kl["8bit"] < kl["mixed-4-8"] < kl["4bit"]
    assert top1["8bit"] >= top1["4bit"]


def test_mxfp4_experts_and_mxfp8_bit_exact(source, converted):
    src, exact = source
    t = _tensors(converted("mxfp4").path)
    for w in ("w1", "w2", "w3"):
        got = np.asarray(t[f"layers.2.ffn.experts.{w}.weight"]).view(np.uint8)
        scales = np.asarray(t[f"layers.2.ffn.experts.{w}.scales"])
        for e in range(TINY_CONFIG["n_routed_experts"]):
            np.testing.assert_array_equal(got[e].reshape(-1), _raw(src, f"layers.2.ffn.experts.{e}.{w}.weight"))
            np.testing.assert_array_equal(scales[e].reshape(-1), _raw(src, f"layers.2.ffn.experts.{e}.{w}.scale"))
    for name in ("layers.1.attn.wq_b", "layers.3.ffn.shared_experts.w2", "layers.1.attn.indexer.wq_b"):
        np.testing.assert_array_equal(np.asarray(t[name + ".weight"]).view(np.uint8).reshape(-1), _raw(src, name + ".weight"))
        deq = mx.dequantize(t[name + ".weight"], t[name + ".scales"], group_size=32, bits=8, mode="mxfp8",
                            dtype=mx.float32)
        np.testing.assert_array_equal(np.asarray(deq), exact[name + ".weight"])


def test_chunked_streaming_equals_whole_tensors(source, converted, tmp_path):
    """Tiny chunks (one FP8 tile row / a few rows, one expert at a time) write the same bytes."""
    whole = _tensors(converted("mixed-4-8").path)
    r = convert(source[0], tmp_path / "c", recipe="mixed-4-8", max_shard_bytes=SHARD, chunk_bytes=1 << 14, progress=False)
    chunked = _tensors(r.path)
    assert whole.keys() == chunked.keys()
    for k in whole:
        assert mx.array_equal(whole[k], chunked[k]), k


def test_override_and_group_size(source, tmp_path):
    def override(module, klass, target):
        if module == "layers.1.attn.wq_b":
            return Quant(8, 32)
        return "bf16" if klass == "embed" else None

    r = convert(source[0], tmp_path / "o", recipe="4bit", group_size=128, override=override, max_shard_bytes=SHARD,
                progress=True)  # Rich bars (rendered to a non-terminal here)
    q = json.loads((r.path / "config.json").read_text())["quantization"]
    assert q["layers.1.attn.wq_b"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert q["layers.1.ffn.experts.w1"]["group_size"] == 128 and "embed" not in q
    mlx_v4.load(r.path)
    with pytest.raises(ConvertError, match="layers.0.ffn.gate"):
        convert(source[0], tmp_path / "bad", recipe="8bit", progress=False,
                override=lambda m, c, t: Quant(4, 64) if c == "router" else None)
    assert not (tmp_path / "bad").exists()


def test_bf16_source_with_official_names(tmp_path):
    raw = official.random_official_weights(TINY_CONFIG, seed=4, include_mtp=False)
    official.write_official_checkpoint(tmp_path / "src", TINY_CONFIG, raw, fp8=False, expert_fp4=False)
    r = convert(tmp_path / "src", tmp_path / "out", recipe="8bit", verify=True, progress=False)
    assert r.verify.kl_mean < 0.1
    assert mx.load(str(next(r.path.glob("model-*.safetensors"))))  # readable by MLX itself


# ---- resume, no-op, force ---------------------------------------------------------------------
def test_resume_after_kill_noop_and_force(source, tmp_path):
    dst = tmp_path / "r"

    def killed(name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(source[0], dst, recipe="mixed-4-8", max_shard_bytes=SHARD, on_shard=killed, progress=False)
    first = sorted(dst.glob("model-*.safetensors"))
    assert len(first) == 1 and not is_complete(dst) and (dst / MANIFEST).exists()
    assert not (dst / "config.json").exists()
    with pytest.raises(Exception, match="config.json"):
        mlx_v4.load(dst)  # a half-written output is not a model
    before = first[0].stat().st_mtime_ns
    r = convert(source[0], dst, recipe="mixed-4-8", max_shard_bytes=SHARD, progress=False)
    assert r.shards_reused == [first[0].name] and len(r.shards_written) >= 2
    assert first[0].stat().st_mtime_ns == before and is_complete(dst)
    mtimes = {f.name: f.stat().st_mtime_ns for f in dst.iterdir()}
    again = convert(source[0], dst, recipe="mixed-4-8", max_shard_bytes=SHARD, progress=False)
    assert again.noop and mtimes == {f.name: f.stat().st_mtime_ns for f in dst.iterdir()}
    with pytest.raises(ConvertError, match="force"):
        convert(source[0], dst, recipe="4bit", max_shard_bytes=SHARD, progress=False)
    forced = convert(source[0], dst, recipe="4bit", max_shard_bytes=SHARD, force=True, progress=False)
    assert not forced.noop and forced.shards_written and not forced.shards_reused
    assert json.loads((dst / "config.json").read_text())["mlx_v4_conversion"]["recipe"] == "4bit"


def test_rerun_adds_mlx_lm_files_to_an_older_conversion(source, tmp_path):
    dst = tmp_path / "old"
    convert(source[0], dst, recipe="4bit", max_shard_bytes=SHARD, progress=False)
    cfg = json.loads((dst / "config.json").read_text())
    for name in ("chat_template.jinja", cfg.pop("model_file")):  # as mlx-v4 wrote them before
        (dst / name).unlink()
    (dst / "config.json").write_text(json.dumps(cfg))
    tokenizer_config = (dst / "tokenizer_config.json").read_text()
    r = convert(source[0], dst, recipe="4bit", max_shard_bytes=SHARD, progress=False)
    assert r.noop and (dst / "chat_template.jinja").is_file() and (dst / "mlx_v4_model.py").is_file()
    assert json.loads((dst / "config.json").read_text()) == cfg | {"model_file": "mlx_v4_model.py"}
    assert (dst / "tokenizer_config.json").read_text() == tokenizer_config  # its own, completed again


def test_refuses_foreign_directory(source, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="not an mlx-v4 conversion"):
        convert(source[0], tmp_path, recipe="bf16", progress=False, force=True)
    assert (tmp_path / "mine.txt").exists()


# ---- bad input --------------------------------------------------------------------------------
def _copy(source, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(source[0], dst)
    return dst, json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]


def _no_output(path):
    assert not (path / MARKER).exists() and not (path / "config.json").exists()


def _corrupt_missing_shard(src, wm):
    f = sorted(set(wm.values()))[1]
    (src / f).unlink()
    return f


def _corrupt_absent_tensor(src, wm):
    wm = dict(wm, **{"layers.0.attn.wq_a.weight": sorted(set(wm.values()))[-1]})
    if wm["layers.0.attn.wq_a.weight"] == json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["layers.0.attn.wq_a.weight"]:
        wm["layers.0.attn.wq_a.weight"] = sorted(set(wm.values()))[0]
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return wm["layers.0.attn.wq_a.weight"]


def _corrupt_truncated(src, wm):
    f = sorted(set(wm.values()))[2]
    data = (src / f).read_bytes()
    (src / f).write_bytes(data[: len(data) // 2])
    return f


def _corrupt_header(src, wm):
    f = sorted(set(wm.values()))[0]
    data = bytearray((src / f).read_bytes())
    data[8:12] = b"}}}}"
    (src / f).write_bytes(bytes(data))
    return f


def _corrupt_dtype(src, wm):
    f = wm["layers.0.attn.wq_a.weight"]
    tensors = {k: (d, np.frombuffer(bytes(r), np.uint8).view({"F8_E4M3": np.uint8, "F8_E8M0": np.uint8, "I8": np.int8,
               "F32": np.float32, "I64": np.int64}.get(d, np.uint16)).reshape(s))
               for k, (d, s, r) in official.read_safetensors(src / f).items()}
    d, a = tensors["layers.0.attn.wq_a.weight"]
    tensors["layers.0.attn.wq_a.weight"] = ("F64", np.zeros(a.shape, np.float64))
    official.write_safetensors(src / f, tensors)
    return f


def _corrupt_model_type(src, wm):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    return "config.json"


@pytest.mark.parametrize("corrupt", [_corrupt_missing_shard, _corrupt_absent_tensor, _corrupt_truncated,
                                     _corrupt_header, _corrupt_dtype, _corrupt_model_type])
def test_bad_input_names_the_file(source, tmp_path, corrupt):
    src, wm = _copy(source, tmp_path)
    fname = corrupt(src, wm)
    with pytest.raises(ValueError) as e:
        convert(src, tmp_path / "out", recipe="8bit", progress=False)
    assert fname in str(e.value), str(e.value)
    _no_output(tmp_path / "out")


def test_full_disk(source, tmp_path, monkeypatch):
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(ConvertError, match=r"model-0000\d-of-\d+\.safetensors: no space left") as e:
        convert(source[0], tmp_path / "out", recipe="8bit", max_shard_bytes=SHARD, progress=False)
    assert str(tmp_path / "out") in str(e.value)
    _no_output(tmp_path / "out")
    assert not list((tmp_path / "out").glob(".*.partial"))
    monkeypatch.setattr(os, "pwrite", real)
    r = convert(source[0], tmp_path / "out", recipe="8bit", max_shard_bytes=SHARD, progress=False)  # resumes
    assert is_complete(r.path)


def test_read_header_of_output(converted):
    for f in converted("8bit").path.glob("model-*.safetensors"):
        assert read_header(f)  # valid safetensors, 8-byte aligned header


def test_missing_source_dir(tmp_path):
    with pytest.raises(WeightsError, match="no-such"):
        convert(tmp_path / "no-such", tmp_path / "out", progress=False)


# ---- upload (huggingface_hub with its HTTP client mocked) -----------------------------------------
def test_upload_mocked_http(source, converted, monkeypatch):
    import httpx
    import huggingface_hub

    seen = []

    def handler(req):
        path = req.url.path
        seen.append((req.method, path))
        if path == "/api/repos/create":
            return httpx.Response(200, json={"url": "https://huggingface.co/me/tiny-mlx", "name": "me/tiny-mlx"})
        if path == "/api/validate-yaml":
            return httpx.Response(200, json={})
        if path.endswith("/preupload/main"):
            files = json.loads(req.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
        if path.endswith("/commit/main"):
            lines = [json.loads(x) for x in req.content.decode().splitlines()]
            seen.append(sorted(x["value"]["path"] for x in lines if x["key"] == "file"))
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/me/tiny-mlx/commit/abc",
                                             "commitOid": "abc"})
        return httpx.Response(404, json={"error": f"not mocked: {path}"})

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handler)))
    huggingface_hub.close_session()
    done = converted("bf16")
    try:  # the output is finished: convert is a no-op and uploads it
        r = convert(source[0], done.path, recipe="bf16", max_shard_bytes=SHARD, upload_repo="me/tiny-mlx",
                    progress=False)
    finally:
        huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
        huggingface_hub.close_session()
    assert r.noop and r.url.endswith("/commit/abc")
    assert ("POST", "/api/repos/create") in seen and ("POST", "/api/models/me/tiny-mlx/commit/main") in seen
    files = next(x for x in seen if isinstance(x, list))
    assert "config.json" in files and "model.safetensors.index.json" in files and MARKER not in files
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "mlx_v4_model.py", "README.md"):
        assert name in files, name
    assert any(f.startswith("model-") for f in files)


def test_transformers_names_fp32_source(tmp_path):
    """Transformers names (fused gate_up_proj [E, 2I, D] split into w1/w3), fp32: chunks along the
    experts axis give the same bytes as whole tensors, and bf16 output equals the source rounded."""
    from test_weights import our_random_weights, to_transformers

    from mlx_v4.testing.tiny import tiny_args

    ours = our_random_weights(tiny_args(), seed=6)
    hf = {k: v.astype(mx.int64) if k.endswith("tid2eid") else v for k, v in to_transformers(ours).items()}
    (tmp_path / "src").mkdir()
    mx.save_safetensors(str(tmp_path / "src" / "model.safetensors"), hf)
    (tmp_path / "src" / "config.json").write_text(json.dumps(TINY_CONFIG))
    bf = convert(tmp_path / "src", tmp_path / "bf16", recipe="bf16", progress=False)
    t = _tensors(bf.path)
    for name in ("layers.1.ffn.experts.w1.weight", "layers.1.ffn.experts.w3.weight", "layers.2.attn.wq_b.weight"):
        assert mx.array_equal(t[name], ours[name].astype(mx.bfloat16)), name
    assert t["layers.1.attn.compressor.wkv.weight"].dtype == mx.float32  # fp32 source stays fp32
    a = convert(tmp_path / "src", tmp_path / "a", recipe="mixed-4-8", progress=False)
    b = convert(tmp_path / "src", tmp_path / "b", recipe="mixed-4-8", chunk_bytes=1 << 14, progress=False)
    ta, tb = _tensors(a.path), _tensors(b.path)
    assert all(mx.array_equal(ta[k], tb[k]) for k in ta)
    mlx_v4.load(a.path)


# ---- the marker is verified; only the converter's own files are deleted (issue 15, item 11) ------
def test_damaged_output_is_converted_again_not_called_finished(source, tmp_path, caplog):
    dst = tmp_path / "out"
    first = convert(source[0], dst, recipe="8bit", max_shard_bytes=SHARD, progress=False)
    shards = sorted(first.shards_written)
    assert len(shards) >= 3
    mtimes = {f.name: f.stat().st_mtime_ns for f in dst.iterdir()}
    (dst / shards[1]).unlink()
    with caplog.at_level("WARNING", logger="mlx_v4.quantize"):
        r = convert(source[0], dst, recipe="8bit", max_shard_bytes=SHARD, progress=False)
    assert f"shard {shards[1]} is missing; converting again" in caplog.text
    assert not r.noop and r.shards_written == [shards[1]] and sorted(r.shards_reused) == shards[:1] + shards[2:]
    assert all((dst / n).stat().st_mtime_ns == mtimes[n] for n in r.shards_reused)
    assert is_complete(dst) and not (dst / MANIFEST).exists()
    mlx_v4.load(dst)
    # a truncated shard (size differs from what was written)
    with open(dst / shards[0], "r+b") as f:
        f.truncate(f.seek(0, 2) - 16)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mlx_v4.quantize"):
        r = convert(source[0], dst, recipe="8bit", max_shard_bytes=SHARD, progress=False)
    assert f"shard {shards[0]} has " in caplog.text and " were written; converting again" in caplog.text
    assert r.shards_written == [shards[0]], (r.shards_written, r.shards_reused)
    # a shard whose header no longer lists what the index says
    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    victim = next(t for t, f in weight_map.items() if f == shards[2])
    weight_map[victim] = shards[0]
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="mlx_v4.quantize"):
        r = convert(source[0], dst, recipe="8bit", max_shard_bytes=SHARD, progress=False)
    assert f"tensor '{victim}' is not in {shards[0]} as model.safetensors.index.json says" in caplog.text
    assert not r.noop and r.shards_written == [] and is_complete(dst)
    assert json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][victim] == shards[2]
    assert convert(source[0], dst, recipe="8bit", max_shard_bytes=SHARD, progress=False).noop


def test_cli_reconverts_after_a_shard_is_deleted(source, tmp_path, caplog):
    from mlx_v4.cli.app import app
    from typer.testing import CliRunner

    dst = tmp_path / "out"
    args = ["convert", str(source[0]), str(dst), "--recipe", "bf16"]
    assert CliRunner().invoke(app, args).exit_code == 0
    next(dst.glob("model-*.safetensors")).unlink()
    with caplog.at_level("WARNING", logger="mlx_v4.quantize"):
        r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "already converted" not in r.output and f"wrote {dst}" in r.output
    assert "model-00001-of-00001.safetensors is missing; converting again" in caplog.text
    assert is_complete(dst) and all((dst / f).is_file() for f in json.loads((dst / MARKER).read_text())["files"])


def test_force_and_resume_keep_user_files(source, tmp_path):
    dst = tmp_path / "out"

    def killed(name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(source[0], dst, recipe="8bit", max_shard_bytes=SHARD, on_shard=killed, progress=False)
    # the user drops files into the half-finished output, one named like a stale shard
    user = {"notes.txt": "mine", "model-00099-of-00099.safetensors": "not a shard", ".hidden.partial": "x"}
    for name, text in user.items():
        (dst / name).write_text(text)
    r = convert(source[0], dst, recipe="8bit", max_shard_bytes=SHARD, progress=False)
    assert is_complete(dst) and len(r.shards_reused) == 1
    assert {n: (dst / n).read_text() for n in user} == user
    ours = set(json.loads((dst / MARKER).read_text())["written"])
    assert not ours & set(user) and {"config.json", "README.md", *r.shards_written} <= ours
    forced = convert(source[0], dst, recipe="bf16", max_shard_bytes=SHARD, force=True, progress=False)
    assert forced.shards_written and not forced.shards_reused and is_complete(dst)
    assert {n: (dst / n).read_text() for n in user} == user
    left = {f.name for f in dst.iterdir()} - set(user) - {MARKER}
    assert left == set(json.loads((dst / MARKER).read_text())["written"])  # no stale 8bit shard left
    # a user file where the converter would write is never overwritten: the run stops and names it
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST).write_text(json.dumps({"plan": None, "done": {}, "written": []}))
    (other / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match=r"other/config\.json: exists and was not written by the converter"):
        convert(source[0], other, recipe="bf16", max_shard_bytes=SHARD, progress=False)
    assert (other / "config.json").read_text() == "{}"


def test_crafted_manifest_cannot_delete_outside_names(source, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (tmp_path / "precious.safetensors").write_text("keep")
    (dst / MANIFEST).write_text(json.dumps({"plan": None, "done": {}, "written": ["../precious.safetensors"]}))
    convert(source[0], dst, recipe="bf16", max_shard_bytes=SHARD, progress=False, force=True)
    assert (tmp_path / "precious.safetensors").read_text() == "keep" and is_complete(dst)
