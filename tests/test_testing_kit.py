import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_mlsafety.languages import MULTIJAIL_LANGUAGES
from hf_mlsafety.testing import CORPUS, build_tiny_model, build_tiny_tokenizer, main


def test_tokenizer_round_trips_every_language(tiny_tokenizer):
    for language in MULTIJAIL_LANGUAGES:
        for text in CORPUS[language]:
            ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tiny_tokenizer.unk_token_id not in ids
            assert tiny_tokenizer.decode(ids) == text


def test_chat_template_round_trips_in_all_ten_languages(tiny_tokenizer):
    for language in MULTIJAIL_LANGUAGES:
        user, assistant = CORPUS[language][3], CORPUS[language][0]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
        assert text == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>\n"
        ids = tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert tiny_tokenizer.decode(ids) == text
        prompt = tiny_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")


def test_chat_template_marks_only_assistant_tokens(tiny_tokenizer):
    messages = [{"role": "user", "content": CORPUS["sw"][3]}, {"role": "assistant", "content": CORPUS["sw"][0]}]
    out = tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [token for token, keep in zip(out["input_ids"], out["assistant_masks"]) if keep]
    assert tiny_tokenizer.decode(marked) == CORPUS["sw"][0] + "<|im_end|>"


def test_tiny_model_is_small_and_generates(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert 100_000 < model.num_parameters() < 200_000
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": CORPUS["th"][3]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)


def test_build_is_deterministic_and_qwen2_twin_works():
    tokenizer = build_tiny_tokenizer()
    first, second = build_tiny_model(tokenizer), build_tiny_model(tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    qwen = build_tiny_model(tokenizer, model_type="qwen2")
    assert qwen.config.model_type == "qwen2"


def test_command_line_writes_a_reloadable_folder(tmp_path, capsys):
    main([str(tmp_path / "tiny")])
    assert "tiny llama model" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template is not None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
