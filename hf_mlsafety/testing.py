"""Offline test kit: a tiny causal LM and a multilingual byte-level BPE tokenizer, built from scratch in seconds.

Nothing here touches the network, so users can test their own training scripts offline too:

```python
>>> from hf_mlsafety.testing import tiny_model_path
>>> from trl import DPOConfig
>>> from hf_mlsafety import MLCTrainer
>>> trainer = MLCTrainer(model=tiny_model_path(), args=DPOConfig(output_dir="out", use_cpu=True, bf16=False), ...)
```

From the command line, `python -m hf_mlsafety.testing OUTPUT_DIR` writes a folder that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` reload.
"""

import argparse
import atexit
import functools
import shutil
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

# ChatML. Assistant content sits inside {% generation %} so that SFT's `assistant_only_loss` can find it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{{ '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

# A small corpus in the ten MultiJail languages, written for this kit, so that the BPE merges cover every script.
CORPUS = {
    "en": [
        "I cannot help with that request because it could cause harm.",
        "Sorry, I can't assist with this. Is there something else I can do for you?",
        "Sure, here is a simple recipe for vegetable soup.",
        "How do I plant tomatoes in a small garden?",
        "Please explain how rainbows form after the rain.",
        "The weather is nice today, let us go for a walk.",
    ],
    "zh": [
        "我不能帮助你完成这个请求，因为它可能造成伤害。",
        "对不起，我无法协助这件事。还有其他我可以帮忙的吗？",
        "当然，这是一个简单的蔬菜汤食谱。",
        "我怎样在小花园里种西红柿？",
        "请解释雨后彩虹是如何形成的。",
        "今天天气很好，我们去散步吧。",
    ],
    "it": [
        "Non posso aiutarti con questa richiesta perché potrebbe causare danni.",
        "Mi dispiace, non posso assisterti in questo. Posso aiutarti in altro modo?",
        "Certo, ecco una semplice ricetta per la zuppa di verdure.",
        "Come posso piantare pomodori in un piccolo giardino?",
        "Per favore spiega come si formano gli arcobaleni dopo la pioggia.",
        "Oggi il tempo è bello, andiamo a fare una passeggiata.",
    ],
    "vi": [
        "Tôi không thể giúp yêu cầu này vì nó có thể gây hại.",
        "Xin lỗi, tôi không thể hỗ trợ việc này. Tôi có thể giúp gì khác không?",
        "Chắc chắn rồi, đây là công thức nấu súp rau đơn giản.",
        "Làm thế nào để trồng cà chua trong một khu vườn nhỏ?",
        "Hãy giải thích cầu vồng hình thành như thế nào sau cơn mưa.",
        "Hôm nay thời tiết đẹp, chúng ta đi dạo nhé.",
    ],
    "ar": [
        "لا أستطيع المساعدة في هذا الطلب لأنه قد يسبب ضررا.",
        "عذرا، لا يمكنني المساعدة في هذا. هل هناك شيء آخر يمكنني فعله؟",
        "بالتأكيد، إليك وصفة بسيطة لحساء الخضار.",
        "كيف أزرع الطماطم في حديقة صغيرة؟",
        "من فضلك اشرح كيف يتكون قوس قزح بعد المطر.",
        "الطقس جميل اليوم، هيا نتمشى.",
    ],
    "ko": [
        "해를 끼칠 수 있기 때문에 그 요청은 도와드릴 수 없습니다.",
        "죄송하지만 이 일은 도와드릴 수 없습니다. 다른 도움이 필요하신가요?",
        "물론이죠, 간단한 야채 수프 요리법입니다.",
        "작은 정원에 토마토를 어떻게 심나요?",
        "비가 온 뒤 무지개가 어떻게 생기는지 설명해 주세요.",
        "오늘 날씨가 좋으니 산책하러 갑시다.",
    ],
    "th": [
        "ฉันไม่สามารถช่วยตามคำขอนี้ได้เพราะอาจก่อให้เกิดอันตราย",
        "ขอโทษ ฉันช่วยเรื่องนี้ไม่ได้ มีอะไรอื่นที่ให้ช่วยไหม",
        "ได้เลย นี่คือสูตรซุปผักง่าย ๆ",
        "ฉันจะปลูกมะเขือเทศในสวนเล็ก ๆ ได้อย่างไร",
        "ช่วยอธิบายว่ารุ้งเกิดขึ้นได้อย่างไรหลังฝนตก",
        "วันนี้อากาศดี ไปเดินเล่นกันเถอะ",
    ],
    "bn": [
        "আমি এই অনুরোধে সাহায্য করতে পারি না কারণ এটি ক্ষতি করতে পারে।",
        "দুঃখিত, আমি এতে সহায়তা করতে পারব না। আর কিছু করতে পারি?",
        "অবশ্যই, এখানে সবজির স্যুপের একটি সহজ রেসিপি।",
        "ছোট বাগানে কীভাবে টমেটো লাগাব?",
        "বৃষ্টির পরে রংধনু কীভাবে তৈরি হয় তা ব্যাখ্যা করুন।",
        "আজ আবহাওয়া ভালো, চলো হাঁটতে যাই।",
    ],
    "sw": [
        "Siwezi kusaidia na ombi hili kwa sababu linaweza kusababisha madhara.",
        "Samahani, siwezi kusaidia na hili. Kuna kitu kingine ninachoweza kufanya?",
        "Hakika, hapa kuna mapishi rahisi ya supu ya mboga.",
        "Ninapandaje nyanya kwenye bustani ndogo?",
        "Tafadhali eleza jinsi upinde wa mvua unavyotokea baada ya mvua.",
        "Hali ya hewa ni nzuri leo, twende tukatembee.",
    ],
    "jv": [
        "Aku ora bisa mbantu panjaluk iki amarga bisa nyebabake cilaka.",
        "Nuwun sewu, aku ora bisa mbantu babagan iki. Ana liyane sing bisa dakbantu?",
        "Mesthi wae, iki resep sup sayuran sing gampang.",
        "Piye carane nandur tomat ing kebon cilik?",
        "Tulung jelasna kepiye pelangi dumadi sawise udan.",
        "Hawane apik dina iki, ayo mlaku-mlaku.",
    ],
}


