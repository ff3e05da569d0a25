"""The one column convention shared by every method, converters from a wide parallel table, and validation.

Formats (every text cell is a string, or a list of `{"role", "content"}` messages as in TRL's conversational format):

| format | columns |
|---|---|
| wide (the MultiJail layout) | one prompt column per language named by its code (`en`, `zh`, ...); optional response columns `chosen_<lang>` / `rejected_<lang>`; optional `id`, `label`, `category` |
| preference (DPO) | `prompt`, `chosen`, `rejected` |
| MLC | preference columns (or `prompt`, `completion` for SFT) plus one `prompt_<lang>` column per language |
| MPO | dominant `prompt`, `chosen`, `rejected` plus `target_prompt`, `target_chosen`, `target_rejected`, `target_language` |
| MSD | `prompt` (target-language query), `prompt_en` (pivot query), `language` |
| probes (editor, evaluation) | `prompt`, `language`, `parallel_id`, `label` (`harmful` or `harmless`) |

Every converter keeps every row (one output row per input row and language); every validator raises a `ValueError`
that names the row and the column of each problem. Nothing is dropped silently.
"""

from collections import defaultdict

from datasets import Dataset

from ..languages import LANGUAGE_NAMES, check_languages


LABELS = ("harmful", "harmless")
# How many problems one error message lists before it only counts the rest.
_MAX_LISTED_PROBLEMS = 10


def text_of(value):
    """Text of a cell: the string itself, or the joined contents of a list of messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(str(message.get("content", "")) for message in value if isinstance(message, dict))
    return ""


def as_user_turn(prompt):
    """A prompt as a conversational user turn (leaves lists of messages unchanged)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def as_assistant_turn(response):
    """A response as a conversational assistant turn (leaves lists of messages unchanged)."""
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else response


def _conversational(rows, prompt_columns, response_columns):
    """Rows with the prompt columns as user turns and the response columns as assistant turns (TRL's conversational
    format, which the trainers render with the model's chat template)."""
    for row in rows:
        for column in prompt_columns:
            row[column] = as_user_turn(row[column])
        for column in response_columns:
            row[column] = as_assistant_turn(row[column])
    return rows


def _raise_problems(problems, what):
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems[:_MAX_LISTED_PROBLEMS])
        more = len(problems) - _MAX_LISTED_PROBLEMS
        suffix = f"\n  ... and {more} more" if more > 0 else ""
        raise ValueError(f"Invalid {what} ({len(problems)} problem(s)):\n{listed}{suffix}")


def _check_columns(dataset, required, what):
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Invalid {what}: missing column(s) {missing}. Present columns: {dataset.column_names}."
        )


def _empty_cell_problems(dataset, columns):
    problems = []
    for index, row in enumerate(dataset.select_columns(columns)):
        for column in columns:
            if not text_of(row[column]).strip():
                problems.append(f"row {index}, column {column!r}: empty text")
    return problems


def _language_cell_problems(dataset, column):
    return [
        f"row {index}, column {column!r}: unknown language code {code!r}"
        for index, code in enumerate(dataset[column])
        if code not in LANGUAGE_NAMES
    ]


def language_columns(dataset, prefix="prompt_"):
    """Language codes of the `<prefix><lang>` columns of `dataset`, in column order (unknown codes raise)."""
    codes = [column[len(prefix) :] for column in dataset.column_names if column.startswith(prefix)]
    for code in codes:
        if code not in LANGUAGE_NAMES:
            raise ValueError(f"Column {prefix + code!r}: unknown language code {code!r}.")
    return codes


# ----------------------------------------------------------------------------------------------------------------------
# Validation


def validate_preference_dataset(dataset):
    """Checks a DPO-style dataset: columns `prompt`, `chosen`, `rejected`, none empty."""
    _check_columns(dataset, ["prompt", "chosen", "rejected"], "preference dataset")
    _raise_problems(_empty_cell_problems(dataset, ["prompt", "chosen", "rejected"]), "preference dataset")


