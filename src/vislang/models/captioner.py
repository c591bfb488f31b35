"""CoCa: a dual encoder whose text tower doubles as the lower half of a caption decoder.

One image tower; the text tower's causal layers are the unimodal layers (their end token gives the contrastive text
embedding); ``MultimodalDecoder`` stacks causal blocks with cross-attention to the image tokens on top of them and
predicts the next token (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

Generation (``generate``) runs the search algorithms of ``vislang.decoding`` over ``DecodeState``, which keeps a
key/value cache of every self-attention layer (text tower and decoder) and the cross-attention keys/values of the image
tokens, computed once per image. The first ``next_logits`` call reads its whole prefix in one pass (a prefill), so a
prompt such as a question (``generate(..., prefix=...)``) costs one forward, then one position per generated token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..decoding import generate
from ..layers.transformer import Block, attention
from .clip import CLIP, DecoderConfig, ModelConfig

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, heads, S, head_dim) each


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads).transpose(1, 2)  # (B, h, T, hd)


def _merge(y: torch.Tensor) -> torch.Tensor:
    B, h, T, hd = y.shape
    return y.transpose(1, 2).reshape(B, T, h * hd)  # (B, T, D)


def context_kv(block: Block, context: torch.Tensor) -> KV:
    """Cross-attention keys and values of ``context`` (B, S, D) for one block: computed once per image."""
    attn = block.cross
    B, S, _ = context.shape
    D = attn.q.out_features
    k, v = attn.kv(context).view(B, S, 2, attn.heads, D // attn.heads).permute(2, 0, 3, 1, 4)  # (B, h, S, hd)
    return k, v


def block_step(block: Block, x: torch.Tensor, past: KV | None, ctx: KV | None = None) -> tuple[torch.Tensor, KV]:
    """``Block.forward`` for the newest position(s) ``x`` (B, t, D), given the cached keys/values of earlier ones.

    With ``past`` the new positions attend to all cached ones, so this equals the causal full-sequence forward; the
    updated cache is returned. Uses the block's own weights, so any ``layers.transformer.Block`` can be stepped.
    """
    attn = block.attn
    h = block.ln1(x)
    q = _heads(attn.q(h), attn.heads)  # (B, h, t, hd)
    k, v = attn.kv(h).chunk(2, dim=-1)
    k, v = _heads(k, attn.heads), _heads(v, attn.heads)  # (B, h, t, hd)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, h, S + t, hd)
    causal = x.shape[1] > 1  # one new query sees every cached key; several new ones need the causal mask
    if causal and past is not None:
        raise ValueError("block_step takes several new positions only without a cache (a prefill)")
    x = x + attn.out(_merge(attention(q, k, v, is_causal=causal)))
    if block.cross is not None and ctx is not None:
        cq = _heads(block.cross.q(block.ln_cross(x)), block.cross.heads)
        x = x + block.cross.out(_merge(attention(cq, *ctx)))
    return x + block.mlp(block.ln2(x)), (k, v)


class MultimodalDecoder(nn.Module):
    """Causal blocks with cross-attention to projected image tokens, then the vocabulary head."""

    def __init__(self, cfg: DecoderConfig, text_width: int, vision_width: int, image_tokens: int, vocab: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(text_width, cfg.width) if text_width != cfg.width else nn.Identity()
        self.image_proj = nn.Linear(vision_width, cfg.width)
        self.image_pos_embedding = nn.Parameter(torch.randn(image_tokens, cfg.width) * 0.02)
        self.image_ln = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout, cross_attention=True, context_dim=cfg.width)
            for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab, bias=False)

    def encode_image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image tower tokens (B, N, Dv) → decoder context (B, N, D), with a learned position per token."""
        if image_tokens.shape[1] != self.image_pos_embedding.shape[0]:
            raise ValueError(
                f"the image tower gave {image_tokens.shape[1]} tokens but the decoder was built for "
                f"{self.image_pos_embedding.shape[0]}; feed images of the configured vision.image_size"
            )
        return self.image_ln(self.image_proj(image_tokens) + self.image_pos_embedding)

    def forward(self, text_tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for text tokens (B, T, Dt) from the unimodal layers."""
        x = self.in_proj(text_tokens)  # (B, T, D)
        for blk in self.blocks:
            x = blk(x, is_causal=True, context=context)
        return self.head(self.ln_final(x))


class DecodeState:
    """What generation carries between steps: the image context and, with ``use_cache``, the key/value caches."""

    def __init__(self, context: torch.Tensor, ctx_kv: list[KV] | None, use_cache: bool) -> None:
        self.context = context  # (B, N, D)
        self.ctx_kv = ctx_kv  # per decoder block, (B, h, N, hd) keys and values
        self.use_cache = use_cache
        self.past: list[KV] | None = None  # per self-attention layer (text tower, then decoder)

    def select(self, index: torch.Tensor) -> DecodeState:
        """Keep / repeat / reorder batch rows (beam search); index (B',)."""
        out = DecodeState(
            self.context[index], [(k[index], v[index]) for k, v in self.ctx_kv] if self.ctx_kv else None, self.use_cache
        )
        out.past = [(k[index], v[index]) for k, v in self.past] if self.past is not None else None
        return out


class CoCa(CLIP):
    """Contrastive captioner: ``forward`` adds ``caption_logits`` (B, T-1, V) to the dual encoder's outputs."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.decoder is None:
            raise ValueError("CoCa needs model.decoder (a DecoderConfig); without one build a CLIP")
        if cfg.text.arch != "transformer" or not cfg.text.causal:
            raise ValueError(
                "CoCa decodes with the text tower's layers, so it needs text.arch='transformer' and text.causal=true"
            )
        super().__init__(cfg)
        n_tokens = self._count_image_tokens()
        self.decoder = MultimodalDecoder(cfg.decoder, self.text.width, self.visual.width, n_tokens, cfg.text.vocab_size)

    def _count_image_tokens(self) -> int:
        v = self.cfg.vision
        was = self.visual.training
        self.visual.eval()
        with torch.no_grad():
            n = self.visual.forward_tokens(torch.zeros(1, v.channels, v.image_size, v.image_size)).shape[1]
        self.visual.train(was)
        return n

    # --- training ----------------------------------------------------------------------------------------------
    def _pooled_image(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.visual.pools_token_mean:  # its pooled feature is the mean of its tokens: no second pass
            return tokens.mean(dim=1)
        return self.visual(images)

    def forward(self, images: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"logit_scale": self.get_logit_scale()}
        img_tokens = txt = None
        if images is not None:
            img_tokens = self.visual.forward_tokens(images)  # (B, N, Dv)
            out["image_features"] = F.normalize(self.image_proj(self._pooled_image(images, img_tokens)), dim=-1)
        if text is not None:
            txt, valid = self.text.forward_tokens(text)  # (B, T, Dt)
            out["text_features"] = F.normalize(self.text_proj(self.text.pool(txt, valid)), dim=-1)
        if img_tokens is not None and txt is not None:
            # position t predicts token t+1: causal layers never look ahead, so the last position is simply dropped
            out["caption_logits"] = self.decoder(txt[:, :-1], self.decoder.encode_image(img_tokens))  # (B, T-1, V)
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def caption_logits(
        self, images: torch.Tensor, text: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced logits (B_t, T-1, V) of texts (B_t, T) about images (B_i, C, H, W), decoder only.

        ``image_index`` (B_t,) names each text's image (default one to one), for images with many texts (the
        questions of a VQA scene): each image runs through the image tower once and its cross-attention keys and
        values are projected once, each distinct text runs through the text tower once. The logits equal
        ``forward``'s on the repeated images. No contrastive features are computed.
        """
        context = self.decoder.encode_image(self.visual.forward_tokens(images))  # (B_i, N, D)
        if image_index is None or self.decoder.cfg.dropout > 0:  # dropout: keep Block.forward's own dropout
            txt, _ = self.text.forward_tokens(text)  # (B_t, T, Dt)
            ctx = context if image_index is None else context[image_index]  # (B_t, N, D)
            return self.decoder(txt[:, :-1], ctx)  # (B_t, T-1, V)
        uniq, inverse = torch.unique(text[:, :-1], dim=0, return_inverse=True)  # the last token predicts nothing
        txt, _ = self.text.forward_tokens(uniq)  # (U, T-1, Dt)
        x = self.decoder.in_proj(txt[inverse])  # (B_t, T-1, D)
        for blk in self.decoder.blocks:
            k, v = context_kv(blk, context)  # (B_i, h, N, hd): once per image
            x, _ = block_step(blk, x, None, (k[image_index], v[image_index]))  # causal over the T-1 positions
        return self.decoder.head(self.decoder.ln_final(x))  # (B_t, T-1, V)

    # --- generation --------------------------------------------------------------------------------------------
    def start_decoding(self, images: torch.Tensor, use_cache: bool = True) -> DecodeState:
        """Encode normalised images (B, C, H, W) once for generation."""
        context = self.decoder.encode_image(self.visual.forward_tokens(images))  # (B, N, D)
        ctx_kv = [context_kv(blk, context) for blk in self.decoder.blocks] if use_cache else None
        return DecodeState(context, ctx_kv, use_cache)

    def next_logits(self, state: DecodeState, prefix: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the token after ``prefix`` (B, t); with a cache only its last token is computed.

        The first call on a fresh state may pass any number of tokens (begin token plus a prompt): they are read in
        one causal pass that fills the cache; later calls add one token each.
        """
        t = prefix.shape[1]
        if t > self.cfg.text.context_length:
            raise ValueError(f"cannot decode past the text context of {self.cfg.text.context_length} tokens")
        if not state.use_cache:
            txt, _ = self.text.forward_tokens(prefix)
            return self.decoder(txt, state.context)[:, -1]
        first = state.past is None
        new = prefix if first else prefix[:, -1:]  # the whole prefix once, then one token per step
        x = self.text.token_embedding(new) + self.text.positional_embedding[t - new.shape[1] : t]  # (B, t', Dt)
        past = state.past or [None] * (len(self.text.transformer.blocks) + len(self.decoder.blocks))
        cache: list[KV] = []
        for i, blk in enumerate(self.text.transformer.blocks):
            x, kv = block_step(blk, x, past[i])
            cache.append(kv)
        x = self.decoder.in_proj(self.text.ln_final(x))
        offset = len(self.text.transformer.blocks)
        for j, blk in enumerate(self.decoder.blocks):
            x, kv = block_step(blk, x, past[offset + j], state.ctx_kv[j])
            cache.append(kv)
        state.past = cache
        return self.decoder.head(self.decoder.ln_final(x[:, -1]))  # (B, V)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, **kw) -> torch.Tensor:
        """Caption token ids (B, L) without the begin token, ``eos_id`` then padding; see ``vislang.decoding``."""

        return generate(self, images, **kw)
