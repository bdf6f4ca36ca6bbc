"""Transformer layers shared by ViT (and later hybrids, DETR, iGPT): attention, MLP, pre-norm block.

Attention runs fused (`scaled_dot_product_attention`) for training; asked for its weights it computes them
explicitly instead, so inspection never gets silently empty maps from a fused kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert dim % heads == 0, f"width {dim} not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # no dropout after qkv (paper App. B.1)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, need_weights: bool = False, causal: bool = False, queries: int | None = None):
        """`queries`: attend from the first `queries` tokens only (to all N keys). One qkv projection serves both
        cases: slicing its weight instead would bypass the module call that ZeRO-3 gathers parameters on."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3×(B,h,N,d_h)
        if queries is not None:
            assert not causal, "a causal mask needs every query"
            q = q[:, :, :queries]
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            if causal:
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            weights = scores.softmax(dim=-1)  # (B, h, N, N), rows sum to 1
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = out.transpose(1, 2).reshape(b, q.shape[2], d)
        return self.drop(self.proj(out)), weights


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x)) (paper Eq. 2–3). With `queries` = k only the
    first k tokens' outputs are computed — exact for them, since every token still serves as a key and value."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, need_weights: bool = False, causal: bool = False, queries: int | None = None):
        a, weights = self.attn(self.norm1(x), need_weights, causal, queries)
        x = x[:, :queries] + a
        return x + self.mlp(self.norm2(x)), weights
