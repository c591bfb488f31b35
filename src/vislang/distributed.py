"""Small helpers around ``torch.distributed`` that degrade to no-ops on a single process.

Training code calls these unconditionally, so the same loop runs on a laptop (one process, nothing initialised)
and under ``torchrun`` (several processes, one per device). Nothing here starts processes; ``torchrun`` does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "GlobalBatchNorm",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "gather_features",
    "gather_tensor",
    "global_batchnorm",
    "global_share",
    "init_distributed",
    "is_dist",
    "rank",
    "world_size",
]


def is_dist() -> bool:
    """True when a process group is initialised (i.e. we are one of several ranks)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks, 1 without a process group."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process' global rank, 0 without a process group."""
    return dist.get_rank() if is_dist() else 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group from ``torchrun``'s environment and pick this rank's device.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (``MASTER_ADDR``/``MASTER_PORT`` are read by torch itself).
    The backend defaults to ``nccl`` when CUDA is available, else ``gloo``. With ``WORLD_SIZE`` unset or 1 nothing
    is initialised and ``(0, 1, device)`` comes back, so single-process runs need no special casing. Calling it
    again once a group exists just reports the existing group.

    Returns:
        ``(rank, world_size, device)``; ``device`` is ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``.
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        # Guard against LOCAL_RANK beyond the visible devices (e.g. CUDA_VISIBLE_DEVICES set per process).
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if is_dist():
        return dist.get_rank(), dist.get_world_size(), device

    ws = _env_int("WORLD_SIZE", 1)
    if ws <= 1:
        return 0, 1, device
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={ws} but this torch build has no torch.distributed support")

    rk = _env_int("RANK", local_rank)
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    kwargs = {}
    if backend == "nccl" and use_cuda:
        # Binding the group to this rank's device avoids NCCL guessing (and warning about) the device.
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, init_method="env://", rank=rk, world_size=ws, **kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    """Wait for all ranks; a no-op on one process."""
    if is_dist():
        dist.barrier()


def agree_min(value: int, device: torch.device | None = None) -> int:
    """The smallest ``value`` over ranks: decisions every rank must share (such as where a time-budgeted run stops)
    taken from per-rank measurements; ``value`` itself on one process."""
    if not (is_dist() and world_size() > 1):
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (for logging), returned as a new tensor; a copy of ``t`` on one process.

    Integer tensors come back as float64 (a mean of integers is not an integer).

    Not differentiable: it is meant for metrics, not for losses (DDP already averages gradients).
    """
    out = t.detach().clone()
    if not out.is_floating_point():
        out = out.double()
    if is_dist() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= world_size()
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums each slot's gradient over ranks and returns it to its owner.

    Every rank computes a loss from the gathered tensor, so the gradient for rank ``r``'s rows exists on all ranks;
    the owner needs their sum (reduce-scatter). This replaces ``torch.distributed.nn.functional.all_gather``,
    which computes the same thing but is deprecated (FutureWarning) in recent torch releases.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [W*B, ...]
        ws = dist.get_world_size()
        tensor = tensor.contiguous()
        out = tensor.new_empty((ws * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # [W*B, ...] -> [B, ...]
        ws, rk = dist.get_world_size(), dist.get_rank()
        grad_output = grad_output.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            grad = grad_output.new_empty((grad_output.shape[0] // ws, *grad_output.shape[1:]))
            dist.reduce_scatter_tensor(grad, grad_output, op=dist.ReduceOp.SUM)
            return grad
        # Backends without a reliable reduce-scatter (gloo): all-reduce then keep our slice; features are small.
        summed = grad_output.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.chunk(ws, dim=0)[rk].contiguous()


def gather_tensor(t: torch.Tensor, gather_with_grad: bool = True, keep_local_grad: bool = True) -> torch.Tensor:
    """Concatenate ``t`` (``[B, ...]``) of all ranks along dim 0: ``[world*B, ...]``, rank ``r``'s rows at
    ``[r*B, (r+1)*B)``. All ranks must pass the same shape.

    * ``gather_with_grad=True``: differentiable all-gather. Its backward sums the gradients every rank computed
      for a slot and hands the sum to the rank owning it (what ``torch.distributed.nn.functional.all_gather``
      does), so with DDP's gradient averaging the parameter gradients match one process on the global batch.
    * ``gather_with_grad=False``: a plain all-gather without graph (cheaper). With ``keep_local_grad`` the local
      tensor is put back into its own slot so the local encoder still gets the gradient of its own rows.

    On one process ``t`` is returned unchanged.
    """
    if not is_dist() or world_size() == 1:
        return t
    if gather_with_grad:
        return _AllGatherWithGrad.apply(t)
    gathered = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(gathered, t.detach().contiguous())
    if keep_local_grad:
        gathered[rank()] = t
    return torch.cat(gathered, dim=0)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the ``[B, D]`` features of all ranks along the batch: returns two ``[world*B, D]`` tensors.

    Rank ``r``'s rows sit at ``[r*B, (r+1)*B)``. All ranks must pass the same ``B`` (the data loader drops
    incomplete batches for that reason).

    * ``gather_with_grad=True``: differentiable all-gather; combined with DDP's gradient averaging the parameter
      gradients equal those of one process on the global batch (see :func:`gather_tensor`).
    * ``gather_with_grad=False``: a plain all-gather (no graph), after which - unless ``local_loss`` - the local
      tensors are put back into their own slot so that at least the local features receive gradients (OpenCLIP's
      behaviour). This is cheaper but the gradients only approximate the global-batch ones (with the global loss
      the feature-path parameter gradients come out as ``1/world`` of them after DDP averaging). With
      ``local_loss`` the caller uses its local tensors directly for the rows of the logits, so the gathered slots
      are left without graph, as OpenCLIP does.

    On one process the inputs are returned unchanged.
    """
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image and text batch sizes differ: {image_features.shape[0]} vs {text_features.shape[0]}")
    keep = not local_loss
    all_image = gather_tensor(image_features, gather_with_grad=gather_with_grad, keep_local_grad=keep)
    all_text = gather_tensor(text_features, gather_with_grad=gather_with_grad, keep_local_grad=keep)
    return all_image, all_text


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks too: every rank's loss reads the sum, so
    each rank's contribution gets the gradient of all of those losses (with DDP's averaging, that of one process)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``t`` over ranks (``t`` itself on one process): statistics every rank's loss must read
    over the global batch, such as :class:`GlobalBatchNorm`'s."""
    if not is_dist() or world_size() == 1:
        return t
    return _AllReduceSumWithGrad.apply(t)


