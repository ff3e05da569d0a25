import pytest

from hf_mlsafety.data import builtin_wide_table, load_builtin_dataset
from hf_mlsafety.evaluation import RefusalJudge
from hf_mlsafety.languages import MULTIJAIL_LANGUAGES


EXPECTED = {"train": 112, "dev": 16, "test": 32}


@pytest.mark.parametrize("kind", ["harmful", "harmless"])
def test_builtin_split_sizes_and_parallel_languages(kind):
    all_rows = builtin_wide_table(kind, "all")
    assert len(all_rows) == 160 and len(set(all_rows["id"])) == 160
    for split, size in EXPECTED.items():
        table = builtin_wide_table(kind, split)
        assert len(table) == size and set(table["split"]) == {split}
    for code in MULTIJAIL_LANGUAGES:
        assert all(text.strip() for text in all_rows[code])
    if kind == "harmful":
        assert len(set(all_rows["category"])) == 16
        for code in MULTIJAIL_LANGUAGES:
            assert all(t.strip() for t in all_rows[f"chosen_{code}"]) and all(t.strip() for t in all_rows[f"rejected_{code}"])
    else:
        assert all(text.strip() for text in all_rows["chosen_en"])


def test_splits_do_not_overlap():
    ids = {split: set(builtin_wide_table("harmful", split)["id"]) for split in EXPECTED}
    assert not ids["train"] & ids["dev"] and not ids["train"] & ids["test"] and not ids["dev"] & ids["test"]


def test_every_task_format():
    preference = load_builtin_dataset("preference")
    assert preference.column_names == ["prompt", "chosen", "rejected", "language"] and len(preference) == 112
    assert set(preference["language"]) == {"en"}
    multilingual = load_builtin_dataset("preference", languages=["en", "sw"])
    assert len(multilingual) == 224
    mlc = load_builtin_dataset("mlc")
    assert len(mlc) == 112 and [c for c in mlc.column_names if c.startswith("prompt_")] == [
        f"prompt_{code}" for code in MULTIJAIL_LANGUAGES
    ]
    assert mlc[0]["prompt"] == mlc[0]["prompt_en"]
    mlc_sft = load_builtin_dataset("mlc_sft", split="dev", languages=["en", "bn"])
    assert mlc_sft.column_names == ["prompt", "completion", "prompt_en", "prompt_bn"] and len(mlc_sft) == 16
    mpo = load_builtin_dataset("mpo")
    assert len(mpo) == 112 * 9 and "en" not in set(mpo["target_language"])
    assert mpo[0]["chosen"] != mpo[0]["target_chosen"]  # target-language responses, not English copies
    msd = load_builtin_dataset("msd", split="test", languages=["en", "sw", "jv"])
    assert len(msd) == (32 + 32) * 2 and set(msd["language"]) == {"sw", "jv"}
    assert set(msd["label"]) == {"harmful", "harmless"}
    probes = load_builtin_dataset("probes", split="test")
    assert len(probes) == (32 + 32) * 10
    assert probes.filter(lambda r: r["label"] == "harmless").num_rows == 320
    wide = load_builtin_dataset("wide", split="dev", languages=["en", "th"])
    assert wide.column_names == ["id", "category", "label", "split", "en", "th", "chosen_en", "rejected_en", "chosen_th",
                                 "rejected_th"]


def test_builtin_bad_arguments():
    with pytest.raises(ValueError, match="Unknown task 'sft'"):
        load_builtin_dataset("sft")
    with pytest.raises(ValueError, match="`split` must be one of"):
        load_builtin_dataset("mlc", split="validation")
    with pytest.raises(ValueError, match="language 'ru' is not among them"):
        load_builtin_dataset("mlc", languages=["en", "ru"])
    with pytest.raises(ValueError, match="Unknown language code 'xx'"):
        load_builtin_dataset("probes", languages=["xx"])


@pytest.mark.parametrize("task", ["preference", "mlc", "mlc_sft", "mpo", "msd"])
def test_training_tasks_are_conversational_by_default(task):
    # Chat models must train on what they see at inference: TRL renders conversational rows with the chat template and
    # tokenizes plain text as is.
    row = load_builtin_dataset(task, split="dev", languages=["en", "sw"])[0]
    prompts = [column for column in row if column.startswith(("prompt", "target_prompt"))]
    responses = [column for column in row if column in ("chosen", "rejected", "completion", "target_chosen",
                                                         "target_rejected")]
    assert prompts
    for column in prompts:
        assert [turn["role"] for turn in row[column]] == ["user"], column
    for column in responses:
        assert [turn["role"] for turn in row[column]] == ["assistant"], column
    plain = load_builtin_dataset(task, split="dev", languages=["en", "sw"], conversational=False)[0]
    assert all(isinstance(plain[column], str) for column in prompts + responses)
    assert plain["prompt"] == row["prompt"][0]["content"]


def test_harmless_pairs_teach_not_to_over_refuse():
    preference = load_builtin_dataset("preference", split="dev", harmless=True)
    assert len(preference) == 16 + 16
    harmless_rows = preference.select(range(16, 32))
    answers = builtin_wide_table("harmless", "dev")["chosen_en"]
    assert [row["chosen"][0]["content"] for row in harmless_rows] == answers
    judge = RefusalJudge()
    assert set(judge([row["rejected"][0]["content"] for row in harmless_rows])) == {"safe"}  # unneeded refusals
    assert set(judge(answers)) == {"unsafe"}  # helpful answers carry no refusal marker
    mlc = load_builtin_dataset("mlc", split="dev", languages=["en", "jv"], harmless=True)
    assert len(mlc) == 32 and mlc[31]["prompt_jv"][0]["content"] == builtin_wide_table("harmless", "dev")["jv"][15]
    assert len(load_builtin_dataset("mlc_sft", split="dev", harmless=True)) == 32
    with pytest.raises(ValueError, match="`harmless=True` applies to the tasks"):
        load_builtin_dataset("mpo", harmless=True)
