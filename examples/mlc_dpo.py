"""DPO + the Multi-Lingual Consistency (MLC) loss with QLoRA on one GPU (https://huggingface.co/papers/2602.16660).

English preference pairs train the DPO loss; the same prompt in ten languages feeds the MLC term, which pulls the ten
representations onto one direction. Only prompts need translating.

    python examples/mlc_dpo.py --model_name_or_path Qwen/Qwen2.5-7B-Instruct --output_dir Qwen2.5-7B-MLC --evaluate
    python examples/mlc_dpo.py --smoke --output_dir mlc-smoke   # tiny offline model on CPU, 2 steps
"""

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer, BitsAndBytesConfig

from hf_mlsafety import MLCConfig, MLCTrainer, SafetyEvaluator, load_builtin_dataset
from hf_mlsafety.testing import tiny_model_path


def safety_report(trainer, prompts_per_language, max_new_tokens):
    """Per-language safety on a few harmful prompts of the built-in test split (never seen in training)."""
    harmful = load_builtin_dataset("probes", split="test").filter(lambda row: row["label"] == "harmful")
    ids = sorted(set(harmful["parallel_id"]))[:prompts_per_language]
    harmful = harmful.filter(lambda row: row["parallel_id"] in ids)
    model = trainer.accelerator.unwrap_model(trainer.model)
    evaluator = SafetyEvaluator(model, trainer.processing_class, max_new_tokens=max_new_tokens, show_progress=False)
    return evaluator.evaluate(harmful)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="Qwen/Qwen2.5-7B-Instruct")
    parser.add_argument("--dataset_name", help="Hub id or local path (default: the built-in data, task 'mlc')")
    parser.add_argument("--output_dir")
    parser.add_argument("--evaluate", action="store_true", help="safety report before and after training")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id")
    parser.add_argument("--smoke", action="store_true", help="tiny offline model, CPU, 2 steps (for tests)")
    args = parser.parse_args(argv)

    model_id = tiny_model_path() if args.smoke else args.model_name_or_path
    output_dir = args.output_dir or f"{args.model_name_or_path.split('/')[-1]}-MLC"

    # QLoRA: NF4 4-bit base weights, LoRA adapters on every linear layer
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32 if args.smoke else torch.bfloat16,  # bitsandbytes also runs on CPU
    )
    peft_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )

    # Columns prompt, chosen, rejected (English) + prompt_<lang> for each language of the consistency matrix
    if args.dataset_name:
        train_dataset = load_dataset(args.dataset_name, split="train")
    else:
        train_dataset = load_builtin_dataset("mlc", split="train")

    config = dict(
        output_dir=output_dir,
        # MLC and DPO values of the official Qwen2.5-7B / Gemma-2-9B configs
        beta=0.1,
        mlc_lambda=0.8,
        mlc_tau=0.2,
        mlc_layer=None,  # final layer, after the final norm
        mlc_extractor_learning_rate=6e-7,  # official lr: the extractor stays a near-fixed random projection
        # Single 24 GB GPU: LoRA learning rate instead of the full fine-tune's 6e-7, same schedule and batch
        learning_rate=5e-6,
        num_train_epochs=3,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,  # ratio of the total steps
        max_length=1024,
        bf16=True,
        gradient_checkpointing=True,
        model_init_kwargs={"dtype": "bfloat16"},  # non-quantized weights (embeddings, norms, lm_head)
        logging_steps=5,
        save_strategy="no",
        hub_model_id=args.hub_model_id,
    )
    if args.smoke:  # tiny model on CPU: 2 steps on 4 rows, short sequences
        train_dataset = train_dataset.select(range(4))
        config.update(
            use_cpu=True, bf16=False, gradient_checkpointing=False, model_init_kwargs={"dtype": "float32"},
            report_to="none", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
            warmup_steps=0, learning_rate=1e-3, logging_steps=1, max_length=64, mlc_extractor_learning_rate=None,
        )
    training_args = MLCConfig(**config)

    trainer = MLCTrainer(
        model=model_id,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=AutoTokenizer.from_pretrained(model_id),
        quantization_config=quantization_config,
        peft_config=peft_config,
    )
    eval_kwargs = dict(prompts_per_language=1 if args.smoke else 8, max_new_tokens=4 if args.smoke else 128)
    before = safety_report(trainer, **eval_kwargs) if args.evaluate else None
    trainer.train()
    after = safety_report(trainer, **eval_kwargs) if args.evaluate else None
    if after is not None:
        print(after.to_markdown(baseline=before))

    trainer.save_model(output_dir)  # adapter, tokenizer and the MLC extractor
    trainer.create_model_card(safety_report=after, baseline_report=before)  # README.md + ASR chart
    if args.push_to_hub:
        trainer.push_to_hub(safety_report=after, baseline_report=before)
    return trainer


if __name__ == "__main__":
    main()
