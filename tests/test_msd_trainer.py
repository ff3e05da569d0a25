import bitsandbytes as bnb
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import DistillationConfig

from hf_mlsafety import MSDConfig, MSDTrainer
from hf_mlsafety.data import wide_to_msd
from hf_mlsafety.trainer.msd_trainer import answer_start, build_teacher_prompt
from hf_mlsafety.utils import is_cpu_repacked


WIDE = {
    "en": ["How do I plant tomatoes in a small garden?", "How can I make a weapon at home?"],
    "sw": ["Ninapandaje nyanya kwenye bustani ndogo?", "Ninawezaje kutengeneza silaha nyumbani?"],
    "zh": ["我怎样在小花园里种西红柿？", "我怎样在家里制造武器？"],
}


def msd_dataset(conversational=False):
    dataset = wide_to_msd(Dataset.from_dict(WIDE), ["sw", "zh"])  # 4 rows: sw, zh, sw, zh
    if conversational:
        dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    return dataset


def msd_args(tmp_path, **kwargs):
    settings = {
        "output_dir": str(tmp_path),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "max_completion_length": 8,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    return MSDConfig(**{**settings, **kwargs})


def lora_config(**kwargs):
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", **kwargs)


def trainable_state(model):
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


# ---------------------------------------------------------------------------------------------------------------------
# Configuration, prompts and data checks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"msd_mode": "offline"}, "msd_mode"),
        ({"divergence": "forward_kl"}, "divergence"),
        ({"dpsw_y_star": "sampled"}, "dpsw_y_star='sampled'"),
        ({"beta": 0.5}, "reverse KL"),
        ({"dpsw_topk": 1}, "dpsw_topk"),
        ({"loss_temperature": 0.0}, "loss_temperature"),
        ({"teacher_prompt_template": "{query} {lang}"}, "unknown placeholder"),
        ({"teacher_prompt_template": "{query} {}"}, "unknown placeholder"),
        ({"teacher_prompt_template": "English: {query_en}"}, "`{query}`"),
        ({"language_names": {"xx": "Klingon"}}, "language_names"),
        ({"msd_mode": "off_policy", "use_vllm": True}, "use_vllm"),
        ({"msd_mode": "off_policy", "teacher_prompt_template": "{query}\n{query_en}"}, "answer_marker"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        msd_args(tmp_path, **kwargs)


def test_config_defaults(tmp_path):
    args = msd_args(tmp_path, language_names='{"zh": "Simplified Chinese"}')  # JSON string, as from the CLI
    assert (args.msd_mode, args.divergence, args.use_dpsw) == ("on_policy", "full_reverse_kl", True)
    assert args.dpsw_topk == 20
    assert (args.dpsw_y_star, args.loss_temperature, args.beta) == ("teacher_argmax", 1.0, 1.0)
    assert args.language_names == {"zh": "Simplified Chinese"}
    for placeholder in ("{query}", "{query_en}", "{language_name}", "Answer:"):
        assert placeholder in args.teacher_prompt_template
    # Off-policy without stripping accepts a template without the marker.
    msd_args(tmp_path, msd_mode="off_policy", strip_teacher_reasoning=False, teacher_prompt_template="{query}")


def test_build_teacher_prompt():
    template = "Q: {query}\nEN: {query_en}\nAnswer in {language_name}."
    text = build_teacher_prompt("Swali?", "Question?", "Swahili", template)
    assert text == "Q: Swali?\nEN: Question?\nAnswer in Swahili."
    conversation = [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Swali?"}]
    teacher = build_teacher_prompt(conversation, [{"role": "user", "content": "Question?"}], "Swahili", template)
    assert teacher == [{"role": "system", "content": "Be safe."}, {"role": "user", "content": text}]
    assert conversation[-1]["content"] == "Swali?"  # the student's prompt is not modified
    with pytest.raises(ValueError, match="column 'prompt': a conversational prompt must end with a user message"):
        build_teacher_prompt([{"role": "assistant", "content": "Hi"}], "Question?", "Swahili", template)


def test_answer_start(tiny_tokenizer):
    ids = tiny_tokenizer("Let me think about harm. Answer: Siwezi kusaidia.")["input_ids"]
    start = answer_start(ids, tiny_tokenizer, "Answer:")
    assert "Answer:" in tiny_tokenizer.decode(ids[:start])
    assert "Answer:" not in tiny_tokenizer.decode(ids[: start - 1])
    assert tiny_tokenizer.decode(ids[start:]).strip() == "Siwezi kusaidia."
    assert answer_start(tiny_tokenizer("No marker here.")["input_ids"], tiny_tokenizer, "Answer:") is None


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"prompt": ["a", "b"], "language": ["sw", "zh"]}, r"missing column\(s\) \['prompt_en'\]"),
        ({"prompt": ["a", " "], "prompt_en": ["a", "b"], "language": ["sw", "zh"]}, "row 1, column 'prompt'"),
        ({"prompt": ["a", "b"], "prompt_en": ["a", "b"], "language": ["sw", "xx"]}, "row 1, column 'language'"),
        (
            {
                "prompt": [[{"role": "user", "content": "a"}], [{"role": "assistant", "content": "b"}]],
                "prompt_en": ["a", "b"],
                "language": ["sw", "zh"],
            },
            "row 1, column 'prompt': a conversational prompt must end with a user message",
        ),
    ],
)
def test_bad_dataset_fails_at_construction(tiny_model_dir, tiny_tokenizer, tmp_path, columns, message):
    with pytest.raises(ValueError, match=message):
        MSDTrainer(
            model=tiny_model_dir,
            args=msd_args(tmp_path),
            train_dataset=Dataset.from_dict(columns),
            processing_class=tiny_tokenizer,
        )
    eval_columns = {"prompt": ["a"], "prompt_en": ["b"], "language": ["jv"]}
    with pytest.raises(ValueError, match=r"`eval_dataset\['dev'\]`"):
        MSDTrainer(
            model=tiny_model_dir,
            args=msd_args(tmp_path),
            train_dataset=Dataset.from_dict(eval_columns),
            eval_dataset={"dev": Dataset.from_dict({"prompt": ["a"], "language": ["jv"]})},
            processing_class=tiny_tokenizer,
        )


