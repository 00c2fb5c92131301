"""The DSpark drafter's tensor names: the release's ``mtp.{stage}.*`` -> ours ``dspark.*``.

V4-Flash-0731 stores its drafter under the MTP namespace, one ``mtp.{i}`` per stage (vLLM
``vllm/models/deepseek_v4/nvidia/dspark.py``, ``load_weights``/``map_name``):

* ``mtp.0.main_proj`` (FP8) and ``mtp.0.main_norm``: the projection of the target hiddens;
* ``mtp.{last}.norm``, ``hc_head_{fn,base,scale}``, ``markov_head.markov_w{1,2}``,
  ``confidence_head.proj``: the heads, on the last stage;
* everything else of ``mtp.{i}``: stage i's V4 decoder layer (attention, MoE, hyper-connections).

Pure names (no MLX), so :mod:`mlx_v4.weights` can use it without importing the model.
"""

from __future__ import annotations

import re

_STAGE = re.compile(r"mtp\.(\d+)\.(.+)")
_HEADS = {"norm.weight": "norm.weight", "hc_head_fn": "hc_head.fn", "hc_head_base": "hc_head.base",
          "hc_head_scale": "hc_head.scale", "markov_head.markov_w1.weight": "markov_w1.weight",
          "markov_head.markov_w2.weight": "markov_w2.weight", "confidence_head.proj.weight": "confidence.weight"}
_FIRST = {"main_proj.weight": "main_proj.weight", "main_norm.weight": "main_norm.weight"}
_HC = re.compile(r"hc_(attn|ffn)_(fn|base|scale)$")

_Q = r"\.(weight|scales|biases)"
#: Our names of the drafter's own tensors (its layers' names are the decoder block's, see weights.py).
OUR_HEAD_NAMES = rf"dspark\.(main_proj{_Q}|main_norm\.weight|norm\.weight|hc_head\.(fn|base|scale)" \
                 rf"|markov_w1\.weight|markov_w2{_Q}|confidence\.weight)"


def dspark_rename(name: str, stages: int) -> str | None:
    """An official name -> ours, for a checkpoint with ``stages`` DSpark stages; None when the
    name is not a drafter tensor. Head and projection names on another stage than theirs map to
    a layer name, which the loader then rejects as unknown."""
    m = _STAGE.fullmatch(name)
    if m is None:
        return None
    stage, rest = int(m.group(1)), m.group(2)
    if stage == 0 and rest in _FIRST:
        return "dspark." + _FIRST[rest]
    if stage == stages - 1 and rest in _HEADS:
        return "dspark." + _HEADS[rest]
    return f"dspark.layers.{stage}." + _HC.sub(r"hc_\1.\2", rest)
