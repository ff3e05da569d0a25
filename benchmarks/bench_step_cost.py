"""Step cost of each hf-mlsafety trainer against its TRL parent, measured side by side in one process.

    python benchmarks/bench_step_cost.py                                # tiny test model: 4 pairs + language sweep
    python benchmarks/bench_step_cost.py --model embedded               # SmolLM2-135M-Instruct (CPU, ~4 min)
    python benchmarks/bench_step_cost.py --pairs mlc --response_tokens 256 --steps 20

Pairs (method / parent, same model, data rows, batch and LoRA adapter):

    mlc      MLCTrainer (10 prompt variants)            / DPOTrainer       target <= 1.3x
    mpo      MPOTrainer (precompute_ref_log_probs=True) / DPOTrainer       target <= 1.0x
    msd      MSDTrainer                                 / DistillationTrainer, same completion length   <= 1.1x
    mlc_sft  MLCSFTTrainer (10 prompt variants)         / SFTTrainer       target <= 1.3x

A step is `trainer.training_step` (data preparation, generation for the distillation pair, forward, backward) plus the
optimizer step, timed with `time.perf_counter`. Both trainers of a pair are built first; after the warm-up steps they
alternate (A B, B A, A B, ...) so that drift and noise from other processes hit both sides alike. Reported: the median
step time of each side, the ratio of the medians and the median of the per-round ratios, then a profile of where each
side's time goes (forwards with and without gradient, generation, backward, optimizer) with the token positions each
processes per step, and how MLC's cost grows with the number of languages.
"""

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402 (after the environment variables it reads)


LANGUAGES = ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]
PAIRS = {
    # name: (parent, method, target ratio)
    "mlc": ("DPOTrainer", "MLCTrainer", 1.3),
    "mpo": ("DPOTrainer", "MPOTrainer", 1.0),
    "msd": ("DistillationTrainer", "MSDTrainer", 1.1),
    "mlc_sft": ("SFTTrainer", "MLCSFTTrainer", 1.3),
}


# ---------------------------------------------------------------------------------------------------------------------
# Building the trainers (shared with bench_memory.py and gpu_qlora.py)


def resolve_model(name):
    if name == "tiny":
        from hf_mlsafety.testing import tiny_model_path

        return tiny_model_path()
    if name == "embedded":
        from hf_mlsafety.models import embedded_model_path

        return embedded_model_path()
    return name


def lengthen(texts, tokenizer, tokens, seed):
    """Extends each text to about `tokens` tokens with other texts of the list (synthetic long responses)."""
    if not tokens:
        return texts
    out = []
    for index, text in enumerate(texts):
        pieces, step = [text], 1
        while len(tokenizer(" ".join(pieces), add_special_tokens=False)["input_ids"]) < tokens:
            pieces.append(texts[(index + step * 7 + seed) % len(texts)])
            step += 1
        ids = tokenizer(" ".join(pieces), add_special_tokens=False)["input_ids"][:tokens]
        out.append(tokenizer.decode(ids))
    return out


def pair_datasets(pair, rows, languages=LANGUAGES, response_tokens=0, tokenizer=None, seed=0):
    """(parent dataset, method dataset): the same rows, the parent's without the method's extra columns."""
    from hf_mlsafety.data import load_builtin_dataset

    if pair == "mlc":
        data = load_builtin_dataset("mlc", "train", languages)
        parent_columns = ["prompt", "chosen", "rejected"]
    elif pair == "mlc_sft":
        data = load_builtin_dataset("mlc_sft", "train", languages)
        parent_columns = ["prompt", "completion"]
    elif pair == "mpo":
        data = load_builtin_dataset("mpo", "train")
        parent_columns = ["prompt", "chosen", "rejected"]
    elif pair == "msd":
        data = load_builtin_dataset("msd", "train")
        parent_columns = ["prompt"]
    else:
        raise ValueError(pair)
    data = data.shuffle(seed=seed)
    data = data.select(range(min(rows, len(data))))
    if response_tokens and pair != "msd":
        for column in ("chosen", "rejected", "completion", "target_chosen", "target_rejected"):
            if column in data.column_names:
                data = data.remove_columns(column).add_column(
                    column, lengthen(data[column], tokenizer, response_tokens, seed=len(column))
                )
    return data.select_columns(parent_columns), data


def common_args(output_dir, batch, max_length, seed=0, **extra):
    kwargs = {
        "output_dir": output_dir,
        "per_device_train_batch_size": batch,
        "learning_rate": 1e-5,
        "max_steps": 1000,
        "logging_steps": 1000,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        "bf16": torch.cuda.is_available(),
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": seed,
    }
    if max_length is not None:
        kwargs["max_length"] = max_length
    kwargs.update(extra)
    return kwargs


