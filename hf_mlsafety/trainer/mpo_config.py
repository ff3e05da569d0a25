import warnings
from dataclasses import dataclass, field

from trl import DPOConfig

from ..losses.mpo import BETA_PLACEMENTS, RETAIN_POOLINGS


@dataclass
class MPOConfig(DPOConfig):
    r"""
    Configuration class for the [`MPOTrainer`] (Multilingual reward gaP Optimization,
    [paper](https://huggingface.co/papers/2505.16869)).

    Not to be confused with what TRL's documentation calls "MPO" (Mixed Preference Optimization, a combination of DPO
    loss types): this is a different method.

    Every [`~trl.DPOConfig`] parameter keeps its meaning, except the DPO loss parameters (`loss_type`,
    `loss_weights`, `ld_alpha`, `f_divergence_type`, `label_smoothing`, `use_weighting`), which MPO replaces and which
    must stay at their defaults. With `precompute_ref_log_probs=True` the reference's dominant-language reward gap and
    pooled hidden states are computed once before training instead of the reference log-probabilities.

    Parameters:
        > Parameters whose default values are overridden from DPOConfig

        beta (`float`, *optional*, defaults to `1.0`):
            Scale between the policy's target-language reward gap and the reference's dominant-language reward gap.
            The official configurations use `1.0` for Llama-3.1 and `1.5` for Gemma-2 and Qwen2.5. (DPOConfig's default
            is `0.1`, which means something else in DPO.)

        > Parameters that control the MPO loss

        mpo_beta_placement (`str`, *optional*, defaults to `"policy"`):
            Where β goes: `"policy"` regresses `β·RG_target` onto `RG_dominant` (official code); `"reference"`
            regresses `RG_target` onto `RG_dominant / β` (the alternative left commented out in the official code).
        mpo_gap_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the reward-gap regression term.
        mpo_retain_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the dominant-language hidden-state retention term (mean squared error).
        mpo_retain_pooling (`str`, *optional*, defaults to `"masked_mean"`):
            How the last-layer hidden states of a dominant-language sequence are pooled: `"masked_mean"` (mean over
            real tokens), `"last_token"` (the last real token, as the paper describes it) or `"unmasked_mean"` (mean
            over every position, padding included, as the official code does; the result depends on batch padding).
        mpo_retain_span (`str`, *optional*, defaults to `"prompt_and_response"`):
            Tokens the retention pooling covers: `"prompt_and_response"` (official code) or `"prompt"`.
        mpo_length_normalize (`bool`, *optional*, defaults to `True`):
            Average the response log-probabilities over their tokens. `False` sums them (ablation only).
    """

    # Parameters whose default values are overridden from DPOConfig
    beta: float = field(
        default=1.0,
        metadata={
            "help": "Scale between the policy's target-language reward gap and the reference's dominant-language "
            "reward gap. Official configurations: 1.0 for Llama-3.1, 1.5 for Gemma-2 and Qwen2.5 (DPOConfig's "
            "default, 0.1, does not apply to MPO)."
        },
    )

    # Parameters that control the MPO loss
    mpo_beta_placement: str = field(
        default="policy",
        metadata={
            "help": "'policy': regress β·RG_target onto RG_dominant (official code); 'reference': regress RG_target "
            "onto RG_dominant / β.",
            "choices": list(BETA_PLACEMENTS),
        },
    )
    mpo_gap_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the reward-gap regression term."},
    )
    mpo_retain_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the dominant-language hidden-state retention term."},
    )
    mpo_retain_pooling: str = field(
        default="masked_mean",
        metadata={
            "help": "Pooling of the dominant-language last-layer hidden states: 'masked_mean' (real tokens), "
            "'last_token' (paper) or 'unmasked_mean' (official code, padding included).",
            "choices": list(RETAIN_POOLINGS),
        },
    )
    mpo_retain_span: str = field(
        default="prompt_and_response",
        metadata={
            "help": "Tokens the retention pooling covers: 'prompt_and_response' (official code) or 'prompt'.",
            "choices": ["prompt_and_response", "prompt"],
        },
    )
    mpo_length_normalize: bool = field(
        default=True,
        metadata={"help": "Average response log-probabilities over their tokens (False sums them; ablation only)."},
    )

    def __post_init__(self):
        super().__post_init__()

        if self.mpo_beta_placement not in BETA_PLACEMENTS:
            raise ValueError(
                f"`mpo_beta_placement` must be one of {BETA_PLACEMENTS}, got {self.mpo_beta_placement!r}."
            )
        if self.mpo_retain_pooling not in RETAIN_POOLINGS:
            raise ValueError(
                f"`mpo_retain_pooling` must be one of {RETAIN_POOLINGS}, got {self.mpo_retain_pooling!r}."
            )
        if self.mpo_retain_span not in ("prompt_and_response", "prompt"):
            raise ValueError(
                f"`mpo_retain_span` must be 'prompt_and_response' or 'prompt', got {self.mpo_retain_span!r}."
            )
        if self.mpo_retain_span == "prompt" and self.mpo_retain_pooling == "unmasked_mean":
            raise ValueError(
                "`mpo_retain_span='prompt'` needs a masked pooling: 'unmasked_mean' pools every position whatever the "
                "span. Use `mpo_retain_pooling='masked_mean'` or 'last_token'."
            )
        if self.beta <= 0:
            raise ValueError(f"`beta` must be positive, got {self.beta}.")
        if self.mpo_gap_weight < 0 or self.mpo_retain_weight < 0:
            raise ValueError(
                f"`mpo_gap_weight` and `mpo_retain_weight` must be non-negative, got {self.mpo_gap_weight} and "
                f"{self.mpo_retain_weight}."
            )

        # MPO replaces the DPO objective; reject DPO loss options instead of ignoring them silently.
        dpo_only = {
            "loss_type": (self.loss_type, ["sigmoid"]),
            "loss_weights": (self.loss_weights, None),
            "ld_alpha": (self.ld_alpha, None),
            "f_divergence_type": (self.f_divergence_type, "reverse_kl"),
            "label_smoothing": (self.label_smoothing, 0.0),
            "use_weighting": (self.use_weighting, False),
        }
        changed = [name for name, (value, default) in dpo_only.items() if value != default]
        if changed:
            raise ValueError(
                f"{changed} configure the DPO loss, which MPO replaces; leave them at their defaults. The MPO loss is "
                "set with `beta` and the `mpo_*` parameters."
            )

        if self.precompute_ref_log_probs and self.mpo_retain_pooling == "unmasked_mean":
            warnings.warn(
                "`mpo_retain_pooling='unmasked_mean'` with `precompute_ref_log_probs=True`: the stored reference "
                "hidden states are averaged over the padding of the precompute batches, which differs from the "
                "training batches' padding, so the retention target is not the one the online reference would give. "
                "Prefer 'masked_mean' or 'last_token', or set `precompute_ref_log_probs=False`.",
                UserWarning,
                stacklevel=3,
            )
