"""`hf-mlsafety demo`: the main job. Align the embedded SmolLM2-135M-Instruct in English only, with and without the MLC
loss, and show per language what each changed.

    hf-mlsafety demo                               # about 10-15 minutes on 2 CPU cores, no network
    hf-mlsafety demo --model_name_or_path ./my-model --output_dir outputs

Steps: evaluate the base model on the built-in held-out test prompts (harmful, ten languages; harmless for
over-refusal); train English-only safety DPO with LoRA (the baseline every paper compares with); train the same with
the Multi-Lingual Consistency loss (prompts translated, responses English only); evaluate both; print the table; write
the MLC adapter, its model card and the charts to `--output_dir` (the DPO adapter to `dpo_baseline/`).
"""

import os
import time
from dataclasses import dataclass, field

from datasets import concatenate_datasets
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer, TrlParser

from ..data import load_builtin_dataset
from ..evaluation import SafetyEvaluator, plot_asr_comparison
from ..languages import MULTIJAIL_LANGUAGES
from ..trainer.mlc_config import MLCConfig
from ..trainer.mlc_trainer import MLCTrainer
from .eval import _limit


@dataclass
class DemoArguments:
    """Arguments of `hf-mlsafety demo`; the defaults are the ones chosen on the built-in dev split."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model to align; defaults to the embedded SmolLM2-135M-Instruct."}
    )
    output_dir: str = field(default="outputs", metadata={"help": "Where the adapter, card, charts and reports go."})
    languages: str = field(default=",".join(MULTIJAIL_LANGUAGES), metadata={"help": "Languages to evaluate."})
    mlc_languages: str = field(
        default="en,zh,it,ar,sw,jv",
        metadata={
            "help": "Prompt languages of the MLC loss. The default leaves out vi, ko, th and bn, whose prompts SmolLM2's "
            "tokenizer splits into 2-4x more tokens (the cost of MLC grows with prompt tokens); they are evaluated as "
            "languages MLC never saw."
        },
    )
    eval_split: str = field(default="test", metadata={"help": "Built-in split to evaluate on (`dev` for tuning)."})
    eval_prompts_per_language: int = field(default=8, metadata={"help": "Harmful test prompts per language."})
    eval_harmless_per_language: int = field(default=4, metadata={"help": "Harmless test prompts per language."})
    max_new_tokens: int = field(default=16, metadata={"help": "Response length during evaluation."})
    train_harmful_items: int = field(
        default=56, metadata={"help": "Harmful training items (a seeded sample of the 112 of the training split)."}
    )
    train_harmless_items: int = field(
        default=24,
        metadata={
            "help": "Harmless training items (helpful answer against an unneeded refusal), so that the model does not "
            "learn to refuse everything."
        },
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training items."})
    learning_rate: float = field(default=1e-3, metadata={"help": "LoRA learning rate (both runs)."})
    beta: float = field(default=0.1, metadata={"help": "DPO beta (both runs)."})
    loss_type: str = field(
        default="sigmoid,sft",
        metadata={
            "help": "DPO loss terms (TRL `loss_type`, both runs). The `sft` term (NLL of the chosen response) makes the "
            "135M model produce the refusals and answers under greedy decoding; plain `sigmoid` DPO mostly lowered the "
            "rejected responses on the dev split."
        },
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Preference pairs per forward."})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "Forwards per optimizer step."})
    max_length: int = field(default=96, metadata={"help": "Maximum tokens of prompt + response."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (all linear layers)."})
    mlc_lambda: float = field(default=0.8, metadata={"help": "Weight of the MLC loss."})
    mlc_every: int = field(default=2, metadata={"help": "Apply MLC every this many optimizer steps (2 = official)."})
    seed: int = field(default=0, metadata={"help": "Seed of LoRA initialisation and data order."})
    use_cpu: bool = field(default=True, metadata={"help": "Train on CPU (set false to use a GPU)."})


def _train(trainer_class, config_class, model, tokenizer, dataset, args, run_dir, **extra):
    config = config_class(
        output_dir=run_dir,
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        beta=args.beta,
        loss_type=args.loss_type.split(","),
        max_length=args.max_length,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=args.use_cpu,
        bf16=False,
        gradient_checkpointing=False,
        seed=args.seed,
        **extra,
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trainer_class(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    return trainer


def training_rows(task, args, languages=None):
    """A seeded sample of `train_harmful_items` harmful and `train_harmless_items` harmless training rows of `task`."""
    harmful = load_builtin_dataset(task, split="train", languages=languages)
    both = load_builtin_dataset(task, split="train", languages=languages, harmless=True)
    harmless = both.select(range(len(harmful), len(both)))
    parts = [harmful.shuffle(seed=args.seed).select(range(min(args.train_harmful_items, len(harmful)))),
             harmless.shuffle(seed=args.seed).select(range(min(args.train_harmless_items, len(harmless))))]
    return concatenate_datasets(parts)


def make_parser(prog=None):
    return TrlParser(DemoArguments, prog=prog)


def main(args):
    started = time.perf_counter()
    if args.model_name_or_path is None:
        from ..models import embedded_model_path

        print("Preparing the embedded SmolLM2-135M-Instruct (converted once, then cached) ...")
        args.model_name_or_path = embedded_model_path()
    languages = args.languages.split(",")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    probes = load_builtin_dataset("probes", split=args.eval_split, languages=languages)
    harmful = _limit(probes.filter(lambda row: row["label"] == "harmful"), args.eval_prompts_per_language)
    harmless = _limit(probes.filter(lambda row: row["label"] == "harmless"), args.eval_harmless_per_language)
    os.makedirs(args.output_dir, exist_ok=True)

    def evaluate(model, name):
        print(f"\nEvaluating {name} on {len(harmful)} harmful and {len(harmless)} harmless {args.eval_split} prompts ...")
        evaluator = SafetyEvaluator(model, tokenizer, max_new_tokens=args.max_new_tokens, batch_size=16)
        report = evaluator.evaluate(harmful, harmless)
        report.to_json(os.path.join(args.output_dir, f"report_{name}.json"))
        return report

    base = evaluate(args.model_name_or_path, "base")
    timings = {}
    print("\n[1/2] English-only safety DPO (the baseline) ...")
    start = time.perf_counter()
    dpo = _train(DPOTrainer, DPOConfig, args.model_name_or_path, tokenizer,
                 training_rows("preference", args), args, os.path.join(args.output_dir, "dpo_baseline"))
    timings["dpo"] = time.perf_counter() - start
    dpo.save_model()
    dpo_report = evaluate(dpo.accelerator.unwrap_model(dpo.model), "dpo")
    del dpo

    print("\n[2/2] DPO + Multi-Lingual Consistency loss (English responses, prompts in every language) ...")
    start = time.perf_counter()
    mlc = _train(MLCTrainer, MLCConfig, args.model_name_or_path, tokenizer,
                 training_rows("mlc", args, languages=args.mlc_languages.split(",")), args,
                 args.output_dir, mlc_lambda=args.mlc_lambda, mlc_every=args.mlc_every)
    timings["mlc"] = time.perf_counter() - start
    mlc_report = evaluate(mlc.accelerator.unwrap_model(mlc.model), "mlc")

    mlc.save_model(args.output_dir)
    mlc.create_model_card(safety_report=mlc_report, baseline_report=base, license=None)
    plot_asr_comparison([base, dpo_report, mlc_report], os.path.join(args.output_dir, "safety_asr_base_dpo_mlc.png"),
                        names=["base", "English DPO", "DPO + MLC"])
    print("\nEnglish-only DPO (base → after):\n")
    print(dpo_report.to_markdown(baseline=base))
    print("\nDPO + MLC (base → after):\n")
    print(mlc_report.to_markdown(baseline=base))
    print(f"\nTraining time: DPO {timings['dpo']:.0f} s, DPO + MLC {timings['mlc']:.0f} s; "
          f"whole job {time.perf_counter() - started:.0f} s.")
    print(f"The MLC adapter, its model card (README.md) and the charts are in {args.output_dir}/")
    return {"base": base, "dpo": dpo_report, "mlc": mlc_report}


if __name__ == "__main__":
    (demo_args,) = make_parser().parse_args_and_config()
    main(demo_args)
