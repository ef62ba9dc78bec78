"""Fully connected layers on top of the SPP vector (paper section 4.1).

fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8 (K+1 classes, softmax;
class 0 is background; the classifier's head, `background=False`, has K).  The original fine-tunes fc6/fc7 that were
pre-trained with ZF-5 on ImageNet; a backbone cut from a classification
network (EfficientNet-Lite0) has no fc layers that read SPP vectors, so fc6
and fc7 start from a seeded Kaiming init here and fc8 from N(0, 0.01) as in
the original.  `embed()` gives the features the SVMs read: fc7 (or fc6) after
ReLU.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class FCHead(nn.Module):
    def __init__(self, in_dim: int, fc_dims: Sequence[int], num_classes: int, dropout: float = 0.5,
                 background: bool = True):
        super().__init__()
        self.in_dim, self.fc_dims, self.num_classes = int(in_dim), [int(d) for d in fc_dims], int(num_classes)
        self.fc6 = nn.Linear(in_dim, fc_dims[0])
        self.fc7 = nn.Linear(fc_dims[0], fc_dims[1])
        self.fc8 = nn.Linear(fc_dims[1], num_classes + int(background))
        self.drop = nn.Dropout(dropout)
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc8.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.fc6(x)))
        x = self.drop(torch.relu(self.fc7(x)))
        return self.fc8(x)

    @torch.inference_mode()
    def embed(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """Features after ReLU at `layer`, fc6 or fc7 (eval mode: no dropout)."""
        h = torch.relu_(self.fc6(x))  # in place: no second [N, 1024] buffer
        return h if layer == "fc6" else torch.relu_(self.fc7(h))
