"""Dice + cross-entropy on labelled pixels only.

Target label 0 means "no truth here": unlabelled, an unknown mineral, or the void band around
class boundaries where coarse QEMSCAN labels and imperfect registration make the truth
unreliable. Those pixels contribute nothing, to either term or to the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    class_weights: torch.Tensor | None = None,
    smooth: float = 1.0,
    first_label: int = 0,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """logits (B, C, H, W); target (B, H, W) with 0 = ignored and k = class k (1..N).

    Output channel c scores label c + first_label: our bundles have N + 1 outputs with channel 0
    = "not classified" (first_label 0, never a target, so it is only pushed down); GeoSlicer
    models may have N outputs (first_label 1).

    Cross-entropy is the mean over labelled pixels. With focal_gamma > 0 each pixel's term is
    scaled by (1 - p_true) ** focal_gamma (focal loss), so pixels the network already gets right
    weigh less than the hard ones at grain boundaries and in rare minerals. It is written here,
    not taken from MONAI's FocalLoss: in MONAI 1.1, GeoSlicer's, that cannot ignore pixels, and it
    needs a one-hot copy of the batch, where this shares the log-softmax with Dice.

    Dice is computed over the whole batch per class (stabler than per image for rare classes) and
    averaged over classes that occur in the batch's truth; absent classes (and channel 0) are left
    out instead of rewarding empty predictions.
    """
    logits = logits.float()
    target = target.long()
    valid = target > 0
    if not bool(valid.any()):
        return logits.sum() * 0.0  # keeps the graph; nothing to learn from this batch
    n = logits.shape[1]
    index = (target - first_label).clamp_(min=0)
    logp = F.log_softmax(logits, dim=1)  # shared by both terms
    loss = logits.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * _cross_entropy(logp, index, valid, class_weights, focal_gamma)
    if dice_weight:
        # per-class sums without a one-hot tensor: gather the true-class probability and
        # scatter it into its class; ignored pixels carry weight 0 everywhere
        w = valid.to(logits.dtype)
        probs = logp.exp()
        predicted = (probs * w.unsqueeze(1)).sum(dim=(0, 2, 3))
        p_true = probs.gather(1, index.unsqueeze(1)).squeeze(1) * w
        flat = index.reshape(-1)
        inter = logits.new_zeros(n).scatter_add(0, flat, p_true.reshape(-1))
        truth = torch.bincount(flat, weights=w.reshape(-1), minlength=n).to(logits.dtype)
        dice = 1.0 - (2.0 * inter + smooth) / (predicted + truth + smooth)
        loss = loss + dice_weight * dice[truth > 0].mean()
    return loss


def _cross_entropy(
    logp: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    class_weights: torch.Tensor | None,
    focal_gamma: float,
) -> torch.Tensor:
    """(Focal) cross-entropy averaged over labelled pixels, weighted as torch's nll_loss weights."""
    if not focal_gamma:
        target = index.masked_fill(~valid, IGNORE_INDEX)
        return F.nll_loss(logp, target, weight=class_weights, ignore_index=IGNORE_INDEX)
    logp_true = logp.gather(1, index.unsqueeze(1)).squeeze(1)[valid]
    per_pixel = -((1.0 - logp_true.exp()) ** focal_gamma) * logp_true
    if class_weights is None:
        return per_pixel.mean()
    weights = class_weights.to(logp.dtype)[index[valid]]
    return (weights * per_pixel).sum() / weights.sum()
