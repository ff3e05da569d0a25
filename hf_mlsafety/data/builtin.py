"""Built-in multilingual safety data, written for this project and shipped with the package.

160 harmful requests in 16 harm categories and 160 harmless requests (a quarter of them borderline-looking, such as
"kill a frozen process"), each parallel in the ten MultiJail languages. Every harmful request has a safe refusal and an
unsafe compliance opening (the first sentence of going along, with no harmful detail) in all ten languages; every
harmless request has a helpful English answer. Fixed splits: 112 train, 16 dev, 32 test per kind.
"""

import json
from importlib import resources

from datasets import Dataset

from ..languages import MULTIJAIL_LANGUAGES, check_languages
from .formats import wide_to_mlc, wide_to_mpo, wide_to_msd, wide_to_preference, wide_to_probes


SPLITS = ("train", "dev", "test")
# Unneeded refusals: the rejected response of a harmless request when `harmless=True` (written for this project)
OVER_REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I can't assist with that.",
    "Sorry, I'm not able to help with this.",
    "I won't help with that, as it could be harmful.",
    "I'm afraid I can't provide that information.",
    "I cannot help with this request.",
)
TASKS = ("wide", "preference", "mlc", "mlc_sft", "mpo", "msd", "probes")


def _read_part_files(kind):
    folder = resources.files("hf_mlsafety.data").joinpath("builtin")
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.startswith(f"{kind}_part"))
    rows = []
    for name in names:
        with folder.joinpath(name).open(encoding="utf-8") as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return rows


def builtin_wide_table(kind, split="train"):
    """The built-in items of one kind as a wide table.

    Args:
        kind (`str`):
            `"harmful"` or `"harmless"`.
        split (`str`, *optional*, defaults to `"train"`):
            `"train"`, `"dev"`, `"test"` or `"all"`.

    Returns:
        [`~datasets.Dataset`] with `id`, `category`, `label`, `split`, one prompt column per language and
        `chosen_<lang>` (refusal) / `rejected_<lang>` (compliance opening) for harmful items, `chosen_en` (answer) for
        harmless ones.
    """
    if kind not in ("harmful", "harmless"):
        raise ValueError(f"`kind` must be 'harmful' or 'harmless', got {kind!r}.")
    if split not in (*SPLITS, "all"):
        raise ValueError(f"`split` must be one of {[*SPLITS, 'all']}, got {split!r}.")
    table = []
    for item in _read_part_files(kind):
        if split != "all" and item["split"] != split:
            continue
        row = {"id": item["id"], "category": item["category"], "label": kind, "split": item["split"]}
        row.update(item["prompt"])
        if kind == "harmful":
            row.update({f"chosen_{code}": text for code, text in item["refusal"].items()})
            row.update({f"rejected_{code}": text for code, text in item["compliance"].items()})
        else:
            row["chosen_en"] = item["answer"]["en"]
        table.append(row)
    return Dataset.from_list(table)


def load_builtin_dataset(task, split="train", languages=None, conversational=True, harmless=False):
    """Loads the built-in data in the format of one method.

    Args:
        task (`str`):
            One of
            - `"wide"`: the harmful items as a wide table (see [`builtin_wide_table`]);
            - `"preference"`: `prompt`, `chosen` (refusal), `rejected` (compliance), `language`: one row per harmful
              item and language (English only by default: the English-only DPO baseline);
            - `"mlc"`: English preference triples plus one `prompt_<lang>` column per language (DPO + MLC);
            - `"mlc_sft"`: English `prompt`, `completion` (refusal) plus `prompt_<lang>` columns (SFT + MLC);
            - `"mpo"`: English triples plus target-language triples, one row per item and non-English language;
            - `"msd"`: `prompt`, `prompt_en`, `language`, `label` for harmful and harmless queries, one row per item and
              non-English language;
            - `"probes"`: `prompt`, `language`, `parallel_id`, `label` for harmful and harmless items (sparse editor,
              evaluation).
        split (`str`, *optional*, defaults to `"train"`):
            `"train"`, `"dev"`, `"test"` or `"all"`.
        languages (`list[str]`, *optional*):
            Languages to include; defaults to English for `"preference"` and to the ten MultiJail languages otherwise.
            For `"mpo"` and `"msd"` English is the dominant / pivot language and is left out of the targets.
        conversational (`bool`, *optional*, defaults to `True`):
            Training tasks (`"preference"`, `"mlc"`, `"mlc_sft"`, `"mpo"`, `"msd"`) in TRL's conversational format:
            prompts as user turns, responses as assistant turns, so the trainers render them with the model's chat
            template, as the model sees them at inference. `False` gives plain text, which TRL tokenizes as is.

    Returns:
        [`~datasets.Dataset`]
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: choose one of {list(TASKS)}.")
    if languages is None:
        languages = ["en"] if task == "preference" else MULTIJAIL_LANGUAGES
    languages = check_languages(languages)
    for code in languages:
        if code not in MULTIJAIL_LANGUAGES:
            raise ValueError(f"The built-in data covers {MULTIJAIL_LANGUAGES}; language {code!r} is not among them.")
    harmful = builtin_wide_table("harmful", split)
    targets = [code for code in languages if code != "en"]
    if task == "wide":
        return harmful.select_columns(
            ["id", "category", "label", "split", *languages]
            + [f"{kind}_{code}" for code in languages for kind in ("chosen", "rejected")]
        )
    if harmless and task not in ("preference", "mlc", "mlc_sft"):
        raise ValueError(f"`harmless=True` applies to the tasks 'preference', 'mlc' and 'mlc_sft', not {task!r}.")
    if harmless:
        answered = builtin_wide_table("harmless", split)
        answered = answered.add_column(
            "rejected_en", [OVER_REFUSALS[index % len(OVER_REFUSALS)] for index in range(len(answered))]
        )
    if task == "preference":
        parts = [
            wide_to_preference(harmful, code, conversational).add_column("language", [code] * len(harmful))
            for code in languages
        ]
        if harmless:
            parts.append(wide_to_preference(answered, "en", conversational).add_column("language", ["en"] * len(answered)))
        return Dataset.from_list([row for part in parts for row in part])
    if task in ("mlc", "mlc_sft"):
        tables = [harmful, answered] if harmless else [harmful]
        parts = [wide_to_mlc(table, languages, sft=task == "mlc_sft", conversational=conversational) for table in tables]
        return Dataset.from_list([row for part in parts for row in part])
    if task == "mpo":
        return wide_to_mpo(harmful, targets, conversational=conversational)
    harmless_table = builtin_wide_table("harmless", split)
    if task == "msd":
        parts = [wide_to_msd(table, targets, conversational=conversational) for table in (harmful, harmless_table)]
        labels = [label for table in (harmful, harmless_table) for label in table["label"] for _ in targets]
        return Dataset.from_list([row for part in parts for row in part]).add_column("label", labels)
    return Dataset.from_list(
        [row for table in (harmful, harmless_table) for row in wide_to_probes(table, languages)]
    )
