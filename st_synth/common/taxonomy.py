"""The paper's six kinds of synthetic examples: their JSON keys, placeholders and training columns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from st_synth.common.names import unknown_name

CLARITY = ("clear", "understandable with some effort", "ambiguous")
# Columns after the texts of a generated example: its language(s) and the prompt template(s) it came from.
PROVENANCE_COLUMNS = ("language", "template")


@dataclass(frozen=True)
class TaskKind:
    """One kind of synthetic example (a row of the paper's taxonomy table).

    ``keys`` are the JSON keys the generator must answer with, in (anchor, positive, negative) order;
    ``placeholders`` are the value lists sampled per request to diversify the prompts.

    Behaviour that differs by kind is an attribute here, never a test of the kind's name elsewhere:
    ``bilingual`` (each example pairs two languages), ``in_batch_negatives`` (other rows of a batch are
    true negatives; false where labels repeat across rows, as in classification), ``filterable`` (the
    monolingual consistency filter can judge it).
    """

    name: str
    paper_table: str
    keys: tuple[str, ...]
    brainstorm: bool
    symmetric: bool
    max_tokens: int
    placeholders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fixed_instruction: str | None = None
    bilingual: bool = False
    in_batch_negatives: bool = True
    filterable: bool = True
    # Grounded in a corpus (st_synth.generation.grounding): what the LLM answers about a real passage, and whether the
    # passage is the first text (the anchor: sts' S1, classification's input) or the positive. () = refused.
    grounded_keys: tuple[str, ...] = ()
    passage_first: bool = False
    # Placeholders a prompt version added, drawn after the older ones (so older versions draw as before).
    added_placeholders: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)

    def placeholders_in(self, version: str) -> dict[str, tuple[str, ...]]:
        """The placeholders the templates of prompt ``version`` fill (versions compare as v1 < v2 < ...)."""
        number = int(version.lstrip("v"))
        merged = dict(self.placeholders)
        for added_in, names in sorted(self.added_placeholders.items(), key=lambda item: int(item[0][1:])):
            if int(added_in[1:]) <= number:
                merged.update(names)
        return merged

    @property
    def groundable(self) -> bool:
        return bool(self.grounded_keys)

    def grounded_columns(self) -> tuple[str, ...]:
        """The dataset columns of a grounded example of this kind."""
        texts = ("query", "positive", "negative")[: len(self.grounded_keys) + 1]
        return ("instruction", *texts, *PROVENANCE_COLUMNS)

    @property
    def has_negative(self) -> bool:
        return len(self.keys) == 3

    @property
    def columns(self) -> tuple[str, ...]:
        """The dataset columns of this kind, in the order sentence-transformers losses read them."""
        texts = ("query", "positive", "negative")[: len(self.keys)]
        return ("instruction", *texts, *PROVENANCE_COLUMNS)

    def json_schema(self) -> dict:
        """The exact JSON schema of one example, for endpoints with structured outputs."""
        return {
            "type": "object",
            "properties": {key: {"type": "string"} for key in self.keys},
            "required": list(self.keys),
            "additionalProperties": False,
        }


# The bitext low scores follow the paper's appendix ({1.5, 2, 2.5}); some re-implementations reuse the
# STS range instead. A flawed translation should sit clearly below a faithful one, so we keep the lower set.
BITEXT_LOW_SCORES = ("1.5", "2", "2.5")

TASK_KINDS: dict[str, TaskKind] = {
    kind.name: kind
    for kind in (
        TaskKind(
            name="retrieval",
            paper_table="short-long retrieval (T7)",
            grounded_keys=("user_query",),
            keys=("user_query", "positive_document", "hard_negative_document"),
            brainstorm=True,
            symmetric=False,
            max_tokens=1536,
            placeholders={
                "query_type": ("extremely long-tail", "long-tail", "common"),
                "query_length": ("less than 5 words", "5 to 15 words", "at least 10 words"),
                "clarity": CLARITY,
                "num_words": ("50", "100", "200", "300", "400", "500"),
                "difficulty": ("high school", "college", "PhD"),
            },
        ),
        TaskKind(
            name="classification",
            paper_table="long-short classification (T8)",
            grounded_keys=("label", "misleading_label"),
            passage_first=True,
            keys=("input_text", "label", "misleading_label"),
            brainstorm=True,
            symmetric=False,
            in_batch_negatives=False,  # labels repeat across a batch: other rows' labels are no negatives
            max_tokens=768,
            placeholders={
                "num_words": ("less than 10", "at least 10", "at least 50", "at least 100", "at least 200"),
                "difficulty": ("high school", "college", "PhD"),
                "clarity": CLARITY,
            },
        ),
        TaskKind(
            name="short_short",
            paper_table="short-short matching (T9)",
            grounded_keys=("title",),
            keys=("input", "positive_document"),
            brainstorm=True,
            symmetric=False,
            max_tokens=384,
        ),
        TaskKind(
            name="long_long",
            paper_table="long-long matching (T10)",
            grounded_keys=("summary",),
            keys=("input", "positive_document"),
            brainstorm=True,
            symmetric=False,
            max_tokens=2048,
        ),
        TaskKind(
            name="sts",
            paper_table="monolingual STS (T11)",
            grounded_keys=("paraphrase", "near_miss"),
            passage_first=True,
            keys=("S1", "S2", "S3"),
            brainstorm=False,
            symmetric=True,
            max_tokens=768,
            placeholders={
                "high_score": ("4", "4.5", "5"),
                "low_score": ("2.5", "3", "3.5"),
                "unit": ("sentence", "phrase", "passage"),
                "difficulty": ("elementary school", "high school", "college"),
            },
            fixed_instruction="Retrieve semantically similar text.",
        ),
        TaskKind(
            name="bitext",
            paper_table="bitext retrieval (T12)",
            keys=("S1", "S2", "S3"),
            brainstorm=False,
            symmetric=True,
            max_tokens=768,
            placeholders={
                "high_score": ("4", "4.5", "5"),
                "low_score": BITEXT_LOW_SCORES,
                "unit": ("sentence", "phrase", "passage"),
            },
            # The paper's bitext prompt sets a reading level too; v1 left it out.
            added_placeholders={"v2": {"difficulty": ("elementary school", "high school", "college")}},
            fixed_instruction="Retrieve parallel sentences.",
            bilingual=True,
            filterable=False,  # the guide model reads one language
        ),
    )
}

BRAINSTORM_SCHEMA: dict = {
    "type": "object",
    "properties": {"tasks": {"type": "array", "items": {"type": "string"}}},
    "required": ["tasks"],
    "additionalProperties": False,
}


# The paper's mix (its Figure 2: examples per kind in the 500k it generated).
PAPER_KIND_COUNTS: dict[str, int] = {
    "retrieval": 167_000, "classification": 122_000, "sts": 99_000, "bitext": 89_000, "long_long": 17_000,
    "short_short": 13_000,
}  # fmt: skip


def kinds_where(attribute: str, value: bool = True) -> list[str]:
    """The kinds whose ``attribute`` is ``value``, in taxonomy order (e.g. ``kinds_where("bilingual")``)."""
    return [name for name, kind in TASK_KINDS.items() if getattr(kind, attribute) == value]


def kinds_help() -> str:
    """The kinds for help texts and messages: names with the paper's table of each."""
    return ", ".join(f"{name} ({kind.paper_table})" for name, kind in TASK_KINDS.items())


def get_kind(name: str) -> TaskKind:
    """The task kind named ``name`` (see :data:`TASK_KINDS`); an unknown name fails listing them."""
    try:
        return TASK_KINDS[name]
    except KeyError:
        raise unknown_name("task kind", name, TASK_KINDS) from None


def resolve_kind_weights(kinds: str | list[str] | Mapping[str, float] | None) -> dict[str, float]:
    """Parse a kind mix: ``None`` (all six, uniform), ``"paper"`` (the paper's proportions,
    :data:`PAPER_KIND_COUNTS`), ``"retrieval,sts"``, ``"retrieval=3,sts=1"``, a list of names or a mapping
    of name to weight. Returns normalised weights in taxonomy order."""
    if kinds is None:
        raw = dict.fromkeys(TASK_KINDS, 1.0)
    elif isinstance(kinds, str) and kinds.strip().lower() == "paper":
        raw = {name: float(count) for name, count in PAPER_KIND_COUNTS.items()}
    elif isinstance(kinds, Mapping):
        raw = {get_kind(name).name: float(weight) for name, weight in kinds.items()}
    else:
        parts = [p.strip() for p in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
        raw = {}
        for part in filter(None, parts):
            name, _, weight = part.partition("=")
            try:
                raw[get_kind(name.strip()).name] = float(weight) if weight else 1.0
            except ValueError as error:
                if weight and "Unknown task kind" not in str(error):
                    raise ValueError(f"Kind weight {weight!r} in {part!r} is not a number.") from None
                raise
    if not raw:
        raise ValueError(f"No task kinds given; choose from: {', '.join(TASK_KINDS)}.")
    if any(w < 0 for w in raw.values()) or sum(raw.values()) <= 0:
        raise ValueError(f"Kind weights must be non-negative and not all zero, got {raw}.")
    total = sum(raw.values())
    return {name: raw[name] / total for name in TASK_KINDS if raw.get(name, 0) > 0}
