import pytest

from hf_mlsafety.data import load_multijail
from hf_mlsafety.languages import MULTIJAIL_LANGUAGES


def test_load_multijail_from_local_csv(multijail_csv):
    wide = load_multijail(multijail_csv)
    assert len(wide) == 315
    assert wide.column_names == ["id", "source", "tags", *MULTIJAIL_LANGUAGES]  # byte-order mark stripped from "id"
    assert wide[0]["id"] == "0" and isinstance(wide[0]["tags"], list) and wide[0]["tags"]
    # Rows 306 and 307 hold line breaks inside quoted fields: parsed as one row each, not split.
    assert "\n" in wide[306]["en"] and "\n" not in wide[306]["zh"]
    assert all(text.strip() for code in MULTIJAIL_LANGUAGES for text in wide[code])


def test_load_multijail_as_probes_for_some_languages(multijail_csv):
    probes = load_multijail(multijail_csv, languages=["en", "sw"], output_format="probes")
    assert len(probes) == 630
    assert set(probes["language"]) == {"en", "sw"} and set(probes["label"]) == {"harmful"}
    assert probes[1]["parallel_id"] == probes[0]["parallel_id"] == "0"


def test_load_multijail_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="Unknown language code 'xx'"):
        load_multijail("unused.csv", languages=["xx"])
    with pytest.raises(ValueError, match="`output_format` must be"):
        load_multijail("unused.csv", output_format="long")
    with pytest.raises(ValueError, match="is not a file"):
        load_multijail(str(tmp_path))
    bad = tmp_path / "bad.csv"
    bad.write_text("id,source,tags,en,zh\n0,x,[],hello,\n", encoding="utf-8")
    with pytest.raises(ValueError, match="row 0, column 'zh': empty text"):
        load_multijail(str(bad), languages=["en", "zh"])
