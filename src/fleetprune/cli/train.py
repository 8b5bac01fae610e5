"""``fleetprune train MODEL --data PATH``: train a CIFAR-10 model, evaluate it, save its weights."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` verb to the ``fleetprune`` parser."""
    p = subparsers.add_parser(
        "train",
        help="train a model on CIFAR-10 (SGD, cosine LR), print its top-1, save its weights",
        description="Train MODEL on the CIFAR-10 Parquet file. The saved weights are a state_dict "
        "that `fleetprune.models.create(MODEL, weights=OUT)` loads. Training resumes from --state "
        "if that file exists.",
    )
    p.add_argument("model", metavar="MODEL", help="model name, e.g. resnet20 or resnet56")
    p.add_argument("--data", metavar="PATH", default=os.environ.get("FLEETPRUNE_CIFAR"),
                   help="cifar10-jpeg.parquet (default: $FLEETPRUNE_CIFAR)")
    p.add_argument("--epochs", type=int, default=200, help="epochs (default 200)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default 5e-4)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up epochs")
    p.add_argument("--no-decay-norm-bias", action="store_true",
                   help="no weight decay on normalisation weights and biases")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and subset")
    p.add_argument("--subset", type=int, metavar="N",
                   help="train on a seeded sample of N training images (quick runs)")
    p.add_argument("--test-subset", type=int, metavar="N",
                   help="evaluate on a seeded sample of N test images")
    p.add_argument("--out", metavar="CKPT", help="weights file to write (default: MODEL.pt)")
    p.add_argument("--state", metavar="PATH",
                   help="resumable training state, written every epoch (default: CKPT.state)")
    p.add_argument("--weights", metavar="PATH", help="start from these weights instead of random")
    p.add_argument("--cache", metavar="DIR", help="keep a decoded copy of the data here")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: the CPUs this process may use)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--data-on-device", action="store_true",
                   help="copy the decoded images to the device once and augment them there "
                   "(same batches as the default host path; the fast path on a GPU)")
    p.add_argument("--channels-last", action="store_true", help="train in NHWC (channels_last)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="autocast precision of forward and loss (default none = fp32; fp16 on "
                   "CUDA only); the saved weights are fp32 either way")
    p.add_argument("--json", metavar="PATH",
                   help="also write the command, settings, epochs, seconds and test top-1 here")
    p.add_argument("--eval-every", type=int, default=0, metavar="E",
                   help="also evaluate on the test split every E epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    # Imported here so `fleetprune --help` does not pay for torch.
    import json
    import time

    import torch

    from fleetprune import models
    from fleetprune.errors import DataError
    from fleetprune.training import TrainConfig, load_cifar10, measure, save_weights, train

    if not args.data:
        raise DataError("no dataset given: pass --data PATH to cifar10-jpeg.parquet "
                        "(e.g. ../shared/data/cifar10-jpeg.parquet) or set FLEETPRUNE_CIFAR")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1")
    affinity = getattr(os, "sched_getaffinity", None)
    threads = args.threads or (len(affinity(0)) if affinity else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    amp = None if args.amp == "none" else args.amp
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels

    shape = models.input_shape(args.model)  # an unknown name fails here, before decoding
    if tuple(shape) != (3, 32, 32):
        log.warning("%s expects %s inputs; training it on 32x32 CIFAR-10 images", args.model,
                    tuple(shape))
    data = load_cifar10(args.data, cache_dir=args.cache, train=args.subset,
                        test=args.test_subset, seed=args.seed)
    torch.manual_seed(args.seed)
    model = models.create(args.model, weights=args.weights, num_classes=data.num_classes)
    out = Path(args.out or f"{args.model}.pt")
    state = Path(args.state) if args.state else out.with_name(out.name + ".state")
    config = TrainConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        weight_decay=args.weight_decay, momentum=args.momentum,
        warmup_epochs=args.warmup_epochs, decay_norm_and_bias=not args.no_decay_norm_bias,
        seed=args.seed, device=device, progress=not args.no_progress,
        eval_every=args.eval_every, data_on_device=args.data_on_device,
        channels_last=args.channels_last, amp=amp,
    )
    started = time.perf_counter()
    result = train(model, data, config, checkpoint=state)
    seconds = time.perf_counter() - started
    if result.start_epoch:
        print(f"resumed from {state} after epoch {result.start_epoch}")
    save_weights(model, out)
    # The reported figure is fp32, as anyone loading the saved weights will see it.
    metrics = measure(model, data.to(device) if args.data_on_device else data, "test",
                      device=device, progress=not args.no_progress)
    last = result.history[-1] if result.history else None
    train_note = (f", last epoch train loss {last.train_loss:.4f} top-1 {100 * last.train_top1:.2f}%"
                  if last else "")
    print(f"{args.model}: top-1 {100 * metrics.top1:.2f}% on {metrics.n} test images "
          f"(loss {metrics.loss:.4f}) after {result.epochs_done} epochs{train_note}")
    print(f"weights: {out}  (training state: {state})")
    if args.json:
        record = {
            "command": _command(args),
            "model": args.model, "seed": args.seed, "epochs": result.epochs_done,
            "test_top1": metrics.top1, "test_loss": metrics.loss, "test_images": metrics.n,
            "train_images": len(data.split("train")), "weights": str(out),
            "train_seconds": seconds, "resumed_after_epoch": result.start_epoch,
            "device": str(device), "device_name": torch.cuda.get_device_name(device)
            if torch.device(device).type == "cuda" else "cpu",
            "torch": torch.__version__,
            "config": {k: v for k, v in vars(config).items() if k != "progress"},
            "history": [vars(h) for h in result.history],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"summary: {args.json}")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The ``fleetprune train`` command line that reproduces ``args`` (every option spelled out)."""
    import shlex

    words = ["fleetprune", "train", args.model]
    for key, value in sorted(vars(args).items()):
        if key in ("model", "func", "command", "verb", "verbose") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)
