"""Image classification from a pretrained image tower: linear probe, full fine-tune, and a from-scratch baseline.

Three methods, one data split and one evaluation, so their numbers compare:

* ``probe``: the tower is frozen; a logistic regression (``evaluation/linear_probe.py``, its C picked on the
  validation split) is fitted on its features and folded into the classifier's linear head, standardisation included.
* ``full``: LP-FT (Kumar et al., 2022): the head starts from the probe, then tower and head train end to end, the
  tower at ``tower_lr_scale`` times the head's learning rate. Starting from a fitted head keeps the first, large
  gradients of a random head from wrecking the pretrained features.
* ``scratch``: the same tower architecture from random initialisation, trained like ``full`` with one learning
  rate: the supervised baseline that says what the pretraining is worth.

Each method writes ``OUT/<method>/model`` (an ``ImageClassifier`` directory, loadable with ``vislang.from_pretrained``)
and ``OUT/<method>/metrics.json``; ``OUT/results.md`` and ``OUT/results.json`` compare the methods of the run.

The validation images are held out of the training split. A tower pretrained on that split (``runs/acc1`` saw all of
Fashion-MNIST's training images, captioned) has seen them, so validation accuracy flatters probe and full; compare
methods on the test split.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.labelled import LabelledImages, load_labelled, split_holdout
from ..data.transforms import normalize
from ..evaluation.linear_probe import fit_probe
from ..factory import from_pretrained, get_model_config, is_model_dir
from ..models.classifier import MODEL_TYPE as CLASSIFIER_TYPE
from ..models.classifier import ClassifierConfig, ImageClassifier
from ..models.towers import VisionConfig
from .loop import fit, pick_device
from .tasks.finetune import FinetuneConfig, FinetuneTask, accuracy_report, finetune_train_config, predict

METHODS = ("probe", "full", "scratch")
# Adam moves every weight by about lr per step, so a pretrained network needs a much smaller lr than a fresh one: on
# Fashion-MNIST from runs/acc1, full at 2e-3 (tower 2e-4) for half an epoch fell from the probe's 92.9% to 90.7%.
DEFAULT_LR = {"full": 2e-4, "scratch": 2e-3}


@dataclass
class Splits:
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    test_source: str  # where the test images came from, for the report

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def load_splits(cfg: FinetuneConfig, vision: VisionConfig) -> Splits:
    """Train / validation / test sets at the tower's image size; validation (and a missing test set) held out."""
    size, ch = vision.image_size, vision.channels
    kw = dict(cache_dir=cfg.cache_dir, img_key=cfg.img_key, label_key=cfg.label_key, progress=cfg.progress)
    full = load_labelled(cfg.data, cfg.train_split, size, ch, **kw)
    if len(full.class_names) < 2 or len(np.unique(full.labels)) < 2:
        n = len(np.unique(full.labels))
        raise ValueError(f"{cfg.data} has images of {n} class; a classifier needs two or more classes")
    is_path = Path(cfg.data).exists()
    if cfg.test_data:
        test = load_labelled(cfg.test_data, cfg.test_split, size, ch, class_names=full.class_names, **kw)
        source = cfg.test_data
    elif not is_path:
        test = load_labelled(cfg.data, cfg.test_split, size, ch, **kw)
        source = f"{cfg.data} {cfg.test_split}"
    else:  # a single folder / table: hold a test set out as well, the same way as validation
        keep, held = split_holdout(len(full), 0.2, full.labels, cfg.seed + 1)
        test, full = full.subset(held), full.subset(keep)
        source = f"20% of {cfg.data}"
    keep, held = split_holdout(len(full), cfg.val_fraction, full.labels, cfg.seed)
    if cfg.max_train:
        keep = np.random.default_rng(cfg.seed).permutation(keep)[: cfg.max_train]
    return Splits(full.subset(keep), full.subset(held), test, source)


def tower_source(cfg: FinetuneConfig, method: str) -> tuple[VisionConfig, dict[str, torch.Tensor] | None]:
    """The tower's config and, for probe / full, its pretrained weights (from a model directory or a named config
    whose tower has ``vision.pretrained``)."""

    if is_model_dir(cfg.model):
        model = from_pretrained(cfg.model)
        if not hasattr(model, "visual") or not hasattr(getattr(model, "cfg", None), "vision"):
            raise ValueError(f"{cfg.model} has no image tower to fine-tune; pass a dual-encoder or classifier dir")
        state = {k: v.clone() for k, v in model.visual.state_dict().items()}
        return model.cfg.vision, (None if method == "scratch" else state)
    if Path(cfg.model).is_dir():
        raise FileNotFoundError(
            f"{cfg.model} is not a vislang model directory (needs config.json and model.safetensors); pass one "
            "written by `vislang train` or `vislang finetune` (e.g. runs/demo/model), or a named config for scratch"
        )
    vision = get_model_config(cfg.model).vision
    if method == "scratch":
        return dataclasses.replace(vision, pretrained=None), None
    if not vision.pretrained:
        raise ValueError(
            f"{cfg.model!r} is a model config without pretrained weights, so --method {method} has nothing to start "
            "from; pass a trained model directory (e.g. runs/demo/model) or use --method scratch"
        )
    return vision, None  # the tower loads vision.pretrained when it is built


