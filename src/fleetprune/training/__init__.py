"""fleetprune.training: the CIFAR-10 Parquet loader and an SGD + cosine trainer.

The trainer doubles as the pruner's fine-tune hook (:func:`make_finetune_hook`), which re-applies
channel masks after every optimizer step.
"""

from fleetprune.training.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR_ENV,
    ImageData,
    Split,
    augment_batch,
    default_cifar_path,
    load_cifar10,
)
from fleetprune.training.trainer import (
    AfterStep,
    EpochStats,
    FinetuneHook,
    Metrics,
    TrainConfig,
    TrainResult,
    cosine_lr,
    evaluate,
    load_state,
    make_finetune_hook,
    make_optimizer,
    measure,
    save_state,
    save_weights,
    train,
)

__all__ = [
    "AfterStep", "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR_ENV", "EpochStats",
    "FinetuneHook", "ImageData", "Metrics", "Split", "TrainConfig", "TrainResult",
    "augment_batch", "cosine_lr", "default_cifar_path", "evaluate", "load_cifar10",
    "load_state", "make_finetune_hook", "make_optimizer", "measure", "save_state",
    "save_weights", "train",
]
