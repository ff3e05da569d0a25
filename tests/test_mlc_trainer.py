import math

import bitsandbytes as bnb
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from hf_mlsafety import MLCConfig, MLCTrainer
from hf_mlsafety.testing import CORPUS, build_tiny_model
from hf_mlsafety.trainer.mlc_utils import (
    EXTRACTOR_CONFIG_NAME,
    EXTRACTOR_WEIGHTS_NAME,
    MLCExtractor,
    last_prompt_token_states,
    length_buckets,
    mlc_rows,
    resolve_mlc_layer,
)
from hf_mlsafety.utils import is_cpu_repacked


LANGUAGES = ["en", "zh", "sw"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny models on a shared 2-core machine: intra-op threads only add contention (steps run ~10x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(n=4, languages=LANGUAGES, conversational=False):
    """English preference pairs plus parallel prompts (the testing kit's corpus is parallel across languages)."""
    prompts = {code: [CORPUS[code][i % 6] for i in range(n)] for code in languages}
    data = {
        "prompt": [CORPUS["en"][i % 6] for i in range(n)],
        "chosen": [CORPUS["en"][0] for _ in range(n)],  # a refusal
        "rejected": [CORPUS["en"][(i + 2) % 6] for i in range(n)],
    }
    data.update({f"prompt_{code}": prompts[code] for code in languages})
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


def trainable_snapshot(trainer):
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters() if param.requires_grad}


def test_drop_in_dpo_script_trains_lora_and_extractor(tmp_path, tiny_model_dir, tiny_tokenizer):
    # A TRL DPO script (conversational data, `DPOConfig`, LoRA) whose only change is the import of the trainer
    from hf_mlsafety import MLCTrainer as DPOTrainer

    dataset = make_dataset(conversational=True)
    trainer = DPOTrainer(
        model=tiny_model_dir,
        args=DPOConfig(**config_kwargs(tmp_path)),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tiny_tokenizer,
        peft_config=lora_config(),
    )
    assert isinstance(trainer.args, MLCConfig) and trainer.args.mlc_lambda == 0.8 and trainer.args.mlc_tau == 0.2
    assert trainer.args.learning_rate == 1e-3 and trainer.args.max_length == 64  # the DPOConfig values are kept
    assert trainer.mlc_languages == LANGUAGES
    assert {"trl", "dpo", "mlc"} <= set(trainer.model.model_tags)
    lora_before = trainable_snapshot(trainer)
    extractor_before = {name: t.clone() for name, t in trainer.mlc_extractor.state_dict().items()}
    assert extractor_before["projection.weight"].shape == (512, 64)

    trainer.train()

    for name, before in lora_before.items():
        assert not torch.equal(before, trainer.model.get_parameter(name)), f"{name} did not change"
    for name, before in extractor_before.items():
        assert not torch.equal(before, trainer.mlc_extractor.state_dict()[name]), f"extractor {name} did not change"
    assert trainer.mlc_extractor.projection.weight.dtype == torch.float32
    step_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(step_logs) == 2
    floor = math.log(1 + 2 * math.exp(-1 / 0.2))  # the collinear minimum for 3 languages
    for log in step_logs:
        assert floor - 1e-5 <= log["mlc/loss"] <= math.log(3) + 1e-5
        assert 1 / 3 - 1e-5 <= log["mlc/sigma1_share"] <= 1 + 1e-5
        for key in ["mlc/cosine_to_en", "mlc/cosine_to_en/zh", "mlc/cosine_to_en/sw"]:
            assert -1 - 1e-5 <= log[key] <= 1 + 1e-5
    assert log["mlc/cosine_to_en"] == pytest.approx((log["mlc/cosine_to_en/zh"] + log["mlc/cosine_to_en/sw"]) / 2)

    metrics = trainer.evaluate()
    assert floor - 1e-5 <= metrics["eval_mlc/loss"] <= math.log(3) + 1e-5
    assert "eval_mlc/sigma1_share" in metrics

    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / EXTRACTOR_WEIGHTS_NAME))
    assert torch.equal(saved["projection.weight"], trainer.mlc_extractor.projection.weight.detach())
    reloaded = MLCExtractor.from_pretrained(str(tmp_path / "final"))
    assert torch.equal(reloaded.projection.bias, trainer.mlc_extractor.projection.bias.detach())
    # The adapter holds the LoRA weights only: the extractor is its own file
    adapter = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert adapter and not any("projection" in key or "extractor" in key for key in adapter)


