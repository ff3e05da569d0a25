"""What [`MLCTrainer`] (DPO) and [`MLCSFTTrainer`] (SFT) share: the extractor, the prompt-variant rows (which column
feeds which row, validation, tokenization, collation) and the hidden-state forward."""

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from trl.trainer.utils import global_then_local_main_first, pad

from ..data import text_of, validate_mlc_dataset
from ..data.formats import as_user_turn, language_columns
from ..languages import check_languages
from ..losses.mlc import mlc_consistency_loss


logger = get_logger(__name__)

# Column written by dataset preparation: per example, the token ids of every prompt variant (one list per row).
MLC_PROMPT_IDS = "mlc_prompt_ids"
# Batch keys added by the collator: the B·m variant rows, example-major, right-padded.
MLC_INPUT_KEYS = ("mlc_input_ids", "mlc_attention_mask")
EXTRACTOR_WEIGHTS_NAME = "mlc_extractor.safetensors"
EXTRACTOR_CONFIG_NAME = "mlc_extractor_config.json"


class MLCExtractor(nn.Module):
    """The trainable projection applied to the hidden states before the MLC loss (not used at inference).

    It lives beside the model, not inside it: the trainers keep it in float32, add its parameters to the optimizer as
    their own group, and save it as `mlc_extractor.safetensors` + `mlc_extractor_config.json` in `output_dir` and in
    every checkpoint.

    Args:
        hidden_size (`int`):
            Hidden size of the model.
        dim (`int` or `None`, *optional*, defaults to `512`):
            Output size of the linear map. `None` or `0` means no projection (identity, nothing to train).
        init (`str`, *optional*, defaults to `"default"`):
            `"default"`: PyTorch's `nn.Linear` initialisation (the official DPO trainer); `"xavier"`: Xavier-uniform
            weights and zero bias (the official SFT trainer).
    """

    def __init__(self, hidden_size, dim=512, init="default"):
        super().__init__()
        self.hidden_size = hidden_size
        self.dim = dim or None
        self.init = init
        if self.dim is None:
            self.projection = nn.Identity()
        else:
            self.projection = nn.Linear(hidden_size, self.dim)
            if init == "xavier":
                nn.init.xavier_uniform_(self.projection.weight)
                nn.init.zeros_(self.projection.bias)

    def forward(self, hidden_states):
        # fp32, on the extractor's own device (with `device_map` the model may end on another one)
        if self.dim is None:
            return hidden_states.float()
        return self.projection(hidden_states.to(self.projection.weight.device, torch.float32))

    def config_dict(self):
        return {"hidden_size": self.hidden_size, "dim": self.dim, "init": self.init}

    def save_pretrained(self, output_dir, **metadata):
        """Writes the weights and the configuration (plus `metadata`, e.g. the layer and the languages) into
        `output_dir`."""
        os.makedirs(output_dir, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, os.path.join(output_dir, EXTRACTOR_WEIGHTS_NAME))
        with open(os.path.join(output_dir, EXTRACTOR_CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump({**self.config_dict(), **metadata}, handle, indent=2)

    def load_weights(self, directory):
        """Loads the weights saved in `directory` in place (keeping this module's device and dtype)."""
        weights = os.path.join(directory, EXTRACTOR_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"{directory} has no {EXTRACTOR_WEIGHTS_NAME}: resume from a checkpoint written by an MLC trainer, "
                "which saves the extractor beside the model."
            )
        with open(os.path.join(directory, EXTRACTOR_CONFIG_NAME), encoding="utf-8") as handle:
            saved = json.load(handle)
        mine = self.config_dict()
        if any(saved.get(key) != value for key, value in mine.items() if key != "init"):
            raise ValueError(
                f"The extractor saved in {directory} (hidden_size={saved.get('hidden_size')}, dim={saved.get('dim')}) "
                f"does not match this trainer's (hidden_size={mine['hidden_size']}, dim={mine['dim']})."
            )
        self.load_state_dict(load_file(weights))

    @classmethod
    def from_pretrained(cls, directory):
        """Rebuilds an extractor saved with [`~MLCExtractor.save_pretrained`] (e.g. to analyse a trained run)."""
        with open(os.path.join(directory, EXTRACTOR_CONFIG_NAME), encoding="utf-8") as handle:
            config = json.load(handle)
        extractor = cls(config["hidden_size"], config["dim"], config["init"])
        extractor.load_weights(directory)
        return extractor


class MLCExtractorCallback(TrainerCallback):
    """Treats the trainer-owned extractor like the model's own parameters around each optimizer step.

    `Trainer` all-reduces (DDP), clips and zeroes the gradients of the model only. Before the step the extractor's
    gradients are averaged across processes and clipped to `max_grad_norm` (on their own); after the step they are
    cleared, so they do not accumulate across optimizer steps.
    """

    def __init__(self, extractor, accelerator):
        self.extractor = extractor
        self.accelerator = accelerator

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        parameters = [parameter for parameter in self.extractor.parameters() if parameter.grad is not None]
        if not parameters:  # the MLC term was off for this step (`mlc_every`, `mlc_lambda=0`) or identity extractor
            return
        if self.accelerator.num_processes > 1:
            for parameter in parameters:
                parameter.grad.copy_(self.accelerator.reduce(parameter.grad, reduction="mean"))
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.extractor.zero_grad(set_to_none=True)


def mlc_dataset_languages(dataset, languages):
    """Languages of the `prompt_<lang>` columns: `languages` when given (the columns are checked against it at
    dataset preparation), else read from the columns of `dataset`."""
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"MLC needs a map-style `datasets.Dataset` (every prompt variant is validated before training), got "
            f"`{type(dataset).__name__}`."
        )
    if "image" in dataset.column_names or "images" in dataset.column_names:
        raise NotImplementedError("MLC trainers support text-only datasets; this one has an image column.")
    if languages is not None:
        return check_languages(languages, "mlc_languages")
    return language_columns(dataset)


def mlc_rows(languages, source_language, include_source_language):
    """Which column feeds each row of the per-example matrix, source language first.

    Args:
        languages (`list[str]`):
            Languages of the `prompt_<lang>` columns.
        source_language (`str`):
            Language of the `prompt` column (the one the alignment loss trains on).
        include_source_language (`bool`):
            Whether the source language is a row. Its row reads `prompt_<source>` when the dataset has that column,
            else `prompt`.

    Returns:
        `list[tuple[str, str]]`: `(language, column)` pairs.
    """
    rows = [(code, f"prompt_{code}") for code in languages if code != source_language]
    if include_source_language:
        column = f"prompt_{source_language}" if source_language in languages else "prompt"
        rows.insert(0, (source_language, column))
    if len(rows) < 2:
        raise ValueError(
            f"MLC needs at least two prompt variants per example, got rows {rows} from the languages {languages} "
            f"(`mlc_source_language={source_language!r}`, `mlc_include_source_language={include_source_language}`)."
        )
    return rows


def check_mlc_dataset(dataset, languages, missing_language_policy, response_columns, dataset_name):
    """Validates the MLC columns of `dataset` before tokenization, naming the row and the column of each problem.

    With `missing_language_policy="drop"`, rows with a missing or empty prompt variant are dropped first (with a
    warning that counts them and lists the first indices); every other problem raises.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"The {dataset_name} dataset must be a map-style `datasets.Dataset` for MLC.")
    if missing_language_policy == "drop":
        columns = [f"prompt_{code}" for code in languages if f"prompt_{code}" in dataset.column_names]
        dropped = [
            index
            for index, row in enumerate(dataset.select_columns(columns))
            if any(not text_of(row[column]).strip() for column in columns)
        ]
        if dropped:
            logger.warning(
                f"Dropping {len(dropped)} row(s) of the {dataset_name} dataset with a missing or empty prompt variant "
                f"(`mlc_missing_language_policy='drop'`): rows {dropped[:10]}{' ...' if len(dropped) > 10 else ''}."
            )
            dropped = set(dropped)
            dataset = dataset.select([index for index in range(len(dataset)) if index not in dropped])
    try:
        validate_mlc_dataset(dataset, languages, response_columns=response_columns)
    except ValueError as error:
        raise ValueError(f"{dataset_name} dataset: {error}") from None
    return dataset


def tokenize_mlc_prompts(dataset, tokenizer, columns, max_length, num_proc, dataset_name):
    """Adds the `mlc_prompt_ids` column: for each example, the token ids of the prompt in every row's column.

    Each variant is chat-templated as a user turn with the generation prompt, so its last token is the position that
    predicts the first response token. A plain-text variant is tokenized as is only when the tokenizer has no chat
    template. Variants longer than `max_length` keep their end (the generation position).
    """

    def tokenize(example):
        tools = example.get("tools")
        template_kwargs = {
            "tools": json.loads(tools) if isinstance(tools, str) else tools,
            **(example.get("chat_template_kwargs") or {}),
        }
        prompt_ids = []
        for column in columns:
            prompt = example[column]
            if isinstance(prompt, str) and tokenizer.chat_template is None:
                ids = tokenizer(prompt)["input_ids"]
            else:
                # A copy: the caller's messages are never mutated (the official code appends a dummy turn to them)
                ids = tokenizer.apply_chat_template(
                    as_user_turn(prompt),
                    tokenize=True,
                    add_generation_prompt=True,
                    return_dict=True,
                    **template_kwargs,
                )["input_ids"]
            prompt_ids.append(ids[-max_length:] if max_length is not None else ids)
        return {MLC_PROMPT_IDS: prompt_ids}

    with global_then_local_main_first():
        return dataset.map(
            tokenize, num_proc=num_proc, desc=f"Tokenizing MLC prompt variants of {dataset_name} dataset"
        )


@dataclass
class DataCollatorForMLC:
    """Wraps the parent trainer's collator and adds the prompt-variant rows of the batch.

    Returns the parent's batch plus `mlc_input_ids` and `mlc_attention_mask`, of shape `(B·m, T)`: example-major (the
    m rows of example 0, then of example 1, ...), in the row order of the trainer, right-padded, so that the last
    prompt token of row i sits at `mlc_attention_mask[i].sum() - 1`.

    Args:
        collator (`Callable`):
            The parent's collator (e.g. `DataCollatorForPreference`), called on the examples without `mlc_prompt_ids`.
        pad_token_id (`int`):
            Padding token id.
        pad_to_multiple_of (`int`, *optional*):
            Pad the variant rows to a multiple of this value.
    """

    collator: Any
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples):
        variants = [torch.tensor(ids) for example in examples for ids in example[MLC_PROMPT_IDS]]
        batch = self.collator([{k: v for k, v in example.items() if k != MLC_PROMPT_IDS} for example in examples])
        batch["mlc_input_ids"] = pad(variants, self.pad_token_id, "right", self.pad_to_multiple_of)
        batch["mlc_attention_mask"] = pad(
            [torch.ones_like(ids) for ids in variants], 0, "right", self.pad_to_multiple_of
        )
        return batch


def resolve_mlc_layer(layer, num_hidden_layers):
    """Index into the model's `hidden_states` (length L + 1): `None` → L (the final layer, after the final norm);
    negative values count from the end (-1 → L)."""
    if layer is None:
        return num_hidden_layers
    resolved = layer + num_hidden_layers + 1 if layer < 0 else layer
    if not 0 <= resolved <= num_hidden_layers:
        raise ValueError(
            f"`mlc_layer={layer}` is out of range for a model with {num_hidden_layers} layers: use 0 … "
            f"{num_hidden_layers} (0 = embeddings, {num_hidden_layers} = final layer after the norm) or -1 … "
            f"-{num_hidden_layers + 1}."
        )
    return resolved


def length_buckets(lengths):
    """Splits rows into at most two groups of similar length, at the cut that minimises the padded positions.

    Prompts of one example differ a lot in token count across languages (scripts a tokenizer splits finely run 2-4x
    longer), so one right-padded batch of all variants is mostly padding. Returns lists of row indices.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = [lengths[index] for index in order]
    rows, longest = len(order), sorted_lengths[-1]

    def padded_positions(cut):
        return cut * sorted_lengths[cut - 1] + (rows - cut) * longest

    cut = min(range(rows, 0, -1), key=padded_positions)  # ties go to the larger cut: one forward rather than two
    return [order[:cut], order[cut:]] if cut < rows else [order]


