"""The one loop runs every task: a run that crashes mid-way and resumes ends with the weights of an uninterrupted
run, for every task; optimizers step only inside vislang/train; the loop imports no task or model family."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _tiny import TINY
from vislang.train import load_train_config, train
from vislang.train import loop as loop_mod

SRC = Path(__file__).resolve().parents[1] / "src" / "vislang"
Weights = dict[str, torch.Tensor]
Runner = Callable[[bool], Weights]  # resume -> final weights


def _dir_weights(model_dir: Path) -> Weights:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def _state(module: torch.nn.Module) -> Weights:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- one tiny run per task: make(tmp, name) -> runner(resume) ---------------------------------------------------------
def _dual(task: str, *extra: str):
    def make(tmp: Path, name: str) -> Runner:
        cfg = load_train_config(None, [*TINY, f"task={task}", "data.options={n: 64}", "batch_size=16", "epochs=2",
                                       "save_every=3", "log_every=2", "eval_max=16", f"out_dir={tmp / name}",
                                       f"data.cache_dir={tmp / 'cache'}", *extra])  # fmt: skip
        return lambda resume: _dir_weights(train(cfg, resume=resume))

    return make


def _vqa(task: str, *extra: str):
    def make(tmp: Path, name: str) -> Runner:
        # bpe: a WordPiece trainer may split ties differently from one call to the next within a process, which
        # would make the uninterrupted run differ from the interrupted one before either starts training
        model = ["model.vision.width=4", "model.vision.depth=2", "model.vision.image_size=16", "model.text.width=16",
                 "model.text.layers=1", "model.text.heads=2", "model.text.tokenizer=bpe"]  # fmt: skip
        cfg = load_train_config(None, [f"task={task}", *model, *extra, "vqa.n_train=40", "vqa.n_test=8",
                                       "batch_size=8", "epochs=2", "save_every=3", "progress=false", "threads=1",
                                       f"out_dir={tmp / name}"])  # fmt: skip
        return lambda resume: _dir_weights(train(cfg, resume=resume))

    return make


def _text_model(tmp: Path) -> Path:
    from vislang.factory import fit_config_to_tokenizer, save_pretrained
    from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
    from vislang.tokenizers import Tokenizer

    d = tmp / "text"
    if not d.is_dir():
        tok = Tokenizer.train(["a red circle", "a blue square", "a green star"] * 4, vocab_size=60, context_length=16)
        mcfg = ModelConfig(embed_dim=8, vision=VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=2),
                           text=TextConfig(arch="transformer", vocab_size=60, context_length=16, width=16, layers=1,
                                           heads=2))  # fmt: skip
        torch.manual_seed(0)
        save_pretrained(CLIP(fit_config_to_tokenizer(mcfg, tok)).eval(), d, tok)
    return d


def _lit_unlocked(tmp: Path, name: str, *extra: str) -> Runner:
    """LiT on the cached input of the image tower's last stage, that stage trained (dropout draws included)."""
    model = _text_model(tmp)
    cfg = load_train_config(None, [
        "task=lit", f"model_name={model}", f"pretrained={model}", "model.embed_dim=8", "model.lock_image=true",
        "model.lock_text=true", "data.train=shapes", "data.options={n: 64}", "data.max_val=8", "batch_size=8",
        "epochs=2", "save_every=3", "log_every=2", "progress=false", "threads=1", f"out_dir={tmp / name}",
        f"lit.cache_dir={tmp / 'features'}", "lit.workers=0", "lit.unlock_last_image=1", "lit.feature_dropout=0.3",
        *extra,
    ])  # fmt: skip
    return lambda resume: _dir_weights(train(cfg, resume=resume))


def _gan(tmp: Path, name: str) -> Runner:
    cfg = load_train_config(None, [
        "task=gan", "data.train=shapes", "data.options={n: 64}", "batch_size=16", "epochs=2", "save_every=3",
        "log_every=2", "progress=false", "threads=1", f"out_dir={tmp / name}", f"data.cache_dir={tmp / 'cache'}",
        f"gan.text_model={_text_model(tmp)}", "gan.model={g_width: 4, d_width: 4, z_dim: 4}", "gan.sample_every=2",
        "gan.sample_per_prompt=2", "gan.standing_stats=2", "gan.mismatch_max_cos=1.5", "gan.d_steps=2",
    ])  # fmt: skip
    return lambda resume: _dir_weights(train(cfg, resume=resume))


