import contextlib
import json
import os
import re
import tempfile
import textwrap
from collections import defaultdict
from typing import NamedTuple

import bitsandbytes as bnb
import torch
from huggingface_hub import HfApi
from peft import LoraConfig
from safetensors.torch import save_file

from ..data import validate_probes
from ..data.formats import as_user_turn
from ..model_card import EVAL_DATASET_NAME, EVAL_DATASET_TYPE, hub_model_id_of
from ..utils import disable_cpu_4bit_repacking, is_cpu_repacked
from .solver import (
    activation_moments,
    default_edit_layer,
    jaccard_matrix,
    lora_factors,
    merge_moments,
    select_safety_neurons,
    solve_sparse_edit,
)
from .sparse_edit_config import SparseEditConfig


# The language the others are mapped onto (the paper's English safety neurons and targets).
PIVOT_LANGUAGE = "en"
# Gated MLP projections of a decoder layer, as named by Llama, Qwen2/2.5/3, Mistral, Gemma and their kin.
_PROJECTION_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate_proj|up_proj)$")


class _AllCaptured(Exception):
    """Raised by the activation hooks once every requested projection has run: the rest of the forward is unneeded."""


class ModuleEdit(NamedTuple):
    """The edit of one projection: `weight[rows] += (left @ right).T` (rank ≤ `left.shape[1]`)."""

    layer: int
    module: str
    rows: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    def delta(self):
        """The update of the edited rows, shape `(len(rows), in_features)`, in the solver dtype."""
        return (self.left @ self.right).T


