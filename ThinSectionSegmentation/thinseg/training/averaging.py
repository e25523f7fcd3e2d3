"""Averages of a network's weights: the candidates a training exports besides its best epoch.

Averaging nearby points of a noisy descent tends to land in a flatter, better-generalising
place than any one of them. Two kinds are offered: the mean of the last epochs' weights
(`mean_state`) and an exponential moving average kept step by step (`exponential_average`,
torch's `AveragedModel`). Batch-norm statistics are not averaged: the training loop re-estimates
them for the averaged weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.swa_utils import AveragedModel


def mean_state(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point entries (summed in float64); other entries (batch
    counters) from the last state."""
    if not states:
        raise ValueError("no weights to average")
    averaged = {}
    for key, value in states[-1].items():
        if value.is_floating_point():
            total = torch.stack([state[key].double() for state in states]).sum(dim=0)
            averaged[key] = total.div(len(states)).to(value.dtype)
        else:
            averaged[key] = value.clone()
    return averaged


def exponential_average(network: torch.nn.Module, decay: float) -> AveragedModel:
    """A copy of `network` whose parameters follow its own as `decay * average + (1 - decay) * new`
    at each `update_parameters(network)`; the first update copies. Read it with `averaged_state`:
    what its buffers hold differs between torch versions."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"an exponential average needs a decay in (0, 1), not {decay}")

    def blend(average: torch.Tensor, new: torch.Tensor, _count: torch.Tensor | int) -> torch.Tensor:
        return average.lerp(new, 1.0 - decay)

    return AveragedModel(network, avg_fn=blend)


def averaged_state(average: AveragedModel, network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`network`'s state with the averaged parameters: the buffers (batch-norm statistics) are the
    network's own, which torch 2 also copies into the average and torch 1.12 leaves as they were."""
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    for name, parameter in average.module.named_parameters():
        state[name] = parameter.detach().clone()
    return state
