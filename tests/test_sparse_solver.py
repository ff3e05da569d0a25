import itertools

import pytest
import torch

from hf_mlsafety.editing.solver import (
    activation_moments,
    default_edit_layer,
    edit_objective,
    jaccard,
    jaccard_matrix,
    lora_factors,
    merge_moments,
    safety_neuron_scores,
    select_safety_neurons,
    solve_sparse_edit,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices run faster on one thread; on a shared CPU extra OpenMP threads spin (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(seed=0, n=12, d_in=8, m=5, n_safe=6):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=generator, dtype=torch.float64)
    gap = torch.randn(n, m, generator=generator, dtype=torch.float64)
    x_safe = torch.randn(n_safe, d_in, generator=generator, dtype=torch.float64)
    return x, gap, x_safe


def _minimise_factored(objective, d_in, m, rank, seed, restarts=2):
    """Direct numerical minimisation of `objective(A @ B)` over A (d_in × r), B (r × m) with L-BFGS."""
    best_value, best_delta = float("inf"), None
    for restart in range(restarts):
        generator = torch.Generator().manual_seed(seed + restart)
        a = torch.randn(d_in, rank, generator=generator, dtype=torch.float64, requires_grad=True)
        b = torch.randn(rank, m, generator=generator, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS(
            [a, b], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
        )

        def closure(optimiser=optimiser, a=a, b=b):
            optimiser.zero_grad()
            value = objective(a @ b)
            value.backward()
            return value

        optimiser.step(closure)
        value = objective(a @ b).item()
        if value < best_value:
            best_value, best_delta = value, (a @ b).detach()
    return best_value, best_delta


# Safety-neuron selection


def test_merge_moments_equals_moments_of_all_rows():
    activations = torch.randn(23, 7, dtype=torch.float64) * 3 + 5
    merged = None
    for chunk in (activations[:1], activations[1:9], activations[9:]):
        merged = merge_moments(merged, activation_moments(chunk))
    full = activation_moments(activations)
    assert merged.count == 23
    torch.testing.assert_close(merged.mean, full.mean)
    torch.testing.assert_close(merged.var, full.var)


def test_selection_recovers_planted_neurons():
    generator = torch.Generator().manual_seed(0)
    harmful = torch.randn(40, 200, generator=generator)
    harmless = torch.randn(40, 200, generator=generator)
    planted = torch.tensor([7, 42, 99, 150, 188])
    harmful[:, planted] += 3.0
    suppressed = torch.tensor([10, 11])  # fire on harmless prompts: one-sided criteria must ignore them
    harmless[:, suppressed] += 3.0
    selected = select_safety_neurons(activation_moments(harmful), activation_moments(harmless))
    assert selected.tolist() == planted.tolist()


def test_selection_is_the_union_of_both_criteria():
    generator = torch.Generator().manual_seed(1)
    harmful = torch.randn(50, 100, generator=generator) * 0.05
    harmless = torch.randn(50, 100, generator=generator) * 0.05
    # Neuron 0: large mean difference but huge spread (z passes, d fails).
    harmful[:, 0] = torch.randn(50, generator=generator) * 20 + 8
    harmless[:, 0] = torch.randn(50, generator=generator) * 20
    # Neuron 1: tiny but consistent difference (d passes, z fails: neuron 0 inflates the spread of differences).
    harmful[:, 1] += 0.3
    harmful_moments, harmless_moments = activation_moments(harmful), activation_moments(harmless)
    z, d = safety_neuron_scores(harmful_moments, harmless_moments)
    assert z[0] > 2.0 and d[0] < 1.0
    assert z[1] < 2.0 and d[1] > 1.0
    assert select_safety_neurons(harmful_moments, harmless_moments).tolist() == [0, 1]
    assert select_safety_neurons(harmful_moments, harmless_moments, tau_stat=float("inf")).tolist() == [0]
    assert select_safety_neurons(harmful_moments, harmless_moments, tau_mag=float("inf")).tolist() == [1]


def test_scores_need_two_rows_per_class():
    with pytest.raises(ValueError, match="at least 2 harmful and 2 harmless"):
        safety_neuron_scores(activation_moments(torch.randn(1, 4)), activation_moments(torch.randn(5, 4)))


def test_jaccard():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard(set(), set()) == 1.0
    assert jaccard({1}, set()) == 0.0
    names, matrix = jaccard_matrix({"en": {1, 2, 3}, "zh": {2, 3, 4}, "bn": {9}})
    assert names == ["en", "zh", "bn"]
    expected = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(matrix, expected)


def test_default_edit_layer_picks_the_middle_layer_with_most_english_neurons():
    counts = {0: 500, 5: 10, 6: 20, 8: 20, 11: 5, 12: 1000}
    assert default_edit_layer(counts, num_layers=16) == 6  # candidates 6..11, tie 6/8 goes to the shallower
    assert default_edit_layer({0: 3, 1: 4}, num_layers=2) == 1  # tiny models: candidates 0 and 1
    with pytest.raises(ValueError, match="No English safety neurons in the candidate layers"):
        default_edit_layer({0: 9, 6: 0}, num_layers=16)


# The closed form


def test_full_rank_closed_form_is_the_ridge_solution():
    x, gap, x_safe = _problem()
    gamma, lam = 0.7, 0.3
    left, right = solve_sparse_edit(x, gap, x_safe, gamma=gamma, lam=lam, rank=5)
    q = x.T @ x + gamma * x_safe.T @ x_safe + lam * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(left @ right, torch.linalg.solve(q, x.T @ gap))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_closed_form_equals_direct_minimisation_under_the_rank_bound(rank):
    x, gap, x_safe = _problem(seed=rank)
    gamma, lam = 0.7, 0.3
    left, right = solve_sparse_edit(x, gap, x_safe, gamma=gamma, lam=lam, rank=rank)
    delta = left @ right
    assert left.shape == (8, rank) and right.shape == (rank, 5)
    assert torch.linalg.matrix_rank(delta).item() <= rank
    closed = edit_objective(delta, x, gap, x_safe, gamma, lam).item()
    numeric, numeric_delta = _minimise_factored(
        lambda d: edit_objective(d, x, gap, x_safe, gamma, lam), d_in=8, m=5, rank=rank, seed=10 * rank
    )
    assert closed <= numeric + 1e-9
    assert closed == pytest.approx(numeric, rel=1e-7)
    torch.testing.assert_close(delta, numeric_delta, atol=1e-5, rtol=1e-5)


def test_utility_penalty_shrinks_as_gamma_grows():
    x, gap, x_safe = _problem(seed=3)
    norms = []
    for gamma in [0.0, 0.1, 1.0, 10.0, 100.0, 1000.0]:
        left, right = solve_sparse_edit(x, gap, x_safe, gamma=gamma, lam=0.1, rank=2)
        norms.append((x_safe @ left @ right).norm().item())
    assert all(later < earlier for earlier, later in itertools.pairwise(norms))
    assert norms[-1] < 0.05 * norms[0]


def test_hard_projection_keeps_anchors_fixed_and_is_optimal_in_the_null_space():
    x, gap, x_safe = _problem(seed=4, n_safe=5)  # 5 anchors in 8 dimensions: a 3-dimensional null space
    lam = 0.3
    left, right = solve_sparse_edit(
        x, gap, x_safe, lam=lam, rank=2, utility_mode="hard_projection", null_space_threshold=1e-10
    )
    delta = left @ right
    assert torch.linalg.matrix_rank(delta).item() <= 2
    assert (x_safe @ delta).norm() < 1e-10 * (x @ delta).norm()
    soft_left, soft_right = solve_sparse_edit(x, gap, x_safe, gamma=1.0, lam=lam, rank=2)
    assert (x_safe @ soft_left @ soft_right).norm() > 1e3 * (x_safe @ delta).norm()

    # Among rank-2 edits inside the null space, the closed form minimises the fit + ridge terms.
    eigenvalues, eigenvectors = torch.linalg.eigh(x_safe.T @ x_safe)
    basis = eigenvectors[:, eigenvalues <= 1e-10 * eigenvalues.mean()]
    assert basis.shape[1] == 3
    closed = edit_objective(delta, x, gap, x_safe, 0.0, lam).item()
    numeric, _ = _minimise_factored(
        lambda d: edit_objective(basis @ d, x, gap, x_safe, 0.0, lam), d_in=3, m=5, rank=2, seed=7
    )
    assert closed == pytest.approx(numeric, rel=1e-7)


def test_hard_projection_bound_with_a_relative_threshold():
    generator = torch.Generator().manual_seed(5)
    x, gap, _ = _problem(seed=5)
    # More anchors than dimensions, with a decaying spectrum: no exact null space, the threshold decides.
    scales = torch.logspace(0, -3, 8, dtype=torch.float64)
    x_safe = torch.randn(30, 8, generator=generator, dtype=torch.float64) * scales
    threshold = 1e-2
    left, right = solve_sparse_edit(x, gap, x_safe, rank=2, utility_mode="hard_projection")
    delta = left @ right
    mean_eigenvalue = x_safe.square().sum() / 8
    assert (x_safe @ delta).square().sum() <= threshold * mean_eigenvalue * delta.square().sum()
    assert delta.norm() > 0


def test_hard_projection_rejects_a_null_space_smaller_than_the_rank():
    x, gap, x_safe = _problem(n_safe=7)  # 7 anchors in 8 dimensions: a 1-dimensional null space
    with pytest.raises(ValueError, match="null space of dimension 1"):
        solve_sparse_edit(x, gap, x_safe, rank=2, utility_mode="hard_projection", null_space_threshold=1e-10)


def test_float32_solver_is_close_to_float64():
    x, gap, x_safe = _problem(seed=6)
    left, right = solve_sparse_edit(x, gap, x_safe, rank=3)
    left32, right32 = solve_sparse_edit(x, gap, x_safe, rank=3, dtype=torch.float32)
    assert left32.dtype == torch.float32
    torch.testing.assert_close((left32 @ right32).double(), left @ right, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 6}, r"min\(5, 8\); got 6"),
        ({"rank": 0}, "between 1 and"),
        ({"lam": 0.0}, "`lam` must be > 0"),
        ({"gamma": -1.0}, "`gamma` >= 0"),
        ({"utility_mode": "soft_penalty"}, "'soft' or 'hard_projection'"),
    ],
)
def test_solver_rejects_bad_arguments(kwargs, message):
    x, gap, x_safe = _problem()
    with pytest.raises(ValueError, match=message):
        solve_sparse_edit(x, gap, x_safe, **{"rank": 2, **kwargs})


def test_solver_rejects_mismatched_shapes():
    x, gap, x_safe = _problem()
    with pytest.raises(ValueError, match="`gap` has 11 rows but `features` has 12"):
        solve_sparse_edit(x, gap[:11], x_safe, rank=2)
    with pytest.raises(ValueError, match="`safe_features` has 7 columns"):
        solve_sparse_edit(x, gap, x_safe[:, :7], rank=2)


# LoRA factorisation


def test_lora_factors_reproduce_the_edit_on_the_safety_rows_only():
    x, gap, x_safe = _problem(seed=8)
    left, right = solve_sparse_edit(x, gap, x_safe, rank=2)
    rows = torch.tensor([3, 10, 11, 17, 30])
    lora_a, lora_b = lora_factors(left, right, rows, out_features=32, dtype=torch.float64)
    assert lora_a.shape == (2, 8) and lora_b.shape == (32, 2)
    update = lora_b @ lora_a
    torch.testing.assert_close(update[rows], (left @ right).T)
    others = torch.ones(32, dtype=torch.bool)
    others[rows] = False
    assert torch.count_nonzero(update[others]) == 0
    with pytest.raises(ValueError, match="4 rows are edited"):
        lora_factors(left, right, rows[:4], out_features=32)
