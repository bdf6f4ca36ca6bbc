"""Image GPT (Chen et al., ICML 2020): a GPT-2 decoder over the raster sequence of palette-quantised pixels.

image (B, 3, H, W) in [−1, 1]
  → nearest palette colour per pixel (k-means palette, 512 colours = 9 bits in the paper)   tokens (B, H·W)
  → shift right behind a learned start-of-sequence vector; token + learned position embeddings   (B, H·W, D)
  → L pre-norm blocks with causal (masked) fused attention                                         (B, H·W, D)
  → LayerNorm → linear head to the palette: logits[t] predicts token t from tokens < t             (B, H·W, K)

The BERT objective (the paper's comparison, `igpt_*_bert` models): no shift, attention both ways, and each
position masked with probability 0.15 is replaced by a learned [MASK] vector; the loss is the NLL of the masked
positions' tokens given the others.

The palette is a buffer of the model, so a checkpoint carries it and the model takes images like every other
vitray model (linear probes and FLOPs counting need nothing special). Sizes (paper Sec. 3): iGPT-S 512 wide ×
24 layers, iGPT-M 1024 × 36, iGPT-L 1536 × 48, MLP 4× the width; the paper does not list its head counts, vitray
uses 8, 8 and 16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitray.models.layers import Block
from vitray.models.partitioned import whole
from vitray.models.specs import IGPTSpec

MASK_PROB = 0.15  # BERT's masking rate, as in the paper


def quantize(images: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [−1, 1] → palette indices (B, H·W) in raster order: the nearest colour by Euclidean distance
    in RGB (the palette is in the same [−1, 1] units)."""
    pixels = images.flatten(2).transpose(1, 2)  # (B, HW, 3)
    return torch.cdist(pixels.float(), palette.float()[None].expand(len(pixels), -1, -1)).argmin(-1)


def dequantize(tokens: torch.Tensor, palette: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Palette indices (B, H·W) → images (B, 3, H, W) in [−1, 1]."""
    return palette[tokens].transpose(1, 2).reshape(len(tokens), 3, *size)


class IGPT(nn.Module):
    def __init__(self, spec: IGPTSpec, num_classes: int = 0, image_size: int | tuple[int, int] = 32,
                 dropout: float = 0.0, representation_size: int | None = None):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.spec, self.size, d = spec, (h, w), spec.width
        self.register_buffer("palette", torch.rand(spec.vocab, 3) * 2 - 1)  # replaced by k-means before training
        # The start-of-sequence vector (autoregressive) or the [MASK] vector (BERT): one learned input embedding.
        self.sos = nn.Parameter(torch.zeros(1, 1, d))
        self.tok_embed = nn.Embedding(spec.vocab, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, h * w, d))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, spec.heads, spec.mlp_dim, dropout) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.head = nn.Linear(d, spec.vocab, bias=False)
        with whole(self.tok_embed):  # partitioned already under ZeRO-3's zero.Init (models/partitioned.py)
            for p in (self.tok_embed.weight, self.pos_embed, self.sos):
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                with whole(m):
                    nn.init.normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def set_palette(self, palette: torch.Tensor) -> None:
        if palette.shape != self.palette.shape:
            raise ValueError(f"palette of shape {tuple(palette.shape)}; this model predicts {tuple(self.palette.shape)}")
        self.palette.copy_(palette)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return quantize(images, self.palette)

    def hidden(self, tokens: torch.Tensor, layers: list[int] | None = None,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Final hidden states (B, N, D) after the LayerNorm, and {k: block k's output} for the asked layers (k = 0:
        the embeddings). Autoregressive: position t sees tokens < t only. BERT: every position sees every
        unmasked token; `mask` (B, N) bool marks the positions whose tokens are hidden (none when absent)."""
        if self.spec.bert:
            x = self.tok_embed(tokens)
            if mask is not None:
                x = torch.where(mask[..., None], self.sos.to(x.dtype), x)
        else:
            x = torch.cat([self.sos.expand(len(tokens), -1, -1), self.tok_embed(tokens[:, :-1])], dim=1)
        x = self.drop(x + self.pos_embed[:, :tokens.shape[1]])
        out = {0: x} if layers and 0 in layers else {}
        for k, block in enumerate(self.blocks, start=1):
            x, _ = block(x, causal=not self.spec.bert)
            if layers and k in layers:
                out[k] = x
        return self.norm(x), out

    def draw_mask(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """BERT: positions to hide, each with probability MASK_PROB (at least one per image); None otherwise."""
        if not self.spec.bert:
            return None
        u = torch.rand(tokens.shape, generator=generator, device="cpu").to(tokens.device)
        return (u < MASK_PROB) | (u == u.min(1, keepdim=True).values)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, H·W, K) for the image's own tokens: logits[:, t] predicts token t (from tokens < t, or for
        BERT from the tokens `mask` leaves visible)."""
        h, _ = self.hidden(self.tokens(images), mask=mask)
        return self.head(h)

    def nll(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """(summed negative log-likelihood in nats, tokens predicted): every pixel for the autoregressive
        objective, the masked ones for BERT. Divide for nats per pixel (÷ ln 2 for bits)."""
        tokens = self.tokens(images)
        mask = self.draw_mask(tokens, generator)
        h, _ = self.hidden(tokens, mask=mask)
        logits = self.head(h).float()
        if mask is not None:
            logits, tokens = logits[mask], tokens[mask]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), reduction="sum"), tokens.numel()

    def layer_features(self, images: torch.Tensor, layers: list[int], pool: str = "mean") -> list[torch.Tensor]:
        """iGPT's linear-probe features: layer l's outputs averaged over all positions (f^l = ⟨n^l_i⟩_i)."""
        if pool != "mean":
            raise ValueError(f"pool: {pool!r}; iGPT has no class token, its probes average over positions")
        bad = [k for k in layers if not 0 <= k <= len(self.blocks)]
        if bad:
            raise ValueError(f"layer {bad[0]}: this model has layers 0..{len(self.blocks)}")
        _, out = self.hidden(self.tokens(images), layers)
        return [out[k].mean(1) for k in layers]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        h, _ = self.hidden(self.tokens(images))
        return h.mean(1)

    @torch.no_grad()
    def sample(self, n: int, prefix: torch.Tensor | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Tokens (n, H·W): continue `prefix` (n, t) — e.g. the top half of images — or sample from scratch."""
        if self.spec.bert:
            raise ValueError("sampling pixel by pixel needs the autoregressive objective; this is a BERT model")
        length = self.size[0] * self.size[1]
        tokens = prefix.clone() if prefix is not None else torch.zeros(n, 0, dtype=torch.long, device=self.palette.device)
        while tokens.shape[1] < length:
            padded = torch.cat([tokens, tokens.new_zeros(n, 1)], dim=1)  # the last input token is never read
            h, _ = self.hidden(padded)
            probs = (self.head(h[:, -1]) / temperature).softmax(-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return tokens
