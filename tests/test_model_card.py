import json

from huggingface_hub import ModelCard

from hf_mlsafety.evaluation import SafetyReport
from hf_mlsafety.model_card import generate_safety_model_card, hub_model_id_of, scrub
from hf_mlsafety.models import SOURCE_FILE


PAPER = {"title": "A Paper", "id": "2602.16660", "citation": "@article{x,\n  title={A Paper}\n}"}


def report(asr_sw):
    labels = ["safe", "safe", "unsafe" if asr_sw else "safe", "safe"]
    return SafetyReport.from_labels(["en", "en", "sw", "sw"], labels, [True, True, not asr_sw, True],
                                    harmless_languages=["en"], harmless_refused=[False])


def test_base_model_is_written_only_for_hub_ids(tmp_path):
    assert hub_model_id_of("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id_of(str(tmp_path)) is None
    assert hub_model_id_of("/not/existing/folder") is None and hub_model_id_of("./model") is None
    (tmp_path / SOURCE_FILE).write_text(json.dumps({"hub_id": "org/base", "license": "apache-2.0"}))
    assert hub_model_id_of(str(tmp_path)) == "org/base"
    card = generate_safety_model_card(model_name="m", method_name="MLC", paper=PAPER, base_model_name_or_path=str(tmp_path))
    assert card.data.base_model == "org/base" and card.data.license == "apache-2.0"
    local = generate_safety_model_card(model_name="m", method_name="MLC", paper=PAPER,
                                       base_model_name_or_path=str(tmp_path / "plain"), license="mit")
    assert local.data.base_model is None and local.data.license == "mit"
    assert "[None]" not in str(local) and "This model was aligned for **multilingual safety**" in local.text


def test_card_metadata_table_and_eval_results_round_trip(tmp_path):
    card = generate_safety_model_card(
        model_name="tiny-mlc", method_name="MLC", paper=PAPER, base_model_name_or_path="org/base",
        hub_model_id="org/tiny-mlc", languages=["en", "zh"], tags=["mlc"], datasets=["org/data"],
        training_config={"learning_rate": 1e-3, "mlc_lambda": 0.8},
        report=report(asr_sw=False), baseline_report=report(asr_sw=True), chart_file="safety_asr.png",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.language == ["en", "zh", "sw"]
    assert loaded.data.library_name == "peft" and loaded.data.base_model == "org/base"
    assert {"hf-mlsafety", "multilingual", "safety", "trl", "mlc"} <= set(loaded.data.tags)
    results = {(r.dataset_config, r.metric_type): r.metric_value for r in loaded.data.eval_results}
    assert results[("sw", "attack_success_rate")] == 0.0 and results[("harmless", "over_refusal_rate")] == 0.0
    text = loaded.text
    assert "| Swahili (sw) | 2 | 50.0 → 0.0 |" in text
    assert "![Attack success rate per language](safety_asr.png)" in text
    assert "| `mlc_lambda` | `0.8` |" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("org/tiny-mlc")' in text
    assert "https://huggingface.co/papers/2602.16660" in text


def test_card_never_contains_tokens_or_local_paths(tmp_path):
    secret = "hf_abcdefghijklmnopqrstuvwxyz123456"
    card = generate_safety_model_card(
        model_name="m", method_name="MLC", paper=PAPER, base_model_name_or_path=str(tmp_path / "local-base"),
        training_config={"output_dir": str(tmp_path / "run"), "hub_token": secret, "note": f"see {tmp_path}/x.json"},
    )
    assert secret not in str(card) and str(tmp_path) not in str(card)
    assert "| `output_dir` | `run` |" in str(card) and "<token>" in str(card)
    assert scrub("https://huggingface.co/papers/1234") == "https://huggingface.co/papers/1234"
    assert scrub("load /home/user/models/base now") == "load base now"
