"""The objective of MSD, [Multilingual Safety Alignment via Self-Distillation](https://huggingface.co/papers/2605.02971).

The student (target-language query only) matches the teacher (the frozen initial model, given the query, its English
version and a safety-reasoning instruction) token by token on a shared response:

    L = (1/L_y) Σ_t w̃_t · KL( p_S(·|x_tgt, y<t) ‖ p_T(·|x_tgt, x*, 𝒞, y<t) )

with Dual-Perspective Safety Weighting (DPSW):

    w_t^T = 1 − H(p̄_T over the teacher's top-K) / log K        (teacher confidence)
    w_t^S = 1 − p_S(y_t*)                                       (student disagreement risk, y* = teacher top-1)
    w̃_t   = L_y · w_t^T w_t^S / Σ_j w_j^T w_j^S                 (mean 1 over the response; detached)

Pure functions on logits already aligned on the response positions (`(B, T, V)`, position t predicting response token
t); the [`MSDTrainer`] does the alignment and calls them.
"""

import math
from typing import NamedTuple

import torch


def reverse_kl(student_logits, teacher_logits):
    """Per-token reverse KL over the full vocabulary, KL(p_S ‖ p_T) = Σ_v p_S(v) (log p_S(v) − log p_T(v)).

    Args:
        student_logits (`torch.Tensor` of shape `(B, T, V)`):
            Student logits (gradients flow through them).
        teacher_logits (`torch.Tensor` of shape `(B, T, V)`):
            Teacher logits, aligned with the student's on the same response positions.

    Returns:
        `torch.Tensor` of shape `(B, T)`: the divergence in nats, in float32.
    """
    student_logps = student_logits.float().log_softmax(-1)
    teacher_logps = teacher_logits.float().log_softmax(-1)
    return (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)


def topk_reverse_kl(student_logits, teacher_logits, k):
    """Per-token reverse KL restricted to the student's `k` most probable tokens, both distributions renormalised on
    that support (TRL's `distillation_topk` without a tail bucket). Equals [`reverse_kl`] when `k` is the vocabulary
    size.

    Args:
        student_logits (`torch.Tensor` of shape `(B, T, V)`):
            Student logits.
        teacher_logits (`torch.Tensor` of shape `(B, T, V)`):
            Teacher logits on the same positions.
        k (`int`):
            Size of the support.

    Returns:
        `torch.Tensor` of shape `(B, T)`.
    """
    top_student, indices = student_logits.float().topk(k, dim=-1)
    top_teacher = teacher_logits.float().gather(-1, indices)
    student_logps = top_student.log_softmax(-1)
    teacher_logps = top_teacher.log_softmax(-1)
    return (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)


@torch.no_grad()
def dpsw_teacher_weight(teacher_logits, k=20):
    """Teacher confidence `1 − H(p̄_T) / log k`, with p̄_T the teacher's distribution renormalised on its top-`k` tokens.

    1 when the teacher puts all its top-k mass on one token, 0 when its top-k is flat.

    Args:
        teacher_logits (`torch.Tensor` of shape `(B, T, V)`):
            Teacher logits.
        k (`int`, *optional*, defaults to `20`):
            Number of teacher tokens the entropy is taken over (at least 2).

    Returns:
        `torch.Tensor` of shape `(B, T)`, in [0, 1].
    """
    top_logps = teacher_logits.float().topk(k, dim=-1).values.log_softmax(-1)
    entropy = -(top_logps.exp() * top_logps).sum(-1)
    return (1.0 - entropy / math.log(k)).clamp(0.0, 1.0)


