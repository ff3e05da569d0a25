"""The math of [Sparse Weight Editing](https://huggingface.co/papers/2602.22554), as pure functions on tensors.

Nothing here knows about models: [`~hf_mlsafety.SparseSafetyEditor`] collects the activations and calls these.

Row-vector convention of the paper: a projection computes `X W` with `W` of shape `(d_in, d_out)`; the safety neurons
`S` index the columns of `W` (the rows of a PyTorch `nn.Linear.weight`). The edit problem (Eq. 8 of the paper) is

    min_ΔW  ‖X ΔW − D‖²_F + γ ‖X_safe ΔW‖²_F + λ ‖ΔW‖²_F     s.t. rank(ΔW) ≤ r

with `X` the harmful target-language features, `D` the safety gap on the `m = |S|` neurons and `X_safe` the harmless
anchors' features.
"""

import math
from typing import NamedTuple

import torch


# Safety-neuron identification (paper, Appendix B)


class Moments(NamedTuple):
    """Count, mean and unbiased variance of a set of activation vectors (one entry per neuron)."""

    count: int
    mean: torch.Tensor
    var: torch.Tensor


def activation_moments(activations):
    """Moments of `activations` of shape `(n, num_neurons)`, in float64."""
    activations = activations.to(torch.float64)
    count = activations.shape[0]
    mean = activations.mean(0)
    var = activations.var(0, correction=1) if count > 1 else torch.zeros_like(mean)
    return Moments(count, mean, var)


def merge_moments(first, second):
    """Moments of the union of two sets of rows (Chan et al.'s parallel update), so that activations can be streamed
    batch by batch instead of kept in memory."""
    if first is None:
        return second
    count = first.count + second.count
    delta = second.mean - first.mean
    mean = first.mean + delta * (second.count / count)
    # Sums of squared deviations, combined exactly.
    m2 = (
        first.var * (first.count - 1) + second.var * (second.count - 1) + delta**2 * first.count * second.count / count
    )
    return Moments(count, mean, m2 / (count - 1) if count > 1 else torch.zeros_like(mean))


def safety_neuron_scores(harmful, harmless):
    """Magnitude z-scores and Cohen's d of the harmful − harmless mean difference, per neuron.

    Args:
        harmful ([`Moments`]):
            Moments of the harmful prompts' activations (at least 2 rows).
        harmless ([`Moments`]):
            Moments of the harmless prompts' activations (at least 2 rows).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `z` (the difference standardised across the neurons of the layer, with the
        population standard deviation) and `d` (the difference over the pooled standard deviation). A neuron with zero
        pooled deviation gets `d = inf` when its difference is positive and `nan` (never selected) when it is zero.
    """
    if harmful.count < 2 or harmless.count < 2:
        raise ValueError(
            "Cohen's d needs at least 2 harmful and 2 harmless rows; got "
            f"{harmful.count} harmful and {harmless.count} harmless."
        )
    diff = harmful.mean - harmless.mean
    spread = diff.std(correction=0)
    z = (diff - diff.mean()) / spread if spread > 0 else torch.zeros_like(diff)
    pooled = ((harmful.count - 1) * harmful.var + (harmless.count - 1) * harmless.var) / (
        harmful.count + harmless.count - 2
    )
    d = diff / pooled.sqrt()
    return z, d


def select_safety_neurons(harmful, harmless, tau_mag=2.0, tau_stat=1.0):
    """Indices of the safety neurons: `z > tau_mag` united with `d > tau_stat` (both one-sided: harmful > harmless).

    Args:
        harmful ([`Moments`]):
            Moments of the harmful prompts' activations.
        harmless ([`Moments`]):
            Moments of the harmless prompts' activations.
        tau_mag (`float`, *optional*, defaults to `2.0`):
            Threshold on the magnitude z-score.
        tau_stat (`float`, *optional*, defaults to `1.0`):
            Threshold on Cohen's d.

    Returns:
        `torch.LongTensor`: sorted neuron indices.
    """
    z, d = safety_neuron_scores(harmful, harmless)
    return torch.nonzero((z > tau_mag) | (d > tau_stat)).flatten()


def jaccard(first, second):
    """Jaccard index |A ∩ B| / |A ∪ B| of two sets; 1.0 for two empty sets (they are equal)."""
    first, second = set(first), set(second)
    union = first | second
    return len(first & second) / len(union) if union else 1.0


