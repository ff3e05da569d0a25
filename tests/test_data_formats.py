import pytest
from datasets import Dataset

from hf_mlsafety.data import (
    probes_to_wide,
    validate_mlc_dataset,
    validate_mpo_dataset,
    validate_msd_dataset,
    validate_preference_dataset,
    validate_probes,
    wide_to_mlc,
    wide_to_mpo,
    wide_to_msd,
    wide_to_preference,
    wide_to_probes,
)
from hf_mlsafety.languages import check_languages


LANGS = ["en", "sw", "bn"]


def make_wide(rows=2, with_responses=True):
    table = {"id": [f"item{i}" for i in range(rows)], "label": ["harmful"] * rows}
    for code in LANGS:
        table[code] = [f"request {i} in {code}" for i in range(rows)]
        if with_responses:
            table[f"chosen_{code}"] = [f"refusal {i} in {code}" for i in range(rows)]
            table[f"rejected_{code}"] = [f"compliance {i} in {code}" for i in range(rows)]
    return Dataset.from_dict(table)


def test_wide_to_preference_standard_and_conversational():
    standard = wide_to_preference(make_wide(), "sw")
    assert standard.column_names == ["prompt", "chosen", "rejected"]
    assert standard[1] == {"prompt": "request 1 in sw", "chosen": "refusal 1 in sw", "rejected": "compliance 1 in sw"}
    conversational = wide_to_preference(make_wide(), "en", conversational=True)
    assert conversational[0]["prompt"] == [{"role": "user", "content": "request 0 in en"}]
    assert conversational[0]["chosen"] == [{"role": "assistant", "content": "refusal 0 in en"}]


def test_wide_to_mlc_keeps_every_row_and_language():
    mlc = wide_to_mlc(make_wide(3), LANGS)
    assert len(mlc) == 3
    assert mlc.column_names == ["prompt", "chosen", "rejected", "prompt_en", "prompt_sw", "prompt_bn"]
    assert mlc[2]["prompt"] == "request 2 in en" and mlc[2]["prompt_bn"] == "request 2 in bn"
    sft = wide_to_mlc(make_wide(), LANGS, sft=True)
    assert sft.column_names == ["prompt", "completion", "prompt_en", "prompt_sw", "prompt_bn"]
    assert sft[0]["completion"] == "refusal 0 in en"