# --- training pieces -------------------------------------------------------------------------------------------------
@torch.inference_mode()
def tower_features(model: ImageClassifier, data: LabelledImages, batch_size: int, device: torch.device) -> np.ndarray:
    """Pooled tower features (N, D) of the frozen tower, for the probe."""
    model.eval()
    v, out = model.cfg.vision, []
    for s in range(0, len(data), batch_size):
        x = normalize(data.get_batch(np.arange(s, min(s + batch_size, len(data))))["image"].to(device), v.mean, v.std)
        out.append(model.visual(x).float().cpu())
    return torch.cat(out).numpy()


def fit_probe_head(model: ImageClassifier, splits: Splits, cfg: FinetuneConfig, device: torch.device) -> dict[str, Any]:
    """Fit logistic regression on frozen features (C chosen on validation) and write it into the linear head."""
    from threadpoolctl import threadpool_limits

    if cfg.progress:
        n_tr, n_val = len(splits.train), len(splits.val)
        print(f"[finetune] probe: tower features of {n_tr} + {n_val} images, then a fit per C in {cfg.probe_cs}")
    x_tr = tower_features(model, splits.train, cfg.eval_batch_size, device)
    x_val = tower_features(model, splits.val, cfg.eval_batch_size, device)
    scores, fitted = {}, {}
    with threadpool_limits(limits=cfg.threads or 1):
        for C in sorted(cfg.probe_cs):
            fitted[C], converged = fit_probe(x_tr, splits.train.labels, C)
            scores[C] = float(fitted[C].score(x_val, splits.val.labels))
    best = max(sorted(cfg.probe_cs), key=lambda c: scores[c])  # smallest C on ties
    scaler, lr = fitted[best].named_steps["standardscaler"], fitted[best].named_steps["logisticregression"]
    # logits = W (x - mu) / sigma + b  =  (W / sigma) x + (b - W mu / sigma)
    w = torch.as_tensor(lr.coef_ / scaler.scale_, dtype=torch.float32)  # (K', D)
    b = torch.as_tensor(lr.intercept_ - (lr.coef_ * scaler.mean_ / scaler.scale_).sum(1), dtype=torch.float32)
    K = len(splits.class_names)
    W, B = torch.zeros(K, w.shape[1]), torch.zeros(K)
    classes = torch.as_tensor(lr.classes_)
    if len(classes) == 2 and w.shape[0] == 1:  # binary: sklearn keeps one row, the logit of the second class
        W[classes[1]], B[classes[1]] = w[0], b[0]
    else:  # classes absent from training keep zero weights
        W[classes], B[classes] = w, b
    linear = model.head[-1]
    with torch.no_grad():
        linear.weight.copy_(W.to(linear.weight.device))
        linear.bias.copy_(B.to(linear.bias.device))
    return {"C": best, "val_accuracy_per_C": {str(c): s for c, s in scores.items()}}


def train_end_to_end(
    model: ImageClassifier, splits: Splits, cfg: FinetuneConfig, tower_scale: float, device: torch.device, method: str
) -> dict[str, Any]:
    """Minibatch AdamW with warmup + cosine over tower and head, in the one training loop (``train.tasks.finetune``);
    returns the peak learning rate, steps, epochs and the validation curve."""

    lr = cfg.lr or DEFAULT_LR[method]
    tcfg = finetune_train_config(cfg, method, lr, min(cfg.batch_size, len(splits.train)), device)
    return fit(FinetuneTask(model, splits, cfg, tower_scale, method), tcfg)


def classifier_head(model_dir: str, class_names: list[str]) -> dict[str, Any] | None:
    """The linear head of a classifier directory with these classes (full then continues from it, e.g. from a
    probe's ``OUT/probe/model``, instead of fitting a probe again); None for any other model."""

    if (
        not is_model_dir(model_dir)
        or json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") != CLASSIFIER_TYPE
    ):
        return None
    clf = ImageClassifier.from_pretrained(model_dir)
    if clf.class_names != list(class_names) or clf.cfg.hidden:
        return None
    head = clf.head[-1]
    return {"from": str(model_dir), "fit_s": 0.0, "head_weight": head.weight.detach(), "head_bias": head.bias.detach()}


# --- one method, several methods -------------------------------------------------------------------------------------
def count_trainable(model: ImageClassifier, method: str) -> int:
    params = model.head.parameters() if method == "probe" else model.parameters()
    return int(sum(p.numel() for p in params))


