import copy
import textwrap
from collections import defaultdict
from contextlib import contextmanager

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset
from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import DistillationTrainer
from trl.models import prepare_deepspeed
from trl.trainer.utils import get_config_model_id, pad, use_adapter

from ..model_card import SafetyModelCardMixin
from ..data.formats import text_of, validate_msd_dataset
from ..languages import LANGUAGE_NAMES
from ..losses.msd import msd_loss
from ..utils import disable_cpu_4bit_repacking
from .msd_config import MSDConfig


logger = get_logger(__name__)


def _last_user_text(prompt, column):
    if isinstance(prompt, str):
        return prompt
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError(f"column {column!r}: a conversational prompt must end with a user message.")
    return text_of([prompt[-1]])


def build_teacher_prompt(prompt, prompt_en, language_name, template):
    """The teacher's prompt: `template` filled with the target query, its English version and the language name.

    Args:
        prompt (`str` or `list[dict]`):
            The student's prompt (target-language query), plain text or conversational.
        prompt_en (`str` or `list[dict]`):
            The English version of the query (the text of its last user message when conversational).
        language_name (`str`):
            Display name of the target language.
        template (`str`):
            Template with the placeholders `{query}`, `{query_en}` and `{language_name}`.

    Returns:
        `str` or `list[dict]`: plain text for a plain-text prompt; otherwise the same conversation with the last user
        message's content replaced by the filled template (earlier messages, e.g. a system prompt, are kept).
    """
    text = template.format(
        query=_last_user_text(prompt, "prompt"),
        query_en=_last_user_text(prompt_en, "prompt_en"),
        language_name=language_name,
    )
    if isinstance(prompt, str):
        return text
    return [*prompt[:-1], {"role": "user", "content": text}]


def answer_start(completion_ids, tokenizer, marker):
    """Index of the first completion token after `marker` has been fully written, or `None` when the completion never
    contains it.

    The answer starts at the first token boundary after the marker: when a token spans the end of the marker and the
    start of the answer, that token stays with the reasoning.

    Args:
        completion_ids (`list[int]`):
            Generated token ids.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer used to decode them.
        marker (`str`):
            Text that starts the answer, e.g. `"Answer:"`.
    """

    def contains_marker(length):
        return marker in tokenizer.decode(completion_ids[:length], skip_special_tokens=True)

    if not contains_marker(len(completion_ids)):
        return None
    # Smallest prefix that contains the marker (containment only grows with the prefix): binary search.
    low, high = 1, len(completion_ids)
    while low < high:
        middle = (low + high) // 2
        if contains_marker(middle):
            high = middle
        else:
            low = middle + 1
    return low


