from dataclasses import asdict, dataclass, field

from ..languages import check_languages


MODULES = ("gate_proj", "up_proj")
TOKEN_POOLINGS = ("last_prompt_token", "mean")
EDIT_NEURONS = ("english", "target", "union")
TARGETS = ("parallel_english", "class_mean")
UTILITY_MODES = ("soft", "hard_projection")
SOLVER_DTYPES = ("float64", "float32")


@dataclass
class SparseEditConfig:
    r"""
    Configuration of [`SparseSafetyEditor`], the training-free safety edit of
    [Multilingual Safety Alignment Via Sparse Weight Editing](https://huggingface.co/papers/2602.22554).

    > Parameters that control the safety neurons

    Args:
        modules (`list[str]`, *optional*, defaults to `["gate_proj", "up_proj"]`):
            MLP projections whose output units are scored and edited, each with its own neuron set.
        token_pooling (`str`, *optional*, defaults to `"last_prompt_token"`):
            One vector per prompt: `"last_prompt_token"` (the generation position after the chat template) or
            `"mean"` over the prompt tokens.
        tau_mag (`float`, *optional*, defaults to `2.0`):
            Threshold on the z-score of the harmful − harmless mean difference.
        tau_stat (`float`, *optional*, defaults to `1.0`):
            Threshold on Cohen's d. A neuron passing either threshold is a safety neuron.

    > Parameters that control the edit

    Args:
        layers (`list[int]`, *optional*):
            Decoder layers to edit. `None` picks one: the layer with the most English safety neurons among the middle
            40–70% of depth.
        edit_neurons (`str`, *optional*, defaults to `"english"`):
            Neurons whose weight rows change: the English safety neurons (`"english"`), the target languages' ones
            (`"target"`) or both (`"union"`).
        target (`str`, *optional*, defaults to `"parallel_english"`):
            Target pre-activations: those of each row's English parallel query (`"parallel_english"`, needs rows paired
            by `parallel_id`) or the mean over the English harmful queries (`"class_mean"`).
        target_languages (`list[str]`, *optional*):
            Languages whose harmful rows are mapped onto English, in one joint edit. `None` takes every non-English
            language of the harmful set; a single language gives a per-language edit.
        gamma (`float`, *optional*, defaults to `1.0`):
            Weight γ of the utility penalty `‖X_safe ΔW‖²` (soft mode).
        lam (`float`, *optional*, defaults to `1.0`):
            Ridge weight λ of `‖ΔW‖²` (> 0).
        rank (`int`, *optional*, defaults to `32`):
            Rank bound r of each module's edit, also the rank of the exported LoRA adapter. Must not exceed the number
            of edited neurons of any edited module.
        utility_mode (`str`, *optional*, defaults to `"soft"`):
            `"soft"`: the paper's quadratic penalty. `"hard_projection"`: restrict the edit to the null space of the
            harmless anchors (AlphaEdit style), so they keep their pre-activations.
        null_space_threshold (`float`, *optional*, defaults to `1e-2`):
            Hard projection only: eigenvectors of `X_safeᵀX_safe` whose eigenvalue is at most this fraction of the mean
            eigenvalue span the null space the edit is confined to.
        solver_dtype (`str`, *optional*, defaults to `"float64"`):
            dtype of the solver: `"float64"` or `"float32"`.

    > Other parameters

    Args:
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per forward pass when collecting activations.
        alpha (`float`, *optional*, defaults to `2.0`):
            Scale of the English safety neurons' activations in [`~SparseSafetyEditor.amplification_probe`].
    """

    # Safety neurons
    modules: list[str] = field(
        default_factory=lambda: list(MODULES),
        metadata={"help": "MLP projections scored and edited (each with its own neuron set).", "choices": MODULES},
    )
    token_pooling: str = field(
        default="last_prompt_token",
        metadata={"help": "One vector per prompt: the last prompt token or the mean.", "choices": TOKEN_POOLINGS},
    )
    tau_mag: float = field(default=2.0, metadata={"help": "Threshold on the z-score of the harmful − harmless mean."})
    tau_stat: float = field(default=1.0, metadata={"help": "Threshold on Cohen's d."})

    # Edit
    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Layers to edit; None = the middle layer (40 to 70 percent of depth) with the most English neurons."
        },
    )
    edit_neurons: str = field(
        default="english",
        metadata={"help": "Which safety neurons' weight rows change.", "choices": EDIT_NEURONS},
    )
    target: str = field(
        default="parallel_english",
        metadata={"help": "Target pre-activations: English parallel query or English class mean.", "choices": TARGETS},
    )
    target_languages: list[str] | None = field(
        default=None,
        metadata={"help": "Languages mapped onto English in one joint edit; None = every non-English language."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Weight of the utility penalty ‖X_safe ΔW‖² (soft mode)."})
    lam: float = field(default=1.0, metadata={"help": "Ridge weight of ‖ΔW‖² (> 0)."})
    rank: int = field(default=32, metadata={"help": "Rank bound of each module's edit and of the LoRA adapter."})
    utility_mode: str = field(
        default="soft",
        metadata={"help": "Soft penalty (paper) or null-space projection of the anchors.", "choices": UTILITY_MODES},
    )
    null_space_threshold: float = field(
        default=1e-2,
        metadata={"help": "Hard projection: eigenvalue threshold (× the mean eigenvalue) of the anchors' null space."},
    )
    solver_dtype: str = field(
        default="float64", metadata={"help": "dtype of the closed-form solver.", "choices": SOLVER_DTYPES}
    )

    # Other
    batch_size: int = field(default=8, metadata={"help": "Prompts per forward pass when collecting activations."})
    alpha: float = field(
        default=2.0, metadata={"help": "Scale of the English safety neurons in the amplification probe."}
    )

    def __post_init__(self):
        if isinstance(self.modules, str):
            self.modules = [name.strip() for name in self.modules.split(",") if name.strip()]
        if (
            not self.modules
            or any(name not in MODULES for name in self.modules)
            or len(set(self.modules)) < len(self.modules)
        ):
            raise ValueError(f"`modules` must be a non-empty subset of {list(MODULES)}, got {self.modules}.")
        for name, value, choices in [
            ("token_pooling", self.token_pooling, TOKEN_POOLINGS),
            ("edit_neurons", self.edit_neurons, EDIT_NEURONS),
            ("target", self.target, TARGETS),
            ("utility_mode", self.utility_mode, UTILITY_MODES),
            ("solver_dtype", self.solver_dtype, SOLVER_DTYPES),
        ]:
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
        self._check_layers_and_languages()
        if self.lam <= 0:
            raise ValueError(f"`lam` must be > 0 (it keeps the solver's matrix positive definite), got {self.lam}.")
        if self.gamma < 0:
            raise ValueError(f"`gamma` must be >= 0, got {self.gamma}.")
        if self.rank < 1:
            raise ValueError(f"`rank` must be >= 1, got {self.rank}.")
        if self.null_space_threshold <= 0:
            raise ValueError(f"`null_space_threshold` must be > 0, got {self.null_space_threshold}.")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {self.batch_size}.")

    def _check_layers_and_languages(self):
        if self.layers is not None:
            self.layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
            if not self.layers or any(not isinstance(layer, int) or layer < 0 for layer in self.layers):
                raise ValueError(f"`layers` must be a non-empty list of layer indices >= 0, got {self.layers}.")
            if len(set(self.layers)) < len(self.layers):
                raise ValueError(f"`layers` repeats a layer: {self.layers}.")
        if self.target_languages is not None:
            self.target_languages = check_languages(self.target_languages, "target_languages")
            if "en" in self.target_languages:
                raise ValueError("`target_languages` must not contain 'en': English is the pivot the others map onto.")

    def to_dict(self):
        """The configuration as a JSON-serialisable dict."""
        return asdict(self)
