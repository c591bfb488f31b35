"""The one training loop: every task (dual encoders, captioners, VQA, GANs, fine-tuning, compression) runs in it.

Why one loop: resume, torchrun/DDP, mixed precision, time budgets, progress, metrics and atomic checkpoints are
written once, here, and every task gets them without code of its own. The loop is task-agnostic: it imports no
task and no model family; ``train.tasks`` holds the tasks (``TASKS``: name → task class).

Run layout (``cfg.out_dir``; an empty ``out_dir`` runs in memory, writing nothing, for callers inside a larger job)::

    config.yaml         the resolved run config        metrics.jsonl   one JSON line per log / eval
    checkpoints/        last.pt (atomic), written every save_every steps, at each epoch end and at the end
    model/ ...          whatever the task's ``finish`` saves (a model directory, eval files, samples)

The task protocol
-----------------
A task is an object (subclass ``Task`` for the defaults) that owns its data, its model(s), its forward and loss,
and its evaluation. The loop calls, in this order:

``check(cfg)``
    Optional: refuse a config before anything is written (e.g. a missing input model directory).
``setup(run)``
    Build data, model(s) and optimizers. ``run`` (a ``Run``) gives ``cfg`` (the ``TrainConfig``), ``device``,
    ``rank``, ``world``, ``main``, ``out_dir`` (None in memory) and ``resume``. Wrap a module that trains under
    DDP with ``run.ddp(module)`` (the identity on one process) and keep the wrapped one for the forward; methods
    other than ``forward`` go through ``run.ddp(Calls(module))``. Under torchrun a step must equal one process's
    step on the global batch (``cfg.batch_size`` per rank × ``world``): each rank takes its part of that batch,
    DDP averages the gradients, BatchNorm uses global statistics (``run.ddp`` sees to it), and a loss that is a mean
    over a number of terms that differs between ranks is scaled by ``distributed.global_share``.
    Put modules in train mode here. The loop has already seeded torch with ``cfg.seed + rank`` (unless the task
    sets ``seeds_globally = False``: a task run inside a larger job keeps that job's random stream).
``modules()`` → ``{name: nn.Module}``
    Everything checkpointed (core modules, not DDP wrappers); each is a top-level key of ``last.pt``.
``optimizers()`` → ``{name: Optimizer}``
    Checkpointed too; in automatic mode the loop steps them all (param groups may carry a ``"scale"``: the
    group's learning rate is the schedule's times it).
``epoch_length(epoch)`` → micro-batches in ``epoch``; ``batches(epoch, start)`` → iterable of those batches from
    position ``start`` (so a resumed run continues mid-epoch). ``accum_steps`` micro-batches make one step.
``learning_rates(step, total)`` → a float for every optimizer, or ``{optimizer name: lr}``
    The schedule; the default is ``cfg.optim``'s warmup + cosine (``optim.lr_at``). Applied before each step.
``training_step(batch, step)``
    Automatic optimisation (``automatic_optimization = True``): return the loss tensor, or ``(loss, {metric:
    float})``; the loop does backward (scaled under fp16, ``no_sync`` while accumulating), unscale, clipping at
    ``cfg.optim.grad_clip`` over ``clip_parameters()``, the optimizer steps and ``zero_grad``. Manual
    (``automatic_optimization = False``, e.g. a GAN's two optimizers): step each optimizer yourself with
    ``run.step(optimizer, loss)`` (zero_grad, scaled backward, unscale, optional clip, step) and return
    ``{metric: float}``. Under both, the call runs inside the loop's autocast. Metrics are averaged over the
    steps of a log window that had them.
``evaluate(step)`` → ``{metric: float}`` or None
    Called every ``eval_every`` steps (0: at each epoch end) and at the end; the record goes to metrics.jsonl.
``after_step(step)``
    Per-step hook after logging and evaluation, before the checkpoint (sample grids, FID tracking...); may write
    with ``run.log(record)`` and read ``run.total_steps``.
``log_fields(step)`` → extra fields of a metrics line (e.g. the GAN's ``lr_factor``).
``state_dict()`` / ``load_state_dict(checkpoint)``
    Extra state to resume exactly, as top-level checkpoint keys other than the loop's: EMA weights that are not a
    module, the best score so far, ``torch.Generator`` states.
``close()``
    Called last, also after an error: put back global settings the task changed (the GAN's cuDNN benchmark).
``finish()``
    After the final checkpoint and evaluation: save the result (model directory, eval files) and return what
    ``fit`` returns. Called on every rank; write files on ``run.main`` only.

Attributes with defaults: ``name`` (progress bar), ``automatic_optimization``, ``seeds_globally``,
``budget_fit_from`` (first step at which the schedule is refitted to ``time_budget_min``; None: the budget only
stops the run), ``nonfinite_hint`` (what the error for a non-finite loss tells the user to do).

A checkpoint holds every module and optimizer, the grad scaler, step / epoch / position in the epoch, the total
steps, elapsed time, every RNG state, the run config and the task's ``state_dict()`` entries, all as top-level keys
(``load_state_dict`` receives the whole checkpoint), written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as dist
from .. import precision as prec
from ..config import to_dict
from ..index.base import atomic_write_bytes
from .checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state
from .config import TrainConfig
from .optim import lr_at, set_lr


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} asked for, but no CUDA device is visible; use --device=cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    """The autocast context and grad scaler (fp16 only) of ``precision``. ``auto`` resolves without a trial here
    (bf16 on CUDA that has it, else fp32, or a cached trial's answer): the loop settles it with a trial of the task's
    own step (``Loop.settle_precision``, ``vislang.precision.choose``)."""
    precision = prec.choose(precision, device).precision
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return prec.autocast(precision, device), scaler


class MetricsLog:
    """Append-only JSONL; each line is flushed so a crash loses nothing already logged."""

    def __init__(self, path: Path | None, enabled: bool) -> None:
        self.path, self.enabled = path, enabled and path is not None

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> None:
        """Forget lines logged after ``step``: a resumed run logs those steps again, and each must appear once."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and _line_step(line) <= step]  # a torn line goes too
        if len(kept) != len(lines):
            atomic_write_bytes(self.path, "".join(kept).encode())


def _line_step(line: str) -> float:
    """The step of a metrics line; infinity for one a crash cut short (it is dropped with the steps after)."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
    clip: float | None = None,
    params: Iterable[nn.Parameter] | None = None,
) -> None:
    """One manual update: zero_grad, (scaled) backward, unscale, optional norm clipping, step.

    The only place besides the loop itself where an optimizer steps, so that scaling and clipping are done once,
    right; ``gan_step`` and other task functions call it (through ``Run.step`` inside the loop)."""
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip:
        ps = params if params is not None else [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(ps, clip)
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()


class Calls(nn.Module):
    """A module whose forward runs any function of another: ``Calls(m)(fn, *args)`` is ``fn(m, *args)``.

    DistributedDataParallel only sees a module's ``forward``: it averages gradients of what ran inside it. A task
    whose step calls other methods (a GAN discriminator's ``features``/``score``/``match``, a captioner's
    ``caption_logits``) wraps ``run.ddp(Calls(module))`` and passes those calls in as ``fn``; on one process the
    wrapper is this module, and ``fn(module, *args)`` runs as before."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(self.module, *args, **kwargs)


@dataclass
class Run:
    """What a task sees of the run: its config, where it runs, and the loop's helpers (``ddp``, ``step``, ``log``)."""

    cfg: TrainConfig
    device: torch.device
    rank: int = 0
    world: int = 1
    out_dir: Path | None = None
    resume: bool = False
    scaler: torch.amp.GradScaler | None = None
    total_steps: int = 0
    global_step: int = 0  # optimizer steps done (kept by the loop)
    epoch: int = 0  # epochs completed (kept by the loop)
    wrapped: list[nn.Module] = field(default_factory=list)
    metrics: MetricsLog | None = None
    clock: Any = None  # the loop's elapsed-time function
    precision: str = "fp32"  # the training precision, once the loop has resolved it (``vislang.precision``)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def ddp(self, module: nn.Module, **kwargs: Any) -> nn.Module:
        """``module`` wrapped in DistributedDataParallel under torchrun, else ``module`` itself.

        Under torchrun a step must do what one process does on the global batch (every rank's batch together): DDP
        averages the ranks' gradients, and its BatchNorms are made :class:`~vislang.distributed.GlobalBatchNorm`
        (in place; same parameters and buffers), which normalise by the global batch's statistics. Only a forward
        through the returned wrapper is seen by DDP: to run other methods (a discriminator's ``features`` and
        ``score``, a captioner's ``caption_logits``), wrap ``Calls(module)`` and call ``wrapped(fn, *args)``.
        ``kwargs`` go to DistributedDataParallel (``find_unused_parameters=True`` where a step may leave some
        parameters out)."""
        if self.world == 1:
            return module
        module = dist.global_batchnorm(module)
        wrapped = nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None, **kwargs
        )
        self.wrapped.append(wrapped)
        return wrapped

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float | None = None) -> None:
        """Manual optimisation: one update of ``optimizer`` on ``loss`` (scaler, optional clipping, zero_grad)."""
        optimizer_step(optimizer, loss, self.scaler, clip)

    def elapsed(self) -> float:
        """Seconds of training so far, resumed runs' earlier parts included."""
        return self.clock() if self.clock is not None else 0.0

    def log(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl (main rank only; nothing in memory-only runs)."""
        if self.metrics is not None and self.main:
            self.metrics.write(record)


class Task:
    """Defaults of the task protocol (see the module docstring); a task overrides what it needs."""

    name = "train"
    automatic_optimization = True
    seeds_globally = True
    budget_fit_from: int | None = 30
    nonfinite_hint = "lower --optim.lr or use --precision=fp32"
    run: Run

    def check(self, cfg: TrainConfig) -> None:
        """Refuse a config the task cannot run, before the loop writes anything (the run folder included)."""

    def setup(self, run: Run) -> None:
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def epoch_length(self, epoch: int) -> int:
        raise NotImplementedError

    def batches(self, epoch: int, start: int) -> Iterable[Any]:
        raise NotImplementedError

    def training_step(self, batch: Any, step: int) -> Any:
        raise NotImplementedError

    def learning_rates(self, step: int, total: int) -> float | dict[str, float]:
        return lr_at(step, total, self.run.cfg.optim)

    def clip_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules().values() for p in m.parameters()]

    def samples(self, batch: Any) -> int:
        """Items in a micro-batch, for the samples/s rate: the first tensor's length."""
        values = batch.values() if isinstance(batch, dict) else batch
        return next((int(v.shape[0]) for v in values if torch.is_tensor(v) and v.ndim), 0)

    def evaluate(self, step: int) -> dict[str, float] | None:
        return None

    def after_step(self, step: int) -> None:
        pass

    def log_fields(self, step: int) -> dict[str, Any]:
        return {}

    def epoch_note(self) -> str:
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def finish(self) -> Any:
        return None

    def close(self) -> None:
        """Always called at the end, also after an error: undo global switches the task set (cuDNN benchmark)."""


class _Window:
    """Sums of the metrics since the last log line; each mean is over the steps that had the metric."""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.samples, self.steps, self.t0 = 0, 0, time.time()

    def add(self, metrics: dict[str, float | torch.Tensor]) -> None:
        """Tensors (a loss) stay on their device until ``means``: no host sync per step."""
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.counts[k] for k, v in self.sums.items()}