def lora_config(r=16):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def build_trainer(
    name,
    model,
    tokenizer,
    dataset,
    *,
    batch,
    max_length,
    completion_length,
    peft=True,
    quantization_config=None,
    teacher_init_kwargs=None,
    extra_args=None,
    output_dir=None,
):
    """One trainer by class name, on `model` (a path), with LoRA r=16 all-linear unless `peft=False`."""
    output_dir = output_dir or tempfile.mkdtemp(prefix=f"bench_{name}_")
    extra = dict(extra_args or {})
    kwargs = {"processing_class": tokenizer, "train_dataset": dataset}
    if peft:
        kwargs["peft_config"] = lora_config()
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    generation = {"min_new_tokens": completion_length}  # fixed completion length: the same work for both sides
    if name == "DPOTrainer":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(model=model, args=DPOConfig(**common_args(output_dir, batch, max_length, **extra)), **kwargs)
    if name == "MLCTrainer":
        from hf_mlsafety import MLCConfig, MLCTrainer

        return MLCTrainer(model=model, args=MLCConfig(**common_args(output_dir, batch, max_length, **extra)), **kwargs)
    if name == "MPOTrainer":
        from hf_mlsafety import MPOConfig, MPOTrainer

        extra.setdefault("precompute_ref_log_probs", True)
        return MPOTrainer(model=model, args=MPOConfig(**common_args(output_dir, batch, max_length, **extra)), **kwargs)
    if name == "SFTTrainer":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(model=model, args=SFTConfig(**common_args(output_dir, batch, max_length, **extra)), **kwargs)
    if name == "MLCSFTTrainer":
        from hf_mlsafety import MLCSFTConfig, MLCSFTTrainer

        args = MLCSFTConfig(**common_args(output_dir, batch, max_length, **extra))
        return MLCSFTTrainer(model=model, args=args, **kwargs)
    if name == "DistillationTrainer":
        from trl import DistillationConfig, DistillationTrainer

        extra.setdefault("generation_kwargs", generation)
        if teacher_init_kwargs is not None:
            extra.setdefault("teacher_model_init_kwargs", teacher_init_kwargs)
        args = DistillationConfig(
            **common_args(output_dir, batch, None, max_completion_length=completion_length, **extra)
        )
        # The parent needs a teacher: a second frozen copy of the initial model (MSD's is the adapter-disabled student)
        return DistillationTrainer(model=model, teacher_model=model, args=args, **kwargs)
    if name == "MSDTrainer":
        from hf_mlsafety import MSDConfig, MSDTrainer

        extra.setdefault("generation_kwargs", generation)
        args = MSDConfig(**common_args(output_dir, batch, None, max_completion_length=completion_length, **extra))
        return MSDTrainer(model=model, args=args, **kwargs)
    raise ValueError(f"unknown trainer {name}")


# ---------------------------------------------------------------------------------------------------------------------
# Stepping and profiling


def _backbones(model):
    """The outermost causal-LM module and its backbone, under PEFT or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [module for module in (base, getattr(base, "model", None)) if module is not None]


class StepProfiler:
    """Per-step wall time of the model's outermost forwards (by kind), backward, optimizer, and the token positions
    (padded) each kind processes. Hooks on the causal LM and its backbone; nested calls are counted once."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.depth = 0
        self.totals = defaultdict(float)
        self.tokens = defaultdict(int)
        self.real_tokens = defaultdict(int)
        self.per_step = []
        models = [trainer.model]
        for name in ("ref_model", "teacher_model"):  # separate reference / teacher copies, when the trainer has one
            other = getattr(trainer, name, None)
            if other is not None:
                models.append(trainer.accelerator.unwrap_model(other))
        for model in models:
            for module in _backbones(model):
                module.register_forward_pre_hook(self._pre, with_kwargs=True)
                module.register_forward_hook(self._post, with_kwargs=True)
        accelerator = trainer.accelerator
        backward = accelerator.backward

        @functools.wraps(backward)
        def timed_backward(*args, **kwargs):
            with self.phase("backward"):
                return backward(*args, **kwargs)

        accelerator.backward = timed_backward

    @contextlib.contextmanager
    def phase(self, key):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[key] += time.perf_counter() - start

    def _kind(self, kwargs):
        if kwargs.get("past_key_values") is not None:
            return "generation"
        grad = "grad" if torch.is_grad_enabled() else "no-grad"
        hidden_only = kwargs.get("output_hidden_states") not in (None, False) or (
            kwargs.get("labels") is None
            and isinstance(kwargs.get("logits_to_keep"), (int, torch.Tensor))
            and not isinstance(kwargs.get("logits_to_keep"), bool)
            and (
                kwargs["logits_to_keep"] == 1
                if isinstance(kwargs["logits_to_keep"], int)
                else kwargs["logits_to_keep"].numel() == 0
            )
        )
        return f"fwd {grad}{' (hidden states)' if hidden_only else ''}"

    def _pre(self, module, args, kwargs):
        if self.depth == 0:
            self._start = time.perf_counter()
            self._key = self._kind(kwargs)
            ids = kwargs.get("input_ids", args[0] if args else None)
            if not isinstance(ids, torch.Tensor):  # e.g. TRL's forward redirection passes the module first
                ids = None
            if ids is None and kwargs.get("inputs_embeds") is not None:
                ids = kwargs["inputs_embeds"][..., 0]
            self.tokens[self._key] += 0 if ids is None else ids.numel()
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and ids is not None and mask.shape == ids.shape:
                self.real_tokens[self._key] += int(mask.sum())
            elif ids is not None:
                self.real_tokens[self._key] += ids.numel()
        self.depth += 1

    def _post(self, module, args, kwargs, output):
        self.depth -= 1
        if self.depth == 0:
            self.totals[self._key] += time.perf_counter() - self._start

    def close_step(self, total):
        record = dict(self.totals)
        record["tokens"] = dict(self.tokens)
        record["real_tokens"] = dict(self.real_tokens)
        record["step"] = total
        self.per_step.append(record)
        self.totals.clear()
        self.tokens.clear()
        self.real_tokens.clear()