@torch.no_grad()
def dpsw_student_weight(student_logits, target_ids):
    """Student disagreement risk `1 − p_S(y*)`.

    Args:
        student_logits (`torch.Tensor` of shape `(B, T, V)`):
            Student logits.
        target_ids (`torch.Tensor` of shape `(B, T)`):
            The teacher-selected token y* at each position (the teacher's top-1, or the teacher-sampled token).

    Returns:
        `torch.Tensor` of shape `(B, T)`, in [0, 1].
    """
    probs = student_logits.float().softmax(-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    return (1.0 - probs).clamp(0.0, 1.0)


def normalize_weights(weights, mask, eps=1e-8):
    """Rescales per-token weights to average 1 over each sequence's valid tokens: `w̃_t = n · w_t / Σ_j w_j`.

    A sequence whose weights sum to at most `eps` (teacher flat everywhere, or student already agreeing everywhere)
    gets uniform weights instead. Positions outside `mask` get 0.

    Args:
        weights (`torch.Tensor` of shape `(B, T)`):
            Non-negative weights.
        mask (`torch.Tensor` of shape `(B, T)`):
            1 on the response tokens that count, 0 on padding.
        eps (`float`, *optional*, defaults to `1e-8`):
            Threshold under which a sequence's weights count as vanishing.

    Returns:
        `torch.Tensor` of shape `(B, T)`, detached.
    """
    mask = mask.float()
    weights = weights.detach().float() * mask
    total = weights.sum(-1, keepdim=True)
    count = mask.sum(-1, keepdim=True)
    return torch.where(total > eps, count * weights / total.clamp_min(eps), mask)


class MSDLossOutput(NamedTuple):
    """What [`msd_loss`] returns: the scalar loss and the per-token terms it was made of (for logging)."""

    loss: torch.Tensor  # scalar
    per_token_kl: torch.Tensor  # (B, T), the divergence before weighting
    teacher_weight: torch.Tensor  # (B, T), DPSW w^T (computed even when not applied)
    student_weight: torch.Tensor  # (B, T), DPSW w^S
    weight: torch.Tensor  # (B, T), the normalised weights w̃ actually applied (the mask when DPSW is off)


def msd_loss(
    student_logits,
    teacher_logits,
    completion_ids,
    mask,
    divergence="full_reverse_kl",
    distillation_topk=100,
    use_dpsw=True,
    dpsw_topk=20,
    dpsw_y_star="teacher_argmax",
    eps=1e-8,
):
    """MSD loss: the DPSW-weighted per-token reverse KL, averaged over each sequence's response tokens, then over the
    sequences that have at least one response token.

    Args:
        student_logits (`torch.Tensor` of shape `(B, T, V)`):
            Student logits at the positions predicting the response tokens.
        teacher_logits (`torch.Tensor` of shape `(B, T, V)`):
            Teacher logits at the positions predicting the same response tokens (no gradient needed).
        completion_ids (`torch.Tensor` of shape `(B, T)`):
            The response tokens (used as y* when `dpsw_y_star="sampled"`).
        mask (`torch.Tensor` of shape `(B, T)`):
            1 on the response tokens trained on, 0 on padding.
        divergence (`str`, *optional*, defaults to `"full_reverse_kl"`):
            `"full_reverse_kl"` ([`reverse_kl`]) or `"topk_reverse_kl"` ([`topk_reverse_kl`]).
        distillation_topk (`int`, *optional*, defaults to `100`):
            Support size for `"topk_reverse_kl"`.
        use_dpsw (`bool`, *optional*, defaults to `True`):
            Weight the tokens with DPSW; otherwise every response token weighs 1.
        dpsw_topk (`int`, *optional*, defaults to `20`):
            K of the teacher's top-K entropy.
        dpsw_y_star (`str`, *optional*, defaults to `"teacher_argmax"`):
            y* of the student weight: the teacher's top-1 token (`"teacher_argmax"`) or the response token itself
            (`"sampled"`, meaningful when the teacher sampled the response).
        eps (`float`, *optional*, defaults to `1e-8`):
            See [`normalize_weights`].

    Returns:
        [`MSDLossOutput`]
    """
    if divergence == "full_reverse_kl":
        per_token_kl = reverse_kl(student_logits, teacher_logits)
    elif divergence == "topk_reverse_kl":
        per_token_kl = topk_reverse_kl(student_logits, teacher_logits, distillation_topk)
    else:
        raise ValueError(f"`divergence` must be 'full_reverse_kl' or 'topk_reverse_kl', got {divergence!r}.")
    if dpsw_y_star == "teacher_argmax":
        y_star = teacher_logits.argmax(-1)
    elif dpsw_y_star == "sampled":
        y_star = completion_ids
    else:
        raise ValueError(f"`dpsw_y_star` must be 'teacher_argmax' or 'sampled', got {dpsw_y_star!r}.")

    mask = mask.float()
    teacher_weight = dpsw_teacher_weight(teacher_logits, dpsw_topk)
    student_weight = dpsw_student_weight(student_logits, y_star)
    weight = normalize_weights(teacher_weight * student_weight, mask, eps) if use_dpsw else mask

    count = mask.sum(-1)
    per_sequence = (weight * per_token_kl * mask).sum(-1) / count.clamp_min(1)
    loss = per_sequence.sum() / (count > 0).sum().clamp_min(1)
    return MSDLossOutput(loss, per_token_kl, teacher_weight, student_weight, weight)
