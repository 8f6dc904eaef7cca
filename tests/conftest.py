import os

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # without a GPU, tests/test_triton.py runs the kernels in Triton's interpreter


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
