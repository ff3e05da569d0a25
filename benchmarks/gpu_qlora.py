"""QLoRA on one GPU: peak memory and step time of each trainer and its TRL parent on a Llama-3.1-8B-shaped model.

    python benchmarks/gpu_qlora.py                          # needs a CUDA GPU; prints "skipped" without one
    python benchmarks/gpu_qlora.py --shape tiny --cpu       # the same code path on a tiny model, CPU (a smoke run)

The model is built from Llama-3.1-8B's configuration with random weights (no download), saved once in bf16 and loaded
by every trainer the way users load a Hub model: 4-bit NF4 with double quantization and bf16 compute, LoRA r=16 on
every linear layer, gradient checkpointing, batch 1, sequences of `--seq_len` tokens. Random weights cost the same
memory and time as trained ones. Target: peak GPU memory <= 16 GB per trainer (a 24 GB consumer card with room).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_step_cost import PAIRS, Stepper, build_trainer, pair_datasets  # noqa: E402


# Llama-3.1-8B's architecture (its config.json), for a model built with random weights
LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128009,
)
TINY = dict(
    LLAMA_31_8B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
)


def build_random_model(shape, directory, device):
    """Saves a randomly initialised model of `shape` plus the test kit's tokenizer (its ids fit any vocabulary above
    1k)."""
    from hf_mlsafety.testing import tiny_model_path

    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    tokenizer.save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["llama-3.1-8b", "tiny"], default="llama-3.1-8b")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--completion_length", type=int, default=256, help="generated tokens (distillation pair)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="run on CPU (only sensible with --shape tiny)")
    parser.add_argument("--model_dir", help="reuse a model saved by an earlier run")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("No CUDA device: QLoRA GPU benchmark skipped.")
        return
    device = "cpu" if args.cpu else "cuda"
    gpu = device == "cuda"
    directory = args.model_dir or tempfile.mkdtemp(prefix="qlora_model_")
    if not os.path.exists(os.path.join(directory, "config.json")):
        build_random_model(LLAMA_31_8B if args.shape == "llama-3.1-8b" else TINY, directory, device)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    compute_dtype = torch.bfloat16 if gpu else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    dtype = "bfloat16" if gpu else "float32"
    extra = dict(
        gradient_checkpointing=True,
        model_init_kwargs={"dtype": dtype, "device_map": {"": device}},
        bf16=gpu,
        use_cpu=not gpu,
    )
    print(
        f"{torch.cuda.get_device_name() if gpu else 'CPU'}; {args.shape} random weights, 4-bit NF4 + double quant, "
        f"LoRA r=16 all-linear, gradient checkpointing, batch 1, {args.seq_len} tokens"
    )
    for pair in args.pairs:
        parent, method, _ = PAIRS[pair]
        # Responses long enough that prompt + response fill about `seq_len` tokens
        parent_data, method_data = pair_datasets(
            pair, args.steps + 1, response_tokens=args.seq_len - 100, tokenizer=tokenizer
        )
        results = []
        for name, data in ((parent, parent_data), (method, method_data)):
            trainer = build_trainer(
                name,
                directory,
                tokenizer,
                data,
                batch=1,
                max_length=args.seq_len,
                completion_length=args.completion_length,
                quantization_config=quantization,
                teacher_init_kwargs={"dtype": dtype, "quantization_config": quantization, "device_map": {"": device}},
                extra_args=extra,
            )
            stepper = Stepper(trainer, name)
            stepper.step(record=False)  # warm-up
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.steps):
                stepper.step()
            peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
            results.append((name, peak, statistics.median(stepper.times)))
            del trainer, stepper
            if gpu:
                torch.cuda.empty_cache()
        (pa, peak_a, time_a), (me, peak_b, time_b) = results
        print(
            f"{pair:<8} {pa:<20} {peak_a:6.2f} GB {time_a:7.2f} s/step   {me:<14} {peak_b:6.2f} GB "
            f"{time_b:7.2f} s/step   step ratio {time_b / time_a:5.2f}x   peak <= 16 GB: "
            f"{'met' if peak_b <= 16 else 'MISSED'}",
            flush=True,
        )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
