"""Deterministic prompt planning: which example gets which kind, language, placeholders and task.

Everything random here flows from explicit ``random.Random`` instances seeded with strings built from the
run seed and the example's coordinates, so a plan is identical on every machine and independent of the
order in which requests complete. Examples are grouped in blocks; a block is the unit of sharding and
each (kind, block) shares one brainstorm request, so shards never pay for each other's brainstorms.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from st_synth.common.languages import sample_language
from st_synth.common.names import unknown_name
from st_synth.common.taxonomy import BRAINSTORM_SCHEMA, TASK_KINDS, TaskKind
from st_synth.common.text import seeded_rng

# Prompt versions, oldest first. A version folder holds the templates that changed in it; a template it
# lacks is the latest earlier version's (v2 rewrote the paper's templates, the grounded ones are v1's).
# Several files ``<name>.<n>.txt`` are variants of one template, one drawn per example from the run seed.
PROMPT_VERSIONS = ("v1", "v2")
DEFAULT_PROMPTS_VERSION = "v2"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def check_prompts_version(version: str) -> str:
    if version not in PROMPT_VERSIONS:
        raise unknown_name("prompts version", version, PROMPT_VERSIONS,
                           extra="v1 reproduces datasets made before prompt versions could be chosen.")  # fmt: skip
    return version


@cache
def template_variants(version: str, name: str, suffix: str = ".txt") -> tuple[str, ...]:
    """The ids (``"v2/retrieval_example.1"``) of template ``name``'s variants as ``version`` has them."""
    check_prompts_version(version)
    root = resources.files("st_synth") / "prompts"
    for folder in reversed(PROMPT_VERSIONS[: PROMPT_VERSIONS.index(version) + 1]):
        found = {}
        for entry in (root / folder).iterdir():
            stem = entry.name.removesuffix(suffix)
            if entry.name.endswith(suffix) and (stem == name or (
                stem.startswith(name + ".") and stem[len(name) + 1 :].isdigit())):  # fmt: skip
                found[stem] = int(stem[len(name) + 1 :] or 0)
        if found:
            return tuple(f"{folder}/{stem}" for stem in sorted(found, key=found.get))
    raise FileNotFoundError(f"No prompt template {name!r} in prompt version {version} or before it.")


@cache
def read_template(template_id: str, suffix: str = ".txt") -> str:
    """The text of a template id from :func:`template_variants` (package data under ``st_synth/prompts``)."""
    folder, stem = template_id.split("/")
    return (resources.files("st_synth") / "prompts" / folder / f"{stem}{suffix}").read_text(encoding="utf-8")


def pick_template(version: str, name: str, *coordinates: object) -> str:
    """One variant of ``name``, drawn from ``coordinates`` alone (its own stream: drawing it changes no
    other draw, so a version with one variant asks exactly what it asked before variants existed)."""
    variants = template_variants(version, name)
    if len(variants) == 1:
        return variants[0]
    return variants[seeded_rng(*coordinates, "template", name).randrange(len(variants))]


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``{name}`` fields; a field without a value is a bug in the template or the taxonomy."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise KeyError(f"Prompt template needs values for {missing}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def derive_seed(*parts: object) -> int:
    """A stable 31-bit integer from ``parts`` (sent as the per-request ``seed``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class ExamplePlan:
    """What example ``index`` is: fixed for all its attempts."""

    index: int
    kind: str
    language: str
    target_language: str | None = None
    passage: int | None = None  # grounded: the index of its corpus passage

    @property
    def language_label(self) -> str:
        return f"{self.language}-{self.target_language}" if self.target_language else self.language


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completion request, fully determined before it is sent."""

    kind: str
    stage: str  # "brainstorm" or "example"
    prompt: str
    seed: int
    max_tokens: int
    schema: dict | None  # None: a prose answer, asked for without a response format
    instruction: str | None = None  # what the resulting example trains with; None for brainstorms
    system: str | None = None
    demonstrations: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) turns: worked examples
    prompts_version: str = (
        DEFAULT_PROMPTS_VERSION  # part of the cache key from v2 on (v1 keys predate versions)
    )
    template: str = ""  # the template id(s) the prompt was rendered from: the example's provenance
    temperature: float | None = None  # the prompt's own sampling temperature; None: the run's

    @property
    def messages(self) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.demonstrations:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return [*messages, {"role": "user", "content": self.prompt}]


def plan_examples(
    seed: int, num_examples: int, kind_weights: dict[str, float], language_weights: dict[str, float]
) -> list[ExamplePlan]:
    """Draw kind and language(s) for examples ``0 .. num_examples-1``."""
    return [plan_example(seed, index, kind_weights, language_weights) for index in range(num_examples)]


def plan_example(
    seed: int, index: int, kind_weights: dict[str, float], language_weights: dict[str, float]
) -> ExamplePlan:
    """Kind and language(s) of example ``index``: a pure function of ``(seed, index)`` and the weights, so
    that a run can draw each plan when it reaches it instead of holding them all."""
    kinds = list(kind_weights)
    rng = seeded_rng(seed, "example", index)
    kind = rng.choices(kinds, weights=[kind_weights[k] for k in kinds], k=1)[0]
    language = sample_language(rng, language_weights)
    target = None
    if TASK_KINDS[kind].bilingual:
        others = {lang: w for lang, w in language_weights.items() if lang != language}
        target = sample_language(rng, others)
    return ExamplePlan(index=index, kind=kind, language=language, target_language=target)


def brainstorm_template(seed: int, kind: str, block: int, version: str) -> str:
    """The brainstorm variant of a block: every attempt of that block's brainstorm asks with it."""
    return pick_template(version, f"{kind}_brainstorm", seed, "brainstorm", kind, block)


def brainstorm_request(
    seed: int, kind: TaskKind, block: int, attempt: int, version: str = DEFAULT_PROMPTS_VERSION
) -> ChatRequest:
    template = brainstorm_template(seed, kind.name, block, version)
    return ChatRequest(
        kind=kind.name,
        stage="brainstorm",
        prompt=read_template(template),
        seed=derive_seed(seed, "brainstorm", kind.name, block, attempt),
        max_tokens=1024,
        schema=BRAINSTORM_SCHEMA,
        prompts_version=version,
        template=template,
    )


def example_request(
    seed: int,
    plan: ExamplePlan,
    attempt: int,
    tasks: list[str] | None,
    version: str = DEFAULT_PROMPTS_VERSION,
) -> ChatRequest:
    """The request for ``attempt`` of example ``plan``; ``tasks`` is its block's brainstormed pool. The
    template variant is the example's (the same for all its attempts)."""
    kind = TASK_KINDS[plan.kind]
    rng = seeded_rng(seed, "attempt", plan.index, attempt)
    values = {name: rng.choice(choices) for name, choices in kind.placeholders_in(version).items()}
    if kind.bilingual:
        values.update(src_lang=plan.language, tgt_lang=plan.target_language or "")
    else:
        values["language"] = plan.language
    if kind.brainstorm:
        if not tasks:
            raise ValueError(f"{kind.name} examples need a brainstormed task pool")
        values["task"] = rng.choice(tasks)
    template = pick_template(version, f"{kind.name}_example", seed, "example", plan.index)
    return ChatRequest(
        kind=kind.name,
        stage="example",
        prompt=render(read_template(template), values),
        seed=derive_seed(seed, "example", plan.index, attempt),
        max_tokens=kind.max_tokens,
        schema=kind.json_schema(),
        instruction=values["task"] if kind.brainstorm else kind.fixed_instruction,
        prompts_version=version,
        template=template,
    )