def run_method(
    method: str, cfg: FinetuneConfig, splits: Splits | None = None, probe: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train one classifier by ``method``, evaluate it on the test set and save it under ``out_dir/method``.

    ``probe`` (the ``"probe"`` entry of an earlier probe result on the same splits and tower) lets ``full`` start
    from that head instead of fitting it again; the probe's fit time is then counted in ``full``'s train time.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)} (comma-separated for several)")

    device = pick_device(cfg.device)
    vision, state = tower_source(cfg, method)
    if splits is None:
        splits = load_splits(cfg, vision)
    torch.manual_seed(cfg.seed)
    model = ImageClassifier(ClassifierConfig(vision=vision, class_names=tuple(splits.class_names)))
    if state is not None:
        model.visual.load_state_dict(state)
    model.to(device)
    t0 = time.time()
    info: dict[str, Any] = {}
    if method == "full" and probe is None:
        probe = classifier_head(cfg.model, splits.class_names)
    if method == "full" and probe is not None:
        with torch.no_grad():
            model.head[-1].weight.copy_(probe["head_weight"])
            model.head[-1].bias.copy_(probe["head_bias"])
        info["probe"] = {k: v for k, v in probe.items() if not k.startswith("head_")}
        t0 -= probe["fit_s"]
    elif method in ("probe", "full"):
        model.lock_tower()
        info["probe"] = fit_probe_head(model, splits, cfg, device)
        info["probe"]["fit_s"] = round(time.time() - t0, 1)
    if method == "full":
        model.lock_tower(False)
        info.update(train_end_to_end(model, splits, cfg, cfg.tower_lr_scale, device, "full"))
    elif method == "scratch":
        info.update(train_end_to_end(model, splits, cfg, 1.0, device, "scratch"))
    train_s = time.time() - t0
    model.eval()
    bs = cfg.eval_batch_size
    test = accuracy_report(predict(model, splits.test, bs, device), splits.test.labels, splits.class_names)
    if info.get("history"):  # the loop's last evaluation is of the final weights
        val = {"top1": info["history"][-1]["val_top1"]}
    elif method == "probe":  # the sweep scored the chosen C on the same validation images
        val = {"top1": info["probe"]["val_accuracy_per_C"][str(info["probe"]["C"])]}
    else:
        val = accuracy_report(predict(model, splits.val, bs, device), splits.val.labels, [])
    out = Path(cfg.out_dir) / method
    metrics = {
        "method": method,
        "model": cfg.model,
        "data": cfg.data,
        "test_data": splits.test_source,
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "n_test": len(splits.test),
        "test_top1": test["top1"],
        "val_top1": val["top1"],
        "per_class": test["per_class"],
        "trainable_params": count_trainable(model, method),
        "total_params": int(sum(p.numel() for p in model.parameters())),
        "train_s": round(train_s, 1),
        **info,
        "config": dataclasses.asdict(cfg),
    }
    model.save_pretrained(out / "model", extra={"finetune": {k: metrics[k] for k in ("method", "test_top1", "data")}})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"[finetune] {method}: test top-1 {test['top1']:.4f} on {len(splits.test)} images; model at {out / 'model'}")
    return metrics


def comparison_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the methods of one run."""
    lines = [
        "| method | test top-1 | val top-1 | trainable params | train time (s) | epochs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        epochs = r.get("epochs", "–")
        lines.append(
            f"| {r['method']} | {r['test_top1']:.4f} | {r['val_top1']:.4f} | {r['trainable_params']:,} "
            f"| {r['train_s']:.0f} | {epochs} |"
        )
    return "\n".join(lines)


def finetune(cfg: FinetuneConfig, methods: list[str] | tuple[str, ...] = ("full",)) -> list[dict[str, Any]]:
    """Run each method on the same splits; writes ``out_dir/results.md`` (the comparison) and ``results.json``."""
    methods = [m.strip() for m in methods if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown method {bad or methods!r}; choose from {', '.join(METHODS)} (e.g. probe,full)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    vision, _ = tower_source(cfg, methods[0])  # validates --model before any data is read
    splits = load_splits(cfg, vision)
    results, probe = [], None
    for method in methods:
        v, _ = tower_source(cfg, method)
        if (v.image_size, v.channels) != (vision.image_size, vision.channels):
            raise ValueError("all methods of one run must use towers of the same image size and channels")
        results.append(run_method(method, cfg, splits, probe))
        if method == "probe":  # full starts from this head (LP-FT) instead of fitting it again
            head = ImageClassifier.from_pretrained(Path(cfg.out_dir) / "probe" / "model").head[-1]
            probe = {**results[-1]["probe"], "head_weight": head.weight.detach(), "head_bias": head.bias.detach()}
    out = Path(cfg.out_dir)
    table = comparison_table(results)
    header = (
        f"Image classification on {cfg.data} (test: {results[0]['test_data']}, {results[0]['n_test']} images; "
        f"train {results[0]['n_train']}, val {results[0]['n_val']}), tower from `{cfg.model}`.\n\n"
    )
    (out / "results.md").write_text(header + table + "\n")
    summary = [{k: r[k] for k in ("method", "test_top1", "val_top1", "trainable_params", "train_s")} for r in results]
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return results
