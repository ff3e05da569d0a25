"""The training and editing subcommands of `hf-mlsafety`, run in this process on the tiny model."""

import json

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_mlsafety.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: hf-mlsafety {command}" in capsys.readouterr().out


def test_help_lists_edit(capsys):
    main(["--help"])
    assert "  edit " in capsys.readouterr().out


def test_mlc_subcommand_trains_with_qlora_and_writes_the_card(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mlc"
    main(["mlc", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--languages", "en,sw,jv",
          "--use_peft", "--lora_r", "4", "--lora_target_modules", "all-linear", "--load_in_4bit", "--dtype", "float32",
          "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "64", "--use_cpu", "--bf16", "false",
          "--report_to", "none", "--save_strategy", "no", "--evaluate", "--eval_max_prompts_per_language", "1",
          "--eval_max_new_tokens", "3"])
    assert "| Swahili (sw) |" in capsys.readouterr().out
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in weights.items())
    assert (out / "mlc_extractor.safetensors").is_file()
    card = ModelCard.load(out / "README.md")
    assert {"en", "sw", "jv"} <= set(card.data.language) and "mlc" in card.data.tags
    assert "base_model" not in card.data.to_dict()  # a local base path is never written into the card


def test_edit_subcommand_saves_an_exact_adapter_and_card(tiny_model_dir, tmp_path, capsys, hub):
    out = tmp_path / "edit"
    main(["edit", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--languages", "en,sw,bn",
          "--layers", "1", "--rank", "2", "--evaluate", "--eval_max_prompts_per_language", "1",
          "--eval_max_new_tokens", "3", "--push_to_hub", "--hub_model_id", "org/cli-edit"])
    printed = capsys.readouterr().out
    assert "| Bengali (bn) |" in printed and "Edit saved as a LoRA adapter" in printed
    record = json.loads((out / "sparse_edit.json").read_text())
    assert record["layers"] == [1] and record["config"]["rank"] == 2
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    original = base.model.layers[1].mlp.gate_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    changed_rows = (merged.model.layers[1].mlp.gate_proj.weight != original).any(dim=1).nonzero().flatten()
    assert 0 < len(changed_rows) and set(changed_rows.tolist()) <= set(record["edited_neurons"]["model.layers.1.mlp.gate_proj"])
    assert torch.equal(merged.model.layers[0].mlp.gate_proj.weight, AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].mlp.gate_proj.weight)
    card = ModelCard.load(out / "README.md")
    assert {"en", "sw", "bn"} <= set(card.data.language) and (out / "safety_asr.png").is_file()
    assert {"README.md", "adapter_model.safetensors", "sparse_edit.json", "safety_asr.png"} <= set(
        HfApi().list_repo_files("org/cli-edit")
    )


def test_edit_subcommand_names_a_missing_column(tiny_model_dir, tmp_path):
    data = tmp_path / "probes.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "language": "en", "label": "harmful"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no 'parallel_id' column"):
        main(["edit", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--output_dir",
              str(tmp_path / "out")])
