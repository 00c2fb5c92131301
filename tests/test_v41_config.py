"""V41Args: the released config, layer roles, and one clear error per bad field."""

import json
import re

import pytest

from mlx_v4.config import ConfigError
from mlx_v4.v41.config import V41Args, is_v41_checkpoint, preset
from mlx_v4.v41.engram_hash import EngramLayout


def test_release_roles():
    a = preset("v41-flash")
    assert (a.hidden_size, a.num_hidden_layers, a.n_routed_experts, a.num_experts_per_tok) == (5120, 40, 384, 6)
    assert a.rms_norm_eps == 1e-20 and a.index_n_heads == 32 and a.mtp_compress_ratios == [0, 0, 0]
    assert [a.kv_source(i) for i in (0, 1, 2, 7, 8, 19, 20, 39)] == [None, None, 2, 2, 8, 14, 20, 20]
    assert [a.index_source(i) for i in (3, 20, 23, 24, 27, 36, 39)] == [2, 20, 20, 24, 24, 36, 36]
    assert [a.key_owner(i) for i in (2, 8, 20, 24, 36)] == [2, 8, 20, 20, 20]
    assert [i for i in range(40) if a.uses_candidates(i)] == [24, 28, 32, 36]


def test_release_engram_layout_reproduces_the_table_sizes():
    """The primes drawn upwards from engram_vocab_size sum to the released table rows exactly."""
    a = preset("v41-flash")
    layout = EngramLayout.build(a.engram_layer_ids, a.engram_max_ngram_size, a.engram_n_heads,
                                a.engram_head_dim, a.engram_vocab_size)
    assert layout.table_rows() == [384006168, 384016682] == a.engram_num_embeddings
    assert layout.n_cols == 24


def test_official_inference_names():
    a = V41Args.from_dict({"dim": 64, "n_layers": 3, "n_heads": 2, "head_dim": 64, "rope_head_dim": 16,
                           "compress_ratios": [0, 1, 1], "kv_source_layers": [1], "index_source_layers": [1],
                           "candidate_source_layer": -1, "original_seq_len": 32, "rope_factor": 4})
    assert a.hidden_size == 64 and a.kv_source_layer_ids == [1] and a.rope_scaling["factor"] == 4


@pytest.mark.parametrize("change,message", [
    ({"compress_ratios": [0, 0, 4] + [2] * 17 + [1] * 20}, "compress_ratios contains [4]"),
    ({"kv_source_layer_ids": [3, 8, 14, 20], "index_source_layer_ids": [3, 8, 14, 20, 24]},
     "layer 2 (compress_ratio 2) has no kv source"),
    ({"index_source_layer_ids": [8, 14, 20]}, "kv source layer 2 is not in index_source_layer_ids"),
    ({"candidate_source_layer_id": 21}, "candidate_source_layer_id 21 is not an index source"),
    ({"candidate_source_layer_id": 14}, "index source 20 picks inside the candidate blocks of layer 14"),
    ({"engram_num_embeddings": [384006168]}, "engram_num_embeddings has 1 entries"),
    ({"engram_layer_ids": [1, 1]}, "engram_layer_ids [1, 1]: must be distinct"),
    ({"kv_source_layer_ids": [2, 8, 14, 21], "index_source_layer_ids": [2, 8, 14, 21, 24],
      "candidate_source_layer_id": 21}, "layer 20 has compress_ratio 1 but reads layer 14's cache"),
])
def test_bad_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        preset("v41-flash", **change)


def test_detects_v41_and_v4_refuses_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v41", "text_config": {}}))
    assert is_v41_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4"}))
    assert not is_v41_checkpoint(tmp_path)
