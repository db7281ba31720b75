import pytest
import torch

from lightning_compress.core import criteria
from lightning_compress.core.pruning import compute_masks
from lightning_compress.errors import CompressionConfigError


def test_fpgm_scores_each_filter_by_its_distances_to_the_others():
    # Filters 3, 3.1 and 0.5 (one weight each, twice): sums of distances 0.1 + 2.5, 0.1 + 2.6, 2.5 + 2.6.
    weight = torch.tensor([[3.0, 0.0], [3.1, 0.0], [0.5, 0.0]]).reshape(3, 2, 1, 1)
    assert torch.allclose(criteria.fpgm_scores(weight), torch.tensor([2.6, 2.7, 5.1]))
    # FPGM prunes the filter the others stand in for (the first: next to the second), where magnitude prunes
    # the small but distinct third one.
    fpgm = compute_masks({"conv": weight}, 1 / 3, "channel", importance={"conv": criteria.fpgm_scores(weight)})
    magnitude = compute_masks({"conv": weight}, 1 / 3, "channel")
    assert fpgm["conv"].tolist() == [False, True, True] and magnitude["conv"].tolist() == [True, True, False]


def test_taylor_and_movement_steps_on_a_hand_checked_layer():
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    grad = torch.tensor([[0.5, -1.0], [1.0, 0.0]])  # g * w = [[0.5, -2], [3, 0]]
    assert criteria.taylor_step(weight, grad, channel=False).tolist() == [[0.25, 4.0], [9.0, 0.0]]
    assert criteria.taylor_step(weight, grad, channel=True).tolist() == [2.25, 9.0]  # (0.5 - 2)^2, (3 + 0)^2
    assert criteria.movement_step(weight, grad).tolist() == [[-0.5, 2.0], [-3.0, -0.0]]


def test_the_accumulator_averages_taylor_per_window_and_sums_movement_over_the_fit():
    weight = torch.tensor([[1.0, -2.0]])
    steps = [torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 0.0]])]  # g * w: [1, -2], then [3, 0]
    taylor, movement = criteria.Accumulator("taylor", channel=False), criteria.Accumulator("movement", channel=False)
    for grad in steps:
        for accumulator in (taylor, movement):
            accumulator.add({"fc": (weight, grad), "frozen": (weight, None)})
    assert taylor.scores()["fc"].tolist() == [[5.0, 2.0]]  # ((1 + 9) / 2, (4 + 0) / 2)
    assert movement.scores()["fc"].tolist() == [[-4.0, 2.0]] and "frozen" not in movement.scores()
    restored = criteria.Accumulator("taylor", channel=False)
    restored.load_state_dict(taylor.state_dict())
    assert torch.equal(restored.scores()["fc"], taylor.scores()["fc"]) and restored.steps == 2
    taylor.reset()
    movement.reset()
    assert taylor.scores() == {} and movement.scores()["fc"].tolist() == [[-4.0, 2.0]]  # movement keeps its sums


def test_the_slimming_penalty_adds_the_l1_subgradient():
    gamma = torch.tensor([0.5, -0.2, 0.0], requires_grad=True)
    gamma.grad = torch.tensor([0.1, 0.1, 0.1])
    criteria.slimming_penalty_(gamma, 0.01)
    assert torch.allclose(gamma.grad, torch.tensor([0.11, 0.09, 0.1]))
    assert criteria.slimming_scores(gamma).tolist() == pytest.approx([0.5, 0.2, 0.0])


@pytest.mark.parametrize(
    ("criterion", "kind", "pattern", "message"),
    [
        ("taylr", "unstructured", "unstructured", "must be one of .*got 'taylr'. HINT: did you mean 'taylor'"),
        ("fpgm", "unstructured", "unstructured", "used with pattern 'channel' \\(fpgm ranks output channels\\)"),
        ("slimming", "unstructured", "unstructured", "used with pattern 'channel'"),
        ("movement", "channel", "channel", "used with pattern 'unstructured' \\(movement ranks single weights\\)"),
        ("taylor", "n:m", "2:4", "'magnitude' with pattern '2:4'"),
    ],
)
def test_criteria_that_do_not_fit_the_pattern_are_refused(criterion, kind, pattern, message):
    with pytest.raises(CompressionConfigError, match=message):
        criteria.check_criterion(criterion, kind, pattern)
    assert criteria.check_criterion("magnitude", kind, pattern) == "magnitude"


def test_importance_must_match_what_is_pruned():
    weights = {"fc": torch.randn(4, 3)}
    with pytest.raises(CompressionConfigError, match=r"`importance\['fc'\]` must be scores of shape \(4,\)"):
        compute_masks(weights, 0.5, "channel", importance={"fc": torch.rand(4, 3)})
    with pytest.raises(CompressionConfigError, match="scores for weights being pruned only"):
        compute_masks(weights, 0.5, importance={"conv": torch.rand(4, 3)})
    scores = torch.arange(12.0).reshape(4, 3)  # the last six kept, whatever the weights
    assert compute_masks(weights, 0.5, importance={"fc": scores})["fc"].reshape(-1).tolist() == [False] * 6 + [True] * 6


def test_the_accumulator_skips_non_finite_gradients_and_counts_each_layer_s_own_steps():
    weight = torch.tensor([[1.0, 2.0]])
    accumulator = criteria.Accumulator("taylor", channel=False)
    accumulator.add({"fc": (weight, torch.tensor([[1.0, 1.0]])), "late": (weight, None)})
    accumulator.add({"fc": (weight, torch.tensor([[float("inf"), 1.0]])), "late": (weight, torch.ones(1, 2))})
    scores = accumulator.scores()  # a mixed-precision step the scaler skips: its inf adds nothing
    assert scores["fc"].tolist() == [[0.5, 4.0]] and scores["late"].tolist() == [[1.0, 4.0]]  # 2 steps and 1
