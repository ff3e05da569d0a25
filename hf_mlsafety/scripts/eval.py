"""`hf-mlsafety eval`: per-language safety evaluation of a model (optionally with an adapter) from the command line.

    hf-mlsafety eval --model_name_or_path ./my-model --adapter ./my-adapter --dataset builtin --languages en,sw,bn
    hf-mlsafety eval --model_name_or_path ./my-model --dataset ../eval-data/MultiJail.csv --judge guard:./guard-model
"""

import os
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import BitsAndBytesConfig
from trl import TrlParser

from ..data import load_builtin_dataset, load_multijail, wide_to_probes
from ..evaluation import GuardModelJudge, RefusalJudge, SafetyEvaluator, load_model_and_tokenizer, plot_asr_comparison
from ..languages import MULTIJAIL_LANGUAGES, check_languages


@dataclass
class EvalScriptArguments:
    """Arguments of `hf-mlsafety eval`."""

    model_name_or_path: str = field(
        metadata={"help": "Model to evaluate: a local folder or a Hub id.", "aliases": ["--model"]}
    )
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter (folder or Hub id) to load on the model."})
    compare_base: bool = field(
        default=True,
        metadata={"help": "With --adapter, also evaluate the base model (adapter off) and report before → after."},
    )
    dataset: str = field(
        default="builtin",
        metadata={
            "help": "'builtin' (the package's held-out test prompts), 'multijail' (Hub id DAMO-NLP-SG/MultiJail), or a "
            "path: a MultiJail-style CSV (one column per language) or a CSV/JSON/JSONL file with 'prompt' and "
            "'language' columns."
        },
    )
    languages: str = field(
        default=",".join(MULTIJAIL_LANGUAGES), metadata={"help": "Comma-separated language codes to evaluate."}
    )
    split: str = field(default="test", metadata={"help": "Split of the built-in data."})
    harmless: bool = field(
        default=True, metadata={"help": "Also measure over-refusal on the built-in harmless prompts of the split."}
    )
    max_prompts_per_language: int | None = field(
        default=None, metadata={"help": "Keep only the first N prompts of each language (quick checks)."}
    )
    judge: str = field(
        default="refusal", metadata={"help": "'refusal' (marker judge) or 'guard:PATH' (a local guard model)."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Maximum response length."})
    batch_size: int = field(default=16, metadata={"help": "Prompts generated together."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the model in 4-bit NF4 (bitsandbytes)."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where the JSON report and the PNG chart go."})


def _limit(dataset, limit):
    if limit is None:
        return dataset
    seen = {}
    keep = []
    for index, language in enumerate(dataset["language"]):
        seen[language] = seen.get(language, 0) + 1
        if seen[language] <= limit:
            keep.append(index)
    return dataset.select(keep)


def load_eval_prompts(dataset, languages, split="test"):
    """Harmful probes (and built-in harmless ones, or None) for `dataset` = 'builtin', 'multijail' or a file path."""
    if dataset == "builtin":
        probes = load_builtin_dataset("probes", split=split, languages=languages)
        return probes.filter(lambda r: r["label"] == "harmful"), probes.filter(lambda r: r["label"] == "harmless")
    if dataset == "multijail":
        return load_multijail(languages=languages, output_format="probes"), None
    if not os.path.isfile(dataset):
        raise ValueError(f"--dataset {dataset!r} is neither 'builtin', 'multijail' nor an existing file.")
    extension = os.path.splitext(dataset)[1].lstrip(".").replace("jsonl", "json")
    if extension not in ("csv", "json"):
        raise ValueError(f"--dataset {dataset!r}: expected a .csv, .json or .jsonl file.")
    table = load_dataset(extension, data_files=dataset, split="train", encoding="utf-8-sig")
    if "prompt" in table.column_names and "language" in table.column_names:
        table = table.filter(lambda r: r["language"] in languages)
        if "label" not in table.column_names:
            table = table.add_column("label", ["harmful"] * len(table))
        if "parallel_id" not in table.column_names:
            table = table.add_column("parallel_id", [str(i) for i in range(len(table))])
        return table.filter(lambda r: r["label"] == "harmful"), None
    if "tags" in table.column_names:  # the MultiJail CSV layout
        return load_multijail(dataset, languages=languages, output_format="probes"), None
    return wide_to_probes(table, languages, label="harmful"), None


def make_parser(prog=None):
    return TrlParser(EvalScriptArguments, prog=prog)


def main(script_args):
    languages = check_languages(script_args.languages, "--languages")
    if script_args.judge == "refusal":
        judge = RefusalJudge()
    elif script_args.judge.startswith("guard:"):
        judge = GuardModelJudge(script_args.judge.removeprefix("guard:"))
    else:
        raise ValueError(f"--judge must be 'refusal' or 'guard:PATH', got {script_args.judge!r}.")
    harmful, harmless = load_eval_prompts(script_args.dataset, languages, script_args.split)
    harmful = _limit(harmful, script_args.max_prompts_per_language)
    harmless = _limit(harmless, script_args.max_prompts_per_language) if script_args.harmless and harmless else None
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if script_args.load_in_4bit else None
    model, tokenizer = load_model_and_tokenizer(
        script_args.model_name_or_path, adapter=script_args.adapter, quantization_config=quantization
    )
    settings = dict(judge=judge, max_new_tokens=script_args.max_new_tokens, batch_size=script_args.batch_size)
    reports, names = [], []
    if script_args.adapter and script_args.compare_base:
        reports.append(SafetyEvaluator(model, tokenizer, disable_adapter=True, **settings).evaluate(harmful, harmless))
        names.append("base")
    reports.append(SafetyEvaluator(model, tokenizer, **settings).evaluate(harmful, harmless))
    names.append("with adapter" if script_args.adapter else "model")
    os.makedirs(script_args.output_dir, exist_ok=True)
    for report, name in zip(reports, names):
        report.to_json(os.path.join(script_args.output_dir, f"safety_report_{name.replace(' ', '_')}.json"))
    plot_asr_comparison(reports, os.path.join(script_args.output_dir, "safety_asr.png"), names=names)
    print(reports[-1].to_markdown(baseline=reports[0] if len(reports) == 2 else None))
    print(f"\nReports and chart written to {script_args.output_dir}")
    return reports


if __name__ == "__main__":
    parser = make_parser()
    (script_args,) = parser.parse_args_and_config()
    main(script_args)
