"""Knowledge distillation core: response KD (Hinton et al. 2015) and feature KD with adapters.

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

FEATURE_LOSSES = ("mse", "cosine")


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
    """Distance between matched feature maps: ``mse`` or ``cosine`` (1 - cosine similarity per sample).

    Raises:
        CompressionConfigError: an unknown ``kind`` or different shapes (bridge them with an adapter).
    """
    if kind not in FEATURE_LOSSES:
        raise config_error("feature_loss", one_of(FEATURE_LOSSES), kind)
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
