"""The sparse decode kernel wired into the model: decode logits with ``use_kernel`` on (the
real Metal kernel, run by the CPU emulator) equal those of the reference path."""

import mlx.core as mx
import pytest
from metal_emu import emu

from mlx_v4.kernels import hyper_mix as hm
from mlx_v4.kernels import sparse_decode as sd
from mlx_v4.kernels import sparse_prefill as sp
from mlx_v4.model import Model
from mlx_v4.testing.tiny import random_model, tiny_args


def test_model_passes_use_kernel_down():
    args = tiny_args()
    on, off = Model(args, use_kernel=True), Model(args, use_kernel=False)
    assert all(layer.attn.use_kernel and layer.hc_attn.use_kernel and layer.hc_ffn.use_kernel
               for layer in on.layers)
    assert not any(layer.attn.use_kernel or layer.hc_attn.use_kernel or layer.hc_ffn.use_kernel
                   for layer in off.layers)


def decode_logits(model, prompt, steps):
    cache = model.make_cache()
    logits = model(prompt, cache)
    outs = []
    tok = mx.argmax(logits[:, -1:], axis=-1)
    for _ in range(steps):
        logits = model(tok, cache)
        outs.append(logits)
        tok = mx.argmax(logits, axis=-1)
    return mx.concatenate(outs, axis=1)


@pytest.mark.skipif(not emu.have_compiler(), reason="no C++20 compiler for the Metal emulator")
def test_decode_logits_same_with_kernel(monkeypatch):
    args = tiny_args(index_topk=4)  # 40 tokens -> 10 index keys, so the indexer really picks
    model = random_model(args, seed=5)
    prompt = mx.random.randint(0, args.vocab_size, (2, 40), key=mx.random.key(1))
    want = decode_logits(model, prompt, steps=3)

    log = []
    monkeypatch.setattr(sd, "metal_runner", emu.runner("asan", log=log))
    monkeypatch.setattr(sp, "metal_runner", emu.runner("asan"))  # the prompt runs kernel 2
    for layer in model.layers:
        layer.attn.use_kernel = True
    got = decode_logits(model, prompt, steps=3)
    csa_layers = sum(1 for r in args.compress_ratios[: args.num_hidden_layers] if r == 4)
    assert len(log) == 3 * csa_layers  # every decode step of every CSA layer ran the kernel
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4), float(mx.abs(got - want).max())


@pytest.mark.skipif(not emu.have_compiler(), reason="no C++20 compiler for the Metal emulator")
def test_hyper_connections_same_with_kernel(monkeypatch):
    args = tiny_args()
    model = random_model(args, seed=6)
    prompt = mx.random.randint(0, args.vocab_size, (1, 9), key=mx.random.key(2))
    want = decode_logits(model, prompt, steps=2)

    log = []
    monkeypatch.setattr(hm, "metal_runner", emu.runner("asan", log=log))
    for layer in model.layers:
        layer.hc_attn.use_kernel = layer.hc_ffn.use_kernel = True
    got = decode_logits(model, prompt, steps=2)
    assert len(log) == 3 * 2 * args.num_hidden_layers  # prefill + 2 steps, two per layer
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4), float(mx.abs(got - want).max())


@pytest.mark.skipif(not emu.have_compiler(), reason="no C++20 compiler for the Metal emulator")
def test_chunked_prefill_same_with_kernel(monkeypatch):
    """Kernel 2 on later prefill chunks of the compressed layers (picks on CSA, every visible
    entry on HCA), then kernel 1 for decode: the same logits as the reference path. The first
    130 tokens run the reference in both runs (the emulator runs every GPU thread as an OS thread)."""
    args = tiny_args(index_topk=4)
    model = random_model(args, seed=7)
    prompt = mx.random.randint(0, args.vocab_size, (1, 140), key=mx.random.key(3))

    def run(kernel: bool):
        cache = model.make_cache()
        logits = [model(prompt[:, :130], cache)]
        for layer in model.layers:
            layer.attn.use_kernel = kernel
        logits += [model(prompt[:, s:e], cache) for s, e in ((130, 136), (136, 140))]
        tok = mx.argmax(logits[-1][:, -1:], axis=-1)
        for _ in range(2):
            logits.append(model(tok, cache))
            tok = mx.argmax(logits[-1], axis=-1)
        for layer in model.layers:
            layer.attn.use_kernel = False
        return mx.concatenate(logits, axis=1)

    want = run(False)
    log = []
    monkeypatch.setattr(sp, "metal_runner", emu.runner("asan", log=log))
    monkeypatch.setattr(sd, "metal_runner", emu.runner("asan"))
    got = run(True)
    ratios = args.compress_ratios[: args.num_hidden_layers]
    dense = sum(1 for cap in log if cap.in_shapes[5] == (1,))  # no per-query index list
    assert len(log) == 2 * sum(1 for r in ratios if r)  # both chunks of every compressed layer
    assert 0 < dense < len(log)  # both modes ran: all visible entries (HCA) and picks (CSA)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4), float(mx.abs(got - want).max())
