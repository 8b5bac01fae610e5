"""End-to-end timing of a whole (tiny) network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fleetprune.errors import ProfileError
from fleetprune.profiler import TimingProtocol, cpu_device, deployed_forward, measure_model

CPU = cpu_device(1)
QUICK = TimingProtocol.quick()


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def test_measure_model_gives_sane_numbers_and_leaves_the_model_alone():
    model = _tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = measure_model(model, (1, 3, 16, 16), CPU, "fp32", "nchw", QUICK)
    assert 0 < m.p10_ms <= m.median_ms <= m.p90_ms
    assert m.median_ms < 1000
    assert m.n >= QUICK.repeats
    assert model.training  # the caller's model is not switched to eval
    assert next(model.parameters()).dtype == torch.float32
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched


SEEN: set = set()  # module-level, so the profiler's copy of the model reports here too


class Recorder(nn.Module):
    """Records what the timed forward passes see."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        SEEN.add((tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last),
                  x.is_contiguous(), self.training, torch.is_inference_mode_enabled()))
        return self.conv(x)


@pytest.mark.parametrize(
    "shape, dtype, fmt, expected",
    [
        ((3, 8, 8), "bf16", "nhwc", ((1, 3, 8, 8), torch.bfloat16, True, False)),  # (C, H, W): batch 1
        ((2, 3, 8, 8), "fp32", "nchw", ((2, 3, 8, 8), torch.float32, False, True)),
    ],
)
def test_forward_sees_the_configured_input_in_eval_and_inference_mode(shape, dtype, fmt, expected):
    SEEN.clear()
    m = measure_model(Recorder().train(), shape, CPU, dtype, fmt, QUICK)
    assert m.n >= QUICK.repeats
    assert SEEN == {(*expected, False, True)}


@pytest.mark.parametrize("dtype, fmt", [("fp32", "nhwc"), ("bf16", "nchw")])
def test_measure_model_in_other_dtype_and_format(dtype, fmt):
    m = measure_model(_tiny(), (1, 3, 16, 16), CPU, dtype, fmt, QUICK)
    assert m.median_ms > 0 and m.n > 0


def test_measure_model_errors_say_what_failed():
    with pytest.raises(ProfileError, match="fp16"):
        measure_model(_tiny(), (1, 3, 16, 16), CPU, "fp16", "nchw", QUICK)
    with pytest.raises(ProfileError, match="cannot run"):
        measure_model(_tiny(), (1, 4, 16, 16), CPU, "fp32", "nchw", QUICK)  # 4 channels into a 3-channel stem


def test_deployed_forward_is_the_folded_eval_network_prepared_once():
    model = _tiny().train()
    with torch.no_grad():  # non-trivial BN statistics, so that folding them in matters
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    torch.manual_seed(1)  # the prepared input is the first random draw after this
    fwd = deployed_forward(model, (2, 3, 16, 16), CPU, "fp32", "nhwc")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    assert model.training and isinstance(model[1], nn.BatchNorm2d)  # the caller's model is untouched
    with torch.inference_mode():
        out1, out2 = fwd(), fwd()
        ref = model.eval()(x)
    assert out1.shape == (2, 10) and torch.equal(out1, out2)  # one fixed input, one prepared network
    assert torch.allclose(out1, ref, atol=1e-4)  # BN folded: same function as the eval model
    with pytest.raises(ProfileError, match="cannot run"):
        deployed_forward(_tiny(), (1, 4, 16, 16), CPU)


@pytest.mark.gpu
def test_measure_model_on_cuda():
    from fleetprune.profiler import cuda_device

    m = measure_model(_tiny(), (8, 3, 32, 32), cuda_device(0), "fp16", "nhwc", QUICK)
    assert 0 < m.p10_ms <= m.median_ms <= m.p90_ms


def test_fold_bn_removes_batchnorm_and_keeps_outputs():
    """The network measured end to end is the deployed one: BN folded into its conv, same function."""
    import torch
    from torch import nn

    from fleetprune.deploy import fold_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    want = net(x)
    folded, ok = fold_batchnorm(net)
    assert ok
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-5)
