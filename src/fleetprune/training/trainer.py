"""SGD + cosine training, evaluation, checkpoints, and the pruner's fine-tune hook.

One loop serves two callers: :func:`train` (a dense model, epochs, resumable checkpoints) and
:class:`FinetuneHook` (short bursts between pruning steps, one optimizer kept across steps). Both
take an ``after_step``/``reapply`` callable run under ``torch.no_grad()`` after every optimizer step,
which is how the pruner keeps masked channels at zero: weight decay and momentum would otherwise
move them off zero again.

On a GPU, three opt-in settings of :class:`TrainConfig` make the loop device-bound rather than
host-bound: ``data_on_device`` (the decoded uint8 images live on the device and are augmented
there, :meth:`ImageData.device_batches`), ``channels_last`` (NHWC model and batches) and ``amp``
(``bf16`` or ``fp16`` autocast; fp16 with a gradient scaler). All three also run on a CPU (fp16
autocast excepted), so the GPU path can be smoke-tested anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fleetprune.errors import DeviceError, ModelError
from fleetprune.training.data import ImageData

log = logging.getLogger(__name__)

#: Called after every optimizer step (under ``torch.no_grad()``), e.g. to re-apply channel masks.
AfterStep = Callable[[nn.Module], None]

_STATE_FORMAT = "fleetprune-train-state"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults: the CIFAR recipe of method.md §6).

    Attributes:
        epochs: epochs to train; the cosine schedule spans exactly these.
        lr: peak learning rate (after warm-up).
        batch_size: images per optimizer step.
        weight_decay: L2 coefficient.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        decay_norm_and_bias: apply weight decay to normalisation weights and biases too (the
            classic CIFAR recipe does; HALP's ImageNet recipe does not).
        warmup_epochs: linear warm-up from 0 to ``lr``, part of ``epochs``.
        min_lr: floor of the cosine schedule.
        label_smoothing: cross-entropy label smoothing.
        seed: seeds ``torch.manual_seed`` and the data order (which depends on (seed, epoch) only).
        threads: ``torch.set_num_threads`` for the run (restored afterwards); None leaves it.
        device: where to train; None keeps the model where it is.
        progress: show a tqdm bar per epoch.
        eval_every: evaluate on ``test`` every this many epochs (0: never during training).
        data_on_device: copy the decoded images to ``device`` once and augment them there
            (:meth:`ImageData.device_batches`; the same batches as the host path).
        channels_last: train in NHWC (model and batches); the usual choice on tensor-core GPUs.
        amp: mixed precision for forward and loss: None (fp32), ``"bf16"`` or ``"fp16"`` (CUDA
            only; with a gradient scaler). Weights and optimizer state stay fp32.
    """

    epochs: int = 200
    lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = False
    decay_norm_and_bias: bool = True
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    threads: int | None = None
    device: str | None = None
    progress: bool = True
    eval_every: int = 0
    data_on_device: bool = False
    channels_last: bool = False
    amp: str | None = None


@dataclass
class EpochStats:
    """What one epoch (or, for the fine-tune hook, one pruning step's burst) did."""

    epoch: int
    train_loss: float
    train_top1: float
    lr: float
    iterations: int
    seconds: float
    test_top1: float | None = None


@dataclass
class TrainResult:
    """History of a run. ``start_epoch`` > 0 means it resumed from a checkpoint."""

    history: list[EpochStats] = field(default_factory=list)
    start_epoch: int = 0
    epochs_done: int = 0

    @property
    def losses(self) -> list[float]:
        return [h.train_loss for h in self.history]


@dataclass
class Metrics:
    """Evaluation of a model on one split: top-1 accuracy in [0, 1] and mean cross-entropy."""

    top1: float
    loss: float
    n: int


