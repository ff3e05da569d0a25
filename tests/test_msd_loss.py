import math

import pytest
import torch

from hf_mlsafety.losses.msd import (
    dpsw_student_weight,
    dpsw_teacher_weight,
    msd_loss,
    normalize_weights,
    reverse_kl,
    topk_reverse_kl,
)


B, T, V = 3, 5, 32  # V above the default DPSW K of 20


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V, generator=generator) * 2
    teacher = torch.randn(B, T, V, generator=generator) * 2
    # Sequences of 5, 3 and 1 valid response tokens (right padding).
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    completion_ids = torch.randint(0, V, (B, T), generator=generator)
    return student, teacher, mask, completion_ids


def hand_reverse_kl(student, teacher):
    """KL(p_S || p_T) position by position with plain Python sums."""
    out = torch.zeros(student.shape[:2])
    for b in range(student.size(0)):
        for t in range(student.size(1)):
            p = torch.softmax(student[b, t].double(), -1).tolist()
            q = torch.softmax(teacher[b, t].double(), -1).tolist()
            out[b, t] = sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q, strict=True))
    return out


def test_reverse_kl_matches_hand_computation(logits):
    student, teacher, _, _ = logits
    kl = reverse_kl(student, teacher)
    assert kl.shape == (B, T)
    torch.testing.assert_close(kl, hand_reverse_kl(student, teacher), atol=1e-5, rtol=1e-5)
    assert (kl > 0).all()
    # Reverse, not forward: swapping the arguments gives a different value.
    assert not torch.allclose(kl, reverse_kl(teacher, student), atol=1e-3)
    torch.testing.assert_close(reverse_kl(student, student), torch.zeros(B, T), atol=1e-6, rtol=0)


