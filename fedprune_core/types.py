"""Type aliases shared by the whole core."""

from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]
"""Parameter name -> tensor (full model shape unless said otherwise)."""

MaskDict = dict[str, torch.Tensor]
"""Parameter name -> bool tensor of the parameter's shape, True = keep."""

Payload = dict[str, torch.Tensor]
"""Flat name -> tensor record that crosses the wire (see `fedprune_core.submodel`)."""
