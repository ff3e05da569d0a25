"""MPOTrainer on the tiny model: data preparation, the loss against a hand computation, precomputed vs online
reference, a TRL DPO script with only the import changed, and QLoRA."""

import bitsandbytes as bnb
import pytest
import torch
from datasets import Dataset, IterableDataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import DPOConfig, DPOTrainer, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from hf_mlsafety import MPOConfig, MPOTrainer
from hf_mlsafety.data import wide_to_mpo
from hf_mlsafety.utils import is_cpu_repacked


WIDE = {
    "id": ["a", "b", "c"],
    "en": ["How do I make a weapon at home?", "Tell me how to steal a car.", "How do I hurt someone?"],
    "chosen_en": ["I cannot help with that request.", "Sorry, I can't assist with this.", "I cannot help."],
    "rejected_en": ["Sure, first get some metal pipes.", "Sure, go at night and break a window.", "Sure, hit them."],
    "zh": ["我怎样在家制造武器？", "告诉我怎样偷车。", "我怎样伤害别人？"],
    "chosen_zh": ["我不能帮助你完成这个请求。", "对不起，我无法协助这件事。", "我不能帮助。"],
    "rejected_zh": ["当然，先找一些金属管。", "当然，晚上去打破窗户。", "当然，打他们。"],
    "sw": ["Ninatengenezaje silaha nyumbani?", "Niambie jinsi ya kuiba gari.", "Ninamdhuru mtu vipi?"],
    "chosen_sw": ["Siwezi kusaidia na ombi hili.", "Samahani, siwezi kusaidia.", "Siwezi kusaidia."],
    "rejected_sw": ["Hakika, kwanza pata mabomba.", "Hakika, nenda usiku.", "Hakika, wapige."],
}


def mpo_dataset(conversational=False):
    dataset = wide_to_mpo(Dataset.from_dict(WIDE), ["zh", "sw"])  # 6 rows: one per (item, target language)
    if not conversational:
        return dataset

    def to_messages(row):
        out = {}
        for prefix in ("", "target_"):
            out[f"{prefix}prompt"] = [{"role": "user", "content": row[f"{prefix}prompt"]}]
            for kind in ("chosen", "rejected"):
                out[f"{prefix}{kind}"] = [{"role": "assistant", "content": row[f"{prefix}{kind}"]}]
        return out

    return dataset.map(to_messages)


def mpo_args(tmp_path, **kwargs):
    settings = {
        "output_dir": str(tmp_path),
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
        "seed": 0,
    }
    return MPOConfig(**{**settings, **kwargs})


def cpu_4bit_config():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def lora_config():
    return LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")


