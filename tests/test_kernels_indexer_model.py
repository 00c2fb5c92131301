"""The indexer kernel wired into the model: with ``use_kernel`` on (the real Metal kernels run
by the CPU emulator, for the indexer and the sparse decode attention), chunked prefill and
decode give the reference path's picks and logits."""

import functools

import mlx.core as mx
import pytest
from metal_emu import emu

from mlx_v4.kernels import indexer_topk as ik
from mlx_v4.kernels import sparse_decode as sd
from mlx_v4.kernels import sparse_prefill as sp
from mlx_v4.layers import attention
from mlx_v4.layers import indexer as indexer_mod
from mlx_v4.model import Model
from mlx_v4.testing.tiny import random_model, tiny_args


def test_attention_passes_use_kernel_to_the_indexer():
    args = tiny_args()
    on, off = Model(args, use_kernel=True), Model(args, use_kernel=False)
    csa = [i for i, r in enumerate(args.compress_ratios[: args.num_hidden_layers]) if r == 4]
    assert csa and all(on.layers[i].attn.indexer.use_kernel for i in csa)
    assert not any(off.layers[i].attn.indexer.use_kernel for i in csa)


def run(model, prompt, chunks, steps):
    """Chunked prefill then greedy decode; logits of every position."""
    cache, outs, pos = model.make_cache(), [], 0
    for n in chunks:
        outs.append(model(prompt[:, pos:pos + n], cache))
        mx.eval(outs[-1])
        pos += n
    tok = mx.argmax(outs[-1][:, -1:], axis=-1)
    for _ in range(steps):
        outs.append(model(tok, cache))
        tok = mx.argmax(outs[-1], axis=-1)
    return mx.concatenate(outs, axis=1)


@pytest.mark.skipif(not emu.have_compiler(), reason="no C++20 compiler for the Metal emulator")
def test_prefill_and_decode_same_with_kernel(monkeypatch):
    args = tiny_args(index_topk=4)  # 44 tokens -> 11 index keys, so the indexer really picks
    model = random_model(args, seed=7)
    prompt = mx.random.randint(0, args.vocab_size, (2, 44), key=mx.random.key(2))
    want = run(model, prompt, chunks=[28, 16], steps=2)

    picks = []
    real = indexer_mod.indexer_topk

    def checked(q, w, packed, scales, **kw):
        got = real(q, w, packed, scales, **kw)  # the kernel (use_kernel=True from select)
        ref = ik.indexer_topk_reference(q, w, packed, scales, n_keys=kw["n_keys"], offset=kw["offset"], k=kw["k"])
        picks.append((got, ref))
        return got

    log = []
    monkeypatch.setattr(indexer_mod, "indexer_topk", checked)
    monkeypatch.setattr(ik, "metal_runner", emu.runner("asan", log=log))
    # one-simdgroup threadgroups: every emulated lane is an OS thread
    monkeypatch.setattr(ik, "indexer_topk_kernel",
                        functools.partial(ik.indexer_topk_kernel, score_threads=32, select_threads=32))
    monkeypatch.setattr(sd, "metal_runner", emu.runner("asan"))
    # Prefill attention stays on its reference here (kernel 2 has its own model test): its
    # float32 sums in another order can flip an FP8 rounding and blur what this test checks.
    monkeypatch.setattr(attention, "sparse_prefill_attention",
                        lambda *a, **kw: sp.sparse_prefill_attention(*a, **(kw | {"use_kernel": False})))
    for layer in model.layers:
        layer.attn.use_kernel = True
        if hasattr(layer.attn, "indexer"):
            layer.attn.indexer.use_kernel = True
    got = run(model, prompt, chunks=[28, 16], steps=2)

    csa_layers = sum(1 for r in args.compress_ratios[: args.num_hidden_layers] if r == 4)
    # 28 tokens -> 7 keys > k: the first chunk already selects; then the second chunk, 2 steps.
    assert len(picks) == 4 * csa_layers
    assert sum("v4_indexer_score" in c.name for c in log) == len(picks)
    assert sum("v4_indexer_select" in c.name for c in log) == len(picks)
    for g, r in picks:
        assert mx.array_equal(mx.sort(g, axis=-1), mx.sort(r, axis=-1))
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4), float(mx.abs(got - want).max())