def jaccard_matrix(sets):
    """Pairwise Jaccard indices of named sets.

    Args:
        sets (`dict[str, set]`):
            One set per name (for example per language).

    Returns:
        `tuple[list[str], torch.Tensor]`: the names and the symmetric `(k, k)` matrix, in float64.
    """
    names = list(sets)
    matrix = torch.ones(len(names), len(names), dtype=torch.float64)
    for i, first in enumerate(names):
        for j in range(i + 1, len(names)):
            matrix[i, j] = matrix[j, i] = jaccard(sets[first], sets[names[j]])
    return names, matrix


def default_edit_layer(counts, num_layers, depth_range=(0.4, 0.7)):
    """The layer to edit when none is given: the one with the most English safety neurons among the middle layers.

    The paper edits a single layer without saying which. Candidates are layers `floor(0.4 L) ... ceil(0.7 L) - 1`
    (at least one layer); ties go to the shallower layer.

    Args:
        counts (`dict[int, int]`):
            Number of English safety neurons per layer (all edited modules together).
        num_layers (`int`):
            Number of decoder layers `L`.
        depth_range (`tuple[float, float]`, *optional*, defaults to `(0.4, 0.7)`):
            Fractions of the depth bounding the candidates.

    Returns:
        `int`
    """
    start = math.floor(depth_range[0] * num_layers)
    stop = max(math.ceil(depth_range[1] * num_layers), start + 1)
    candidates = [layer for layer in range(start, stop) if counts.get(layer, 0) > 0]
    if not candidates:
        raise ValueError(
            f"No English safety neurons in the candidate layers {list(range(start, stop))} of {num_layers}; "
            "pass `layers` explicitly or lower `tau_mag` / `tau_stat`."
        )
    return max(candidates, key=lambda layer: (counts[layer], -layer))


# The closed-form edit (paper, §4.2–4.4 and Theorem 4.1)


def edit_objective(delta, features, gap, safe_features, gamma, lam):
    """Value of the paper's objective (Eq. 8) at `delta` (shape `(d_in, m)`), in the dtype of the inputs."""
    return (
        (features @ delta - gap).square().sum()
        + gamma * (safe_features @ delta).square().sum()
        + lam * delta.square().sum()
    )


def solve_sparse_edit(
    features,
    gap,
    safe_features,
    gamma=1.0,
    lam=1.0,
    rank=32,
    utility_mode="soft",
    null_space_threshold=1e-2,
    dtype=torch.float64,
):
    """Closed-form, rank-bounded, regularised least-squares edit, returned as two factors `ΔW = left @ right`.

    `utility_mode="soft"` is the paper: `Q = XᵀX + γ X_safeᵀX_safe + λI = RᵀR` (Cholesky), ridge solution
    `M = Q⁻¹XᵀD`, SVD `RM = UΣVᵀ` and `ΔW = R⁻¹ U_r Σ_r V_rᵀ`, the minimiser of Eq. 8 under `rank(ΔW) ≤ r`
    (Eckart–Young in the `Q` norm).

    `utility_mode="hard_projection"` (AlphaEdit style, not in the paper) replaces the γ penalty by a constraint:
    `ΔW = U₀ Z` where `U₀` spans the eigenvectors of `X_safeᵀX_safe` whose eigenvalue is at most
    `null_space_threshold` times the mean eigenvalue `‖X_safe‖²_F / d_in`, so that
    `‖X_safe ΔW‖²_F ≤ null_space_threshold · ‖X_safe‖²_F / d_in · ‖ΔW‖²_F` (exactly 0 on the exact null space).
    The mean, not the largest, eigenvalue sets the scale because hidden states have a few dominant directions.
    `Z` minimises `‖X U₀ Z − D‖² + λ‖Z‖²` under the same rank bound, by the same closed form on the projected
    features.

    Args:
        features (`torch.Tensor` of shape `(n, d_in)`):
            Inputs of the edited projection for the harmful target-language prompts (`X_low`).
        gap (`torch.Tensor` of shape `(n, m)`):
            Safety gap `D = Y_target − X_low W_S` on the `m` edited neurons.
        safe_features (`torch.Tensor` of shape `(n_safe, d_in)`):
            Inputs of the edited projection for the harmless anchors (`X_safe`).
        gamma (`float`, *optional*, defaults to `1.0`):
            Weight γ of the utility penalty (soft mode only).
        lam (`float`, *optional*, defaults to `1.0`):
            Ridge weight λ (> 0, keeps `Q` positive definite).
        rank (`int`, *optional*, defaults to `32`):
            Rank bound r, at most `min(m, d_in)`.
        utility_mode (`str`, *optional*, defaults to `"soft"`):
            `"soft"` or `"hard_projection"`.
        null_space_threshold (`float`, *optional*, defaults to `1e-2`):
            Eigenvalue threshold, relative to the mean eigenvalue, defining the harmless anchors' null space (hard
            projection only).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float64`):
            Compute dtype.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `left` of shape `(d_in, r)` (`R⁻¹U_r`, lifted by `U₀` in hard mode) and
        `right` of shape `(r, m)` (`Σ_r V_rᵀ`).
    """
    _check_edit_arguments(features, gap, safe_features, gamma, lam, rank, utility_mode)
    x, d, x_safe = features.to(dtype), gap.to(dtype), safe_features.to(dtype)

    basis = None
    if utility_mode == "hard_projection":
        eigenvalues, eigenvectors = torch.linalg.eigh(x_safe.T @ x_safe)
        basis = eigenvectors[:, eigenvalues <= null_space_threshold * eigenvalues.mean()]
        if basis.shape[1] < rank:
            raise ValueError(
                f"The harmless anchors leave a null space of dimension {basis.shape[1]} (eigenvalues <= "
                f"{null_space_threshold} × the mean), smaller than `rank`={rank}: raise `null_space_threshold`, "
                "use fewer anchors or `utility_mode='soft'`."
            )
        x = x @ basis

    q = x.T @ x + lam * torch.eye(x.shape[1], dtype=dtype)
    if basis is None:  # in hard mode the constraint replaces the penalty
        q = q + gamma * (x_safe.T @ x_safe)
    lower = torch.linalg.cholesky(q)  # Q = L Lᵀ, R = Lᵀ
    ridge = torch.cholesky_solve(x.T @ d, lower)  # M = Q⁻¹ Xᵀ D
    u, s, vh = torch.linalg.svd(lower.T @ ridge, full_matrices=False)
    left = torch.linalg.solve_triangular(lower.T, u[:, :rank], upper=True)  # R⁻¹ U_r
    right = s[:rank, None] * vh[:rank]  # Σ_r V_rᵀ
    if basis is not None:
        left = basis @ left
    return left, right


