"""Peak memory of each hf-mlsafety trainer against its TRL parent: peak RSS on CPU, peak allocated memory on a GPU.

    python benchmarks/bench_memory.py                      # tiny test model
    python benchmarks/bench_memory.py --model embedded     # SmolLM2-135M-Instruct
    python benchmarks/bench_memory.py --model embedded --gradient_checkpointing   # TRL's default, both sides

Each trainer runs `--steps` optimizer steps in a fresh subprocess (so one trainer's peak cannot hide another's), on the
same model, rows, batch and LoRA adapter as `bench_step_cost.py`; the parent prints the peaks side by side and their
ratio. The process peak includes Python, torch and the model: compare the differences as well as the ratios.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_step_cost import PAIRS, Stepper, build_trainer, pair_datasets, resolve_model  # noqa: E402


def one_trainer(args):
    """Runs in the subprocess: build one trainer, take the steps, print the peak as JSON."""
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    pair = args.pair
    parent_data, method_data = pair_datasets(
        pair, args.batch * args.steps, response_tokens=args.response_tokens, tokenizer=tokenizer
    )
    name = args.trainer
    data = parent_data if name == PAIRS[pair][0] else method_data
    trainer = build_trainer(
        name,
        model,
        tokenizer,
        data,
        batch=args.batch,
        max_length=args.max_length,
        completion_length=args.completion_length,
        extra_args={"gradient_checkpointing": args.gradient_checkpointing},
    )
    stepper = Stepper(trainer, name)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        stepper.step()
    peak = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux
    if torch.cuda.is_available():
        peak["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("PEAK " + json.dumps(peak))


def measure(args, pair, trainer):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--one",
        "--pair",
        pair,
        "--trainer",
        trainer,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--max_length",
        str(args.max_length),
        "--completion_length",
        str(args.completion_length),
        "--response_tokens",
        str(args.response_tokens),
        "--threads",
        str(args.threads),
    ] + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PEAK ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{trainer} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("PEAK ") :])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (default), 'embedded' (SmolLM2-135M) or a path")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--completion_length", type=int, default=32)
    parser.add_argument("--response_tokens", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward, on both sides (TRL configs default to it; off by default here, "
        "as in bench_step_cost.py)",
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    parser.add_argument("--trainer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return one_trainer(args)

    unit = "gpu_mb" if torch.cuda.is_available() else "rss_mb"
    label = "peak GPU allocated" if unit == "gpu_mb" else "peak RSS"
    checkpointing = "on" if args.gradient_checkpointing else "off"
    print(
        f"model {args.model}, batch {args.batch}, {args.steps} steps, gradient checkpointing {checkpointing}, {label} "
        "in MB (one process per trainer)"
    )
    for pair in args.pairs:
        parent, method, _ = PAIRS[pair]
        a, b = measure(args, pair, parent), measure(args, pair, method)
        print(
            f"{pair:<8} {parent:<20} {a[unit]:8.0f} MB   {method:<14} {b[unit]:8.0f} MB   "
            f"ratio {b[unit] / a[unit]:5.2f}x   difference {b[unit] - a[unit]:+7.0f} MB",
            flush=True,
        )


if __name__ == "__main__":
    main()
