"""The device-resident data pipeline and the GPU training settings (channels_last, bf16 autocast).

Everything here runs on the CPU: the device path indexes and augments wherever the images live, so
on a CPU tensor it must give exactly the host path's batches. The test marked ``gpu`` repeats the
equality with the images on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fleetprune.errors import DeviceError
from fleetprune.training import ImageData, Split, TrainConfig, make_finetune_hook, measure, train


def learnable(n_train: int = 96, n_test: int = 48, seed: int = 0) -> ImageData:
    """Images whose class sets the mean colour (plus noise): a tiny conv net learns it in a few steps."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (10, 3, 1, 1), generator=g).float()

    def split(n: int) -> Split:
        labels = torch.randint(0, 10, (n,), generator=g)
        noise = torch.randn(n, 3, 32, 32, generator=g) * 20
        images = (palette[labels] + noise).clamp(0, 255).to(torch.uint8)
        return Split(images, labels)

    return ImageData({"train": split(n_train), "test": split(n_test)})


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _epoch(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.cpu(), y.cpu()) for x, y in batches]


@pytest.mark.parametrize("seed,epoch,batch,drop_last", [(0, 0, 32, True), (3, 7, 25, False)])
def test_device_batches_equal_the_host_path_for_the_same_seed_and_epoch(seed, epoch, batch, drop_last):
    data = learnable(n_train=100)
    kw = dict(augment=True, shuffle=True, seed=seed, epoch=epoch, drop_last=drop_last)
    host = _epoch(data.batches("train", batch, **kw))
    dev = _epoch(data.device_batches("train", batch, **kw))
    assert [x.shape[0] for x, _ in host] == [x.shape[0] for x, _ in dev]
    assert len(host) == (100 // batch if drop_last else -(-100 // batch))
    for (hx, hy), (dx, dy) in zip(host, dev):
        assert torch.equal(hy, dy)
        assert torch.equal(hx, dx)
    # Not trivially equal: another epoch draws another order and other crops.
    other = _epoch(data.device_batches("train", batch, **{**kw, "epoch": epoch + 1}))
    assert not torch.equal(other[0][0], dev[0][0])
    # Augmented: the first batch is not the plain normalised images in that order.
    plain = _epoch(data.batches("train", batch, shuffle=True, seed=seed, epoch=epoch, drop_last=drop_last))
    assert torch.equal(plain[0][1], dev[0][1]) and not torch.equal(plain[0][0], dev[0][0])


def test_device_batches_in_channels_last_hold_the_same_values():
    data = learnable(n_train=40)
    kw = dict(augment=True, shuffle=True, seed=1, epoch=2)
    (x, _), = _epoch(data.batches("train", 40, **kw))
    (xl, _), = _epoch(data.device_batches("train", 40, channels_last=True, **kw))
    assert xl.is_contiguous(memory_format=torch.channels_last) and not xl.is_contiguous()
    assert torch.equal(x, xl)
    assert data.to("cpu") is data  # already there: no copy


def test_training_on_the_device_pipeline_with_bf16_and_channels_last_lowers_the_loss():
    torch.manual_seed(0)
    data = learnable()
    model = Tiny()
    before = measure(model, data, "train").loss
    config = TrainConfig(epochs=4, lr=0.1, batch_size=32, seed=0, device="cpu", progress=False,
                         data_on_device=True, channels_last=True, amp="bf16")
    result = train(model, data, config)
    after = measure(model, data, "train", amp="bf16", channels_last=True).loss
    assert result.epochs_done == 4 and sum(h.iterations for h in result.history) == 12
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.conv.weight.dtype == torch.float32  # autocast leaves the weights in fp32
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert after < 0.7 * before, (before, after)


def test_finetune_hook_returns_the_model_where_and_how_it_found_it():
    data = learnable()
    model = Tiny()
    hook = make_finetune_hook(data, iters_per_step=2, device="cpu", data_on_device=True,
                              channels_last=True, amp="bf16", lr=0.05)
    w0 = model.conv.weight.detach().clone()
    stats = hook(model, 1)
    assert stats.iterations == 2 and torch.isfinite(torch.tensor(stats.train_loss))
    assert model.conv.weight.is_contiguous()  # back in the default memory format for the pruner
    assert not torch.equal(w0, model.conv.weight)
    ids = [id(p) for p in model.parameters()]
    hook(model, 2)
    assert [id(p) for p in model.parameters()] == ids and hook._optimizer is not None


def test_fp16_autocast_on_a_cpu_is_refused_with_what_to_use():
    config = TrainConfig(epochs=1, device="cpu", amp="fp16", progress=False)
    with pytest.raises(DeviceError, match="bf16"):
        train(Tiny(), learnable(), config)
    with pytest.raises(DeviceError, match="bf16, fp16 or none"):
        train(Tiny(), learnable(), TrainConfig(epochs=1, device="cpu", amp="int8", progress=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_batches_on_cuda_equal_the_host_path_and_train():
    data = learnable(n_train=100)
    kw = dict(augment=True, shuffle=True, seed=2, epoch=5, drop_last=True)
    host = _epoch(data.batches("train", 32, **kw))
    on_gpu = data.to("cuda")
    assert on_gpu.device.type == "cuda"
    gpu = _epoch(on_gpu.batches("train", 32, device="cuda", **kw))
    assert all(torch.equal(h[0], g[0]) and torch.equal(h[1], g[1]) for h, g in zip(host, gpu))
    model = Tiny()
    before = measure(model, data, "train").loss
    train(model, data, TrainConfig(epochs=4, lr=0.1, batch_size=32, device="cuda", progress=False,
                                   data_on_device=True, channels_last=True, amp="bf16"))
    assert measure(model, on_gpu, "train", amp="bf16").loss < 0.7 * before
