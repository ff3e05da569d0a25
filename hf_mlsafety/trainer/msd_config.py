import string
from dataclasses import dataclass, field

from trl import DistillationConfig

from ..languages import LANGUAGE_NAMES


# The paper's teacher instruction is not public. This wording follows its description (judge safety in English, answer
# in the target language) and asks for an explicit marker before the answer so that off-policy training can drop the
# English reasoning.
DEFAULT_TEACHER_PROMPT_TEMPLATE = (
    "{query}\n\n"
    "English version of the request above:\n{query_en}\n\n"
    'Think step by step in English about whether fulfilling the request could cause harm. Then write "Answer:" '
    "followed by your final answer to the ORIGINAL request in {language_name}. If the request is harmful, refuse in "
    "{language_name} and briefly explain why."
)
TEMPLATE_PLACEHOLDERS = ("query", "query_en", "language_name")


@dataclass
class MSDConfig(DistillationConfig):
    r"""
    Configuration class for the [`MSDTrainer`].

    Extends [`~trl.DistillationConfig`] with the parameters of Multilingual Self-Distillation, introduced in
    [Multilingual Safety Alignment via Self-Distillation](https://huggingface.co/papers/2605.02971). Only the
    parameters specific to MSD are listed here; see [`~trl.DistillationConfig`] for the others (generation, vLLM,
    logging).

    Parameters:
        > Parameters that control the MSD variant

        msd_mode (`str`, *optional*, defaults to `"on_policy"`):
            Who samples the response: `"on_policy"` (the student, from the target-language query) or `"off_policy"`
            (the frozen teacher, from its privileged prompt). The issue and the paper call it the mode; named
            `msd_mode` so that it cannot be confused with the trainer's train/eval mode.
        teacher_prompt_template (`str`, *optional*):
            Text of the teacher's user turn, with the placeholders `{query}` (the target-language query, required),
            `{query_en}` (its English version) and `{language_name}` (the display name of the target language). The
            default asks the teacher to reason about safety in English, then to write `"Answer:"` and answer in the
            target language. For conversational prompts it replaces the content of the last user message; earlier
            messages (e.g. a system prompt) are kept.
        language_names (`dict[str, str]`, *optional*):
            Overrides of the language display names used for `{language_name}` (code → name), on top of
            `hf_mlsafety.languages.LANGUAGE_NAMES`, e.g. `{"zh": "Simplified Chinese"}`.
        strip_teacher_reasoning (`bool`, *optional*, defaults to `True`):
            Off-policy only: train only on the tokens after `answer_marker` in the teacher's completion. The reasoning
            before it stays in the teacher's context and never reaches the student. A completion without the marker is
            kept whole and counted in the `msd/answer_marker_missing` metric (a warning is also logged).
        answer_marker (`str`, *optional*, defaults to `"Answer:"`):
            Text that starts the final answer in the teacher's completion (see `strip_teacher_reasoning`).

        > Parameters that control the loss

        divergence (`str`, *optional*, defaults to `"full_reverse_kl"`):
            Per-token divergence: `"full_reverse_kl"` (KL(student ‖ teacher) over the whole vocabulary, as in the
            paper) or `"topk_reverse_kl"` (over the student's `distillation_topk` most probable tokens, renormalised; a
            cheaper approximation).
        distillation_topk (`int`, *optional*, defaults to `100`):
            Support size for `divergence="topk_reverse_kl"`.
        use_dpsw (`bool`, *optional*, defaults to `True`):
            Weight each response token with Dual-Perspective Safety Weighting (teacher confidence × student
            disagreement risk, normalised to mean 1 per sequence). `False` gives the "MSD without DPSW" ablation.
        dpsw_topk (`int`, *optional*, defaults to `20`):
            K of the teacher's top-K entropy in the DPSW teacher weight (not given by the paper).
        dpsw_y_star (`str`, *optional*, defaults to `"teacher_argmax"`):
            The "teacher-selected token" y* of the DPSW student weight `1 − p_S(y*)`: the teacher's top-1 token
            (`"teacher_argmax"`), or the teacher-sampled response token (`"sampled"`, off-policy only).
        loss_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature applied to both the student and teacher logits in the loss. Separate from `temperature`, which
            only controls sampling here (TRL's `DistillationTrainer` uses `temperature` for both).
        beta (`float`, *optional*, defaults to `1.0`):
            Inherited from [`~trl.DistillationConfig`]. MSD minimises the reverse KL, which is `beta=1.0`; any other
            value is rejected (choose the divergence with `divergence`).

    > [!NOTE]
    > These parameters have default values different from [`~transformers.TrainingArguments`]:
    > - `logging_steps`: Defaults to `10` instead of `500`.
    > - `gradient_checkpointing`: Defaults to `True` instead of `False`.
    > - `bf16`: Defaults to `True` if `fp16` is not set, instead of `False`.
    > - `learning_rate`: Defaults to `1e-6` instead of `5e-5`.
    """

    _VALID_DICT_FIELDS = DistillationConfig._VALID_DICT_FIELDS + ["language_names"]

    # Parameters that control the MSD variant
    msd_mode: str = field(
        default="on_policy",
        metadata={
            "help": "Who samples the response: 'on_policy' (the student) or 'off_policy' (the frozen teacher).",
            "choices": ["on_policy", "off_policy"],
        },
    )
    teacher_prompt_template: str = field(
        default=DEFAULT_TEACHER_PROMPT_TEMPLATE,
        metadata={
            "help": "Text of the teacher's user turn, with the placeholders {query} (target-language query, "
            "required), {query_en} (English version) and {language_name} (target language name)."
        },
    )
    language_names: dict[str, str] | str | None = field(
        default=None,
        metadata={"help": "Overrides of the language display names used for {language_name} (code -> name)."},
    )
    strip_teacher_reasoning: bool = field(
        default=True,
        metadata={
            "help": "Off-policy only: train only on the tokens after `answer_marker` in the teacher's completion. "
            "Completions without the marker are kept whole and counted in `msd/answer_marker_missing`."
        },
    )
    answer_marker: str = field(
        default="Answer:",
        metadata={"help": "Text that starts the final answer in the teacher's completion."},
    )

    # Parameters that control the loss
    divergence: str = field(
        default="full_reverse_kl",
        metadata={
            "help": "Per-token divergence: 'full_reverse_kl' (whole vocabulary) or 'topk_reverse_kl' (student's "
            "top `distillation_topk` tokens, renormalised).",
            "choices": ["full_reverse_kl", "topk_reverse_kl"],
        },
    )
    distillation_topk: int = field(
        default=100,
        metadata={"help": "Support size for divergence='topk_reverse_kl'."},
    )
    use_dpsw: bool = field(
        default=True,
        metadata={"help": "Weight the response tokens with Dual-Perspective Safety Weighting (DPSW)."},
    )
    dpsw_topk: int = field(
        default=20,
        metadata={"help": "K of the teacher's top-K entropy in the DPSW teacher weight."},
    )
    dpsw_y_star: str = field(
        default="teacher_argmax",
        metadata={
            "help": "y* of the DPSW student weight 1 - p_S(y*): the teacher's top-1 token ('teacher_argmax') or the "
            "teacher-sampled token ('sampled', off-policy only).",
            "choices": ["teacher_argmax", "sampled"],
        },
    )
    loss_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature applied to the student and teacher logits in the loss (sampling uses `temperature`)."
        },
    )

    def __post_init__(self):  # noqa: C901 (one flat list of checks)
        super().__post_init__()

        if self.msd_mode not in ("on_policy", "off_policy"):
            raise ValueError(f"`msd_mode` must be 'on_policy' or 'off_policy', got {self.msd_mode!r}.")
        if self.divergence not in ("full_reverse_kl", "topk_reverse_kl"):
            raise ValueError(f"`divergence` must be 'full_reverse_kl' or 'topk_reverse_kl', got {self.divergence!r}.")
        if self.dpsw_y_star not in ("teacher_argmax", "sampled"):
            raise ValueError(f"`dpsw_y_star` must be 'teacher_argmax' or 'sampled', got {self.dpsw_y_star!r}.")
        if self.dpsw_y_star == "sampled" and self.msd_mode == "on_policy":
            raise ValueError(
                "`dpsw_y_star='sampled'` needs `msd_mode='off_policy'`: on-policy, the sampled token is the "
                "student's, not a teacher-selected one. Use `dpsw_y_star='teacher_argmax'`."
            )
        if self.beta != 1.0:
            raise ValueError(
                f"MSD minimises the reverse KL (`beta=1.0`), got `beta={self.beta}`. Leave `beta` at 1.0 and choose "
                "the divergence with `divergence`."
            )
        if self.dpsw_topk < 2:
            raise ValueError(
                f"`dpsw_topk` must be at least 2 (the entropy is divided by log K), got {self.dpsw_topk}."
            )
        if self.distillation_topk < 1:
            raise ValueError(f"`distillation_topk` must be at least 1, got {self.distillation_topk}.")
        if self.loss_temperature <= 0:
            raise ValueError(f"`loss_temperature` must be positive, got {self.loss_temperature}.")

        placeholders = {
            name for _, name, _, _ in string.Formatter().parse(self.teacher_prompt_template) if name is not None
        }
        unknown = sorted(placeholders - set(TEMPLATE_PLACEHOLDERS))
        if unknown:
            raise ValueError(
                f"`teacher_prompt_template` has unknown placeholder(s) {unknown}; the known ones are "
                f"{list(TEMPLATE_PLACEHOLDERS)}. Write literal braces as '{{{{' and '}}}}'."
            )
        if "query" not in placeholders:
            raise ValueError("`teacher_prompt_template` must contain the `{query}` placeholder (the target query).")

        self.language_names = dict(self.language_names or {})
        unknown_codes = sorted(code for code in self.language_names if code not in LANGUAGE_NAMES)
        if unknown_codes:
            raise ValueError(
                f"`language_names` has unknown language code(s) {unknown_codes}. Known codes: "
                f"{', '.join(sorted(LANGUAGE_NAMES))}."
            )

        if self.msd_mode == "off_policy":
            if self.use_vllm:
                raise ValueError(
                    "`use_vllm=True` is not supported with `msd_mode='off_policy'`: the teacher samples with the "
                    "initial weights, which the vLLM engine (synchronised with the student) does not hold. Use "
                    "`msd_mode='on_policy'` or `use_vllm=False`."
                )
            if self.strip_teacher_reasoning:
                if not self.answer_marker:
                    raise ValueError("`answer_marker` must be a non-empty string when `strip_teacher_reasoning=True`.")
                if self.answer_marker not in self.teacher_prompt_template:
                    raise ValueError(
                        f"`strip_teacher_reasoning=True` but `teacher_prompt_template` never mentions the "
                        f"`answer_marker` {self.answer_marker!r}, so the teacher would not write it. Ask for it in "
                        "the template, change `answer_marker`, or set `strip_teacher_reasoning=False`."
                    )
