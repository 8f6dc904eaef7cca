"""The activations a NeuralScore may use: one table for the module, the chunked backend and the Triton kernels.

Each entry gives the nn.Module the reference MLP uses, the same function on tensors, and its derivative, which
the chunked backward applies by hand. GELU is nn.GELU's exact, erf-based form. The Triton kernels implement the
names in minina.triton_kernels.KERNEL_ACTIVATIONS and reject any other added here.
"""
import math
from typing import Callable, NamedTuple

import torch
import torch.nn as nn


class Activation(NamedTuple):
    module: type  # the nn.Module class of the reference MLP
    function: Callable  # act(x) on a tensor
    derivative: Callable  # d act(x) / dx on a tensor (ReLU's as a bool tensor, which a product casts for free)


def _gelu_derivative(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


ACTIVATIONS = {
    "relu": Activation(nn.ReLU, torch.relu, lambda x: x > 0),
    "gelu": Activation(nn.GELU, torch.nn.functional.gelu, _gelu_derivative),
}
