import copy

import pytest
import torch
from torch import nn

from lightning_compress.core import quantization as q
from lightning_compress.core.graph import find_bn_pairs
from lightning_compress.core.layers import weight_of
from lightning_compress.core.quantization import attachment, share_ranges
from lightning_compress.errors import CompressionConfigError
from tests.helpers import ResidualNet, TinyNet, quantised


def test_attached_but_disabled_changes_nothing_and_keeps_forward():
    torch.manual_seed(0)
    net, x = TinyNet(), torch.randn(4, 1, 8, 8)
    before = net(x, scale=2.0)
    q.attach(net)
    assert torch.equal(net(x, scale=2.0), before)
    assert type(net).forward is TinyNet.forward  # the model's own forward, keyword arguments and all
    assert "conv1.parametrizations.weight.original" in net.state_dict()












def test_folded_weight_is_quantised_and_output_quantised_after_the_batchnorm():
    net, _x = quantised(bn=True)
    assert q.weight_quantizer(net.conv2).bn is net.bn2
    factor = q.bn_fold_factor(net.bn2).detach()
    folded = net.conv2.weight.detach() * factor[:, None, None, None]
    scale = q.weight_scale(weight_of(net.conv2) * factor[:, None, None, None], 8, True)
    ints = folded / scale[:, None, None, None]
    assert torch.allclose(ints, ints.round(), atol=1e-3)
    assert attachment._OUTPUT_QUANT_REF in net.bn2.__dict__ and attachment._OUTPUT_QUANT_REF not in net.conv2.__dict__








def test_strip_gives_a_plain_model_and_leaves_copies_alone():
    net, x = quantised(bn=True)
    twin = copy.deepcopy(net)
    q.strip(net)
    assert q.quantized_layers(net) == {}
    TinyNet(bn=True).load_state_dict(net.state_dict())  # strict: original keys
    assert twin(x).shape == (16, 4) and q.quantized_layers(twin)  # the copy still works


def test_nothing_to_quantise():
    with pytest.raises(CompressionConfigError, match="nothing to quantise in Sequential"):
        q.attach(nn.Sequential(nn.ReLU()))


def test_output_ranges_are_shared_only_through_relu_and_maxpool():
    from lightning_compress.vision.models import build_model

    x = torch.randn(2, 1, 28, 28)
    for name, expected in (
        ("cnn_small", ["features.0", "features.4", "features.8", "classifier.1"]),
        ("resnet18", [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]),
    ):
        model = build_model(name)
        layers = q.attach(model)
        q.link_batchnorms(model, find_bn_pairs(model, layers, x))
        # resnet's bn2 output, and the stem's (after maxpool), also go into the block's own `out += identity`:
        # a branch, not shared
        assert share_ranges(model, x) == expected, name


def test_an_output_read_by_functional_code_is_quantised_after_its_relu_and_pooling(tmp_path):
    # #18: cnn_wide average-pools its last block functionally. Its last conv's output was quantised at the
    # folded BatchNorm, on a range holding negative values: ONNX Runtime then ran the ReLU and max-pool in float
    # behind a dequantise. Quantised after the MaxPool instead, on a range starting at 0, the same numbers reach
    # the next op, and the optimised graph is ONNX Runtime's own quantize_static graph.
    import onnx
    import onnxruntime as ort

    from lightning_compress import export_onnx
    from lightning_compress.deploy.onnx import int8_copy, pick_logits
    from lightning_compress.deploy.verify import verify_int8
    from lightning_compress.vision.models import cnn_wide

    torch.manual_seed(0)
    model, x = cnn_wide().eval(), torch.randn(32, 1, 28, 28)
    float_model = copy.deepcopy(model)
    q.calibrate(model, [x[:16], x[16:]])
    assert q.tail_modules(model, x[:2]) == {"features.8": "features.11"}
    assert model.features[11].__dict__[attachment._OUTPUT_QUANT_REF][0] is model.features[8].output_quant
    assert attachment._OUTPUT_QUANT_REF not in model.features[9].__dict__  # the BatchNorm no longer quantises
    assert q.observer_ranges(model)["features.8.output_quant"][0] == 0.0  # observed after the ReLU
    at_batchnorm = copy.deepcopy(model)  # the same quantiser at the BatchNorm's output: the same numbers
    attachment._hook_output(at_batchnorm, at_batchnorm.features[8], at_batchnorm.features[9])
    with torch.no_grad():
        assert torch.equal(model(x), at_batchnorm(x))
        fake_quant, floats = model(x), float_model(x)
    path = export_onnx(model, x[:1], tmp_path / "wide.int8.onnx", int8=True)
    assert verify_int8(path, int8_copy(model, x[:1]), x, fake_quant, floats, pick_logits)["passed"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    assert ops.count("QLinearConv") == 3 and "Relu" not in ops and "MaxPool" not in ops and "FusedConv" not in ops
    assert ops.count("DequantizeLinear") == 1  # the logits only
    stripped = q.strip(copy.deepcopy(model))
    assert not any(attachment._OUTPUT_QUANT_REF in m.__dict__ for m in stripped.modules())
    with torch.no_grad():
        assert torch.equal(stripped(x), floats)


def test_functional_ops_keep_their_output_quantiser():
    net = TinyNet(bn=True)  # F.relu / F.max_pool2d: invisible to module hooks, so nothing is shared
    q.attach(net)
    assert share_ranges(net, torch.randn(2, 1, 8, 8)) == []


def test_an_identity_module_between_layers_ends_the_search():
    net = TinyNet(bn=False)  # bn1 / bn2 are nn.Identity: the same tensor comes back (this looped forever)
    q.attach(net)
    assert share_ranges(net, torch.randn(2, 1, 8, 8)) == []
    chain = nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.ReLU(), nn.Linear(4, 2))
    q.attach(chain)
    assert share_ranges(chain, torch.randn(2, 4)) == ["0"]