def _split_output(out: Any) -> tuple[torch.Tensor | None, dict[str, float]]:
    if torch.is_tensor(out):
        return out, {}
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return None, dict(out)


def _check_finite(task: Task, step: int, loss: float | None, metrics: dict[str, float]) -> None:
    """Raise on a non-finite loss (or, for a task without one, non-finite metrics) in a log window's means: checked
    when the window is read (logs, evaluations, checkpoints), not each step, which would wait for the device."""
    if loss is not None and not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} by step {step}; {task.nonfinite_hint}")
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if loss is None and bad:
        raise FloatingPointError(f"{', '.join(bad)} became non-finite by step {step}; {task.nonfinite_hint}")


class Loop:
    """One run of a task: state that survives a checkpoint (step, epoch, position, total) and the step machinery."""

    def __init__(self, task: Task, cfg: TrainConfig, resume: bool) -> None:
        self.task, self.cfg, self.resume = task, cfg, resume
        self.created_out: Path | None = None  # the topmost folder prepare() made (see discard_empty_run)
        rank, world, device = dist.init_distributed()
        if cfg.device != "auto" and world == 1:
            device = pick_device(cfg.device)
        out = Path(cfg.out_dir) if cfg.out_dir else None
        self.amp, scaler = autocast_for(cfg.precision, device)
        self.choice = prec.Choice(prec.choose(cfg.precision, device).precision, "")
        self.flops_per_step: int | None = None  # model FLOPs of one optimizer step (a trial step, at start)
        self.peak: float | None = None  # this machine's measured FLOP/s in the run's precision
        self.run = Run(cfg, device, rank, world, out, resume, scaler)
        self.ckpt_path = out / "checkpoints" / "last.pt" if out is not None else None
        self.batch_in_epoch = 0
        self.elapsed_before, self.t_start = 0.0, time.time()
        self.run.clock = self.elapsed
        if cfg.accum_steps < 1:
            raise ValueError(f"accum_steps={cfg.accum_steps} must be at least 1 (micro-batches per optimizer step)")
        if not task.automatic_optimization and cfg.accum_steps != 1:
            raise ValueError(f"task {task.name} steps its own optimizers; it cannot accumulate: set accum_steps=1")

    @property
    def step(self) -> int:
        return self.run.global_step

    @step.setter
    def step(self, value: int) -> None:
        self.run.global_step = value

    @property
    def epoch(self) -> int:
        return self.run.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.run.epoch = value

    # --- set-up ------------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg, run = self.cfg, self.run
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.task.check(cfg)
        if run.out_dir is not None and run.main:
            # the topmost folder this run creates, removed again if the run fails before its first step
            self.created_out = next((p for p in reversed(run.out_dir.parents) if not p.exists()), None)
            if self.created_out is None and not run.out_dir.exists():
                self.created_out = run.out_dir
            run.out_dir.mkdir(parents=True, exist_ok=True)
            if not self.resume and self.ckpt_path.exists():
                raise FileExistsError(
                    f"{run.out_dir} already holds a run; pass --resume to continue it or choose another --out_dir"
                )
        if self.resume and self.ckpt_path is None:
            raise ValueError("resume needs an out_dir with checkpoints/last.pt; this run keeps nothing on disk")
        if self.task.seeds_globally:
            torch.manual_seed(cfg.seed + run.rank)
        run.metrics = MetricsLog(run.out_dir / "metrics.jsonl" if run.out_dir else None, run.main)
        self.task.run = run
        self.task.setup(run)
        spe = self.steps_in_epoch(0)
        if spe == 0:
            raise ValueError(
                f"an epoch of task {self.task.name} holds {self.task.epoch_length(0)} batch(es) per process, fewer "
                f"than one step's {cfg.accum_steps} (accum_steps); lower --batch_size or --accum_steps"
            )
        run.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * spe))
        if self.resume:
            self.load()
        self.settle_precision()
        if run.out_dir is not None and run.main:
            (run.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # --- precision and MFU -------------------------------------------------------------------------------------------
    def settle_precision(self) -> None:
        """Resolve ``precision: auto`` by a trial of the task's own step where the CPU has native bf16 (cached per
        machine and model: ``vislang.precision``), print the choice and measure the peak FLOP/s MFU divides by."""
        cfg, run, task = self.cfg, self.run, self.task
        key = prec.model_key(task.modules().values(), (task.name, cfg.batch_size, cfg.accum_steps))
        trial = self.trial_step()
        self.choice = prec.choose(cfg.precision, run.device, key, trial)
        self.amp = prec.autocast(self.choice.precision, run.device)
        run.precision = self.choice.precision
        if cfg.progress and trial is not None:
            # Counted on a trial step, not a real one: under FlopCounterMode attention may dispatch to another
            # kernel, and a resumed run's first step must compute exactly what the uninterrupted run's did. Neither
            # the count nor the peak probe touches the run's random stream, so the bar changes no weight
            # (tests/test_train_house.py::test_showing_progress_leaves_the_weights_as_they_are).
            with self.amp:
                self.flops_per_step = prec.count_flops(trial) * cfg.accum_steps
            self.peak = prec.peak_flops(self.choice.precision, run.device)
        if run.main:
            peak = f"; measured peak {self.peak / 1e9:.0f} GFLOP/s" if self.peak else ""
            print(f"[vislang] precision {self.choice.precision} ({self.choice.reason}{peak})")

    def trial_step(self) -> Any:
        """A function running one forward + backward of the task on its first batch and undoing every effect (module
        buffers such as BatchNorm statistics, gradients, RNG state), for the precision trial; None where a step
        cannot be undone (a task that steps its own optimizers) or must stay in step with other ranks."""
        task, run = self.task, self.run
        if not task.automatic_optimization or run.world > 1:
            return None
        modules = list(task.modules().values())
        cache: list[Any] = []

        def once() -> None:
            rng, extra = rng_state(), copy.deepcopy(task.state_dict())  # task-owned generators included
            saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
            try:
                if not cache:  # the batch the run goes on with (the first of the epoch where none is left)
                    batch = next(iter(task.batches(self.epoch, self.batch_in_epoch)), None)
                    cache.append(batch if batch is not None else next(iter(task.batches(self.epoch, 0))))
                loss, _ = _split_output(task.training_step(cache[0], self.step))
                if loss is not None:
                    loss.backward()
            finally:
                for m, state in zip(modules, saved):
                    m.load_state_dict(state)
                    for p in m.parameters():
                        p.grad = None
                set_rng_state(rng)
                if extra:
                    task.load_state_dict(extra)

        return once

    def mfu(self, seconds_per_step: float) -> float | None:
        """Model FLOP utilisation: the step's counted FLOPs per second over the measured peak of the precision."""
        if not self.flops_per_step or not self.peak or seconds_per_step <= 0:
            return None
        return self.flops_per_step / seconds_per_step / self.peak

    def steps_in_epoch(self, epoch: int) -> int:
        return self.task.epoch_length(epoch) // self.cfg.accum_steps

    # --- checkpoints -------------------------------------------------------------------------------------------------
    def save(self) -> None:
        if self.ckpt_path is None or not self.run.main:
            return
        state: dict[str, Any] = dict(
            scaler=self.run.scaler.state_dict() if self.run.scaler is not None else None,
            step=self.step,
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            total_steps=self.run.total_steps,
            elapsed_s=self.elapsed(),
            rng=rng_state(),
            config=to_dict(self.cfg),
        )
        named = {name: m.state_dict() for name, m in self.task.modules().items()}
        named.update({name: o.state_dict() for name, o in self.task.optimizers().items()})
        named.update(self.task.state_dict())
        clash = set(named) & set(state)
        if clash:
            raise ValueError(f"task {self.task.name} uses checkpoint key(s) {sorted(clash)} that the loop owns")
        state.update(named)
        atomic_torch_save(state, self.ckpt_path)

    def load(self) -> None:
        state = load_checkpoint(self.ckpt_path)
        for name, m in self.task.modules().items():
            try:
                m.load_state_dict(state[name])
            except (KeyError, RuntimeError) as e:
                raise ValueError(
                    f"{self.ckpt_path} does not fit this run's {name} ({str(e)[:300]}); resume with the run's own "
                    f"config ({self.run.out_dir}/config.yaml) or start a new run in another --out_dir"
                ) from e
        for name, o in self.task.optimizers().items():
            o.load_state_dict(state[name])
        if self.run.scaler is not None and state.get("scaler"):
            self.run.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.run.total_steps = self.resumed_total_steps(state)
        self.elapsed_before = state.get("elapsed_s", 0.0)
        set_rng_state(state["rng"])
        self.task.load_state_dict(state)
        if self.run.metrics is not None:
            self.run.metrics.drop_after(self.step)
        if self.run.main:
            print(f"[vislang] resumed {self.ckpt_path} at step {self.step}/{self.run.total_steps} (epoch {self.epoch})")
            if self.step >= self.run.total_steps:
                print(
                    f"[vislang] this run already finished its {self.run.total_steps} steps: nothing to train. To train "
                    "longer, resume with more --epochs=N (than the run's) or --max_steps=N"
                )

    def resumed_total_steps(self, state: dict[str, Any]) -> int:
        """A resumed run's schedule: ``--max_steps``, else more ``--epochs`` than the run had, else the run's own.

        The checkpoint's own count wins when the epochs are unchanged, so a crashed run resumes onto the schedule it
        started with (a time budget may have shortened it); asking for more epochs than the checkpoint's config
        extends it, as OpenCLIP continues to the configured epochs.
        """
        if self.cfg.max_steps:
            return self.cfg.max_steps
        saved_epochs = state.get("config", {}).get("epochs")
        if saved_epochs is not None and self.cfg.epochs != saved_epochs:
            return max(1, math.ceil(self.cfg.epochs * self.steps_in_epoch(0)))
        return state["total_steps"]

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    # --- one step ----------------------------------------------------------------------------------------------------
    def apply_lr(self) -> float | dict[str, float]:
        lrs = self.task.learning_rates(self.step, self.run.total_steps)
        for name, opt in self.task.optimizers().items():
            set_lr(opt, lrs[name] if isinstance(lrs, dict) else lrs)
        return lrs

    def micro_step(self, batch: Any, sync: bool) -> dict[str, float]:
        """Forward (and, in automatic mode, backward) of one micro-batch; the metrics it reports."""
        task, run = self.task, self.run
        with contextlib.ExitStack() as stack:
            if not sync:
                for m in run.wrapped:
                    stack.enter_context(m.no_sync())
            with self.amp:
                loss, metrics = _split_output(task.training_step(batch, self.step))
                if loss is not None:
                    scaled = loss / self.cfg.accum_steps
            if loss is not None:
                (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        return {"loss": loss.detach(), **metrics} if loss is not None else metrics

    def optimizer_step(self) -> None:
        """Automatic optimisation: unscale, clip, step and zero every optimizer of the task."""
        opts, scaler, clip = self.task.optimizers().values(), self.run.scaler, self.cfg.optim.grad_clip
        if scaler is not None:
            for opt in opts:
                scaler.unscale_(opt)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.task.clip_parameters(), clip)
        for opt in opts:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
        for opt in opts:
            opt.zero_grad(set_to_none=True)

    # --- the time budget ---------------------------------------------------------------------------------------------
    def fit_budget(self, budget_s: float) -> None:
        """Fit the schedule to the time budget from the pace of recent steps, so a decaying schedule completes;
        refitted every few percent of the run, because a shared machine can slow down later on. A budget that is
        spent ends the run whatever the fit said."""
        run, task = self.run, self.task
        now = self.elapsed()
        if task.budget_fit_from is not None and self.step >= self.next_fit:
            per_step = (now - self.fit_from[0]) / max(1, self.step - self.fit_from[1])
            fit = self.step + int((budget_s - now) / max(per_step, 1e-12))
            fit = dist.agree_min(fit, run.device)  # every rank must stop at the same step
            if fit < run.total_steps:
                run.total_steps = max(self.step + 1, fit)
                self.bar.total = run.total_steps
                if run.main:
                    budget = self.cfg.time_budget_min
                    print(f"[vislang] time budget {budget} min: schedule set to {run.total_steps} steps")
            self.fit_from, self.next_fit = (now, self.step), self.step + max(30, run.total_steps // 20)
        if run.world == 1 and now >= budget_s and self.step < run.total_steps:
            run.total_steps = self.step
            print(f"[vislang] time budget {self.cfg.time_budget_min} min spent: stopping at step {self.step}")

    def log_step(self, lrs: float | dict[str, float], usable: int) -> None:
        w, run = self.window, self.run
        dt = time.time() - w.t0
        rec: dict[str, Any] = {"step": self.step, "epoch": round(self.epoch + self.batch_in_epoch / max(1, usable), 4)}
        means = w.means()
        _check_finite(self.task, self.step, means.get("loss"), means)
        rec.update(means)
        if isinstance(lrs, dict):
            rec.update({f"lr_{k}": v for k, v in lrs.items()})
        else:
            rec["lr"] = lrs
        rec.update(samples_per_s=w.samples / max(dt, 1e-9), elapsed_s=round(self.elapsed(), 2))
        rec["precision"] = self.choice.precision
        mfu = self.mfu(dt / max(1, w.steps))
        if mfu is not None:
            rec.update(mfu=round(mfu, 4), gflop_per_step=round(self.flops_per_step / 1e9, 3))
        rec.update(self.task.log_fields(self.step))
        run.log(rec)
        post = {k: f"{rec[k]:.3f}" for k in ("loss", "loss_d", "loss_g") if k in rec}
        self.bar.set_postfix(**post, sps=f"{rec['samples_per_s']:.0f}", **({"mfu": f"{mfu:.0%}"} if mfu else {}))
        self.window = _Window()

    def evaluate(self) -> None:
        t0 = time.time()
        metrics = self.task.evaluate(self.step)
        if metrics and self.run.main:
            self.run.log({"step": self.step, **metrics})
            print(f"[vislang] step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.window.t0 += time.time() - t0  # evaluation time is not step time (samples/s, MFU)

    # --- the run -----------------------------------------------------------------------------------------------------
    def fit(self) -> Any:
        try:
            return self._fit()
        except BaseException:
            self.discard_empty_run()
            raise
        finally:
            self.task.close()

    def discard_empty_run(self) -> None:
        """A run that fails before its first step leaves no directory behind (only one this run created itself)."""
        created = self.created_out
        if created is None or not self.run.main or self.step > 0:
            return
        if self.ckpt_path is not None and self.ckpt_path.exists():
            return
        shutil.rmtree(created, ignore_errors=True)

    def _fit(self) -> Any:
        self.t_start = time.time()
        self.prepare()
        cfg, run, task = self.cfg, self.run, self.task
        self.t_start = time.time()
        self.bar = tqdm(
            total=run.total_steps, initial=self.step, disable=not (cfg.progress and run.main), desc=task.name,
            unit="step",
        )  # fmt: skip
        budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else None
        self.fit_from, self.next_fit = (self.elapsed(), self.step), self.step + (task.budget_fit_from or 0)
        self.window = _Window()
        while self.step < run.total_steps:
            usable = self.steps_in_epoch(self.epoch) * cfg.accum_steps
            self.run_epoch(usable, budget_s)
            if self.batch_in_epoch >= usable:  # the epoch ran to its end (not cut by the step limit)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if run.main:
                    note = task.epoch_note()
                    print(f"[vislang] epoch {self.epoch} done at step {self.step}" + (f": {note}" if note else ""))
                if not cfg.eval_every and self.step < run.total_steps:
                    self.evaluate()
                self.save()
        self.bar.close()
        self.save()
        self.evaluate()
        result = task.finish()
        dist.barrier()
        return result

    def run_epoch(self, usable: int, budget_s: float | None) -> None:
        cfg, run, task = self.cfg, self.run, self.task
        micro, lrs = 0, 0.0
        batches = itertools.islice(task.batches(self.epoch, self.batch_in_epoch), usable - self.batch_in_epoch)
        for batch in batches:
            if micro == 0:
                lrs = self.apply_lr()
            sync = micro + 1 == cfg.accum_steps
            metrics = self.micro_step(batch, sync)
            micro += 1
            self.batch_in_epoch += 1
            self.window.samples += task.samples(batch) * run.world
            self.window.add(metrics)
            if not sync:
                continue
            micro = 0
            self.window.steps += 1
            if task.automatic_optimization:
                self.optimizer_step()
            elif run.scaler is not None:
                run.scaler.update()
            self.step += 1
            self.bar.update(1)
            if budget_s:
                self.fit_budget(budget_s)
            if self.step % cfg.log_every == 0 or self.step == run.total_steps:
                self.log_step(lrs, usable)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.evaluate()
            task.after_step(self.step)
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
            if self.step >= run.total_steps:
                break


def fit(task: Task, cfg: TrainConfig, resume: bool = False) -> Any:
    """Run ``task`` as ``cfg`` says (resuming from ``cfg.out_dir``'s last checkpoint with ``resume``); returns what
    the task's ``finish`` returns (a model directory for ``vislang train``'s tasks)."""
    return Loop(task, cfg, resume).fit()
