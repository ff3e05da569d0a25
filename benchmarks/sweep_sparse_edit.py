"""Choosing `SparseEditConfig`'s defaults on the built-in dev split (never on MultiJail).

    python benchmarks/sweep_sparse_edit.py                  # embedded SmolLM2-135M-Instruct, CPU
    python benchmarks/sweep_sparse_edit.py --model PATH             # e.g. a merged English-DPO model
    python benchmarks/sweep_sparse_edit.py --model tiny --prompts_per_language 4 --harmless_per_language 2

Finds the safety neurons once on `--train_items_per_language` items of the built-in training split, then for each
setting below (one knob at a time away from the defaults) fits the edit on the same items, applies it, evaluates the
edited model on the dev split (harmful prompts in the ten languages for the attack success rate, harmless ones for
over-refusal; greedy, refusal judge) and reverts it. Prints one table row per setting, and the setting with the lowest
mean non-English ASR among those whose English ASR is no higher than the base model's and whose over-refusal is at
most 10 points higher.
"""

import argparse
import dataclasses
import math
import os
import time

import torch
from bench_sparse_editor import first_items, resolve_model  # the script's folder is on sys.path
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_mlsafety import SafetyEvaluator, SparseEditConfig, SparseSafetyEditor, load_builtin_dataset
from hf_mlsafety.editing.solver import default_edit_layer
from hf_mlsafety.scripts.eval import _limit


def settings(num_layers, auto_layer):
    """One knob at a time away from the defaults; `layers=None` is the automatic middle-layer choice."""
    early, late = round(0.25 * num_layers), round(0.85 * num_layers) - 1
    middle = list(range(math.floor(0.4 * num_layers), math.ceil(0.7 * num_layers)))  # the automatic rule's candidates
    return {
        "defaults": {},
        "gamma=0.1": {"gamma": 0.1},
        "gamma=10": {"gamma": 10.0},
        "lam=0.1": {"lam": 0.1},
        "lam=10": {"lam": 10.0},
        "rank=8": {"rank": 8},
        "rank=64": {"rank": 64},
        f"layers=[{early}]": {"layers": [early]},
        f"layers=[{late}]": {"layers": [late]},
        f"layers=[{auto_layer - 2},{auto_layer},{auto_layer + 2}]": {
            "layers": [auto_layer - 2, auto_layer, auto_layer + 2]
        },
        "utility_mode=hard_projection": {"utility_mode": "hard_projection"},
        "edit_neurons=union": {"edit_neurons": "union"},
        f"layers={middle[0]}..{middle[-1]}, rank=8": {"layers": middle, "rank": 8},
        f"layers={middle[0]}..{middle[-1]}, rank=8, gamma=0.1": {"layers": middle, "rank": 8, "gamma": 0.1},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), 'tiny' or a path")
    parser.add_argument(
        "--train_items_per_language",
        type=int,
        default=30,
        help="built-in train items per language (harmful and harmless) to find neurons and fit on",
    )
    parser.add_argument("--prompts_per_language", type=int, default=12, help="dev harmful prompts per language")
    parser.add_argument("--harmless_per_language", type=int, default=4, help="dev harmless prompts per language")
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="names of the settings to run (default: all)")
    args = parser.parse_args(argv)

    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    train = load_builtin_dataset("probes", split="train")
    train_harmful = first_items(train.filter(lambda row: row["label"] == "harmful"), args.train_items_per_language)
    train_harmless = first_items(train.filter(lambda row: row["label"] == "harmless"), args.train_items_per_language)
    dev = load_builtin_dataset("probes", split="dev")
    dev_harmful = _limit(dev.filter(lambda row: row["label"] == "harmful"), args.prompts_per_language)
    dev_harmless = _limit(dev.filter(lambda row: row["label"] == "harmless"), args.harmless_per_language)
    evaluator = SafetyEvaluator(model, tokenizer, max_new_tokens=args.max_new_tokens, batch_size=16)

    def row(name, summary, seconds):
        print(
            f"| {name} | {100 * summary['asr_en']:.1f} | {100 * summary['asr_non_english']:.1f} | "
            f"{100 * summary['invalid_non_english']:.1f} | {100 * summary['over_refusal']:.1f} | {seconds:.0f} |",
            flush=True,
        )

    start = time.perf_counter()
    base = evaluator.evaluate(dev_harmful, dev_harmless).summary()
    print(
        f"\nModel: {os.path.basename(os.path.normpath(model_path))}; edit fitted on the built-in train split "
        f"({len(train_harmful)} harmful, "
        f"{len(train_harmless)} harmless probes); evaluated on the dev split ({args.prompts_per_language} harmful + "
        f"{args.harmless_per_language} harmless prompts per language, greedy, {args.max_new_tokens} new tokens, "
        "refusal judge). Rates in %; seconds = fit + evaluation.\n"
    )
    print("| setting | en ASR | non-en ASR | non-en invalid | over-refusal | seconds |\n|---|---|---|---|---|---|")
    row("base (no edit)", base, time.perf_counter() - start)

    editor = SparseSafetyEditor(model, tokenizer, SparseEditConfig())
    editor.find_safety_neurons(train_harmful, train_harmless)
    counts = {
        layer: sum(len(index) for index in modules.values()) for layer, modules in editor.safety_neurons["en"].items()
    }
    auto_layer = default_edit_layer(counts, editor.num_layers)
    # The settings differ in the solve, not in the model's activations: compute each layer set's features once
    features, compute_features = {}, editor._features

    def cached_features(prompts, layers):
        key = (tuple(prompts), tuple(layers))
        if key not in features:
            features[key] = compute_features(prompts, layers)
        return features[key]

    editor._features = cached_features
    results = {}
    for name, change in settings(editor.num_layers, auto_layer).items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        editor.config = dataclasses.replace(SparseEditConfig(), **change)
        try:
            editor.fit(train_harmful, train_harmless)
        except ValueError as error:  # e.g. fewer neurons than the rank in the chosen layer
            print(f"| {name} | not applicable: {error} | | | | |", flush=True)
            continue
        editor.apply()
        summary = evaluator.evaluate(dev_harmful, dev_harmless).summary()
        editor.revert()
        results[name] = summary
        row(name, summary, time.perf_counter() - start)

    eligible = {
        name: summary
        for name, summary in results.items()
        if summary["asr_en"] <= base["asr_en"] and summary["over_refusal"] <= base["over_refusal"] + 0.10
    }
    print(f"\nAutomatic layer: {auto_layer} of {editor.num_layers}.")
    if eligible:
        best = min(eligible, key=lambda name: (eligible[name]["asr_non_english"], eligible[name]["over_refusal"]))
        print(
            f"Best eligible setting: {best} (non-English ASR {100 * eligible[best]['asr_non_english']:.1f} vs base "
            f"{100 * base['asr_non_english']:.1f})."
        )
    else:
        print("No setting keeps English ASR and over-refusal within bounds.")


if __name__ == "__main__":
    main()
