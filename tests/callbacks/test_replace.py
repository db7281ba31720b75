import pytest
from torch import nn

from lightning_compress.callbacks.replace import replace_modules
from lightning_compress.errors import CompressionConfigError


def test_replace_modules_refuses_other_strategies():
    from types import SimpleNamespace

    fake = SimpleNamespace(strategy=object(), optimizers=[], callbacks=[])
    with pytest.raises(
        CompressionConfigError,
        match=r"replacing modules during fit supports .* DDP strategies .*not object",
    ):
        replace_modules(fake, nn.Linear(2, 2), {})  # type: ignore[arg-type]


def test_sharding_strategies_are_refused_with_the_supported_ones_named():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from lightning_compress.callbacks.base import check_strategy

    for strategy in (FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)):
        with pytest.raises(CompressionConfigError, match=rf"MagnitudePruning supports Lightning's single-device and "
                           rf"DDP strategies .*not {type(strategy).__name__}.*HINT: use strategy='ddp'"):  # fmt: skip
            check_strategy(SimpleNamespace(strategy=strategy), "MagnitudePruning")
