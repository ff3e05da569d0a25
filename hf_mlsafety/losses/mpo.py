"""MPO (Multilingual reward gaP Optimization, https://huggingface.co/papers/2505.16869) as pure tensor functions.

Symbols: RG = reward gap, the length-normalised log-probability margin between the chosen (safe) and the rejected
(unsafe) response; `t` = target language (policy, trained); `d` = dominant language (frozen reference, a fixed
regression target).

    L = gap_weight · mean_b (β·RG_t(policy) − RG_d(reference))² + retain_weight · mean (h_policy − h_reference)²

Batches follow TRL's preference layout: 2B rows, the B chosen sequences first, then the B rejected ones.
"""

import torch
import torch.nn.functional as F


RETAIN_POOLINGS = ("masked_mean", "last_token", "unmasked_mean")
BETA_PLACEMENTS = ("policy", "reference")


def sequence_log_probs(per_token_logps, completion_mask, length_normalize=True):
    """Log-probability of each response, averaged over its tokens (SimPO-style) or summed.

    Args:
        per_token_logps (`torch.Tensor` of shape `(N, T - 1)`):
            Log-probability of token `i + 1` given tokens `≤ i`, as returned by TRL's fused LM head (zero where the
            label is ignored).
        completion_mask (`torch.Tensor` of shape `(N, T)`):
            1 on response tokens, 0 on prompt and padding tokens.
        length_normalize (`bool`, *optional*, defaults to `True`):
            Divide by the number of response tokens. `False` gives the summed log-probability (ablation only).

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    # Position i of the log-probs scores token i + 1, so the mask is shifted like the labels.
    mask = completion_mask[:, 1:].to(per_token_logps.dtype)
    total = (per_token_logps * mask).sum(dim=-1)
    if not length_normalize:
        return total
    return total / mask.sum(dim=-1).clamp(min=1)


def reward_gap(logps):
    """Reward gap `chosen − rejected` of a `(2B,)` tensor laid out `[chosen; rejected]`; returns shape `(B,)`."""
    chosen, rejected = logps.chunk(2, dim=0)
    return chosen - rejected


def pool_hidden_states(hidden_states, mask, pooling="masked_mean"):
    """One vector per sequence from the last-layer hidden states.

    Args:
        hidden_states (`torch.Tensor` of shape `(N, T, H)`):
            Last-layer (post final norm) hidden states.
        mask (`torch.Tensor` of shape `(N, T)`):
            1 on the positions to pool (the attention mask, or the prompt tokens only). Ignored by `"unmasked_mean"`.
        pooling (`str`, *optional*, defaults to `"masked_mean"`):
            - `"masked_mean"`: mean over the masked-in positions.
            - `"last_token"`: the last masked-in position (the paper's description).
            - `"unmasked_mean"`: mean over every position, padding included (the official code).

    Returns:
        `torch.Tensor` of shape `(N, H)`.
    """
    if pooling == "unmasked_mean":
        return hidden_states.mean(dim=1)
    if pooling == "masked_mean":
        weights = mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if pooling == "last_token":
        positions = torch.arange(1, mask.size(1) + 1, device=mask.device)
        last = (mask.long() * positions).argmax(dim=1)  # index of the last 1 (right or left padding alike)
        return hidden_states[torch.arange(hidden_states.size(0), device=hidden_states.device), last]
    raise ValueError(f"`pooling` must be one of {RETAIN_POOLINGS}, got {pooling!r}.")


def mpo_loss(
    policy_gap,
    ref_gap,
    policy_hidden,
    ref_hidden,
    beta=1.0,
    beta_placement="policy",
    gap_weight=1.0,
    retain_weight=1.0,
):
    """The MPO objective: reward-gap regression plus hidden-state retention.

    Args:
        policy_gap (`torch.Tensor` of shape `(B,)`):
            Policy reward gap on the target-language pairs (carries the gradient).
        ref_gap (`torch.Tensor` of shape `(B,)`):
            Reference reward gap on the dominant-language pairs (a fixed target; detached here).
        policy_hidden (`torch.Tensor` of shape `(2B, H)`):
            Pooled policy hidden states of the dominant-language chosen and rejected sequences.
        ref_hidden (`torch.Tensor` of shape `(2B, H)`):
            Pooled reference hidden states of the same sequences (detached here).
        beta (`float`, *optional*, defaults to `1.0`):
            Scale between the two gaps.
        beta_placement (`str`, *optional*, defaults to `"policy"`):
            `"policy"`: `(β·RG_t − RG_d)²` (official code); `"reference"`: `(RG_t − RG_d/β)²` (the alternative left
            commented out in the official code).
        gap_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the reward-gap term.
        retain_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the hidden-state term.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: the total loss, then the gap and retain terms (unweighted).
    """
    if beta_placement not in BETA_PLACEMENTS:
        raise ValueError(f"`beta_placement` must be one of {BETA_PLACEMENTS}, got {beta_placement!r}.")
    policy_gap = policy_gap.float()
    ref_gap = ref_gap.detach().float().to(policy_gap.device)
    if beta_placement == "policy":
        gap_loss = F.mse_loss(beta * policy_gap, ref_gap)
    else:
        gap_loss = F.mse_loss(policy_gap, ref_gap / beta)
    retain_loss = F.mse_loss(policy_hidden.float(), ref_hidden.detach().float().to(policy_hidden.device))
    return gap_weight * gap_loss + retain_weight * retain_loss, gap_loss, retain_loss