def _finetune(tmp: Path, name: str) -> Runner:
    """FinetuneTask in the loop with an out_dir: `vislang finetune` runs it in memory, but it resumes like any task."""
    import numpy as np
    from PIL import Image

    from vislang.models.classifier import ClassifierConfig, ImageClassifier
    from vislang.models.towers import VisionConfig
    from vislang.train.finetune import FinetuneConfig, load_splits
    from vislang.train.loop import fit
    from vislang.train.tasks.finetune import FinetuneTask, finetune_train_config

    rng = np.random.default_rng(0)
    for cls, level in {"dark": 40, "mid": 128, "bright": 215}.items():
        (tmp / "ft" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(24):
            px = np.clip(level + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(tmp / "ft" / cls / f"{i}.png")
    vision = VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=2)
    fcfg = FinetuneConfig(data=str(tmp / "ft"), epochs=2.5, batch_size=16, warmup_steps=2, progress=False,
                          cache_dir=str(tmp / "cache"), device="cpu")  # fmt: skip
    splits = load_splits(fcfg, vision)

    def run(resume: bool) -> Weights:
        torch.manual_seed(0)
        model = ImageClassifier(ClassifierConfig(vision=vision, class_names=tuple(splits.class_names)))
        tcfg = finetune_train_config(fcfg, "scratch", 2e-3, 16, torch.device("cpu"))
        tcfg = dataclasses.replace(tcfg, out_dir=str(tmp / name), save_every=2)
        fit(FinetuneTask(model, splits, fcfg, 1.0, "scratch"), tcfg, resume)
        return _state(model)

    return run


def _steps(tmp: Path, name: str) -> Runner:
    """compress.finetune.run_steps (prune's fine-tune, distillation) given an out_dir."""
    import vislang
    from vislang.compress.finetune import contrastive_loss_fn, run_steps, training_pairs

    tok_model = _text_model(tmp)

    def run(resume: bool) -> Weights:
        model = vislang.from_pretrained(tok_model)
        pairs = training_pairs("shapes", model, vislang.get_tokenizer(tok_model), str(tmp / "cache"), 48,
                               options={"n": 64})  # fmt: skip
        steps_dir = tmp / name
        if not resume and steps_dir.exists():
            raise AssertionError("fresh run into a used folder")
        # save_every=0 in memory runs; with an out_dir the loop still saves at epoch ends (48 pairs / 16 = 3 steps)
        run_steps(model, contrastive_loss_fn(model), pairs, 7, 1e-3, 16, out_dir=str(steps_dir), resume=resume)
        return _state(model)

    return run


def _teacher_fit(tmp: Path, name: str) -> Runner:
    from vislang.models.gan.build import build_gan
    from vislang.models.gan.networks import GANModelConfig
    from vislang.train.config import OptimConfig
    from vislang.train.loop import fit
    from vislang.train.tasks.distill import TeacherFitTask, memory_config

    gcfg = GANModelConfig(z_dim=4, cond_dim=8, image_size=16, channels=3, g_width=4, d_width=4)
    conds = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=1)

    def run(resume: bool) -> Weights:
        torch.manual_seed(0)
        teacher, _ = build_gan(gcfg)
        student, _ = build_gan(gcfg)
        task = TeacherFitTask(student, teacher.eval(), conds, 4, 1e-3, train_norms=True)
        cfg = memory_config(6, 8, 0, OptimConfig(lr=1e-3, grad_clip=None), "cpu", str(tmp / name))
        fit(task, dataclasses.replace(cfg, save_every=3), resume)
        return _state(student)

    return run