def test_topk_reverse_kl(logits):
    student, teacher, _, _ = logits
    # With the whole vocabulary as support, top-k is the full KL.
    torch.testing.assert_close(topk_reverse_kl(student, teacher, V), reverse_kl(student, teacher), atol=1e-5, rtol=0)
    # k = 3: both distributions renormalised on the student's 3 most probable tokens.
    kl3 = topk_reverse_kl(student, teacher, 3)
    b, t = 1, 2
    indices = student[b, t].topk(3).indices
    hand = hand_reverse_kl(student[b, t, indices].view(1, 1, 3), teacher[b, t, indices].view(1, 1, 3))
    torch.testing.assert_close(kl3[b, t], hand[0, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kl3, reverse_kl(student, teacher), atol=1e-3)


def test_dpsw_teacher_weight():
    generator = torch.Generator().manual_seed(1)
    random = torch.randn(2, 4, V, generator=generator) * 3
    weight = dpsw_teacher_weight(random, k=5)
    assert weight.shape == (2, 4)
    assert ((weight >= 0) & (weight <= 1)).all()
    # Hand computation at one position: 1 - entropy of the renormalised top-5 / log 5.
    top = torch.softmax(random[0, 0].topk(5).values.double(), -1)
    expected = 1 - float(-(top * top.log()).sum()) / math.log(5)
    assert weight[0, 0].item() == pytest.approx(expected, abs=1e-5)
    # A flat teacher gets weight 0, a teacher sure of one token gets weight ~1.
    assert dpsw_teacher_weight(torch.zeros(1, 1, V), k=5).item() == pytest.approx(0.0, abs=1e-6)
    peaked = torch.zeros(1, 1, V)
    peaked[0, 0, 3] = 50.0
    assert dpsw_teacher_weight(peaked, k=5).item() == pytest.approx(1.0, abs=1e-6)
    # K only looks at the top-K: the tail outside it does not matter.
    tail_changed = random.clone()
    smallest = random.topk(V - 5, dim=-1, largest=False).indices
    tail_changed.scatter_(-1, smallest, -30.0)
    torch.testing.assert_close(dpsw_teacher_weight(tail_changed, k=5), weight)


def test_dpsw_student_weight(logits):
    student, teacher, _, _ = logits
    y_star = teacher.argmax(-1)
    weight = dpsw_student_weight(student, y_star)
    assert ((weight >= 0) & (weight <= 1)).all()
    expected = 1 - torch.softmax(student, -1).gather(-1, y_star.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(weight, expected)
    # A student already certain of y* has nothing left to learn there.
    certain = torch.full((1, 1, V), -30.0)
    certain[0, 0, 7] = 30.0
    assert dpsw_student_weight(certain, torch.tensor([[7]])).item() == pytest.approx(0.0, abs=1e-6)


def test_normalize_weights_average_one_per_sequence(logits):
    _, _, mask, _ = logits
    raw = torch.rand(B, T, generator=torch.Generator().manual_seed(2))
    normalized = normalize_weights(raw, mask)
    means = (normalized * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(means, torch.ones(B))
    assert (normalized[mask == 0] == 0).all()
    # Proportional to the raw weights within a sequence.
    torch.testing.assert_close(normalized[0] / normalized[0].sum(), raw[0] / raw[0].sum())
    # A sequence whose weights all vanish falls back to uniform weights; the others are unaffected.
    raw[1] = 0.0
    fallback = normalize_weights(raw, mask)
    torch.testing.assert_close(fallback[1], mask[1].float())
    torch.testing.assert_close(fallback[0], normalized[0])


def test_loss_without_dpsw_is_plain_reverse_kl(logits):
    student, teacher, mask, completion_ids = logits
    output = msd_loss(student, teacher, completion_ids, mask, use_dpsw=False)
    kl = hand_reverse_kl(student, teacher)
    per_sequence = [float((kl[b] * mask[b]).sum() / mask[b].sum()) for b in range(B)]
    assert output.loss.item() == pytest.approx(sum(per_sequence) / B, rel=1e-5)
    torch.testing.assert_close(output.weight, mask.float())


def test_loss_with_dpsw_by_hand_and_weights_detached(logits):
    student, teacher, mask, completion_ids = logits
    student = student.clone().requires_grad_(True)
    output = msd_loss(student, teacher, completion_ids, mask, dpsw_topk=4)

    w_teacher = dpsw_teacher_weight(teacher, k=4)
    w_student = 1 - torch.softmax(student.detach(), -1).gather(-1, teacher.argmax(-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(output.teacher_weight, w_teacher)
    torch.testing.assert_close(output.student_weight, w_student)
    w = w_teacher * w_student * mask
    kl = hand_reverse_kl(student.detach(), teacher)
    # (1/L) Σ_t w̃_t KL_t = Σ_t (w_t / Σ_j w_j) KL_t per sequence, then the mean over sequences.
    expected = sum(float((w[b] * kl[b]).sum() / w[b].sum()) for b in range(B)) / B
    assert output.loss.item() == pytest.approx(expected, rel=1e-5)
    assert not math.isclose(expected, msd_loss(student, teacher, completion_ids, mask, use_dpsw=False).loss.item())
    for b in range(B):
        assert (output.weight[b] * mask[b]).sum().item() == pytest.approx(mask[b].sum().item(), rel=1e-5)

    # The weights are constants for the gradient: same gradient as Σ w̃.detach() · KL.
    output.loss.backward()
    student_again = student.detach().clone().requires_grad_(True)
    kl_again = reverse_kl(student_again, teacher)
    weight = output.weight.detach()
    reference = sum(((weight[b] * kl_again[b] * mask[b]).sum() / mask[b].sum()) for b in range(B)) / B
    reference.backward()
    torch.testing.assert_close(student.grad, student_again.grad)


def test_loss_is_zero_for_identical_distributions(logits):
    student, _, mask, completion_ids = logits
    for use_dpsw in (True, False):
        output = msd_loss(student, student.clone(), completion_ids, mask, use_dpsw=use_dpsw)
        assert output.loss.item() == pytest.approx(0.0, abs=1e-6)


def test_y_star_sampled_uses_response_tokens(logits):
    student, teacher, mask, completion_ids = logits
    output = msd_loss(student, teacher, completion_ids, mask, dpsw_y_star="sampled")
    torch.testing.assert_close(output.student_weight, dpsw_student_weight(student, completion_ids))
    argmax = msd_loss(student, teacher, completion_ids, mask, dpsw_y_star="teacher_argmax")
    assert not torch.allclose(output.student_weight, argmax.student_weight)


def test_sequences_without_response_tokens_do_not_dilute_the_mean(logits):
    student, teacher, mask, completion_ids = logits
    full = msd_loss(student[:2], teacher[:2], completion_ids[:2], mask[:2])
    emptied = mask.clone()
    emptied[2] = 0
    with_empty = msd_loss(student, teacher, completion_ids, emptied)
    assert with_empty.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)


def test_topk_divergence_option_and_bad_names(logits):
    student, teacher, mask, completion_ids = logits
    top = msd_loss(student, teacher, completion_ids, mask, divergence="topk_reverse_kl", distillation_topk=3)
    torch.testing.assert_close(top.per_token_kl, topk_reverse_kl(student, teacher, 3))
    with pytest.raises(ValueError, match="divergence"):
        msd_loss(student, teacher, completion_ids, mask, divergence="forward_kl")
    with pytest.raises(ValueError, match="dpsw_y_star"):
        msd_loss(student, teacher, completion_ids, mask, dpsw_y_star="student")
