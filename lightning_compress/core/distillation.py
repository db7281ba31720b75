"""Knowledge distillation core: response KD (Hinton et al. 2015), feature KD with adapters, and the losses that
compare structure instead of features: relational KD (Park et al. 2019) and attention transfer (Zagoruyko &
Komodakis 2017).

No Lightning here. The callback (issue #4) decides when to run the teacher and how to mix the
losses; these functions compute them.

Example::

    >>> student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    >>> response_kd_loss(student, teacher, temperature=4.0).item() >= 0
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from difflib import get_close_matches
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.errors import CompressionConfigError, config_error, one_of

FEATURE_LOSSES = ("mse", "cosine", "rkd", "attention")
SHAPE_FREE_LOSSES = ("rkd", "attention")  # they compare relations / maps: student and teacher widths may differ


def response_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T)) * T**2``, averaged over the batch (Hinton et al. 2015).

    The ``T**2`` keeps the gradient scale independent of the temperature.

    Raises:
        CompressionConfigError: the logits' shapes differ, or ``temperature <= 0``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise CompressionConfigError(
            f"teacher and student logits must have the same shape, got student {tuple(student_logits.shape)} "
            f"and teacher {tuple(teacher_logits.shape)}. HINT: the teacher must predict the same classes; "
            "use `logits_fn` if the outputs are not plain logits"
        )
    if not temperature > 0:
        raise config_error("temperature", "> 0", temperature)
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def feature_loss(student: Tensor, teacher: Tensor, kind: str = "mse") -> Tensor:
    """Distance between matched feature maps: ``mse``, ``cosine`` (1 - cosine similarity per sample), ``rkd``
    (:func:`rkd_loss`) or ``attention`` (:func:`attention_transfer_loss`); the last two accept different widths.

    Raises:
        CompressionConfigError: an unknown ``kind``, or different shapes for ``mse`` / ``cosine`` (bridge them
            with an adapter).
    """
    if kind not in FEATURE_LOSSES:
        raise config_error("feature_loss", one_of(FEATURE_LOSSES), kind)
    if kind == "rkd":
        return rkd_loss(student, teacher)
    if kind == "attention":
        return attention_transfer_loss(student, teacher)
    if student.shape != teacher.shape:
        raise CompressionConfigError(
            f"matched features must have the same shape, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}. HINT: build an adapter with make_adapter()"
        )
    teacher = teacher.detach()
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    similarity = F.cosine_similarity(student.flatten(1).float(), teacher.flatten(1).float(), dim=1)
    return (1 - similarity).mean()


def _relational(x: Tensor) -> tuple[Tensor, Tensor]:
    """The pairwise distances ``d[i, j] = ||x_i - x_j||`` of a batch of embeddings ``(N, D)``, and the cosines
    ``c[j, i, k]`` of the angles at ``x_j`` between ``x_i`` and ``x_k``, both from one Gram matrix of the centred
    batch (distances and angles do not change under a shift; the ``N x N x N`` cosines need no ``N x N x D``
    tensor of differences)."""
    x = x - x.mean(0, keepdim=True)
    gram = x @ x.T
    square = gram.diagonal()
    distance = (square[:, None] + square[None, :] - 2 * gram).clamp_min(1e-12).sqrt()  # finite gradients at 0
    # <x_i - x_j, x_k - x_j> = G_ik - G_ij - G_jk + G_jj, at [j, i, k]
    inner = gram[None, :, :] - gram.T[:, :, None] - gram[:, None, :] + square[:, None, None]
    cosine = inner / (distance[:, :, None] * distance[:, None, :]).clamp_min(1e-12)
    return distance, cosine


def rkd_loss(student: Tensor, teacher: Tensor, angle_weight: float = 2.0) -> Tensor:
    """Relational knowledge distillation (Park et al. 2019): the batch's structure, not its features.

    Each sample's features are flattened to one embedding. *Distance-wise*: the distance of every pair of
    distinct samples over the mean of those distances (``psi_D``), compared by the Huber loss (smooth L1,
    ``delta = 1``) between student and teacher and averaged over the pairs. *Angle-wise*: the cosine of the angle
    every triplet of distinct samples makes at its middle one (``psi_A(t_i, t_j, t_k) = <e_ij, e_kj>``,
    ``e_ij = (t_i - t_j) / ||t_i - t_j||``), compared the same way over the triplets. Returned:
    ``distance + angle_weight * angle`` (the paper weighs them 1:2, as 25:50 and 1:2 in its experiments).

    Both are invariant to the embeddings' scale, rotation and shift, and need no adapter: student and
    teacher may have different widths. Samples that coincide give distance 0 and cosine 0.

    Raises:
        CompressionConfigError: fewer than 3 samples, or batches of different sizes.
    """
    if len(student) != len(teacher) or len(student) < 3:
        raise CompressionConfigError(
            f"rkd compares the relations within a batch: it needs the same batch of at least 3 samples for student "
            f"and teacher, got {len(student)} and {len(teacher)}"
        )
    n = len(student)
    s_dist, s_cos = _relational(student.flatten(1).float())
    t_dist, t_cos = _relational(teacher.detach().flatten(1).float())
    pairs = ~torch.eye(n, dtype=torch.bool, device=student.device)
    s_psi = s_dist[pairs] / s_dist[pairs].mean().clamp_min(1e-12)
    t_psi = t_dist[pairs] / t_dist[pairs].mean().clamp_min(1e-12)
    triplets = pairs[:, :, None] & pairs[:, None, :] & pairs[None, :, :]  # j != i, j != k, i != k
    distance = F.smooth_l1_loss(s_psi, t_psi)
    angle = F.smooth_l1_loss(s_cos[triplets], t_cos[triplets])
    return distance + angle_weight * angle


def attention_map(features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """The spatial attention map of Zagoruyko & Komodakis (2017): ``sum_c |A_c|^2`` of a feature map
    ``(N, C, H, W)``, resized (bilinear) to ``size`` when given, flattened and L2-normalised per sample: ``(N, H*W)``.

    Raises:
        CompressionConfigError: not a 4-dimensional feature map.
    """
    if features.dim() != 4:
        raise CompressionConfigError(
            f"attention transfer needs (N, C, H, W) feature maps, got shape {tuple(features.shape)}. HINT: match "
            "convolutional layers, or use feature_loss='mse', 'cosine' or 'rkd'"
        )
    energy = features.float().pow(2).sum(1, keepdim=True)
    if size is not None and tuple(energy.shape[2:]) != tuple(size):
        energy = F.interpolate(energy, size=size, mode="bilinear", align_corners=False)
    return F.normalize(energy.flatten(1), dim=1)


def attention_transfer_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017): ``|| Q_s / ||Q_s|| - Q_t / ||Q_t|| ||_2`` per sample
    (``Q``: :func:`attention_map`), averaged over the batch (the paper's ``beta / 2`` is ``feature_weight``).
    The channel counts may differ (the map sums over channels); a student map of another spatial size is
    resized to the teacher's.

    Raises:
        CompressionConfigError: not 4-dimensional feature maps, or batches of different sizes.
    """
    if len(student) != len(teacher):
        raise CompressionConfigError(
            f"attention transfer needs the same batch for student and teacher, got {len(student)} and {len(teacher)}"
        )
    target = attention_map(teacher.detach())
    size = tuple(teacher.shape[2:])
    return (attention_map(student, (int(size[0]), int(size[1]))) - target).norm(dim=1).mean()


