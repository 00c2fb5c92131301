"""quantize/ on DeepSeek V4.1 (quantize/plan_v41.py): the tiny release-format checkpoint of
tests/fixtures/tiny_v41 through every recipe that applies, loaded back with mlx_v4.load.

* ``native`` is lossless: the same logits, bit for bit, as loading the release (FP8 and FP4
  kept quantized or dequantized alike), and its FP8 [32, 32] tiles and FP4 experts are the
  release's bytes (mxfp8/mxfp4 without requantizing);
* a lossy recipe gives the logits of the release with the same rounding applied to its weights
  in memory (1e-4 relative: operation order only);
* the Engram tables are copied byte for byte, each into a shard of its own, in row chunks.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_v4
from mlx_v4.mlx_lm_hook import HOOK_FILE
from mlx_v4.weights import read_header, scan_checkpoint
from quantize import convert
from quantize.io import Reader
from quantize.recipes import ConvertError

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_v41" / "model"
SHARD = 200_000  # several output shards
RTOL = 1e-4
EXACT = {"fake_quant": False}  # no activation rounding: parity is operation order only


@pytest.fixture(scope="module")
def ids():
    return mx.load(str(FIXTURE.parent / "reference.safetensors"))["ids"]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return convert(FIXTURE, tmp_path_factory.mktemp("v41") / "native", recipe="native", max_shard_bytes=SHARD).path


def logits(path, ids, **kw) -> np.ndarray:
    model, _ = mlx_v4.load(path, dtype=mx.float32, **kw)
    return np.array(model(ids))


def relative(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("fp8", ["dequantize", "mxfp8"])
def test_native_is_bit_identical_to_the_release(native, ids, fp8):
    """The released numerics (act_quant and the KV roundings on), FP8/FP4 dequantized or kept
    quantized: the conversion and the original give the very same logits."""
    import mlx_v4.v41.weights as w

    kw = {"fp8": fp8, "fp4": fp8.replace("8", "4")}
    want = np.array(w.load_v41(FIXTURE, dtype=mx.float32, **kw)[0](ids))
    got = np.array(w.load_v41(native, dtype=mx.float32, **kw)[0](ids))
    np.testing.assert_array_equal(got, want)
    model, _ = mlx_v4.load(native, dtype=mx.float32)  # the library's entry point finds V4.1
    assert model.model_type.startswith("deepseek_v41")


def test_native_keeps_the_release_bytes(native):
    """FP8 [32, 32] tiles are mxfp8 as they are: the codes pass through and each tile's scale is
    repeated down its rows; FP4 experts are the stored nibbles and scales."""
    src, out = scan_checkpoint(FIXTURE), scan_checkpoint(native)
    read = Reader().read

    def raw(infos, name):
        return np.array(read(infos[name]).view(mx.uint8)).reshape(infos[name].shape[0], -1)

    quant = json.loads((native / "config.json").read_text())["quantization"]
    for module in ("layers.2.attn.wq_a", "layers.2.attn.wo_a", "layers.2.attn.indexer.wq_b", "layers.1.engram.wkv",
                   "layers.4.ffn.shared_experts.w2"):
        assert quant[module] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
        np.testing.assert_array_equal(raw(out, module + ".weight"), raw(src, module + ".weight"))
        tiles = raw(src, module + ".scale")
        rows = out[module + ".weight"].shape[0]
        np.testing.assert_array_equal(raw(out, module + ".scales"), np.repeat(tiles, 32, axis=0)[:rows])
    for e in (0, 7):
        for proj in ("w1", "w2"):
            name = f"layers.3.ffn.experts.{e}.{proj}"
            assert quant[f"layers.3.ffn.experts.{proj}"]["mode"] == "mxfp4"
            np.testing.assert_array_equal(raw(out, name + ".weight"), raw(src, name + ".weight"))
            np.testing.assert_array_equal(raw(out, name + ".scales"), raw(src, name + ".scale"))
    assert out["layers.2.attn.compressor.wkv.weight"].dtype == "BF16"  # dense: feeds float32 math


def test_engram_tables_are_copied_into_their_own_shards(native):
    index = json.loads((native / "model.safetensors.index.json").read_text())["weight_map"]
    src = scan_checkpoint(FIXTURE)
    read = Reader().read
    for layer in (1, 5):
        table, scale = f"layers.{layer}.engram.embed.weight", f"layers.{layer}.engram.embed.scale"
        assert index[table] == index[scale]
        shard = read_header(native / index[table])
        assert sorted(shard) == sorted([table, scale])
        assert (shard[table].dtype, shard[scale].dtype) == ("F8_E4M3", "F8_E8M0")
        for name in (table, scale):
            np.testing.assert_array_equal(np.array(read(shard[name])), np.array(read(src[name])))


def test_engram_tables_stream_in_row_chunks(tmp_path, monkeypatch, native):
    """With a small chunk size no read takes a whole table, and the output is the same bytes."""
    sizes: dict[str, list[int]] = {}
    plain = Reader.read

    def recording(self, info):
        sizes.setdefault(info.name, []).append(int(np.prod(info.shape)))
        return plain(self, info)

    monkeypatch.setattr(Reader, "read", recording)
    out = convert(FIXTURE, tmp_path / "chunked", recipe="native", max_shard_bytes=SHARD, chunk_bytes=4096).path
    table = "layers.1.engram.embed.weight"
    rows, dim = scan_checkpoint(FIXTURE)[table].shape
    assert len(sizes[table]) > 4 and max(sizes[table]) < rows * dim and sum(sizes[table]) == rows * dim
    for f in sorted(native.glob("*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes()


def _same_rounding(path: Path, converted: Path) -> np.ndarray:
    """The release with each weight the conversion quantized replaced by that rounding of it,
    computed here from the release's own (exactly dequantized) weights."""
    model, _ = mlx_v4.load(path, dtype=mx.float32, model_config=EXACT)
    params = dict(tree_flatten(model.parameters()))
    quant = json.loads((converted / "config.json").read_text()).get("quantization", {})
    new = []
    for module, q in quant.items():
        if not isinstance(q, dict):
            continue
        p = {k: q[k] for k in ("group_size", "bits", "mode")}
        w, *rest = mx.quantize(params[module + ".weight"].astype(mx.bfloat16), **p)
        if p["mode"] == "affine":  # bf16 scales/biases, dequantized in float32 as the loader does
            rest = [r.astype(mx.float32) for r in rest]
        new.append((module + ".weight", mx.dequantize(w, *rest, **p, dtype=mx.float32)))
    model.load_weights(new, strict=False)
    return model


