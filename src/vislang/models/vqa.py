"""Visual question answering as answer classification: image tower + question tower + fusion + MLP answer head.

Several questions usually share one image, so ``forward`` takes the images once and an ``image_index`` that maps
each question to its image: the image tower runs once per image, not once per question.

A saved VQA model directory holds ``config.json`` (model_type "vislang-vqa"), ``model.safetensors``, the question
tokenizer and ``answers.json`` (the answer vocabulary, in class order).

The other VQA head is generative: a CoCa captioner saved as a normal CoCa model directory whose ``config.json`` also
holds a ``"vqa"`` entry (``GENERATIVE_KEY``; see ``vislang.models.vqa_generative``). ``vqa_head`` tells the two
apart, so a command given either directory can dispatch.

``ClassifierAnswerer`` answers one question at a time (``vislang vqa``, the server); ``clean_question`` and
``image_tensor`` are the input checks both heads share. ``models.vqa_generative.load_answerer`` picks the head of a
directory; it lives there because loading the generative head goes through ``vislang.factory``, which sits above this
module (the registry imports it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ..config import from_dict, to_dict
from ..data.transforms import normalize, pil_to_array
from ..evaluation.vqa_metrics import normalize_answer
from ..model_dir import __version__, atomic_dir, write_weights
from ..tokenizers import load_tokenizer
from .fusion import FusionConfig, build_fusion
from .int8_io import is_int8, load_int8_state
from .towers import TextConfig, VisionConfig, build_text_tower, build_vision_tower

MODEL_TYPE = "vislang-vqa"
ANSWERS_FILE = "answers.json"
GENERATIVE_KEY = "vqa"  # config.json entry that marks a CoCa model directory as a generative question answerer


@dataclass(frozen=True)
class VQAConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    num_answers: int = 2  # answer classes; set from the training answer vocabulary
    head_hidden: int = 256  # hidden width of the answer MLP
    head_dropout: float = 0.1


class VQAModel(nn.Module):
    def __init__(self, cfg: VQAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = build_vision_tower(cfg.vision)
        self.text = build_text_tower(cfg.text)
        self.fusion = build_fusion(cfg.fusion, self.visual.width, self.text.width)
        self.head = nn.Sequential(
            nn.Linear(cfg.fusion.dim, cfg.head_hidden),
            nn.GELU(),
            nn.Dropout(cfg.head_dropout),
            nn.Linear(cfg.head_hidden, cfg.num_answers),
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens (B_img, N, Di)."""
        return self.visual.forward_tokens(images)

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Question tokens (B, T, Dt) and their validity mask (B, T)."""
        return self.text.forward_tokens(tokens)

    def fuse(self, images: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Fused (B, dim) for B questions; ``image_index`` (B,) picks each question's image (default: one to one)."""
        img = self.encode_image(images)  # (B_img, N, Di)
        valid_len = int((tokens != self.cfg.text.pad_id).sum(1).max().clamp(min=1))
        tokens = tokens[:, :valid_len]  # drop columns that are padding in every row
        uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)  # questions repeat across images
        txt, valid = self.encode_text(uniq)  # (U, T, Dt), (U, T)
        return self.fusion(img, txt[inverse], valid[inverse], image_index)  # (B, dim)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        fused = self.fuse(images, tokens, image_index)
        return {"fused": fused, "logits": self.head(fused)}  # (B, dim), (B, num_answers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim < 2 or "embedding" in n}


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_vqa(model: VQAModel, directory: str | os.PathLike, tokenizer, answers: list[str], extra: dict | None = None):
    """Write the model directory atomically (temp folder, then rename)."""
    if len(answers) != model.cfg.num_answers:
        raise ValueError(f"{len(answers)} answers for a head of {model.cfg.num_answers} classes")
    meta = {"model_type": MODEL_TYPE, "vislang_version": __version__, "model": to_dict(model.cfg), **(extra or {})}
    with atomic_dir(directory) as tmp:
        write_weights(tmp, meta, model)
        tokenizer.save(tmp)
        (tmp / ANSWERS_FILE).write_text(json.dumps(list(answers)))
    return Path(directory)


