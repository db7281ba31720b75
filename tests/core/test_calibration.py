import torch
from torch import nn

from lightning_compress.core.calibration import recalibrate_batchnorm
from lightning_compress.core.quantization import ActivationFakeQuant


def test_recalibration_gives_the_datas_statistics_and_changes_nothing_else():
    torch.manual_seed(0)
    observer = ActivationFakeQuant()
    observer.set_flag("enabled", True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1), nn.Dropout(0.5), observer).train()
    batches = [3 * torch.randn(8, 3, 6, 6) + 2 for _ in range(4)]
    weight = model[0].weight.clone()
    assert recalibrate_batchnorm(model, batches) == 1
    with torch.no_grad():
        features = torch.cat([model[0](b) for b in batches])
    assert torch.allclose(model[1].running_mean, features.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(model[1].running_var, features.var((0, 2, 3)), rtol=0.05)
    assert model.training and all(m.training for m in model)  # modes restored
    assert model[1].momentum == 0.1 and torch.equal(model[0].weight, weight)
    assert not observer.initialised  # QAT observers observe only in training mode: left alone


def test_recalibration_of_a_model_without_batchnorm_does_nothing():
    assert recalibrate_batchnorm(nn.Linear(2, 2), [torch.zeros(1, 2)]) == 0
