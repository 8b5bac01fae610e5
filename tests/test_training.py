"""The CIFAR-10 loader, the trainer, its checkpoints, the fine-tune hook and `fleetprune train`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fleetprune.errors import DataError
from fleetprune.training import (
    ImageData,
    Split,
    TrainConfig,
    augment_batch,
    cosine_lr,
    default_cifar_path,
    load_cifar10,
    load_state,
    make_finetune_hook,
    make_optimizer,
    measure,
    train,
)

REPO = Path(__file__).resolve().parents[1]
CIFAR = default_cifar_path(REPO)


@pytest.fixture(scope="module")
def cifar() -> ImageData:
    """512 train and 512 test images of the real file (only these are decoded)."""
    if not CIFAR.is_file():
        pytest.skip(f"CIFAR-10 file not at {CIFAR} (set FLEETPRUNE_CIFAR)")
    return load_cifar10(CIFAR, train=512, test=512, seed=0)


def synthetic(n_train: int = 64, n_test: int = 32, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (n,), generator=g))

    return ImageData({"train": split(n_train), "test": split(n_test)})


class Plain(nn.Module):
    """Conv-ReLU-pool-linear, no batch norm (its loss is comparable before and after training)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


class WithBN(nn.Module):
    """Conv-BN-ReLU twice, then a linear head: the shape the pruner masks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------- loader


def test_loader_gives_normalised_batches_with_valid_labels(cifar):
    assert cifar.classes[:3] == ("airplane", "automobile", "bird") and cifar.num_classes == 10
    assert cifar.split("train").images.dtype == torch.uint8
    xs, ys = [], []
    for x, y in cifar.batches("test", 128):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and x.shape[0] <= 128
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (512, 3, 32, 32)
    assert int(y.min()) >= 0 and int(y.max()) <= 9 and len(y.unique()) == 10
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    assert mean.abs().max() < 0.1, mean
    assert (std - 1).abs().max() < 0.1, std


def test_augmentation_changes_images_and_eval_path_does_not(cifar):
    raw = cifar.split("train").images[:64]
    eval1 = next(cifar.batches("train", 64))[0]
    eval2 = next(cifar.batches("train", 64, seed=5, epoch=3))[0]
    assert torch.equal(eval1, eval2)  # no randomness without augment/shuffle
    assert torch.allclose(eval1, cifar.normalize(raw))
    aug = next(cifar.batches("train", 64, augment=True))[0]
    changed = (aug - eval1).abs().flatten(1).amax(1) > 1e-6
    assert changed.float().mean() > 0.8  # 1 in 162 crop/flip draws is the identity
    again = next(cifar.batches("train", 64, augment=True))[0]
    other_epoch = next(cifar.batches("train", 64, augment=True, epoch=1))[0]
    assert torch.equal(aug, again)  # a pure function of (seed, epoch)
    assert not torch.equal(aug, other_epoch)


def test_augment_batch_is_a_padded_crop_or_its_mirror():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(2))
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        found = set()
        for dy in range(9):
            for dx in range(9):
                window = padded[i, :, dy:dy + 32, dx:dx + 32]
                found |= {f for f, w in ((0, window), (1, window.flip(2)))
                          if torch.equal(out[i], w)}
        assert found, f"image {i} is not a crop of the padded input"
        flips += min(found)
    assert 5 < flips < 35  # both flipped and unflipped occur


def test_subset_is_seeded_and_first_rows_without_seed():
    data = synthetic(n_train=100)
    a, b = data.subset(train=10, seed=3), data.subset(train=10, seed=3)
    c = data.subset(train=10, seed=4)
    assert torch.equal(a.split("train").images, b.split("train").images)
    assert not torch.equal(a.split("train").images, c.split("train").images)
    first = data.subset(train=10, seed=None)
    assert torch.equal(first.split("train").images, data.split("train").images[:10])
    assert len(a.split("test")) == 32  # untouched


def write_tiny_parquet(path: Path, n_train: int = 24, n_test: int = 8) -> torch.Tensor:
    """A CIFAR-shaped Parquet file of random JPEGs; returns the images Pillow decodes from it."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows, decoded = {"split": [], "label": [], "index": [], "jpeg": []}, []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
            decoded.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
            rows["split"].append(split)
            rows["label"].append(i % 10)
            rows["index"].append(i)
            rows["jpeg"].append(buf.getvalue())
    table = pa.table(rows).replace_schema_metadata({"classes": ",".join("abcdefghij")})
    pq.write_table(table, path)
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)


