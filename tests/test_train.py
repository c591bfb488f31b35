"""The training loop end to end on tiny synthetic data: CLI smoke run, exact resume, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vislang
from _tiny import TINY as BASE
from vislang.cli.main import main
from vislang.train import load_train_config, train
from vislang.train import loop as loop_mod
from vislang.train.tasks.contrastive import DualEncoderTask

TINY = [
    *BASE,
    "data.options={n: 96}",
    "batch_size=16",
    "epochs=2",
    "log_every=2",
    "save_every=3",
    "eval_max=32",
]


def _cfg(tmp_path, name, *extra):
    return load_train_config(
        None, [*TINY, f"out_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}", *extra]
    )


def test_cli_train_smoke(tmp_path, capsys):
    rc = main(["train", *[f"--{o}" for o in TINY], f"--out_dir={tmp_path / 'run'}", f"--data.cache_dir={tmp_path}/c"])
    assert rc == 0
    run = tmp_path / "run"
    assert vislang.factory.is_model_dir(run / "model")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert steps and all({"step", "loss", "lr", "samples_per_s"} <= set(r) for r in steps)
    assert any(k.startswith("eval/") for r in lines for k in r)
    model = vislang.from_pretrained(run / "model")
    tok = vislang.get_tokenizer(run / "model")
    emb = model.encode_text(tok(["a red circle"]))
    assert emb.shape == (1, 16)


def test_resume_is_exact(tmp_path, monkeypatch):
    """A run interrupted after a checkpoint and resumed ends with the same weights as an uninterrupted one."""
    straight = train(_cfg(tmp_path, "a"))

    real_save = loop_mod.atomic_torch_save

    def crash_after_step_3(obj, path):
        real_save(obj, path)
        if obj["step"] == 3:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop_mod, "atomic_torch_save", crash_after_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_cfg(tmp_path, "b"))
    monkeypatch.setattr(loop_mod, "atomic_torch_save", real_save)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(tmp_path, "b"))
    resumed = train(_cfg(tmp_path, "b"), resume=True)

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    """With accum_steps=2 two micro-batches make one optimizer step: 96 pairs / (8 * 2) = 6 steps per epoch."""
    cfg = _cfg(tmp_path, "acc", "batch_size=8", "accum_steps=2", "epochs=1")
    train(cfg)
    rec = [json.loads(x) for x in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rec[-1]["step"] == 96 // 16


def test_too_small_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lower --batch_size"):
        train(_cfg(tmp_path, "small", "batch_size=512"))


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--resume" in out and "examples" in out


def test_prepared_cache_keys_on_reader_options(tmp_path):
    """A different `data.options` (here the number of scenes) must not reuse a stale prepared copy."""
    from vislang.data.config import DataConfig
    from vislang.data.loading import load_prepared

    a = load_prepared("shapes", "val", 16, 3, DataConfig(cache_dir=str(tmp_path), options={"n": 10}), False)
    b = load_prepared("shapes", "val", 16, 3, DataConfig(cache_dir=str(tmp_path), options={"n": 12}), False)
    assert (len(a), len(b)) == (10, 12) and a.path != b.path


def test_short_schedule_still_decays():
    from vislang.train.config import OptimConfig
    from vislang.train.optim import lr_at

    cfg = OptimConfig(lr=1e-3, warmup_steps=100, min_lr_ratio=0.0)
    lrs = [lr_at(s, 50, cfg) for s in range(50)]
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 9  # warmup capped at 50 // 5 = 10 steps
    assert lrs[-1] < 0.01 * 1e-3


def test_time_budget_refits_when_steps_slow_down(tmp_path, monkeypatch):
    """The schedule is refitted during the run: steps that slow down after the first fit (a machine that got busy)
    still end the run near its budget instead of long after it. A virtual clock makes it independent of load."""
    clock = {"t": 0.0, "n": 0}

    class VirtualTime:
        @staticmethod
        def time() -> float:
            return clock["t"]

    real_step = DualEncoderTask.training_step

    def slow_later(self, batch, step):
        clock["n"] += 1
        clock["t"] += 0.01 if clock["n"] <= 40 else 1.0  # fast steps at the first fit, then 100x slower
        return real_step(self, batch, step)

    monkeypatch.setattr(loop_mod, "time", VirtualTime)
    monkeypatch.setattr(DualEncoderTask, "training_step", slow_later)
    cfg = _cfg(tmp_path, "budget", "epochs=40", "time_budget_min=1", "save_every=1000", "log_every=1000")
    train(cfg)  # 96 pairs / 16 = 6 steps per epoch: 240 steps unless the budget cuts them
    rec = [json.loads(x) for x in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    # a fit made only at step 30 (pace 0.01 s) keeps all 240 steps and ends after ~200 s of a 60 s budget
    assert 60 < rec[-1]["step"] < 130
    assert rec[-1]["elapsed_s"] < 60 + 5


def test_resume_after_a_finished_run_trains_the_extra_epochs(tmp_path, capsys):
    """OpenCLIP's convention: resuming with more epochs than the run had continues to the new count."""
    train(_cfg(tmp_path, "r", "epochs=1"))
    steps_one_epoch = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1]).get("step")
    capsys.readouterr()
    train(_cfg(tmp_path, "r", "epochs=1"), resume=True)  # same epochs: nothing to train, and it says how to go on
    assert "already finished" in capsys.readouterr().out
    train(_cfg(tmp_path, "r", "epochs=2"), resume=True)
    steps = [json.loads(x).get("step") for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s) == 2 * steps_one_epoch


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="not found"):
        train(_cfg(tmp_path, "runs/broken", "data.train=no-such-pairs.csv"))
    assert not (tmp_path / "runs").exists()
    (tmp_path / "keep").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match="not found"):
        train(_cfg(tmp_path, "keep/broken", "data.train=no-such-pairs.csv"))
    assert (tmp_path / "keep").is_dir() and not (tmp_path / "keep" / "broken").exists()  # only what it made goes