@pytest.mark.parametrize("recipe", ["4bit", "8bit", "mixed-4-8", "mxfp8", "mxfp4", "bf16"])
def test_lossy_recipes_equal_the_same_rounding_of_the_release(tmp_path, ids, recipe):
    # group 32: the tiny widths (32, 64, 128) are whole groups, so every quantizable tensor is
    out = convert(FIXTURE, tmp_path / recipe, recipe=recipe, group_size=32, max_shard_bytes=SHARD).path
    got = logits(out, ids, model_config=EXACT)
    want = np.array(_same_rounding(FIXTURE, out)(ids))
    assert relative(got, want) < RTOL
    classes = json.loads((out / "config.json").read_text())["mlx_v4_conversion"]["classes"]
    assert classes["engram_table"] == "stored"
    if recipe == "4bit":
        assert classes["experts"] == classes["attention"] == classes["engram"] == classes["head"] == "affine 4-bit g32"
        assert classes["index_dense"] == classes["compressor"] == "bf16"


def test_calibrated_recipes_are_refused_by_name(tmp_path):
    for recipe in ("2bit-experts", "3bit-experts"):
        with pytest.raises(ConvertError) as e:
            convert(FIXTURE, tmp_path / recipe, recipe=recipe)
        assert str(e.value) == (f"recipe {recipe!r} does not apply to DeepSeek V4.1 checkpoints (it calibrates the "
                                "routed experts by running the DeepSeek V4 model); choose one of native, mxfp4, "
                                "mxfp8, 4bit, 8bit, mixed-4-8, bf16")
        assert not (tmp_path / recipe).exists()


def test_no_mlx_lm_claim_and_rerun_is_a_noop(native):
    """mlx-lm's hook builds DeepSeek V4 only: no model file, no V4 chat template, a card that
    says so; running again finishes without adding them."""
    config = json.loads((native / "config.json").read_text())
    assert "model_file" not in config and config["mlx_v4_conversion"]["family"] == "v41"
    assert "quantization_config" not in config and "quantization_config" not in config["text_config"]
    assert not (native / HOOK_FILE).exists() and not (native / "chat_template.jinja").exists()
    card = (native / "README.md").read_text()
    assert "deepseek_v41" in card and "mlx-lm cannot run this directory" in card and "trust_remote_code" not in card
    again = convert(FIXTURE, native, recipe="native", max_shard_bytes=SHARD, verify=True)
    assert again.noop
    assert again.verify.kl_max == 0.0 and again.verify.top1_agreement == 1.0  # lossless, as --verify reports it
    assert "model_file" not in json.loads((native / "config.json").read_text())
    assert sorted(p.name for p in native.iterdir() if p.suffix == ".py") == []


def test_a_conversion_is_not_a_source(native, tmp_path):
    with pytest.raises(ConvertError, match="already an mlx-v4 conversion; convert the original DeepSeek V4.1"):
        convert(native, tmp_path / "again", recipe="4bit")


def test_info_shows_the_conversion(native):
    from cli.info import plan

    p = plan(str(native), recipe=None, bits=None, context=64)
    assert p.weights_source == "native, from the conversion's files"
    held = sum(f.stat().st_size for f in native.glob("*.safetensors"))
    assert 0.9 * held < p.weights_bytes < held  # the Engram tables are not counted as held
    assert p.notes[0].startswith("Converted by mlx-v4 convert with the native recipe")


def test_cli_names_the_recipe_it_cannot_apply(tmp_path):
    from mlx_v4.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["convert", str(FIXTURE), str(tmp_path / "out"), "--recipe", "2bit-experts"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "recipe '2bit-experts' does not apply to DeepSeek V4.1 checkpoints" in r.output
