"""Generation grounded in a corpus: the LLM reads a real passage and writes the other side of the pair.

Per kind (``TaskKind.grounded_keys``: what the LLM answers; ``passage_first``: which side the passage is):

* retrieval: a query the passage answers (passage = positive); the instruction is a task brainstormed from
  a sample of the corpus (the paper's two steps);
* short_short: a title of the passage; long_long: a summary of it (passage = positive);
* sts: a paraphrase and a near-miss of the passage (passage = S1);
* classification: the passage's label and a misleading one, from a label set brainstormed from the corpus
  (passage = input text).

Bitext is not grounded (it would need a translator, not a reader). Prompts are a system rule, two
demonstrations as earlier chat turns and the passage (``st_synth/prompts/<version>/grounded_<kind>.json``):
a small generator copies sentences when asked zero-shot, and follows a worked example. A kind may have other
prompts beside its own (``grounded_<kind>-<variant>.json``, chosen with ``grounded_prompts``), e.g.
``long_long-retelling``: the passage retold in prose, the two long texts of the paper's long-long matching. A
prose prompt (``"format": "prose"``) is sent without a response format and its whole answer is the text; an
answer cut by the token cap keeps its complete sentences. Answers are checked:
one copied from its passage (half or more of its word 5-grams occur in the passage) or equal to a
demonstration's answer is dropped and counted (``copied_from_passage``, ``copied_demonstration``); a label
the task does not name is ``label_not_in_task``.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from st_synth.common.taxonomy import BRAINSTORM_SCHEMA, TASK_KINDS, TaskKind, kinds_where
from st_synth.generation.prompting import (
    DEFAULT_PROMPTS_VERSION,
    PROMPT_VERSIONS,
    ChatRequest,
    ExamplePlan,
    derive_seed,
    read_template,
    render,
    seeded_rng,
    template_variants,
)
from st_synth.generation.validation import Rejected, answer_fields, normalize
from st_synth.generation.validation import parse_tasks as parse_task_list

COPY_NGRAM = 5
COPY_SHARE = 0.5
SAMPLES_PER_BRAINSTORM = 3
SAMPLE_WORDS = 60


def grounded_kinds() -> list[str]:
    """The task kinds whose examples can be grounded in a corpus passage (``--grounded_kinds`` takes these)."""
    return kinds_where("groundable")


def check_groundable(kinds: list[str]) -> None:
    refused = [kind for kind in kinds if not TASK_KINDS[kind].groundable]
    if refused:
        raise ValueError(
            f"Kinds {', '.join(refused)} cannot be grounded in a corpus; with a corpus choose among: "
            f"{', '.join(grounded_kinds())}."
        )


def prompt_variants(kind: str) -> list[str]:
    """The other grounded prompts the package ships for ``kind`` (``grounded_<kind>-<variant>.json``)."""
    root = resources.files("st_synth") / "prompts"
    prefix = f"grounded_{kind}-"
    return sorted({entry.name[len(prefix) : -len(".json")] for folder in PROMPT_VERSIONS
                   for entry in (root / folder).iterdir()
                   if entry.name.startswith(prefix) and entry.name.endswith(".json")})  # fmt: skip


def check_prompt_variants(chosen: dict[str, str], grounded: list[str]) -> None:
    """Refuse a ``grounded_prompts`` entry for a kind that is not grounded or naming no shipped prompt."""
    for kind, variant in chosen.items():
        if kind not in grounded:
            raise ValueError(
                f"grounded_prompts names {kind!r}, which is not a grounded kind of this run; grounded kinds: "
                f"{', '.join(grounded)}."
            )
        if variant not in (choices := prompt_variants(kind)):
            raise ValueError(
                f"grounded_prompts: no grounded prompt {variant!r} for {kind}; choose among: "
                f"{', '.join(choices) if choices else f'none ({kind} has only its own prompt)'}."
            )


def spec_id(kind: str, version: str = DEFAULT_PROMPTS_VERSION, variant: str | None = None) -> str:
    """The template id of grounded ``kind``'s prompt (``variant``: one of :func:`prompt_variants`) in prompt
    ``version`` (v2 keeps v1's)."""
    return template_variants(version, f"grounded_{kind}" + (f"-{variant}" if variant else ""), ".json")[0]


@cache
def load_spec(
    kind: str, version: str = DEFAULT_PROMPTS_VERSION, variant: str | None = None
) -> dict[str, Any]:
    """The prompt of grounded ``kind``: system rule, user message, brainstorm, demonstrations."""
    return json.loads(read_template(spec_id(kind, version, variant), ".json"))


def is_prose(spec: dict[str, Any]) -> bool:
    return spec.get("format") == "prose"


def instruction_of(kind: TaskKind, task: str | None, version: str = DEFAULT_PROMPTS_VERSION,
                   variant: str | None = None) -> str:  # fmt: skip
    """What a grounded example trains with: its brainstormed task, else the kind's fixed instruction."""
    spec = load_spec(kind.name, version, variant)
    if kind.brainstorm and task is not None and spec.get("brainstorm"):
        return task
    return spec.get("instruction") or kind.fixed_instruction or ""


def needs_brainstorm(kind: str, version: str = DEFAULT_PROMPTS_VERSION, variant: str | None = None) -> bool:
    return bool(load_spec(kind, version, variant).get("brainstorm"))


def answer_schema(kind: TaskKind) -> dict:
    return {
        "type": "object",
        "properties": {
            key: {"type": "string"} for key in kind.grounded_keys
        },  # no maxLength: llama.cpp's grammar compiler crashes on it
        "required": list(kind.grounded_keys),
        "additionalProperties": False,
    }


def label_set(task: str) -> list[str]:
    """The labels a classification task lists after its last colon (``"Classify ...: a, b, c"``)."""
    _, colon, tail = task.rpartition(":")
    if not colon:
        return []
    labels = [label.strip(" .;\"'") for label in tail.replace(" or ", ", ").replace(" and ", ", ").split(",")]
    return [label for label in labels if label and len(label.split()) <= 4]


def parse_tasks(kind: TaskKind, content: str | None) -> list[str]:
    """A grounded brainstorm's tasks; classification keeps only tasks that list at least three labels."""
    tasks = parse_task_list(content)
    if kind.passage_first and not kind.symmetric:
        tasks = [task for task in tasks if len(set(map(normalize, label_set(task)))) >= 3]
        if not tasks:
            raise Rejected("no_label_sets")
    return tasks


def _clip(text: str, words: int) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def brainstorm_request(
    seed: int,
    kind: TaskKind,
    block: int,
    attempt: int,
    passages: list[str],
    version: str = DEFAULT_PROMPTS_VERSION,
) -> ChatRequest:
    """Tasks brainstormed from ``SAMPLES_PER_BRAINSTORM`` passages of the corpus, drawn by the request's
    coordinates (so each block's pool reads its own sample)."""
    rng = seeded_rng(seed, "grounded-brainstorm", kind.name, block, attempt)
    picks = rng.sample(range(len(passages)), min(SAMPLES_PER_BRAINSTORM, len(passages)))
    samples = "\n".join(f"- {_clip(passages[i], SAMPLE_WORDS)}" for i in picks)
    return ChatRequest(
        kind=kind.name,
        stage="brainstorm",
        prompt=render(load_spec(kind.name, version)["brainstorm"], {"samples": samples}),
        seed=derive_seed(seed, "grounded-brainstorm", kind.name, block, attempt),
        max_tokens=768,
        schema=BRAINSTORM_SCHEMA,
        prompts_version=version,
        template=spec_id(kind.name, version),
    )


def example_request(seed: int, plan: ExamplePlan, attempt: int, tasks: list[str] | None, passage: str,
                    version: str = DEFAULT_PROMPTS_VERSION, variant: str | None = None) -> ChatRequest:  # fmt: skip
    """Attempt ``attempt`` of grounded example ``plan`` over ``passage`` (``variant``: the kind's prompt)."""
    kind = TASK_KINDS[plan.kind]
    spec = load_spec(kind.name, version, variant)
    prose = is_prose(spec)
    rng = seeded_rng(seed, "grounded-attempt", plan.index, attempt)
    values = {name: rng.choice(choices) for name, choices in spec.get("placeholders", {}).items()}
    values["language"] = plan.language
    task = None
    if needs_brainstorm(kind.name, version, variant):
        if not tasks:
            raise ValueError(f"grounded {kind.name} examples need a brainstormed task pool")
        task = rng.choice(tasks)
    demonstrations = tuple(
        (render(spec["user"], {"task": demo.get("task", ""), "passage": demo["passage"]}),
         demo["answer"] if prose else json.dumps(demo["answer"], ensure_ascii=False))
        for demo in spec.get("demonstrations", ())
    )  # fmt: skip
    return ChatRequest(
        kind=kind.name,
        stage="example",
        prompt=render(spec["user"], {"task": task or "", "passage": passage}),
        system=render(spec["system"], values) if spec.get("system") else None,
        demonstrations=demonstrations,
        seed=derive_seed(seed, "grounded-example", plan.index, attempt),
        max_tokens=spec.get("max_tokens", 256),
        schema=None if prose else answer_schema(kind),
        instruction=instruction_of(kind, task, version, variant),
        prompts_version=version,
        template=spec_id(kind.name, version, variant),
        temperature=spec.get("temperature"),
    )


def whole_sentences(text: str | None) -> str:
    """``text`` up to the end of its last complete sentence ("" when it has none): what a prose answer cut by
    the token cap keeps."""
    text = " ".join((text or "").split())
    ends = [
        i + 1
        for i, char in enumerate(text)
        if char in ".!?" and (i + 1 == len(text) or text[i + 1] in " \"')")
    ]
    return text[: ends[-1]].strip() if ends else ""


def copied_share(answer: str, passage: str, n: int = COPY_NGRAM) -> float:
    """The share of ``answer``'s word ``n``-grams that occur in ``passage`` (0 for answers under n words)."""
    words, source = normalize(answer).split(), normalize(passage).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    present = {tuple(source[i : i + n]) for i in range(len(source) - n + 1)}
    return sum(gram in present for gram in grams) / len(grams)


def prose_answer(content: str | None, min_words: int) -> str:
    """A prose answer's text: whitespace collapsed, a wrapping pair of quotes removed; shorter than
    ``min_words`` words is ``too_short``."""
    text = " ".join((content or "").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if len(text.split()) < min_words:
        raise Rejected("too_short")
    return text


def parse_answer(content: str | None, kind: TaskKind, passage: str, task: str | None = None,
                 version: str = DEFAULT_PROMPTS_VERSION,
                 variant: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:  # fmt: skip
    """The example's texts in the kind's column order (the passage on its side) and their normalised form."""
    spec = load_spec(kind.name, version, variant)
    if is_prose(spec):
        answers = [prose_answer(content, spec.get("min_words", 1))]
    else:
        answers = answer_fields(content, kind.grounded_keys, clean=lambda text: " ".join(text.split()))
    demos = {
        normalize(v)
        for demo in spec.get("demonstrations", ())
        for v in (demo["answer"].values() if isinstance(demo["answer"], dict) else [demo["answer"]])
    }
    labels = kind.passage_first and not kind.symmetric  # classification: labels, not prose
    for text in answers:
        if not labels and normalize(text) in demos:
            raise Rejected("copied_demonstration")
        if not labels and (
            normalize(text) == normalize(passage) or copied_share(text, passage) >= COPY_SHARE
        ):
            raise Rejected("copied_from_passage")
    if labels and task is not None:
        named = {normalize(label) for label in label_set(task)}
        if any(normalize(text) not in named for text in answers):
            raise Rejected("label_not_in_task")
    texts = (passage, *answers) if kind.passage_first else (answers[0], passage, *answers[1:])
    normalized = tuple(normalize(text) for text in texts)
    if len(set(normalized)) < len(normalized):
        raise Rejected("texts_not_distinct")
    return texts, normalized
