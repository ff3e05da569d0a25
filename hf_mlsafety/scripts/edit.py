"""`hf-mlsafety edit`: training-free sparse weight editing of the MLP safety neurons, saved as a LoRA adapter.

    hf-mlsafety edit --model_name_or_path Qwen/Qwen2.5-7B-Instruct --load_in_4bit --output_dir qwen-swe --evaluate
    hf-mlsafety edit --config examples/configs/edit.yaml
"""

import os
from dataclasses import dataclass, field

import torch
from huggingface_hub import HfApi
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import TrlParser

from ..data import load_builtin_dataset
from ..editing.sparse_edit_config import SparseEditConfig
from ..editing.sparse_editor import SparseSafetyEditor
from ..evaluation import SafetyEvaluator
from ._training import load_dataset_split
from .eval import _limit


@dataclass
class EditScriptArguments:
    """Arguments of `hf-mlsafety edit` besides the [`SparseEditConfig`] fields."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model to edit (Hub id or folder); defaults to the embedded SmolLM2-135M."}
    )
    dataset_name: str = field(
        default="builtin",
        metadata={
            "help": "'builtin' (the package's training probes), a Hub dataset id or a local path, with columns prompt, "
            "language, parallel_id and label ('harmful' / 'harmless')."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of the dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the dataset to fit the edit on."})
    languages: str | None = field(
        default=None, metadata={"help": "Comma-separated languages of the built-in data (default: all ten)."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the model in 4-bit NF4 (bitsandbytes)."})
    output_dir: str = field(default="sparse-safety-edit", metadata={"help": "Where the adapter and the card go."})
    evaluate: bool = field(
        default=False,
        metadata={"help": "Evaluate before and after the edit on the built-in test prompts; the card shows the table."},
    )
    eval_max_prompts_per_language: int = field(default=8, metadata={"help": "Harmful test prompts per language."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Response length during evaluation."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the adapter, tokenizer and card to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository to push to (default: output_dir)."})
    license: str | None = field(default=None, metadata={"help": "Licence for the model card when the base has none."})


def make_parser(prog=None):
    return TrlParser((EditScriptArguments, SparseEditConfig), prog=prog)


def _safety_report(model, tokenizer, script_args):
    languages = script_args.languages.split(",") if script_args.languages else None
    probes = load_builtin_dataset("probes", split="test", languages=languages)
    limit = script_args.eval_max_prompts_per_language
    harmful = _limit(probes.filter(lambda row: row["label"] == "harmful"), limit)
    harmless = _limit(probes.filter(lambda row: row["label"] == "harmless"), max(1, limit // 2))
    evaluator = SafetyEvaluator(model, tokenizer, max_new_tokens=script_args.eval_max_new_tokens)
    return evaluator.evaluate(harmful, harmless)


def main(script_args, edit_config):
    model_id = script_args.model_name_or_path
    if model_id is None:
        from ..models import embedded_model_path

        model_id = embedded_model_path()
    quantization_config = None
    if script_args.load_in_4bit:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_id, quantization_config=quantization_config, device_map="auto" if torch.cuda.is_available() else "cpu"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    # Built before any generation: on CPU an eval-mode forward repacks 4-bit weights into a layout the editor can't read
    editor = SparseSafetyEditor(model, tokenizer, edit_config)

    if script_args.dataset_name == "builtin":
        languages = script_args.languages.split(",") if script_args.languages else None
        probes = load_builtin_dataset("probes", split="train", languages=languages)
    else:
        probes = load_dataset_split(
            script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split
        )
    for column in ("prompt", "language", "parallel_id", "label"):
        if column not in probes.column_names:
            raise ValueError(
                f"--dataset_name {script_args.dataset_name!r} has no '{column}' column; the edit needs prompt, "
                f"language, parallel_id and label columns (got {probes.column_names})."
            )
    harmful = probes.filter(lambda row: row["label"] == "harmful")
    harmless = probes.filter(lambda row: row["label"] == "harmless")

    before = _safety_report(model, tokenizer, script_args) if script_args.evaluate else None
    editor.fit(harmful, harmless)
    editor.save_pretrained(script_args.output_dir)
    tokenizer.save_pretrained(script_args.output_dir)
    after = None
    if script_args.evaluate:
        after = _safety_report(PeftModel.from_pretrained(model, script_args.output_dir), tokenizer, script_args)
        print(after.to_markdown(baseline=before))
    editor.create_model_card(
        script_args.output_dir, hub_model_id=script_args.hub_model_id, safety_report=after, baseline_report=before,
        license=script_args.license,
    )
    if script_args.push_to_hub:
        repo_id = script_args.hub_model_id or os.path.basename(os.path.abspath(script_args.output_dir))
        repo_id = HfApi().create_repo(repo_id, exist_ok=True).repo_id
        HfApi().upload_folder(repo_id=repo_id, folder_path=script_args.output_dir, commit_message="Upload sparse safety edit")
    print(f"Edit saved as a LoRA adapter, with its card, in {script_args.output_dir}")
    return editor, before, after


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