def validate_mlc_dataset(dataset, languages=None, response_columns=("chosen", "rejected")):
    """Checks an MLC dataset: every `prompt_<lang>` variant present and non-empty in every row.

    Args:
        dataset ([`~datasets.Dataset`]):
            Dataset with `prompt`, the response columns and one `prompt_<lang>` column per language.
        languages (`list[str]`, *optional*):
            Expected languages. When given, the `prompt_<lang>` columns must match this list exactly; when `None` the
            languages are read from the columns.
        response_columns (`tuple[str]`, *optional*, defaults to `("chosen", "rejected")`):
            `("completion",)` for the SFT variant.

    Returns:
        `list[str]`: the languages.
    """
    what = "MLC dataset"
    _check_columns(dataset, ["prompt", *response_columns], what)
    found = language_columns(dataset)
    if languages is None:
        languages = found
    else:
        languages = check_languages(languages, "mlc_languages")
        missing = [code for code in languages if code not in found]
        extra = [code for code in found if code not in languages]
        if missing or extra:
            raise ValueError(
                f"Invalid {what}: the language list {languages} disagrees with the prompt_<lang> columns {found}"
                + (f"; missing column(s) {['prompt_' + c for c in missing]}" if missing else "")
                + (f"; column(s) not in the list {['prompt_' + c for c in extra]}" if extra else "")
                + "."
            )
    if len(languages) < 2:
        raise ValueError(f"Invalid {what}: MLC needs at least two prompt_<lang> columns, found {languages}.")
    columns = ["prompt", *response_columns, *(f"prompt_{code}" for code in languages)]
    _raise_problems(_empty_cell_problems(dataset, columns), what)
    return languages


def validate_mpo_dataset(dataset):
    """Checks an MPO dataset: dominant and target triples present and non-empty, known target language codes, and each
    target row paired with its dominant row (same `parallel_id` when that column exists, and a target prompt that
    differs from the dominant one)."""
    what = "MPO dataset"
    columns = ["prompt", "chosen", "rejected", "target_prompt", "target_chosen", "target_rejected"]
    _check_columns(dataset, [*columns, "target_language"], what)
    problems = _empty_cell_problems(dataset, columns) + _language_cell_problems(dataset, "target_language")
    for index, row in enumerate(dataset.select_columns(["prompt", "target_prompt", "target_language"])):
        if text_of(row["prompt"]).strip() and text_of(row["prompt"]) == text_of(row["target_prompt"]):
            problems.append(
                f"row {index}, column 'target_prompt': identical to 'prompt' (untranslated target for "
                f"{row['target_language']!r}?)"
            )
    if "parallel_id" in dataset.column_names and "target_parallel_id" in dataset.column_names:
        for index, (source, target) in enumerate(zip(dataset["parallel_id"], dataset["target_parallel_id"])):
            if source != target:
                problems.append(
                    f"row {index}, column 'target_parallel_id': {target!r} does not match the dominant row's {source!r}"
                )
    _raise_problems(problems, what)


def validate_msd_dataset(dataset):
    """Checks an MSD dataset: `prompt`, `prompt_en` and `language` present and non-empty, known language codes."""
    what = "MSD dataset"
    _check_columns(dataset, ["prompt", "prompt_en", "language"], what)
    problems = _empty_cell_problems(dataset, ["prompt", "prompt_en"]) + _language_cell_problems(dataset, "language")
    _raise_problems(problems, what)


