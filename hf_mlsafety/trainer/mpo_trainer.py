import contextlib
import copy
import os
import textwrap
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model, tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets
from torch.utils.data import DataLoader
from trl import DPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..model_card import SafetyModelCardMixin
from ..data import validate_mpo_dataset
from ..losses.mpo import mpo_loss, pool_hidden_states, reward_gap, sequence_log_probs
from ..utils import disable_cpu_4bit_repacking
from .mpo_config import MPOConfig


logger = get_logger(__name__)

_TARGET_COLUMNS = {"target_prompt": "prompt", "target_chosen": "chosen", "target_rejected": "rejected"}
_TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
_REF_COLUMNS = ("ref_gap", "ref_chosen_hidden", "ref_rejected_hidden")


@dataclass
class DataCollatorForMPO:
    """
    Collates MPO examples by running a DPO preference collator on the dominant-language triple and, separately, on the
    target-language triple.

    The returned batch holds `input_ids`, `attention_mask`, `completion_mask` (dominant language, 2B rows: chosen then
    rejected), the same three keys prefixed with `target_` (target language), `target_language` (a list of B language
    codes) and, when the examples carry precomputed reference values, `ref_gap` (B,) and `ref_hidden` (2B, H, rows in
    the same chosen-then-rejected order).

    Args:
        preference_collator (`Callable`):
            A collator for `prompt_ids` / `chosen_ids` / `rejected_ids` examples, such as TRL's
            [`~trl.trainer.dpo_trainer.DataCollatorForPreference`].
    """

    preference_collator: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        dominant = self.preference_collator(
            [{key: example[key] for key in _TOKENIZED_COLUMNS} for example in examples]
        )
        target = self.preference_collator(
            [{key: example[f"target_{key}"] for key in _TOKENIZED_COLUMNS} for example in examples]
        )
        batch = {key: dominant[key] for key in ("input_ids", "attention_mask", "completion_mask")}
        batch.update({f"target_{key}": target[key] for key in ("input_ids", "attention_mask", "completion_mask")})
        batch["target_language"] = [example["target_language"] for example in examples]
        if "ref_gap" in examples[0]:
            batch["ref_gap"] = torch.tensor([example["ref_gap"] for example in examples], dtype=torch.float32)
            hidden = [example["ref_chosen_hidden"] for example in examples]
            hidden += [example["ref_rejected_hidden"] for example in examples]
            batch["ref_hidden"] = torch.tensor(hidden, dtype=torch.float32)
        return batch


