"""The training run as data: one frozen dataclass tree, read from YAML and overridden with dotted flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..config import apply_overrides, from_dict, load_file, to_dict
from ..data.config import DataConfig


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3  # peak learning rate after warmup
    weight_decay: float = 0.05  # AdamW decay (not applied to norms, biases, embeddings, temperature)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.02
    grad_clip: float | None = 1.0  # max global gradient norm; None to disable


@dataclass(frozen=True)
class GANConfig:
    """Settings of a text-conditioned GAN run (``task: gan``; trained by ``vislang.train.tasks.gan``)."""

    text_model: str = "runs/demo/model"  # trained dual encoder whose frozen text tower conditions G and D (make demo)
    model: dict[str, Any] = field(default_factory=dict)  # GANModelConfig overrides: --gan.model.arch=mlp
    loss: str = "hinge"  # hinge | bce (the non-saturating loss of the original GAN)
    lr_g: float = 2e-4  # generator Adam learning rate (constant until lr_decay_from)
    lr_d: float = 2e-4  # discriminator Adam learning rate (constant until lr_decay_from)
    lr_decay_from: float = 1.0  # both learning rates fall linearly to 0 from this fraction of the steps; 1 = constant
    betas: tuple[float, float] = (0.0, 0.9)  # Adam betas for both (SN-GAN's choice)
    d_steps: int = 1  # discriminator updates per generator update, each on its own batch (SN-GAN: 5, BigGAN: 2)
    matching_aware: float = 1.0  # weight of the "real image + wrong text counts as fake" term; 0 turns it off
    mismatch_max_cos: float = 0.9  # a caption counts as wrong (mismatch, text_match) only if its cosine is below this
    text_match: float = 0.0  # weight of the "which text of the batch is this image's" loss for D and G (projection D)
    mode_seeking: float = 0.0  # weight of MSGAN's diversity term (two noises, one text: different images); 0 = off
    spread_match: float = 0.0  # weight of a G term: D-feature spread per minibatch-std group like the real one's
    coverage: float = 0.0  # weight of a G term (IMLE): each of a few real images pulls the nearest of several fakes
    # (1 and 0.25 from a 9,500-step Fashion-MNIST run: no change in tracked FID-FM over 1,000 steps)
    coverage_candidates: int = 8  # coverage: fakes drawn per real image (same text), the nearest is pulled
    coverage_images: int = 16  # coverage: real images of each batch that pull (a random pick)
    r1: float = 0.0  # weight γ of R1 (Mescheder et al. 2018): γ/2 · E|∇x D(x, c)|² on real images; 0 = off
    # (Fashion-MNIST without spectral norm, γ 0.1 / 1: FID-FM 0.336 / 0.340 against 0.370 with it, 6,550 steps)
    r1_every: int = 1  # R1 on every k-th step only, weighted k× (StyleGAN2's lazy regularisation: k=4 ~halves its cost)
    relation_negatives: bool = False  # captions with their relation flipped (left↔right, above↔below) count as wrong
    augment: str = ""  # DiffAugment policy for every image D sees, e.g. "translation,cutout" (small data); ""=none
    group_by_label: bool = False  # order each batch by class label, so minibatch-std groups hold one class each
    ema_decay: float = 0.999  # EMA generator used for samples, eval and the saved model; 0 = no EMA copy
    standing_stats: int = 32  # batches of G's own outputs that reset the saved G's BatchNorm statistics; 0 = off
    judge: str | None = None  # fixed classifier (vislang finetune) that tracks FID-FM during training; None = off
    fid_every: int = 0  # steps between tracked FID-FM values (needs judge); 0 = only at the end when judge is set
    fid_images: int = 5000  # generated images per tracked FID-FM (equal per class), against the train split
    keep_best: bool = False  # save the EMA generator of the step with the lowest tracked FID-FM, not the last one
    sample_every: int = 500  # steps between sample grids (samples/step_NNNNNNN.png, fixed noise and prompts)
    sample_prompts: tuple[str, ...] = ()  # grid rows; () = "a photo of a {class}." per class, else first captions
    sample_per_prompt: int = 8  # grid columns (one fixed noise vector each)


@dataclass(frozen=True)
class VQATaskConfig:
    """Settings of a VQA run (``task: vqa``, the answer classifier, or ``vqa-gen``, the generative answerer).

    The model is ``model_name`` (vqa: a vislang-vqa config of model_configs/ or a JSON file; vqa-gen: a `vislang models`
    name, a decoder is added if it has none) with the ``model`` overrides; ``batch_size`` counts images per step (and
    process), every question about them comes along."""

    data: str = "shapes"  # "shapes" or a JSONL/CSV file of image, question, answer
    test_data: str | None = None  # file for evaluation (shapes: the test split)
    image_dir: str | None = None  # where relative image paths of the files resolve (default: the file's folder)
    n_train: int = 3000  # shapes: training scenes
    n_test: int = 500  # shapes: test (and holdout) scenes
    max_answer_tokens: int = 6  # vqa-gen: most tokens generated per answer, the end token included


@dataclass(frozen=True)
class LiTConfig:
    """Settings of a locked-tower run (``task: lit``): the towers run once into a feature cache, the projections and
    the temperature train on it (``vislang.train.tasks.lit``)."""

    cache_dir: str = ".cache/vislang/features"  # where tower outputs are cached (keyed by weights, preprocessing, data)
    chunk: int = 1024  # items per resumable extraction chunk (a killed extraction redoes at most one)
    extract_batch: int = 64  # images per tower call during extraction
    workers: int = 2  # DataLoader processes decoding images during extraction
    fit: str = "crop"  # how a photo becomes a square: "crop" (shorter side, centre crop) or "pad" (white letterbox)
    val_fraction: float = 0.1  # share of the training pairs held back to pick the best epoch; 0 = keep the last
    val_by: str = "pair"  # what is held back: "pair" (random pairs) or "caption" (whole captions: none of them occurs
    # in the kept pairs, as in a held-out split where most captions are new; random pairs share captions and
    # near-identical drawings with the kept ones and score far above such a split)
    memory_all: bool = True  # with model.memory: once the best epoch is chosen on the held-back pairs, refill the
    # memory with every training pair (held-back ones too) before the test split and saving: refit on everything
    # once the recipe is fixed; the held-back captions become captions the served model can recall
    train_threads: int | None = 1  # torch threads while training the small heads (None: leave as is)
    feature_dropout: float = 0.0  # dropout on the cached features while training (regularises; the model has none)
    same_caption: str = "negative"  # pairs of a batch sharing a caption: "negative" (CLIP: only the own pair
    # matches) or "positive" (they match each other; captions repeat in tagged collections such as OpenClipart)
    unlock_last_image: int = 0  # also train the image tower's last N blocks (cache: the first one's input); CLI
    # shorthand --unlock-last N
    unlock_lr_scale: float = 0.1  # learning rate of the unlocked blocks, as a share of optim.lr (they are pretrained)


@dataclass(frozen=True)
class TrainConfig:
    model_name: str = "fmnist-cnn"  # a built-in config (`vislang.list_models()`), a config .json or a model directory
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the model config: --model.vision.width=48
    pretrained: str | None = None  # start from this model directory's weights
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: str = "contrastive"  # what the run trains: a key of vislang.train.tasks.TASKS
    loss: str = "clip"  # "clip" (softmax InfoNCE) or "siglip" (sigmoid)
    relation_negatives: float = 0.0  # weight of "caption vs its relation flipped" (left↔right, above↔below); 0 = off
    local_loss: bool = False  # DDP: local-vs-global logits instead of global-vs-global (less memory)
    gather_with_grad: bool = True  # DDP: gradients flow through the gathered features (exact global-batch loss)
    epochs: float = 5.0  # passes over the training set (fractions allowed)
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs for the schedule)
    time_budget_min: float | None = None  # sets the schedule length from measured speed so training ends in time
    batch_size: int = 256  # per process, per micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step (effective batch = batch_size * accum * world)
    precision: str = "auto"  # auto (bf16 autocast where the device has native bf16 and a cached trial says it pays;
    # else fp32: vislang.precision) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the dual encoder's training forward (contrastive tasks); compiles on step 1
    device: str = "auto"  # auto | cpu | cuda | cuda:1
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None = torch's choice. 1 is faster on a CPU other jobs share
    dedupe_text: bool = True  # encode each distinct caption of a batch once (same gradients, less work)
    precise_bn: int = 2048  # training images whose BatchNorm statistics replace the running averages before each
    # evaluation and the saved model (dual encoders with BatchNorm in the image tower); 0 = keep the running averages
    log_every: int = 50  # steps between metric lines / progress updates
    eval_every: int = 0  # steps between evaluations; 0 = at the end of each epoch
    save_every: int = 500  # steps between checkpoints (also at each epoch end and at the end)
    eval_max: int = 2000  # images used by periodic evaluation (the final `vislang eval` uses all)
    out_dir: str = "runs/default"  # checkpoints/, metrics.jsonl, model/, eval/, report.html
    progress: bool = True  # show a progress bar
    gan: GANConfig | None = None  # task "gan": the GAN's settings (None for every other task)
    vqa: VQATaskConfig | None = None  # tasks "vqa" and "vqa-gen": data and answer settings
    lit: LiTConfig | None = None  # task "lit": the feature cache and the held-back split


# The old flat VQA run configs (still read: ``flat_vqa_config``, ``load_vqa_train_config``, ``load_vqa_gen_config``).
@dataclass(frozen=True)
class VQATrainConfig:
    model: str = "shapes-vqa"  # a VQA config name (model_configs/, model_type vislang-vqa) or a JSON path
    overrides: tuple[str, ...] = ()  # dotted model overrides: "fusion.kind=gated"
    data: str = "shapes"  # "shapes" or a JSONL/CSV file of image, question, answer
    test_data: str | None = None  # file for evaluation (shapes: the test split)
    image_dir: str | None = None  # where relative image paths of the files resolve (default: the file's folder)
    n_train: int = 3000  # shapes: training scenes
    n_test: int = 500  # shapes: test (and holdout) scenes
    epochs: int = 6
    batch_images: int = 32  # images per step; all their questions come along
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50, weight_decay=0.05))
    time_budget_s: float | None = None  # stop training after this many seconds (a fair budget in ablations)
    out_dir: str = "runs/vqa"
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's default)


@dataclass(frozen=True)
class VQAGenConfig(VQATrainConfig):
    model: str = "shapes-cnn"  # a model config name (`vislang models`) or JSON; a decoder is added if it has none
    overrides: tuple[str, ...] = ()  # dotted model-config overrides: "decoder.layers=2", "vision.image_size=32"
    max_answer_tokens: int = 6  # most tokens generated per answer, the end token included
    out_dir: str = "runs/vqa-gen"


RunConfig = TypeVar("RunConfig")


def load_flat_run_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...], task: str, cls: type[RunConfig]
) -> RunConfig:
    """An old flat run config file of ``task`` (``vqa``, ``vqa-gen``) plus ``key=value`` overrides, as dataclass
    ``cls``; a file of another task is a clear error."""
    data = load_file(path) if path else {}
    if overrides:
        data = apply_overrides(data, list(overrides))
    got = data.pop("task", task)
    if got != task:
        raise ValueError(f"this run config needs task: {task}, got task: {got!r}")
    if isinstance(data.get("overrides"), list):
        data["overrides"] = tuple(data["overrides"])
    return from_dict(cls, data)


def load_vqa_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> VQATrainConfig:
    """A flat VQA run config (YAML/JSON with ``task: vqa``) plus ``key=value`` overrides, as ``VQATrainConfig``.

    ``task`` only routes the file here; every other key is a ``VQATrainConfig`` field (``overrides`` lists dotted
    model-config changes, e.g. ``fusion.kind=gated``). ``load_train_config`` reads the same files as a
    ``TrainConfig``."""
    return load_flat_run_config(path, overrides, "vqa", VQATrainConfig)


def load_vqa_gen_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> VQAGenConfig:
    """A flat generative VQA run config (``task: vqa-gen``) plus ``key=value`` overrides, as ``VQAGenConfig``."""
    return load_flat_run_config(path, overrides, "vqa-gen", VQAGenConfig)


def vqa_defaults(task: str) -> dict[str, Any]:
    """The ``TrainConfig`` values a VQA run starts from: the old ``VQATrainConfig`` / ``VQAGenConfig`` defaults."""
    return {
        "model_name": "shapes-vqa" if task == "vqa" else "shapes-cnn",
        "epochs": 6,
        "batch_size": 32,
        "optim": {"lr": 1e-3, "warmup_steps": 50, "weight_decay": 0.05},
        "log_every": 20,
        "out_dir": "runs/vqa" if task == "vqa" else "runs/vqa-gen",
        "vqa": {},
    }


# TrainConfig values a task starts from where the trainer's defaults do not suit it; file and overrides apply on top.
DEFAULTS: dict[str, dict[str, Any]] = {"vqa": vqa_defaults("vqa"), "vqa-gen": vqa_defaults("vqa-gen")}


def to_train_config(cfg: Any, task: str, progress: bool = True) -> TrainConfig:
    """A ``VQATrainConfig`` / ``VQAGenConfig`` (the old flat run config) as the ``TrainConfig`` of the one loop."""
    vqa = {k: getattr(cfg, k) for k in ("data", "test_data", "image_dir", "n_train", "n_test")}
    if hasattr(cfg, "max_answer_tokens"):
        vqa["max_answer_tokens"] = cfg.max_answer_tokens
    data = {
        "task": task,
        "model_name": cfg.model,
        "model": apply_overrides({}, list(cfg.overrides)),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_images,
        "optim": to_dict(cfg.optim),
        "time_budget_min": cfg.time_budget_s / 60 if cfg.time_budget_s else None,
        "out_dir": cfg.out_dir,
        "seed": cfg.seed,
        "threads": cfg.threads,
        "log_every": 20,
        "progress": progress,
        "vqa": vqa,
    }
    return from_dict(TrainConfig, data)


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML/JSON run config (or the defaults) and apply ``key.sub=value`` overrides.

    The run's task (``task:``) may bring defaults of its own (``DEFAULTS``: a VQA run's learning rate and
    output folder); the file and the overrides apply on top of them."""
    data = load_file(path) if path else {}
    if overrides:
        data = apply_overrides(data, overrides)
    task = data.get("task", TrainConfig.task)
    if task in ("vqa", "vqa-gen") and is_flat_vqa_config(data):
        return flat_vqa_config(data)
    if task in ("vqa", "vqa-gen") and isinstance(data.get("overrides"), list):  # the old --overrides='["a.b=1"]'
        data = dict(data)
        data["model"] = apply_overrides(data.get("model") or {}, data.pop("overrides"))
    base = DEFAULTS.get(task, {})
    if base:
        data = apply_overrides(base, data)
    return from_dict(TrainConfig, data)


FLAT_VQA_KEYS = {"batch_images", "n_train", "n_test", "test_data", "image_dir", "time_budget_s"}


def is_flat_vqa_config(data: dict[str, Any]) -> bool:
    """Whether a VQA run config has the old flat shape (``VQATrainConfig`` fields: ``model: shapes-vqa``,
    ``overrides: [...]``, ``batch_images``) rather than ``TrainConfig``'s (``model_name``, ``model: {}``, ``vqa:``)."""
    flat = bool(FLAT_VQA_KEYS & set(data)) or isinstance(data.get("model"), str) or isinstance(data.get("data"), str)
    return flat or ("overrides" in data and "model_name" not in data and "vqa" not in data)


def flat_vqa_config(data: dict[str, Any]) -> TrainConfig:
    """An old flat VQA run config (still accepted) as the ``TrainConfig`` of the one loop."""

    data = dict(data)
    task = data.pop("task")
    if isinstance(data.get("overrides"), list):
        data["overrides"] = tuple(data["overrides"])
    cls = VQAGenConfig if task == "vqa-gen" else VQATrainConfig
    progress = data.pop("progress", True)
    return to_train_config(from_dict(cls, data), task, progress)
