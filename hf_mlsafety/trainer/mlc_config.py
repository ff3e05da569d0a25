from dataclasses import dataclass, field

from trl import DPOConfig

from ..languages import LANGUAGE_NAMES, check_languages


@dataclass
class MLCConfig(DPOConfig):
    r"""
    Configuration class for the [`MLCTrainer`]: [`~trl.DPOConfig`] plus the options of the Multi-Lingual Consistency
    loss of [Align Once, Benefit Multilingually](https://huggingface.co/papers/2602.16660).

    Every [`~trl.DPOConfig`] parameter (`loss_type`, `beta`, `max_length`, ...) keeps its meaning; see its
    documentation. Only the MLC parameters are listed here.

    Parameters:
        > Parameters that control the prompt variants

        mlc_languages (`list[str]`, *optional*):
            Languages of the `prompt_<lang>` columns, in a fixed order. Every dataset must have exactly these columns.
            If `None`, they are read from the training dataset's columns.
        mlc_source_language (`str`, *optional*, defaults to `"en"`):
            Language of the `prompt` column, the one the DPO loss trains on.
        mlc_include_source_language (`bool`, *optional*, defaults to `True`):
            Whether the source language is a row of the matrix (as in the official code). Its row reads
            `prompt_<source>` when the dataset has that column, else `prompt`.
        mlc_missing_language_policy (`str`, *optional*, defaults to `"error"`):
            What to do with rows whose prompt variant is missing or empty: `"error"` raises (naming the row and the
            column), `"drop"` drops them with a warning.

        > Parameters that control the MLC loss

        mlc_layer (`int`, *optional*):
            Index into the model's `hidden_states` (0 = embeddings, L = final layer after the final norm). `None` means
            L, as in the released configs; negative values count from the end (-1 = L). The official code default is
            12.
        mlc_lambda (`float`, *optional*, defaults to `0.8`):
            Weight λ of the MLC term added to the DPO loss. With `0.0` the loss is the DPO loss and the MLC metrics are
            still logged.
        mlc_tau (`float`, *optional*, defaults to `0.2`):
            Temperature τ of the softmax over the singular values.
        mlc_every (`int`, *optional*, defaults to `1`):
            Add the MLC term on optimizer steps whose index is a multiple of this value. `2` reproduces the official
            schedule (`aux_every=2`, an effective weight of about λ/2).
        mlc_detach_sigma1 (`bool`, *optional*, defaults to `True`):
            Divide the singular values by the detached largest one, as the official code does. `False` uses the raw
            singular values, as the paper writes the loss.

        > Parameters that control the extractor

        mlc_extractor_dim (`int`, *optional*, defaults to `512`):
            Output size of the trainable linear extractor applied to the hidden states. `None` or `0` means no
            extractor (identity).
        mlc_extractor_init (`str`, *optional*, defaults to `"default"`):
            Initialisation of the extractor: `"default"` (PyTorch's `nn.Linear`, as the official DPO trainer) or
            `"xavier"` (Xavier-uniform weights and zero bias, as the official SFT trainer).
        mlc_extractor_learning_rate (`float`, *optional*):
            Learning rate of the extractor's parameter group. If `None`, `learning_rate` is used (as in the official
            full fine-tune).
    """

    # Parameters that control the prompt variants
    mlc_languages: list[str] | None = field(
        default=None,
        metadata={
            "help": "Languages of the `prompt_<lang>` columns, in a fixed order. Every dataset must have exactly "
            "these columns. If `None`, they are read from the training dataset's columns."
        },
    )
    mlc_source_language: str = field(
        default="en",
        metadata={"help": "Language of the `prompt` column, the one the DPO loss trains on."},
    )
    mlc_include_source_language: bool = field(
        default=True,
        metadata={
            "help": "Whether the source language is a row of the matrix (as in the official code). Its row reads "
            "`prompt_<source>` when the dataset has that column, else `prompt`."
        },
    )
    mlc_missing_language_policy: str = field(
        default="error",
        metadata={
            "help": "What to do with rows whose prompt variant is missing or empty: `error` raises (naming the row "
            "and the column), `drop` drops them with a warning.",
            "choices": ["error", "drop"],
        },
    )

    # Parameters that control the MLC loss
    mlc_layer: int | None = field(
        default=None,
        metadata={
            "help": "Index into the model's `hidden_states` (0 = embeddings, L = final layer after the final norm). "
            "`None` means L, as in the released configs; negative values count from the end (-1 = L)."
        },
    )
    mlc_lambda: float = field(
        default=0.8,
        metadata={"help": "Weight λ of the MLC term added to the DPO loss."},
    )
    mlc_tau: float = field(
        default=0.2,
        metadata={"help": "Temperature τ of the softmax over the singular values."},
    )
    mlc_every: int = field(
        default=1,
        metadata={
            "help": "Add the MLC term on optimizer steps whose index is a multiple of this value. `2` reproduces the "
            "official schedule (an effective weight of about λ/2)."
        },
    )
    mlc_detach_sigma1: bool = field(
        default=True,
        metadata={
            "help": "Divide the singular values by the detached largest one (official code). `False` uses the raw "
            "singular values (the paper's formula)."
        },
    )

    # Parameters that control the extractor
    mlc_extractor_dim: int | None = field(
        default=512,
        metadata={
            "help": "Output size of the trainable linear extractor. `None` or `0` means no extractor (identity)."
        },
    )
    mlc_extractor_init: str = field(
        default="default",
        metadata={
            "help": "Initialisation of the extractor: `default` (PyTorch's `nn.Linear`, official DPO trainer) or "
            "`xavier` (Xavier-uniform weights, zero bias, official SFT trainer).",
            "choices": ["default", "xavier"],
        },
    )
    mlc_extractor_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the extractor. If `None`, `learning_rate` is used."},
    )

    def __post_init__(self):
        self._validate_mlc_options()
        super().__post_init__()

    def _validate_mlc_options(self):
        if self.mlc_languages is not None:
            self.mlc_languages = check_languages(self.mlc_languages, "mlc_languages")
        if self.mlc_source_language not in LANGUAGE_NAMES:
            raise ValueError(f"Unknown language code {self.mlc_source_language!r} in `mlc_source_language`.")
        if self.mlc_missing_language_policy not in ("error", "drop"):
            raise ValueError(
                f"`mlc_missing_language_policy` must be 'error' or 'drop', got {self.mlc_missing_language_policy!r}."
            )
        if self.mlc_lambda < 0:
            raise ValueError(f"`mlc_lambda` must be >= 0, got {self.mlc_lambda}.")
        if self.mlc_tau <= 0:
            raise ValueError(f"`mlc_tau` must be > 0, got {self.mlc_tau}.")
        if self.mlc_every < 1:
            raise ValueError(f"`mlc_every` must be >= 1, got {self.mlc_every}.")
        if self.mlc_extractor_dim is not None and self.mlc_extractor_dim < 0:
            raise ValueError(f"`mlc_extractor_dim` must be >= 0 or None, got {self.mlc_extractor_dim}.")
        if self.mlc_extractor_init not in ("default", "xavier"):
            raise ValueError(f"`mlc_extractor_init` must be 'default' or 'xavier', got {self.mlc_extractor_init!r}.")
        if self.mlc_extractor_learning_rate is not None and self.mlc_extractor_learning_rate <= 0:
            raise ValueError(f"`mlc_extractor_learning_rate` must be > 0, got {self.mlc_extractor_learning_rate}.")
