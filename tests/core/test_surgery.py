import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from lightning_compress.core.low_rank import factorize_linear
from lightning_compress.core.surgery import (
    InstancePatch,
    add_param_group,
    drop_patch,
    retarget_optimizer,
    swap_modules,
    unpatched_copy,
)


def make(optimizer_cls=torch.optim.SGD, **kwargs):
    model, extra = nn.Linear(4, 4), nn.Linear(4, 2)
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    return model, extra, optimizer


def test_new_group_copies_the_current_hyper_parameters():
    _, extra, optimizer = make(torch.optim.AdamW, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    optimizer.param_groups[0]["lr"] = 0.005  # where a schedule has taken it
    assert add_param_group(optimizer, extra.parameters()) == 1
    group = optimizer.param_groups[1]
    assert group["lr"] == 0.005 and group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.1
    assert [id(p) for p in group["params"]] == [id(p) for p in extra.parameters()]


@pytest.mark.parametrize(
    "build",
    [
        lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=10),
        lambda opt: lr_scheduler.LambdaLR(opt, lambda step: 0.9**step),
        lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: lr_scheduler.SequentialLR(
            opt, [lr_scheduler.LinearLR(opt, 0.5, total_iters=2), lr_scheduler.ExponentialLR(opt, 0.9)], milestones=[2]
        ),
    ],
    ids=["cosine", "lambda", "step", "sequential"],
)
def test_schedulers_move_the_new_group_with_the_others(build):
    _, extra, optimizer = make(lr=0.1, momentum=0.9)
    scheduler = build(optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    add_param_group(optimizer, extra.parameters(), [scheduler])
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        first, new = (group["lr"] for group in optimizer.param_groups)
        assert new == pytest.approx(first)
    assert len(scheduler.get_last_lr()) == 2
    state = scheduler.state_dict()  # and it still saves and loads
    scheduler.load_state_dict(state)


def test_retarget_keeps_untouched_state_and_the_order_a_fresh_optimizer_would_have():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    kept = {k: v.clone() for k, v in optimizer.state[model[2].weight].items()}
    old = model[0]
    new = factorize_linear(old, 2)
    swap_modules(model, {"0": new})
    retarget_optimizer(optimizer, {"0": (old, new)})
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert not any(p in optimizer.state for p in old.parameters())
    for key, value in kept.items():
        assert torch.equal(optimizer.state[model[2].weight][key], value)
    fresh = torch.optim.Adam(model.parameters(), lr=0.1)
    fresh.load_state_dict(optimizer.state_dict())  # the same layout: a checkpoint of it loads into a rebuilt run


def test_retarget_follows_a_decay_split_and_leaves_frozen_modules_out():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
    decay = [model[0].weight, model[1].weight]
    optimizer = torch.optim.SGD([{"params": decay}, {"params": [model[0].bias], "weight_decay": 0.0}], lr=0.1)
    old, new = model[0], factorize_linear(model[0], 2)
    swap_modules(model, {"0": new})
    retarget_optimizer(optimizer, {"0": (old, new)})
    expected = [new[0].weight, new[1].weight, model[1].weight]
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in expected]
    assert [id(p) for p in optimizer.param_groups[1]["params"]] == [id(new[1].bias)]
    frozen, replacement = model[1], factorize_linear(model[1], 2)
    only_first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    retarget_optimizer(only_first, {"1": (frozen, replacement)})
    assert not any(p in set(only_first.param_groups[0]["params"]) for p in replacement.parameters())






class WithFunction(nn.Module):
    """A user model that keeps a plain function on the instance (``self.act = F.relu``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = torch.nn.functional.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


def test_instance_patch_enters_and_exits_and_keeps_what_was_there():
    model = WithFunction()
    patch = InstancePatch("act", torch.tanh)
    patch.enter(model)
    patch.enter(model)  # idempotent
    assert model.act is torch.tanh and patch.active(model)
    patch.exit(model)
    patch.exit(model)
    assert model.act is torch.nn.functional.relu and not patch.active(model)


def test_unpatched_copy_leaves_out_patches_and_keeps_the_users_functions():
    model = WithFunction()
    held = object()
    patch = InstancePatch("forward", lambda x, held=held: x)
    patch.enter(model)
    copied = unpatched_copy(model)
    assert "forward" not in vars(copied) and copied.act is torch.nn.functional.relu
    x = torch.randn(2, 4)
    assert torch.equal(copied(x), torch.relu(model.fc(x)))  # the class's forward, the user's act
    assert patch.active(model)  # the original keeps its patch


def test_a_second_patch_of_the_same_attribute_replaces_the_first():
    model = WithFunction()
    first, second = InstancePatch("act", torch.tanh), InstancePatch("act", torch.sigmoid)
    first.enter(model)
    second.enter(model)
    assert model.act is torch.sigmoid and not first.active(model)
    drop_patch(model, "act")
    assert model.act is torch.nn.functional.relu
