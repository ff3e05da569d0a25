import os
import tempfile


# Offline and quiet before anything imports huggingface_hub (its constants are read at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_mlsafety_tests_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402

from hf_mlsafety.testing import tiny_model_path  # noqa: E402


# Evaluation data lives beside the checkout, never inside it.
EVAL_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "eval-data")


@pytest.fixture(scope="session")
def tiny_model_dir():
    """A tiny Llama model + tokenizer folder, built once per test session."""
    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def multijail_csv():
    """Path of the MultiJail CSV kept beside the checkout (../shared/eval-data); tests using it skip when absent."""
    path = os.path.join(EVAL_DATA, "MultiJail.csv")
    if not os.path.isfile(path):
        pytest.skip("MultiJail.csv is evaluation data kept outside the repository (../shared/eval-data); absent here")
    return path
