import textwrap

import torch
from transformers import TrainingArguments
from trl import SFTTrainer
from trl.trainer.utils import get_config_model_id

from ..model_card import SafetyModelCardMixin
from ..losses.mlc import cosine_to_first_row, sigma1_share
from ..utils import disable_cpu_4bit_repacking
from .mlc_sft_config import MLCSFTConfig
from .mlc_utils import (
    MLC_INPUT_KEYS,
    MLC_PROMPT_IDS,
    DataCollatorForMLC,
    MLCExtractor,
    MLCExtractorCallback,
    check_mlc_dataset,
    compute_mlc_loss,
    mlc_dataset_languages,
    mlc_rows,
    resolve_mlc_layer,
    tokenize_mlc_prompts,
)


class MLCSFTTrainer(SafetyModelCardMixin, SFTTrainer):
    """
    [`~trl.SFTTrainer`] with the Multi-Lingual Consistency (MLC) loss of [Align Once, Benefit
    Multilingually](https://huggingface.co/papers/2602.16660): `sft_loss + mlc_lambda · L_MLC`, as in the official SFT
    trainer. The SFT loss trains on the English prompt-completion pairs exactly as in [`~trl.SFTTrainer`]; the MLC term
    pushes the representations of the prompt in every language (the hidden state of the last prompt token at layer
    `mlc_layer`, through a trainable linear extractor) towards collinearity. No target-language completions are needed.

    Same constructor as [`~trl.SFTTrainer`]: a TRL SFT script works after three changed lines and one `prompt_<lang>`
    column per language in a prompt-completion dataset:

    ```diff
    - from trl import SFTConfig, SFTTrainer
    + from hf_mlsafety import MLCSFTConfig, MLCSFTTrainer
    - training_args = SFTConfig(output_dir="Qwen2.5-0.5B-SFT")
    + training_args = MLCSFTConfig(output_dir="Qwen2.5-0.5B-MLC-SFT")   # mlc_lambda=0.8, mlc_tau=0.2, ...
    - trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    + trainer = MLCSFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    ```

    ```python
    >>> from hf_mlsafety import MLCSFTConfig, MLCSFTTrainer, load_builtin_dataset

    >>> dataset = load_builtin_dataset("mlc_sft")  # prompt, completion, prompt_en, prompt_zh, ..., prompt_jv
    >>> trainer = MLCSFTTrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct",
    ...     args=MLCSFTConfig(output_dir="Qwen2.5-0.5B-MLC-SFT"),
    ...     train_dataset=dataset,
    ... )
    >>> trainer.train()
    ```

    A plain [`~trl.SFTConfig`] (or [`~transformers.TrainingArguments`]) is also accepted (the MLC options then take
    their defaults). The extractor is saved as `mlc_extractor.safetensors` (+ `mlc_extractor_config.json`) beside the
    model or adapter and in every checkpoint, and restored by `train(resume_from_checkpoint=...)`. Logged metrics:
    `mlc/loss`, `mlc/sigma1_share`, `mlc/cosine_to_<source>` and `mlc/cosine_to_<source>/<lang>`, as in
    [`MLCTrainer`].

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train, as in [`~trl.SFTTrainer`].
        args ([`MLCSFTConfig`], [`~trl.SFTConfig`] or [`~transformers.TrainingArguments`], *optional*):
            Configuration. Other classes are converted to an [`MLCSFTConfig`] with the default MLC options.
        data_collator ([`~transformers.DataCollator`], *optional*):
            Collator for the SFT rows (defaults to TRL's `DataCollatorForLanguageModeling`). It is wrapped to add the
            prompt-variant rows.
        train_dataset ([`~datasets.Dataset`]):
            Prompt-completion data (`prompt`, `completion`, standard or conversational) with one `prompt_<lang>`
            column per language. Every variant is validated before training.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Evaluation data with the same columns.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer, as in [`~trl.SFTTrainer`]. Its chat template renders the prompt variants.
        compute_loss_func (`Callable`, *optional*):
            Deprecated in TRL, passed through; the MLC term is added to its loss.
        compute_metrics (`Callable`, *optional*):
            Passed through to [`~trl.SFTTrainer`].
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Callbacks, as in [`~trl.SFTTrainer`].
        optimizers (`tuple`, *optional*, defaults to `(None, None)`):
            Optimizer and scheduler. The extractor's parameters are added to the optimizer as their own group.
        optimizer_cls_and_kwargs (`tuple`, *optional*):
            Optimizer class and keyword arguments, as in [`~trl.SFTTrainer`].
        preprocess_logits_for_metrics (`Callable`, *optional*):
            Passed through to [`~trl.SFTTrainer`].
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Quantization of a model given by name (QLoRA with `peft_config`).
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration, as in [`~trl.SFTTrainer`].
        formatting_func (`Callable`, *optional*):
            Passed through to [`~trl.SFTTrainer`].
    """

    _tag_names = ["trl", "sft", "hf-mlsafety", "mlc", "multilingual-safety"]
    _name = "MLC-SFT"
    _method_summary = (
        "Supervised fine-tuning on English safe responses, plus the Multi-Lingual Consistency loss that aligns "
        "the model's representations of the same prompt across languages; only the prompts were translated."
    )
    _paper = {
        "title": "Align Once, Benefit Multilingually: Enforcing Multilingual Consistency for LLM Safety Alignment",
        "id": "2602.16660",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{bu2026align,
                title        = {{Align Once, Benefit Multilingually: Enforcing Multilingual Consistency for LLM Safety
                                 Alignment}},
                author       = {Yuyan Bu and Xiaohao Liu and ZhaoXing Ren and Yaodong Yang and Juntao Dai},
                year         = 2026,
                booktitle    = {The Fourteenth International Conference on Learning Representations, {ICLR} 2026},
                eprint       = {arXiv:2602.16660},
            }"""),
    }

    def __init__(
        self,
        model,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
    ):
        # Args
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = MLCSFTConfig(f"{model_name.split('/')[-1]}-MLC-SFT")
        elif isinstance(args, TrainingArguments) and not isinstance(args, MLCSFTConfig):
            # An `SFTConfig` (or `TrainingArguments`) from an existing TRL script: same values, default MLC options
            values = args.to_dict()
            # `to_dict` masks every `*_token` field (`hub_token`, `pad_token`, `eos_token`): keep the real values
            values.update({key: getattr(args, key) for key in values if key.endswith("_token")})
            args = MLCSFTConfig(**values)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
            raise ValueError(
                "MLCSFTTrainer tokenizes the prompt variants while preparing the dataset; `dataset_kwargs="
                "{'skip_prepare_dataset': True}` is not supported."
            )

        # Prompt variants: the languages of the `prompt_<lang>` columns and the column that feeds each matrix row.
        # Needed before `super().__init__`, which prepares the datasets.
        self._mlc_dataset_languages = mlc_dataset_languages(train_dataset, args.mlc_languages)
        self._mlc_rows = mlc_rows(
            self._mlc_dataset_languages, args.mlc_source_language, args.mlc_include_source_language
        )
        self.mlc_languages = [language for language, _ in self._mlc_rows]

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError(
                "MLCSFTTrainer keeps its extractor outside the model, which DeepSpeed and FSDP do not shard or step. "
                "Use DDP (`accelerate launch` / `torchrun`) or a single device."
            )
        # bitsandbytes on CPU: keep 4-bit layers differentiable after eval-mode forwards (evaluation loops)
        disable_cpu_4bit_repacking(self.model)

        # Collator: the parent's batch plus the B·m prompt-variant rows
        self.data_collator = DataCollatorForMLC(
            self.data_collator, pad_token_id=self._tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of
        )

        # Extractor: trainer-owned, float32, its own optimizer group (see `create_optimizer`)
        text_config = self.model.config.get_text_config()
        self._mlc_layer = resolve_mlc_layer(args.mlc_layer, text_config.num_hidden_layers)
        self.mlc_extractor = MLCExtractor(text_config.hidden_size, args.mlc_extractor_dim, args.mlc_extractor_init)
        self.mlc_extractor.to(self.accelerator.device)
        self.add_callback(MLCExtractorCallback(self.mlc_extractor, self.accelerator))

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if MLC_PROMPT_IDS in (dataset.column_names or []):  # already prepared, e.g. passed again to `evaluate`
            return dataset
        # Validate (or drop rows) first, so errors name the rows of the dataset as given
        dataset = check_mlc_dataset(
            dataset, self._mlc_dataset_languages, args.mlc_missing_language_policy, ("completion",), dataset_name
        )
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        columns = [column for _, column in self._mlc_rows]
        return tokenize_mlc_prompts(
            dataset, self._tokenizer, columns, args.max_length, args.dataset_num_proc, dataset_name
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if MLC_PROMPT_IDS not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, MLC_PROMPT_IDS]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        parameters = list(self.mlc_extractor.parameters())
        # Also reached with an optimizer passed by the user or kept from an earlier `train()`: add the group once
        if parameters and not any(parameters[0] is p for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group(
                {
                    "params": parameters,
                    "lr": self.args.mlc_extractor_learning_rate or self.args.learning_rate,
                    "weight_decay": self.args.weight_decay,
                }
            )
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mlc_input_ids, mlc_attention_mask = (inputs[key] for key in MLC_INPUT_KEYS)
        sft_inputs = {key: value for key, value in inputs.items() if key not in MLC_INPUT_KEYS}
        output = super().compute_loss(model, sft_inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self.state.global_step % self.args.mlc_every != 0:
            return output

        loss, outputs = output if return_outputs else (output, None)
        # With `mlc_lambda=0` the term only feeds the metrics: no graph for it
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.args.mlc_lambda > 0):
            mlc_loss, singular_values, features = compute_mlc_loss(
                model,
                self.mlc_extractor,
                mlc_input_ids,
                mlc_attention_mask,
                num_rows=len(self._mlc_rows),
                layer=self._mlc_layer,
                tau=self.args.mlc_tau,
                detach_sigma1=self.args.mlc_detach_sigma1,
            )
        # Like the parent's MoE aux loss: a per-micro-batch mean, while a loss normalised by `num_items_in_batch`
        # already spans the whole accumulation window, so `Trainer` does not divide it by the accumulation steps
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + self.args.mlc_lambda * mlc_loss.to(loss.device) / steps

        # Metrics
        gather = self.accelerator.gather_for_metrics
        self._metrics[mode]["mlc/loss"].append(gather(mlc_loss.detach()).mean().item())
        self._metrics[mode]["mlc/sigma1_share"].append(gather(sigma1_share(singular_values)).mean().item())
        cosines = gather(cosine_to_first_row(features))  # (B, m - 1): each language against the first row
        source = self.mlc_languages[0]
        self._metrics[mode][f"mlc/cosine_to_{source}"].append(cosines.mean().item())
        for index, language in enumerate(self.mlc_languages[1:]):
            self._metrics[mode][f"mlc/cosine_to_{source}/{language}"].append(cosines[:, index].mean().item())
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        # Beside the model or adapter (and so in every checkpoint folder), never inside its weights
        if self.args.should_save:
            self.mlc_extractor.save_pretrained(
                output_dir or self.args.output_dir, layer=self._mlc_layer, languages=self.mlc_languages
            )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.mlc_extractor.load_weights(resume_from_checkpoint)

    def _load_best_model(self):
        super()._load_best_model()
        self.mlc_extractor.load_weights(self.state.best_model_checkpoint)