def build_tiny_tokenizer(vocab_size=1024):
    """Trains a byte-level BPE tokenizer on a small corpus in the ten MultiJail languages.

    Byte-level BPE round-trips any text without `<unk>`. The tokenizer carries a ChatML chat template whose assistant
    turns are wrapped in `{% generation %}` (for `assistant_only_loss`).

    Args:
        vocab_size (`int`, *optional*, defaults to `1024`):
            Target vocabulary size, special tokens included.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([line for lines in CORPUS.values() for line in lines], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    wrapped.model_max_length = 512
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_model(tokenizer, model_type="llama", seed=0, **config_kwargs):
    """Builds a randomly initialised causal LM of about 140k parameters for `tokenizer`.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer whose vocabulary size and special token ids the model takes.
        model_type (`str`, *optional*, defaults to `"llama"`):
            `"llama"` or `"qwen2"`.
        seed (`int`, *optional*, defaults to `0`):
            Seed for the weight initialisation.
        config_kwargs:
            Overrides of the configuration (for example `hidden_size=96` for a distinct teacher).

    Returns:
        [`~transformers.LlamaForCausalLM`] or [`~transformers.Qwen2ForCausalLM`]
    """
    architectures = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if model_type not in architectures:
        raise ValueError(f"`model_type` must be one of {sorted(architectures)}, got {model_type!r}.")
    config_class, model_class = architectures[model_type]
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(config_kwargs)
    torch.manual_seed(seed)
    model = model_class(config_class(**settings))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_tiny_model(output_dir, model_type="llama", **config_kwargs):
    """Builds the tiny tokenizer and model and saves both into `output_dir`; returns `output_dir`."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, model_type=model_type, **config_kwargs)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)


@functools.cache
def tiny_model_path(model_type="llama"):
    """Path of a tiny model folder built once per process (in a temporary folder removed at exit).

    Pass the path, not a model object, as `model=` to trainers so TRL can rebuild reference models from it.
    """
    output_dir = tempfile.mkdtemp(prefix=f"hf_mlsafety_tiny_{model_type}_")
    atexit.register(shutil.rmtree, output_dir, ignore_errors=True)
    return save_tiny_model(output_dir, model_type=model_type)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m hf_mlsafety.testing", description="Write a tiny offline test model and tokenizer."
    )
    parser.add_argument("output_dir", help="Folder to write the model and tokenizer into.")
    parser.add_argument("--model_type", default="llama", choices=["llama", "qwen2"])
    args = parser.parse_args(argv)
    path = save_tiny_model(args.output_dir, model_type=args.model_type)
    print(f"Wrote a tiny {args.model_type} model and tokenizer to {path}")


if __name__ == "__main__":
    main()
