import torch

from lightning_compress.callbacks.step_patch import TrainingStepPatch
from lightning_compress.core.surgery import unpatched_copy
from tests.helpers import TinyModule


def doubled(module, original, *args, **kwargs):
    return original(*args, **kwargs) * 2


def test_enter_wraps_the_instance_and_exit_gives_the_step_back():
    module, batch = TinyModule(), (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    plain = module.training_step(batch, 0)
    patch = TrainingStepPatch(doubled)
    patch.enter(module)
    assert patch.active(module) and module.training_step.__name__ == "training_step"
    assert torch.allclose(module.training_step(batch, 0), 2 * plain)
    patch.exit(module)
    assert "training_step" not in vars(module) and not patch.active(module)


def test_a_wrapper_left_by_an_interrupted_fit_is_not_wrapped_again():
    module, batch = TinyModule(), (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    plain = module.training_step(batch, 0)
    TrainingStepPatch(doubled).enter(module)  # never exited
    patch = TrainingStepPatch(doubled)
    patch.enter(module)
    assert torch.allclose(module.training_step(batch, 0), 2 * plain)  # doubled once, not twice


def test_a_copy_of_a_wrapped_module_has_its_own_step():
    module = TinyModule()
    patch = TrainingStepPatch(doubled)
    patch.enter(module)
    copied = unpatched_copy(module)
    assert "training_step" not in vars(copied) and patch.active(module)
