"""Post-training quantisation: ranges from the calibration batches, bias correction by its formula, restore."""

import pytest
import torch
from torch import nn

from lightning_compress import CompressionConfigError, restore
from lightning_compress.core import quantization as q


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.normal_(0, 0.1)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 1, 8, 8, generator=g) for _ in range(n)]


def test_ranges_are_the_calibration_batches_min_max_and_batchnorm_is_untouched():
    model = _model()
    batches = _batches()
    stats = model[1].running_mean.clone(), model[1].running_var.clone()
    done = q.calibrate(model, batches)
    first = getattr(model[0], q.INPUT_QUANT)
    data = torch.cat(batches)
    assert float(first.min_val) == float(data.min()) and float(first.max_val) == float(data.max())
    assert int(first.updates) == 4 and done.batches == 4 and done.samples == 32
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].running_var, stats[1])
    assert done.bn_pairs == {"0": "1"} and done.layers == ["0", "3", "7"] and not model.training
    quantizers = [m for m in model.modules() if isinstance(m, q.ActivationFakeQuant)]
    assert quantizers and all(not bool(quantizer.observing) for quantizer in quantizers)
    rows = {row["layer"]: row for row in done.layer_rows()}
    assert rows["3"] == {"layer": "3", "weight_bits": 8, "scales": "observed", "calibration_batches": 4,
                         "equalized": False, "bias_correction": None}  # fmt: skip


def test_bias_correction_removes_the_mean_error_weight_quantisation_adds():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    model = nn.Sequential(layer)
    x = torch.rand(64, 16) + 0.5  # positive inputs: the rounding errors of a row do not average out
    with torch.no_grad():
        float_out = model(x).clone()
    q.calibrate(model, [x], q.QuantConfig(weight_bits=2, observer="minmax"))
    with torch.no_grad():
        error = layer.weight - layer.parametrizations.weight.original
        expected = nn.functional.linear(getattr(layer, q.INPUT_QUANT)(x), error).mean(0)
        bias = layer.bias.detach().clone()
        shifted = model(x).mean(0) - float_out.mean(0)
    corrected, uncorrected = q.correct_bias(model, [x])
    torch.testing.assert_close(layer.bias.detach(), bias - expected)  # b' = b - E[(W_q - W) x]
    assert corrected == {"0": pytest.approx(float(expected.abs().max()))} and uncorrected == []
    with torch.no_grad():
        remaining = model(x).mean(0) - float_out.mean(0)
    assert float(remaining.abs().max()) < 0.2 * float(shifted.abs().max())  # output quantisation's rounding is left


def test_without_a_bias_the_batchnorm_running_mean_takes_the_correction():
    model = _model()
    mean = model[1].running_mean.clone()
    done = q.calibrate(model, _batches(), q.QuantConfig(weight_bits=3, observer="minmax"), bias_correction=True)
    assert set(done.bias_corrected) == {"0", "3", "7"} and done.uncorrected == []
    assert not torch.equal(model[1].running_mean, mean)  # conv 0 has no bias: its BatchNorm shifts instead
    assert all(int(getattr(layer, q.INPUT_QUANT).updates) == 4 for layer in q.quantized_layers(model).values())


def test_equalisation_and_the_checkpoint_state_restore_the_same_model():
    model = _model()
    batches = _batches()
    done = q.calibrate(model, batches, equalize=True, bias_correction=True, layer_bits={"7": 4})
    assert done.equalized is not None and ("0", "3") in done.equalized.pairs
    assert done.bits == {"0": 8, "3": 8, "7": 4}
    checkpoint = {"state_dict": model.state_dict(), "callbacks": {"PTQ": done.state()}}
    rebuilt = restore(nn.Sequential(*_model()), checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batches[0]), model(batches[0]))
    assert q.weight_bits(rebuilt) == done.bits


def test_bad_input_is_named():
    with pytest.raises(CompressionConfigError, match="at least one batch"):
        q.calibrate(_model(), [])
    model = _model()
    q.calibrate(model, _batches(1))
    with pytest.raises(CompressionConfigError, match="already carries fake quantisation"):
        q.calibrate(model, _batches(1))
    with pytest.raises(CompressionConfigError, match="layer_bits"):
        q.calibrate(_model(), _batches(1), layer_bits={"9": 4})