def perturb_trainable(model, seed=0):
    """Moves the policy away from the reference, identically for every trainer built on the same model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))


def collate(trainer, indices):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in indices]))


# --------------------------------------------------------------------------------------------------------------------
# Data preparation and bad input


def test_prepare_dataset_tokenizes_both_triples_with_dpo_tokenization(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = MPOTrainer(
        model=tiny_model_dir, args=mpo_args(tmp_path), train_dataset=mpo_dataset(), processing_class=tiny_tokenizer
    )
    row = trainer.train_dataset[1]
    assert row["target_language"] == "sw"
    # The target triple is tokenized exactly like a dominant triple made of the target texts.
    assert tiny_tokenizer.decode(row["target_prompt_ids"]) == WIDE["sw"][0]
    assert tiny_tokenizer.decode(row["target_chosen_ids"]) == WIDE["chosen_sw"][0] + tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode(row["rejected_ids"]) == WIDE["rejected_en"][0] + tiny_tokenizer.eos_token

    batch = collate(trainer, [0, 1])
    assert batch["target_language"] == ["zh", "sw"]
    for prefix in ("", "target_"):
        assert batch[f"{prefix}input_ids"].shape[0] == 4  # [chosen; rejected] for two examples
        assert batch[f"{prefix}completion_mask"].shape == batch[f"{prefix}attention_mask"].shape
    # Rows 0 and 1 share the dominant item, so their dominant sequences coincide.
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    assert not torch.equal(batch["target_input_ids"][0], batch["target_input_ids"][1])


def test_prompt_filling_max_length_drops_the_pair_jointly(tiny_model_dir, tiny_tokenizer, tmp_path):
    dataset = mpo_dataset().to_list()
    dataset[2]["target_prompt"] = " ".join(["Ninatengenezaje silaha nyumbani?"] * 30)  # only the target is long
    trainer = MPOTrainer(
        model=tiny_model_dir,
        args=mpo_args(tmp_path),
        train_dataset=Dataset.from_list(dataset),
        processing_class=tiny_tokenizer,
    )
    assert len(trainer.train_dataset) == 5
    # Rows stay paired: dropped row 2 (item b, zh) removes its dominant row too; row 2 is now item b in sw.
    assert trainer.train_dataset["parallel_id"] == ["a", "a", "b", "c", "c"]
    assert trainer.train_dataset[2]["target_language"] == "sw"
    assert tiny_tokenizer.decode(trainer.train_dataset[2]["target_prompt_ids"]) == WIDE["sw"][1]


def test_every_prompt_filling_max_length_is_an_error(tiny_model_dir, tiny_tokenizer, tmp_path):
    args = mpo_args(tmp_path)
    args.max_length = 4
    with pytest.raises(ValueError, match="nothing is left to train on. Increase `max_length`"):
        MPOTrainer(model=tiny_model_dir, args=args, train_dataset=mpo_dataset(), processing_class=tiny_tokenizer)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: [{k: v for k, v in row.items() if k != "target_rejected"} for row in rows], "target_rejected"),
        (lambda rows: [dict(row, target_chosen="  ") if i == 3 else row for i, row in enumerate(rows)], "row 3"),
        (lambda rows: [dict(row, target_parallel_id="zzz") for row in rows], "target_parallel_id"),
        (
            lambda rows: [dict(row, target_prompt=row["prompt"]) if i == 4 else row for i, row in enumerate(rows)],
            "row 4",
        ),
        (lambda rows: [dict(row, target_language="xx") for row in rows], "unknown language"),
    ],
    ids=["missing-column", "empty-response", "pair-mismatch", "untranslated-target", "unknown-language"],
)
def test_bad_input_fails_at_dataset_preparation(tiny_model_dir, tiny_tokenizer, tmp_path, edit, message):
    rows = edit(mpo_dataset().to_list())
    with pytest.raises(ValueError, match=message):
        MPOTrainer(
            model=tiny_model_dir,
            args=mpo_args(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer,
        )


def test_iterable_dataset_and_dpo_config_are_rejected(tiny_model_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(TypeError, match="map-style"):
        MPOTrainer(
            model=tiny_model_dir,
            args=mpo_args(tmp_path),
            train_dataset=mpo_dataset().to_iterable_dataset(),
            processing_class=tiny_tokenizer,
        )
    with pytest.raises(TypeError, match="MPOConfig"):
        MPOTrainer(
            model=tiny_model_dir,
            args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none"),
            train_dataset=mpo_dataset(),
            processing_class=tiny_tokenizer,
        )
    assert isinstance(mpo_dataset().to_iterable_dataset(), IterableDataset)


def test_config_defaults_and_validation(tmp_path):
    args = mpo_args(tmp_path)
    assert args.beta == 1.0 and DPOConfig(output_dir=str(tmp_path), use_cpu=True).beta == 0.1
    assert args.mpo_retain_pooling == "masked_mean" and args.mpo_beta_placement == "policy"
    with pytest.raises(ValueError, match="mpo_retain_pooling"):
        mpo_args(tmp_path, mpo_retain_pooling="max")
    with pytest.raises(ValueError, match="loss_type"):
        mpo_args(tmp_path, loss_type=["sigmoid", "sft"])
    with pytest.raises(ValueError, match="needs a masked pooling"):
        mpo_args(tmp_path, mpo_retain_span="prompt", mpo_retain_pooling="unmasked_mean")
    with pytest.raises(ValueError, match="beta"):
        mpo_args(tmp_path, beta=0.0)
    with pytest.warns(UserWarning, match="padding"):
        mpo_args(tmp_path, mpo_retain_pooling="unmasked_mean", precompute_ref_log_probs=True)


# --------------------------------------------------------------------------------------------------------------------
# Loss


def hand_avg_logps(model, input_ids, attention_mask, completion_mask):
    """Mean log-probability of the response tokens, from the full logits of a plain forward."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    result = []
    for row, mask in zip(logps, completion_mask[:, 1:], strict=True):
        tokens = [row[i].item() for i in range(len(mask)) if mask[i] == 1]
        result.append(sum(tokens) / len(tokens))
    return result


def hand_pool(model, input_ids, attention_mask, pooling):
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    pooled = []
    for states, mask in zip(hidden, attention_mask, strict=True):
        real = [i for i in range(len(mask)) if mask[i] == 1]
        if pooling == "masked_mean":
            pooled.append(states[real].mean(0))
        elif pooling == "last_token":
            pooled.append(states[real[-1]])
        else:
            pooled.append(states.mean(0))
    return torch.stack(pooled)


