"""Multilingual safety model cards, and the card + push behaviour shared by every hf-mlsafety trainer.

Cards are rendered from the package's own Jinja template (`templates/safety_model_card.md`) with huggingface_hub's
`ModelCard` / `ModelCardData`. They never contain a local absolute path or a token: `base_model` is written only when
it is a Hub id, and every free-text value goes through [`scrub`].
"""

import importlib.metadata
import os
import re
from importlib import resources

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from peft import PeftModel

from . import __version__
from .languages import LANGUAGE_NAMES
from .models import hub_source


TEMPLATE = resources.files("hf_mlsafety").joinpath("templates", "safety_model_card.md")
CHART_FILE = "safety_asr.png"
BASE_TAGS = ["hf-mlsafety", "multilingual", "safety", "trl"]

_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:/[^\s/'\"`|)]+){2,}/?")


def scrub(text):
    """`text` with Hub tokens replaced by `<token>` and absolute local paths by their last component."""
    text = _TOKEN.sub("<token>", str(text))
    return _ABSOLUTE_PATH.sub(lambda match: os.path.basename(match.group(0).rstrip("/")) or "<path>", text)


def hub_model_id_of(name_or_path):
    """The Hub id behind `name_or_path`, or `None` for a local folder without a recorded Hub source.

    A converted embedded model records its Hub id beside its weights ([`hf_mlsafety.models.hub_source`]).
    """
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        return hub_source(name_or_path).get("hub_id")
    if os.path.isabs(name_or_path) or name_or_path.startswith(".") or name_or_path.count("/") > 1:
        return None
    return name_or_path


def _versions():
    names = {"hf_mlsafety": None, "trl": "trl", "transformers": "transformers", "peft": "peft", "torch": "torch"}
    return {key: __version__ if dist is None else importlib.metadata.version(dist) for key, dist in names.items()}


# The evaluation set named in cards unless another is given: the package's held-out test prompts.
EVAL_DATASET_NAME = "hf-mlsafety built-in test prompts"
EVAL_DATASET_TYPE = "hf-mlsafety/builtin"


def generate_safety_model_card(
    *,
    model_name,
    method_name,
    paper,
    method_summary="",
    base_model_name_or_path=None,
    hub_model_id=None,
    languages=(),
    tags=(),
    datasets=None,
    license=None,
    is_adapter=True,
    training_config=None,
    report=None,
    baseline_report=None,
    eval_dataset_name=EVAL_DATASET_NAME,
    eval_dataset_type=EVAL_DATASET_TYPE,
    chart_file=None,
):
    """Renders a multilingual safety model card.

    Args:
        model_name (`str`):
            Name shown as the card's title.
        method_name (`str`):
            The alignment method (e.g. `"MLC (DPO + Multi-Lingual Consistency)"`).
        paper (`dict`):
            `{"title", "id", "citation"}`, as in the trainers' `_paper`.
        method_summary (`str`, *optional*):
            One paragraph on what the method does.
        base_model_name_or_path (`str`, *optional*):
            The base model; written to `base_model` only when it is a Hub id.
        hub_model_id (`str`, *optional*):
            Where the card is pushed (used in the loading snippet).
        languages (`list[str]`, *optional*):
            Languages trained or evaluated; the report's languages are added.
        tags (`list[str]`, *optional*):
            Extra tags; `hf-mlsafety`, `multilingual`, `safety` and `trl` are always present.
        datasets (`str` or `list[str]`, *optional*):
            Training datasets (Hub ids).
        license (`str`, *optional*):
            Licence; defaults to the base model's when it is recorded.
        is_adapter (`bool`, *optional*, defaults to `True`):
            Sets `library_name: peft` and the PEFT loading snippet.
        training_config (`dict`, *optional*):
            Hyperparameters to list (values are scrubbed of paths and tokens).
        report ([`~hf_mlsafety.evaluation.SafetyReport`], *optional*):
            Evaluation after alignment; adds the per-language table and `model-index` results.
        baseline_report ([`~hf_mlsafety.evaluation.SafetyReport`], *optional*):
            Evaluation before alignment; the table shows `before → after`.
        chart_file (`str`, *optional*):
            File name of the chart uploaded beside the card.

    Returns:
        [`~huggingface_hub.ModelCard`]
    """
    base_model = hub_model_id_of(base_model_name_or_path)
    license = license or (hub_source(base_model_name_or_path).get("license") if base_model_name_or_path else None)
    all_languages = list(dict.fromkeys([*languages, *(report.languages if report else [])]))
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft" if is_adapter else "transformers",
        language=all_languages or None,
        license=license,
        tags=list(dict.fromkeys([*BASE_TAGS, *tags])),
        datasets=datasets,
        model_name=scrub(model_name),
        eval_results=report.to_eval_results(eval_dataset_name, eval_dataset_type) if report else None,
    )
    training_table = None
    if training_config:
        rows = [f"| `{key}` | `{scrub(value)}` |" for key, value in training_config.items()]
        training_table = "\n".join(["| parameter | value |", "|---|---|", *rows])
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=scrub(model_name),
        base_model=base_model,
        hub_model_id=hub_model_id,
        method_name=method_name,
        method_summary=method_summary,
        paper_title=paper["title"],
        paper_id=paper["id"],
        citation=paper["citation"].strip(),
        is_adapter=is_adapter,
        language_list=", ".join(f"{LANGUAGE_NAMES.get(code, code)} ({code})" for code in all_languages) or "not recorded",
        report_table=report.to_markdown(baseline=baseline_report) if report else None,
        evaluation_note=(
            f"Attack success rate (ASR, share of harmful prompts answered unsafely; lower is better), refusal, invalid"
            f" and over-refusal rates in % on {eval_dataset_name}, judged by the {report.judge} judge"
            + (": base model → this model." if baseline_report else ".")
        )
        if report
        else None,
        judge_name=f"the {report.judge} judge" if report else "an automatic judge",
        chart_file=chart_file,
        training_table=training_table,
        versions=_versions(),
    )