class Stepper:
    """Runs optimizer steps of a trainer outside `train()`: `training_step` + optimizer step, timed."""

    def __init__(self, trainer, label):
        self.trainer, self.label = trainer, label
        trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
        trainer.current_gradient_accumulation_steps = 1  # set by `train()`, read by `training_step`
        trainer.model.train()
        self._loader = trainer.get_train_dataloader()
        self._iterator = iter(self._loader)
        self.profiler = StepProfiler(trainer)
        self.times = []
        self.losses = []

    def _next_batch(self):
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self._loader)
            return next(self._iterator)

    def step(self, record=True):
        trainer = self.trainer
        inputs = self._next_batch()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = trainer.training_step(trainer.model, inputs, None)
        with self.profiler.phase("optimizer"):
            if trainer.args.max_grad_norm:
                trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.profiler.close_step(seconds)
        if record:
            self.times.append(seconds)
            self.losses.append(float(loss))
        else:
            self.profiler.per_step.pop()
        return seconds


def run_side_by_side(steppers, steps, warmup):
    """Warm-up, then rounds in which every stepper takes one step, the order rotating each round."""
    for stepper in steppers:
        for _ in range(warmup):
            stepper.step(record=False)
    for round_index in range(steps):
        shift = round_index % len(steppers)
        for stepper in steppers[shift:] + steppers[:shift]:
            stepper.step()


def median_ms(values):
    return 1000 * statistics.median(values)


def profile_lines(stepper):
    """Median per-step time of each phase and its share of the median step, with token positions per step."""
    records = stepper.profiler.per_step
    step = statistics.median(r["step"] for r in records)
    keys = sorted({key for r in records for key in r if key not in ("tokens", "real_tokens", "step")})
    lines = []
    accounted = 0.0
    for key in keys:
        value = statistics.median(r.get(key, 0.0) for r in records)
        if key in (
            "fwd grad",
            "fwd grad (hidden states)",
            "fwd no-grad",
            "fwd no-grad (hidden states)",
            "generation",
            "backward",
            "optimizer",
        ):
            accounted += value
        tokens = statistics.median(r["tokens"].get(key, 0) for r in records)
        real = statistics.median(r["real_tokens"].get(key, 0) for r in records)
        token_text = f"{tokens:>8.0f} positions ({real:.0f} non-pad)" if tokens else ""
        lines.append(f"      {key:<28} {1000 * value:9.1f} ms  {100 * value / step:5.1f}%  {token_text}")
    rest = step - accounted
    lines.append(f"      {'other (data, loss, logging)':<28} {1000 * rest:9.1f} ms  {100 * rest / step:5.1f}%")
    return lines


def describe_machine(threads):
    import transformers
    import trl

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({cpu}), {os.cpu_count()} cores"
    return (
        f"machine: {device}; torch {torch.__version__} ({threads} thread(s)), "
        f"transformers {transformers.__version__}, "
        f"trl {trl.__version__}, python {platform.python_version()}"
    )


