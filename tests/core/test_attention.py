import pytest
import torch
from torch import nn

from lightning_compress import CompressionConfigError
from lightning_compress.core.attention import ProjectedAttention, expose_attention, unsupported


def pair(batch_first: bool = True, bias: bool = True, dropout: float = 0.0):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, dropout=dropout, bias=bias, batch_first=batch_first)
    with torch.no_grad():
        for p in attention.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases non-zero too
    return attention, ProjectedAttention.from_attention(attention)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("kind", ["self", "cross", "key_is_value"])
def test_the_same_function_as_multihead_attention(batch_first, need_weights, kind):
    attention, exposed = pair(batch_first)
    shape = (3, 5, 16) if batch_first else (5, 3, 16)
    q = torch.randn(*shape)
    k = q if kind == "self" else torch.randn(*shape)
    v = k if kind != "cross" else torch.randn(*shape)
    for module in (attention, exposed):
        module.eval()
    expected, expected_weights = attention(q, k, v, need_weights=need_weights, average_attn_weights=False)
    out, weights = exposed(q, k, v, need_weights=need_weights, average_attn_weights=False)
    assert torch.allclose(out, expected, atol=1e-6)
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        assert torch.allclose(weights, expected_weights, atol=1e-6)


def test_masks_unbatched_inputs_and_averaged_weights_match():
    attention, exposed = pair(batch_first=True, bias=False)
    x = torch.randn(2, 6, 16)
    padding = torch.tensor([[False] * 5 + [True], [False] * 6])
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    additive = torch.randn(2 * 4, 6, 6)
    for kwargs in ({"key_padding_mask": padding}, {"attn_mask": causal, "is_causal": True},
                   {"attn_mask": additive, "key_padding_mask": padding}, {"attn_mask": causal.float() * -1e4}):
        expected = attention.eval()(x, x, x, **kwargs)
        got = exposed.eval()(x, x, x, **kwargs)
        assert torch.allclose(got[0], expected[0], atol=1e-5), kwargs
        assert torch.allclose(got[1], expected[1], atol=1e-6), kwargs
    single = x[0]
    assert torch.allclose(exposed(single, single, single)[0], attention(single, single, single)[0], atol=1e-6)


def test_trains_the_way_attention_does():
    attention, exposed = pair(dropout=0.0)
    x = torch.randn(3, 5, 16)
    attention(x, x, x)[0].square().sum().backward()
    exposed(x, x, x)[0].square().sum().backward()
    assert torch.allclose(exposed.in_proj.weight.grad, attention.in_proj_weight.grad, atol=1e-5)
    assert torch.allclose(exposed.out_proj.weight.grad, attention.out_proj.weight.grad, atol=1e-5)
    attention, exposed = pair(dropout=0.5)
    assert exposed.training and exposed.dropout == 0.5
    outputs = {exposed(x, x, x)[0].sum().item() for _ in range(3)}
    assert len(outputs) == 3  # dropout on the attention weights in training


def test_what_cannot_be_exposed_is_named_and_left_alone():
    odd = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
    assert "kdim" in unsupported(odd)
    with pytest.raises(CompressionConfigError, match="kdim or vdim"):
        ProjectedAttention.from_attention(odd)
    model = nn.ModuleDict({"a": nn.MultiheadAttention(16, 2), "b": nn.MultiheadAttention(16, 2, add_bias_kv=True)})
    assert list(expose_attention(model)) == ["a"]
    frozen = nn.MultiheadAttention(16, 2).requires_grad_(False)
    assert not ProjectedAttention.from_attention(frozen).in_proj.weight.requires_grad
