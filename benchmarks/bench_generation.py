"""Batched vs one-prompt-at-a-time generation throughput of `SafetyEvaluator`, measured side by side in one run.

    python benchmarks/bench_generation.py                       # embedded SmolLM2-135M-Instruct
    python benchmarks/bench_generation.py --model tiny          # the offline test model
    python benchmarks/bench_generation.py --model PATH --batch_size 16 --num_prompts 32 --max_new_tokens 32

Prints tokens per second for both settings and their ratio (target: at least 5x at batch 16 on CPU). Responses are
128 tokens by default, the evaluator's own default.
"""

import argparse
import time

import torch

from hf_mlsafety.data import load_builtin_dataset
from hf_mlsafety.evaluation import SafetyEvaluator


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), 'tiny', or a path / Hub id")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    args = parser.parse_args()
    if args.model == "embedded":
        from hf_mlsafety.models import embedded_model_path

        args.model = embedded_model_path()
    elif args.model == "tiny":
        from hf_mlsafety.testing import tiny_model_path

        args.model = tiny_model_path()
    torch.manual_seed(0)
    probes = load_builtin_dataset("probes", split="test").filter(lambda row: row["label"] == "harmful")
    # Languages interleaved, as in a real evaluation (the evaluator batches them by length).
    prompts = list(probes.shuffle(seed=0)["prompt"][: args.num_prompts])
    print(
        f"{args.num_prompts} built-in harmful test prompts (languages interleaved), {args.max_new_tokens} new tokens, "
        f"greedy; torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    timings = {}
    for batch_size in (1, args.batch_size):
        evaluator = SafetyEvaluator(
            args.model, max_new_tokens=args.max_new_tokens, batch_size=batch_size, show_progress=False
        )
        evaluator.generate(prompts[:2])  # warm-up
        start = time.perf_counter()
        responses = evaluator.generate(prompts)
        seconds = time.perf_counter() - start
        # The prompt forward alone (one new token): what batching cannot save, since it is compute-bound either way
        evaluator.max_new_tokens = 1
        start = time.perf_counter()
        evaluator.generate(prompts)
        prefill = time.perf_counter() - start
        tokens = sum(len(evaluator.processing_class(r, add_special_tokens=False)["input_ids"]) for r in responses)
        timings[batch_size] = (seconds, tokens, prefill)
        print(
            f"batch {batch_size:>3}: {seconds:7.2f} s for {len(prompts)} prompts, {tokens / seconds:7.1f} generated "
            f"tokens/s; prompt forwards {prefill:6.2f} s, decoding {tokens / (seconds - prefill):7.1f} tokens/s"
        )
    (one_s, one_tokens, one_prefill), (many_s, many_tokens, many_prefill) = timings[1], timings[args.batch_size]
    ratio = (many_tokens / many_s) / (one_tokens / one_s)
    decode_ratio = (many_tokens / (many_s - many_prefill)) / (one_tokens / (one_s - one_prefill))
    print(
        f"throughput ratio batch {args.batch_size} / batch 1: {ratio:.1f}x (prompts/s ratio {one_s / many_s:.1f}x; "
        f"decoding alone {decode_ratio:.1f}x; prompt forwards {100 * one_prefill / one_s:.0f}% of the batch-1 time, "
        f"{100 * many_prefill / many_s:.0f}% of the batch-{args.batch_size} time)"
    )


if __name__ == "__main__":
    main()
