"""Deterministic prompt planning: which example gets which kind, language, placeholders and task.

Everything random here flows from explicit ``random.Random`` instances seeded with strings built from the
run seed and the example's coordinates, so a plan is identical on every machine and independent of the
order in which requests complete. Examples are grouped in blocks; a block is the unit of sharding and
each (kind, block) shares one brainstorm request, so shards never pay for each other's brainstorms.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from st_synth.languages import sample_language
from st_synth.taxonomy import BRAINSTORM_SCHEMA, TASK_KINDS, TaskKind

PROMPTS_VERSION = "v1"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@cache
def load_template(name: str) -> str:
    """Read a prompt template shipped as package data (``st_synth/prompts/<version>/<name>.txt``)."""
    path = resources.files("st_synth") / "prompts" / PROMPTS_VERSION / f"{name}.txt"
    return path.read_text(encoding="utf-8")


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


def seeded_rng(*parts: object) -> random.Random:
    return random.Random(":".join(map(str, parts)))


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
    schema: dict
    instruction: str | None = None  # what the resulting example trains with; None for brainstorms
    system: str | None = None
    demonstrations: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) turns: worked examples

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
    kinds = list(kind_weights)
    plans = []
    for index in range(num_examples):
        rng = seeded_rng(seed, "example", index)
        kind = rng.choices(kinds, weights=[kind_weights[k] for k in kinds], k=1)[0]
        language = sample_language(rng, language_weights)
        target = None
        if TASK_KINDS[kind].bilingual:
            others = {lang: w for lang, w in language_weights.items() if lang != language}
            target = sample_language(rng, others)
        plans.append(ExamplePlan(index=index, kind=kind, language=language, target_language=target))
    return plans


def brainstorm_request(seed: int, kind: TaskKind, block: int, attempt: int) -> ChatRequest:
    return ChatRequest(
        kind=kind.name,
        stage="brainstorm",
        prompt=load_template(f"{kind.name}_brainstorm"),
        seed=derive_seed(seed, "brainstorm", kind.name, block, attempt),
        max_tokens=1024,
        schema=BRAINSTORM_SCHEMA,
    )


def example_request(seed: int, plan: ExamplePlan, attempt: int, tasks: list[str] | None) -> ChatRequest:
    """The request for ``attempt`` of example ``plan``; ``tasks`` is its block's brainstormed pool."""
    kind = TASK_KINDS[plan.kind]
    rng = seeded_rng(seed, "attempt", plan.index, attempt)
    values = {name: rng.choice(choices) for name, choices in kind.placeholders.items()}
    if kind.bilingual:
        values.update(src_lang=plan.language, tgt_lang=plan.target_language or "")
    else:
        values["language"] = plan.language
    if kind.brainstorm:
        if not tasks:
            raise ValueError(f"{kind.name} examples need a brainstormed task pool")
        values["task"] = rng.choice(tasks)
    return ChatRequest(
        kind=kind.name,
        stage="example",
        prompt=render(load_template(f"{kind.name}_example"), values),
        seed=derive_seed(seed, "example", plan.index, attempt),
        max_tokens=kind.max_tokens,
        schema=kind.json_schema(),
        instruction=values["task"] if kind.brainstorm else kind.fixed_instruction,
    )
