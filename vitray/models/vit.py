"""The Vision Transformer (Dosovitskiy et al., ICLR 2021), readable in one sitting.

image (B, 3, H, W)
  → patch embedding: a conv with kernel = stride = P            (B, D, H/P, W/P) → (B, N, D),  N = HW/P²
  → prepend the [class] token, add learned 1-D position embeddings, dropout      (B, N+1, D)
  → L pre-norm encoder blocks (MSA + MLP, each with a residual)                  (B, N+1, D)
  → LayerNorm, take the [class] token                                            (B, D)
  → pre-logits: Linear + tanh (the pretraining head's hidden layer; dropped for fine-tuning)
  → head: Linear to the classes (zero-initialised)                               (B, classes)

Hybrids (R50+ViT-B/16, Table 6) are this same class with a ResNet as the patch embedding (`resnet.HybridStem`).

Initialisation follows the official vit_jax code: class token zeros, position embeddings N(0, 0.02), every
Dense Xavier-uniform with near-zero bias (MLP biases N(0, 1e-6)), the patch conv LeCun-normal, the head zeros.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vitray.models.layers import Block
from vitray.models.posemb import resize_pos_embed
from vitray.models.partitioned import whole
from vitray.models.specs import ViTSpec


class ViT(nn.Module):
    def __init__(
        self,
        spec: ViTSpec,
        num_classes: int,
        image_size: int | tuple[int, int] = 224,
        dropout: float = 0.0,
        representation_size: int | None = None,
    ):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if h % spec.patch or w % spec.patch:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {spec.patch}")
        self.spec, self.num_classes = spec, num_classes
        self.grid = (h // spec.patch, w // spec.patch)
        d = spec.width

        if not spec.embeds_patches_linearly:  # a hybrid: ResNet stages, then their feature map's 1×1 cells as patches
            from vitray.models.resnet import HybridStem

            self.patch_embed = HybridStem(spec.resnet, spec.resnet_width, d)
        else:
            self.patch_embed = nn.Conv2d(3, d, kernel_size=spec.patch, stride=spec.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.empty(1, self.grid[0] * self.grid[1] + 1, d))
        self.pos_drop = nn.Dropout(dropout)  # dropout after the position-embedding add (App. B.1)
        self.blocks = nn.ModuleList(Block(d, spec.heads, spec.mlp_dim, dropout) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        # Pretraining head = MLP with one tanh hidden layer; fine-tuning replaces it with a single linear layer.
        self.pre_logits = nn.Sequential(nn.Linear(d, representation_size), nn.Tanh()) if representation_size else nn.Identity()
        self.head = nn.Linear(representation_size or d, num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.02)
        embed = self.patch_embed if self.spec.embeds_patches_linearly else self.patch_embed.proj  # the ResNet inits itself
        fan_in = embed.in_channels * math.prod(embed.kernel_size)
        with whole(embed):  # children are already partitioned under ZeRO-3's zero.Init (models/partitioned.py)
            nn.init.trunc_normal_(embed.weight, std=math.sqrt(1.0 / fan_in) / 0.8796, a=-2.0 * 0.8796, b=2.0 * 0.8796)
            nn.init.zeros_(embed.bias)
        for block in self.blocks:
            with whole(block):
                for chunk in block.attn.qkv.weight.chunk(3):  # q, k, v initialised as three separate D×D kernels
                    nn.init.xavier_uniform_(chunk)
                nn.init.xavier_uniform_(block.attn.proj.weight)
                nn.init.zeros_(block.attn.qkv.bias)
                nn.init.zeros_(block.attn.proj.bias)
                for fc in (block.mlp.fc1, block.mlp.fc2):
                    nn.init.xavier_uniform_(fc.weight)
                    nn.init.normal_(fc.bias, std=1e-6)
        with whole(self.pre_logits, self.head):
            if isinstance(self.pre_logits, nn.Sequential):
                fc = self.pre_logits[0]
                nn.init.trunc_normal_(fc.weight, std=math.sqrt(1.0 / fc.in_features) / 0.8796)
                nn.init.zeros_(fc.bias)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def adapt_for_finetuning(
        self, num_classes: int, image_size: int | tuple[int, int], posemb_method: str = "bilinear"
    ) -> "ViT":
        """The paper's transfer recipe (Sec. 3.2, App. B.1.1): the pretraining head (tanh MLP) gives way to one
        zero-initialised linear layer, and the position embeddings are interpolated in 2-D to the new grid."""
        self.resize_grid(image_size, posemb_method)
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(self.spec.width, num_classes).to(self.pos_embed.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes
        return self

    def resize_grid(self, image_size: int | tuple[int, int], posemb_method: str = "bilinear") -> "ViT":
        """Take images of another size (same patch): the position embeddings are interpolated in 2-D to the new
        grid; the head is kept (evaluating a checkpoint at another resolution)."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if h % self.spec.patch or w % self.spec.patch:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {self.spec.patch}")
        new_grid = (h // self.spec.patch, w // self.spec.patch)
        if new_grid != self.grid:
            self.pos_embed = nn.Parameter(resize_pos_embed(self.pos_embed.data, self.grid, new_grid, posemb_method))
            self.grid = new_grid
        return self

    def encode(self, images: torch.Tensor, need_weights: bool = False,
               class_only: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All output tokens after the final LayerNorm (B, N+1, D), and per-layer attention weights if asked.
        `class_only`: just the class token (B, 1, D) — the last block then computes only its output, which is
        exact and spares that block's MLP, projection and N−1 attention rows (~7 % of ViT-B/16's training step;
        `accounting.forward_flops` counts the block as computed, so MFU is of the work really done)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        attention = []
        for i, block in enumerate(self.blocks):
            x, weights = block(x, need_weights, queries=1 if class_only and i == len(self.blocks) - 1 else None)
            if need_weights:
                attention.append(weights)
        return self.norm(x), attention

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logit features (B, representation_size or D): what few-shot and linear probes read."""
        tokens, _ = self.encode(images, class_only=True)
        return self.pre_logits(tokens[:, 0])

    def layer_features(self, images: torch.Tensor, layers: list[int], pool: str = "mean") -> list[torch.Tensor]:
        """Features of intermediate layers, (B, D) each: the tokens after block k (k = 0: the embeddings, k =
        depth: the last block, before the final LayerNorm), averaged over the image tokens ("mean", iGPT's linear
        probe protocol) or the [class] token ("cls"). Runs only as many blocks as the deepest layer asked for."""
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool: {pool!r} is not 'mean' or 'cls'")
        bad = [k for k in layers if not 0 <= k <= len(self.blocks)]
        if bad:
            raise ValueError(f"layer {bad[0]}: this model has layers 0..{len(self.blocks)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        outputs = {}
        for k in range(max(layers, default=0) + 1):
            if k > 0:
                x, _ = self.blocks[k - 1](x, False)
            if k in layers:
                outputs[k] = x[:, 1:].mean(1) if pool == "mean" else x[:, 0]
        return [outputs[k] for k in layers]

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        tokens, attention = self.encode(images, need_weights=return_attention, class_only=not return_attention)
        logits = self.head(self.pre_logits(tokens[:, 0]))
        return (logits, attention) if return_attention else logits
