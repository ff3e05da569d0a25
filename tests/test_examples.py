"""The scripts in examples/ run end to end on the tiny offline model (`--smoke`), and the CLI configs parse.

Each script runs in this process (`runpy`), not in a subprocess: every new Python process would pay ~10 s of imports.
"""

import glob
import importlib
import os
import re
import runpy

import bitsandbytes as bnb
import pytest
import torch
from huggingface_hub import HfApi
from peft import LoraConfig
from safetensors.torch import load_file
from trl import get_peft_config, get_quantization_config


EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
TRAINING_EXAMPLES = ["mlc_dpo", "mlc_sft", "mpo", "msd"]
# YAML config (examples/configs/<name>.yaml) -> module of its CLI subcommand (hf_mlsafety.scripts.<module>)
CLI_CONFIGS = {"mlc": "mlc", "mlc_sft": "mlc_sft", "mpo": "mpo", "msd": "msd", "edit": "edit"}
TRAINING_CONFIGS = ["mlc", "mlc_sft", "mpo", "msd"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from a second OpenMP thread, and on a busy 2-core machine its spin-waits slow every
    # matmul down tens of times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_example(name, *argv):
    main = runpy.run_path(os.path.join(EXAMPLES_DIR, f"{name}.py"))["main"]
    return main(["--smoke", *argv])


def assert_trained_adapter(output_dir):
    files = set(os.listdir(output_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files, files
    weights = load_file(os.path.join(output_dir, "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b, sorted(weights)
    # LoRA B matrices start at zero: non-zero ones were moved by training (or set by the edit)
    assert any(tensor.abs().sum() > 0 for tensor in lora_b)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_every_example_script_is_smoke_tested():
    scripts = {os.path.basename(path)[: -len(".py")] for path in glob.glob(os.path.join(EXAMPLES_DIR, "*.py"))}
    assert scripts == {*TRAINING_EXAMPLES, "sparse_edit"}


@pytest.mark.parametrize("name", TRAINING_EXAMPLES)
def test_training_example_smoke(name, tmp_path):
    output_dir = tmp_path / "out"
    trainer = run_example(name, "--evaluate", "--output_dir", str(output_dir))

    # QLoRA: 4-bit base layers under LoRA, two optimizer steps with a finite loss
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in trainer.model.modules())
    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    assert_trained_adapter(output_dir)
    if name.startswith("mlc"):
        assert (output_dir / "mlc_extractor.safetensors").is_file()
    # The safety card with the before/after table and the chart, not PEFT's generic README
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "hf-mlsafety" in card and "multilingual safety" in card
    assert "Swahili (sw)" in card and "→" in card
    assert (output_dir / "safety_asr.png").is_file()


def test_sparse_edit_example_smoke(tmp_path):
    output_dir = tmp_path / "out"
    editor = run_example("sparse_edit", "--evaluate", "--output_dir", str(output_dir))

    assert any(isinstance(module, bnb.nn.Linear4bit) for module in editor.model.modules())
    assert editor.edits
    assert_trained_adapter(output_dir)
    assert (output_dir / "sparse_edit.json").is_file()


@pytest.mark.parametrize("name", ["mlc_dpo", "sparse_edit"])
def test_example_pushes_to_the_hub(name, hub, tmp_path):
    repo_id = f"org/{name.replace('_', '-')}-example"
    run_example(name, "--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", repo_id)
    files = set(HfApi().list_repo_files(repo_id))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    if name == "mlc_dpo":
        assert {"README.md", "mlc_extractor.safetensors"} <= files, files


def test_every_cli_config_is_tested():
    paths = glob.glob(os.path.join(EXAMPLES_DIR, "configs", "*"))
    configs = {os.path.basename(path)[: -len(".yaml")] for path in paths}
    assert configs == set(CLI_CONFIGS)


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_cli_config_parses(name):
    script = importlib.import_module(f"hf_mlsafety.scripts.{CLI_CONFIGS[name]}")
    path = os.path.join(EXAMPLES_DIR, "configs", f"{name}.yaml")
    # Unknown keys raise. `--use_cpu` only lets `bf16: true` pass validation on this GPU-less machine.
    script_args, training_args, model_args = script.make_parser().parse_args_and_config(
        args=["--config", path, "--use_cpu"]
    )
    assert training_args.bf16 and training_args.gradient_checkpointing
    assert model_args.model_name_or_path in ("Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct")
    assert script_args.dataset_name == "builtin"
    quantization_config = get_quantization_config(model_args)
    assert quantization_config.load_in_4bit and quantization_config.bnb_4bit_quant_type == "nf4"
    assert quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    peft_config = get_peft_config(model_args)
    assert isinstance(peft_config, LoraConfig) and peft_config.target_modules == "all-linear"


def test_edit_cli_config_parses():
    script = importlib.import_module("hf_mlsafety.scripts.edit")
    path = os.path.join(EXAMPLES_DIR, "configs", "edit.yaml")
    script_args, edit_config = script.make_parser().parse_args_and_config(args=["--config", path])
    assert script_args.load_in_4bit and script_args.dataset_name == "builtin"
    assert edit_config.modules == ["gate_proj", "up_proj"] and edit_config.rank == 32 and edit_config.layers is None


def test_examples_hold_no_local_paths_or_tokens():
    paths = glob.glob(os.path.join(EXAMPLES_DIR, "*.py")) + glob.glob(os.path.join(EXAMPLES_DIR, "*.md"))
    paths += glob.glob(os.path.join(EXAMPLES_DIR, "configs", "*.yaml"))
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        assert not re.search(r"(?<![\w.])/(?:work|home|root|Users|tmp)/", text), path
        assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text), path