def validate_probes(dataset, require_parallel=False):
    """Checks a probe set (`prompt`, `language`, `parallel_id`, `label`).

    Args:
        dataset ([`~datasets.Dataset`]):
            The probe set.
        require_parallel (`bool`, *optional*, defaults to `False`):
            Also require every `parallel_id` to be present in every language of the set with one label (needed where
            rows are paired across languages, as in the sparse editor's fit).
    """
    what = "probe set"
    _check_columns(dataset, ["prompt", "language", "parallel_id", "label"], what)
    problems = _empty_cell_problems(dataset, ["prompt"]) + _language_cell_problems(dataset, "language")
    problems += [
        f"row {index}, column 'label': {label!r} is not one of {list(LABELS)}"
        for index, label in enumerate(dataset["label"])
        if label not in LABELS
    ]
    groups = defaultdict(list)
    for index, (parallel_id, language, label) in enumerate(
        zip(dataset["parallel_id"], dataset["language"], dataset["label"])
    ):
        groups[parallel_id].append((index, language, label))
    languages = sorted(set(dataset["language"]))
    for parallel_id, members in groups.items():
        seen = defaultdict(list)
        for index, language, _ in members:
            seen[language].append(index)
        for language, indices in seen.items():
            if len(indices) > 1:
                problems.append(
                    f"rows {indices}, column 'parallel_id': {parallel_id!r} appears more than once in {language!r}"
                )
        if len({label for _, _, label in members}) > 1:
            problems.append(f"rows {[m[0] for m in members]}, column 'label': {parallel_id!r} mixes labels")
        if require_parallel:
            missing = [code for code in languages if code not in seen]
            if missing:
                problems.append(
                    f"row {members[0][0]}, column 'parallel_id': {parallel_id!r} has no row in language(s) {missing}"
                )
    _raise_problems(problems, what)


def validate_wide_table(dataset, languages):
    """Checks a wide table: one non-empty prompt column per language (the MultiJail layout)."""
    languages = check_languages(languages)
    _check_columns(dataset, languages, "wide table")
    _raise_problems(_empty_cell_problems(dataset, languages), "wide table")
    return languages


# ----------------------------------------------------------------------------------------------------------------------
# Converters from a wide parallel table


def _response(row, kind, language, fallback_language):
    """`chosen_<lang>` when the table has it, else the fallback language's response (English-only responses)."""
    return row.get(f"{kind}_{language}", row.get(f"{kind}_{fallback_language}"))


def _row_id(row, index):
    return str(row["id"]) if row.get("id") is not None else str(index)


def wide_to_preference(wide, language="en", conversational=False):
    """Preference rows (`prompt`, `chosen`, `rejected`) in one language from a wide table with response columns."""
    (language,) = validate_wide_table(wide, [language])
    _check_columns(wide, [f"chosen_{language}", f"rejected_{language}"], "wide table")
    rows = [
        {"prompt": row[language], "chosen": row[f"chosen_{language}"], "rejected": row[f"rejected_{language}"]}
        for row in wide
    ]
    if conversational:
        _conversational(rows, ["prompt"], ["chosen", "rejected"])
    dataset = Dataset.from_list(rows)
    validate_preference_dataset(dataset)
    return dataset


def wide_to_mlc(wide, languages, source_language="en", sft=False, conversational=False):
    """MLC rows: the source-language preference triple (or `prompt`/`completion` with `sft=True`, the completion being
    `chosen_<source>`) plus one `prompt_<lang>` column per language in `languages`; every prompt a user turn and every
    response an assistant turn with `conversational=True`."""
    languages = validate_wide_table(wide, languages)
    validate_wide_table(wide, [source_language])
    _check_columns(wide, [f"chosen_{source_language}"] + ([] if sft else [f"rejected_{source_language}"]), "wide table")
    rows = []
    for row in wide:
        out = {"prompt": row[source_language]}
        if sft:
            out["completion"] = row[f"chosen_{source_language}"]
        else:
            out["chosen"] = row[f"chosen_{source_language}"]
            out["rejected"] = row[f"rejected_{source_language}"]
        out.update({f"prompt_{code}": row[code] for code in languages})
        rows.append(out)
    if conversational:
        responses = ["completion"] if sft else ["chosen", "rejected"]
        _conversational(rows, ["prompt", *(f"prompt_{code}" for code in languages)], responses)
    dataset = Dataset.from_list(rows)
    validate_mlc_dataset(dataset, languages, response_columns=("completion",) if sft else ("chosen", "rejected"))
    return dataset