def test_freeze_bn_puts_folded_batchnorms_in_eval_mode():
    net, _ = quantised(bn=True)
    q.freeze_bn(net)
    assert not net.bn1.training and not net.bn2.training and net.conv1.training


def test_set_weight_bits_gives_layers_their_own_width():
    net = TinyNet()
    q.attach(net, q.QuantConfig(weight_bits=8))
    q.enable(net)
    q.set_weight_bits(net, {"fc1": 2, "conv2": 5, "gone": 4})  # a layer not quantised (any more) is skipped
    assert q.weight_bits(net) == {"conv1": 8, "conv2": 5, "fc1": 2, "fc2": 8}
    levels = {len(torch.unique(row)) for row in net.fc1.weight.detach()}
    assert max(levels) <= 3  # 2 bits, symmetric: -1, 0, 1 steps
    with pytest.raises(CompressionConfigError, match=r"`layer_bits\['fc2'\]` must be an integer from 2 to 8, got 9"):
        q.set_weight_bits(net, {"fc2": 9})


def residual_quantised(**attach_kwargs):
    torch.manual_seed(0)
    net, x = ResidualNet(), torch.randn(16, 1, 8, 8)
    layers = q.attach(net, **attach_kwargs)
    q.link_batchnorms(net, find_bn_pairs(net, layers, x[:2]))
    q.enable(net)
    q.share_ranges(net, x[:2])
    sums = q.quantize_sums(net, x[:2])
    q.share_inputs(net, x[:2])
    return net, x, sums


def test_residual_sums_of_quantised_tensors_get_one_quantiser_that_serves_the_next_layer():
    net, x, sums = residual_quantised()
    assert sums == ["blocks.0", "blocks.1"] and list(q.quantized_sums(net)) == sums
    # blocks.0's input is the stem's quantised output (which also goes into the sum, so it keeps its quantiser),
    # blocks.1's is blocks.0's quantised sum: neither is quantised again; blocks.1's sum goes to the pool
    assert q.covered_inputs(net, x[:2]) == ["blocks.0.conv.0", "blocks.1.conv.0"]
    assert net.blocks[1].conv[0].input_quant.bypass and net.blocks[0].conv[0].input_quant.bypass
    assert not net.stem[0].output_quant.bypass and not net.blocks[0].conv[3].input_quant.bypass
    net.train()
    net(x)
    quantizer = net.blocks[0].sum_quant
    assert bool(quantizer.enabled) and int(quantizer.updates) == 1
    with torch.no_grad():  # the block's output is on the sum quantiser's grid
        out = net.blocks[0](net.stem(x))
    scale, zero = quantizer.qparams()
    assert torch.allclose(out / scale + zero, (out / scale + zero).round(), atol=1e-3)
    assert "blocks.0.sum_quant" in q.observer_ranges(net)
    q.freeze_observers(net)
    assert not bool(quantizer.observing)
    assert q.quantize_sums(net, x[:2]) == sums and net.blocks[0].sum_quant is quantizer  # attached once
    plain = ResidualNet().state_dict().keys()
    assert q.strip(copy.deepcopy(net)).state_dict().keys() == plain


def test_a_sum_with_a_float_summand_stays_float():
    net, x, sums = residual_quantised(exclude=["stem.*"])
    assert sums == [] and q.covered_inputs(net, x[:2]) == []  # the stem is float: so is blocks.0, so blocks.1
    net, x, sums = residual_quantised()
    q.keep_in_float(net, ["stem.0"])  # a plan keeps the stem in float after the sums were quantised: all undone
    assert q.quantize_sums(net, x[:2]) == [] and q.quantized_sums(net) == {}
    assert q.share_inputs(net, x[:2]) == [] and not net.blocks[0].conv[0].input_quant.bypass


def test_a_checkpoint_with_sum_quantisers_loads_into_a_freshly_attached_model():
    net, x, _ = residual_quantised()
    net.train()
    net(x)
    state = net.state_dict()
    assert "blocks.1.sum_quant.min_val" in state
    fresh = ResidualNet()
    q.attach(fresh)  # as the QAT callback does at setup, before any batch
    fresh.load_state_dict(state)  # strict: the pre-hook attaches what the keys name
    assert list(q.quantized_sums(fresh)) == ["blocks.0", "blocks.1"]
    assert q.observer_ranges(fresh) == q.observer_ranges(net)