@torch.no_grad()
def global_share(count: int, device: torch.device | None = None) -> float:
    """``count · world / (sum of count over ranks)``: the factor that turns this rank's mean over its ``count`` items
    into its part of the mean over the global batch, once DDP averages the ranks' gradients. Ranks whose batches hold
    different numbers of loss terms (a VQA step's questions) need it to match one process; 1.0 on one process."""
    if not is_dist() or world_size() == 1:
        return 1.0
    total = torch.tensor([int(count)], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    if int(total.item()) == 0:
        raise ValueError("no rank has anything to learn from in this step (an empty global batch)")
    return int(count) * world_size() / int(total.item())


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks' rows), as one process on that
    batch would compute them; on one process, or in eval mode, plain BatchNorm.

    Why not ``nn.SyncBatchNorm``: it runs on GPUs only, and ``torchrun`` on CPUs (gloo) must train as one process does
    too. Two differentiable all-reduces (the sum, then the squared deviations from the global mean, as a two-pass
    variance is exact where E[x²] - E[x]² cancels) work on every backend and with different row counts per rank.
    Parameters and buffers are BatchNorm's, so checkpoints and saved models do not change."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects at least 2-D input (N, C, ...), got {x.dim()}-D")

    local = False  # True: this process's statistics alone (see ``local_statistics``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.local or not (self.training and is_dist() and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        n = all_reduce_sum(torch.tensor(float(xf.numel() // max(xf.shape[1], 1)), device=x.device))
        mean = all_reduce_sum(xf.sum(dims)) / n  # (C,)
        var = all_reduce_sum((xf - mean.view(shape)).pow(2).sum(dims)) / n  # (C,) biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


@contextlib.contextmanager
def local_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`GlobalBatchNorm` in ``module`` normalises by this process's batch alone.

    Why: work that one rank does by itself in train mode (re-estimating BatchNorm statistics before the main process
    evaluates) would otherwise wait in an all-reduce for ranks that never join it: a hang under torchrun."""
    layers = [m for m in module.modules() if isinstance(m, GlobalBatchNorm)]
    for m in layers:
        m.local = True
    try:
        yield
    finally:
        for m in layers:
            m.local = False


def global_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm (1-D, 2-D, 3-D) replaced, in place, by a :class:`GlobalBatchNorm` holding the
    same parameters and buffers; returns the module (a new one only if ``module`` itself is a BatchNorm).

    ``Run.ddp`` applies it, so that under ``torchrun`` a model with BatchNorm trains as one process on the global batch
    does (per-rank statistics would normalise each rank's rows by its own batch alone)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (GlobalBatchNorm, nn.SyncBatchNorm)
    ):
        m = module
        new = GlobalBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        # The very tensors, not copies: optimizers built before the conversion keep updating them.
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(new, name, t)
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        new_child = global_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
