"""Dice + cross-entropy (and optionally a Lovasz-softmax term) on labelled pixels only.

Target label 0 means "no truth here": unlabelled, an unknown mineral, or the void band around
class boundaries where coarse QEMSCAN labels and imperfect registration make the truth
unreliable. Those pixels contribute nothing, to either term or to the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

#: The Lovasz term is computed on every LOVASZ_STRIDE-th row and column of the batch.
LOVASZ_STRIDE = 2


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
    label_smoothing: float = 0.0,
    lovasz_weight: float = 0.0,
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
    With label_smoothing = e each pixel's target is 1 - e on its class plus e spread evenly over
    the real classes (never over a "not classified" channel 0, which no pixel should learn).

    Lovasz-softmax (Berman et al. 2018), weighted by lovasz_weight, is a convex surrogate of the
    Jaccard loss: on one-hot predictions it equals 1 - IoU exactly, so it optimises the score the
    maps are judged by. It is computed over a lattice of a quarter of the batch's labelled pixels
    (every other row and column), per class present in the truth.

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
        loss = loss + ce_weight * _cross_entropy(
            logp, index, valid, class_weights, focal_gamma, label_smoothing, first_label
        )
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
    if lovasz_weight:
        # every other row and column: sorting a batch's pixels per class is the term's whole cost
        # (0.5 s a step of 8 x 256^2 on one core, a fifth of the step); patches land anywhere in
        # the rock, so a fixed lattice samples it evenly
        k = LOVASZ_STRIDE
        probs = logp[:, :, ::k, ::k].exp()
        loss = loss + lovasz_weight * lovasz_softmax(probs, index[:, ::k, ::k], valid[:, ::k, ::k])
    return loss


def lovasz_softmax(probs: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over classes present in the truth of the Lovasz extension of the Jaccard loss.

    probs (B, C, H, W) softmax output; index (B, H, W) the true channel; valid (B, H, W) labelled.
    Written here because neither MONAI nor torch has it (segmentation_models_pytorch does, but it
    would pull timm and huggingface_hub into GeoSlicer's Python for one function).
    """
    n = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, n)[valid.reshape(-1)]
    truth = index.reshape(-1)[valid.reshape(-1)]
    if truth.numel() == 0:  # e.g. a batch labelled only off the sampled lattice
        return probs.sum() * 0.0
    losses = []
    for c in torch.unique(truth).tolist():
        foreground = (truth == c).to(p.dtype)
        errors = (foreground - p[:, c]).abs()
        errors, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors, _jaccard_steps(foreground[order])))
    return torch.stack(losses).mean()


def _jaccard_steps(foreground: torch.Tensor) -> torch.Tensor:
    """Increments of the Jaccard loss as pixels, most wrong first, are counted as errors one by one:
    the gradient of its Lovasz extension."""
    total = foreground.sum()
    intersection = total - foreground.cumsum(0)
    union = total + (1.0 - foreground).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _cross_entropy(
    logp: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    class_weights: torch.Tensor | None,
    focal_gamma: float,
    label_smoothing: float = 0.0,
    first_label: int = 0,
) -> torch.Tensor:
    """(Focal, smoothed) cross-entropy averaged over labelled pixels, weighted as torch's nll_loss weights."""
    if not focal_gamma and not label_smoothing:
        target = index.masked_fill(~valid, IGNORE_INDEX)
        return F.nll_loss(logp, target, weight=class_weights, ignore_index=IGNORE_INDEX)
    logp_true = logp.gather(1, index.unsqueeze(1)).squeeze(1)[valid]
    per_pixel = -((1.0 - logp_true.exp()) ** focal_gamma) * logp_true
    if label_smoothing:
        first_real = max(1 - first_label, 0)  # channel of label 1
        spread = -logp[:, first_real:].mean(dim=1)[valid]
        per_pixel = (1.0 - label_smoothing) * per_pixel + label_smoothing * spread
    if class_weights is None:
        return per_pixel.mean()
    weights = class_weights.to(logp.dtype)[index[valid]]
    return (weights * per_pixel).sum() / weights.sum()
