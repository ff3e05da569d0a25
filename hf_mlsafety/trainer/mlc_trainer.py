import textwrap

import torch
from trl import DPOTrainer
from trl.trainer.utils import get_config_model_id

from ..model_card import SafetyModelCardMixin
from ..losses.mlc import cosine_to_first_row, sigma1_share
from ..utils import disable_cpu_4bit_repacking
from .mlc_config import MLCConfig
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


class MLCTrainer(SafetyModelCardMixin, DPOTrainer):
    """
    [`~trl.DPOTrainer`] with the Multi-Lingual Consistency (MLC) loss of [Align Once, Benefit
    Multilingually](https://huggingface.co/papers/2602.16660): safety aligned in English transfers to other languages
    using only translated prompts (no target-language responses).

    For each example, the prompt in every language is chat-templated with the generation prompt and run through the
    policy; the hidden state of the last prompt token at layer `mlc_layer` goes through a trainable linear extractor;
    the L2-normalised rows of the resulting m×d matrix are pushed towards rank 1 (collinear) with a cross-entropy over
    their singular values. The DPO loss (any `loss_type`) is computed on the English pair exactly as in
    [`~trl.DPOTrainer`], and `mlc_lambda · L_MLC` is added. The reference model never sees the prompt variants, and
    their forward builds no vocabulary logits.

    Same constructor as [`~trl.DPOTrainer`]: a TRL DPO script works after three changed lines and one `prompt_<lang>`
    column per language in the dataset:

    ```diff
    - from trl import DPOConfig, DPOTrainer
    + from hf_mlsafety import MLCConfig, MLCTrainer
    - training_args = DPOConfig(output_dir="Qwen2.5-0.5B-DPO")
    + training_args = MLCConfig(output_dir="Qwen2.5-0.5B-MLC")   # mlc_lambda=0.8, mlc_tau=0.2, ...
    - trainer = DPOTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    + trainer = MLCTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    ```

    ```python
    >>> from hf_mlsafety import MLCConfig, MLCTrainer, load_builtin_dataset

    >>> dataset = load_builtin_dataset("mlc")  # prompt, chosen, rejected, prompt_en, prompt_zh, ..., prompt_jv
    >>> trainer = MLCTrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct", args=MLCConfig(output_dir="Qwen2.5-0.5B-MLC"), train_dataset=dataset
    ... )
    >>> trainer.train()
    ```

    A plain [`~trl.DPOConfig`] is also accepted (the MLC options then take their defaults). The extractor is saved as
    `mlc_extractor.safetensors` (+ `mlc_extractor_config.json`) beside the model or adapter and in every checkpoint,
    and restored by `train(resume_from_checkpoint=...)`. Logged metrics: `mlc/loss`, `mlc/sigma1_share`
    (σ₁² / Σσ², 1 = collinear), `mlc/cosine_to_<source>` (mean cosine of the other languages' vectors with the source
    language's) and `mlc/cosine_to_<source>/<lang>`.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train, as in [`~trl.DPOTrainer`].
        ref_model ([`~transformers.PreTrainedModel`], *optional*):
            Reference model, as in [`~trl.DPOTrainer`].
        args ([`MLCConfig`] or [`~trl.DPOConfig`], *optional*):
            Configuration. A [`~trl.DPOConfig`] is converted to an [`MLCConfig`] with the default MLC options.
        data_collator ([`~transformers.DataCollator`], *optional*):
            Collator for the preference rows (defaults to TRL's `DataCollatorForPreference`). It is wrapped to add the
            prompt-variant rows.
        train_dataset ([`~datasets.Dataset`]):
            Preference data (`prompt`, `chosen`, `rejected`, standard or conversational) with one `prompt_<lang>`
            column per language. Every variant is validated before training.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Evaluation data with the same columns.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer, as in [`~trl.DPOTrainer`]. Its chat template renders the prompt variants.
        compute_metrics (`Callable`, *optional*):
            Deprecated in TRL, passed through.
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Callbacks, as in [`~trl.DPOTrainer`].
        optimizers (`tuple`, *optional*, defaults to `(None, None)`):
            Optimizer and scheduler, as in [`~trl.DPOTrainer`]. The extractor's parameters are added to the optimizer
            as their own parameter group.
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Quantization of a model given by name (QLoRA with `peft_config`).
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration, as in [`~trl.DPOTrainer`].
    """

    _tag_names = ["trl", "dpo", "hf-mlsafety", "mlc", "multilingual-safety"]
    _name = "MLC"
    _method_summary = (
        "English preference pairs train the DPO objective while the Multi-Lingual Consistency loss pulls the "
        "model's representations of the same prompt in every language onto one direction (rank one), so English "
        "refusal behaviour carries over to the other languages; only the prompts were translated."
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
        ref_model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        # Args
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = MLCConfig(f"{model_name.split('/')[-1]}-MLC")
        elif not isinstance(args, MLCConfig):
            # A `DPOConfig` from an existing TRL script: same values, default MLC options
            values = args.to_dict()
            # `to_dict` masks every `*_token` field (`hub_token`, `pad_token`, `eos_token`): keep the real values
            values.update({key: getattr(args, key) for key in values if key.endswith("_token")})
            args = MLCConfig(**values)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")

        # Prompt variants: the languages of the `prompt_<lang>` columns and the column that feeds each matrix row.
        # Needed before `super().__init__`, which prepares the datasets.
        self._mlc_dataset_languages = mlc_dataset_languages(train_dataset, args.mlc_languages)
        self._mlc_rows = mlc_rows(
            self._mlc_dataset_languages, args.mlc_source_language, args.mlc_include_source_language
        )
        self.mlc_languages = [language for language, _ in self._mlc_rows]

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError(
                "MLCTrainer keeps its extractor outside the model, which DeepSpeed and FSDP do not shard or step. Use "
                "DDP (`accelerate launch` / `torchrun`) or a single device."
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

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if MLC_PROMPT_IDS in (dataset.column_names or []):  # already prepared, e.g. passed again to `evaluate`
            return dataset
        # Validate (or drop rows) first, so errors name the rows of the dataset as given
        dataset = check_mlc_dataset(
            dataset,
            self._mlc_dataset_languages,
            args.mlc_missing_language_policy,
            ("chosen", "rejected"),
            dataset_name,
        )
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
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

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Runs inside `DPOTrainer.__init__`, before ours: keep 4-bit CPU layers differentiable before this forward
        disable_cpu_4bit_repacking(self.model)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        # The reference model never sees the prompt variants
        inputs = {key: value for key, value in inputs.items() if key not in MLC_INPUT_KEYS}
        return super().compute_ref_log_probs(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mlc_input_ids, mlc_attention_mask = (inputs[key] for key in MLC_INPUT_KEYS)
        dpo_inputs = {key: value for key, value in inputs.items() if key not in MLC_INPUT_KEYS}
        output = super().compute_loss(model, dpo_inputs, return_outputs, num_items_in_batch)
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
        loss = loss + self.args.mlc_lambda * mlc_loss.to(loss.device)

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
