"""Small helpers shared by the trainers, the editor and the evaluator."""

import bitsandbytes as bnb


def disable_cpu_4bit_repacking(model):
    """Keeps bitsandbytes 4-bit layers on CPU from repacking their weights in place on an eval-mode forward.

    On CPUs with AVX512-BF16, `Linear4bit` repacks its weight into a CPU layout the first time it runs in eval mode
    without gradients (generation, an evaluation loop). Later training forwards then go through `gemv_4bit`, which has
    no autograd kernel, and the LoRA gradients come out silently wrong (bitsandbytes 0.50). Turning the CPU fast path off
    keeps the regular, differentiable path. Call it right after loading, before any eval-mode forward. A no-op for
    models without 4-bit layers and on GPU (CUDA never repacks).

    Args:
        model (`torch.nn.Module`):
            The model, possibly wrapped by PEFT.

    Returns:
        `int`: the number of 4-bit layers changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu":
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def is_cpu_repacked(model):
    """Whether any 4-bit layer of `model` has had its weight repacked into the CPU layout (see
    [`disable_cpu_4bit_repacking`])."""
    return any(
        isinstance(module, bnb.nn.Linear4bit)
        and getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        for module in model.modules()
    )
