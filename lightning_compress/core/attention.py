"""``nn.MultiheadAttention`` with its projections as layers that are called, so every technique reaches them.

No Lightning here. ``nn.MultiheadAttention`` keeps its query/key/value projection as a bare parameter
(``in_proj_weight``) and reads ``out_proj.weight`` directly inside ``F.multi_head_attention_forward``:
fake quantisation (which works through a layer's call) and low-rank factorisation (which replaces the
layer) cannot reach them. :class:`ProjectedAttention` computes the same function with ``in_proj`` and
``out_proj`` as ordinary ``nn.Linear`` layers; :func:`expose_attention` builds one per attention module
of a model, with the same weights.

Example::

    >>> attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    >>> exposed = ProjectedAttention.from_attention(attention)
    >>> x = torch.randn(3, 5, 16)
    >>> bool(torch.allclose(exposed(x, x, x)[0], attention(x, x, x)[0], atol=1e-6))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.core.layers import matches
from lightning_compress.errors import CompressionConfigError


class ProjectedAttention(nn.Module):
    """Multi-head attention as ``nn.MultiheadAttention`` computes it (same arguments, same outputs), with the
    packed query/key/value projection as the layer ``in_proj`` (``Linear(E, 3E)``) and ``out_proj`` called.

    Supports what torchvision's and most users' models use: ``kdim == vdim == embed_dim``, no
    ``add_bias_kv`` / ``add_zero_attn``; batched or unbatched inputs, ``batch_first`` either way,
    ``key_padding_mask`` and ``attn_mask`` (boolean or additive), ``need_weights`` with or without
    averaging over heads, dropout on the attention weights in training.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, batch_first: bool = False
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise CompressionConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_attention(cls, attention: nn.MultiheadAttention) -> ProjectedAttention:
        """The same attention, weights copied (trainable as they were, on the same device and dtype, in the
        same mode).

        Raises:
            CompressionConfigError: a configuration :func:`unsupported` names.
        """
        reason = unsupported(attention)
        if reason is not None:
            raise CompressionConfigError(f"cannot expose this nn.MultiheadAttention's projections: {reason}")
        weight = attention.in_proj_weight
        new = cls(
            attention.embed_dim, attention.num_heads, attention.dropout, attention.in_proj_bias is not None,
            attention.batch_first,
        )  # fmt: skip
        new = new.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.in_proj.weight.copy_(weight)
            new.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.in_proj_bias is not None and new.in_proj.bias is not None:
                new.in_proj.bias.copy_(attention.in_proj_bias)
            if attention.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(attention.out_proj.bias)
        new.in_proj.requires_grad_(weight.requires_grad)
        new.out_proj.requires_grad_(attention.out_proj.weight.requires_grad)
        return new.train(attention.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(output, attention weights or None)``."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        unbatched = query.dim() == 2
        q, k, v = self._project(query, key, value, unbatched)
        batch, target, source = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = self._mask(key_padding_mask, attn_mask, batch, target, source, q.dtype, unbatched)
        p = self.dropout if self.training else 0.0
        weights: Tensor | None = None
        if need_weights:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(-1), p) if p > 0 else scores.softmax(-1)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, target, self.embed_dim))
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor, unbatched: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values, batch first: one projection of the input in self-attention."""
        self_attention = query is key and key is value

        def batch_first(t: Tensor) -> Tensor:
            return t.unsqueeze(0) if unbatched else (t if self.batch_first else t.transpose(0, 1))

        if self_attention:
            q, k, v = self.in_proj(batch_first(query)).chunk(3, dim=-1)
            return q, k, v
        size = self.embed_dim
        q = self.in_proj(batch_first(query))[..., :size]
        if key is value:
            k, v = self.in_proj(batch_first(key))[..., size:].chunk(2, dim=-1)
            return q, k, v
        k = self.in_proj(batch_first(key))[..., size : 2 * size]
        return q, k, self.in_proj(batch_first(value))[..., 2 * size :]

    def _mask(
        self, padding: Tensor | None, attn: Tensor | None, batch: int, target: int, source: int, dtype: torch.dtype,
        unbatched: bool,
    ) -> Tensor | None:  # fmt: skip
        """One additive mask of shape broadcastable to ``(batch, heads, target, source)``, or ``None``."""
        mask: Tensor | None = None
        if padding is not None:
            mask = _additive(padding, dtype).reshape(batch, 1, 1, source)
        if attn is not None:
            if attn.dim() == 3 and not unbatched:
                extra = _additive(attn, dtype).reshape(batch, self.num_heads, target, source)
            else:
                extra = _additive(attn, dtype).reshape(-1, target, source).unsqueeze(0)
            mask = extra if mask is None else mask + extra
        return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (``True``: not attended) as ``-inf`` / ``0``; an additive one as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def unsupported(attention: nn.MultiheadAttention) -> str | None:
    """Why :class:`ProjectedAttention` cannot stand in for ``attention``, or ``None``."""
    if attention.in_proj_weight is None:
        return "separate query/key/value projections (kdim or vdim differ from embed_dim)"
    if attention.bias_k is not None or attention.bias_v is not None:
        return "add_bias_kv=True"
    if attention.add_zero_attn:
        return "add_zero_attn=True"
    return None


def expose_attention(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    trainable_only: bool = False,
) -> dict[str, ProjectedAttention]:
    """``{name: ProjectedAttention}`` for the ``nn.MultiheadAttention`` modules of ``model`` whose projections
    a layer selection reaches, ready to swap in (:func:`lightning_compress.core.surgery.swap_modules`); the
    model is not changed.

    An attention module is exposed when ``include`` is ``None`` or matches ``<name>.in_proj`` or
    ``<name>.out_proj``, and ``exclude`` matches neither nor ``<name>``; configurations
    :class:`ProjectedAttention` does not cover (:func:`unsupported`) and, with ``trainable_only``, frozen
    ones stay as they are.
    """
    found: dict[str, ProjectedAttention] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention) or unsupported(module) is not None:
            continue
        projections = [f"{name}.in_proj" if name else "in_proj", f"{name}.out_proj" if name else "out_proj"]
        if include is not None and not any(matches(p, include) for p in projections):
            continue
        if exclude and any(matches(p, exclude) for p in (name, *projections)):
            continue
        if module.in_proj_weight.requires_grad or not trainable_only:
            found[name] = ProjectedAttention.from_attention(module)
    return found


def exposed_names(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """The ``nn.MultiheadAttention`` modules of ``model`` that ``state_dict`` holds exposed (``<name>.in_proj.*``
    keys): a checkpoint of a model whose attention was a :class:`ProjectedAttention`."""
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention) and unsupported(module) is None
        and any(key.startswith(f"{name}.in_proj." if name else "in_proj.") for key in state_dict)
    ]  # fmt: skip
