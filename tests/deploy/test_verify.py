import numpy as np
import pytest
import torch

from lightning_compress.deploy.verify import fp32_tolerance, int8_tolerance, output_step, verify
from lightning_compress.errors import ExportVerificationError
from tests.helpers import quantised


def test_verify_passes_within_tolerance_and_names_the_file_when_not():
    reference = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    result = verify(reference.numpy() + 1e-6, reference, 1e-4, "model.onnx", min_agreement=0.99)
    assert result["passed"] and result["top1_agreement"] == 1.0
    message = r"model\.onnx: .* max \|difference\| 0\.1 .* top-1 agreement 1\.000"
    with pytest.raises(ExportVerificationError, match=message):
        verify(reference.numpy() + 0.1, reference, 1e-4, "model.onnx")
    swapped = np.array([[2.0, 1.0], [3.0, 0.5]], dtype=np.float32)
    with pytest.raises(ExportVerificationError, match=r"top-1 agreement 0\.500"):
        verify(swapped, reference, 10.0, "model.int8.onnx", min_agreement=0.9)


def test_tolerances_follow_the_output_scale_and_the_depth():
    assert fp32_tolerance(torch.tensor([0.5])) == pytest.approx(1e-4)
    assert fp32_tolerance(torch.tensor([-300.0])) == pytest.approx(3e-2)
    model, _ = quantised()
    layers = 4  # TinyNet's convs and linears, all fake-quantised
    assert int8_tolerance(model) == pytest.approx(2 * output_step(model) * layers**0.5 + 1e-5)
    assert output_step(model) > 0