class MSDTrainer(SafetyModelCardMixin, DistillationTrainer):
    """
    Trainer for Multilingual Self-Distillation (MSD), introduced in [Multilingual Safety Alignment via
    Self-Distillation](https://huggingface.co/papers/2605.02971).

    The model is its own teacher. The student sees only the target-language query; the teacher is the model frozen at
    its initial weights and sees the query, its English version and an instruction to judge safety in English and
    answer in the target language. The student is trained to match the teacher token by token (per-token reverse KL)
    on a response sampled by the student (`msd_mode="on_policy"`) or by the teacher (`msd_mode="off_policy"`), each
    token weighted by Dual-Perspective Safety Weighting (DPSW). No response data is needed.

    Drop-in for [`~trl.DistillationTrainer`]: the same arguments, an [`MSDConfig`] instead of a
    [`~trl.DistillationConfig`], and a dataset with the columns `prompt` (target-language query, plain text or
    conversational), `prompt_en` (its English version) and `language` (ISO 639-1 code), e.g. from
    [`~hf_mlsafety.data.wide_to_msd`].

    Example:

    ```python
    >>> from hf_mlsafety import MSDConfig, MSDTrainer
    >>> from hf_mlsafety.data import load_builtin_dataset
    >>> from peft import LoraConfig

    >>> dataset = load_builtin_dataset("msd", split="train")
    >>> trainer = MSDTrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct",
    ...     args=MSDConfig(output_dir="msd", msd_mode="on_policy"),
    ...     train_dataset=dataset,
    ...     peft_config=LoraConfig(target_modules="all-linear"),
    ... )
    >>> trainer.train()
    ```

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train, as for [`~trl.DistillationTrainer`]. Its initial weights are the teacher unless
            `teacher_model` is given.
        teacher_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            Teacher to use instead of the initial model (same vocabulary). If `None`: with PEFT, the student with its
            adapter disabled (no second copy of the weights); otherwise a frozen copy of the model taken before
            training.
        args ([`MSDConfig`], *optional*):
            Configuration. If `None`, a default [`MSDConfig`] is used.
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Dataset with the columns `prompt`, `prompt_en` and `language`. A map-style dataset is checked at
            construction; errors name the row and the column.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Evaluation dataset(s) with the same columns.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer. If `None`, loaded from the model's name.
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Callbacks to add to the default ones.
        optimizers (`tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]`, *optional*):
            Optimizer and scheduler; defaults to `(None, None)` (AdamW and the scheduler given by `args`).
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Quantization used when loading `model` from a name or path; combine with `peft_config` for QLoRA. On CPU,
            the trainer turns off bitsandbytes' in-place 4-bit repacking, which would otherwise corrupt the LoRA
            gradients after every generation or teacher forward in eval mode.
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration used to wrap the model.
    """

    # MSD's per-sequence mean is not normalised by a token count over the accumulation window: let `Trainer` divide by
    # the number of accumulation steps.
    loss_is_scaled_for_ga = False

    _tag_names = ["trl", "distillation", "hf-mlsafety", "msd", "multilingual-safety"]
    _name = "MSD"
    _method_summary = (
        "The model is its own teacher: the frozen initial model, shown the English version of each query and "
        "asked to reason about safety, teaches the student (which sees only the target-language query) token by "
        "token with a reverse KL weighted by Dual-Perspective Safety Weighting. No responses in any language were"
        " needed."
    )
    _paper = {
        "title": "Multilingual Safety Alignment via Self-Distillation",
        "id": "2605.02971",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{qin2026multilingual,
                title = {{Multilingual Safety Alignment via Self-Distillation}},
                author = {Ruiyang Qin and Qingzhuo Wang and Dongrui Liu and Qiang Li and Zhihua Wei and Wen Shen},
                year = 2026,
                eprint = {2605.02971},
                archivePrefix = {arXiv},
            }"""),
    }

    def __init__(
        self,
        model: "str | PreTrainedModel",
        teacher_model: str | PreTrainedModel | None = None,
        args: MSDConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = MSDConfig(f"{model_name.split('/')[-1]}-MSD")
        elif not isinstance(args, MSDConfig):
            raise TypeError(
                f"`args` must be an `MSDConfig`, got {type(args).__name__}. Replace `DistillationConfig(...)` with "
                "`MSDConfig(...)`: it takes the same arguments plus the MSD ones."
            )

        # Check the data before loading anything, so that a bad row fails here rather than mid-training.
        self.language_names = {**LANGUAGE_NAMES, **args.language_names}
        to_check = {"train_dataset": train_dataset}
        if isinstance(eval_dataset, dict):
            to_check.update({f"eval_dataset[{key!r}]": value for key, value in eval_dataset.items()})
        else:
            to_check["eval_dataset"] = eval_dataset
        for name, dataset in to_check.items():
            if isinstance(dataset, Dataset):  # an IterableDataset cannot be checked without consuming it
                self._check_dataset(dataset, name, args.teacher_prompt_template)

        super().__init__(
            model=model,
            teacher_model=teacher_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

        # bitsandbytes 4-bit layers on CPU repack their weights on the first eval-mode forward (generation, teacher
        # forward), after which LoRA gradients are silently wrong. Must happen before any such forward.
        disable_cpu_4bit_repacking(self.model)

        vocab_size = self.model.config.get_text_config().vocab_size
        for argument in ("dpsw_topk", "distillation_topk"):
            if getattr(args, argument) > vocab_size:
                raise ValueError(f"`{argument}`={getattr(args, argument)} exceeds the vocabulary size {vocab_size}.")

        # Teacher = the initial model. With PEFT it is the student with the adapter disabled (see `_teacher`);
        # otherwise a frozen copy, taken now, before any update.
        if self.teacher_model is None and not is_peft_model(self.model):
            teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            if self.is_deepspeed_enabled:
                self.teacher_model = prepare_deepspeed(teacher, self.accelerator)
            else:
                self.teacher_model = self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _check_dataset(self, dataset, name, template):
        try:
            validate_msd_dataset(dataset)
        except ValueError as error:
            raise ValueError(f"`{name}`: {error}") from None
        for index, row in enumerate(dataset.select_columns(["prompt", "prompt_en", "language"])):
            try:
                build_teacher_prompt(row["prompt"], row["prompt_en"], self.language_names[row["language"]], template)
            except ValueError as error:
                raise ValueError(f"`{name}`, row {index}, {error}") from None

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "prompt_en", "language"]

    @contextmanager
    def _teacher(self):
        """Yields the teacher module: the given or copied teacher, or (PEFT) the student with its adapter disabled, in
        eval mode so that the initial weights are used without dropout."""
        if self.teacher_model is not None:
            yield self.accelerator.unwrap_model(self.teacher_model).eval()
            return
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            with use_adapter(model, None):
                yield model
        finally:
            model.train(was_training)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if self.args.msd_mode == "on_policy":
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        # Off-policy: the frozen teacher samples, from its own (privileged) prompt.
        device = self.accelerator.device
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(ids) for ids in prompts], padding_value=0, padding_side="left")
        attention_mask = attention_mask.to(device)
        with torch.no_grad(), self._teacher() as teacher:
            output = teacher.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
            )
        completions = output[:, input_ids.size(1) :].tolist()
        # Keep each completion up to and including its first end-of-sequence token.
        for completion in completions:
            ends = [position for position, token in enumerate(completion) if token in self.eos_token_ids]
            if ends:
                del completion[ends[0] + 1 :]
        return completions

    def _strip_teacher_reasoning(self, teacher_prompt_ids, completion_ids):
        """Moves the reasoning before the answer marker from the completion into the teacher's context."""
        mode = "train" if self.model.training else "eval"
        new_teacher_prompt_ids, new_completion_ids, missing = [], [], 0
        for prompt, completion in zip(teacher_prompt_ids, completion_ids, strict=True):
            start = answer_start(completion, self._tokenizer, self.args.answer_marker)
            if start is None:
                missing += 1
                start = 0
            new_teacher_prompt_ids.append(prompt + completion[:start])
            new_completion_ids.append(completion[start:])
        counts = self.accelerator.gather(torch.tensor([missing, len(completion_ids)], device=self.accelerator.device))
        counts = counts.view(-1, 2).sum(0)
        self._metrics[mode]["msd/answer_marker_missing"].append((counts[0] / counts[1]).item())
        if missing:
            logger.warning_once(
                f"Some teacher completions do not contain the answer marker {self.args.answer_marker!r}; they are "
                "trained on whole, reasoning included (see the `msd/answer_marker_missing` metric)."
            )
        return new_teacher_prompt_ids, new_completion_ids

    def _pad(self, sequences, padding_side):
        tensors = [torch.tensor(ids, dtype=torch.long) for ids in sequences]
        ids = pad(tensors, self._tokenizer.pad_token_id, padding_side, self.pad_to_multiple_of)
        mask = pad([torch.ones_like(t) for t in tensors], 0, padding_side, self.pad_to_multiple_of)
        if ids.size(1) == 0:  # every answer span empty: keep one masked column so positions stay well defined
            ids = ids.new_full((len(sequences), 1), self._tokenizer.pad_token_id)
            mask = mask.new_zeros(len(sequences), 1)
        return ids.to(self.accelerator.device), mask.to(self.accelerator.device)

    def _generate_and_score_completions(self, inputs):
        prompts = [example["prompt"] for example in inputs]
        languages = [example["language"] for example in inputs]
        teacher_prompts = [
            build_teacher_prompt(
                example["prompt"],
                example["prompt_en"],
                self.language_names[example["language"]],
                self.args.teacher_prompt_template,
            )
            for example in inputs
        ]

        if self.args.msd_mode == "on_policy":
            prompt_ids, completion_ids, _, _, _ = self._generate(prompts)
            teacher_prompt_ids, _, _ = self._tokenize_prompts(teacher_prompts)
        else:
            teacher_prompt_ids, completion_ids, _, _, _ = self._generate(teacher_prompts)
            prompt_ids, _, _ = self._tokenize_prompts(prompts)
            if self.args.strip_teacher_reasoning:
                teacher_prompt_ids, completion_ids = self._strip_teacher_reasoning(teacher_prompt_ids, completion_ids)

        if self.log_completions:
            self._logs["prompt"].extend(gather_object(self.processing_class.batch_decode(prompt_ids)))
            self._logs["completion"].extend(
                gather_object(self.processing_class.batch_decode(completion_ids, skip_special_tokens=True))
            )

        # Prompts left-padded, completions right-padded: student and teacher logits are then aligned on the response
        # positions by slicing from the end (`_completion_logits`), whatever the lengths of the two prompts.
        prompt_ids, prompt_mask = self._pad(prompt_ids, "left")
        teacher_prompt_ids, teacher_prompt_mask = self._pad(teacher_prompt_ids, "left")
        completion_ids, completion_mask = self._pad(completion_ids, "right")
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "teacher_prompt_ids": teacher_prompt_ids,
            "teacher_prompt_mask": teacher_prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "language": languages,
        }

    def _completion_logits(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """Logits of the positions that predict the completion tokens, `(B, L, V)` with L the completion length."""
        length = completion_ids.size(1)
        model_inputs = {
            "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
            "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
            "use_cache": False,
        }
        if "logits_to_keep" in self.model_kwarg_keys:
            model_inputs["logits_to_keep"] = length + 1  # the last position predicts past the completion
        logits = model(**model_inputs).logits
        return logits[:, :-1][:, -length:]

    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        student_logits = self._completion_logits(
            model, inputs["prompt_ids"], inputs["prompt_mask"], completion_ids, completion_mask
        )
        with torch.no_grad(), self._teacher() as teacher:
            teacher_logits = self._completion_logits(
                teacher, inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"], completion_ids, completion_mask
            )
        temperature = self.args.loss_temperature
        return msd_loss(
            student_logits / temperature,
            teacher_logits.to(student_logits.device) / temperature,
            completion_ids,
            completion_mask,
            divergence=self.args.divergence,
            distillation_topk=self.args.distillation_topk,
            use_dpsw=self.args.use_dpsw,
            dpsw_topk=self.args.dpsw_topk,
            dpsw_y_star=self.args.dpsw_y_star,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Route the student forward through the DDP/FSDP wrapper (see `DistillationTrainer.compute_loss`).
        unwrapped = self.accelerator.unwrap_model(model)
        output = self._forward_redirection(model, unwrapped, self._compute_loss, unwrapped, inputs)
        self._log_loss_metrics(inputs, output)
        return (output.loss, None) if return_outputs else output.loss

    def _log_loss_metrics(self, inputs, output):
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"].float()
        kl = output.per_token_kl.detach() * mask
        totals = torch.stack(
            [kl.sum(), (output.teacher_weight * mask).sum(), (output.student_weight * mask).sum(), mask.sum()]
        )
        totals = self.accelerator.gather(totals.unsqueeze(0)).sum(0)
        if totals[3] > 0:
            self._metrics[mode]["msd/kl"].append((totals[0] / totals[3]).item())
            self._metrics[mode]["msd/dpsw_teacher_weight"].append((totals[1] / totals[3]).item())
            self._metrics[mode]["msd/dpsw_student_weight"].append((totals[2] / totals[3]).item())

        # Per language: token-averaged KL and mean number of trained response tokens per sequence.
        per_sequence = zip(inputs["language"], kl.sum(-1).tolist(), mask.sum(-1).tolist(), strict=True)
        per_language = defaultdict(lambda: [0.0, 0.0, 0])
        for language, kl_sum, length in gather_object(list(per_sequence)):
            per_language[language][0] += kl_sum
            per_language[language][1] += length
            per_language[language][2] += 1
        for language, (kl_sum, tokens, sequences) in sorted(per_language.items()):
            if tokens > 0:
                self._metrics[mode][f"msd/kl_{language}"].append(kl_sum / tokens)
            self._metrics[mode][f"msd/completion_length_{language}"].append(tokens / sequences)
