"""The Multi-Lingual Consistency (MLC) loss of [Align Once, Benefit Multilingually](https://huggingface.co/papers/2602.16660).

For each example, the m prompt variants (one per language) give m representation vectors. Stacked as the rows of an
m×d matrix and L2-normalised, they are perfectly collinear exactly when the matrix has rank 1, i.e. when all of its
spectral energy sits in the first singular value. The loss is a softmax cross-entropy over the singular values with the
first one as the target class.

Pure functions on tensors, without any trainer plumbing; [`MLCTrainer`] and [`MLCSFTTrainer`] call them.
"""

import torch
import torch.nn.functional as F


def mlc_singular_values(features):
    """Singular values of the row-normalised matrices of prompt-variant features.

    Args:
        features (`torch.Tensor` of shape `(..., m, d)`):
            One d-dimensional vector per language (rows), for each example of the leading dimensions.

    Returns:
        `torch.Tensor` of shape `(..., min(m, d))`: the singular values in float32, in descending order.
    """
    # The SVD is ill-conditioned in low precision: always fp32, whatever autocast region the caller is in.
    with torch.autocast(device_type=features.device.type, enabled=False):
        rows = F.normalize(features.float(), dim=-1, eps=1e-12)
        # `svdvals` differentiates through the singular values only (U diag(g) Vᵀ): unlike the backward of the full
        # `svd`, it divides by no difference of singular values, so repeated values (identical rows) stay finite.
        return torch.linalg.svdvals(rows)


def mlc_consistency_loss(features, tau=0.2, detach_sigma1=True):
    """Multi-Lingual Consistency loss: cross-entropy of the singular-value softmax towards the first singular value.

    For each example, with σ₁ ≥ … ≥ σₖ the singular values of the row-normalised m×d matrix:

        ŝⱼ = σⱼ / stopgrad(σ₁)        (official code; `detach_sigma1=False` keeps ŝⱼ = σⱼ, the paper's formula)
        L = −log( exp(ŝ₁/τ) / Σⱼ exp(ŝⱼ/τ) )

    With the default scaling, perfectly collinear rows give `log(1 + (m−1)·exp(−1/τ))` (the minimum) and mutually
    orthogonal rows give `log(m)`.

    Args:
        features (`torch.Tensor` of shape `(..., m, d)`):
            Prompt-variant features, one row per language, for each example of the leading dimensions.
        tau (`float`, *optional*, defaults to `0.2`):
            Softmax temperature.
        detach_sigma1 (`bool`, *optional*, defaults to `True`):
            Divide the singular values by the detached largest one, as the official code does. `False` uses the raw
            singular values, as the paper writes the loss.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the loss averaged over the examples (a float32 scalar) and the singular
        values of shape `(..., min(m, d))`.
    """
    singular_values = mlc_singular_values(features)
    with torch.autocast(device_type=features.device.type, enabled=False):
        scaled = singular_values
        if detach_sigma1:
            scaled = singular_values / singular_values[..., :1].detach().clamp_min(1e-12)
        per_example = -torch.log_softmax(scaled / tau, dim=-1)[..., 0]
    return per_example.mean(), singular_values


def sigma1_share(singular_values):
    """Share of the spectral energy in the first singular value, σ₁² / Σⱼ σⱼ² (1 = perfectly collinear rows, 1/m =
    mutually orthogonal rows).

    Args:
        singular_values (`torch.Tensor` of shape `(..., k)`):
            Singular values, largest first, as returned by [`mlc_singular_values`].

    Returns:
        `torch.Tensor` of shape `(...)`.
    """
    energy = singular_values.square()
    return energy[..., 0] / energy.sum(-1).clamp_min(1e-12)


def cosine_to_first_row(features):
    """Cosine similarity between each row and the first one (the source language's vector in the trainers).

    Args:
        features (`torch.Tensor` of shape `(..., m, d)`):
            Prompt-variant features, one row per language.

    Returns:
        `torch.Tensor` of shape `(..., m - 1)`: the cosine of rows 1 … m−1 with row 0.
    """
    rows = F.normalize(features.float(), dim=-1, eps=1e-12)
    return (rows[..., 1:, :] * rows[..., :1, :]).sum(-1)
