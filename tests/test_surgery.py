import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from lightning_compress.surgery import add_param_group


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
