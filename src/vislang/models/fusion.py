"""Fusion modules: one interface that turns image and text token features into one joint vector.

Every module is called as ``fusion(image_tokens (B, N, Di), text_tokens (B, T, Dt), text_valid (B, T))`` and returns
``(B, dim)``. The three "late" fusions (concat, sum, gated) see one pooled vector per side: the mean over image
tokens and the end-of-text token (or masked mean) of the text. Cross-attention fusion (ALBEF/BLIP style) keeps the
token level: text tokens attend to the image patch tokens through ``depth`` Transformer blocks, so a question can
look at the part of the image it names. Which one a model uses is ``FusionConfig.kind``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.transformer import Block

FUSIONS = ("concat", "sum", "gated", "cross_attention")


@dataclass(frozen=True)
class FusionConfig:
    kind: str = "cross_attention"  # one of FUSIONS
    dim: int = 128  # width of the fused representation
    depth: int = 2  # cross_attention: number of Transformer blocks (self-attention + cross-attention + MLP)
    heads: int = 4  # cross_attention: attention heads
    mlp_ratio: float = 2.0  # cross_attention: MLP hidden = dim * mlp_ratio
    dropout: float = 0.0
    text_pool: str = "eot"  # late fusions: "eot" (last valid token, CLIP) or "mean" (masked mean)


def pool_text(tokens: torch.Tensor, valid: torch.Tensor, how: str = "eot") -> torch.Tensor:
    """(B, T, D) tokens → (B, D): the last valid token ("eot") or the masked mean ("mean")."""
    if how == "mean":
        w = valid.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        return (tokens * w).sum(1) / w.sum(1).clamp(min=1)
    last = valid.long().sum(1).clamp(min=1) - 1  # (B,)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]  # (B, D)


def sincos_positions(n: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2-D sine–cosine position codes (n, dim) for a square grid of n tokens (1-D when n is not a square).

    Image towers of any size feed the same module, so the codes are computed, not learned per grid size. Without
    them cross-attention would see a bag of patches and could not answer "what is left of the square?".
    """
    side = math.isqrt(n)
    if side * side == n:
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        coords = [xs.flatten(), ys.flatten()]  # 2 × (n,)
    else:
        coords = [torch.arange(n)]
    per = dim // (2 * len(coords))
    freqs = torch.exp(-math.log(100.0) * torch.arange(per) / max(per, 1))  # (per,)
    parts = []
    for c in coords:
        ang = c[:, None].float() * freqs[None, :]  # (n, per)
        parts += [ang.sin(), ang.cos()]
    pe = torch.cat(parts, dim=1)  # (n, <= dim)
    pe = F.pad(pe, (0, dim - pe.shape[1]))  # (n, dim)
    return pe.to(device=device, dtype=dtype)