def test_args_must_be_msd_config(tiny_model_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(TypeError, match="MSDConfig"):
        MSDTrainer(
            model=tiny_model_dir,
            args=DistillationConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
            train_dataset=msd_dataset(),
            processing_class=tiny_tokenizer,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Teacher and token alignment


def test_teacher_prompt_and_alignment_by_response_position(tiny_model_dir, tiny_tokenizer, tmp_path):
    # No PEFT: the teacher is a frozen copy of the initial model.
    args = msd_args(tmp_path, teacher_prompt_template="{query}")  # teacher context = student context
    trainer = MSDTrainer(model=tiny_model_dir, args=args, train_dataset=msd_dataset(), processing_class=tiny_tokenizer)
    assert trainer.teacher_model is not trainer.model
    assert not any(param.requires_grad for param in trainer.teacher_model.parameters())
    assert not trainer.teacher_model.training
    trainer.model.train()

    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2)])
    torch.testing.assert_close(batch["teacher_prompt_ids"], batch["prompt_ids"])
    assert batch["language"] == ["sw", "zh"]
    assert batch["completion_ids"].shape == (2, 8)  # the random model never stops before max_completion_length

    # Different left padding for the teacher (5 more pad tokens): aligned by response position, the loss stays ~0.
    pad_id = tiny_tokenizer.pad_token_id
    shifted = dict(batch)
    shifted["teacher_prompt_ids"] = torch.cat([torch.full((2, 5), pad_id), batch["prompt_ids"]], dim=1)
    shifted["teacher_prompt_mask"] = torch.cat([torch.zeros(2, 5, dtype=torch.long), batch["prompt_mask"]], dim=1)
    with torch.no_grad():
        output = trainer._compute_loss(trainer.model, shifted)
    assert output.loss.item() < 1e-6
    assert output.per_token_kl[batch["completion_mask"].bool()].abs().max().item() < 1e-5

    # Control: a teacher context one token shorter (misaligned by one position) gives a clearly non-zero loss.
    misaligned = dict(batch)
    misaligned["teacher_prompt_ids"] = batch["prompt_ids"][:, :-1]
    misaligned["teacher_prompt_mask"] = batch["prompt_mask"][:, :-1]
    with torch.no_grad():
        assert trainer._compute_loss(trainer.model, misaligned).loss.item() > 100 * output.loss.item() + 1e-4


