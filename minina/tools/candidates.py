"""The score options the learnability study measured and did not recommend (docs/learnability.md).

They live here, with the study, so that minina.NeuralScore keeps only the options a user is told to use, while
every candidate the study reports can still be run again. CandidateScore with NeuralScore's options alone is
NeuralScore: the same layers, the same random draws, the same logits.
"""
import math

import torch
import torch.nn as nn

from ..activations import ACTIVATIONS
from ..scores import NeuralScore

INITS = ("paper", "kaiming")


class ScaledMLP(nn.Sequential):
    """The score MLP times a learnable scalar logit_scale (a layer list has no place for a lone parameter)."""

    def __init__(self, layers, scale):
        super().__init__(*layers)
        self.logit_scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x):
        return super().forward(x) * self.logit_scale


class CandidateScore(NeuralScore):
    """NeuralScore with the training aids the study measured: the keywords below change the init, the scale or
    the activation.

    init="kaiming" draws the MLP weights from N(0, 2 / fan_in) with zero biases; bias_init=b sets the biases of the
    hidden layers to b (hidden units start on); learn_scale=True multiplies the MLP's logit by a learnable scalar
    logit_scale starting at scale_init (5.0 if not given); zero_last=True/False zeroes the MLP's last layer or keeps
    its random init (default: residual); activation="leaky_relu" (slope 0.01 below zero) runs on
    backend="reference" only, the one the study uses.
    """

    def __init__(self, head_dim, proj_dim=None, hidden=None, activation="relu", residual=False, *, init="paper",
                 learn_scale=False, scale_init=None, bias_init=None, zero_last=None):
        if activation not in (*ACTIVATIONS, "leaky_relu"):
            raise ValueError(f"activation must be one of {sorted([*ACTIVATIONS, 'leaky_relu'])}, got {activation!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not isinstance(learn_scale, bool):
            raise TypeError(f"learn_scale must be a bool, got {type(learn_scale).__name__}")
        if scale_init is not None and not learn_scale:
            raise ValueError(f"scale_init applies only with learn_scale=True, got scale_init={scale_init!r}")
        scale_init = 5.0 if scale_init is None else scale_init
        if isinstance(scale_init, bool) or not isinstance(scale_init, (int, float)) or not 0 < scale_init < math.inf:
            raise ValueError(f"scale_init must be a positive finite number, got {scale_init!r}")
        if bias_init is not None and (isinstance(bias_init, bool) or not isinstance(bias_init, (int, float))
                                      or not math.isfinite(bias_init)):
            raise ValueError(f"bias_init must be a finite number or None, got {bias_init!r}")
        if not isinstance(residual, bool):
            raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
        if zero_last is not None and not isinstance(zero_last, bool):
            raise TypeError(f"zero_last must be a bool or None, got {type(zero_last).__name__}")
        leaky = activation == "leaky_relu"
        # residual=False here: NeuralScore would zero the last layer for residual=True, zero_last decides it below
        super().__init__(head_dim, proj_dim, hidden, "relu" if leaky else activation, residual=False)
        self.residual, self.init, self.learn_scale, self.bias_init = residual, init, learn_scale, bias_init
        self.zero_last = residual if zero_last is None else zero_last
        if leaky:
            self.activation = activation
            self.mlp = nn.Sequential(*(nn.LeakyReLU() if isinstance(m, nn.ReLU) else m for m in self.mlp))
        if init == "kaiming":
            for layer in self.linears():
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # std sqrt(2 / fan_in)
                nn.init.zeros_(layer.bias)
        if bias_init is not None:
            for layer in self.linears()[:-1]:
                nn.init.constant_(layer.bias, float(bias_init))
        if self.zero_last:  # the MLP starts at 0: attention starts as scaled dot-product attention (or uniform)
            nn.init.zeros_(self.linears()[-1].weight)
            nn.init.zeros_(self.linears()[-1].bias)
        if learn_scale:
            self.mlp = ScaledMLP(self.mlp, scale_init)

    @property
    def logit_scale(self):
        """The learned scalar that multiplies the MLP's logit (learn_scale=True only)."""
        return self.mlp.logit_scale

    def extra_repr(self):
        options = "".join([f", init={self.init!r}" if self.init != "paper" else "",
                           ", learn_scale=True" if self.learn_scale else "",
                           f", bias_init={self.bias_init!r}" if self.bias_init is not None else "",
                           f", zero_last={self.zero_last}" if self.zero_last != self.residual else ""])
        return super().extra_repr() + options

    def split(self, q, k, residual_term=False):
        """NeuralScore.split with a learned logit_scale folded into the last layer, so backends never see it."""
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is a study option that only backend='reference' runs")
        A, Bk, rest, *residual = super().split(q, k, residual_term)
        if self.learn_scale:
            weight, bias = rest[-1]
            rest[-1] = (weight * self.logit_scale, bias * self.logit_scale)  # (1, h_last), (1,)
        return (A, Bk, rest, *residual)