class Fusion(nn.Module):
    """Base: subclasses implement ``forward(image_tokens, text_tokens, text_valid) -> (B, dim)``."""

    def __init__(self, cfg: FusionConfig, image_dim: int, text_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim

    def pooled(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_valid: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean image token and pooled text, (B, Di) and (B, Dt); ``image_index`` maps each text to its image."""
        fi = image_tokens.mean(dim=1)  # (B_img, Di)
        if image_index is not None:
            fi = fi[image_index]  # (B, Di)
        return fi, pool_text(text_tokens, text_valid, self.cfg.text_pool)


class PooledFusion(Fusion):
    """Fusions of the pooled image and text vectors: subclasses only say how the two combine."""

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_valid: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        fi, ft = self.pooled(image_tokens, text_tokens, text_valid, image_index)
        return self.combine(fi, ft)

    def combine(self, fi: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:  # (B, Di), (B, Dt) -> (B, dim)
        raise NotImplementedError


class ConcatFusion(PooledFusion):
    """F = W·[f_I; f_T] + b (followed by a non-linearity so the head sees interactions)."""

    def __init__(self, cfg: FusionConfig, image_dim: int, text_dim: int) -> None:
        super().__init__(cfg, image_dim, text_dim)
        self.proj = nn.Linear(image_dim + text_dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)

    def combine(self, fi: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.proj(torch.cat([fi, ft], dim=-1))))  # (B, dim)


class SumFusion(PooledFusion):
    """F = W_I f_I + W_T f_T: each side projected to ``dim`` and added."""

    def __init__(self, cfg: FusionConfig, image_dim: int, text_dim: int) -> None:
        super().__init__(cfg, image_dim, text_dim)
        self.image_proj = nn.Linear(image_dim, cfg.dim)
        self.text_proj = nn.Linear(text_dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)

    def combine(self, fi: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.image_proj(fi) + self.text_proj(ft)))  # (B, dim)


class GatedFusion(PooledFusion):
    """a = σ(W_a[e_I, e_T]), b = σ(W_b[e_I, e_T]), F = a·e_I + b·e_T (element-wise gates on projected sides)."""

    def __init__(self, cfg: FusionConfig, image_dim: int, text_dim: int) -> None:
        super().__init__(cfg, image_dim, text_dim)
        self.image_proj = nn.Linear(image_dim, cfg.dim)
        self.text_proj = nn.Linear(text_dim, cfg.dim)
        self.gate_image = nn.Linear(2 * cfg.dim, cfg.dim)
        self.gate_text = nn.Linear(2 * cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)

    def gates(self, e_i: torch.Tensor, e_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([e_i, e_t], dim=-1)  # (B, 2*dim)
        return torch.sigmoid(self.gate_image(both)), torch.sigmoid(self.gate_text(both))  # (B, dim) each

    def combine(self, fi: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        e_i, e_t = F.gelu(self.image_proj(fi)), F.gelu(self.text_proj(ft))  # (B, dim) each
        a, b = self.gates(e_i, e_t)
        return self.norm(a * e_i + b * e_t)  # (B, dim)


class CrossAttentionFusion(Fusion):
    """Text tokens attend to image tokens through ``depth`` blocks (self-attention over text, cross-attention to the
    image, MLP); the fused vector is the masked mean of the text tokens that come out.

    The blocks are ``layers.transformer.Block(cross_attention=True)``; their cross-attention keys and values are
    computed once per image and then gathered for each text (``image_index``), since a VQA batch asks about ten
    questions per image and the key/value projection of the image tokens would otherwise dominate the cost.
    """

    def __init__(self, cfg: FusionConfig, image_dim: int, text_dim: int) -> None:
        super().__init__(cfg, image_dim, text_dim)
        self.text_in = nn.Linear(text_dim, cfg.dim)
        self.image_in = nn.Linear(image_dim, cfg.dim)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, cross_attention=True) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)

    def prepare(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_valid: torch.Tensor):
        """Projected text (B, T, dim), image with position codes (B_img, N, dim) and the text self-attention mask."""
        ctx = self.image_in(image_tokens)  # (B_img, N, dim)
        ctx = ctx + sincos_positions(ctx.shape[1], self.dim, ctx.device, ctx.dtype)
        x = self.text_in(text_tokens)  # (B, T, dim)
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        allowed = text_valid[:, None, None, :] | eye  # (B, 1, T, T)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        return x, ctx, mask

    def block(
        self,
        blk: Block,
        x: torch.Tensor,
        mask: torch.Tensor,
        ctx: torch.Tensor,
        image_index: torch.Tensor | None,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``blk``'s forward (self-attention, cross-attention, MLP) with keys/values per image, not per text."""
        x = x + blk.attn(blk.ln1(x), attn_mask=mask)
        att = blk.cross
        B, T, D = x.shape
        h, hd = att.heads, D // att.heads
        q = att.q(blk.ln_cross(x)).view(B, T, h, hd).transpose(1, 2)  # (B, h, T, hd)
        k, v = att.kv(ctx).view(ctx.shape[0], ctx.shape[1], 2, h, hd).permute(2, 0, 3, 1, 4)  # (B_img, h, N, hd)
        if image_index is not None:
            k, v = k[image_index], v[image_index]  # (B, h, N, hd)
        weights = None
        if return_weights:
            weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # (B, h, T, N)
            y = weights @ v
        else:
            p = att.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, h, T, hd)
        x = x + att.out(y.transpose(1, 2).reshape(B, T, D))
        return x + blk.mlp(blk.ln2(x)), weights

    def forward_tokens(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_valid: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused text tokens (B, T, dim)."""
        x, ctx, mask = self.prepare(image_tokens, text_tokens, text_valid)
        for blk in self.blocks:
            x, _ = self.block(blk, x, mask, ctx, image_index)
        return self.norm(x)

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_valid: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens = self.forward_tokens(image_tokens, text_tokens, text_valid, image_index)  # (B, T, dim)
        return pool_text(tokens, text_valid, "mean")  # (B, dim)

    @torch.no_grad()
    def attention_maps(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_valid: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-attention weights (B, depth, heads, T, N) of every block (the SDPA kernel does not return them)."""
        x, ctx, mask = self.prepare(image_tokens, text_tokens, text_valid)
        maps = []
        for blk in self.blocks:
            x, w = self.block(blk, x, mask, ctx, image_index, return_weights=True)
            maps.append(w)
        return torch.stack(maps, dim=1)  # (B, depth, h, T, N)


FUSION_CLASSES: dict[str, type[Fusion]] = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "gated": GatedFusion,
    "cross_attention": CrossAttentionFusion,
}


def build_fusion(cfg: FusionConfig, image_dim: int, text_dim: int) -> Fusion:
    """The fusion module ``cfg.kind`` names, for towers of widths ``image_dim`` and ``text_dim``."""
    if cfg.kind not in FUSION_CLASSES:
        raise ValueError(f"unknown fusion {cfg.kind!r}; choose one of {list(FUSION_CLASSES)}")
    return FUSION_CLASSES[cfg.kind](cfg, image_dim, text_dim)
