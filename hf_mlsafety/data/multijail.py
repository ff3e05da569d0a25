"""Run-time loader for MultiJail (Deng et al., ICLR 2024), an evaluation-only benchmark: never train on it."""

import ast
import os

from datasets import Value, load_dataset

from ..languages import MULTIJAIL_LANGUAGES, check_languages
from .formats import validate_wide_table, wide_to_probes


MULTIJAIL_HUB_ID = "DAMO-NLP-SG/MultiJail"


def load_multijail(path_or_hub_id=MULTIJAIL_HUB_ID, languages=None, output_format="wide"):
    """Loads MultiJail's 315 harmful prompts in the ten languages from the Hub or from a local CSV file.

    The public CSV starts with a byte-order mark and has line breaks inside quoted fields; both are handled.

    Args:
        path_or_hub_id (`str`, *optional*, defaults to `"DAMO-NLP-SG/MultiJail"`):
            A Hub dataset id, or the path of a local `MultiJail.csv`.
        languages (`list[str]`, *optional*):
            Languages to keep; defaults to all ten.
        output_format (`str`, *optional*, defaults to `"wide"`):
            `"wide"` (columns `id`, `source`, `tags` as a list, one prompt column per language) or `"probes"`
            (`prompt`, `language`, `parallel_id`, `label="harmful"`).

    Returns:
        [`~datasets.Dataset`]
    """
    languages = check_languages(languages or MULTIJAIL_LANGUAGES)
    if output_format not in ("wide", "probes"):
        raise ValueError(f"`output_format` must be 'wide' or 'probes', got {output_format!r}.")
    if os.path.isfile(path_or_hub_id):
        # pandas' C parser handles quoted line breaks; "utf-8-sig" strips the byte-order mark from the first header.
        dataset = load_dataset("csv", data_files=path_or_hub_id, split="train", encoding="utf-8-sig")
    elif os.path.exists(path_or_hub_id):
        raise ValueError(f"{path_or_hub_id!r} exists but is not a file: give the path of MultiJail.csv.")
    else:
        dataset = load_dataset(path_or_hub_id, split="train")
    validate_wide_table(dataset, languages)
    # `tags` is a Python list literal in the CSV, e.g. "['Violence & incitement', 'Weapons']".
    dataset = dataset.cast_column("id", Value("string")).map(
        lambda row: {"tags": ast.literal_eval(row["tags"]) if row["tags"] else []}
    )
    dataset = dataset.select_columns(["id", "source", "tags", *languages])
    if output_format == "probes":
        return wide_to_probes(dataset, languages, label="harmful")
    return dataset
