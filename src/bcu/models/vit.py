"""A small Vision Transformer (Dosovitskiy et al., ICLR 2021) for 28x28 and 32x32 images.

The image is cut into ``patch x patch`` patches, each embedded by one strided convolution
(``patch_embed``); a learned class token is prepended and learned position embeddings are added;
``depth`` pre-norm blocks follow (LayerNorm -> multi-head self-attention -> residual, LayerNorm ->
GELU MLP -> residual), then a final LayerNorm and a linear head on the class token. Attribute
names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.attn.qkv``/``proj``, ``blocks.N.mlp.fc1``/``fc2``, ``norm``, ``head``), so a plan that
works on this model reads the same on timm's.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, num_classes: int, input_shape: Tuple[int, int, int], patch: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float) -> None:
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ValueError(f"a {h}x{w} image does not split into {patch}x{patch} patches")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.patch_embed = PatchEmbed(c, dim, patch)
        tokens = (h // patch) * (w // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@register_model("vit")
def vit(num_classes: int = 10, input_shape: Tuple[int, int, int] = (1, 28, 28), patch: int = 4, dim: int = 64,
        depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0, width: float = 1.0) -> VisionTransformer:
    """A small ViT: patch embedding, class token, pre-norm attention/MLP blocks, LayerNorm, linear head;
    ``width`` scales the embedding width ``dim`` (kept a multiple of ``heads``)."""
    if not (1 <= depth <= 48 and 1 <= heads <= 64 and 1 <= dim <= 4096 and 1 <= patch <= 64 and 0 < mlp_ratio <= 16
            and 0 < width <= 16):
        raise ValueError("vit options out of range (depth 1-48, heads 1-64, dim 1-4096, patch 1-64, mlp_ratio 0-16, "
                         "width 0-16)")
    dim = max(1, round(dim * width / heads)) * heads
    return VisionTransformer(num_classes, input_shape, patch, dim, depth, heads, mlp_ratio)