def cosine_lr(it: int, total: int, lr: float, *, warmup: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate at iteration ``it`` of ``total``: linear warm-up, then cosine to ``min_lr``.

    A pure function of the iteration, so resuming needs no scheduler state.
    """
    if warmup > 0 and it < warmup:
        return lr * (it + 1) / warmup
    span = max(total - warmup, 1)
    t = min(max(it - warmup, 0), span) / span
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum; with ``decay_norm_and_bias=False`` 1-d parameters get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.decay_norm_and_bias:
        groups = [{"params": params, "weight_decay": config.weight_decay}]
    else:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0)


def measure(model: nn.Module, data: ImageData, split: str = "test", *, batch_size: int = 500,
            device: str | torch.device | None = None, progress: bool = False,
            amp: str | None = None, channels_last: bool = False) -> Metrics:
    """Top-1 and mean loss of ``model`` on ``split``, in eval mode, without augmentation.

    ``data`` may already live on the device (:meth:`ImageData.to`); ``amp`` and
    ``channels_last`` as in :class:`TrainConfig` (the loss is computed in fp32).
    """
    dev = _device(model, device)
    autocast = _autocast(dev, amp)
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    bar = _bar(data.num_batches(split, batch_size), f"eval {split}", progress)
    try:
        with torch.no_grad():
            for x, y in data.batches(split, batch_size, device=dev):
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    out = model(x)
                out = out.float()
                loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
                correct += int((out.argmax(1) == y).sum())
                n += int(y.numel())
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return Metrics(top1=correct / max(n, 1), loss=loss_sum / max(n, 1), n=n)


def evaluate(model: nn.Module, data: ImageData, split: str = "test", **kwargs) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``split`` (see :func:`measure`)."""
    return measure(model, data, split, **kwargs).top1


def train(
    model: nn.Module,
    data: ImageData,
    config: TrainConfig,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    after_step: AfterStep | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data``'s ``train`` split.

    Args:
        checkpoint: a training-state file (weights, optimizer, epochs done, history), written
            atomically after every epoch; if it exists, training resumes from it.
        after_step: run after every optimizer step under ``torch.no_grad()`` (mask re-application).

    Raises:
        ModelError: the checkpoint does not fit the model, or the loss became non-finite.
    """
    dev = _device(model, config.device)
    _autocast(dev, config.amp)  # an unusable setting fails before any work
    model.to(dev)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    source = data.to(dev) if config.data_on_device else data
    scaler = _scaler(dev, config.amp)
    with _threads(config.threads):
        torch.manual_seed(config.seed)
        optimizer = make_optimizer(model, config)
        result = TrainResult()
        if checkpoint is not None and Path(checkpoint).is_file():
            result.start_epoch, result.history = _load_state(checkpoint, model, optimizer, config)
            log.info("resuming from %s after epoch %d", checkpoint, result.start_epoch)
        result.epochs_done = result.start_epoch
        if after_step is not None:
            with torch.no_grad():
                after_step(model)
        per_epoch = data.num_batches("train", config.batch_size, drop_last=True)
        total = config.epochs * per_epoch
        warmup = round(config.warmup_epochs * per_epoch)
        schedule = lambda it: cosine_lr(it, total, config.lr, warmup=warmup,  # noqa: E731
                                        min_lr=config.min_lr)
        for epoch in range(result.start_epoch, config.epochs):
            batches = source.batches("train", config.batch_size, augment=True, shuffle=True,
                                     seed=config.seed, epoch=epoch, drop_last=True, device=dev)
            stats = _run(model, optimizer, batches, per_epoch, config, schedule,
                         first_it=epoch * per_epoch, after_step=after_step,
                         desc=f"epoch {epoch + 1}/{config.epochs}", scaler=scaler)
            stats.epoch = epoch + 1
            if config.eval_every and (epoch + 1) % config.eval_every == 0:
                stats.test_top1 = evaluate(model, source, "test", device=dev, amp=config.amp,
                                           channels_last=config.channels_last)
            result.history.append(stats)
            result.epochs_done = epoch + 1
            log.info("epoch %d/%d: loss %.4f, train top-1 %.4f, lr %.4g, %.1f s%s",
                     epoch + 1, config.epochs, stats.train_loss, stats.train_top1, stats.lr,
                     stats.seconds,
                     "" if stats.test_top1 is None else f", test top-1 {stats.test_top1:.4f}")
            if checkpoint is not None:
                save_state(checkpoint, model, optimizer, epoch + 1, result.history, config)
    return result


class FinetuneHook:
    """The pruner's fine-tune hook: ``hook(model, step, reapply=None) -> EpochStats``.

    Each call trains ``model`` in place for ``iters_per_step`` iterations (or ``epochs_per_step``
    epochs) with augmentation, then returns. Between calls it keeps one SGD optimizer (momentum
    carries over, as in HALP's uninterrupted loop) and one data stream (each call continues where
    the previous one stopped). The optimizer is rebuilt if the model's parameters change
    (another model, or channels physically removed).

    Learning rate: with ``total_steps`` one cosine spans all steps' iterations; without it each
    call runs its own cosine from ``config.lr`` down to ``config.min_lr``.

    ``reapply(model)`` is called under ``torch.no_grad()`` once before training and after every
    optimizer step, so masked (zeroed) channels stay exactly zero.

    With ``config.device`` set (a GPU, say), each call moves the model there for its burst and back
    to where it came from afterwards (and back to the default memory format after a
    ``channels_last`` burst), so a pruner that works on the CPU never sees the move. Parameters
    keep their identity across moves, so the optimizer and its momentum carry over.
    """

    def __init__(self, data: ImageData, config: TrainConfig | None = None, *,
                 epochs_per_step: float | None = None, iters_per_step: int | None = None,
                 total_steps: int | None = None):
        if (epochs_per_step is None) == (iters_per_step is None):
            raise ValueError("give exactly one of epochs_per_step and iters_per_step")
        self.data = data
        self.config = config or TrainConfig(epochs=1)
        per_epoch = data.num_batches("train", self.config.batch_size, drop_last=True)
        self.iters_per_step = (iters_per_step if iters_per_step is not None
                               else max(1, round(epochs_per_step * per_epoch)))
        self.total_steps = total_steps
        self.calls = 0
        self._optimizer: torch.optim.SGD | None = None
        self._params: list[tuple[int, tuple[int, ...]]] = []
        self._stream: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._stream_device: torch.device | None = None
        self._scaler = None

    def __call__(self, model: nn.Module, step: int, reapply: AfterStep | None = None
                 ) -> EpochStats:
        cfg = self.config
        home = _device(model, None)
        dev = _device(model, cfg.device)
        _autocast(dev, cfg.amp)
        model.to(dev)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        try:
            stats = self._burst(model, step, reapply, dev)
        finally:
            if cfg.channels_last:
                model.to(memory_format=torch.contiguous_format)
            model.to(home)
        return stats

    def _burst(self, model: nn.Module, step: int, reapply: AfterStep | None, dev: torch.device
               ) -> EpochStats:
        cfg = self.config
        if self._scaler is None:
            self._scaler = _scaler(dev, cfg.amp)
        with _threads(cfg.threads):
            if self.calls == 0:
                torch.manual_seed(cfg.seed)
            params = [(id(p), tuple(p.shape)) for p in model.parameters()]
            if self._optimizer is None or params != self._params:
                self._optimizer = make_optimizer(model, cfg)
                self._params = params
            if self._stream is None or self._stream_device != dev:
                self._stream = self._batches(dev)
                self._stream_device = dev
            if reapply is not None:
                with torch.no_grad():
                    reapply(model)
            n = self.iters_per_step
            if self.total_steps:
                total, first = self.total_steps * n, self.calls * n
            else:
                total, first = n, 0
            schedule = lambda it: cosine_lr(it, total, cfg.lr, min_lr=cfg.min_lr)  # noqa: E731
            stats = _run(model, self._optimizer, self._stream, n, cfg, schedule, first_it=first,
                         after_step=reapply, desc=f"fine-tune step {step}", scaler=self._scaler)
        stats.epoch = step
        self.calls += 1
        log.info("fine-tune step %s: %d iterations, loss %.4f, top-1 %.4f, %.1f s",
                 step, n, stats.train_loss, stats.train_top1, stats.seconds)
        return stats

    def _batches(self, dev: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        source = self.data.to(dev) if self.config.data_on_device else self.data
        epoch = 0
        while True:
            yield from source.batches("train", self.config.batch_size, augment=True,
                                      shuffle=True, seed=self.config.seed, epoch=epoch,
                                      drop_last=True, device=dev)
            epoch += 1


def make_finetune_hook(data: ImageData, epochs_per_step: float | None = None, *,
                       iters_per_step: int | None = None, total_steps: int | None = None,
                       config: TrainConfig | None = None, **overrides) -> FinetuneHook:
    """A :class:`FinetuneHook`; ``overrides`` set :class:`TrainConfig` fields (lr=0.01, ...).

    The default config has ``progress=False``: a pruning run prints its own progress.
    """
    base = config or TrainConfig(epochs=1, progress=False)
    if overrides:
        base = TrainConfig(**{**asdict(base), **overrides})
    return FinetuneHook(data, base, epochs_per_step=epochs_per_step,
                        iters_per_step=iters_per_step, total_steps=total_steps)


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model.state_dict()`` (tensors only, no pickled modules) atomically.

    Tensors are written contiguous on the CPU, whatever device and memory format trained them.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return _atomic_save(state, Path(path))


def save_state(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer,
               epoch: int, history: list[EpochStats], config: TrainConfig) -> Path:
    """Write a resumable training state (weights, optimizer, epochs done, history) atomically."""
    state = {
        "format": _STATE_FORMAT,
        "version": 1,
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "history": [asdict(h) for h in history],
        "config": asdict(config),
    }
    return _atomic_save(state, Path(path))


def load_state(path: str | os.PathLike[str]) -> dict:
    """Read a training state written by :func:`save_state` (``weights_only``: no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ModelError(f"cannot read training state {path} ({exc}); delete it to start over"
                         ) from None
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ModelError(f"{path} is not a fleetprune training state; pass another path")
    return state


def _load_state(path, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig
                ) -> tuple[int, list[EpochStats]]:
    state = load_state(path)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(
            f"training state {path} does not fit this model ({exc}); pass another --state path "
            "or delete it to start over"
        ) from None
    saved = state.get("config", {})
    changed = [k for k in ("epochs", "lr", "batch_size", "seed")
               if k in saved and saved[k] != getattr(config, k)]
    if changed:
        log.warning("resuming %s with changed %s; the schedule differs from the saved run",
                    path, ", ".join(f"{k} {saved[k]}->{getattr(config, k)}" for k in changed))
    history = [EpochStats(**h) for h in state.get("history", [])]
    return int(state["epoch"]), history


def _atomic_save(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique dot-name opened with "xb" (not mkstemp) so the file gets the umask's permissions.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _run(model: nn.Module, optimizer: torch.optim.Optimizer,
         batches: Iterator[tuple[torch.Tensor, torch.Tensor]], iterations: int,
         config: TrainConfig, schedule: Callable[[int], float], *, first_it: int,
         after_step: AfterStep | None, desc: str, scaler=None) -> EpochStats:
    """``iterations`` optimizer steps over ``batches``; returns running loss and top-1."""
    model.train()
    autocast = _autocast(_device(model, None), config.amp)
    # Running sums stay on the model's device; reading them syncs, so only every 20 steps.
    loss_sum = correct = None
    seen, done, lr = 0, 0, config.lr
    start = time.perf_counter()
    bar = _bar(iterations, desc, config.progress)
    try:
        for i, (x, y) in enumerate(batches):
            lr = schedule(first_it + i)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                out = model(x)
            out = out.float()
            loss = nn.functional.cross_entropy(out, y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(model)
            with torch.no_grad():
                batch_loss = loss.detach().double() * y.numel()
                batch_correct = (out.argmax(1) == y).sum()
                loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
                correct = batch_correct if correct is None else correct + batch_correct
            seen += int(y.numel())
            done += 1
            bar.update(1)
            if done % 20 == 0 or done == iterations:
                mean = float(loss_sum) / seen
                if not math.isfinite(mean):
                    raise ModelError(
                        f"training diverged ({desc}, iteration {done}: loss {mean}); "
                        "lower the learning rate (--lr)"
                    )
                bar.set_postfix(loss=f"{mean:.3f}", top1=f"{int(correct) / seen:.3f}",
                                lr=f"{lr:.3g}")
            if done == iterations:
                break
    finally:
        bar.close()
    return EpochStats(epoch=0, train_loss=float(loss_sum or 0.0) / max(seen, 1),
                      train_top1=int(correct or 0) / max(seen, 1), lr=lr, iterations=done,
                      seconds=time.perf_counter() - start)


_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(dev: torch.device, amp: str | None):
    """The autocast context for ``amp`` on ``dev`` (a no-op context for fp32).

    Raises:
        DeviceError: an unknown setting, or fp16 on a CPU.
    """
    if amp in (None, "", "none", "fp32"):
        return contextlib.nullcontext()
    if amp not in _AMP:
        raise DeviceError(f"unknown mixed-precision setting {amp!r}; use bf16, fp16 or none")
    if amp == "fp16" and dev.type != "cuda":
        raise DeviceError(f"fp16 autocast needs a CUDA device (training on {dev}); use bf16 or none")
    return torch.autocast(dev.type, dtype=_AMP[amp])


def _scaler(dev: torch.device, amp: str | None):
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    return torch.amp.GradScaler(dev.type) if amp == "fp16" else None


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="it",
                dynamic_ncols=True)
