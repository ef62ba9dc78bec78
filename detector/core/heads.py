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

    @staticmethod
    def expected_state(in_dim: int, fc_dims: Sequence[int], num_classes: int, prefix: str = "") -> dict:
        """(shape, dtype) of each state-dict tensor, without building the layers (a damaged
        model file must not make us allocate whatever sizes it claims)."""
        dims = [int(in_dim), int(fc_dims[0]), int(fc_dims[1]), int(num_classes) + 1]
        out = {}
        for name, (i, o) in zip(("fc6", "fc7", "fc8"), zip(dims, dims[1:])):
            out[f"{prefix}{name}.weight"] = ((o, i), torch.float32)
            out[f"{prefix}{name}.bias"] = ((o,), torch.float32)
        return out

    def forward(self, x: torch.Tensor, masks: tuple | None = None, with_fc7: bool = False):
        """Logits [N, K+1] (and, with `with_fc7`, the fc7 features fc8 read, after ReLU and
        dropout: what a box layer trained beside fc8 reads).  `masks` (fc6's and fc7's, already
        scaled by 1/(1-p)) replace the dropout layer's own random draws: fine-tuning draws them
        for the whole batch from a seeded generator, so one process or several (each with a
        slice) drop the same units."""
        if masks is None:
            h = self.drop(torch.relu(self.fc7(self.drop(torch.relu(self.fc6(x))))))
        else:
            h = torch.relu(self.fc7(torch.relu(self.fc6(x)) * masks[0])) * masks[1]
        return (self.fc8(h), h) if with_fc7 else self.fc8(h)

    def dropout_masks(self, n: int, generator: torch.Generator) -> tuple:
        """Inverted-dropout masks for a batch of n rows (all ones when dropout is 0)."""
        p = self.drop.p
        out = []
        for d in self.fc_dims:
            keep = torch.rand((n, d), generator=generator) >= p
            out.append(keep.float() / (1.0 - p))
        return tuple(out)

    @torch.inference_mode()
    def embed(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """Features after ReLU at `layer`, fc6 or fc7 (eval mode: no dropout)."""
        h = torch.relu_(self.fc6(x))  # in place: no second [N, 1024] buffer
        return h if layer == "fc6" else torch.relu_(self.fc7(h))
