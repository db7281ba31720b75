import pytest
import torch

from lightning_compress.core import quantization as q
from lightning_compress.deploy.restore import QUANTIZATION_KIND, callback_state, restore
from lightning_compress.errors import CompressionConfigError
from tests.helpers import TinyNet, quantised


def test_the_quantisation_state_is_found_by_its_kind_not_its_name():
    state = {"kind": QUANTIZATION_KIND, "config": q.QuantConfig(weight_bits=4).to_dict(), "bn_pairs": {}}
    checkpoint = {"callbacks": {"MyRenamedQAT{'bits': 4}": state, "Other": {"kind": "pruning"}}}
    assert callback_state(checkpoint, QUANTIZATION_KIND) is state
    assert callback_state(checkpoint, "low_rank") == {}
    legacy = {"callbacks": {"Anything": {"config": state["config"], "bn_pairs": {}, "start_epoch": 0}}}
    assert callback_state(legacy, QUANTIZATION_KIND)["config"] == state["config"]  # written before "kind" existed


def test_restore_rebuilds_fake_quantisation_with_the_checkpoints_settings():
    trained, x = quantised(bn=True, config=q.QuantConfig(weight_bits=4))
    pairs = {"conv1": "bn1", "conv2": "bn2"}
    state = {"kind": QUANTIZATION_KIND, "config": q.QuantConfig(weight_bits=4).to_dict(), "bn_pairs": pairs}
    checkpoint = {"state_dict": trained.state_dict(), "callbacks": {"renamed": state}}
    fresh = restore(TinyNet(bn=True), checkpoint).eval()
    assert q.weight_quantizer(fresh.conv1).bits == 4 and q.weight_quantizer(fresh.conv2).bn is fresh.bn2
    assert fresh.state_dict().keys() == trained.state_dict().keys()
    assert torch.equal(fresh(x), trained.eval()(x))


def test_weights_of_another_model_are_a_clear_error(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict()}, path)
    with pytest.raises(CompressionConfigError, match=r"(?s)do not fit TinyNet.*HINT: pass a fresh instance"):
        restore(TinyNet(), path)
    with pytest.raises(CompressionConfigError, match="cannot read the checkpoint"):
        restore(TinyNet(), tmp_path / "missing.ckpt")
