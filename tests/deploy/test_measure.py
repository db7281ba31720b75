import torch
from torch import nn

from lightning_compress.core.pruning import prune
from lightning_compress.deploy.measure import (
    compressed_bytes,
    count_macs,
    count_nonzero,
    count_parameters,
    dense_bytes,
    sparse_bytes,
    summarize,
)
from tests.helpers import TinyNet


def test_counts_parameters_and_nonzeros_from_the_tensors():
    model = nn.Linear(10, 5)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, :3] = 1.0
    assert count_parameters(model) == 55
    assert count_nonzero(model) == 3 + int(torch.count_nonzero(model.bias))


def test_dense_bytes_counts_buffers_but_not_masks():
    model = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5))
    before = dense_bytes(model)
    assert before == (55 + 5 + 5) * 4 + (5 + 5) * 4 + 8  # params, running stats, num_batches_tracked
    prune(model, 0.5)
    assert dense_bytes(model) == before


def test_sparse_bytes_is_values_plus_a_bitmap():
    model = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[:, :8] = 1.0  # 512 non-zeros of 4096
    assert sparse_bytes(model) == 512 * 4 + 4096 // 8
    dense = nn.Linear(64, 64, bias=False)
    assert sparse_bytes(dense) == dense_bytes(dense)  # no saving -> counted dense


def test_compressed_bytes_shrink_with_sparsity():
    torch.manual_seed(0)
    model = TinyNet()
    dense = compressed_bytes(model)
    prune(model, 0.9)
    assert compressed_bytes(model) < 0.5 * dense


def test_macs_of_conv_and_linear():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    dense, sparse = count_macs(model, torch.zeros(1, 2, 5, 5))
    assert dense == 5 * 5 * 4 * (2 * 9) + 100 * 3
    assert sparse <= dense
    with torch.no_grad():
        model[0].weight[:2].zero_()  # half the filters
    dense2, sparse2 = count_macs(model, torch.zeros(1, 2, 5, 5))
    assert dense2 == dense and sparse2 == dense - 5 * 5 * 2 * 18 - (100 * 3 - int(torch.count_nonzero(model[2].weight)))


def test_macs_of_grouped_conv():
    model = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    dense, _ = count_macs(model, torch.zeros(1, 4, 6, 6))
    assert dense == 6 * 6 * 4 * 9


def test_summarize_restores_training_mode():
    model = TinyNet().train()
    figures = summarize(model, torch.zeros(1, 1, 8, 8))
    assert model.training
    assert set(figures) == {
        "params",
        "nonzero",
        "dense_bytes",
        "sparse_bytes",
        "compressed_bytes",
        "macs",
        "sparse_macs",
    }


def test_ort_accuracy_matches_torch_and_latency_is_measured(tmp_path):
    from lightning_compress.deploy.measure import ort_accuracy, ort_latency_ms
    from lightning_compress.deploy.onnx import export_onnx
    from tests.helpers import loaders

    torch.manual_seed(0)
    model = TinyNet().eval()
    batches = list(loaders()[1])
    path = export_onnx(model, batches[0][0][:1], tmp_path / "m.onnx")
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    assert ort_accuracy(path, batches) == correct / sum(len(y) for _, y in batches)
    assert ort_latency_ms(path, batches[0][0], runs=3, warmup=1, spinning=False) > 0
