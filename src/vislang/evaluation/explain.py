"""Saliency maps: Grad-CAM on image–text similarity (dual encoders), cross-attention maps (fused VQA models).

Grad-CAM (Selvaraju et al. 2017) weights each channel of the image tower's last token map by the mean gradient of
the score and keeps the positive part: ``cam = relu(sum_d mean_n(dS/dA_nd) * A_nd)``. For a cross-attention VQA
model the map is the attention the question's tokens pay to each image token, averaged over blocks, heads and
tokens. Both come out as an (H, W) array in [0, 1] over the model's input image and as a PNG overlay.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.transforms import normalize, pil_to_array
from ..factory import from_pretrained, get_tokenizer
from ..model_dir import run_or_model_dir
from ..models.vqa import load_vqa


def _open_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"no image at {image}; give the path of a PNG or JPEG file") from None
    except Exception as e:
        raise ValueError(f"cannot read {image} as an image ({type(e).__name__}); give a PNG or JPEG file") from e


def tokens_to_grid(values: torch.Tensor) -> torch.Tensor:
    """(N,) per-token values → (side, side), dropping leading prefix (class) tokens of ViTs."""
    n = values.shape[0]
    side = math.isqrt(n)
    while side > 1 and n - side * side > 8:  # at most a few prefix tokens
        side -= 1
    return values[n - side * side :].reshape(side, side)


def grad_cam(tokens: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Grad-CAM over image tokens (1, N, D) for a scalar ``score`` computed from them: (N,) non-negative."""
    (grads,) = torch.autograd.grad(score, tokens)
    weights = grads.mean(dim=1, keepdim=True)  # (1, 1, D)
    return F.relu((tokens * weights).sum(-1))[0].detach()  # (N,)


def _pooled(visual, tokens: torch.Tensor) -> torch.Tensor:
    """The tower's pooled vector from its tokens (exact for the compact CNN and timm ViTs)."""
    model = getattr(visual, "model", None)
    if model is not None and tokens.ndim == 3 and hasattr(model, "forward_head") and hasattr(model, "cls_token"):
        return model.forward_head(tokens, pre_logits=True)
    return tokens.mean(dim=1)


def clip_saliency(model, tokenizer, image: Image.Image, text: str) -> np.ndarray:
    """Grad-CAM of the cosine similarity between the image and ``text`` for a dual encoder; (H, W) in [0, 1]."""
    v = model.cfg.vision
    arr = pil_to_array(image, v.image_size, v.channels, getattr(v, "fit", "crop"))  # as the model's preprocess does
    x = normalize(torch.from_numpy(arr).permute(2, 0, 1)[None], v.mean, v.std)
    model.eval()
    tokens = model.image_tokens(x).detach().requires_grad_(True)  # (1, N, D)
    pooled = _pooled(model.visual, tokens)
    if hasattr(model, "project_image"):  # the model's own map (a LiT caption memory adds dimensions)
        img = model.project_image(pooled)  # (1, E)
    else:
        img = F.normalize(model.image_proj(pooled), dim=-1)  # (1, E)
    with torch.no_grad():
        txt = model.encode_text(tokenizer([text]))  # (1, E)
    cam = grad_cam(tokens, (img * txt).sum())
    return _upsample(tokens_to_grid(cam), v.image_size)


def vqa_saliency(model, tokenizer, image: Image.Image, question: str) -> np.ndarray:
    """Cross-attention map (cross_attention fusion) or Grad-CAM of the top answer (other fusions); (H, W)."""
    v = model.cfg.vision
    x = normalize(torch.from_numpy(pil_to_array(image, v.image_size, v.channels)).permute(2, 0, 1)[None], v.mean, v.std)
    model.eval()
    ids = tokenizer([question])
    with torch.no_grad():
        txt, valid = model.encode_text(ids)
    if hasattr(model.fusion, "attention_maps"):
        with torch.no_grad():
            maps = model.fusion.attention_maps(model.encode_image(x), txt, valid)  # (1, depth, h, T, N)
        w = valid[0].float()  # (T,)
        cam = (maps[0].mean(dim=(0, 1)) * w[:, None]).sum(0) / w.sum()  # (N,)
    else:
        tokens = model.encode_image(x).detach().requires_grad_(True)
        logits = model.head(model.fusion(tokens, txt, valid))[0]
        cam = grad_cam(tokens, logits.max())
    return _upsample(tokens_to_grid(cam), v.image_size)


def _upsample(grid: torch.Tensor, size: int) -> np.ndarray:
    up = F.interpolate(grid[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    up = up - up.min()
    return (up / up.max().clamp(min=1e-12)).numpy()


def overlay(image: Image.Image, heat: np.ndarray, side: int = 256, alpha: float = 0.5) -> Image.Image:
    """The image (centre-cropped like the model saw it) with a jet-coloured heatmap blended on top."""
    import matplotlib  # here, not at the top: only the overlay needs it, and it is slow to import

    base = Image.fromarray(pil_to_array(image, side, 3))
    colours = matplotlib.colormaps["jet"](heat)[..., :3]  # (h, w, 3) in [0, 1]
    heat_img = Image.fromarray((colours * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    return Image.blend(base, heat_img, alpha)


def saliency(model_dir: str, image, text: str) -> np.ndarray:
    """The (H, W) saliency map of ``text`` on ``image`` for whichever model family ``model_dir`` holds."""
    text = " ".join(str(text).split())
    if not text:
        raise ValueError("the text is empty; give the caption or question to explain")
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a model directory (no config.json); train one first")
    kind = json.loads((d / "config.json").read_text()).get("model_type")
    pil = _open_image(image)
    if kind == "vislang-vqa":
        model, tok, _ = load_vqa(d)
        return vqa_saliency(model, tok, pil, text)
    return clip_saliency(from_pretrained(d), get_tokenizer(d), pil, text)


def explain(model_dir: str, image, text: str, out: str | None = None) -> Path:
    """Write the PNG overlay of ``saliency`` (and the map as .npy beside it) and return its path.

    Without ``out`` it goes beside the run, ``MODEL/../explain/IMAGE-NAME.png``, never into the working directory.
    """
    heat = saliency(model_dir, image, text)
    if out is None:
        stem = Path(image).stem if isinstance(image, (str, Path)) else "image"
        out = str(run_or_model_dir(model_dir).resolve().parent / "explain" / f"{stem}.png")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(_open_image(image), heat).save(path)
    np.save(path.with_suffix(".npy"), heat)
    return path
