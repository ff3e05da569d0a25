"""Training-free Sparse Weight Editing (SWE) of the MLP safety neurons (https://huggingface.co/papers/2602.22554).

Finds the MLP neurons that separate harmful from harmless prompts, then solves in closed form a low-rank edit of their
weights that maps harmful prompts in the other languages onto their English versions while leaving harmless prompts
alone. No gradients, no optimizer: only forward passes. The edit is saved as an exact LoRA adapter.

    python examples/sparse_edit.py --model_name_or_path Qwen/Qwen2.5-7B-Instruct --output_dir Qwen2.5-7B-SWE --evaluate
    python examples/sparse_edit.py --smoke --output_dir swe-smoke   # tiny offline model on CPU
"""

import argparse

import torch
from datasets import load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from hf_mlsafety import SafetyEvaluator, SparseEditConfig, SparseSafetyEditor, load_builtin_dataset
from hf_mlsafety.testing import tiny_model_path


def first_items(probes, n):
    """The rows of the first `n` items (parallel ids), in every language."""
    ids = set(sorted(set(probes["parallel_id"]))[:n])
    return probes.filter(lambda row: row["parallel_id"] in ids)


def safety_report(model, tokenizer, prompts_per_language, max_new_tokens):
    """Per-language safety on a few harmful prompts of the built-in test split (not used for the edit)."""
    harmful = load_builtin_dataset("probes", split="test").filter(lambda row: row["label"] == "harmful")
    harmful = first_items(harmful, prompts_per_language)
    evaluator = SafetyEvaluator(model, tokenizer, max_new_tokens=max_new_tokens, show_progress=False)
    return evaluator.evaluate(harmful)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="Qwen/Qwen2.5-7B-Instruct")
    parser.add_argument("--dataset_name", help="Hub id or local path of probes (default: the built-in data)")
    parser.add_argument("--output_dir")
    parser.add_argument("--full_precision", action="store_true", help="bf16 weights instead of 4-bit (~16 GB for 7B)")
    parser.add_argument("--evaluate", action="store_true", help="safety report before and after the edit")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id")
    parser.add_argument("--smoke", action="store_true", help="tiny offline model, CPU, a few prompts (for tests)")
    args = parser.parse_args(argv)

    model_id = tiny_model_path() if args.smoke else args.model_name_or_path
    output_dir = args.output_dir or f"{args.model_name_or_path.split('/')[-1]}-SWE"

    # 4-bit NF4 weights by default: a 7B model in ~6 GB. The edit is exported as a LoRA adapter either way.
    quantization_config = None
    if not args.full_precision:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32 if args.smoke else torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_id,
        dtype=torch.float32 if args.smoke else torch.bfloat16,
        quantization_config=quantization_config,
        device_map="cpu" if args.smoke else "auto",
    )
    tokenizer = AutoTokenizer.from_pretrained(model_id)

    # Probes: prompt, language, parallel_id, label. Harmful rows parallel across languages (English included)
    if args.dataset_name:
        probes = load_dataset(args.dataset_name, split="train")
    else:
        probes = load_builtin_dataset("probes", split="train")
    harmful = probes.filter(lambda row: row["label"] == "harmful")
    harmless = probes.filter(lambda row: row["label"] == "harmless")
    if args.smoke:
        harmful, harmless = first_items(harmful, 6), first_items(harmless, 6)

    # The paper's neuron thresholds (z-score > 2 or Cohen's d > 1) and its soft utility penalty
    config = SparseEditConfig(
        tau_mag=2.0,
        tau_stat=1.0,
        layers=None,  # the middle layer (40-70% of depth) with the most English safety neurons
        rank=32,  # rank of the edit (and of the LoRA adapter)
        gamma=1.0,  # weight of the penalty on changing harmless prompts' activations
        lam=1.0,  # ridge term
        batch_size=8,
    )
    if args.smoke:
        config = SparseEditConfig(layers=[1], rank=2, batch_size=16)
    editor = SparseSafetyEditor(model, tokenizer, config)  # before any generation: keeps 4-bit weights readable on CPU

    eval_kwargs = dict(prompts_per_language=1 if args.smoke else 8, max_new_tokens=4 if args.smoke else 128)
    before = safety_report(model, tokenizer, **eval_kwargs) if args.evaluate else None
    editor.fit(harmful, harmless)
    editor.save_pretrained(output_dir)  # adapter_config.json, adapter_model.safetensors, sparse_edit.json
    tokenizer.save_pretrained(output_dir)
    if args.evaluate:
        edited = PeftModel.from_pretrained(model, output_dir)
        after = safety_report(edited, tokenizer, **eval_kwargs)
        print(after.to_markdown(baseline=before))

    if args.push_to_hub:
        editor.push_to_hub(args.hub_model_id or output_dir.rstrip("/").split("/")[-1])
    return editor


if __name__ == "__main__":
    main()
