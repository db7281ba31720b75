import pytest

from lightning_compress.core import quantization as q
from lightning_compress.errors import CompressionConfigError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_bits": 1}, "`weight_bits` must be an integer from 2 to 8, got 1"),
        ({"weight_bits": 8.0}, "`weight_bits` must be an integer from 2 to 8, got 8.0"),
        ({"activation_bits": 4}, r"`activation_bits` must be 8 \(activations are uint8 in the exported model\), got 4"),
        ({"observer": "minmx"}, "`observer` must be one of 'minmax', 'ema', got 'minmx'. HINT: did you mean 'minmax'"),
        ({"ema_decay": 1.0}, r"`ema_decay` must be a float in \(0, 1\), got 1.0"),
        ({"per_channel": 1}, "`per_channel` must be True or False, got 1"),
        ({"fold_bn": "no"}, "`fold_bn` must be True or False, got 'no'"),
        ({"scales": "learnd"}, "`scales` must be one of 'observed', 'learned', got 'learnd'.*did you mean 'learned'"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(CompressionConfigError, match=message):
        q.QuantConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    config = q.QuantConfig(weight_bits=4, observer="minmax", scales="learned")
    assert q.QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(CompressionConfigError, match=r"`quantization key` must be one of .* got 'bits'"):
        q.QuantConfig.from_dict({"bits": 4})
