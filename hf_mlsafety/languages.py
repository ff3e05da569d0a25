"""Language codes, display names and MultiJail resource tiers shared by every part of the package."""

# The ten MultiJail languages (English first), in the order used everywhere a fixed order matters.
MULTIJAIL_LANGUAGES = ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]

LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Chinese",
    "it": "Italian",
    "vi": "Vietnamese",
    "ar": "Arabic",
    "ko": "Korean",
    "th": "Thai",
    "bn": "Bengali",
    "sw": "Swahili",
    "jv": "Javanese",
    # Languages used by the papers' own data, accepted as codes although the built-in data does not cover them.
    "ru": "Russian",
    "ja": "Japanese",
    "ur": "Urdu",
    "ps": "Pashto",
    "ku": "Kurdish",
    "id": "Indonesian",
    "he": "Hebrew",
    "hi": "Hindi",
    "es": "Spanish",
    "fr": "French",
    "de": "German",
    "pt": "Portuguese",
    "tr": "Turkish",
    "fa": "Persian",
    "yo": "Yoruba",
    "te": "Telugu",
}

# MultiJail's resource tiers (Deng et al., 2023).
RESOURCE_TIERS = {
    "high": ["zh", "it", "vi"],
    "medium": ["ar", "ko", "th"],
    "low": ["bn", "sw", "jv"],
}


def check_languages(languages, argument="languages"):
    """Returns `languages` as a list after checking every code is a known ISO 639-1 code, without duplicates.

    Args:
        languages (`list[str]` or `str`):
            Language codes; a comma-separated string is accepted.
        argument (`str`, *optional*, defaults to `"languages"`):
            Name of the argument being checked, used in the error message.

    Raises:
        `ValueError`: naming the unknown or repeated code and the argument.
    """
    if isinstance(languages, str):
        languages = [code.strip() for code in languages.split(",") if code.strip()]
    languages = list(languages)
    if not languages:
        raise ValueError(f"`{argument}` is empty: give at least one language code.")
    for code in languages:
        if code not in LANGUAGE_NAMES:
            raise ValueError(
                f"Unknown language code {code!r} in `{argument}`. Known codes: {', '.join(sorted(LANGUAGE_NAMES))}."
            )
    repeated = sorted({code for code in languages if languages.count(code) > 1})
    if repeated:
        raise ValueError(f"Language code(s) {repeated} appear more than once in `{argument}`.")
    return languages
