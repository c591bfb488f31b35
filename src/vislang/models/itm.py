"""Image–text matching (ITM): a dual encoder whose towers also feed a fusion module and a binary match head (ALBEF).

One model, two objectives on one forward pass (task "itm"): the contrastive loss on the pooled, projected features
(ITC) and a cross-entropy on fused (image, text) pairs (ITM). The ITM negatives are hard ones, drawn from the batch by
their contrastive similarity (``losses.sample_hard_negatives``: never the image's own caption or an identical one;
under DDP from the batches of all ranks), so
the head learns exactly the distinctions the dual encoder still gets wrong: "a red circle and a blue square" against
"a blue circle and a red square". At test time the head re-ranks the dual encoder's top-k (``evaluation/rerank.py``):
cheap retrieval over everything, the costly pairwise scorer on a short list only (ALBEF, BLIP).

The fusion is any of ``models/fusion.py`` (``model.itm.fusion.kind``); cross-attention, the default, lets each text
token look at the image patches it names. A saved ITM model is a dual-encoder model directory whose ``config.json`` has
``model_type`` "vislang-itm" and a ``model.itm`` section, so every dual-encoder command (eval, embed, index, serve)
works on it and ``vislang.from_pretrained`` returns an ``ITMModel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as vdist
from ..losses import sample_hard_negatives
from .clip import CLIP, ModelConfig
from .fusion import build_fusion
from .towers import CompactCNN


def trim_padding(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop the trailing token columns that are padding in every row: the fusion's cost grows with their number, and
    no tower output at a valid position depends on padding after it."""
    keep = int((ids != pad_id).sum(1).max().clamp(min=1)) if ids.numel() else 1
    return ids[:, :keep]