class SparseSafetyEditor:
    r"""
    Training-free multilingual safety alignment by sparse weight editing, from
    [Multilingual Safety Alignment Via Sparse Weight Editing](https://huggingface.co/papers/2602.22554).

    The editor finds the "safety neurons" of the MLP (`gate_proj` / `up_proj` units that fire more on harmful than on
    harmless prompts), then solves in closed form a low-rank, regularised least-squares edit of their weight rows that
    maps the harmful prompts of the target languages onto the pre-activations of their English translations while
    leaving harmless anchors alone. The edit is applied in place ([`~SparseSafetyEditor.apply`], reversible) or
    exported as an exact PEFT LoRA adapter ([`~SparseSafetyEditor.save_pretrained`]), which is also how a 4-bit model
    is edited.

    Supported architectures: decoders with a gated MLP made of separate `mlp.gate_proj` and `mlp.up_proj` linears in
    `layers.<i>` (Llama, Qwen2, Qwen2.5, Qwen3, Mistral, Gemma, ...), in full or half precision or bitsandbytes 4-bit.
    Fused projections (Phi-3's `gate_up_proj`) and GPT-2-style MLPs are not supported. Merge PEFT adapters
    (`merge_and_unload()`) before editing, for example to stack the edit on an MPO-trained model.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            The causal LM to edit.
        processing_class ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer, with a chat template: prompts are encoded with the generation prompt, as at inference.
        config ([`SparseEditConfig`], *optional*):
            Configuration; defaults to `SparseEditConfig()`.

    Data are probe sets (`prompt`, `language`, `parallel_id`, `label`), as given by
    `load_builtin_dataset("probes")` or [`~hf_mlsafety.data.wide_to_probes`].

    Example:

    ```python
    >>> from hf_mlsafety import SparseEditConfig, SparseSafetyEditor, load_builtin_dataset
    >>> probes = load_builtin_dataset("probes", split="train")
    >>> harmful = probes.filter(lambda row: row["label"] == "harmful")
    >>> harmless = probes.filter(lambda row: row["label"] == "harmless")
    >>> editor = SparseSafetyEditor(model, tokenizer, SparseEditConfig(rank=32))
    >>> editor.fit(harmful, harmless)
    >>> editor.save_pretrained("swe-adapter")  # a LoRA adapter over the unchanged base
    ```
    """

    _tag_names = ["hf-mlsafety", "sparse-weight-editing", "multilingual-safety", "training-free"]
    _name = "Sparse Weight Editing"
    # docstyle-ignore
    _paper = {
        "title": "Multilingual Safety Alignment Via Sparse Weight Editing",
        "id": "2602.22554",
        "citation": textwrap.dedent(
            """\
            @misc{liang2026multilingual,
                title         = {{Multilingual Safety Alignment Via Sparse Weight Editing}},
                author        = {Jiaming Liang and Zhaoxin Wang and Handing Wang},
                year          = 2026,
                eprint        = {2602.22554},
                archivePrefix = {arXiv}
            }"""
        ),
    }

    def __init__(self, model, processing_class, config=None):
        self.config = config if config is not None else SparseEditConfig()
        self.model = model
        self.processing_class = processing_class
        if processing_class.chat_template is None:
            raise ValueError(
                "`processing_class` has no chat template: the editor encodes prompts with the chat template and the "
                "generation prompt, as the model sees them at inference."
            )

        # The projections to score and edit: {(layer, module): (full name, nn.Linear)}
        self.projections = self._find_projections(model, self.config.modules)
        self.num_layers = 1 + max(layer for layer, _ in self.projections)
        too_deep = [layer for layer in self.config.layers or [] if layer >= self.num_layers]
        if too_deep:
            raise ValueError(f"`layers` {too_deep} out of range: the model has {self.num_layers} layers.")

        # 4-bit weights are read by dequantising, which gives garbage once a CPU eval-mode forward has repacked them.
        if is_cpu_repacked(model):
            raise ValueError(
                "The 4-bit weights of this model were repacked into the CPU layout by an eval-mode forward "
                "(generation, evaluation): reload the model and build the editor before running it."
            )
        disable_cpu_4bit_repacking(model)

        self.safety_neurons = None  # {language: {layer: {module: LongTensor}}}, from find_safety_neurons
        self.edits = None  # {module name: ModuleEdit}, from fit
        self._original_rows = None  # {module name: rows before apply()}

    @staticmethod
    def _find_projections(model, modules):
        found = {}
        for name, module in model.named_modules():
            match = _PROJECTION_NAME.search(name)
            if match and match.group(2) in modules:
                found[(int(match.group(1)), match.group(2))] = (name, module)
        missing = [module for module in modules if not any(key[1] == module for key in found)]
        if missing:
            raise ValueError(
                f"{type(model).__name__} has no `layers.<i>.mlp.{missing[0]}` module. SparseSafetyEditor supports "
                "decoders with separate `mlp.gate_proj` / `mlp.up_proj` linears (Llama, Qwen2, Qwen2.5, Qwen3, "
                "Mistral, Gemma, ...)."
            )
        for name, module in found.values():
            if not isinstance(module, torch.nn.Linear):
                raise TypeError(
                    f"`{name}` is a {type(module).__name__}, not a linear layer: merge PEFT adapters into the model "
                    "(`merge_and_unload()`) before editing."
                )
        return found

    # -----------------------------------------------------------------------------------------------------------------
    # Safety neurons

    def find_safety_neurons(self, harmful, harmless):
        """Finds the safety neurons of every language, layer and module.

        A neuron's activation is the output of `gate_proj` (before the activation function) or `up_proj` at the last
        prompt token. Per language and layer, a neuron is a safety neuron when the z-score (across the layer's neurons)
        of its harmful − harmless mean difference exceeds `tau_mag`, or its Cohen's d exceeds `tau_stat`.

        Args:
            harmful ([`~datasets.Dataset`]):
                Harmful probes (`label == "harmful"`), at least 2 per language.
            harmless ([`~datasets.Dataset`]):
                Harmless probes, at least 2 in each language of `harmful` and in no other language.

        Returns:
            `dict[str, dict[int, dict[str, torch.LongTensor]]]`: neuron indices per language, layer and module, also
            kept as `self.safety_neurons`.
        """
        harmful_rows = self._rows_by_language(harmful, "harmful", "harmful")
        harmless_rows = self._rows_by_language(harmless, "harmless", "harmless")
        for language in sorted(set(harmful_rows) ^ set(harmless_rows)):
            present, absent = ("harmful", "harmless") if language in harmful_rows else ("harmless", "harmful")
            raise ValueError(
                f"Language {language!r} has {present} rows but no {absent} rows: neuron finding contrasts the two "
                "within each language."
            )
        for name, rows in (("harmful", harmful_rows), ("harmless", harmless_rows)):
            for language, (prompts, _) in rows.items():
                if len(prompts) < 2:
                    raise ValueError(
                        f"`{name}` has {len(prompts)} row(s) in {language!r}; Cohen's d needs at least 2."
                    )

        layers = range(self.num_layers)
        neurons = {}
        for language in harmful_rows:
            moments = {}
            for label, rows in (("harmful", harmful_rows), ("harmless", harmless_rows)):
                stats = {}
                for _, batch in self._pooled_activations(rows[language][0], layers, outputs=True):
                    for key, activations in batch.items():
                        stats[key] = merge_moments(stats.get(key), activation_moments(activations))
                moments[label] = stats
            neurons[language] = {
                layer: {
                    module: select_safety_neurons(
                        moments["harmful"][layer, module],
                        moments["harmless"][layer, module],
                        self.config.tau_mag,
                        self.config.tau_stat,
                    )
                    for module in self.config.modules
                }
                for layer in layers
            }
        self.safety_neurons = neurons
        return neurons

    def neuron_counts(self):
        """Number of safety neurons per language, layer and module: `{language: {layer: {module: count}}}`."""
        return {
            language: {
                layer: {module: len(index) for module, index in modules.items()} for layer, modules in per.items()
            }
            for language, per in self._require_neurons().items()
        }

    def jaccard_overlap(self, layer=None, module=None):
        """Jaccard overlaps of the languages' safety-neuron sets.

        Args:
            layer (`int`, *optional*):
                Restrict to one layer; by default the sets hold (layer, module, neuron) triples of every layer.
            module (`str`, *optional*):
                Restrict to one module.

        Returns:
            `tuple[list[str], torch.Tensor]`: the languages and the `(k, k)` matrix.
        """
        sets = {
            language: {
                (at, name, index)
                for at, modules in per.items()
                if layer is None or at == layer
                for name, indices in modules.items()
                if module is None or name == module
                for index in indices.tolist()
            }
            for language, per in self._require_neurons().items()
        }
        return jaccard_matrix(sets)

    def plot_jaccard_heatmap(self, path, layer=None, module=None):
        """Writes the Jaccard overlap matrix (see [`~SparseSafetyEditor.jaccard_overlap`]) as a PNG heatmap at `path`
        and returns `path`."""
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt

        languages, matrix = self.jaccard_overlap(layer, module)
        figure, axes = plt.subplots(figsize=(1.0 + 0.6 * len(languages), 0.8 + 0.6 * len(languages)))
        image = axes.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        axes.set_xticks(range(len(languages)), languages)
        axes.set_yticks(range(len(languages)), languages)
        for i in range(len(languages)):
            for j in range(len(languages)):
                value = matrix[i, j].item()
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.5 else "white")
        scope = "all layers" if layer is None else f"layer {layer}"
        axes.set_title(f"Safety-neuron Jaccard overlap ({scope}{'' if module is None else ', ' + module})")
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        figure.savefig(path, format="png")
        plt.close(figure)
        return path

    def amplification_probe(self, harmful, refusal="I cannot help with that request.", alpha=None):
        """The paper's section-3 probe: scale the English safety neurons' activations by α and measure the change.

        The paper counts harmful responses with a guard model; this probe uses a judge-free proxy, the mean per-token
        log-probability of a fixed refusal after each harmful prompt, without and with the English safety neurons
        (every layer, every configured module) multiplied by α. A positive shift means amplification pushes the model
        towards refusing in that language.

        Args:
            harmful ([`~datasets.Dataset`]):
                Harmful probes.
            refusal (`str`, *optional*, defaults to `"I cannot help with that request."`):
                Continuation whose log-probability is measured, the same for every language.
            alpha (`float`, *optional*):
                Scale; defaults to `config.alpha`.

        Returns:
            `dict[str, dict[str, float]]`: per language, `base` and `amplified` mean log-probabilities and their
            `shift`.
        """
        alpha = self.config.alpha if alpha is None else alpha
        english = self._require_neurons([PIVOT_LANGUAGE])[PIVOT_LANGUAGE]
        continuation = self.processing_class(refusal, add_special_tokens=False)["input_ids"]
        if not continuation:
            raise ValueError("`refusal` is empty.")
        results = {}
        for language, (prompts, _) in self._rows_by_language(harmful, "harmful", "harmful").items():
            base = self._continuation_logprob(prompts, continuation)
            with self._scaled_neurons(english, alpha):
                amplified = self._continuation_logprob(prompts, continuation)
            results[language] = {"base": base, "amplified": amplified, "shift": amplified - base}
        return results

    # -----------------------------------------------------------------------------------------------------------------
    # The edit

    def fit(self, harmful_parallel, harmless_anchors):
        """Solves the edit of every configured layer and module (nothing in the model changes yet).

        Per edited projection with safety neurons `S` (weight rows `W_S`): `X_low` = inputs of the projection for the
        target languages' harmful rows, `X_en` = those of their English parallel rows, `X_safe` = those of the
        harmless anchors; the gap is `D = X_en W_Sᵀ − X_low W_Sᵀ` (or the English class mean instead of `X_en W_Sᵀ`),
        and [`~hf_mlsafety.editing.solver.solve_sparse_edit`] gives the rank-`r` edit. Runs
        [`~SparseSafetyEditor.find_safety_neurons`] on the same data first when no neurons were found yet.

        Args:
            harmful_parallel ([`~datasets.Dataset`]):
                Harmful probes in English and the target languages. With `target="parallel_english"` every
                `parallel_id` must be present in every language.
            harmless_anchors ([`~datasets.Dataset`]):
                Harmless probes (any languages; concatenate anchor pools to use several).

        Returns:
            `SparseSafetyEditor`: `self`, with `self.edits` set.
        """
        config = self.config
        harmful = self._rows_by_language(
            harmful_parallel, "harmful", "harmful_parallel", require_parallel=config.target == "parallel_english"
        )
        anchors = self._rows_by_language(harmless_anchors, "harmless", "harmless_anchors")
        if PIVOT_LANGUAGE not in harmful:
            raise ValueError("`harmful_parallel` has no rows in 'en': the edit maps the other languages onto English.")
        targets = config.target_languages or [language for language in harmful if language != PIVOT_LANGUAGE]
        if not targets:
            raise ValueError("`harmful_parallel` has only English rows: add rows in the languages to align.")
        missing = [language for language in targets if language not in harmful]
        if missing:
            raise ValueError(f"`target_languages` {missing} have no rows in `harmful_parallel`.")
        if self.safety_neurons is None:
            self.find_safety_neurons(harmful_parallel, harmless_anchors)
        neuron_languages = {"english": [PIVOT_LANGUAGE], "target": targets, "union": [PIVOT_LANGUAGE, *targets]}
        self._require_neurons(neuron_languages[config.edit_neurons])

        layers = config.layers or [
            default_edit_layer(
                {
                    layer: sum(len(index) for index in modules.values())
                    for layer, modules in self.safety_neurons[PIVOT_LANGUAGE].items()
                },
                self.num_layers,
            )
        ]

        # Inputs of the edited projections, one pooled vector per prompt, from the unedited model.
        english_prompts, english_ids = harmful[PIVOT_LANGUAGE]
        low_prompts = [prompt for language in targets for prompt in harmful[language][0]]
        if config.target == "parallel_english":  # the English row of each target row (validated to exist)
            english_position = {parallel_id: index for index, parallel_id in enumerate(english_ids)}
            pairs = [english_position[parallel_id] for language in targets for parallel_id in harmful[language][1]]
        english = self._features(english_prompts, layers)
        low = self._features(low_prompts, layers)
        safe = self._features([prompt for prompts, _ in anchors.values() for prompt in prompts], layers)

        dtype = getattr(torch, config.solver_dtype)
        edits = {}
        for layer in layers:
            for module in config.modules:
                name, linear = self.projections[layer, module]
                rows = self._edit_rows(layer, module, neuron_languages[config.edit_neurons])
                if len(rows) < config.rank:
                    raise ValueError(
                        f"Layer {layer} `{module}` has {len(rows)} {config.edit_neurons} safety neuron(s), fewer than "
                        f"`rank`={config.rank}: lower `rank`, choose other `layers`, or lower `tau_mag` / `tau_stat`."
                    )
                weight_rows = self._weight_rows(linear, rows)
                english_pre = english[layer] @ weight_rows.T
                target = (
                    english_pre[pairs] if config.target == "parallel_english" else english_pre.mean(0, keepdim=True)
                )
                gap = target - low[layer] @ weight_rows.T
                left, right = solve_sparse_edit(
                    low[layer],
                    gap,
                    safe[layer],
                    gamma=config.gamma,
                    lam=config.lam,
                    rank=config.rank,
                    utility_mode=config.utility_mode,
                    null_space_threshold=config.null_space_threshold,
                    dtype=dtype,
                )
                edits[name] = ModuleEdit(layer, module, rows, left, right)
        self.edits = edits
        return self

    def apply(self):
        """Adds the edit to the model's weights in place (full- or half-precision models; see
        [`~SparseSafetyEditor.save_pretrained`] for 4-bit ones). Undo with [`~SparseSafetyEditor.revert`]."""
        edits = self._require_edits()
        if self._original_rows is not None:
            raise RuntimeError("The edit is already applied; call `revert()` first.")
        for name in edits:
            linear = self._module(name)
            if isinstance(linear, bnb.nn.Linear4bit) or not linear.weight.is_floating_point():
                raise ValueError(
                    f"`{name}` holds quantized weights ({type(linear).__name__}), which cannot be edited in place: "
                    "export the edit with `save_pretrained(dir)` and load it with `PeftModel.from_pretrained(model, "
                    "dir)`."
                )
        originals = {}
        with torch.no_grad():
            for name, edit in edits.items():
                weight = self._module(name).weight
                rows = edit.rows.to(weight.device)
                originals[name] = weight[rows].clone()
                weight[rows] += edit.delta().to(weight)
        self._original_rows = originals

    def revert(self):
        """Restores the weights saved by [`~SparseSafetyEditor.apply`], bit for bit."""
        if self._original_rows is None:
            raise RuntimeError("Nothing to revert: the edit is not applied.")
        with torch.no_grad():
            for name, original in self._original_rows.items():
                weight = self._module(name).weight
                weight[self.edits[name].rows.to(weight.device)] = original
        self._original_rows = None

    def save_pretrained(self, save_directory):
        """Writes the edit as a PEFT LoRA adapter that reproduces it exactly over the original (unedited) base.

        Each edited projection gets `lora_A` = `(R⁻¹U_r)ᵀ` and `lora_B` = `Σ_r V_rᵀ` transposed into the rows of its
        safety neurons (zero elsewhere), with `r = lora_alpha = rank` (scaling 1) and no dropout. Load it with
        `PeftModel.from_pretrained(base_model, save_directory)`, also over a 4-bit base. `sparse_edit.json` records the
        configuration and the edited neurons.

        Args:
            save_directory (`str` or `os.PathLike`):
                Folder to write `adapter_config.json`, `adapter_model.safetensors` and `sparse_edit.json` into.

        Returns:
            `str`: `save_directory`.
        """
        edits = self._require_edits()
        os.makedirs(save_directory, exist_ok=True)
        state_dict = {}
        for name, edit in edits.items():
            lora_a, lora_b = lora_factors(edit.left, edit.right, edit.rows, self._module(name).out_features)
            # PEFT's saved keys: the module name under `base_model.model.`, without the adapter name.
            state_dict[f"base_model.model.{name}.lora_A.weight"] = lora_a
            state_dict[f"base_model.model.{name}.lora_B.weight"] = lora_b
        save_file(state_dict, os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"})
        LoraConfig(
            r=self.config.rank,
            lora_alpha=self.config.rank,
            lora_dropout=0.0,
            bias="none",
            target_modules=sorted(edits),
            task_type="CAUSAL_LM",
            # The Hub id when known: a local folder's absolute path must not travel with a pushed adapter.
            base_model_name_or_path=hub_model_id_of(self.model.config._name_or_path),
        ).save_pretrained(save_directory)
        record = {
            "config": self.config.to_dict(),
            "layers": sorted({edit.layer for edit in edits.values()}),
            "edited_neurons": {name: edit.rows.tolist() for name, edit in edits.items()},
        }
        with open(os.path.join(save_directory, "sparse_edit.json"), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        return str(save_directory)

    def create_model_card(
        self, save_directory, hub_model_id=None, safety_report=None, baseline_report=None, license=None,
        eval_dataset_name=EVAL_DATASET_NAME, eval_dataset_type=EVAL_DATASET_TYPE,
    ):
        """Writes the multilingual safety model card (`README.md`) and, with `safety_report`, its ASR chart into
        `save_directory`.

        Args:
            save_directory (`str` or `os.PathLike`):
                Folder of the saved adapter.
            hub_model_id (`str`, *optional*):
                Repository the card is for; defaults to the folder's name.
            safety_report ([`~hf_mlsafety.evaluation.SafetyReport`], *optional*):
                Evaluation of the edited model, shown in the card (with `baseline_report`: before → after).
            license (`str`, *optional*):
                Licence for the card when the base model has none recorded.
            eval_dataset_name (`str`, *optional*, defaults to the built-in test prompts):
                Name of the evaluation set in the card and its `model-index`; `eval_dataset_type` is its id.
        """
        from ..evaluation import plot_asr_comparison
        from ..model_card import CHART_FILE, generate_safety_model_card

        os.makedirs(save_directory, exist_ok=True)
        chart_file = None
        if safety_report is not None:
            reports = [baseline_report, safety_report] if baseline_report is not None else [safety_report]
            plot_asr_comparison(reports, os.path.join(save_directory, CHART_FILE))
            chart_file = CHART_FILE
        hub_model_id = hub_model_id or os.path.basename(os.path.abspath(save_directory))
        generate_safety_model_card(
            model_name=hub_model_id.split("/")[-1],
            method_name=self._name,
            paper=self._paper,
            method_summary=(
                "Training-free: the MLP safety neurons are found by contrasting harmful and harmless prompts, then a "
                "closed-form, low-rank, regularised least-squares edit maps low-resource harmful representations "
                "onto the English ones while penalising any change on harmless anchors. The edit is stored as an "
                "exact LoRA adapter."
            ),
            base_model_name_or_path=self.model.config._name_or_path,
            hub_model_id=hub_model_id,
            languages=list(self.safety_neurons or []),
            tags=self._tag_names,
            license=license,
            training_config=self.config.to_dict(),
            report=safety_report,
            baseline_report=baseline_report,
            eval_dataset_name=eval_dataset_name,
            eval_dataset_type=eval_dataset_type,
            chart_file=chart_file,
        ).save(os.path.join(save_directory, "README.md"))

    def push_to_hub(
        self, repo_id, private=None, token=None, commit_message="Upload sparse safety edit", safety_report=None,
        baseline_report=None, license=None,
    ):
        """Uploads the adapter of [`~SparseSafetyEditor.save_pretrained`], the tokenizer, a multilingual safety model
        card and (with `safety_report`) its chart to the Hub repository `repo_id` (created if needed), in one commit.

        Args:
            repo_id (`str`):
                Target repository.
            safety_report ([`~hf_mlsafety.evaluation.SafetyReport`], *optional*):
                Evaluation of the edited model, shown in the card (with `baseline_report`: before → after).
            license (`str`, *optional*):
                Licence for the card when the base model has none recorded.

        Returns:
            The commit info.
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            self.processing_class.save_pretrained(folder)
            self.create_model_card(
                folder, hub_model_id=repo_id, safety_report=safety_report, baseline_report=baseline_report,
                license=license,
            )
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)

    # -----------------------------------------------------------------------------------------------------------------
    # Plumbing

    def _rows_by_language(self, dataset, label, argument, require_parallel=False):
        """Validates a probe set of one label; returns `{language: (prompts, parallel_ids)}` in order of appearance."""
        validate_probes(dataset, require_parallel=require_parallel)
        wrong = [index for index, value in enumerate(dataset["label"]) if value != label]
        if wrong:
            raise ValueError(
                f"`{argument}` must hold only {label!r} rows; row(s) {wrong[:10]} have another 'label'"
                + (f" (and {len(wrong) - 10} more)" if len(wrong) > 10 else "")
                + "."
            )
        if len(dataset) == 0:
            raise ValueError(f"`{argument}` has no rows.")
        rows = defaultdict(lambda: ([], []))
        for prompt, language, parallel_id in zip(
            dataset["prompt"], dataset["language"], dataset["parallel_id"], strict=True
        ):
            rows[language][0].append(prompt)
            rows[language][1].append(parallel_id)
        return dict(rows)

    def _require_neurons(self, languages=()):
        if self.safety_neurons is None:
            raise RuntimeError("No safety neurons yet: call `find_safety_neurons` (or `fit`) first.")
        missing = [language for language in languages if language not in self.safety_neurons]
        if missing:
            raise ValueError(
                f"No safety neurons for {missing}: run `find_safety_neurons` with harmful and harmless rows in them."
            )
        return self.safety_neurons

    def _require_edits(self):
        if self.edits is None:
            raise RuntimeError("No edit yet: call `fit` first.")
        return self.edits

    def _module(self, name):
        return self.model.get_submodule(name)

    def _edit_rows(self, layer, module, languages):
        indices = [self.safety_neurons[language][layer][module] for language in languages]
        return torch.unique(torch.cat(indices)) if indices else torch.empty(0, dtype=torch.long)

    @staticmethod
    def _weight_rows(linear, rows):
        """Rows of the weight in float64; 4-bit weights are dequantised (nothing is written back)."""
        if isinstance(linear, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state)
        elif linear.weight.is_floating_point():
            weight = linear.weight
        else:
            raise TypeError(
                f"{type(linear).__name__} weights of dtype {linear.weight.dtype} are not supported: load the model in "
                "full or half precision or in bitsandbytes 4-bit."
            )
        return weight.detach()[rows.to(weight.device)].to(torch.float64).cpu()

    def _encode(self, prompt):
        text = self.processing_class.apply_chat_template(
            as_user_turn(prompt), add_generation_prompt=True, tokenize=False
        )
        return self.processing_class(text, add_special_tokens=False)["input_ids"]

    def _left_padded(self, sequences):
        """Left-padded batch (the last prompt token at position -1), positions counted from the first real token."""
        pad_id = self.processing_class.pad_token_id
        if pad_id is None:
            pad_id = self.processing_class.eos_token_id
        length = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        device = self.model.device
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "position_ids": position_ids.to(device),
        }

    @contextlib.contextmanager
    def _inference(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _pooled_activations(self, prompts, layers, outputs=False, inputs=False):
        """Yields, per batch, the batch's row indices into `prompts` and `{(layer, module): (batch, d_ff)}` outputs
        and/or `{layer: (batch, d_in)}` inputs of the projections, pooled over tokens (`config.token_pooling`), in
        float64 on CPU.

        Prompts run sorted by token count (one prompt in ten languages varies 2-4x in length: less padding), no
        vocabulary logits are computed, and the forward stops once the last requested projection has run.
        """
        captured, state = {}, {}
        expected = len(layers) * (len(self.config.modules) * outputs + inputs)

        def pool(hidden):
            hidden = hidden.float()
            if self.config.token_pooling == "last_prompt_token":
                return hidden[:, -1].double().cpu()
            mask = state["attention_mask"].unsqueeze(-1).to(hidden)
            return ((hidden * mask).sum(1) / mask.sum(1)).double().cpu()

        def capture(key, hidden):
            captured[key] = pool(hidden)
            if len(captured) == expected:
                raise _AllCaptured

        handles = []
        for layer in layers:
            for module in self.config.modules:
                linear = self.projections[layer, module][1]
                if outputs:
                    handles.append(
                        linear.register_forward_hook(
                            lambda _, __, output, key=(layer, module): capture(key, output)
                        )
                    )
            if inputs:  # every configured projection reads the same input
                linear = self.projections[layer, self.config.modules[0]][1]
                handles.append(linear.register_forward_pre_hook(lambda _, args, key=layer: capture(key, args[0])))
        encoded = [self._encode(prompt) for prompt in prompts]
        order = sorted(range(len(prompts)), key=lambda index: len(encoded[index]))
        try:
            with self._inference():
                for start in range(0, len(order), self.config.batch_size):
                    indices = order[start : start + self.config.batch_size]
                    batch = self._left_padded([encoded[index] for index in indices])
                    state["attention_mask"] = batch["attention_mask"]
                    captured.clear()
                    try:
                        self.model(**batch, use_cache=False, logits_to_keep=1)
                    except _AllCaptured:
                        pass
                    yield indices, dict(captured)
        finally:
            for handle in handles:
                handle.remove()

    def _features(self, prompts, layers):
        """Pooled inputs of the edited projections: `{layer: (len(prompts), d_in)}` in float64, in the order of
        `prompts`."""
        features = {}
        for indices, batch in self._pooled_activations(prompts, layers, inputs=True):
            for layer in layers:
                if layer not in features:
                    features[layer] = torch.empty(len(prompts), batch[layer].shape[-1], dtype=torch.float64)
                features[layer][indices] = batch[layer]
        return features

    @contextlib.contextmanager
    def _scaled_neurons(self, neurons, alpha):
        """Multiplies the outputs of `neurons` (`{layer: {module: indices}}`) by `alpha` at every position."""

        def scale(output, index):
            output = output.clone()
            output[..., index] *= alpha
            return output

        handles = [
            self.projections[layer, module][1].register_forward_hook(
                lambda _, __, output, index=index: scale(output, index.to(output.device))
            )
            for layer, modules in neurons.items()
            for module, index in modules.items()
            if len(index)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _continuation_logprob(self, prompts, continuation):
        """Mean over prompts of the mean per-token log-probability of `continuation` (token ids) after each prompt."""
        total = 0.0
        targets = torch.tensor(continuation, dtype=torch.long, device=self.model.device)
        with self._inference():
            for start in range(0, len(prompts), self.config.batch_size):
                sequences = [self._encode(p) + continuation for p in prompts[start : start + self.config.batch_size]]
                logits = self.model(**self._left_padded(sequences), use_cache=False).logits.float()
                # Position t predicts token t + 1: the continuation is predicted by the positions just before it.
                logprobs = logits[:, -len(continuation) - 1 : -1].log_softmax(-1)
                picked = logprobs.gather(-1, targets.expand(len(sequences), -1).unsqueeze(-1)).squeeze(-1)
                total += picked.mean(-1).sum().item()
        return total / len(prompts)
