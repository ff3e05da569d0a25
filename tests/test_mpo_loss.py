"""The MPO loss as pure functions, against values worked out by hand."""

import pytest
import torch

from hf_mlsafety.losses.mpo import mpo_loss, pool_hidden_states, reward_gap, sequence_log_probs


def test_sequence_log_probs_averages_response_tokens_only():
    # Position i scores token i + 1, so the completion mask is read shifted by one.
    per_token_logps = torch.tensor([[-9.0, -1.0, -2.0, -3.0], [-9.0, -0.5, -9.0, -9.0]])
    completion_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]])
    # row 0: tokens 2..4 -> (-1 - 2 - 3) / 3; row 1: token 2 only -> -0.5 / 1 (the -9 are prompt or padding)
    assert torch.allclose(sequence_log_probs(per_token_logps, completion_mask), torch.tensor([-2.0, -0.5]))
    summed = sequence_log_probs(per_token_logps, completion_mask, length_normalize=False)
    assert torch.allclose(summed, torch.tensor([-6.0, -0.5]))


def test_sequence_log_probs_empty_response_is_zero_not_nan():
    per_token_logps = torch.tensor([[-1.0, -2.0]])
    assert sequence_log_probs(per_token_logps, torch.tensor([[0, 0, 0]])).item() == 0.0


def test_reward_gap_is_chosen_minus_rejected_in_preference_layout():
    # [chosen_0, chosen_1; rejected_0, rejected_1]
    assert torch.equal(reward_gap(torch.tensor([1.0, 2.0, 4.0, -1.0])), torch.tensor([-3.0, 3.0]))


HIDDEN = torch.tensor(
    [
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],  # last position is padding
        [[0.0, 0.0], [2.0, 2.0], [4.0, 8.0]],
    ]
)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [
        ("masked_mean", [[2.0, 3.0], [2.0, 10.0 / 3.0]]),  # (1+3)/2, (2+4)/2; (0+2+4)/3, (0+2+8)/3
        ("last_token", [[3.0, 4.0], [4.0, 8.0]]),  # last real position
        ("unmasked_mean", [[3.0, 4.0], [2.0, 10.0 / 3.0]]),  # padding averaged in: (1+3+5)/3, (2+4+6)/3
    ],
)
def test_pool_hidden_states(pooling, expected):
    assert torch.allclose(pool_hidden_states(HIDDEN, MASK, pooling), torch.tensor(expected))


def test_last_token_pooling_with_left_padding_and_prompt_span():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])  # left-padded row; a prompt-only span ending at position 1
    assert torch.allclose(pool_hidden_states(HIDDEN, mask, "last_token"), torch.tensor([[5.0, 6.0], [2.0, 2.0]]))


def test_pool_hidden_states_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden_states(HIDDEN, MASK, "max")


def test_mpo_loss_terms_weights_and_beta_placement():
    policy_gap = torch.tensor([0.5, -0.2], requires_grad=True)
    ref_gap = torch.tensor([1.0, 0.4], requires_grad=True)
    policy_hidden = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ref_hidden = torch.ones(2, 2)

    loss, gap_loss, retain_loss = mpo_loss(
        policy_gap, ref_gap, policy_hidden, ref_hidden, beta=1.5, gap_weight=2.0, retain_weight=0.5
    )
    # ((1.5·0.5 − 1.0)² + (1.5·(−0.2) − 0.4)²) / 2 = (0.0625 + 0.49) / 2
    assert gap_loss.item() == pytest.approx(0.27625)
    # differences 0, 1, 2, 3 -> (0 + 1 + 4 + 9) / 4
    assert retain_loss.item() == pytest.approx(3.5)
    assert loss.item() == pytest.approx(2.0 * 0.27625 + 0.5 * 3.5)

    loss.backward()
    # dL/dRG_t = gap_weight · 2β(β·RG_t − RG_d) / B; the reference gap is a fixed target (no gradient)
    assert torch.allclose(policy_gap.grad, torch.tensor([2.0 * 1.5 * -0.25, 2.0 * 1.5 * -0.7]))
    assert ref_gap.grad is None

    _, gap_loss_ref, _ = mpo_loss(policy_gap, ref_gap, policy_hidden, ref_hidden, beta=1.5, beta_placement="reference")
    # ((0.5 − 1/1.5)² + (−0.2 − 0.4/1.5)²) / 2
    assert gap_loss_ref.item() == pytest.approx(((0.5 - 1 / 1.5) ** 2 + (-0.2 - 0.4 / 1.5) ** 2) / 2)

    with pytest.raises(ValueError, match="beta_placement"):
        mpo_loss(policy_gap, ref_gap, policy_hidden, ref_hidden, beta_placement="both")


@pytest.mark.parametrize(
    ("pooling", "expected_retain"),
    [
        # pooled policy states (reference states are zero): [[2, 3], [2, 10/3]] -> (4 + 9 + 4 + 100/9) / 4
        ("masked_mean", (17.0 + 100.0 / 9.0) / 4.0),
        # [[3, 4], [4, 8]] -> (9 + 16 + 16 + 64) / 4
        ("last_token", 105.0 / 4.0),
        # [[3, 4], [2, 10/3]] -> (9 + 16 + 4 + 100/9) / 4
        ("unmasked_mean", (29.0 + 100.0 / 9.0) / 4.0),
    ],
)
def test_mpo_loss_end_to_end_from_known_log_probs_and_hidden_states(pooling, expected_retain):
    # One pair (B = 1). Target-language policy rows [chosen; rejected], response = the last two tokens.
    target_logps = torch.tensor([[0.0, -1.0, -3.0], [0.0, -4.0, -6.0]])
    target_mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    # Dominant-language reference rows: averages -1 and -3.
    ref_logps = torch.tensor([[0.0, -1.0, -1.0], [0.0, -2.0, -4.0]])
    policy_gap = reward_gap(sequence_log_probs(target_logps, target_mask))  # -2 − (−5) = 3
    ref_gap = reward_gap(sequence_log_probs(ref_logps, target_mask))  # -1 − (−3) = 2
    assert policy_gap.tolist() == [3.0] and ref_gap.tolist() == [2.0]

    policy_hidden = pool_hidden_states(HIDDEN, MASK, pooling)
    ref_hidden = pool_hidden_states(torch.zeros_like(HIDDEN), MASK, pooling)
    loss, gap_loss, retain_loss = mpo_loss(policy_gap, ref_gap, policy_hidden, ref_hidden, beta=1.0)
    assert gap_loss.item() == pytest.approx(1.0)  # (1·3 − 2)²
    assert retain_loss.item() == pytest.approx(expected_retain)
    assert loss.item() == pytest.approx(1.0 + expected_retain)
