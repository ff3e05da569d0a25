"""Cost of a full SparseSafetyEditor run, and how the closed-form solve grows with the hidden size.

    python benchmarks/bench_sparse_editor.py                      # embedded SmolLM2-135M-Instruct, CPU
    python benchmarks/bench_sparse_editor.py --model tiny --prompts_per_language 10

Part 1, full run: neuron finding over ten languages x `--prompts_per_language` harmful prompts of the built-in training
split (plus as many harmless ones), `fit` and the export as a LoRA adapter, with the time split into forward passes
(activation collection) and the solve. Part 2: `solve_sparse_edit` alone on synthetic matrices of hidden size d, whose
cost is dominated by the d x d Cholesky factorisation and SVD (d^3 expected); the exponent is fitted on a log-log
scale.
"""

import argparse
import math
import os
import platform
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_mlsafety import SparseEditConfig, SparseSafetyEditor, load_builtin_dataset
from hf_mlsafety.editing import sparse_editor
from hf_mlsafety.editing.solver import solve_sparse_edit


def resolve_model(name):
    if name == "tiny":
        from hf_mlsafety.testing import tiny_model_path

        return tiny_model_path()
    if name == "embedded":
        from hf_mlsafety.models import embedded_model_path

        return embedded_model_path()
    return name


def first_items(probes, per_language):
    ids = set(sorted(set(probes["parallel_id"]))[:per_language])
    return probes.filter(lambda row: row["parallel_id"] in ids)


def full_run(model_path, per_language, batch_size):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    probes = load_builtin_dataset("probes", split="train")
    harmful = first_items(probes.filter(lambda row: row["label"] == "harmful"), per_language)
    harmless = first_items(probes.filter(lambda row: row["label"] == "harmless"), per_language)

    # Time spent inside the solver, measured by wrapping the function the editor calls
    solve_seconds = []

    def timed_solve(*args, **kwargs):
        start = time.perf_counter()
        result = solve_sparse_edit(*args, **kwargs)
        solve_seconds.append(time.perf_counter() - start)
        return result

    sparse_editor.solve_sparse_edit = timed_solve
    editor = SparseSafetyEditor(model, tokenizer, SparseEditConfig(batch_size=batch_size))
    start = time.perf_counter()
    editor.find_safety_neurons(harmful, harmless)
    neurons = time.perf_counter() - start
    start = time.perf_counter()
    editor.fit(harmful, harmless)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        editor.save_pretrained(folder)
        adapter_bytes = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    export = time.perf_counter() - start
    sparse_editor.solve_sparse_edit = solve_sparse_edit

    solve = sum(solve_seconds)
    total = neurons + fit + export
    print(
        f"full run: {len(harmful)} harmful + {len(harmless)} harmless prompts ({per_language} per language), "
        f"edited layers {sorted({edit.layer for edit in editor.edits.values()})}, {len(editor.edits)} projections"
    )
    print(f"  find_safety_neurons (forwards)      {neurons:7.1f} s")
    print(f"  fit: forwards (features)            {fit - solve:7.1f} s")
    print(f"  fit: closed-form solves             {solve:7.2f} s  ({len(solve_seconds)} solves)")
    print(f"  export as LoRA adapter              {export:7.2f} s  ({adapter_bytes / 1e6:.1f} MB)")
    print(
        f"  total                               {total:7.1f} s   target <= 60 s: {'met' if total <= 60 else 'MISSED'}"
    )
    print(
        f"  forwards {100 * (total - solve - export) / total:.0f}% / solve {100 * solve / total:.0f}% "
        f"/ export {100 * export / total:.0f}%"
    )


def solver_scaling(sizes, rows, neurons, rank):
    print(
        f"\nsolve_sparse_edit on synthetic matrices: {rows} harmful + {rows} harmless rows, {neurons} edited neurons, "
        f"rank {rank}, float64"
    )
    print("       d    seconds   ratio to previous   (d ratio)^3")
    generator = torch.Generator().manual_seed(0)
    timings = []
    for d in sizes:
        features = torch.randn(rows, d, generator=generator, dtype=torch.float64)
        safe = torch.randn(rows, d, generator=generator, dtype=torch.float64)
        gap = torch.randn(rows, neurons, generator=generator, dtype=torch.float64)
        solve_sparse_edit(features[:8, :64], gap[:8], safe[:8, :64], rank=min(rank, 8))  # warm-up
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            solve_sparse_edit(features, gap, safe, rank=rank)
            best = min(best, time.perf_counter() - start)
        previous = timings[-1] if timings else None
        ratio = f"{best / previous[1]:8.2f}x" if previous else "        -"
        cube = f"{(d / previous[0]) ** 3:8.1f}x" if previous else "       -"
        print(f"  {d:6d}   {best:8.3f}   {ratio:>17}   {cube:>11}")
        timings.append((d, best))
    large = [(d, t) for d, t in timings if d >= 1024]
    if len(large) >= 2:
        (d0, t0), (d1, t1) = large[0], large[-1]
        print(f"  fitted exponent for d >= 1024: t ~ d^{math.log(t1 / t0) / math.log(d1 / d0):.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), 'tiny' or a path")
    parser.add_argument("--prompts_per_language", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    full_run(resolve_model(args.model), args.prompts_per_language, args.batch_size)
    if args.sizes:
        solver_scaling(args.sizes, rows=1000, neurons=256, rank=32)


if __name__ == "__main__":
    main()
