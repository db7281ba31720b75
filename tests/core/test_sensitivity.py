import pytest
import torch
from torch import nn

from lightning_compress.core.sensitivity import Setting, compressed_weight, low_rank_rank, sensitivity
from lightning_compress.errors import CompressionConfigError


def test_each_setting_compresses_the_weight_in_its_own_shape():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    sparse = compressed_weight(w, Setting("sparsity", 0.75))
    assert int((sparse == 0).sum()) == 216 and torch.equal(sparse[sparse != 0], w[sparse != 0])
    channels = compressed_weight(w, Setting("channels", 0.5))
    weakest = w.abs().sum((1, 2, 3)).argsort()[:4]
    assert (channels[weakest] == 0).all() and int((channels.flatten(1) != 0).any(1).sum()) == 4
    rank = low_rank_rank(w, 0.25)
    assert rank == int(0.25 * 8 * 36 // (8 + 36)) == 1
    approx = compressed_weight(w, Setting("low_rank", 0.5))
    values = torch.linalg.svdvals(w.reshape(8, -1).double())
    r = low_rank_rank(w, 0.5)
    assert torch.linalg.matrix_rank(approx.reshape(8, -1)) == r
    error = torch.linalg.norm((approx - w).reshape(8, -1).double())  # Eckart-Young: the best rank-r error
    assert error == pytest.approx(float(values[r:].square().sum().sqrt()), rel=1e-5)
    grid = compressed_weight(w, Setting("bits", 3))
    assert max(len(torch.unique(channel)) for channel in grid) <= 7  # -3..3 steps


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sparsity=1.5", r"`sparsity setting` must be in \(0, 1\), got 1.5"),
        ("bits=9", "`bits setting` must be an integer from 2 to 8, got 9"),
        ("chanels=0.5", "`setting kind` must be one of 'sparsity', 'channels', 'low_rank', 'bits'.*did you mean 'cha"),
        ("sparsity", "`setting` must be KIND=VALUE"),
    ],
)
def test_settings_are_validated(text, message):
    with pytest.raises(CompressionConfigError, match=message):
        Setting.parse(text)


class Gated(nn.Module):
    """``a`` feeds a path multiplied by zero (insensitive); ``b`` is the whole output (sensitive)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(x) + 0.0 * self.a(x).sum(1, keepdim=True)


def test_only_the_layer_that_matters_moves_the_loss_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = Gated().train()
    x = torch.randn(32, 6)
    batches = [(x, model.b(x).argmax(1).detach())]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = sensitivity(model, ["a", "b"], [Setting("sparsity", 0.9), Setting("bits", 8)], batches)
    assert table.baseline["accuracy"] == 1.0 and table.samples == 32 and table.batches == 1
    assert table.delta("a", "sparsity=0.9") == {"loss": 0.0, "accuracy": 0.0}
    assert table.delta("b", "sparsity=0.9")["loss"] > 0.1 and abs(table.delta("b", "bits=8")["loss"]) < 1e-2
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    again = type(table).from_dict(table.to_dict())
    assert again == table and len(table.key) == 16


def test_channel_settings_zero_the_batchnorm_of_the_pruned_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2)).eval()
    model[1].bias.data.fill_(5.0)  # beta: what an unmasked pruned channel would still output
    x = torch.randn(8, 1, 6, 6)
    batches = [(x, torch.zeros(8, dtype=torch.long))]
    with torch.no_grad():
        manual = model[0].weight.clone()
        keep = manual.abs().sum((1, 2, 3)).argsort()[2:]
        expected_model = torch.nn.Sequential(*[m for m in model])  # the same modules
        saved = [t.clone() for t in (model[0].weight, model[0].bias, model[1].weight, model[1].bias)]
        for tensor in (model[0].weight, model[0].bias, model[1].weight, model[1].bias):
            mask = torch.zeros(4, dtype=torch.bool)
            mask[keep] = True
            tensor.mul_(mask.reshape(-1, *([1] * (tensor.dim() - 1))))
        expected = torch.nn.functional.cross_entropy(expected_model(x), batches[0][1]).item()
        for tensor, value in zip((model[0].weight, model[0].bias, model[1].weight, model[1].bias), saved, strict=True):
            tensor.copy_(value)
    table = sensitivity(model, ["0"], [Setting("channels", 0.5)], batches, bn_pairs={"0": "1"})
    assert table.results["0"]["channels=0.5"]["loss"] == pytest.approx(expected, rel=1e-6)
    skipped = sensitivity(model, ["0", "3"], [Setting("channels", 0.5)], batches, applicable=lambda n, m, s: n != "3")
    assert skipped.results["3"] == {}
    with pytest.raises(CompressionConfigError, match=r"`sensitivity layer` must be a Conv/Linear .*are \['0', '3'\]"):
        sensitivity(model, ["2"], [Setting("bits", 8)], batches)
