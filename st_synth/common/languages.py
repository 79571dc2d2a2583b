"""The languages synthetic examples are written in, and how often each is drawn.

The paper samples from the XLM-R language list (93 of its 100 entries) with high-resource languages
up-weighted. XLM-R's 100 entries include five romanised scripts (Bengali, Hindi, Tamil, Telugu and Urdu
Romanized), a second Burmese font (Zawgyi) and two Chinese scripts; dropping the first six and merging
the Chinese pair leaves the 93 names below. The weighting follows one open reproduction: English 0.431,
thirteen high-resource languages 0.029 each, the remaining mass spread evenly.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

from st_synth.common.names import unknown_name
from st_synth.common.text import name_list

XLMR_LANGUAGES: tuple[str, ...] = (
    "Afrikaans", "Albanian", "Amharic", "Arabic", "Armenian", "Assamese", "Azerbaijani", "Basque",
    "Belarusian", "Bengali", "Bosnian", "Breton", "Bulgarian", "Burmese", "Catalan", "Chinese",
    "Croatian", "Czech", "Danish", "Dutch", "English", "Esperanto", "Estonian", "Filipino", "Finnish",
    "French", "Galician", "Georgian", "German", "Greek", "Gujarati", "Hausa", "Hebrew", "Hindi",
    "Hungarian", "Icelandic", "Indonesian", "Irish", "Italian", "Japanese", "Javanese", "Kannada",
    "Kazakh", "Khmer", "Korean", "Kurdish", "Kyrgyz", "Lao", "Latin", "Latvian", "Lithuanian",
    "Macedonian", "Malagasy", "Malay", "Malayalam", "Marathi", "Mongolian", "Nepali", "Norwegian",
    "Oriya", "Oromo", "Pashto", "Persian", "Polish", "Portuguese", "Punjabi", "Romanian", "Russian",
    "Sanskrit", "Scottish Gaelic", "Serbian", "Sindhi", "Sinhala", "Slovak", "Slovenian", "Somali",
    "Spanish", "Sundanese", "Swahili", "Swedish", "Tamil", "Telugu", "Thai", "Turkish", "Ukrainian",
    "Urdu", "Uyghur", "Uzbek", "Vietnamese", "Welsh", "Western Frisian", "Xhosa", "Yiddish",
)  # fmt: skip

ENGLISH_WEIGHT = 0.431
HIGH_RESOURCE_WEIGHT = 0.029
HIGH_RESOURCE_LANGUAGES: tuple[str, ...] = (
    "Arabic", "Chinese", "Dutch", "French", "German", "Indonesian", "Italian", "Japanese", "Persian",
    "Polish", "Portuguese", "Russian", "Spanish",
)  # fmt: skip

# ISO 639-1 codes, for the language list of dataset and model cards on the Hub.
ISO_CODES: dict[str, str] = dict(
    zip(
        XLMR_LANGUAGES,
        (
            "af sq am ar hy as az eu be bn bs br bg my ca zh hr cs da nl en eo et tl fi fr gl ka de el gu ha he hi "
            "hu is id ga it ja jv kn kk km ko ku ky lo la lv lt mk mg ms ml mr mn ne no or om ps fa pl pt pa ro ru "
            "sa gd sr sd si sk sl so es su sw sv ta te th tr uk ur ug uz vi cy fy xh yi"
        ).split(),
        strict=True,
    )
)

_BY_LOWER = {name.lower(): name for name in XLMR_LANGUAGES}


def paper_language_weights() -> dict[str, float]:
    """The paper's mix: English 0.431, 13 high-resource languages 0.029 each, the rest uniform."""
    rest = [lang for lang in XLMR_LANGUAGES if lang != "English" and lang not in HIGH_RESOURCE_LANGUAGES]
    rest_weight = (1.0 - ENGLISH_WEIGHT - HIGH_RESOURCE_WEIGHT * len(HIGH_RESOURCE_LANGUAGES)) / len(rest)
    weights = {lang: rest_weight for lang in rest}
    weights.update(dict.fromkeys(HIGH_RESOURCE_LANGUAGES, HIGH_RESOURCE_WEIGHT))
    weights["English"] = ENGLISH_WEIGHT
    return {lang: weights[lang] for lang in XLMR_LANGUAGES}


def canonical_language(name: str) -> str:
    """Return the canonical spelling of ``name`` or raise with the valid choices and close matches."""
    found = _BY_LOWER.get(name.strip().lower())
    if found is None:
        raise unknown_name("language", name, XLMR_LANGUAGES, extra="Or 'paper' for the paper's weighted mix.",
                           choose=f"Choose from the {len(XLMR_LANGUAGES)} XLM-R languages")  # fmt: skip
    return found


def resolve_language_weights(languages: str | Iterable[str] | Mapping[str, float] | None) -> dict[str, float]:
    """Turn a user's language choice into normalised sampling weights.

    Accepts ``None`` or ``"paper"`` (the paper's weighted mix), a comma-separated string or list of names
    (uniform over them), or a mapping of name to weight.
    """
    if languages is None or (isinstance(languages, str) and languages.strip().lower() == "paper"):
        return paper_language_weights()
    if isinstance(languages, str):
        languages = name_list(languages)
    if isinstance(languages, Mapping):
        raw = {canonical_language(name): float(weight) for name, weight in languages.items()}
    else:
        raw = {canonical_language(name): 1.0 for name in languages}
    if not raw:
        raise ValueError("No languages given; name at least one XLM-R language, or 'paper'.")
    if any(weight < 0 for weight in raw.values()) or sum(raw.values()) <= 0:
        raise ValueError(f"Language weights must be non-negative and not all zero, got {raw}.")
    total = sum(raw.values())
    return {lang: weight / total for lang, weight in raw.items()}


def sample_language(rng: random.Random, weights: Mapping[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[name] for name in names], k=1)[0]
