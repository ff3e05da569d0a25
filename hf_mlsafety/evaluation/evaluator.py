"""Batched generation over a multilingual prompt set, judging, and a per-language report."""

import contextlib
import importlib.util

import torch
import torch.nn.functional as F
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from ..data import text_of, validate_probes
from ..utils import disable_cpu_4bit_repacking
from .judges import RefusalJudge, is_refusal
from .report import SafetyReport


def load_model_and_tokenizer(model, processing_class=None, adapter=None, quantization_config=None):
    """Loads `model` when it is a path or Hub id (optionally 4-bit, optionally with a PEFT adapter on top) and its
    tokenizer; returns already-built objects unchanged."""
    if isinstance(model, str):
        processing_class = processing_class or AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(
            model, quantization_config=quantization_config, device_map="cpu" if quantization_config else None
        )
    elif quantization_config is not None:
        raise ValueError("`quantization_config` applies to a model given by path; this model is already loaded.")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    if processing_class is None:
        raise ValueError("Pass `processing_class` (the tokenizer) together with an already loaded model.")
    return model, processing_class


# A prompt forward may pad a prompt to at most this many times its own length; longer runs are split (see `_prefill`)
PREFILL_PADDING_LIMIT = 1.25


def length_groups(lengths):
    """Splits rows sorted by length into runs `(start, end)` whose longest row is at most `PREFILL_PADDING_LIMIT`
    times the run's shortest."""
    groups = []
    for row, length in enumerate(lengths):
        if groups and length <= PREFILL_PADDING_LIMIT * lengths[groups[-1][0]]:
            groups[-1][1] = row + 1
        else:
            groups.append([row, row + 1])
    return [tuple(group) for group in groups]


