"""DETR (Carion et al., ECCV 2020): object detection as direct set prediction, readable in one sitting.

image (B, 3, H, W)
  → CNN backbone (the project's BiT ResNet, `resnet.ResNetV2`) + 1×1 projection    (B, d, H/s, W/s), s = 32 for R50
  → flatten to a sequence, + 2-D sine position encoding at every attention layer     (B, HW/s², d)
  → transformer encoder (post-norm, as the paper's code)                             memory (B, HW/s², d)
  → transformer decoder: N learned object queries, all decoded in parallel           (L_dec, B, N, d)
  → class head (classes + "no object") and box head (3-layer MLP → sigmoid (cx, cy, w, h) in [0, 1])
    on every decoder layer's output: the last is the prediction, the others feed the auxiliary losses.

The paper's backbone is an ImageNet-pretrained torchvision ResNet-50 with frozen BatchNorm; vitray's is its own BiT
ResNetV2 (GroupNorm and weight standardisation: no batch statistics, so it behaves the same at DETR's 2–4 images per
device), pretrained by any vitray classification run of the same ResNet and loaded through `transfer.init_from`
(`DetectionTask.pretrained_model`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vitray.models.partitioned import whole
from vitray.models.specs import DETRSpec
from vitray.models.resnet import ResNetV2


def sine_position_encoding(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(h·w, dim): the paper's 2-D sine encoding — half the channels encode y, half x, each as sines and cosines of
    the normalised coordinate (scaled to [0, 2π]) at geometrically spaced frequencies."""
    if dim % 4:
        raise ValueError(f"sine position encoding needs a width divisible by 4, got {dim}")
    half = dim // 2
    y = (torch.arange(1, h + 1, dtype=torch.float32) / h * 2 * math.pi)[:, None].expand(h, w)
    x = (torch.arange(1, w + 1, dtype=torch.float32) / w * 2 * math.pi)[None, :].expand(h, w)
    freq = temperature ** (2 * (torch.arange(half) // 2) / half)

    def encode(c: torch.Tensor) -> torch.Tensor:
        v = c[..., None] / freq  # (h, w, half)
        return torch.stack([v[..., 0::2].sin(), v[..., 1::2].cos()], dim=-1).flatten(-2)

    return torch.cat([encode(y), encode(x)], dim=-1).reshape(h * w, dim)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = x + pos  # positions enter queries and keys, never values
        x = self.norm1(x + self.drop(self.attn(q, k, x, need_weights=False)[0]))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, t: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = k = t + query_pos
        t = self.norm1(t + self.drop(self.self_attn(q, k, t, need_weights=False)[0]))
        out, weights = self.cross_attn(t + query_pos, memory + pos, memory, need_weights=need_weights,
                                       average_attn_weights=False)
        t = self.norm2(t + self.drop(out))
        return self.norm3(t + self.drop(self.ffn(t))), weights


class DETR(nn.Module):
    def __init__(self, spec: DETRSpec, num_classes: int, image_size: int | tuple[int, int] = 800, dropout: float = 0.1,
                 representation_size: int | None = None):
        super().__init__()
        d = spec.width
        self.spec, self.num_classes = spec, num_classes
        self.backbone = ResNetV2(spec.backbone_spec, num_classes=1)
        self.backbone.head = nn.Identity()  # DETR reads the feature map; the classifier head is not used
        self.input_proj = nn.Conv2d(self.backbone.norm.num_channels, d, kernel_size=1)
        self.encoder = nn.ModuleList(EncoderLayer(d, spec.heads, spec.mlp_dim, dropout) for _ in range(spec.encoder_depth))
        self.decoder = nn.ModuleList(DecoderLayer(d, spec.heads, spec.mlp_dim, dropout) for _ in range(spec.depth))
        self.decoder_norm = nn.LayerNorm(d)  # applied to every decoder layer's output before the heads
        self.query_embed = nn.Embedding(spec.queries, d)  # the object queries: learned positional encodings
        self.class_head = nn.Linear(d, num_classes + 1)  # index num_classes = "no object"
        self.box_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))
        for layer in [*self.encoder, *self.decoder]:
            with whole(layer):  # partitioned already under ZeRO-3's zero.Init (models/partitioned.py)
                for p in layer.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)  # the reference transformer's init
                for m in layer.modules():  # torch's MultiheadAttention zeroes this bias after its child was built
                    if isinstance(m, nn.MultiheadAttention):
                        nn.init.zeros_(m.out_proj.bias)

    def forward(self, images: torch.Tensor, return_attention: bool = False) -> dict:
        """{"logits": (B, N, classes + 1), "boxes": (B, N, 4) normalised cxcywh, "aux": [{"logits", "boxes"}
        for each earlier decoder layer]}, plus "cross_attention" (L_dec × (B, heads, N, h·w)) and "feature_size"
        (h, w) when asked."""
        f = self.input_proj(self.backbone.feature_map(images))  # (B, d, h, w)
        b, d, h, w = f.shape
        memory = f.flatten(2).transpose(1, 2)  # (B, hw, d)
        pos = sine_position_encoding(h, w, d).to(memory)[None]
        for layer in self.encoder:
            memory = layer(memory, pos)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        t = torch.zeros_like(query_pos)  # the decoder input starts empty; queries enter as positions
        outputs, attention = [], []
        for layer in self.decoder:
            t, weights = layer(t, memory, pos, query_pos, return_attention)
            outputs.append(self.decoder_norm(t))
            attention.append(weights)
        hs = torch.stack(outputs)  # (L_dec, B, N, d)
        logits, boxes = self.class_head(hs), self.box_head(hs).sigmoid()
        out = {"logits": logits[-1], "boxes": boxes[-1],
               "aux": [{"logits": lg, "boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]}
        if return_attention:
            out.update(cross_attention=attention, feature_size=(h, w))
        return out


def postprocess(logits: torch.Tensor, boxes: torch.Tensor, sizes: list[tuple[int, int]]) -> list[dict]:
    """Per image: every query's best real class, its probability as the score, and its box in pixels (x0, y0, x1,
    y1) for an image of `sizes[b]` = (height, width). No NMS: set prediction makes duplicates rare by design."""
    from vitray.models.box_ops import cxcywh_to_xyxy

    prob = logits.float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    out = []
    for b, (h, w) in enumerate(sizes):
        xyxy = cxcywh_to_xyxy(boxes[b].float()) * torch.tensor([w, h, w, h], dtype=torch.float32)
        out.append({"scores": scores[b], "labels": labels[b], "boxes": xyxy})
    return out