def test_precise_batchnorm_sets_the_statistics_of_the_given_images():
    """After ``precise_batchnorm`` the image tower in eval mode computes what train mode (batch statistics) computes
    on the same batch; the momentum is restored; a locked tower keeps its statistics."""
    from vislang.factory import build_model, get_model_config
    from vislang.train.tasks.contrastive import precise_batchnorm

    torch.manual_seed(0)
    model = build_model(get_model_config("fmnist-cnn", {"text": {"vocab_size": 64}})).eval()
    images = torch.randn(64, 1, 28, 28) * 2 + 1  # far from the initial statistics (mean 0, variance 1)
    stale = model.visual(images)
    with torch.no_grad():
        batch_stats = model.visual.train()(images)
    model.eval()
    assert not torch.allclose(stale, batch_stats, atol=1e-2)
    assert precise_batchnorm(model, iter([images[:32], images[32:]])) == 6  # two conv-BN-ReLU per stage, 3 stages
    assert not model.visual.training
    torch.testing.assert_close(model.visual(images), batch_stats, atol=2e-2, rtol=2e-2)  # unbiased vs biased variance
    bns = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in bns)
    model.lock_image_tower()
    before = [m.running_mean.clone() for m in bns]
    assert precise_batchnorm(model, iter([images + 5])) == 0
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))


def test_training_recomputes_batchnorm_statistics_before_saving(tmp_path, monkeypatch):
    """``precise_bn`` images decide the BatchNorm statistics at each evaluation and of the saved model; 0 keeps the
    running averages."""
    from vislang.train.tasks import contrastive

    seen, real = [], contrastive.precise_batchnorm

    def spy(model, batches):
        batches = list(batches)
        seen.append([len(b) for b in batches])
        return real(model, iter(batches))

    monkeypatch.setattr(contrastive, "precise_batchnorm", spy)
    train(_cfg(tmp_path, "on", "precise_bn=40"))
    assert len(seen) >= 2 and all(s == [16, 16, 8] for s in seen)  # each evaluation and the saved model
    seen.clear()
    train(_cfg(tmp_path, "off", "precise_bn=0"))
    assert seen == []