def vqa_head(directory: str | os.PathLike) -> str | None:
    """``"classifier"``, ``"generative"`` or None (not a VQA model directory), read from its ``config.json``."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("model_type") == MODEL_TYPE:
        return "classifier"
    if isinstance(meta.get(GENERATIVE_KEY), dict) and meta.get("model", {}).get("decoder") is not None:
        return "generative"
    return None


def load_vqa(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, tokenizer, answers)`` from a directory written by ``save_vqa``."""
    d = Path(directory)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{d} is not a VQA model directory (needs config.json, model.safetensors, answers.json); "
            "train one with `vislang ablate-fusion` or vislang.train.tasks.vqa.train_vqa"
        )
    meta = json.loads((d / "config.json").read_text())
    if vqa_head(d) == "generative":
        raise ValueError(
            f"{d} holds a generative VQA model (a captioner); load it with "
            "vislang.models.vqa_generative.load_generative_vqa, or ask it with `vislang vqa`"
        )
    if meta.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{d} holds a {meta.get('model_type')!r} model, not a VQA model ({MODEL_TYPE!r})")
    model = VQAModel(from_dict(VQAConfig, meta["model"], "model"))
    state = load_file(str(d / "model.safetensors"))
    comp = meta.get("compression") or {}
    if is_int8(meta, device, str(d)):  # `vislang compress`: the int8 modules are rebuilt, then filled
        model = load_int8_state(model, state, comp, str(d))
    else:
        model.load_state_dict(state)
    answers = json.loads((d / ANSWERS_FILE).read_text())
    return model.to(device).eval(), load_tokenizer(d), answers


# ------------------------------------------------------------------------------------------------------- answering


def clean_question(question: str) -> str:
    """The question with its whitespace collapsed; a clear error for an empty one."""
    question = " ".join(str(question).split())
    if not question:
        raise ValueError('the question is empty; ask something about the image, e.g. "what colour is the circle?"')
    return question


def image_tensor(image, vision) -> torch.Tensor:
    """One image (path or PIL image) as uint8 pixels (1, C, H, W) at the model's size; clear errors for bad files."""
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except FileNotFoundError:
            raise FileNotFoundError(f"no image at {image}; give the path of a PNG or JPEG file") from None
        except Exception as e:
            raise ValueError(f"cannot read {image} as an image ({type(e).__name__}); give a PNG or JPEG file") from e
    return torch.from_numpy(pil_to_array(image, vision.image_size, vision.channels)).permute(2, 0, 1)[None]


class ClassifierAnswerer:
    """An answer-classifier VQA directory, loaded once, ready to answer one question at a time (the CLI and the
    server share it; ``vqa_generative.GenerativeAnswerer`` is its generative twin)."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu") -> None:
        self.model, self.tokenizer, self.answers = load_vqa(model_dir, device)
        self.device = device

    @torch.no_grad()
    def answer(self, image, question: str, top_k: int = 1) -> list[tuple[str, float]]:
        """``[(answer, probability), ...]``, the ``top_k`` most probable training answers, best first."""
        question = clean_question(question)
        n_tokens = len(self.tokenizer.encode_ids([question])[0]) + 2  # + begin and end tokens
        if n_tokens > self.tokenizer.context_length:
            raise ValueError(
                f"the question has {n_tokens} tokens but the model reads at most {self.tokenizer.context_length}; "
                "ask a shorter question"
            )
        v = self.model.cfg.vision
        x = normalize(image_tensor(image, v), v.mean, v.std).to(self.device)
        probs = self.model(x, self.tokenizer([question]).to(self.device))["logits"][0].softmax(-1)  # (A,)
        p, k = probs.topk(min(top_k, len(self.answers)))
        return [(self.answers[i], float(q)) for q, i in zip(p.tolist(), k.tolist())]


def check_known_answer(answer: str, answers: list[str]) -> int:
    """Index of ``answer`` in the training vocabulary; a clear error when training never saw it."""
    a = normalize_answer(answer)
    if a not in answers:
        raise ValueError(
            f"the answer {answer!r} never appeared in training, so the model cannot give it; it knows "
            f"{len(answers)} answers, e.g. {', '.join(answers[:8])}"
        )
    return answers.index(a)
