import json
import os
import shutil

import pytest
import torch
from datasets import Dataset
from huggingface_hub import HfApi, ModelCard, snapshot_download
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from hf_mlsafety import MLCConfig, MLCTrainer, MPOConfig, MPOTrainer, MSDConfig, MSDTrainer
from hf_mlsafety.data import wide_to_mlc, wide_to_mpo, wide_to_msd
from hf_mlsafety.evaluation import SafetyReport
from hf_mlsafety.models import SOURCE_FILE


LANGS = ["en", "sw", "bn"]
TOKEN = os.environ["HF_TOKEN"]


def wide_table():
    table = {"id": ["a", "b"]}
    texts = {"en": ["How do I pick a lock?", "Write a threat."], "sw": ["Nifanyeje wizi?", "Andika tishio."],
             "bn": ["তালা খুলব কীভাবে?", "হুমকি লেখো।"]}
    for code in LANGS:
        table[code] = texts[code]
        table[f"chosen_{code}"] = [f"Sorry, I can't help ({code})."] * 2
        table[f"rejected_{code}"] = [f"Sure, here is how ({code})."] * 2
    return Dataset.from_dict(table)


def common(output_dir, hub_model_id):
    return dict(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        hub_model_id=hub_model_id, hub_token=TOKEN,
    )


def build(method, model_dir, tokenizer, output_dir, hub_model_id):
    lora = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "mlc":
        args = MLCConfig(**common(output_dir, hub_model_id), max_length=64, mlc_extractor_dim=16)
        return MLCTrainer(model=model_dir, args=args, train_dataset=wide_to_mlc(wide_table(), LANGS),
                          processing_class=tokenizer, peft_config=lora)
    if method == "mpo":
        args = MPOConfig(**common(output_dir, hub_model_id), max_length=64)
        return MPOTrainer(model=model_dir, args=args, train_dataset=wide_to_mpo(wide_table(), ["sw", "bn"]),
                          processing_class=tokenizer, peft_config=lora)
    args = MSDConfig(**common(output_dir, hub_model_id), max_completion_length=4)
    return MSDTrainer(model=model_dir, args=args, train_dataset=wide_to_msd(wide_table(), ["sw", "bn"]),
                      processing_class=tokenizer, peft_config=lora)


def reports():
    languages = ["en", "en", "sw", "sw", "bn", "bn"]
    before = SafetyReport.from_labels(languages, ["safe", "unsafe", "unsafe", "unsafe", "invalid", "unsafe"], [True] + [False] * 5)
    after = SafetyReport.from_labels(languages, ["safe"] * 5 + ["unsafe"], [True] * 5 + [False])
    return before, after


@pytest.mark.parametrize("method", ["mlc", "mpo", "msd"])
def test_train_push_download_and_load(method, hub, tiny_model_dir, tiny_tokenizer, tmp_path):
    # A base folder that records its Hub id (as the converted embedded model does): the card may name it.
    base_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    (base_dir / SOURCE_FILE).write_text(json.dumps({"hub_id": "org/tiny-base", "license": "apache-2.0"}))
    repo_id = f"org/tiny-{method}"
    trainer = build(method, str(base_dir), tiny_tokenizer, tmp_path / "out", repo_id)
    trainer.train()
    before, after = reports()
    trainer.push_to_hub(safety_report=after, baseline_report=before)

    files = HfApi().list_repo_files(repo_id)
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "safety_asr.png", "tokenizer.json"} <= set(files)
    if method == "mlc":
        assert "mlc_extractor.safetensors" in files
    assert len([c for c in hub.commits if c["repo_id"] == repo_id]) == 1  # adapter, tokenizer, card, chart: one commit

    card = ModelCard.load(repo_id)
    assert card.data.base_model == "org/tiny-base" and card.data.license == "apache-2.0"
    assert card.data.library_name == "peft"
    assert {"en", "sw", "bn"} <= set(card.data.language)
    assert {"hf-mlsafety", "multilingual", "safety", "trl", *trainer._tag_names} <= set(card.data.tags)
    asr = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert asr[("sw", "attack_success_rate")] == 0.0 and asr[("bn", "attack_success_rate")] == 50.0
    assert "50.0 → 0.0" in card.text or "100.0 → 0.0" in card.text
    text = open(os.path.join(snapshot_download(repo_id), "README.md")).read()
    assert TOKEN not in text and str(tmp_path) not in text

    model = trainer.accelerator.unwrap_model(trainer.model)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), repo_id)
    inputs = tiny_tokenizer("Habari", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5)


def test_card_from_a_local_base_has_no_base_model(hub, tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = build("mpo", tiny_model_dir, tiny_tokenizer, tmp_path / "out", "org/local-base")
    trainer.train()
    trainer.push_to_hub()
    card = ModelCard.load("org/local-base")
    assert card.data.base_model is None
    assert "No safety evaluation was attached" in card.text
    assert str(tiny_model_dir) not in str(card)


def test_failed_push_keeps_local_outputs_and_a_retry_succeeds(hub, tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    trainer = build("mlc", tiny_model_dir, tiny_tokenizer, tmp_path / "out", "org/retry")
    trainer.train()
    # An outage outlasting the client's own retries (1 try + 5 retries); their backoff waits are skipped.
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)
    hub.fail_next_commits = 6
    with pytest.raises(RuntimeError, match="Pushing to org/retry failed .*still in output_dir 'out'.*again to retry"):
        trainer.push_to_hub()
    local = set(os.listdir(tmp_path / "out"))
    assert {"adapter_model.safetensors", "mlc_extractor.safetensors", "README.md"} <= local
    assert "adapter_model.safetensors" not in HfApi().list_repo_files("org/retry")
    trainer.push_to_hub()
    assert "adapter_model.safetensors" in HfApi().list_repo_files("org/retry")
    assert set(os.listdir(tmp_path / "out")) >= local


def test_sparse_editor_push_with_card(hub, tiny_model_dir, tiny_tokenizer, tmp_path):
    from hf_mlsafety import SparseEditConfig, SparseSafetyEditor

    wide = wide_table()
    probes = []
    for label, suffix in (("harmful", ""), ("harmless", " (a recipe)")):
        for index, row in enumerate(wide):
            probes += [{"prompt": row[code] + suffix, "language": code, "parallel_id": f"{label}{index}", "label": label}
                       for code in LANGS]
    probes = Dataset.from_list(probes)
    harmful, harmless = probes.filter(lambda r: r["label"] == "harmful"), probes.filter(lambda r: r["label"] == "harmless")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    editor = SparseSafetyEditor(model, tiny_tokenizer, SparseEditConfig(rank=2, tau_mag=0.5, tau_stat=0.2))
    editor.fit(harmful, harmless)
    _, after = reports()
    editor.push_to_hub("org/tiny-edit", safety_report=after)
    files = set(HfApi().list_repo_files("org/tiny-edit"))
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "sparse_edit.json", "safety_asr.png",
            "tokenizer.json"} <= files
    card = ModelCard.load("org/tiny-edit")
    assert {"sw", "bn"} <= set(card.data.language) and "sparse-weight-editing" in card.data.tags
    assert card.data.base_model is None and str(tiny_model_dir) not in str(card)
    config = json.load(open(os.path.join(snapshot_download("org/tiny-edit"), "adapter_config.json")))
    assert config["base_model_name_or_path"] is None  # a local base path does not travel with the adapter
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "org/tiny-edit")
    assert reloaded.peft_config["default"].r == 2
