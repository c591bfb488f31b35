"""Image preprocessing shared by data preparation, training and inference.

One function (:func:`pil_to_array`) decides how any PIL image becomes a square uint8 array, so that images prepared
once on disk and images fed to a served model go through exactly the same pixels. Normalisation is kept separate and
runs on tensors (possibly on the GPU), because prepared datasets store uint8 and normalise per batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

_MODES = {1: "L", 3: "RGB"}
ORIENTATION = 0x0112  # the EXIF tag holding how a photo is turned
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
# Below this size augmentation would delete too much of a tiny image (Fashion-MNIST is 28 px): keep it as is.
MIN_AUGMENT_SIZE = 32


def target_mode(channels: int) -> str:
    """PIL mode for a channel count; only 1 (grayscale) and 3 (RGB) exist in the models."""
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return _MODES[channels]


def has_transparency(img: Image.Image) -> bool:
    """True when the image carries alpha (directly or through a palette's transparency entry)."""
    return img.mode in _TRANSPARENT_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def upright(img: Image.Image) -> Image.Image:
    """The image as a person sees it: rotated/flipped by its EXIF orientation tag (phones store portrait photos
    sideways and set the tag). Call right after decoding, while the EXIF block is still attached."""
    try:
        if img.getexif().get(ORIENTATION, 1) == 1:
            return img  # nothing to turn: skip exif_transpose's copy
        return ImageOps.exif_transpose(img) or img
    except Exception:  # a malformed EXIF block is no reason to lose the photo: keep it as stored
        return img


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale ("I;16", "I", "F": scans, medical and astronomy images) as 8-bit "L".

    PIL's own conversion clips every value over 255 to white, so a 16-bit image came out almost blank; values are
    scaled instead (16-bit range → 0–255; float images in [0, 1] or [0, 255])."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    top = float(arr.max()) if arr.size else 0.0
    scale = 1.0 if top <= 255 else 65535.0 / 255 if top <= 65535 else top / 255
    if img.mode == "F" and 0 < top <= 1.0:
        scale = 1.0 / 255
    return Image.fromarray(np.clip(arr / scale, 0, 255).round().astype(np.uint8), mode="L")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert to "L" or "RGB", compositing transparent images on white.

    Clip-art is mostly transparent; converting RGBA straight to RGB would expose whatever colour the invisible pixels
    happen to store (often black), which turns a drawing into a black square. CMYK, palette, bilevel and YCbCr images
    convert with PIL; 16/32-bit grayscale is scaled to 8 bits (``to_8bit``).
    """
    mode = target_mode(channels)
    img = to_8bit(img)
    if has_transparency(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        img = background
    return img if img.mode == mode else img.convert(mode)


def center_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centred square inside a width×height image, as a PIL box (left, top, right, bottom)."""
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return left, top, left + side, top + side


def resize_box(img: Image.Image, box: tuple[float, float, float, float], image_size: int) -> Image.Image:
    """Resize ``box`` of ``img`` to image_size×image_size with bicubic filtering (no-op when nothing changes)."""
    if img.size == (image_size, image_size) and box == (0, 0, image_size, image_size):
        return img
    return img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def pad_to_square(img: Image.Image) -> Image.Image:
    """Letterbox onto a white square, for callers that prefer whole images to centre crops (``fit="pad"``)."""
    width, height = img.size
    side = max(width, height)
    if width == height:
        return img
    fill = 255 if img.mode == "L" else (255, 255, 255)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def image_to_array(img: Image.Image) -> np.ndarray:
    """PIL "L"/"RGB" image → writable uint8 (H, W, C) array, always with a channel axis.

    A copy (``np.array``) rather than a view: ``np.asarray`` of a PIL image is read-only, and torch warns when such an
    array becomes a tensor.
    """
    arr = np.array(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def pil_to_array(img: Image.Image, image_size: int, channels: int, fit: str = "crop") -> np.ndarray:
    """Any PIL image → uint8 (image_size, image_size, channels).

    The shorter side is resized to ``image_size`` (bicubic) and the centre is cropped, the same recipe CLIP-style
    models use at evaluation time.

    Args:
        img: the image, any mode; transparency is composited on white.
        image_size: output side in pixels.
        channels: 1 (grayscale) or 3 (RGB).
        fit: "crop" (default, centre crop) or "pad" (white letterbox, keeps the whole image).

    Returns:
        A C-contiguous uint8 array of shape (image_size, image_size, channels).
    """
    img = to_mode(img, channels)
    if fit == "pad":
        img = pad_to_square(img)
    elif fit != "crop":
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")
    img = resize_box(img, center_square_box(*img.size), image_size)
    return np.ascontiguousarray(image_to_array(img))


def _stats(values: Sequence[float], channels: int, like: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics as a (C, 1, 1) float tensor on ``like``'s device; one value broadcasts to all."""
    t = torch.as_tensor(list(values), dtype=torch.float32, device=like.device)
    if t.numel() not in (1, channels):
        raise ValueError(f"expected 1 or {channels} mean/std values, got {t.numel()}")
    return t.reshape(-1, 1, 1)


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) or (C, H, W) → float32 ``(x / 255 - mean) / std``.

    Kept apart from decoding so prepared uint8 batches can be normalised on the GPU after the (4× smaller) copy.
    A floating-point input is taken to be already scaled to [0, 1].
    """
    if images_uint8.ndim not in (3, 4):
        raise ValueError(f"expected (B, C, H, W) or (C, H, W), got shape {tuple(images_uint8.shape)}")
    x = images_uint8.float().div_(255.0) if images_uint8.dtype == torch.uint8 else images_uint8.float()
    channels = x.shape[-3]
    return (x - _stats(mean, channels, x)) / _stats(std, channels, x)  # out of place: float input stays untouched


def random_resized_box(
    width: int,
    height: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[float, float, float, float]:
    """A random crop box covering ``scale`` of the image area with aspect ratio in ``ratio`` (torchvision's recipe).

    Uses torch's RNG so DataLoader workers, which torch seeds differently, draw different crops.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = math.sqrt(target_area * aspect)
        h = math.sqrt(target_area / aspect)
        if 0 < w <= width and 0 < h <= height:
            left = (width - w) * u[2]
            top = (height - h) * float(torch.rand(1, generator=generator))
            return left, top, left + w, top + h
    return center_square_box(width, height)


class ImageTransform:
    """PIL image → normalised float tensor (C, H, W); the ``preprocess`` returned by ``create_model_and_transforms``.

    With ``train=True`` a light random-resized-crop (scale 0.8–1) is applied to images of at least 32 px. Tiny images
    (28 px Fashion-MNIST) are left untouched: cropping them removes a large share of the object.

    Args:
        image_size: output side in pixels.
        channels: 1 or 3.
        mean: per-channel mean (one value or ``channels`` values) in [0, 1] units.
        std: per-channel std, same convention.
        train: whether to augment.
        fit: "crop" (centre crop) or "pad" (white letterbox first, as ``pil_to_array``): what the model trained on.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = False,
        fit: str = "crop",
    ) -> None:
        target_mode(channels)
        if fit not in ("crop", "pad"):
            raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")
        self.fit = fit
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.train = bool(train)

    @property
    def augments(self) -> bool:
        """Whether this transform is random (train mode on an image size where cropping is safe)."""
        return self.train and self.image_size >= MIN_AUGMENT_SIZE

    def to_array(self, img: Image.Image) -> np.ndarray:
        """The uint8 (H, W, C) pixels before normalisation (random crop when augmenting)."""
        if not self.augments:
            return pil_to_array(img, self.image_size, self.channels, self.fit)
        img = to_mode(img, self.channels)
        if self.fit == "pad":
            img = pad_to_square(img)
        box = random_resized_box(*img.size)
        return np.ascontiguousarray(image_to_array(resize_box(img, box, self.image_size)))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Transform one image to a float32 (C, H, W) tensor."""
        arr = self.to_array(img)
        return normalize(torch.from_numpy(arr).permute(2, 0, 1), self.mean, self.std).contiguous()

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, channels={self.channels}, mean={self.mean}, "
            f"std={self.std}, train={self.train}, fit={self.fit!r})"
        )