def test_loader_decodes_like_pillow_and_caches(tmp_path):
    path = tmp_path / "tiny.parquet"
    expected = write_tiny_parquet(path)
    data = load_cifar10(path)
    assert data.classes == tuple("abcdefghij")
    assert torch.equal(data.split("train").images, expected[:24])
    assert torch.equal(data.split("test").images, expected[24:])
    assert data.split("train").labels.tolist() == [i % 10 for i in range(24)]

    cache = tmp_path / "cache"
    first = load_cifar10(path, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob(".*"))
    path.write_bytes(b"")  # same path, new size: the cache must not be used...
    with pytest.raises(DataError):
        load_cifar10(path, cache_dir=cache)
    write_tiny_parquet(path)  # ...and rebuilt once the file is good again
    again = load_cifar10(path, cache_dir=cache, train=5, seed=3)
    direct = load_cifar10(path, train=5, seed=3)  # decodes only those 5
    assert torch.equal(again.split("train").images, direct.split("train").images)
    assert torch.equal(first.split("test").images, again.split("test").images)


def test_missing_or_malformed_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="not found.*--data"):
        load_cifar10(tmp_path / "nope.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_cifar10(junk)
    import pyarrow as pa
    import pyarrow.parquet as pq

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"split": ["train"], "label": [1]}), wrong)
    with pytest.raises(DataError, match=r"lacks column.*jpeg"):
        load_cifar10(wrong)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"split": ["train", "test"], "label": [1, 2], "index": [0, 0],
                             "jpeg": [b"\xff\xd8garbage", b"\xff\xd8garbage"]}), bad)
    with pytest.raises(DataError, match="not a decodable JPEG"):
        load_cifar10(bad)
    with pytest.raises(DataError, match="no split 'val'"):
        synthetic().split("val")


# ---------------------------------------------------------------- trainer


def test_cosine_schedule_with_warmup():
    assert cosine_lr(0, 100, 0.1) == pytest.approx(0.1)
    assert cosine_lr(50, 100, 0.1) == pytest.approx(0.05)
    assert cosine_lr(100, 100, 0.1, min_lr=0.001) == pytest.approx(0.001)
    assert cosine_lr(0, 100, 0.1, warmup=10) == pytest.approx(0.01)
    assert cosine_lr(10, 100, 0.1, warmup=10) == pytest.approx(0.1)


def test_no_weight_decay_on_norm_and_bias_when_asked():
    model = WithBN()
    opt = make_optimizer(model, TrainConfig(decay_norm_and_bias=False))
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.conv1.weight)] == 5e-4 and decays[id(model.fc.weight)] == 5e-4
    assert decays[id(model.bn1.weight)] == 0 and decays[id(model.fc.bias)] == 0


def test_one_finetune_epoch_on_512_images_lowers_training_loss(cifar):
    torch.manual_seed(0)
    model = WithBN()
    before = measure(model, cifar, "train").loss
    hook = make_finetune_hook(cifar, epochs_per_step=1, batch_size=32, lr=0.1)
    stats = hook(model, 1)
    after = measure(model, cifar, "train").loss
    assert stats.iterations == 16 and math.isfinite(stats.train_loss)
    assert after < before - 0.03, (before, after)  # about 0.07-0.1 over seeds 0-2


class Crash(Exception):
    pass