def test_lambda_zero_reproduces_dpo_loss_for_every_loss_type(tmp_path, tiny_model_dir, tiny_tokenizer):
    loss_types = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot"]
    loss_types += ["aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
    kwargs = config_kwargs(tmp_path, loss_type=loss_types, label_smoothing=0.1)  # exo_pair needs label smoothing
    dataset = make_dataset()
    # A reference model different from the policy, so that the DPO losses are not at their trivial starting values
    dpo = DPOTrainer(
        model=tiny_model_dir,
        ref_model=build_tiny_model(tiny_tokenizer, seed=1),
        args=DPOConfig(**kwargs),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    mlc = MLCTrainer(
        model=tiny_model_dir,
        ref_model=build_tiny_model(tiny_tokenizer, seed=1),
        args=MLCConfig(**kwargs, mlc_lambda=0.0),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    dpo_batch = dpo.data_collator([dpo.train_dataset[i] for i in range(2)])
    mlc_batch = mlc.data_collator([mlc.train_dataset[i] for i in range(2)])
    # The preference rows are exactly TRL's; the B·m variant rows come on top
    assert set(mlc_batch) == set(dpo_batch) | {"mlc_input_ids", "mlc_attention_mask"}
    for key, value in dpo_batch.items():
        assert torch.equal(mlc_batch[key], value), key
    assert mlc_batch["mlc_input_ids"].shape[0] == 2 * len(LANGUAGES)
    # Each variant is chat-templated with the generation prompt; its last real token ends the assistant header
    expected = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": dataset[1]["prompt_zh"]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    row = 1 * len(LANGUAGES) + 1  # example 1, language zh
    length = int(mlc_batch["mlc_attention_mask"][row].sum())
    assert mlc_batch["mlc_input_ids"][row, :length].tolist() == expected
    assert tiny_tokenizer.decode(expected).endswith("<|im_start|>assistant\n")

    ref_rows, policy_outputs = [], []
    mlc.ref_model.register_forward_pre_hook(
        lambda module, args, kwargs: ref_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    mlc.model.register_forward_hook(lambda module, args, output: policy_outputs.append(output))
    with torch.no_grad():
        dpo_loss = dpo.compute_loss(dpo.model, dpo_batch)
        mlc_loss = mlc.compute_loss(mlc.model, mlc_batch)
    mode = "train" if mlc.model.training else "eval"
    assert abs(dpo.state.global_step - mlc.state.global_step) == 0
    assert abs(dpo._metrics[mode]["rewards/margins"][-1]) > 1e-3  # a non-trivial DPO loss
    assert abs(mlc_loss.item() - dpo_loss.item()) <= 1e-6

    # The reference model only saw the 2·B preference rows; the policy ran them (fused head) plus the B·m variant
    # rows (in up to two forwards of similar length), for which no vocabulary logits were built
    assert ref_rows == [4]
    assert isinstance(policy_outputs[0], FusedCausalLMOutput)
    assert sum(output.logits.shape[0] for output in policy_outputs[1:]) == 2 * len(LANGUAGES)
    assert all(output.logits.shape[1:] == (0, len(tiny_tokenizer)) for output in policy_outputs[1:])

    # λ = 0 still logs the MLC metrics; with λ > 0 the term is added on top of the unchanged DPO loss
    mlc_term = mlc._metrics[mode]["mlc/loss"][-1]
    assert mlc_term > 0
    mlc.args.mlc_lambda = 0.8
    with torch.no_grad():
        weighted = mlc.compute_loss(mlc.model, mlc_batch)
    assert mlc._metrics[mode]["mlc/loss"][-1] == pytest.approx(mlc_term, abs=1e-6)
    assert weighted.item() == pytest.approx(dpo_loss.item() + 0.8 * mlc_term, abs=1e-5)


def test_qlora_trains_and_resume_restores_the_extractor(tmp_path, tiny_model_dir, tiny_tokenizer):
    dataset = make_dataset()
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )

    def make_trainer(output_dir):
        args = MLCConfig(
            **config_kwargs(output_dir, save_strategy="steps", save_steps=1, precompute_ref_log_probs=True),
            mlc_extractor_learning_rate=5e-3,
        )
        return MLCTrainer(
            model=tiny_model_dir,
            args=args,
            train_dataset=dataset,
            eval_dataset=dataset,
            processing_class=tiny_tokenizer,
            quantization_config=quantization_config,
            peft_config=lora_config(),
        )

    first = make_trainer(tmp_path / "first")
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in first.model.modules())
    # TRL casts the trainable LoRA weights of a quantized model to bf16; the extractor stays fp32
    assert {p.dtype for p in first.model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert first.mlc_extractor.projection.weight.dtype == torch.float32
    lora_before = trainable_snapshot(first)
    # Reference log-probs precomputed and an evaluation loop before training: eval-mode forwards that would repack
    # the 4-bit CPU weights (and silently corrupt the LoRA gradients) without the workaround
    assert "ref_chosen_logps" in first.train_dataset.column_names
    assert "eval_mlc/loss" in first.evaluate()
    first.train()
    assert not is_cpu_repacked(first.model)
    assert first.optimizer.param_groups[-1]["initial_lr"] == 5e-3  # the extractor's own group
    assert any(not torch.equal(before, first.model.get_parameter(name)) for name, before in lora_before.items())
    assert [log["step"] for log in first.state.log_history if "mlc/loss" in log] == [1, 2]

    checkpoint_1, checkpoint_2 = tmp_path / "first" / "checkpoint-1", tmp_path / "first" / "checkpoint-2"
    for checkpoint in (checkpoint_1, checkpoint_2):
        assert (checkpoint / EXTRACTOR_WEIGHTS_NAME).is_file() and (checkpoint / EXTRACTOR_CONFIG_NAME).is_file()
        assert (checkpoint / "adapter_model.safetensors").is_file()
    saved_1 = load_file(str(checkpoint_1 / EXTRACTOR_WEIGHTS_NAME))
    saved_2 = load_file(str(checkpoint_2 / EXTRACTOR_WEIGHTS_NAME))
    for name, tensor in first.mlc_extractor.state_dict().items():
        assert torch.equal(saved_2[name], tensor)
        assert not torch.equal(saved_1[name], saved_2[name])  # the extractor trained

    second = make_trainer(tmp_path / "second")
    seen = {}

    class CaptureResumedState(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            weight = second.mlc_extractor.projection.weight
            seen["extractor"] = {name: t.clone() for name, t in second.mlc_extractor.state_dict().items()}
            seen["exp_avg"] = second.optimizer.state[weight]["exp_avg"].clone()
            seen["step"] = state.global_step

    second.add_callback(CaptureResumedState())
    assert not torch.equal(second.mlc_extractor.projection.weight.detach(), saved_1["projection.weight"])
    second.train(resume_from_checkpoint=str(checkpoint_1))

    assert seen["step"] == 1
    for name, tensor in saved_1.items():
        assert torch.equal(seen["extractor"][name], tensor), f"extractor {name} not restored exactly"
    optimizer_state = torch.load(str(checkpoint_1 / "optimizer.pt"), weights_only=False)
    weight_index = optimizer_state["param_groups"][-1]["params"][0]
    assert torch.equal(seen["exp_avg"], optimizer_state["state"][weight_index]["exp_avg"])
    # One more step from the restored state lands where the uninterrupted run did. Not bit for bit: the bf16 LoRA
    # weights reloaded from the adapter file move the gradients slightly; a fresh Adam state would be off by ~lr
    for name, tensor in saved_2.items():
        torch.testing.assert_close(second.mlc_extractor.state_dict()[name], tensor, rtol=0, atol=1e-4)


def test_options_identity_extractor_schedule_layer_and_rows(tmp_path, tiny_model_dir, tiny_tokenizer):
    args = MLCConfig(
        **config_kwargs(tmp_path, max_steps=3),
        mlc_extractor_dim=0,
        mlc_every=2,
        mlc_layer=-2,
        mlc_include_source_language=False,
    )
    trainer = MLCTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=make_dataset(),
        processing_class=tiny_tokenizer,
        peft_config=lora_config(),
    )
    assert trainer.mlc_languages == ["zh", "sw"]  # English left out: the rows are the two translations
    assert trainer._mlc_layer == 1  # -2 on a 2-layer model: the output of the first decoder layer
    assert list(trainer.mlc_extractor.parameters()) == []
    trainer.train()
    # On at optimizer steps 0 and 2 (logged as steps 1 and 3), off at step 1, as the official `aux_every=2`
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [("mlc/loss" in log) for log in logs] == [True, False, True]
    assert "mlc/cosine_to_zh/sw" in logs[0] and "mlc/cosine_to_en" not in logs[0]
    trainer.save_model(str(tmp_path / "final"))
    assert load_file(str(tmp_path / "final" / EXTRACTOR_WEIGHTS_NAME)) == {}


def test_rows_and_layer_resolution():
    assert mlc_rows(["en", "zh", "sw"], "en", True) == [("en", "prompt_en"), ("zh", "prompt_zh"), ("sw", "prompt_sw")]
    # Without a `prompt_en` column the source row reads `prompt`
    assert mlc_rows(["zh", "sw"], "en", True) == [("en", "prompt"), ("zh", "prompt_zh"), ("sw", "prompt_sw")]
    assert mlc_rows(["sw", "en", "zh"], "en", True)[0] == ("en", "prompt_en")
    with pytest.raises(ValueError, match="at least two prompt variants"):
        mlc_rows(["en", "zh"], "en", False)
    assert [resolve_mlc_layer(k, 28) for k in (None, 28, -1, 12, 0, -29)] == [28, 28, 28, 12, 0, 0]
    with pytest.raises(ValueError, match="mlc_layer=29"):
        resolve_mlc_layer(29, 28)


@pytest.mark.parametrize(
    ("edit", "config", "message"),
    [
        ({"prompt_sw": (1, None)}, {}, r"row 1, column 'prompt_sw': empty text"),
        ({"prompt_zh": (0, "   ")}, {}, r"row 0, column 'prompt_zh': empty text"),
        ({}, {"mlc_languages": ["en", "zh", "bn"]}, r"missing column\(s\) \['prompt_bn'\].*list \['prompt_sw'\]"),
        ({}, {"mlc_layer": 3}, r"mlc_layer=3"),
    ],
)
def test_bad_input_fails_at_preparation(tmp_path, tiny_model_dir, tiny_tokenizer, edit, config, message):
    rows = make_dataset().to_list()
    for column, (index, value) in edit.items():
        rows[index][column] = value
    with pytest.raises(ValueError, match=message):
        MLCTrainer(
            model=tiny_model_dir,
            args=MLCConfig(**config_kwargs(tmp_path), **config),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer,
        )


def test_eval_dataset_languages_must_match_and_drop_policy(tmp_path, tiny_model_dir, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"eval dataset: .*prompt_sw"):
        MLCTrainer(
            model=tiny_model_dir,
            args=MLCConfig(**config_kwargs(tmp_path)),
            train_dataset=make_dataset(),
            eval_dataset=make_dataset(languages=["en", "zh"]),
            processing_class=tiny_tokenizer,
        )
    rows = make_dataset(n=5).to_list()
    rows[3]["prompt_zh"] = None
    trainer = MLCTrainer(
        model=tiny_model_dir,
        args=MLCConfig(**config_kwargs(tmp_path), mlc_missing_language_policy="drop"),
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
    )
    assert len(trainer.train_dataset) == 4
    assert trainer.train_dataset["prompt_zh"] == [rows[i]["prompt_zh"] for i in (0, 1, 2, 4)]
    with pytest.raises(TypeError, match="map-style"):
        MLCTrainer(
            model=tiny_model_dir,
            args=MLCConfig(**config_kwargs(tmp_path)),
            train_dataset=make_dataset().to_iterable_dataset(),
            processing_class=tiny_tokenizer,
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mlc_tau", 0.0, "mlc_tau"),
        ("mlc_lambda", -1.0, "mlc_lambda"),
        ("mlc_every", 0, "mlc_every"),
        ("mlc_extractor_init", "orthogonal", "mlc_extractor_init"),
        ("mlc_missing_language_policy", "skip", "mlc_missing_language_policy"),
        ("mlc_languages", ["en", "xx"], "Unknown language code 'xx' in `mlc_languages`"),
    ],
)
def test_config_validation(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        MLCConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **{field: value})


def test_length_buckets_cut_where_padding_is_least():
    # Six short rows and two long ones: one padded batch holds 8 * 40 positions, two buckets 6 * 6 + 2 * 40
    lengths = [5, 40, 6, 4, 38, 6, 5, 6]
    short, long = length_buckets(lengths)
    assert sorted(short) == [0, 2, 3, 5, 6, 7] and sorted(long) == [1, 4]
    assert length_buckets([7, 7, 7]) == [[0, 1, 2]]  # equal lengths: one forward


def test_variant_states_match_one_forward_per_row(tiny_tokenizer):
    torch.manual_seed(0)
    model = build_tiny_model(tiny_tokenizer).eval()
    lengths = [3, 17, 4, 16, 5, 3]
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(1, model.config.vocab_size, (length,))
        attention_mask[row, :length] = 1
    states = last_prompt_token_states(model, input_ids, attention_mask, layer=1)
    for row, length in enumerate(lengths):
        alone = model(input_ids=input_ids[row : row + 1, :length], output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(states[row], alone[0, -1], atol=1e-5, rtol=1e-5)
