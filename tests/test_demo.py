import json

from huggingface_hub import ModelCard

from hf_mlsafety.cli import main
from hf_mlsafety.languages import MULTIJAIL_LANGUAGES


def test_main_job_pipeline_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "outputs"
    main(["demo", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--eval_prompts_per_language", "1",
          "--eval_harmless_per_language", "1", "--max_new_tokens", "3", "--num_train_epochs", "0.05",
          "--mlc_languages", "en,sw,jv"])
    printed = capsys.readouterr().out
    assert "English-only DPO (base → after)" in printed and "DPO + MLC (base → after)" in printed
    assert "| Javanese (jv) | 1 |" in printed
    files = {path.name for path in out.iterdir()}
    assert {"adapter_model.safetensors", "mlc_extractor.safetensors", "README.md", "safety_asr.png",
            "safety_asr_base_dpo_mlc.png", "report_base.json", "report_dpo.json", "report_mlc.json"} <= files
    assert (out / "dpo_baseline" / "adapter_model.safetensors").exists()
    report = json.loads((out / "report_mlc.json").read_text())
    assert list(report["per_language"]) == MULTIJAIL_LANGUAGES
    card = ModelCard.load(out / "README.md")
    assert set(MULTIJAIL_LANGUAGES) <= set(card.data.language)
    assert "base model → this model" in card.text and str(tmp_path) not in str(card)