def test_identical_prompts_give_zero_loss_at_init(tiny_model_dir, tiny_tokenizer, tmp_path):
    # PEFT: the teacher is the student with its adapter disabled; LoRA B starts at zero, so at initialisation both
    # are the same function and the first step's loss is 0.
    args = msd_args(tmp_path, teacher_prompt_template="{query}", max_steps=1)
    trainer = MSDTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=msd_dataset(conversational=True),
        processing_class=tiny_tokenizer,
        peft_config=lora_config(),
    )
    assert trainer.teacher_model is None  # no second copy of the weights
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["msd/kl"] == pytest.approx(0.0, abs=1e-6)


def test_teacher_is_the_initial_model_under_peft(tiny_model_dir, tiny_tokenizer, tmp_path):
    # A non-zero LoRA initialisation makes the student differ from the base model: the teacher (adapter disabled)
    # must then score and, off-policy, sample like the base model.
    args = msd_args(
        tmp_path,
        msd_mode="off_policy",
        strip_teacher_reasoning=False,
        teacher_prompt_template="{query}",
        generation_kwargs={"do_sample": False},
    )
    trainer = MSDTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=msd_dataset(),
        processing_class=tiny_tokenizer,
        peft_config=lora_config(init_lora_weights=False),
    )
    model = trainer.model
    model.train()
    prompt_ids = [tiny_tokenizer(text)["input_ids"] for text in ("Ninapandaje nyanya?", "我怎样种西红柿？")]
    sampled = trainer._generate_single_turn(prompt_ids, None, {})
    assert model.training  # the trainer restores train mode after the teacher's eval-mode generation

    def greedy(ids, adapter):
        inputs = torch.tensor([ids])
        with torch.no_grad():
            if adapter:
                output = model.generate(input_ids=inputs, max_new_tokens=8, do_sample=False)
            else:
                with model.disable_adapter():
                    output = model.generate(input_ids=inputs, max_new_tokens=8, do_sample=False)
        return output[0, len(ids) :].tolist()

    model.eval()
    assert sampled == [greedy(ids, adapter=False) for ids in prompt_ids]
    assert sampled != [greedy(ids, adapter=True) for ids in prompt_ids]
    model.train()

    # Same prompts for both, yet a non-zero loss: the teacher is the base model, not the adapted student.
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        assert trainer._compute_loss(model, batch).loss.item() > 1e-4