def itm_pairs(rows: torch.Tensor, neg_text: torch.Tensor, neg_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, 2) (image row, text row) pairs and their (P,) labels: the B positives ``rows`` first (label 1), then each
    image with its negative text, then each negative image with its text (label 0); -1 negatives are left out."""
    has_t, has_i = neg_text >= 0, neg_image >= 0
    pair_image = torch.cat([rows, rows[has_t], neg_image[has_i]])
    pair_text = torch.cat([rows, neg_text[has_t], rows[has_i]])
    labels = torch.zeros(pair_image.shape[0], dtype=torch.long, device=rows.device)
    labels[: rows.shape[0]] = 1
    return torch.stack([pair_image, pair_text], dim=1), labels


class ITMModel(CLIP):
    """Dual encoder + fusion + binary match head. ``forward(images, text, itm=True)`` adds the ITM pairs' logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.itm is None:
            raise ValueError(
                "an ITM model needs model.itm (an ITMConfig, e.g. itm: {} in YAML); without one build a CLIP"
            )
        super().__init__(cfg)
        self.fusion = build_fusion(cfg.itm.fusion, self.visual.width, self.text.width)
        self.itm_head = nn.Linear(cfg.itm.fusion.dim, 2)  # logits of (no match, match)

    # --- features ----------------------------------------------------------------------------------------------
    def _image_tokens_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (B, N, Dv) and normalised image embeddings (B, E) from one pass where the tower allows."""
        tokens = self.visual.forward_tokens(images)  # (B, N, Dv)
        pooled = tokens.mean(dim=1) if isinstance(self.visual, CompactCNN) else self.visual(images)  # (B, Dv)
        return tokens, F.normalize(self.image_proj(pooled), dim=-1)

    def _text_tokens_and_features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text tokens (B, T, Dt), their validity mask (B, T) and normalised text embeddings (B, E)."""
        tokens, valid = self.text.forward_tokens(ids)
        return tokens, valid, F.normalize(self.text_proj(self.text.pool(tokens, valid)), dim=-1)

    def encode_image_and_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings (B, E) and tokens (B, N, Dv): what re-ranking keeps per gallery image."""
        tokens, emb = self._image_tokens_and_features(images)
        return emb, tokens

    # --- matching ----------------------------------------------------------------------------------------------
    def itm_logits(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_valid: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(P, 2) no-match/match logits for P texts (P, T, Dt); ``image_index`` (P,) picks each text's image among
        ``image_tokens`` (B_img, N, Dv) (default: one to one), so an image's keys/values are computed once."""
        return self.itm_head(self.fusion(image_tokens, text_tokens, text_valid, image_index))

    def match_score(
        self, images: torch.Tensor, ids: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Match log-odds (P,) of texts ``ids`` (P, T) with normalised ``images``; ``image_index`` as in itm_logits."""
        ids = trim_padding(ids, self.cfg.text.pad_id)
        tokens, valid = self.text.forward_tokens(ids)
        logits = self.itm_logits(self.visual.forward_tokens(images), tokens, valid, image_index)
        return logits[:, 1] - logits[:, 0]

    def forward(
        self, images: torch.Tensor | None = None, text: torch.Tensor | None = None, itm: bool = False
    ) -> dict[str, torch.Tensor]:
        """The dual encoder's outputs; with ``itm`` (and both inputs) also ``itm_logits`` (P, 2), ``itm_labels`` (P,)
        and ``itm_pairs`` (P, 2) (image row, text row) for the B positive pairs, then one hard-negative text per image
        and one hard-negative image per text.

        Identical captions in the batch are encoded once and count as positives of each other's images.
        """
        out: dict[str, torch.Tensor] = {"logit_scale": self.get_logit_scale()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        img_tokens = txt = None
        if images is not None:
            img_tokens, out["image_features"] = self._image_tokens_and_features(images)
        ids = text  # (B, T) as given: every rank's captions have this shape, so they can be gathered
        if text is not None:
            text = trim_padding(text, self.cfg.text.pad_id)
            uniq, inverse = torch.unique(text, dim=0, return_inverse=True)  # captions repeat across images
            txt, valid, feats = self._text_tokens_and_features(uniq)  # (U, T, Dt), (U, T), (U, E)
            out["text_features"] = feats[inverse]  # (B, E)
        if not itm:
            return out
        if img_tokens is None or txt is None:
            raise ValueError("itm=True needs both images and texts: the match head scores (image, text) pairs")
        B = img_tokens.shape[0]
        if inverse.shape[0] != B:
            raise ValueError(f"itm=True needs one text per image, got {B} images and {inverse.shape[0]} texts")
        if vdist.is_dist() and vdist.world_size() > 1:
            out.update(self._global_itm(images, ids, img_tokens, txt[inverse], valid[inverse], out))
            return out
        with torch.no_grad():
            sim = out["logit_scale"] * out["image_features"] @ out["text_features"].T  # (B, B)
            positive = inverse[:, None] == inverse[None, :]  # (B, B): same caption = a positive too
            neg_text, neg_image = sample_hard_negatives(sim, positive)  # (B,), (B,); -1 = none in this batch
        pairs, labels = itm_pairs(torch.arange(B, device=img_tokens.device), neg_text, neg_image)
        pair_image, pair_text = pairs.T  # (P,), (P,) batch rows of the images and the texts
        u = inverse[pair_text]  # (P,) rows of the unique texts
        out["itm_logits"] = self.itm_logits(img_tokens, txt[u], valid[u], pair_image)  # (P, 2)
        out["itm_labels"], out["itm_pairs"] = labels, pairs
        return out

    def _global_itm(
        self,
        images: torch.Tensor,
        ids: torch.Tensor,
        img_tokens: torch.Tensor,
        txt_tokens: torch.Tensor,
        txt_valid: torch.Tensor,
        out: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """ITM pairs with hard negatives drawn from the batches of all ranks (BLIP's way): a larger pool holds harder
        negatives, and a rank whose batch repeats one caption still gets some. The chosen images and captions come
        from every rank as pixels and token ids (no graph) and go through this rank's towers again, so the
        gradients stay on this rank and DDP averages them as usual. ``itm_pairs`` then holds rows of the gathered
        batch (rank r's item i at r·B + i)."""
        B = images.shape[0]
        ids = F.pad(ids, (0, self.cfg.text.context_length - ids.shape[1]), value=self.cfg.text.pad_id)

        def gather(t: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (W·B, ...), no graph
            return vdist.gather_tensor(t.detach(), gather_with_grad=False, keep_local_grad=False)

        with torch.no_grad():
            all_images, all_ids = gather(images), gather(ids)  # (W·B, C, H, W), (W·B, T)
            all_img_f, all_txt_f = gather(out["image_features"]), gather(out["text_features"])  # (W·B, E)
            same = (ids[:, None, :] == all_ids[None, :, :]).all(dim=-1)  # (B, W·B): the same caption is a positive
            scale = out["logit_scale"]
            neg_text = sample_hard_negatives(scale * out["image_features"] @ all_txt_f.T, same)[0]  # (B,) of W·B
            neg_image = sample_hard_negatives(scale * all_img_f @ out["text_features"].T, same.T)[1]  # (B,) of W·B
        has_t, has_i = neg_text >= 0, neg_image >= 0
        neg_ids = trim_padding(all_ids[neg_text[has_t]], self.cfg.text.pad_id)
        neg_txt_tokens, neg_txt_valid = self.text.forward_tokens(neg_ids)
        neg_img_tokens = self.visual.forward_tokens(all_images[neg_image[has_i]])
        logits = torch.cat(
            [
                self.itm_logits(img_tokens, txt_tokens, txt_valid),  # (B, 2): the positives
                self.itm_logits(img_tokens[has_t], neg_txt_tokens, neg_txt_valid),  # image + a wrong caption
                self.itm_logits(neg_img_tokens, txt_tokens[has_i], txt_valid[has_i]),  # a wrong image + the caption
            ]
        )
        rows = vdist.rank() * B + torch.arange(B, device=images.device)  # this rank's rows in the gathered batch
        pairs, labels = itm_pairs(rows, neg_text, neg_image)
        return {"itm_logits": logits, "itm_labels": labels, "itm_pairs": pairs}
