import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.core.distillation import (
    attention_map,
    attention_transfer_loss,
    capture,
    feature_loss,
    freeze_teacher,
    logits_of,
    make_adapter,
    resolve_module,
    response_kd_loss,
    rkd_loss,
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
    allowed = "'mse', 'cosine', 'rkd', 'attention'"
    with pytest.raises(CompressionConfigError, match=f"`feature_loss` must be one of {allowed}, got 'l1'"):
        feature_loss(a, a, "l1")
    with pytest.raises(CompressionConfigError, match="HINT: build an adapter"):
        feature_loss(a, torch.randn(2, 5, 4, 4))


def test_rkd_on_a_hand_checked_triangle():
    # Teacher: the 3-4-5 right triangle. Distances over their mean (4): 0.75, 1, 1.25; the cosines at the vertices:
    # 0 (the right angle), 3/5 and 4/5. Student: an equilateral triangle: every distance ratio 1, every cosine 1/2.
    teacher = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    huber = lambda d: 0.5 * d * d  # noqa: E731  (smooth L1 below delta = 1)
    distance = (huber(0.25) + huber(0.0) + huber(0.25)) / 3  # each pair twice (i, j) and (j, i): the same mean
    angle = (huber(0.0 - 0.5) + huber(0.6 - 0.5) + huber(0.8 - 0.5)) / 3  # each vertex twice (i, k) and (k, i)
    assert rkd_loss(student, teacher).item() == pytest.approx(distance + 2 * angle, rel=1e-5)
    assert rkd_loss(student, teacher, angle_weight=0.0).item() == pytest.approx(distance, rel=1e-5)
    assert feature_loss(student, teacher, "rkd").item() == pytest.approx(distance + 2 * angle, rel=1e-5)


def test_rkd_matches_a_loop_over_pairs_and_triplets_and_ignores_scale_rotation_shift_and_width():
    torch.manual_seed(0)
    teacher, student = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    t, s = teacher.flatten(1), student
    n = len(t)

    def psi_d(x):
        d = {(i, j): (x[i] - x[j]).norm() for i in range(n) for j in range(n) if i != j}
        mean = sum(d.values()) / len(d)
        return {k: v / mean for k, v in d.items()}

    def psi_a(x):
        e = lambda i, j: (x[i] - x[j]) / (x[i] - x[j]).norm()  # noqa: E731
        return {(i, j, k): e(i, j) @ e(k, j) for i in range(n) for j in range(n) for k in range(n)
                if len({i, j, k}) == 3}  # fmt: skip

    huber = lambda a, b: F.smooth_l1_loss(torch.stack(a), torch.stack(b)).item()  # noqa: E731
    ds, dt, as_, at = psi_d(s), psi_d(t), psi_a(s), psi_a(t)
    expected = huber([ds[k] for k in ds], [dt[k] for k in ds]) + 2 * huber([as_[k] for k in as_], [at[k] for k in as_])
    assert rkd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    rotation = torch.linalg.qr(torch.randn(18, 18, dtype=torch.float64))[0]
    moved = 3.5 * t @ rotation + 7.0  # scaled, rotated, shifted, and given to a wider "student"
    wider = torch.cat([moved, torch.zeros(n, 4, dtype=torch.float64)], dim=1)
    assert rkd_loss(wider, teacher).item() == pytest.approx(0.0, abs=1e-5)


def test_rkd_gradients_are_finite_and_reach_only_the_student():
    student = torch.randn(4, 8, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    student.data[1] = student.data[0]  # two coinciding samples: distance 0
    rkd_loss(student, teacher).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and teacher.grad is None
    with pytest.raises(CompressionConfigError, match="at least 3 samples"):
        rkd_loss(torch.randn(2, 4), torch.randn(2, 4))


def test_attention_transfer_on_a_hand_checked_map():
    # Teacher channels [1, 0] and [0, 2]: sum of squares [1, 4], normalised [1, 4] / sqrt(17). Student: one
    # channel [2, 2]: [4, 4] / sqrt(32) = [1, 1] / sqrt(2). The loss is the L2 distance of the two maps.
    teacher = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    student = torch.tensor([[[[2.0, 2.0]]]])
    expected = math.hypot(1 / math.sqrt(2) - 1 / math.sqrt(17), 1 / math.sqrt(2) - 4 / math.sqrt(17))
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert feature_loss(student, teacher, "attention").item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(attention_map(teacher), torch.tensor([[1.0, 4.0]]) / math.sqrt(17))


def test_attention_transfer_ignores_channel_order_and_scale_and_resizes_the_student():
    torch.manual_seed(0)
    teacher = torch.randn(3, 8, 4, 4)
    same = 5.0 * teacher[:, torch.randperm(8)]
    assert attention_transfer_loss(same, teacher).item() == pytest.approx(0.0, abs=1e-6)
    # Twice the size (each pixel repeated): the bilinear halving of its map averages equal pixels, exactly.
    upsampled = F.interpolate(same, scale_factor=2, mode="nearest")
    assert attention_map(upsampled, (4, 4)).shape == (3, 16)
    assert attention_transfer_loss(upsampled, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_transfer_loss(torch.randn(3, 2, 8, 8), teacher).item() > 0.1
    with pytest.raises(CompressionConfigError, match=r"needs \(N, C, H, W\) feature maps, got shape \(3, 8\)"):
        attention_transfer_loss(torch.randn(3, 8), torch.randn(3, 8))


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