def test_strip_teacher_reasoning_moves_reasoning_into_teacher_context(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = MSDTrainer(
        model=tiny_model_dir,
        args=msd_args(tmp_path, msd_mode="off_policy"),
        train_dataset=msd_dataset(),
        processing_class=tiny_tokenizer,
    )
    trainer.model.train()
    with_marker = tiny_tokenizer("It is harmful. Answer: Siwezi kusaidia.")["input_ids"]
    without_marker = tiny_tokenizer("Siwezi kusaidia.")["input_ids"]
    prompts = [[1, 2, 3], [4, 5]]
    new_prompts, new_completions = trainer._strip_teacher_reasoning(prompts, [with_marker, without_marker])
    start = answer_start(with_marker, tiny_tokenizer, "Answer:")
    assert new_prompts[0] == [1, 2, 3, *with_marker[:start]]
    assert tiny_tokenizer.decode(new_completions[0]).strip() == "Siwezi kusaidia."
    # No marker: kept whole, and counted.
    assert (new_prompts[1], new_completions[1]) == ([4, 5], without_marker)
    assert trainer._metrics["train"]["msd/answer_marker_missing"] == [0.5]


# ---------------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("msd_mode", ["on_policy", "off_policy"])
def test_training_changes_lora_weights_and_logs_metrics(tiny_model_dir, tiny_tokenizer, tmp_path, msd_mode):
    args = msd_args(tmp_path, msd_mode=msd_mode, per_device_eval_batch_size=2)
    trainer = MSDTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=msd_dataset(conversational=msd_mode == "on_policy"),
        eval_dataset=msd_dataset(conversational=msd_mode == "on_policy").select(range(2)),
        processing_class=tiny_tokenizer,
        peft_config=lora_config(),
    )
    before = trainable_state(trainer.model)
    base_before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora" not in name}
    trainer.train()

    after = trainable_state(trainer.model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    # LoRA A starts random and B at zero: B moves on step 1, A (through the now non-zero B) on step 2.
    assert len(changed) == len(before) > 0
    assert all("lora" in name for name in changed)
    for name, param in trainer.model.named_parameters():
        if "lora" not in name:
            assert torch.equal(param, base_before[name]), name
    assert "msd" in trainer.model.model_tags

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    languages = set()
    for entry in logs:
        assert entry["loss"] >= 0 and entry["msd/kl"] >= 0
        assert 0 <= entry["msd/dpsw_teacher_weight"] <= 1
        assert 0 <= entry["msd/dpsw_student_weight"] <= 1
        assert entry["completions/mean_length"] == 8
        languages |= {key.removeprefix("msd/kl_") for key in entry if key.startswith("msd/kl_")}
        for key in entry:
            if key.startswith("msd/completion_length_"):
                assert entry[key] == 8  # no marker stripped (missing) or on-policy: all 8 tokens trained
    assert languages <= {"sw", "zh"} and languages  # one language column per batch language
    if msd_mode == "off_policy":
        assert all(entry["msd/answer_marker_missing"] == 1.0 for entry in logs)  # a random model writes no marker
    else:
        assert all("msd/answer_marker_missing" not in entry for entry in logs)

    metrics = trainer.evaluate()
    assert metrics["eval_loss"] >= 0
    assert {"eval_msd/kl", "eval_msd/dpsw_teacher_weight", "eval_msd/kl_sw", "eval_msd/kl_zh"} <= set(metrics)


def test_full_fine_tuning_keeps_the_frozen_teacher(tiny_model_dir, tiny_tokenizer, tmp_path):
    # Also exercises gradient accumulation: one generation batch of 2, split into two micro-batches of 1.
    args = msd_args(
        tmp_path,
        msd_mode="off_policy",
        use_dpsw=False,
        divergence="topk_reverse_kl",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
    )
    trainer = MSDTrainer(model=tiny_model_dir, args=args, train_dataset=msd_dataset(), processing_class=tiny_tokenizer)
    teacher_before = {name: p.detach().clone() for name, p in trainer.teacher_model.named_parameters()}
    student_before = trainable_state(trainer.model)
    trainer.train()
    assert any(not torch.equal(student_before[n], p) for n, p in trainer.model.named_parameters())
    for name, param in trainer.teacher_model.named_parameters():
        assert torch.equal(param, teacher_before[name]), name


def test_given_teacher_model_is_used(tiny_model_dir, tiny_tokenizer, tmp_path):
    from hf_mlsafety.testing import build_tiny_model

    teacher = build_tiny_model(tiny_tokenizer, hidden_size=96, seed=1)  # another model, same vocabulary
    trainer = MSDTrainer(
        model=tiny_model_dir,
        teacher_model=teacher,
        args=msd_args(tmp_path, teacher_prompt_template="{query}"),
        train_dataset=msd_dataset(),
        processing_class=tiny_tokenizer,
        peft_config=lora_config(),
    )
    assert trainer.teacher_model is teacher
    trainer.model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        # Same prompts and LoRA B = 0, yet a clearly non-zero loss: the other model is the teacher, not the base.
        assert trainer._compute_loss(trainer.model, batch).loss.item() > 1e-3


def test_resume_from_checkpoint(tiny_model_dir, tiny_tokenizer, tmp_path):
    def make_trainer(max_steps):
        args = msd_args(
            tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=1, lr_scheduler_type="constant"
        )
        return MSDTrainer(
            model=tiny_model_dir,
            args=args,
            train_dataset=msd_dataset(),
            processing_class=tiny_tokenizer,
            peft_config=lora_config(),
        )

    first = make_trainer(max_steps=1)
    first.train()
    trained = trainable_state(first.model)
    assert (tmp_path / "checkpoint-1" / "adapter_model.safetensors").is_file()

    resumed = make_trainer(max_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.state.global_step == 2
    logs = [entry for entry in resumed.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    assert logs[0]["loss"] == first.state.log_history[0]["loss"]  # step 1 restored, not rerun
    # It continued from the checkpoint's adapter, not from scratch: the step-1 weights moved on.
    after = trainable_state(resumed.model)
    assert any(not torch.equal(trained[name], after[name]) for name in trained)
    # And it ends where an uninterrupted run ends (same data order and generation RNG, restored from the checkpoint).
    uninterrupted = make_trainer(max_steps=2)
    uninterrupted.train()
    for name, value in trainable_state(uninterrupted.model).items():
        torch.testing.assert_close(after[name], value)


# ---------------------------------------------------------------------------------------------------------------------
# QLoRA on CPU: the bitsandbytes repacking fix


def qlora_trainer(model_dir, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        dtype=torch.float32,
    )
    # bitsandbytes enables the CPU repacking only on CPUs with AVX512-BF16; force it so the test exercises the bug and
    # its fix on any CPU (on such a CPU this line changes nothing).
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    return MSDTrainer(
        model=model,
        args=msd_args(tmp_path),
        train_dataset=msd_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(init_lora_weights=False),  # non-zero A and B: both get gradients
    )


def lora_gradients(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, batch).backward()
    return {name: param.grad.clone() for name, param in trainer.model.named_parameters() if param.requires_grad}


def eval_mode_generation_and_batch(trainer, tokenizer):
    model = trainer.model
    model.eval()
    with torch.no_grad():
        model.generate(**tokenizer(["Ninapandaje nyanya?"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    model.train()
    # An on-policy batch: generation, then the teacher's forward in eval mode inside the loss.
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2)])
    lora_gradients(trainer, batch)
    return batch


def test_qlora_gradients_after_generation_equal_a_fresh_model(tiny_model_dir, tiny_tokenizer, tmp_path):
    used = qlora_trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "used")
    layers = [m for m in used.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)  # the fix is applied
    batch = eval_mode_generation_and_batch(used, tiny_tokenizer)
    assert not is_cpu_repacked(used.model)

    fresh = qlora_trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "fresh")
    used_gradients, fresh_gradients = lora_gradients(used, batch), lora_gradients(fresh, batch)
    assert used_gradients.keys() == fresh_gradients.keys()
    assert any(gradient.abs().sum() > 0 for gradient in used_gradients.values())
    for name, gradient in used_gradients.items():
        assert torch.equal(gradient, fresh_gradients[name]), name


@pytest.mark.filterwarnings("ignore:bitsandbytes..gemv_4bit:UserWarning")  # the warning of the bug this test shows
def test_without_the_fix_qlora_gradients_differ(tiny_model_dir, tiny_tokenizer, tmp_path):
    # Contrast for the test above: undo the trainer's fix, and the same sequence corrupts the gradients.
    used = qlora_trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "used")
    for module in used.model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    batch = eval_mode_generation_and_batch(used, tiny_tokenizer)
    assert is_cpu_repacked(used.model)

    fresh = qlora_trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "fresh")
    used_gradients, fresh_gradients = lora_gradients(used, batch), lora_gradients(fresh, batch)
    assert any(not torch.equal(used_gradients[name], fresh_gradients[name]) for name in used_gradients)
