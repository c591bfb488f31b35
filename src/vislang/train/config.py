"""The training run as data: one frozen dataclass tree, read from YAML and overridden with dotted flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import apply_overrides, from_dict, load_file


@dataclass(frozen=True)
class DataConfig:
    train: str = (
        "fashion-mnist"  # dataset: fashion-mnist | shapes | openclipart | a .csv/.tsv/.jsonl/.json, folder, shards
    )
    val: str | None = None  # evaluation dataset; None = the same source as train
    train_split: str = "train"
    val_split: str = "test"
    img_key: str = "filepath"  # CSV/JSONL column with the image path (OpenCLIP's --csv-img-key)
    caption_key: str = "caption"  # CSV/JSONL column with the caption (OpenCLIP's --csv-caption-key)
    image_dir: str | None = None  # COCO captions: the folder of images
    cache_dir: str = (
        ".cache/vislang/prepared"  # decoded, resized images as memory-mapped arrays (see `vislang prepare`)
    )
    max_train: int | None = None  # use only the first N training pairs (smoke runs, quick experiments)
    max_val: int | None = None  # evaluate on only the first N pairs
    num_workers: int = 0  # DataLoader worker processes; 0 suits memory-mapped small images
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the dataset reader


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
    """Settings of a text-conditioned GAN run (``task: gan``; trained by ``vislang.generate.train``)."""

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
class TrainConfig:
    model_name: str = "fmnist-cnn"  # a built-in config (`vislang.list_models()`), a config .json or a model directory
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the model config: --model.vision.width=48
    pretrained: str | None = None  # start from this model directory's weights
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: str = "contrastive"  # what the run trains: a key of vislang.train.tasks.TASKS (or "gan", its own loop)
    loss: str = "clip"  # "clip" (softmax InfoNCE) or "siglip" (sigmoid)
    relation_negatives: float = 0.0  # weight of "caption vs its relation flipped" (left↔right, above↔below); 0 = off
    local_loss: bool = False  # DDP: local-vs-global logits instead of global-vs-global (less memory)
    gather_with_grad: bool = True  # DDP: gradients flow through the gathered features (exact global-batch loss)
    epochs: float = 5.0  # passes over the training set (fractions allowed)
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs for the schedule)
    time_budget_min: float | None = None  # sets the schedule length from measured speed so training ends in time
    batch_size: int = 256  # per process, per micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step (effective batch = batch_size * accum * world)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:1
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None = torch's choice. 1 is faster on a CPU other jobs share
    dedupe_text: bool = True  # encode each distinct caption of a batch once (same gradients, less work)
    log_every: int = 50  # steps between metric lines / progress updates
    eval_every: int = 0  # steps between evaluations; 0 = at the end of each epoch
    save_every: int = 500  # steps between checkpoints (also at each epoch end and at the end)
    eval_max: int = 2000  # images used by periodic evaluation (the final `vislang eval` uses all)
    out_dir: str = "runs/default"  # checkpoints/, metrics.jsonl, model/, eval/, report.html
    progress: bool = True  # show a progress bar
    gan: GANConfig | None = None  # task "gan": the GAN's settings (None for every other task)


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML/JSON run config (or the defaults) and apply ``key.sub=value`` overrides."""
    data = load_file(path) if path else {}
    if overrides:
        data = apply_overrides(data, overrides)
    return from_dict(TrainConfig, data)
