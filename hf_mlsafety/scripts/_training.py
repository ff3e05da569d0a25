"""What the training subcommands share: the script arguments, dataset loading, before/after evaluation, saving."""

import os
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from ..data import load_builtin_dataset


@dataclass
class SafetyScriptArguments(ScriptArguments):
    """TRL's script arguments, with the built-in data as the default dataset and an optional safety evaluation."""

    dataset_name: str | None = field(
        default="builtin",
        metadata={"help": "'builtin' (the package's training split), a Hub dataset id, or a local dataset path."},
    )
    languages: str | None = field(
        default=None, metadata={"help": "Comma-separated languages of the built-in data (default: all ten)."}
    )
    evaluate: bool = field(
        default=False,
        metadata={"help": "Evaluate before and after training on the built-in test prompts; the card shows the table."},
    )
    eval_max_prompts_per_language: int = field(default=8, metadata={"help": "Harmful test prompts per language."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Response length during evaluation."})
    license: str | None = field(default=None, metadata={"help": "Licence for the model card when the base has none."})


def make_training_parser(config_class, prog=None):
    return TrlParser((SafetyScriptArguments, config_class, ModelConfig), prog=prog)


def load_train_dataset(script_args, task):
    """The training split: the built-in data in `task`'s format, or a Hub / local dataset."""
    if script_args.dataset_name == "builtin":
        languages = script_args.languages.split(",") if script_args.languages else None
        return load_builtin_dataset(task, split="train", languages=languages)
    return load_dataset_split(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)


# Builders of `datasets` for single data files, by extension.
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_dataset_split(name, config=None, split="train"):
    """One split of a Hub dataset, a local dataset folder, or a single .json / .jsonl / .csv / .parquet file."""
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in _FILE_BUILDERS:
            raise ValueError(f"--dataset_name {name!r}: a data file must be one of {sorted(_FILE_BUILDERS)}.")
        return load_dataset(_FILE_BUILDERS[extension], data_files=name, split="train")
    return load_dataset(name, name=config)[split]


def model_path(model_args):
    """The model to train: `--model_name_or_path`, or the embedded SmolLM2-135M-Instruct when none is given."""
    if model_args.model_name_or_path:
        return model_args.model_name_or_path
    from ..models import embedded_model_path

    return embedded_model_path()


def evaluate_trainer_model(trainer, script_args):
    """Per-language safety of the trainer's current model on the built-in held-out test prompts."""
    from ..evaluation import SafetyEvaluator
    from .eval import _limit

    probes = load_builtin_dataset("probes", split="test", languages=script_args.languages.split(",") if script_args.languages else None)
    limit = script_args.eval_max_prompts_per_language
    harmful = _limit(probes.filter(lambda row: row["label"] == "harmful"), limit)
    harmless = _limit(probes.filter(lambda row: row["label"] == "harmless"), max(1, limit // 2))
    model = trainer.accelerator.unwrap_model(trainer.model)
    evaluator = SafetyEvaluator(model, trainer.processing_class, max_new_tokens=script_args.eval_max_new_tokens)
    return evaluator.evaluate(harmful, harmless)


def run_training(trainer_class, task, script_args, training_args, model_args, **trainer_kwargs):
    """Builds `trainer_class` the way `trl <method>` does, trains, optionally evaluates, saves, writes the card, pushes."""
    model = model_path(model_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args, task),
        processing_class=AutoTokenizer.from_pretrained(model),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        **trainer_kwargs,
    )
    before = evaluate_trainer_model(trainer, script_args) if script_args.evaluate else None
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = evaluate_trainer_model(trainer, script_args) if script_args.evaluate else None
    trainer.save_model(training_args.output_dir)
    card_kwargs = dict(
        dataset_name=None if script_args.dataset_name == "builtin" else script_args.dataset_name,
        safety_report=after,
        baseline_report=before,
        license=script_args.license,
    )
    trainer.create_model_card(**card_kwargs)
    if after is not None:
        trainer.accelerator.print(after.to_markdown(baseline=before))
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    trainer.accelerator.print(f"Training complete; adapter / model, card and chart saved in {training_args.output_dir}")
    return trainer, before, after
