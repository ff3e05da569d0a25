import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer

from hf_mlsafety import MLCSFTConfig, MLCSFTTrainer
from hf_mlsafety.testing import CORPUS
from hf_mlsafety.trainer.mlc_utils import EXTRACTOR_WEIGHTS_NAME


LANGUAGES = ["en", "zh", "bn"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny models on a shared 2-core machine: intra-op threads only add contention (steps run ~10x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(n=4, languages=LANGUAGES, conversational=False):
    """English prompt-completion pairs plus parallel prompts (the testing kit's corpus is parallel)."""
    data = {
        "prompt": [CORPUS["en"][i % 6] for i in range(n)],
        "completion": [CORPUS["en"][0] for _ in range(n)],  # a refusal
    }
    data.update({f"prompt_{code}": [CORPUS[code][i % 6] for i in range(n)] for code in languages})
    if conversational:
        for column, texts in data.items():
            role = "user" if column.startswith("prompt") else "assistant"
            data[column] = [[{"role": role, "content": text}] for text in texts]
    return Dataset.from_dict(data)


def config_kwargs(output_dir, **overrides):
    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "max_length": 64,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return kwargs


def lora_config():
    return LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")


def test_drop_in_sft_script_trains_lora_and_extractor(tmp_path, tiny_model_dir, tiny_tokenizer):
    # A TRL SFT script (conversational prompt-completion data, `SFTConfig`, LoRA) whose only change is the import
    from hf_mlsafety import MLCSFTTrainer as SFTTrainer

    dataset = make_dataset(conversational=True)
    trainer = SFTTrainer(
        model=tiny_model_dir,
        args=SFTConfig(**config_kwargs(tmp_path)),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tiny_tokenizer,
        peft_config=lora_config(),
    )
    assert isinstance(trainer.args, MLCSFTConfig) and trainer.args.mlc_lambda == 0.8
    assert trainer.args.mlc_extractor_init == "xavier"  # the official SFT trainer's initialisation
    assert torch.equal(trainer.mlc_extractor.projection.bias, torch.zeros(512))
    assert trainer.mlc_languages == LANGUAGES
    assert {"trl", "sft", "mlc"} <= set(trainer.model.model_tags)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    extractor_before = {name: t.clone() for name, t in trainer.mlc_extractor.state_dict().items()}

    trainer.train()

    for name, before in lora_before.items():
        assert not torch.equal(before, trainer.model.get_parameter(name)), f"{name} did not change"
    for name, before in extractor_before.items():
        assert not torch.equal(before, trainer.mlc_extractor.state_dict()[name]), f"extractor {name} did not change"
    floor = math.log(1 + 2 * math.exp(-1 / 0.2))
    step_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(step_logs) == 2
    for log in step_logs:
        assert floor - 1e-5 <= log["mlc/loss"] <= math.log(3) + 1e-5
        assert 1 / 3 - 1e-5 <= log["mlc/sigma1_share"] <= 1 + 1e-5
        assert {"mlc/cosine_to_en", "mlc/cosine_to_en/zh", "mlc/cosine_to_en/bn"} <= set(log)
    assert "eval_mlc/loss" in trainer.evaluate()


def test_lambda_zero_reproduces_sft_loss(tmp_path, tiny_model_dir, tiny_tokenizer):
    dataset = make_dataset()
    sft = SFTTrainer(
        model=tiny_model_dir,
        args=SFTConfig(**config_kwargs(tmp_path)),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    mlc = MLCSFTTrainer(
        model=tiny_model_dir,
        args=MLCSFTConfig(**config_kwargs(tmp_path), mlc_lambda=0.0),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    sft_batch = sft.data_collator([sft.train_dataset[i] for i in range(2)])
    mlc_batch = mlc.data_collator([mlc.train_dataset[i] for i in range(2)])
    assert set(mlc_batch) == set(sft_batch) | {"mlc_input_ids", "mlc_attention_mask"}
    for key, value in sft_batch.items():
        assert torch.equal(mlc_batch[key], value), key
    assert mlc_batch["mlc_input_ids"].shape[0] == 2 * len(LANGUAGES)
    with torch.no_grad():
        sft_loss = sft.compute_loss(sft.model, dict(sft_batch))
        mlc_loss = mlc.compute_loss(mlc.model, dict(mlc_batch))
    assert abs(mlc_loss.item() - sft_loss.item()) <= 1e-6
    mode = "train" if mlc.model.training else "eval"
    mlc_term = mlc._metrics[mode]["mlc/loss"][-1]
    assert mlc_term > 0
    mlc.args.mlc_lambda = 0.8
    with torch.no_grad():
        weighted = mlc.compute_loss(mlc.model, dict(mlc_batch))
    assert weighted.item() == pytest.approx(sft_loss.item() + 0.8 * mlc_term, abs=1e-5)


def test_qlora_sft_trains_and_resume_restores_the_extractor(tmp_path, tiny_model_dir, tiny_tokenizer):
    dataset = make_dataset()
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )

    def make_trainer(output_dir):
        return MLCSFTTrainer(
            model=tiny_model_dir,
            args=MLCSFTConfig(**config_kwargs(output_dir, save_strategy="steps", save_steps=1)),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
            quantization_config=quantization_config,
            peft_config=lora_config(),
        )

    first = make_trainer(tmp_path / "first")
    assert first.mlc_extractor.projection.weight.dtype == torch.float32
    extractor_before = first.mlc_extractor.projection.weight.detach().clone()
    first.train()
    assert not torch.equal(extractor_before, first.mlc_extractor.projection.weight.detach())
    assert all("mlc/loss" in log for log in first.state.log_history if "loss" in log)
    checkpoint_1 = tmp_path / "first" / "checkpoint-1"
    saved_1 = load_file(str(checkpoint_1 / EXTRACTOR_WEIGHTS_NAME))
    assert (checkpoint_1 / "adapter_model.safetensors").is_file()

    second = make_trainer(tmp_path / "second")
    seen = {}

    class CaptureResumedExtractor(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update({name: t.clone() for name, t in second.mlc_extractor.state_dict().items()})

    second.add_callback(CaptureResumedExtractor())
    second.train(resume_from_checkpoint=str(checkpoint_1))
    for name, tensor in saved_1.items():
        assert torch.equal(seen[name], tensor), f"extractor {name} not restored exactly"


def test_bad_input_is_rejected_before_training(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = make_dataset().to_list()
    rows[2]["prompt_bn"] = ""
    with pytest.raises(ValueError, match=r"row 2, column 'prompt_bn': empty text"):
        MLCSFTTrainer(
            model=tiny_model_dir,
            args=MLCSFTConfig(**config_kwargs(tmp_path)),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer,
        )
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt', 'completion'\]"):
        MLCSFTTrainer(
            model=tiny_model_dir,
            args=MLCSFTConfig(**config_kwargs(tmp_path)),
            train_dataset=make_dataset().rename_column("completion", "answer").remove_columns("prompt"),
            processing_class=tiny_tokenizer,
        )
    with pytest.raises(ValueError, match="packing=False"):
        MLCSFTConfig(**config_kwargs(tmp_path), packing=True)
