"""hf-mlsafety: multilingual safety alignment for the Hugging Face stack, as drop-in TRL trainers."""

import importlib


__version__ = "0.1.0.dev0"

# Public names and the modules that define them. Imported on first use: importing TRL takes seconds, and
# `import hf_mlsafety` should not.
_LAZY_IMPORTS = {
    "MLCConfig": "hf_mlsafety.trainer.mlc_config",
    "MLCTrainer": "hf_mlsafety.trainer.mlc_trainer",
    "MLCSFTConfig": "hf_mlsafety.trainer.mlc_sft_config",
    "MLCSFTTrainer": "hf_mlsafety.trainer.mlc_sft_trainer",
    "MPOConfig": "hf_mlsafety.trainer.mpo_config",
    "MPOTrainer": "hf_mlsafety.trainer.mpo_trainer",
    "MSDConfig": "hf_mlsafety.trainer.msd_config",
    "MSDTrainer": "hf_mlsafety.trainer.msd_trainer",
    "SparseEditConfig": "hf_mlsafety.editing.sparse_edit_config",
    "SparseSafetyEditor": "hf_mlsafety.editing.sparse_editor",
    "SafetyEvaluator": "hf_mlsafety.evaluation",
    "SafetyReport": "hf_mlsafety.evaluation",
    "RefusalJudge": "hf_mlsafety.evaluation",
    "GuardModelJudge": "hf_mlsafety.evaluation",
    "SafetyEvalCallback": "hf_mlsafety.evaluation",
    "load_builtin_dataset": "hf_mlsafety.data",
    "load_multijail": "hf_mlsafety.data",
}

__all__ = ["__version__", *_LAZY_IMPORTS]


def __getattr__(name):
    if name in _LAZY_IMPORTS:
        return getattr(importlib.import_module(_LAZY_IMPORTS[name]), name)
    raise AttributeError(f"module 'hf_mlsafety' has no attribute {name!r}")