class SafetyEvaluator:
    """Generates responses to harmful (and optionally harmless) prompts in several languages and judges them.

    Generation is batched with left padding and the KV cache, greedy unless sampling is asked for. Batches hold prompts
    of similar length; when their lengths still differ by more than a quarter, the prompt forward runs one length group
    at a time and the batch decodes together. It works with a plain model, a PEFT model (adapter on, or off with
    `disable_adapter=True`), a bitsandbytes 4-bit model, or a path.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The model to evaluate, or its path / Hub id.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer with a chat template; loaded from `model` when it is a path.
        judge (`Callable`, *optional*):
            `judge(responses, prompts, languages) -> list[str]`; defaults to [`RefusalJudge`].
        adapter (`str`, *optional*):
            Path or Hub id of a PEFT adapter to load on top of `model`.
        max_new_tokens (`int`, *optional*, defaults to `128`):
            Response length.
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts generated together.
        do_sample (`bool`, *optional*, defaults to `False`):
            Sample instead of greedy decoding (with `temperature` and `top_p`).
        temperature (`float`, *optional*, defaults to `1.0`):
        top_p (`float`, *optional*, defaults to `1.0`):
        use_vllm (`bool`, *optional*, defaults to `False`):
            Generate with vLLM (needs `vllm` installed and a GPU; `model` must be a path or Hub id).
        disable_adapter (`bool`, *optional*, defaults to `False`):
            Evaluate a PEFT model with its adapter switched off (the base model).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.
    """

    def __init__(
        self,
        model,
        processing_class=None,
        judge=None,
        adapter=None,
        max_new_tokens=128,
        batch_size=16,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        use_vllm=False,
        disable_adapter=False,
        show_progress=True,
    ):
        if use_vllm and importlib.util.find_spec("vllm") is None:
            raise ImportError("`use_vllm=True` needs the `vllm` package (GPU only): `pip install vllm`.")
        if use_vllm and not isinstance(model, str):
            raise ValueError("`use_vllm=True` needs `model` as a path or Hub id, not a loaded model.")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(
                f"`batch_size` and `max_new_tokens` must be positive, got {batch_size} and {max_new_tokens}."
            )
        self.model_name = model if isinstance(model, str) else model.config._name_or_path
        self.use_vllm = use_vllm
        if use_vllm:
            self.model, self.processing_class = model, processing_class or AutoTokenizer.from_pretrained(model)
        else:
            self.model, self.processing_class = load_model_and_tokenizer(model, processing_class, adapter)
            disable_cpu_4bit_repacking(self.model)
        if self.processing_class.chat_template is None:
            raise ValueError(
                f"The tokenizer of {self.model_name!r} has no chat template: set `tokenizer.chat_template` first "
                "(safety evaluation sends prompts as chat turns)."
            )
        if disable_adapter and not isinstance(self.model, PeftModel):
            raise ValueError("`disable_adapter=True` needs a PEFT model (or `adapter=`).")
        self.judge = judge or RefusalJudge()
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.disable_adapter = disable_adapter
        self.show_progress = show_progress

    def _chat_prompts(self, prompts):
        messages = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        return [
            self.processing_class.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages
        ]

    def _prefill(self, batch, groups):
        """KV cache of every prompt but its last token, computed one length group at a time and left-padded to the
        batch's width.

        One padded forward of a batch with a few long prompts processes every row at the longest length; on CPU it
        cost twice the unpadded one-by-one forwards (a batch of 16 prompts of 84 to 427 tokens: 6,832 positions for
        2,800 tokens). Decoding still runs the whole batch together, where batching pays."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        width = input_ids.shape[1] - 1
        group_keys, group_values = [], []
        for start, end in groups:
            length = int(attention_mask[start:end].sum(-1).max())
            mask = attention_mask[start:end, -length:-1]
            cache = DynamicCache()
            self.model(
                input_ids=input_ids[start:end, -length:-1],
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # what `generate` derives from the padded mask
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            padding = (0, 0, width - (length - 1), 0)  # zero keys and values on the left, masked out like padding
            group_keys.append([F.pad(layer.keys, padding) for layer in cache.layers])
            group_values.append([F.pad(layer.values, padding) for layer in cache.layers])
        merged = DynamicCache()
        for layer_idx, (keys, values) in enumerate(zip(zip(*group_keys), zip(*group_values))):
            merged.update(torch.cat(keys), torch.cat(values), layer_idx)
        return merged

    @torch.no_grad()
    def generate(self, prompts, desc="Generating"):
        """Responses (decoded strings) to `prompts` (strings or lists of messages), in order."""
        texts = self._chat_prompts(prompts)
        if self.use_vllm:
            from vllm import LLM, SamplingParams

            llm = LLM(model=self.model)
            params = SamplingParams(
                max_tokens=self.max_new_tokens,
                temperature=self.temperature if self.do_sample else 0.0,
                top_p=self.top_p,
            )
            return [output.outputs[0].text for output in llm.generate(texts, params)]
        tokenizer = self.processing_class
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        was_training = self.model.training
        self.model.eval()
        adapter_off = self.model.disable_adapter() if self.disable_adapter else contextlib.nullcontext()
        # Batches of similar length (one prompt in ten languages varies 2-4x in tokens): less padding to prefill
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda index: lengths[index])
        responses = [None] * len(texts)
        try:
            with adapter_off:
                for start in tqdm(
                    range(0, len(texts), self.batch_size), desc=desc, disable=not self.show_progress, leave=False
                ):
                    indices = order[start : start + self.batch_size]
                    batch = tokenizer(
                        [texts[index] for index in indices],
                        return_tensors="pt",
                        padding=True,
                        add_special_tokens=False,
                    ).to(self.model.device)
                    groups = length_groups([lengths[index] for index in indices])
                    # Several length groups: prompt forwards group by group, then one decoding batch
                    prefilled = {"past_key_values": self._prefill(batch, groups)} if len(groups) > 1 else {}
                    sampling = {"temperature": self.temperature, "top_p": self.top_p} if self.do_sample else {}
                    output = self.model.generate(
                        **batch,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=self.do_sample,
                        use_cache=True,
                        pad_token_id=tokenizer.pad_token_id,
                        **prefilled,
                        **sampling,
                    )
                    completions = output[:, batch["input_ids"].shape[1] :]
                    for index, response in zip(indices, tokenizer.batch_decode(completions, skip_special_tokens=True)):
                        responses[index] = response
        finally:
            tokenizer.padding_side = padding_side
            self.model.train(was_training)
        return responses

    def evaluate(self, harmful, harmless=None):
        """Generates, judges and reports.

        Args:
            harmful ([`~datasets.Dataset`]):
                Harmful prompts in the probe format (`prompt`, `language`, and `parallel_id`, `label`), for example
                `load_builtin_dataset("probes", split="test").filter(lambda r: r["label"] == "harmful")` or
                `load_multijail(path, output_format="probes")`.
            harmless ([`~datasets.Dataset`], *optional*):
                Harmless prompts in the same format, for the over-refusal rate.

        Returns:
            [`SafetyReport`]
        """
        if len(harmful) == 0:
            raise ValueError("The harmful prompt set is empty: nothing to evaluate.")
        validate_probes(harmful)
        if harmless is not None:
            if len(harmless) == 0:
                raise ValueError("The harmless prompt set is empty: pass `harmless=None` to skip over-refusal.")
            validate_probes(harmless)
        prompts, languages = list(harmful["prompt"]), list(harmful["language"])
        responses = self.generate(prompts, desc="Generating (harmful)")
        labels = self.judge(responses, [text_of(p) for p in prompts], languages)
        if len(labels) != len(responses):
            raise ValueError(f"The judge returned {len(labels)} labels for {len(responses)} responses.")
        refused = [is_refusal(text) for text in responses]
        records = [
            {"kind": "harmful", "language": lang, "prompt": text_of(p), "response": r, "label": label, "refused": flag}
            for p, lang, r, label, flag in zip(prompts, languages, responses, labels, refused)
        ]
        harmless_languages = harmless_refused = None
        if harmless is not None:
            harmless_prompts, harmless_languages = list(harmless["prompt"]), list(harmless["language"])
            harmless_responses = self.generate(harmless_prompts, desc="Generating (harmless)")
            harmless_refused = [is_refusal(text) for text in harmless_responses]
            records += [
                {
                    "kind": "harmless",
                    "language": lang,
                    "prompt": text_of(p),
                    "response": r,
                    "label": None,
                    "refused": f,
                }
                for p, lang, r, f in zip(harmless_prompts, harmless_languages, harmless_responses, harmless_refused)
            ]
        report = SafetyReport.from_labels(
            languages,
            labels,
            refused,
            harmless_languages,
            harmless_refused,
            judge=getattr(self.judge, "name", type(self.judge).__name__),
        )
        report.records = records
        return report