TASK_RUNS = {
    "contrastive": (_dual("contrastive"), 3),
    "coca": (_dual("coca", "model.decoder={width: 16, layers: 1, heads: 2}"), 3),
    "itm": (_dual("itm", "model.itm={fusion: {kind: cross_attention, dim: 16, depth: 1, heads: 2}}"), 3),
    "vqa": (
        _vqa("vqa", "model.fusion.dim=16", "model.fusion.heads=2", "model.fusion.depth=1", "model.head_hidden=16"),
        3,
    ),  # fmt: skip
    "vqa-gen": (
        _vqa(
            "vqa-gen",
            "model.text.context_length=32",
            "model.text.vocab_size=100",
            "model.decoder={width: 16, layers: 1, heads: 2}",
        ),
        3,
    ),  # fmt: skip
    "lit-unlocked": (_lit_unlocked, 3),
    "gan": (_gan, 3),
    "finetune": (_finetune, 2),
    "steps": (_steps, 3),
    "teacher-fit": (_teacher_fit, 3),
}


@pytest.mark.parametrize("task", list(TASK_RUNS))
def test_crash_and_resume_ends_with_the_uninterrupted_weights(task, tmp_path, monkeypatch):
    """Each task: an uninterrupted run; a run killed right after its checkpoint at step k (mid-epoch for most); the
    killed run resumed. The resumed run's final weights must equal the uninterrupted run's exactly."""
    make, crash_at = TASK_RUNS[task]
    straight = make(tmp_path, "a")(False)
    real_save = loop_mod.atomic_torch_save
    crashed = {"n": 0}

    def crash_after(obj, path):
        real_save(obj, path)
        if obj["step"] == crash_at:
            crashed["n"] += 1
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop_mod, "atomic_torch_save", crash_after)
    interrupted = make(tmp_path, "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        interrupted(False)
    monkeypatch.setattr(loop_mod, "atomic_torch_save", real_save)
    assert crashed["n"] == 1
    resumed = interrupted(True)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), (task, k)


def test_optimizers_step_only_inside_vislang_train():
    """Every optimizer update goes through the loop (or its optimizer_step helper): outside src/vislang/train no
    code calls ``.step(...)`` or ``.backward(...)`` on anything."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if (SRC / "train") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in ("step", "backward"):
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.func.attr}()")
    assert not offenders, offenders


def test_the_loop_imports_no_task_and_no_model_family():
    tree = ast.parse((SRC / "train" / "loop.py").read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
    banned = [m for m in imported if any(w in m for w in ("tasks", "models", "generate", "understand", "factory",
                                                          "finetune", "compress", "caption"))]  # fmt: skip
    assert not banned, banned


def test_compress_reads_a_config_file_then_flags_then_dotted_overrides(tmp_path):
    """`vislang compress --config`: the file's options, a flag given over the file, a dotted override over both;
    an unknown option is a clear error."""
    from vislang.cli import build_parser
    from vislang.cli.compress import compress_options

    (tmp_path / "c.yaml").write_text("steps: 40\nlr: 0.001\nbatch_size: 32\ndata: shapes\n")
    argv = ["compress", "runs/x/model", "--method", "prune", "-o", "out", "--config", str(tmp_path / "c.yaml")]
    args, extra = build_parser().parse_known_args([*argv, "--lr", "0.01", "--batch_size=8"])
    opts = compress_options(args, extra)
    assert (opts["steps"], opts["lr"], opts["batch_size"], opts["data"]) == (40, 0.01, 8, "shapes")
    assert opts["sparsity"] == 0.5  # a flag left at its default fills what the file does not set
    args, extra = build_parser().parse_known_args([*argv, "--bogus=1"])
    with pytest.raises(SystemExit, match="unknown compress option"):
        compress_options(args, extra)


@pytest.mark.parametrize("task", ["itm", "lit-unlocked"])
def test_showing_progress_leaves_the_weights_as_they_are(task, tmp_path):
    """With the progress bar on, the loop counts the step's FLOPs and probes the machine's peak FLOP/s for the MFU
    column. Neither may touch the run's random stream: before the peak probe drew its matrices from the global
    generator, ITM's hard negatives and LiT's feature dropout came out different with the bar on than off."""
    if task == "itm":
        itm = "model.itm={fusion: {kind: cross_attention, dim: 16, depth: 1, heads: 2}}"
        quiet, shown = _dual("itm", itm)(tmp_path, "a"), _dual("itm", itm, "progress=true")(tmp_path, "b")
    else:
        quiet, shown = _lit_unlocked(tmp_path, "a"), _lit_unlocked(tmp_path, "b", "progress=true")
    a, b = quiet(False), shown(False)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