def make_adapter(student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module:
    """A learned bridge from a student feature to a teacher feature of another width.

    ``(N, C, H, W)`` maps get a 1x1 convolution (and bilinear resizing when the spatial sizes
    differ); ``(N, C)`` vectors get a linear layer; equal shapes get ``Identity``.

    Raises:
        CompressionConfigError: the shapes cannot be bridged (different ranks or batch sizes).
    """
    if student_shape == teacher_shape:
        return nn.Identity()
    if len(student_shape) != len(teacher_shape) or student_shape[0] != teacher_shape[0]:
        raise CompressionConfigError(
            f"cannot bridge a student feature of shape {tuple(student_shape)} to a teacher feature of shape "
            f"{tuple(teacher_shape)}: both must be (N, C) or (N, C, H, W) with the same N"
        )
    if len(student_shape) == 2:
        return nn.Linear(student_shape[1], teacher_shape[1])
    if len(student_shape) == 4:
        conv = nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1)
        if student_shape[2:] == teacher_shape[2:]:
            return conv
        return nn.Sequential(conv, nn.Upsample(size=tuple(teacher_shape[2:]), mode="bilinear", align_corners=False))
    raise CompressionConfigError(
        f"feature maps of rank {len(student_shape)} are not supported: use (N, C) or (N, C, H, W)"
    )


def resolve_module(model: nn.Module, name: str, role: str) -> nn.Module:
    """The submodule ``name`` of ``model``.

    Raises:
        CompressionConfigError: no such module; the message lists the nearest names.
    """
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    nearest = get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.4)
    hint = f"nearest names: {nearest}" if nearest else f"some names: {[n for n in modules if n][:8]}"
    raise CompressionConfigError(f"{role} layer {name!r} does not exist in {type(model).__name__}. HINT: {hint}")


@contextmanager
def capture(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Any]]:
    """Record each module's first output while the ``with`` block runs (forward hooks, removed after).

    The first call counts: a module called twice in a step (a second view, a shared block) is
    matched by what it returned first.

    Example::

        with capture({"features": model.features}) as seen:
            model(x)
        seen["features"]  # the tensor features returned
    """
    seen: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            seen.setdefault(name, output)

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def logits_of(output: Any, role: str = "student") -> Tensor:
    """The logits in a model's output, by the documented default.

    A tensor is the logits; otherwise the ``"logits"`` key of a mapping, the ``logits`` attribute
    (Hugging Face style outputs), or the first element of a tuple or list.

    Raises:
        CompressionConfigError: none of those is a tensor (pass ``logits_fn``).
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        found = output.get("logits")
    elif isinstance(output, (tuple, list)) and output:
        found = output[0]
    else:
        found = getattr(output, "logits", None)
    if isinstance(found, Tensor):
        return found
    raise CompressionConfigError(
        f"cannot find the {role}'s logits in an output of type {type(output).__name__}: expected a tensor, a "
        "mapping with a 'logits' key, an object with a `logits` attribute, or a tuple whose first element is "
        "the logits. HINT: pass `logits_fn` (or `teacher_logits_fn`) to pick them out"
    )


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode, no gradients, in place: a teacher only infers."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
