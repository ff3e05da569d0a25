import pytest
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_fake_hub_round_trip_with_the_unmodified_clients(hub, tiny_model_dir, tmp_path):
    api = HfApi()
    assert api.whoami()["name"] == "hf-mlsafety-tester"
    api.create_repo("org/tiny", exist_ok=True)
    api.create_repo("org/tiny", exist_ok=True)  # the 409 answer carries the url
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ModelCard.from_template(ModelCardData(language=["en", "sw"], library_name="peft")).save(tmp_path / "adapter" / "README.md")
    api.upload_folder(repo_id="org/tiny", folder_path=tmp_path / "adapter", commit_message="adapter")
    assert sorted(api.list_repo_files("org/tiny")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert ModelCard.load("org/tiny").data.language == ["en", "sw"]
    assert open(hf_hub_download("org/tiny", "adapter_config.json"), "rb").read()
    assert snapshot_download("org/tiny")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "org/tiny")
    tokens = AutoTokenizer.from_pretrained(tiny_model_dir)("hello", return_tensors="pt")
    assert (reloaded(**tokens).logits - peft_model(**tokens).logits).abs().max() < 1e-6
    assert hub.commits[-1]["summary"] == "adapter"


def test_fake_hub_injected_failure_then_retry(hub, tmp_path):
    api = HfApi()
    api.create_repo("org/retry")
    (tmp_path / "file.txt").write_text("content")
    hub.fail_next_commits = 1
    with pytest.raises(HfHubHTTPError, match="500"):
        api.upload_file(path_or_fileobj=tmp_path / "file.txt", path_in_repo="file.txt", repo_id="org/retry")
    assert api.list_repo_files("org/retry") == [] and hub.fail_next_commits == 0
    api.upload_file(path_or_fileobj=tmp_path / "file.txt", path_in_repo="file.txt", repo_id="org/retry")
    assert api.list_repo_files("org/retry") == ["file.txt"]