def test_checkpoint_resume_restores_epoch_and_weights(tmp_path):
    data = synthetic()  # 64 images, batch 16: 4 iterations per epoch
    config = TrainConfig(epochs=3, lr=0.05, batch_size=16, seed=0, progress=False)

    torch.manual_seed(0)
    straight = WithBN()
    train(straight, data, config)

    ckpt = tmp_path / "run" / "state.pt"
    calls = 0

    def crash_in_epoch_3(model: nn.Module) -> None:
        nonlocal calls
        calls += 1  # once before training, then once per optimizer step
        if calls == 1 + 2 * 4 + 2:
            raise Crash

    torch.manual_seed(0)
    first = WithBN()
    with pytest.raises(Crash):
        train(first, data, config, checkpoint=ckpt, after_step=crash_in_epoch_3)
    state = load_state(ckpt)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert not list(ckpt.parent.glob(".*"))  # no temp file left behind

    torch.manual_seed(123)
    resumed = WithBN()  # another init: everything must come from the checkpoint
    result = train(resumed, data, config, checkpoint=ckpt)
    assert result.start_epoch == 2 and result.epochs_done == 3
    assert [h.epoch for h in result.history] == [1, 2, 3]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert load_state(ckpt)["epoch"] == 3

    done = train(resumed, data, config, checkpoint=ckpt)  # nothing left to do
    assert done.start_epoch == 3 and len(done.history) == 3


def test_finetune_hook_keeps_masked_channels_at_zero():
    data = synthetic(n_train=64)
    torch.manual_seed(0)
    model = WithBN()
    masked = torch.tensor([1, 4, 5, 9, 14])
    keep = torch.ones(16, dtype=torch.bool)
    keep[masked] = False

    def reapply(m: WithBN) -> None:  # what the pruner's apply_masks does for one group
        m.conv1.weight[masked] = 0
        m.bn1.weight[masked] = 0
        m.bn1.bias[masked] = 0
        m.conv2.weight[:, masked] = 0

    @torch.no_grad()
    def masked_max(m: WithBN) -> float:
        return max(float(m.conv1.weight[masked].abs().max()),
                   float(m.bn1.weight[masked].abs().max()),
                   float(m.bn1.bias[masked].abs().max()),
                   float(m.conv2.weight[:, masked].abs().max()))

    hook = make_finetune_hook(data, epochs_per_step=1, batch_size=16, lr=0.1)
    hook(model, 0)  # dense fine-tuning first: the momentum buffers fill up
    before = model.conv1.weight.detach().clone()
    for step in (1, 2):
        stats = hook(model, step, reapply=reapply)
        assert stats.epoch == step and stats.iterations == 4
        assert masked_max(model) == 0
    assert not torch.allclose(model.conv1.weight[keep], before[keep])  # survivors trained
    momentum = hook._optimizer.state[model.conv1.weight]["momentum_buffer"]
    assert momentum[masked].abs().sum() > 0  # kept across steps, so it would revive them...

    hook(model, 3)  # ...as the same hook without reapply shows
    assert masked_max(model) > 0


def test_finetune_hook_continues_one_schedule_across_steps():
    data = synthetic(n_train=64)
    model = Plain()
    hook = make_finetune_hook(data, iters_per_step=2, total_steps=3, batch_size=16, lr=0.1)
    lrs = [hook(model, s).lr for s in (1, 2, 3)]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(
        cosine_lr(5, 6, 0.1))
    with pytest.raises(ValueError):
        make_finetune_hook(data)


# ---------------------------------------------------------------- CLI


def _has_model(name: str) -> bool:
    try:
        from fleetprune import models

        return name in models.names()
    except Exception:  # noqa: BLE001 - the models part may not be importable yet
        return False


def test_cli_without_data_says_what_to_pass(monkeypatch, capsys):
    from fleetprune.cli import main

    monkeypatch.delenv("FLEETPRUNE_CIFAR", raising=False)
    assert main(["train", "resnet20", "--no-progress"]) == 2
    assert "--data PATH" in capsys.readouterr().err


@pytest.mark.skipif(not _has_model("resnet20"), reason="fleetprune.models has no resnet20 yet")
def test_cli_trains_saves_loadable_weights_and_prints_top1(tmp_path, capsys):
    if not CIFAR.is_file():
        pytest.skip(f"CIFAR-10 file not at {CIFAR}")
    from fleetprune import models
    from fleetprune.cli import main

    out = tmp_path / "r20.pt"
    rc = main(["train", "resnet20", "--data", str(CIFAR), "--epochs", "1", "--subset", "128",
               "--test-subset", "100", "--batch-size", "64", "--out", str(out), "--no-progress",
               "--threads", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "on 100 test images" in text
    model = models.create("resnet20", weights=str(out))
    saved = torch.load(out, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "r20.pt.state").is_file()