def last_prompt_token_states(model, input_ids, attention_mask, layer):
    """Hidden state at `layer` of the last prompt token of each (right-padded) row, shape `(rows, hidden_size)`.

    Goes through the (possibly wrapped) model's plain forward, so DDP hooks and PEFT adapters apply, without TRL's
    fused head. An empty `logits_to_keep` index makes the LM head project no position: no vocabulary logits are built.
    Rows run in up to two forwards of similar length (see [`length_buckets`]), each trimmed to its longest row.
    """
    lengths = attention_mask.sum(-1)
    states = []
    buckets = length_buckets(lengths.tolist())
    for rows in buckets:
        rows = torch.tensor(rows, device=input_ids.device)
        width = int(lengths[rows].max())
        outputs = model(
            input_ids=input_ids[rows, :width],
            attention_mask=attention_mask[rows, :width],
            output_hidden_states=[layer],
            logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),
            use_cache=False,
        )
        # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real ones
        hidden_states = outputs.hidden_states[layer][:, -width:]
        last = (lengths[rows] - 1).to(hidden_states.device)
        states.append(hidden_states[torch.arange(len(rows), device=hidden_states.device), last])
    order = torch.cat([torch.as_tensor(rows) for rows in buckets]).argsort()
    return torch.cat(states)[order.to(states[0].device)]


def compute_mlc_loss(model, extractor, input_ids, attention_mask, num_rows, layer, tau, detach_sigma1):
    """The MLC term of one batch.

    Returns:
        `tuple`: the loss (scalar), the singular values `(B, k)` and the extractor features `(B, m, d)`, the last two
        detached (for the metrics).
    """
    hidden_states = last_prompt_token_states(model, input_ids, attention_mask, layer)
    # The extractor stays fp32: no autocast around it
    with torch.autocast(device_type=hidden_states.device.type, enabled=False):
        features = extractor(hidden_states)
    features = features.view(-1, num_rows, features.size(-1))
    loss, singular_values = mlc_consistency_loss(features, tau=tau, detach_sigma1=detach_sigma1)
    return loss, singular_values.detach(), features.detach()