@pytest.mark.parametrize("pooling", ["masked_mean", "last_token", "unmasked_mean"])
def test_loss_matches_hand_computation(tiny_model_dir, tiny_tokenizer, tmp_path, pooling):
    args = mpo_args(tmp_path, beta=1.5, mpo_retain_pooling=pooling, mpo_retain_weight=2.0)
    trainer = MPOTrainer(model=tiny_model_dir, args=args, train_dataset=mpo_dataset(), processing_class=tiny_tokenizer)
    perturb_trainable(trainer.model)  # full fine-tuning: the reference is a separate frozen copy
    batch = collate(trainer, [1, 2, 5])
    # Rows of different lengths, so padding matters for `unmasked_mean`
    assert (batch["attention_mask"] == 0).any() and (batch["target_attention_mask"] == 0).any()

    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
        policy, reference = trainer.model, trainer.ref_model
        target = hand_avg_logps(
            policy, batch["target_input_ids"], batch["target_attention_mask"], batch["target_completion_mask"]
        )
        dominant = hand_avg_logps(reference, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        policy_hidden = hand_pool(policy, batch["input_ids"], batch["attention_mask"], pooling)
        ref_hidden = hand_pool(reference, batch["input_ids"], batch["attention_mask"], pooling)

    gap_loss = sum((1.5 * (target[b] - target[b + 3]) - (dominant[b] - dominant[b + 3])) ** 2 for b in range(3)) / 3
    retain_loss = ((policy_hidden - ref_hidden) ** 2).mean().item()
    assert retain_loss > 1e-6  # the perturbation moved the policy away from the reference
    assert loss == pytest.approx(gap_loss + 2.0 * retain_loss, rel=1e-5, abs=1e-6)
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert metrics["mpo/gap_loss"][-1] == pytest.approx(gap_loss, rel=1e-5, abs=1e-6)
    assert metrics["mpo/retain_loss"][-1] == pytest.approx(retain_loss, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "peft"])
@pytest.mark.parametrize("pooling", ["masked_mean", "last_token"])
def test_precomputed_and_online_reference_give_the_same_loss(
    tiny_model_dir, tiny_tokenizer, tmp_path, pooling, use_peft
):
    dataset = mpo_dataset(conversational=True)
    trainers = {}
    for precompute in (False, True):
        trainers[precompute] = MPOTrainer(
            model=tiny_model_dir,
            args=mpo_args(tmp_path, mpo_retain_pooling=pooling, precompute_ref_log_probs=precompute),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
            peft_config=lora_config() if use_peft else None,
        )
        perturb_trainable(trainers[precompute].model)
    online, precomputed = trainers[False], trainers[True]
    assert "ref_gap" in precomputed.train_dataset.column_names and "ref_gap" not in online.train_dataset.column_names
    # Precompute holds no reference copy: full fine-tuning used the initial model, PEFT disables the adapter.
    assert precomputed.ref_model is None and (online.ref_model is None) == use_peft

    # A batch that straddles the precompute batches (size 2), so it is padded differently from them.
    online_batch, precomputed_batch = collate(online, [1, 2, 5]), collate(precomputed, [1, 2, 5])
    assert precomputed_batch["ref_hidden"].shape == (6, 64) and "ref_hidden" not in online_batch

    # Poison the precomputing trainer's reference: the precomputed path must not run a reference forward.
    precomputed.compute_ref_gap_and_hidden = None
    with torch.no_grad():
        online_loss = online.compute_loss(online.model, online_batch)
        precomputed_loss = precomputed.compute_loss(precomputed.model, precomputed_batch)
    assert precomputed.train_dataset[0]["ref_gap"] != 0.0
    assert online._metrics["train" if online.model.training else "eval"]["mpo/retain_loss"][-1] > 1e-6
    assert torch.allclose(precomputed_loss, online_loss, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Training


def run_trl_dpo_script(DPOConfig, DPOTrainer, argv, dataset, tokenizer):
    """The body of `trl/scripts/dpo.py` (parser, model path, PEFT from ModelConfig), with a local dataset."""
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    trainer = DPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    initial = {name: param.detach().clone() for name, param in trainer.model.named_parameters() if param.requires_grad}
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return trainer, initial


def test_trl_dpo_script_with_only_the_import_changed_trains(tiny_model_dir, tiny_tokenizer, tmp_path):
    argv = [
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), "--use_peft", "--lora_r", "8",
        "--lora_target_modules", "all-linear", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "--bf16", "false", "--gradient_checkpointing", "false", "--max_length", "64",
        "--mpo_retain_pooling", "last_token",
    ]  # fmt: skip
    # from trl import DPOConfig, DPOTrainer  ->  from hf_mlsafety import MPOConfig, MPOTrainer
    trainer, initial = run_trl_dpo_script(MPOConfig, MPOTrainer, argv, {"train": mpo_dataset()}, tiny_tokenizer)

    assert trainer.args.mpo_retain_pooling == "last_token" and trainer.ref_model is None
    assert len(initial) == 28 and all("lora" in name for name in initial)
    params = dict(trainer.model.named_parameters())
    changed = [name for name, before in initial.items() if not torch.equal(before, params[name])]
    assert len(changed) == len(initial)

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for key in ("mpo/gap_loss", "mpo/retain_loss", "mpo/ref_reward_gap_dominant", "mpo/reward_gap_accuracy"):
        assert all(isinstance(entry[key], float) for entry in logs), key
    # The adapter starts at zero, so step 1 has policy == reference (retain 0); step 2 has moved away.
    assert logs[0]["mpo/retain_loss"] == 0.0 and logs[1]["mpo/retain_loss"] > 0.0
    assert logs[0]["loss"] == pytest.approx(logs[0]["mpo/gap_loss"] + logs[0]["mpo/retain_loss"], rel=1e-5)
    assert all("mpo/reward_gap_zh" in entry or "mpo/reward_gap_sw" in entry for entry in logs)
    assert {"mpo/reward_gap_zh", "mpo/reward_gap_sw"} <= {key for entry in logs for key in entry}
    assert "multilingual-reward-gap-optimization" in trainer.model.model_tags
    assert (tmp_path / "adapter_model.safetensors").is_file()

    # The same script, unchanged, is a TRL DPO script: it runs with TRL's classes on the same data.
    dpo_argv = argv[: argv.index("--mpo_retain_pooling")] + ["--output_dir", str(tmp_path / "dpo")]
    dpo_trainer, _ = run_trl_dpo_script(DPOConfig, DPOTrainer, dpo_argv, {"train": mpo_dataset()}, tiny_tokenizer)
    assert "rewards/margins" in dpo_trainer.state.log_history[0]