def test_wide_to_mpo_one_row_per_target_language():
    mpo = wide_to_mpo(make_wide(2), ["sw", "bn"])
    assert len(mpo) == 4
    assert mpo["target_language"] == ["sw", "bn", "sw", "bn"]
    row = mpo[3]
    assert row["prompt"] == "request 1 in en" and row["chosen"] == "refusal 1 in en"
    assert row["target_prompt"] == "request 1 in bn" and row["target_rejected"] == "compliance 1 in bn"
    assert row["parallel_id"] == "item1"
    with pytest.raises(ValueError, match="must not contain the dominant language 'en'"):
        wide_to_mpo(make_wide(), ["en", "sw"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['chosen_en'"):
        wide_to_mpo(make_wide(with_responses=False), ["sw"])


def test_wide_to_msd_pairs_each_target_with_the_pivot():
    msd = wide_to_msd(make_wide(2, with_responses=False), ["sw", "bn"])
    assert msd.column_names == ["prompt", "prompt_en", "language", "parallel_id"]
    assert msd[1] == {"prompt": "request 0 in bn", "prompt_en": "request 0 in en", "language": "bn", "parallel_id": "item0"}


def test_probes_round_trip_through_the_wide_table():
    wide = make_wide(2, with_responses=False)
    probes = wide_to_probes(wide, LANGS)
    assert len(probes) == 6
    assert probes[4] == {"prompt": "request 1 in sw", "language": "sw", "parallel_id": "item1", "label": "harmful"}
    back = probes_to_wide(probes)
    assert back.column_names == ["id", "label", *LANGS]
    assert back.to_list() == wide.select_columns(["id", "label", *LANGS]).to_list()
    with pytest.raises(ValueError, match="no 'label' column"):
        wide_to_probes(wide.remove_columns("label"), LANGS)


def test_missing_language_variant_names_the_column():
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt_bn'\]"):
        validate_mlc_dataset(wide_to_mlc(make_wide(), ["en", "sw"]), LANGS)
    with pytest.raises(ValueError, match=r"column\(s\) not in the list \['prompt_bn'\]"):
        validate_mlc_dataset(wide_to_mlc(make_wide(), LANGS), ["en", "sw"])
    with pytest.raises(ValueError, match="at least two"):
        validate_mlc_dataset(Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"], "prompt_en": ["a"]}))


def test_empty_prompt_names_row_and_column():
    mlc = wide_to_mlc(make_wide(3), LANGS).to_list()
    mlc[2]["prompt_sw"] = "   "
    mlc[0]["prompt_bn"] = ""
    with pytest.raises(ValueError, match="2 problem") as error:
        validate_mlc_dataset(Dataset.from_list(mlc), LANGS)
    assert "row 0, column 'prompt_bn': empty text" in str(error.value)
    assert "row 2, column 'prompt_sw': empty text" in str(error.value)
    with pytest.raises(ValueError, match="row 0, column 'rejected': empty text"):
        validate_preference_dataset(Dataset.from_dict({"prompt": ["p"], "chosen": ["c"], "rejected": [""]}))


def test_unknown_language_code():
    with pytest.raises(ValueError, match="Unknown language code 'xx' in `languages`"):
        check_languages(["en", "xx"])
    with pytest.raises(ValueError, match="appear more than once"):
        check_languages("en,sw,en")
    assert check_languages("en, sw") == ["en", "sw"]
    with pytest.raises(ValueError, match="Column 'prompt_zz': unknown language code 'zz'"):
        validate_mlc_dataset(Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"], "prompt_zz": ["a"]}))
    msd = Dataset.from_dict({"prompt": ["a", "b"], "prompt_en": ["a", "b"], "language": ["sw", "swa"]})
    with pytest.raises(ValueError, match="row 1, column 'language': unknown language code 'swa'"):
        validate_msd_dataset(msd)


def test_mpo_validation_catches_unpaired_and_untranslated_targets():
    rows = wide_to_mpo(make_wide(2), ["sw"]).to_list()
    rows[0]["target_prompt"] = rows[0]["prompt"]
    with pytest.raises(ValueError, match="row 0, column 'target_prompt': identical to 'prompt'"):
        validate_mpo_dataset(Dataset.from_list(rows))
    rows = wide_to_mpo(make_wide(2), ["sw"]).to_list()
    for row in rows:
        row["target_parallel_id"] = "item0"
    with pytest.raises(ValueError, match="row 1, column 'target_parallel_id': 'item0' does not match .*'item1'"):
        validate_mpo_dataset(Dataset.from_list(rows))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['target_language'\]"):
        validate_mpo_dataset(Dataset.from_list(rows).remove_columns("target_language"))


def test_mismatched_parallel_ids():
    probes = wide_to_probes(make_wide(2, with_responses=False), LANGS).to_list()
    duplicated = [dict(row) for row in probes]
    duplicated[4]["parallel_id"] = "item0"  # item0 twice in "sw", item1 now missing "sw"
    with pytest.raises(ValueError) as error:
        validate_probes(Dataset.from_list(duplicated), require_parallel=True)
    assert "rows [1, 4], column 'parallel_id': 'item0' appears more than once in 'sw'" in str(error.value)
    assert "'item1' has no row in language(s) ['sw']" in str(error.value)
    mixed = [dict(row) for row in probes]
    mixed[2]["label"] = "harmless"
    with pytest.raises(ValueError, match="'item0' mixes labels"):
        validate_probes(Dataset.from_list(mixed))
    bad_label = [dict(row) for row in probes]
    bad_label[0]["label"] = "toxic"
    with pytest.raises(ValueError, match="row 0, column 'label': 'toxic' is not one of"):
        validate_probes(Dataset.from_list(bad_label))
    # Without require_parallel, a language missing for one id is allowed (evaluation sets may be ragged).
    validate_probes(Dataset.from_list(probes[:-1]))