class MPOTrainer(SafetyModelCardMixin, DPOTrainer):
    """
    Trainer for MPO (Multilingual reward gaP Optimization), from the paper [MPO: Multilingual Safety Alignment via
    Reward Gap Optimization](https://huggingface.co/papers/2505.16869). A drop-in replacement for [`~trl.DPOTrainer`]:
    same constructor (models, `ref_model`, PEFT, `quantization_config` for QLoRA), with target-language columns added
    to the dataset.

    MPO transfers safety from a dominant language (usually English) to target languages. The reward gap (RG) of a
    preference pair is the length-normalised log-probability margin between its chosen (safe) and rejected (unsafe)
    response. The loss regresses the policy's target-language gap onto the frozen reference's dominant-language gap and
    keeps the policy's dominant-language hidden states close to the reference's:

        L = mpo_gap_weight · mean((β·RG_target(policy) − RG_dominant(reference))²)
            + mpo_retain_weight · MSE(h_policy, h_reference)      # pooled last-layer states, dominant sequences

    The reference is the initial model: the PEFT model with its adapter disabled, an explicit `ref_model`, or a frozen
    copy reloaded from the model path. With `precompute_ref_log_probs=True` its gaps and hidden states are computed
    once before training and no reference forward runs during training.

    Not to be confused with the "MPO" (Mixed Preference Optimization) of TRL's documentation, a combination of DPO loss
    types; the model-card tag here is `multilingual-reward-gap-optimization`.

    Example:

    ```python
    >>> from hf_mlsafety import MPOConfig, MPOTrainer
    >>> from hf_mlsafety.data import load_builtin_dataset

    >>> dataset = load_builtin_dataset("mpo", split="train", languages=["zh", "bn", "sw"])
    >>> trainer = MPOTrainer(
    ...     model="meta-llama/Llama-3.1-8B-Instruct", args=MPOConfig(output_dir="mpo", beta=1.0), train_dataset=dataset
    ... )
    >>> trainer.train()
    ```

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train, as for [`~trl.DPOTrainer`].
        ref_model ([`~transformers.PreTrainedModel`], *optional*):
            Frozen reference. If `None`, the initial model: the adapter disabled under PEFT, otherwise a reloaded copy
            (none is kept with `precompute_ref_log_probs=True`).
        args ([`MPOConfig`], *optional*):
            Configuration. If `None`, a default [`MPOConfig`] is used. A plain [`~trl.DPOConfig`] is not accepted: its
            `beta` default (0.1) means something else.
        data_collator ([`~transformers.DataCollator`], *optional*):
            Preference collator applied to each triple; defaults to TRL's `DataCollatorForPreference`. It is wrapped in
            a [`DataCollatorForMPO`].
        train_dataset ([`~datasets.Dataset`]):
            Dominant-language `prompt`, `chosen`, `rejected` plus `target_prompt`, `target_chosen`, `target_rejected`
            and `target_language`, standard or conversational (see [`~hf_mlsafety.data.wide_to_mpo`] to build it
            from a wide parallel table). Validated with [`~hf_mlsafety.data.validate_mpo_dataset`] before tokenization.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Same format as `train_dataset`.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer, as for [`~trl.DPOTrainer`].
        compute_metrics, callbacks, optimizers:
            As for [`~trl.DPOTrainer`] (`compute_metrics` receives no logits: MPO computes its loss only).
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Quantization of a model given by path (QLoRA with `peft_config`).
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration used to wrap the model.
    """

    _tag_names = ["trl", "hf-mlsafety", "multilingual-reward-gap-optimization"]
    _name = "MPO (Multilingual reward gaP Optimization)"
    _method_summary = (
        "The model's reward gap (length-normalised log-likelihood margin between a safe and an unsafe response) "
        "in each target language is regressed onto the dominant language's gap measured on the frozen initial "
        "model, while the dominant language's hidden states are kept in place. Not TRL's Mixed Preference "
        "Optimization."
    )
    _paper = {
        "title": "MPO: Multilingual Safety Alignment via Reward Gap Optimization",
        "id": "2505.16869",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zhao2025mpo,
                title        = {{MPO: Multilingual Safety Alignment via Reward Gap Optimization}},
                author       = {Weixiang Zhao and Yulin Hu and Yang Deng and Tongtong Wu and Wenxuan Zhang and
                                Jiahe Guo and An Zhang and Yanyan Zhao and Bing Qin and Tat-Seng Chua and Ting Liu},
                year         = 2025,
                booktitle    = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics
                                (Volume 1: Long Papers)},
                pages        = {23564--23587},
                publisher    = {Association for Computational Linguistics},
            }"""),
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: MPOConfig | None = None,
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
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = MPOConfig(f"{model_name.split('/')[-1]}-MPO")
        elif not isinstance(args, MPOConfig):
            raise TypeError(
                f"`args` must be an `MPOConfig`, got `{type(args).__name__}`. MPOConfig accepts every DPOConfig "
                "argument; note that its `beta` defaults to 1.0 (DPOConfig: 0.1)."
            )

        # The parent builds the model, the preference collator and the reference, tokenizes the datasets through our
        # `_prepare_dataset`, and with `precompute_ref_log_probs=True` calls our `_precompute_ref_logps`.
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
        self._use_mpo_collator()
        # An eval-mode forward (evaluation loop) would otherwise corrupt later 4-bit gradients on CPU.
        disable_cpu_4bit_repacking(self.model)

    def _use_mpo_collator(self):
        # The parent creates the preference collator inside its `__init__` and may precompute before returning, so the
        # wrapping happens at whichever comes first.
        if not isinstance(self.data_collator, DataCollatorForMPO):
            self.data_collator = DataCollatorForMPO(self.data_collator)

    # -----------------------------------------------------------------------------------------------------------------
    # Data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "MPOTrainer needs a map-style `Dataset`: target rows are validated against their dominant rows and "
                "tokenized upfront. Load the data without streaming."
            )
        if "target_prompt_ids" in dataset.column_names:  # already prepared (`evaluate` prepares again)
            return dataset
        validate_mpo_dataset(dataset)

        # Tokenize both triples exactly as DPO does, but without its length filter: applied to each triple separately
        # it would drop dominant and target rows independently and break their pairing. The filter is applied jointly
        # below.
        unfiltered_args = copy.copy(args)
        unfiltered_args.max_length = None
        tokenized = super()._prepare_dataset(dataset, processing_class, unfiltered_args, dataset_name)
        extra_columns = [column for column in ("tools", "chat_template_kwargs") if column in dataset.column_names]
        target = dataset.select_columns([*_TARGET_COLUMNS, *extra_columns]).rename_columns(_TARGET_COLUMNS)
        target = super()._prepare_dataset(target, processing_class, unfiltered_args, f"{dataset_name} target")
        target = target.select_columns(list(_TOKENIZED_COLUMNS))
        target = target.rename_columns({column: f"target_{column}" for column in _TOKENIZED_COLUMNS})
        dataset = concatenate_datasets([tokenized, target], axis=1)

        # With `keep_start` truncation, a prompt that fills `max_length` leaves no response token to score.
        if args.max_length is not None and args.truncation_mode == "keep_start":
            too_long = [
                index
                for index, (prompt_ids, target_prompt_ids) in enumerate(
                    zip(dataset["prompt_ids"], dataset["target_prompt_ids"], strict=True)
                )
                if max(len(prompt_ids), len(target_prompt_ids)) >= args.max_length
            ]
            if too_long:
                logger.warning(
                    f"Dropping {len(too_long)} row(s) of the {dataset_name} dataset whose dominant or target prompt "
                    f"fills `max_length={args.max_length}` tokens (rows {too_long[:20]}"
                    f"{' ...' if len(too_long) > 20 else ''}). Increase `max_length` to keep them."
                )
                dropped = set(too_long)
                dataset = dataset.select([index for index in range(len(dataset)) if index not in dropped])
                if len(dataset) == 0:
                    raise ValueError(
                        f"Every row of the {dataset_name} dataset has a prompt that fills `max_length="
                        f"{args.max_length}` tokens: nothing is left to train on. Increase `max_length`."
                    )
        return dataset

    def _set_signature_columns_if_needed(self):
        # Columns the collator needs; the others are removed when `remove_unused_columns=True`.
        if self._signature_columns is None:
            self._signature_columns = [
                *_TOKENIZED_COLUMNS,
                *(f"target_{column}" for column in _TOKENIZED_COLUMNS),
                "target_language",
                *_REF_COLUMNS,
            ]

    # -----------------------------------------------------------------------------------------------------------------
    # Reference

    @contextlib.contextmanager
    def _capture_last_hidden_state(self, model):
        """Records the backbone's `last_hidden_state` (post final norm) during a forward of `model`. The fused LM head
        returns log-probabilities only, so a hook is how one forward yields both."""
        unwrapped = self.accelerator.unwrap_model(model)
        if is_peft_model(unwrapped):
            unwrapped = unwrapped.get_base_model()
        captured = []
        handle = unwrapped.base_model.register_forward_hook(
            lambda module, args, output: captured.append(output.last_hidden_state)
        )
        try:
            yield captured
        finally:
            handle.remove()

    def _retain_mask(self, attention_mask, completion_mask):
        if self.args.mpo_retain_span == "prompt":
            return attention_mask * (1 - completion_mask)
        return attention_mask

    def compute_ref_gap_and_hidden(self, model, inputs):
        """
        Reference reward gap and pooled hidden states of the dominant-language pairs of a collated batch, in one
        forward without gradient.

        Args:
            model (`torch.nn.Module`):
                The reference: `self.ref_model`, or the policy (its adapter is disabled here under PEFT).
            inputs (`dict[str, torch.Tensor]`):
                A batch from [`DataCollatorForMPO`].

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: the gaps, shape `(B,)`, and the pooled hidden states, shape `(2B, H)`.
        """
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            # A PeftModel passed in gets a frozen "ref" copy of its adapter from the parent; a new adapter is disabled.
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
            self._capture_last_hidden_state(model) as hidden,
        ):
            outputs = model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False, fused_lm_head=True
            )
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens.
        seq_len = input_ids.size(1)
        logps = sequence_log_probs(
            outputs.log_probs[:, -(seq_len - 1) :], completion_mask, self.args.mpo_length_normalize
        )
        pooled = pool_hidden_states(
            hidden[0][:, -seq_len:], self._retain_mask(attention_mask, completion_mask), self.args.mpo_retain_pooling
        )
        return reward_gap(logps), pooled

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        # Replaces DPO's precompute: MPO's reference quantities are the dominant-language gap and hidden states. Called
        # by the parent's `__init__` and `evaluate`.
        if isinstance(dataset, IterableDataset):
            raise TypeError("`precompute_ref_log_probs=True` needs a map-style `Dataset`.")
        if "ref_gap" in dataset.column_names:  # already precomputed
            return dataset
        self._use_mpo_collator()
        # The precompute forwards run in eval mode, which would make CPU 4-bit layers repack their weights.
        disable_cpu_4bit_repacking(self.model)

        dataloader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            shuffle=False,
        )
        # Each process computes its own shard once; the gather gives every process the whole dataset's values.
        dataloader = self.accelerator.prepare(dataloader)
        if self.ref_model is None and self.is_deepspeed_enabled:
            # Before `train`, DeepSpeed parameters are not placed (ZeRO-1/2) or are sharded (ZeRO-3): use an inference
            # engine, built once.
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model

        gaps, hidden = [], []
        for batch in tqdm(
            dataloader,
            desc=f"Computing MPO reference gaps and hidden states for {name} dataset",
            disable=bool(os.environ.get("TQDM_DISABLE", "")),
        ):
            gap, pooled = self.compute_ref_gap_and_hidden(model, batch)
            chosen_hidden, rejected_hidden = pooled.chunk(2, dim=0)
            gap, chosen_hidden, rejected_hidden = self.accelerator.gather_for_metrics(
                (gap, chosen_hidden, rejected_hidden)
            )
            gaps.append(gap.float().cpu())
            hidden.append(torch.stack([chosen_hidden, rejected_hidden], dim=1).float().cpu())
        hidden = torch.cat(hidden)
        columns = Dataset.from_dict(
            {
                "ref_gap": torch.cat(gaps).numpy(),
                "ref_chosen_hidden": hidden[:, 0].numpy(),
                "ref_rejected_hidden": hidden[:, 1].numpy(),
            }
        )
        return concatenate_datasets([dataset, columns], axis=1)

    # -----------------------------------------------------------------------------------------------------------------
    # Loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"

        # Policy reward gap on the target-language pairs, through the fused LM head (no full logits).
        target_ids, target_mask = inputs["target_input_ids"], inputs["target_attention_mask"]
        target_completion_mask = inputs["target_completion_mask"]
        target_labels = target_ids.masked_fill(target_completion_mask == 0, -100)
        outputs = model(
            input_ids=target_ids, attention_mask=target_mask, labels=target_labels, use_cache=False, fused_lm_head=True
        )
        target_logps = sequence_log_probs(
            outputs.log_probs[:, -(target_ids.size(1) - 1) :], target_completion_mask, self.args.mpo_length_normalize
        )
        policy_gap = reward_gap(target_logps)

        # Policy hidden states on the dominant-language sequences: only the last position's logits are computed.
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        with self._capture_last_hidden_state(model) as hidden:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        retain_mask = self._retain_mask(attention_mask, inputs["completion_mask"])
        policy_hidden = pool_hidden_states(
            hidden[0][:, -input_ids.size(1) :], retain_mask, self.args.mpo_retain_pooling
        )

        # Reference gap and hidden states on the dominant-language pairs
        if self.precompute_ref_logps:
            ref_gap, ref_hidden = inputs["ref_gap"], inputs["ref_hidden"]
        else:
            ref_gap, ref_hidden = self.compute_ref_gap_and_hidden(self.ref_model or self.model, inputs)

        loss, gap_loss, retain_loss = mpo_loss(
            policy_gap,
            ref_gap,
            policy_hidden,
            ref_hidden,
            beta=self.beta,
            beta_placement=self.args.mpo_beta_placement,
            gap_weight=self.args.mpo_gap_weight,
            retain_weight=self.args.mpo_retain_weight,
        )

        # Metrics
        gather, gather_for_metrics = self.accelerator.gather, self.accelerator.gather_for_metrics
        self._metrics[mode]["mpo/gap_loss"].append(gather(gap_loss.detach()).mean().item())
        self._metrics[mode]["mpo/retain_loss"].append(gather(retain_loss.detach()).mean().item())
        ref_gap = gather_for_metrics(ref_gap.detach().float())
        self._metrics[mode]["mpo/ref_reward_gap_dominant"].append(ref_gap.mean().item())
        gaps = gather_for_metrics(policy_gap.detach().float()).cpu()
        languages = gather_for_metrics(inputs["target_language"])
        for language in sorted(set(languages)):
            selected = torch.tensor([code == language for code in languages])
            self._metrics[mode][f"mpo/reward_gap_{language}"].append(gaps[selected].mean().item())
        self._metrics[mode]["mpo/reward_gap_accuracy"].append((gaps > 0).float().mean().item())

        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # MPO has no logits or labels to return; evaluation reports the loss and the `mpo/*` metrics.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