_COMMON_TRAINING_FIELDS = [
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "seed",
    "beta",
    "loss_type",
]


class SafetyModelCardMixin:
    """`create_model_card` and `push_to_hub` for the hf-mlsafety trainers (listed before the TRL parent class).

    The card is the multilingual safety card of [`generate_safety_model_card`]; pass evaluation reports through
    `push_to_hub` (`trainer.push_to_hub(safety_report=after, baseline_report=before)`) or `create_model_card`. The chart
    is written beside the card in `output_dir`, so the push uploads adapter, tokenizer, extra state files, card and
    chart in one commit. A failed push raises an error that says the local outputs are intact and can be pushed again.
    """

    _method_summary = ""

    def _card_languages(self):
        """Languages of the training data: `prompt_<lang>` columns and `language` / `target_language` values."""
        dataset = self.train_dataset
        if dataset is None:
            return []
        codes = [name[len("prompt_") :] for name in dataset.column_names if name.startswith("prompt_")]
        for column in ("language", "target_language"):
            if column in dataset.column_names:
                codes += list(dict.fromkeys(dataset[column]))
        return [code for code in dict.fromkeys(codes) if code in LANGUAGE_NAMES]

    def _card_training_config(self):
        parent = type(self.args).__mro__[1]
        own = [name for name in self.args.__dataclass_fields__ if name not in parent.__dataclass_fields__]
        config = {name: getattr(self.args, name) for name in [*_COMMON_TRAINING_FIELDS, *own] if name in self.args.__dataclass_fields__}
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeftModel):
            lora = model.peft_config["default"]
            config.update({"peft": type(lora).__name__, "lora_r": lora.r, "lora_alpha": lora.lora_alpha,
                           "lora_target_modules": sorted(lora.target_modules) if lora.target_modules else None})
        return config

    def create_model_card(
        self, model_name=None, dataset_name=None, tags=None, safety_report=None, baseline_report=None, languages=None,
        license=None, eval_dataset_name=EVAL_DATASET_NAME, eval_dataset_type=EVAL_DATASET_TYPE, **kwargs,
    ):
        if not self.is_world_process_zero():
            return
        from .evaluation import plot_asr_comparison

        model = self.accelerator.unwrap_model(self.model)
        chart_file = None
        if safety_report is not None:
            reports = [baseline_report, safety_report] if baseline_report is not None else [safety_report]
            plot_asr_comparison(reports, os.path.join(self.args.output_dir, CHART_FILE),
                                names=["base", "aligned"] if baseline_report is not None else ["aligned"])
            chart_file = CHART_FILE
        card = generate_safety_model_card(
            model_name=model_name or (self.args.hub_model_id or os.path.basename(os.path.normpath(self.args.output_dir))).split("/")[-1],
            method_name=self._name,
            paper=self._paper,
            method_summary=self._method_summary,
            base_model_name_or_path=model.config._name_or_path,
            hub_model_id=self.args.hub_model_id,
            languages=languages or self._card_languages(),
            tags=[*self._tag_names, *(tags or [])],
            datasets=dataset_name,
            license=license,
            is_adapter=isinstance(model, PeftModel),
            training_config=self._card_training_config(),
            report=safety_report,
            baseline_report=baseline_report,
            eval_dataset_name=eval_dataset_name,
            eval_dataset_type=eval_dataset_type,
            chart_file=chart_file,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, private=None, **kwargs):
        try:
            return super().push_to_hub(
                commit_message=commit_message, blocking=blocking, token=token, revision=revision, private=private, **kwargs
            )
        except HfHubHTTPError as error:
            raise RuntimeError(
                f"Pushing to {self.args.hub_model_id or 'the Hub'} failed ({scrub(str(error).splitlines()[0])}). Nothing local was removed: "
                f"the model, card and chart are still in output_dir '{scrub(self.args.output_dir)}'; call push_to_hub() "
                "again to retry."
            ) from error
