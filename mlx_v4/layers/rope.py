"""Interleaved partial RoPE on the last ``qk_rope_head_dim`` dims (paper §2.3; official
``apply_rotary_emb``), with per-layer frequency tables: theta 10000 on window-only layers,
theta 160000 with YaRN (attention factor 1) on compressed layers and in the indexer.

Angles are ``position * inv_freq`` in float32, as in the reference; adjacent pairs
``(x[2i], x[2i+1])`` rotate together.
"""

from __future__ import annotations

import mlx.core as mx


class RoPE:
    def __init__(self, inv_freq: list[float], rope_dim: int):
        self.inv_freq = mx.array(inv_freq, dtype=mx.float32)
        self.rope_dim = rope_dim

    def cos_sin(self, positions: mx.array) -> tuple[mx.array, mx.array]:
        """positions [L] (int) -> cos, sin [L, rope_dim // 2] float32."""
        angles = positions.astype(mx.float32)[:, None] * self.inv_freq[None, :]
        return mx.cos(angles), mx.sin(angles)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, inverse: bool = False) -> mx.array:
        """Rotate the last rope_dim dims of x [..., L, (heads,) dim]; cos/sin [L, rope_dim//2].

        ``x`` has the sequence axis at -2 (no head axis) or -3 (with a head axis); pass
        cos/sin already broadcastable, e.g. ``cos[:, None]`` for a head axis.
        """
        rd = self.rope_dim
        nope, rope = x[..., :-rd], x[..., -rd:]
        pairs = rope.astype(mx.float32).reshape(*rope.shape[:-1], rd // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        if inverse:
            sin = -sin
        rotated = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
        rotated = rotated.reshape(rope.shape).astype(x.dtype)
        return mx.concatenate([nope, rotated], axis=-1)
