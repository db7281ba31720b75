import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.core.distillation import (
    capture,
    feature_loss,
    freeze_teacher,
    logits_of,
    make_adapter,
    resolve_module,
    response_kd_loss,
)
from lightning_compress.errors import CompressionConfigError
from tests.helpers import TinyNet


def test_response_kd_is_hinton_kl_times_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    temperature = 3.0
    p_t = F.softmax(t / temperature, dim=1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / temperature, dim=1))).sum(1).mean() * temperature**2
    assert response_kd_loss(s, t, temperature).item() == pytest.approx(expected.item(), rel=1e-5)
    assert response_kd_loss(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_response_kd_gradient_reaches_only_the_student():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    response_kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_response_kd_errors():
    with pytest.raises(CompressionConfigError, match=r"same shape, got student \(4, 3\) and teacher \(4, 5\)"):
        response_kd_loss(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(CompressionConfigError, match="`temperature` must be > 0, got 0"):
        response_kd_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=0)


def test_feature_losses():
    a = torch.randn(2, 3, 4, 4)
    assert feature_loss(a, a).item() == 0.0
    assert feature_loss(a, 2 * a, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(a, -a, "cosine").item() == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(CompressionConfigError, match="`feature_loss` must be one of 'mse', 'cosine', got 'l1'"):
        feature_loss(a, a, "l1")
    with pytest.raises(CompressionConfigError, match="HINT: build an adapter"):
        feature_loss(a, torch.randn(2, 5, 4, 4))


@pytest.mark.parametrize(
    ("student", "teacher"),
    [((2, 8, 4, 4), (2, 16, 4, 4)), ((2, 8, 4, 4), (2, 16, 8, 8)), ((2, 8), (2, 32)), ((2, 8), (2, 8))],
)
def test_adapters_bridge_shapes(student, teacher):
    adapter = make_adapter(torch.Size(student), torch.Size(teacher))
    assert adapter(torch.randn(student)).shape == teacher


def test_adapter_refuses_unbridgeable_shapes():
    with pytest.raises(CompressionConfigError, match="cannot bridge a student feature of shape"):
        make_adapter(torch.Size((2, 8)), torch.Size((2, 8, 4, 4)))


def test_resolve_module_lists_the_nearest_names():
    net = TinyNet()
    assert resolve_module(net, "conv2", "student") is net.conv2
    with pytest.raises(CompressionConfigError, match=r"student layer 'conv3' does not exist in TinyNet.*'conv1'"):
        resolve_module(net, "conv3", "student")


def test_capture_records_outputs_and_removes_its_hooks():
    net = TinyNet()
    with capture({"conv2": net.conv2, "fc1": net.fc1}) as seen:
        net(torch.randn(3, 1, 8, 8))
    assert seen["conv2"].shape == (3, 8, 8, 8) and seen["fc1"].shape == (3, 16)
    assert not net.conv2._forward_hooks
    with capture({"fc1": net.fc1}) as seen:
        net(torch.randn(3, 1, 8, 8))
        net(torch.randn(5, 1, 8, 8))
    assert seen["fc1"].shape == (3, 16)  # the first call counts


class Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


def test_logits_of_finds_the_documented_defaults():
    z = torch.randn(2, 3)
    for output in (z, {"logits": z, "aux": 1}, (z, torch.zeros(1)), [z], Output(z)):
        assert logits_of(output) is z
    for bad in ({"scores": z}, ("text", z), 3, Output("no")):
        with pytest.raises(CompressionConfigError, match=r"cannot find the teacher's logits.*HINT: pass `logits_fn`"):
            logits_of(bad, "teacher")


def test_freeze_teacher():
    teacher = freeze_teacher(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
