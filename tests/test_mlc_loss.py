import math

import pytest
import torch

from hf_mlsafety.losses.mlc import cosine_to_first_row, mlc_consistency_loss, mlc_singular_values, sigma1_share


def collinear(m, d=16, seed=0):
    """m rows on one line through the origin, with different lengths and signs (antiparallel rows are collinear)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=generator)
    scales = torch.linspace(0.5, 3.0, m) * torch.tensor([(-1.0) ** i for i in range(m)])
    return scales[:, None] * direction[None, :]


def orthogonal(m, d=16, seed=0):
    """m mutually orthogonal rows of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    return torch.linspace(0.5, 3.0, m)[:, None] * basis[:m]


@pytest.mark.parametrize("m", [2, 3, 10])
@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_collinear_rows_give_the_minimum(m, tau):
    loss, singular_values = mlc_consistency_loss(collinear(m), tau=tau)
    assert loss.item() == pytest.approx(math.log(1 + (m - 1) * math.exp(-1 / tau)), abs=1e-4)
    assert singular_values.shape == (m,)
    assert singular_values[0].item() == pytest.approx(math.sqrt(m), abs=1e-4)  # unit rows: σ₁² = m


@pytest.mark.parametrize("m", [2, 3, 10])
def test_orthogonal_rows_give_log_m(m):
    loss, singular_values = mlc_consistency_loss(orthogonal(m), tau=0.2)
    assert loss.item() == pytest.approx(math.log(m), abs=1e-4)
    assert torch.allclose(singular_values, torch.ones(m), atol=1e-5)


def test_paper_formula_without_sigma1_normalisation():
    # `detach_sigma1=False` keeps the raw singular values: collinear unit rows have σ₁ = √m, the others 0
    m, tau = 10, 0.2
    loss, _ = mlc_consistency_loss(collinear(m), tau=tau, detach_sigma1=False)
    assert loss.item() == pytest.approx(math.log(1 + (m - 1) * math.exp(-math.sqrt(m) / tau)), abs=1e-4)
    loss, _ = mlc_consistency_loss(orthogonal(m), tau=tau, detach_sigma1=False)
    assert loss.item() == pytest.approx(math.log(m), abs=1e-4)


def test_batch_loss_is_the_mean_of_the_examples_and_ignores_row_lengths():
    batch = torch.stack([collinear(4), orthogonal(4), torch.randn(4, 16, generator=torch.Generator().manual_seed(1))])
    loss, singular_values = mlc_consistency_loss(batch)
    singles = [mlc_consistency_loss(example)[0] for example in batch]
    assert singular_values.shape == (3, 4)
    assert loss.item() == pytest.approx(torch.stack(singles).mean().item(), abs=1e-6)
    rescaled, _ = mlc_consistency_loss(batch * torch.tensor([0.1, 2.0, 7.0, 0.5])[None, :, None])
    assert rescaled.item() == pytest.approx(loss.item(), abs=1e-5)


@pytest.mark.parametrize("detach_sigma1", [True, False])
@pytest.mark.parametrize("noise", [0.0, 1e-7])
def test_identical_rows_have_finite_gradients(detach_sigma1, noise):
    # Identical rows: σ₂ = … = σₘ = 0 are repeated, where the backward of a full SVD divides by zero
    row = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    features = row.repeat(10, 1) + noise * torch.randn(10, 32, generator=torch.Generator().manual_seed(1))
    extractor = torch.nn.Linear(32, 8)
    hidden = features.clone().requires_grad_(True)
    loss, _ = mlc_consistency_loss(extractor(hidden)[None], detach_sigma1=detach_sigma1)
    loss.backward()
    for grad in (hidden.grad, extractor.weight.grad, extractor.bias.grad):
        assert torch.isfinite(grad).all()
    # Orthogonal rows repeat the singular value 1: finite too
    rows = orthogonal(6).requires_grad_(True)
    mlc_consistency_loss(rows, detach_sigma1=detach_sigma1)[0].backward()
    assert torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0


def test_gradient_descent_makes_rows_collinear():
    features = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    optimizer = torch.optim.SGD([features], lr=0.5)
    first_loss, first_sv = mlc_consistency_loss(features)
    for _ in range(200):
        optimizer.zero_grad()
        mlc_consistency_loss(features)[0].backward()
        optimizer.step()
    loss, singular_values = mlc_consistency_loss(features)
    assert loss.item() < first_loss.item() - 0.5
    assert (sigma1_share(singular_values) > sigma1_share(first_sv.detach())).all()
    assert (sigma1_share(singular_values) > 0.8).all()


def test_computed_in_float32_outside_autocast():
    features = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(0))
    reference, _ = mlc_consistency_loss(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, singular_values = mlc_consistency_loss(features.bfloat16())
    assert loss.dtype == torch.float32 and singular_values.dtype == torch.float32
    # Only the bf16 rounding of the input remains
    assert loss.item() == pytest.approx(reference.item(), abs=1e-2)
    assert mlc_singular_values(features).dtype == torch.float32


def test_sigma1_share_and_cosines():
    m = 4
    assert sigma1_share(mlc_singular_values(collinear(m))).item() == pytest.approx(1.0, abs=1e-5)
    assert sigma1_share(mlc_singular_values(orthogonal(m))).item() == pytest.approx(1 / m, abs=1e-5)
    rows = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 1.0]])
    assert torch.allclose(cosine_to_first_row(rows), torch.tensor([1.0, 0.0, -1 / math.sqrt(2)]), atol=1e-6)
    assert cosine_to_first_row(torch.stack([rows, rows])).shape == (2, 3)