def wide_to_mpo(wide, target_languages, dominant_language="en", conversational=False):
    """MPO rows: one per (wide row, target language). The target responses come from `chosen_<lang>` /
    `rejected_<lang>`; a table without them cannot feed MPO (it needs target-language responses). With
    `conversational=True` prompts are user turns and responses assistant turns."""
    target_languages = validate_wide_table(wide, target_languages)
    if dominant_language in target_languages:
        raise ValueError(f"`target_languages` must not contain the dominant language {dominant_language!r}.")
    validate_wide_table(wide, [dominant_language])
    needed = [f"{kind}_{code}" for code in [dominant_language, *target_languages] for kind in ("chosen", "rejected")]
    _check_columns(wide, needed, "wide table (MPO needs responses in every target language)")
    rows = []
    for index, row in enumerate(wide):
        for code in target_languages:
            rows.append(
                {
                    "prompt": row[dominant_language],
                    "chosen": row[f"chosen_{dominant_language}"],
                    "rejected": row[f"rejected_{dominant_language}"],
                    "target_prompt": row[code],
                    "target_chosen": row[f"chosen_{code}"],
                    "target_rejected": row[f"rejected_{code}"],
                    "target_language": code,
                    "parallel_id": _row_id(row, index),
                }
            )
    if conversational:
        _conversational(rows, ["prompt", "target_prompt"], ["chosen", "rejected", "target_chosen", "target_rejected"])
    dataset = Dataset.from_list(rows)
    validate_mpo_dataset(dataset)
    return dataset


def wide_to_msd(wide, target_languages, pivot_language="en", conversational=False):
    """MSD rows: one per (wide row, target language) with `prompt` (target query), `prompt_en` (pivot query) and
    `language`; the queries are user turns with `conversational=True`. Include the pivot language itself in
    `target_languages` to keep rows where teacher and student see the same query."""
    target_languages = validate_wide_table(wide, target_languages)
    validate_wide_table(wide, [pivot_language])
    rows = [
        {"prompt": row[code], "prompt_en": row[pivot_language], "language": code, "parallel_id": _row_id(row, index)}
        for index, row in enumerate(wide)
        for code in target_languages
    ]
    if conversational:
        _conversational(rows, ["prompt", "prompt_en"], [])
    dataset = Dataset.from_list(rows)
    validate_msd_dataset(dataset)
    return dataset


def wide_to_probes(wide, languages, label=None):
    """Probe rows (`prompt`, `language`, `parallel_id`, `label`), one per (wide row, language).

    The label comes from the table's `label` column, or from `label` for a table of one kind (MultiJail: `"harmful"`).
    """
    languages = validate_wide_table(wide, languages)
    if label is None and "label" not in wide.column_names:
        raise ValueError("The wide table has no 'label' column: pass `label='harmful'` or `label='harmless'`.")
    rows = [
        {
            "prompt": row[code],
            "language": code,
            "parallel_id": _row_id(row, index),
            "label": label if label is not None else row["label"],
        }
        for index, row in enumerate(wide)
        for code in languages
    ]
    dataset = Dataset.from_list(rows)
    validate_probes(dataset, require_parallel=True)
    return dataset


def probes_to_wide(probes):
    """Inverse of [`wide_to_probes`]: one row per `parallel_id` with `id`, `label` and one prompt column per language."""
    validate_probes(probes, require_parallel=True)
    languages = list(dict.fromkeys(probes["language"]))
    table = {}
    for row in probes:
        out = table.setdefault(row["parallel_id"], {"id": row["parallel_id"], "label": row["label"]})
        out[row["language"]] = row["prompt"]
    return Dataset.from_list([{key: row[key] for key in ["id", "label", *languages]} for row in table.values()])
