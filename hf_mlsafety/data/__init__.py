"""Data layer: the column convention, converters, validation, built-in data and benchmark loaders."""

from .builtin import builtin_wide_table, load_builtin_dataset
from .formats import (
    probes_to_wide,
    text_of,
    validate_mlc_dataset,
    validate_mpo_dataset,
    validate_msd_dataset,
    validate_preference_dataset,
    validate_probes,
    validate_wide_table,
    wide_to_mlc,
    wide_to_mpo,
    wide_to_msd,
    wide_to_preference,
    wide_to_probes,
)
from .multijail import MULTIJAIL_HUB_ID, load_multijail


__all__ = [
    "MULTIJAIL_HUB_ID",
    "builtin_wide_table",
    "load_builtin_dataset",
    "load_multijail",
    "probes_to_wide",
    "text_of",
    "validate_mlc_dataset",
    "validate_mpo_dataset",
    "validate_msd_dataset",
    "validate_preference_dataset",
    "validate_probes",
    "validate_wide_table",
    "wide_to_mlc",
    "wide_to_mpo",
    "wide_to_msd",
    "wide_to_preference",
    "wide_to_probes",
]