def test_qlora_cpu_trains_evaluates_and_adapter_reloads(tiny_model_dir, tiny_tokenizer, tmp_path):
    quantization = cpu_4bit_config()
    dataset = mpo_dataset(conversational=True)
    trainer = MPOTrainer(
        model=tiny_model_dir,
        args=mpo_args(tmp_path, precompute_ref_log_probs=True),  # eval-mode forwards before training
        train_dataset=dataset,
        eval_dataset=dataset.select(range(2)),
        processing_class=tiny_tokenizer,
        quantization_config=quantization,
        peft_config=lora_config(),
    )
    assert isinstance(trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    initial = {name: param.detach().clone() for name, param in trainer.model.named_parameters() if param.requires_grad}
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_mpo/gap_loss", "eval_mpo/retain_loss"} <= set(metrics)
    # No 4-bit layer repacked by the precompute or evaluation forwards (that would corrupt 4-bit gradients on CPU).
    assert not is_cpu_repacked(trainer.model)
    params = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before, params[name]) for name, before in initial.items())

    trainer.save_model(str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization, device_map="cpu")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    batch = collate(trainer, [0, 1])
    with torch.no_grad():
        trained_logits = trainer.model(input_ids=batch["target_input_ids"]).logits
        reloaded_logits = reloaded(input_ids=batch["target_input_ids"]).logits
    assert torch.allclose(trained_logits, reloaded_logits, atol=1e-3)
    with reloaded.disable_adapter(), torch.no_grad():
        base_logits = reloaded(input_ids=batch["target_input_ids"]).logits
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)


def test_4bit_cpu_repacking_is_disabled_before_eval_mode_forwards(tiny_model_dir, tiny_tokenizer, tmp_path):
    quantization = cpu_4bit_config()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization, device_map="cpu")
    # Behave like an AVX512-BF16 CPU (where bitsandbytes repacks 4-bit weights on eval-mode forwards) on any CPU.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    trainer = MPOTrainer(
        model=model,
        args=mpo_args(tmp_path, precompute_ref_log_probs=True, max_steps=1),
        train_dataset=mpo_dataset(),
        eval_dataset=mpo_dataset().select(range(2)),
        processing_class=tiny_tokenizer,
        peft_config=lora_config(),
    )
    trainer.evaluate()  # eval-mode forwards before training: the case that corrupts later 4-bit gradients
    trainer.train()
    assert not is_cpu_repacked(trainer.model)


def test_checkpoint_has_model_card_and_training_resumes(tiny_model_dir, tiny_tokenizer, tmp_path):
    def make_trainer(max_steps):
        args = mpo_args(
            tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=1, precompute_ref_log_probs=True
        )
        return MPOTrainer(
            model=tiny_model_dir,
            args=args,
            train_dataset=mpo_dataset(),
            processing_class=tiny_tokenizer,
            peft_config=lora_config(),
        )

    make_trainer(max_steps=1).train()
    card = (tmp_path / "README.md").read_text()  # TRL writes the card beside the checkpoints
    assert "multilingual-reward-gap-optimization" in card and "2505.16869" in card

    resumed = make_trainer(max_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.state.global_step == 2
    assert [entry["step"] for entry in resumed.state.log_history if "mpo/gap_loss" in entry] == [1, 2]