def measure_pairs(args, model, tokenizer):
    results = []
    for pair in args.pairs:
        parent, method, target = PAIRS[pair]
        rows = args.batch * (args.steps + args.warmup)
        parent_data, method_data = pair_datasets(pair, rows, response_tokens=args.response_tokens, tokenizer=tokenizer)
        common = dict(batch=args.batch, max_length=args.max_length, completion_length=args.completion_length)
        steppers = [
            Stepper(build_trainer(parent, model, tokenizer, parent_data, **common), parent),
            Stepper(build_trainer(method, model, tokenizer, method_data, **common), method),
        ]
        run_side_by_side(steppers, args.steps, args.warmup)
        a, b = steppers
        ratio = statistics.median(b.times) / statistics.median(a.times)
        round_ratio = statistics.median(y / x for x, y in zip(a.times, b.times, strict=True))
        results.append((pair, a, b, ratio, round_ratio, target))
        print(
            f"{pair:<8} {parent:<20} {median_ms(a.times):9.1f} ms   {method:<14} {median_ms(b.times):9.1f} ms   "
            f"ratio {ratio:5.2f}x (per-round median {round_ratio:5.2f}x)   target <= {target}x: "
            f"{'met' if ratio <= target else 'MISSED'}",
            flush=True,
        )
        del steppers
    print(
        "\nprofile (median per step; 'positions' = token positions through the model per step, padding included; "
        "'other' = data, loss, metrics, and for distillation the chunked or full-vocabulary divergence)"
    )
    for pair, a, b, *_ in results:
        for stepper in (a, b):
            print(f"  {pair} / {stepper.label}: step {median_ms(stepper.times):.1f} ms")
            for line in profile_lines(stepper):
                print(line)
    return results


def measure_language_sweep(args, model, tokenizer):
    """MLC step time with 2, 4, ..., 10 languages against one DPO trainer, all interleaved."""
    counts = [m for m in args.sweep if 2 <= m <= len(LANGUAGES)]
    rows = args.batch * (args.steps + args.warmup)
    common = dict(batch=args.batch, max_length=args.max_length, completion_length=args.completion_length)
    parent_data, _ = pair_datasets("mlc", rows, response_tokens=args.response_tokens, tokenizer=tokenizer)
    steppers = [Stepper(build_trainer("DPOTrainer", model, tokenizer, parent_data, **common), "DPO")]
    for m in counts:
        _, data = pair_datasets(
            "mlc", rows, languages=LANGUAGES[:m], response_tokens=args.response_tokens, tokenizer=tokenizer
        )
        steppers.append(Stepper(build_trainer("MLCTrainer", model, tokenizer, data, **common), f"MLC m={m}"))
    run_side_by_side(steppers, args.steps, args.warmup)
    base = statistics.median(steppers[0].times)
    print(f"\nMLC cost against the number of languages m (DPO step: {1000 * base:.1f} ms)")
    print("   m   step ms   ratio   extra ms   variant positions/step   extra ms per 1k positions")
    xs, ys = [], []
    for stepper, m in zip(steppers[1:], counts, strict=True):
        step = statistics.median(stepper.times)
        positions = statistics.median(
            r["tokens"].get("fwd grad (hidden states)", 0) for r in stepper.profiler.per_step
        )
        extra = step - base
        xs.append(positions)
        ys.append(extra)
        print(
            f"  {m:>2} {1000 * step:9.1f} {step / base:7.2f}x {1000 * extra:9.1f}   {positions:>22.0f}   "
            f"{1e6 * extra / positions if positions else float('nan'):10.2f}"
        )
    if len(xs) >= 2:
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
        intercept = mean_y - slope * mean_x
        ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
        ss_tot = sum((y - mean_y) ** 2 for y in ys) or float("nan")
        print(
            f"  linear fit of the extra time on variant positions: {1e6 * slope:.2f} ms per 1k positions + "
            f"{1000 * intercept:.1f} ms, R^2 = {1 - ss_res / ss_tot:.3f}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (default), 'embedded' (SmolLM2-135M) or a path")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, default=4, help="per-device batch (preference pairs / prompts)")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--completion_length", type=int, default=32, help="fixed generated length (distillation)")
    parser.add_argument("--response_tokens", type=int, default=0, help="lengthen responses to this many tokens")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per trainer (default 12 tiny, 5 other)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared CPUs: 1 is steadiest)")
    parser.add_argument(
        "--sweep", type=int, nargs="*", default=[2, 4, 6, 8, 10], help="MLC language counts ('' = skip)"
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 12 if args.model == "tiny" else 5
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import datasets
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    model = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    print(describe_machine(args.threads))
    print(
        f"model: {os.path.basename(os.path.normpath(args.model))}; batch {args.batch}, max_length {args.max_length}, "
        "LoRA r=16 all-linear, fp32, "
        f"distillation completion length {args.completion_length} (fixed), responses "
        f"{'built-in' if not args.response_tokens else f'lengthened to {args.response_tokens} tokens'}; "
        f"{args.steps} timed steps per trainer after {args.warmup} warm-up, alternating\n",
        flush=True,
    )
    start = time.perf_counter()
    measure_pairs(args, model, tokenizer)
    if args.sweep:
        measure_language_sweep(args, model, tokenizer)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