def _check_edit_arguments(features, gap, safe_features, gamma, lam, rank, utility_mode):
    if features.ndim != 2 or gap.ndim != 2 or safe_features.ndim != 2:
        raise ValueError("`features`, `gap` and `safe_features` must be 2-D matrices.")
    (n, d_in), m = features.shape, gap.shape[1]
    if gap.shape[0] != n:
        raise ValueError(f"`gap` has {gap.shape[0]} rows but `features` has {n}: rows must be the same prompts.")
    if safe_features.shape[1] != d_in:
        raise ValueError(f"`safe_features` has {safe_features.shape[1]} columns, `features` has {d_in}.")
    if not 1 <= rank <= min(m, d_in):
        raise ValueError(
            f"`rank` must be between 1 and min(number of edited neurons, input size) = min({m}, {d_in}); got {rank}."
        )
    if lam <= 0 or gamma < 0:
        raise ValueError(f"`lam` must be > 0 and `gamma` >= 0; got lam={lam}, gamma={gamma}.")
    if utility_mode not in ("soft", "hard_projection"):
        raise ValueError(f"`utility_mode` must be 'soft' or 'hard_projection', got {utility_mode!r}.")


def lora_factors(left, right, rows, out_features, dtype=torch.float32):
    """PEFT LoRA weights that reproduce the edit of the rows `rows` of an `nn.Linear` weight exactly.

    `nn.Linear` computes `x Wᵀ`, so the weight update is `ΔWᵀ = rightᵀ leftᵀ` on rows `S` and zero elsewhere, i.e.
    `lora_B @ lora_A` with `lora_A = leftᵀ` and `lora_B` = `rightᵀ` scattered into rows `S` of a zero matrix. Exact
    with `lora_alpha = r` (scaling 1) and no dropout.

    Args:
        left (`torch.Tensor` of shape `(d_in, r)`):
            Left factor from [`solve_sparse_edit`].
        right (`torch.Tensor` of shape `(r, m)`):
            Right factor from [`solve_sparse_edit`].
        rows (`torch.LongTensor` of shape `(m,)`):
            The edited output rows (safety neurons).
        out_features (`int`):
            Number of output rows of the module (`d_ff`).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            dtype of the returned weights.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `lora_A` of shape `(r, d_in)` and `lora_B` of shape `(out_features, r)`.
    """
    if right.shape[1] != len(rows):
        raise ValueError(f"`right` has {right.shape[1]} columns but {len(rows)} rows are edited.")
    lora_b = torch.zeros(out_features, right.shape[0], dtype=right.dtype)
    lora_b[rows] = right.T
    return left.T.to(dtype).contiguous(), lora_b.to(dtype)
