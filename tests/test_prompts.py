"""Prompt versions and template variants (the paper's prompts, faithfully) and the paper's kind mix."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import pytest

from st_synth import GenerationConfig, SyntheticDatasetBuilder
from st_synth.common.languages import resolve_language_weights
from st_synth.common.taxonomy import PAPER_KIND_COUNTS, TASK_KINDS, resolve_kind_weights
from st_synth.data.examples import load_examples
from st_synth.generation.prompting import (
    PROMPT_VERSIONS,
    brainstorm_request,
    example_request,
    plan_examples,
    read_template,
    render,
    template_variants,
)
from tests.test_grounded import grounded_config

UNIFORM = {name: 1.0 for name in TASK_KINDS}
TASKS = ["Task one", "Task two", "Task three"]


def values_for(kind_name: str, version: str) -> dict[str, str]:
    kind = TASK_KINDS[kind_name]
    values = {name: choices[-1] for name, choices in kind.placeholders_in(version).items()}
    values.update(language="German", src_lang="German", tgt_lang="Polish", task="Classify texts by mood")
    return values


@pytest.mark.parametrize("kind_name", list(TASK_KINDS))
def test_every_v2_variant_renders_fully_and_names_the_papers_keys(kind_name):
    kind = TASK_KINDS[kind_name]
    variants = template_variants("v2", f"{kind_name}_example")
    assert len(variants) >= 2 and all(v.startswith("v2/") for v in variants)
    for template in variants:
        prompt = render(read_template(template), values_for(kind_name, "v2"))
        assert "{" not in prompt and "}" not in prompt and "JSON only" in prompt, template
        for key in kind.keys:
            assert f'"{key}"' in prompt, (template, key)
    if kind.brainstorm:
        brainstorms = template_variants("v2", f"{kind_name}_brainstorm")
        assert len(brainstorms) >= 2
        for template in brainstorms:
            text = read_template(template)
            assert "{" not in text and "task strings" in text and "JSON only" in text
            # The paper's brainstorm prompts show example tasks; v1's did not.
            assert re.search(r"for (reference|example)", text, re.IGNORECASE), template


def rendered(kind_name: str, version: str) -> list[str]:
    return [
        render(read_template(t), values_for(kind_name, version))
        for t in template_variants(version, f"{kind_name}_example")
    ]


def test_v2_carries_the_papers_meaning_where_v1_drifted():
    for prompt in rendered("retrieval", "v2"):
        assert "at least 500 words" in prompt and "about 500" not in prompt  # the paper: at least N words
        assert "less useful" in prompt or "less well" in prompt  # the hard negative is partly useful
        assert "query and" in prompt.lower() and "PhD level" in prompt  # difficulty covers the query too
    assert all("about 500 words" in p for p in rendered("retrieval", "v1"))
    for prompt in rendered("classification", "v2"):
        assert "German" in prompt and "English" not in prompt  # every field, labels too, in the language
    assert any("labels may stay in English" in p for p in rendered("classification", "v1"))
    for prompt in rendered("bitext", "v2"):
        assert "college level" in prompt and "keywords or numbers" in prompt
    assert "difficulty" not in TASK_KINDS["bitext"].placeholders_in("v1")
    for prompt in rendered("short_short", "v2"):
        assert "overlap" in prompt or "few words" in prompt
    for prompt in rendered("long_long", "v2"):
        assert "at least 300 words" in prompt


def test_v1_asks_exactly_what_it_asked_before_versions_existed():
    """The v1 requests of a fixed plan, fingerprinted with the code before prompt versions (commit cde4173):
    a v1 dataset can be reproduced from its cache without a single new request."""
    plans = plan_examples(5, 120, UNIFORM, resolve_language_weights("English,German,French"))
    digest = hashlib.sha256()
    for plan in plans:
        for attempt in range(2):
            r = example_request(5, plan, attempt, TASKS, "v1")
            digest.update(json.dumps([r.prompt, r.seed, r.max_tokens, r.schema, r.instruction]).encode())
    for kind in TASK_KINDS.values():
        if kind.brainstorm:
            r = brainstorm_request(5, kind, 0, 1, "v1")
            digest.update(json.dumps([r.prompt, r.seed, r.max_tokens, r.schema]).encode())
    assert digest.hexdigest() == "03eecc58a9605f61f4cef2a4dd2c63fbb99c4a081e5edf0a6c10d1edcfd0837b"


def test_variants_are_drawn_per_example_from_the_seed():
    plans = plan_examples(11, 240, UNIFORM, resolve_language_weights("English,German"))

    def templates(seed):
        return [example_request(seed, p, 0, TASKS, "v2").template for p in plans]

    first = templates(11)
    assert first == templates(11) and first != templates(12)
    used = Counter(first)
    for kind_name in TASK_KINDS:  # every variant of every kind is used
        assert set(template_variants("v2", f"{kind_name}_example")) <= set(used), kind_name
    # All attempts of one example use its variant (only the sampled values change).
    for plan in plans[:30]:
        assert len({example_request(11, plan, a, TASKS, "v2").template for a in range(4)}) == 1
    with pytest.raises(ValueError, match=r"prompts version 'v9'.*v1, v2"):
        GenerationConfig(model="m", prompts_version="v9")
    # auto: the paper's prompts, except for the packaged 135M model, which cannot follow v2's brainstorms
    assert GenerationConfig(model="m").prompts_version == "v2"
    assert GenerationConfig(local=True).prompts_version == "v1"
    assert GenerationConfig(local=True, prompts_version="v2").prompts_version == "v2"
    assert PROMPT_VERSIONS == ("v1", "v2")


def test_rows_and_report_record_their_templates(fake_server, tmp_path):
    server = fake_server()
    config = GenerationConfig(model=server.model, base_url=server.base_url, num_examples=60, languages="English,German",
                              cache=str(tmp_path / "cache.sqlite"), concurrency=4, show_progress=False, block_size=16)  # fmt: skip
    builder = SyntheticDatasetBuilder(config)
    builder.build()
    builder.save(tmp_path / "out")
    data = builder.examples
    report = builder.report
    assert report["prompts_version"] == "v2"
    by_template = report["kept_by_template"]
    for kind_name, split in data.items():
        # Brainstorming kinds record the brainstorm variant of their block, then their own.
        for template in split["template"]:
            parts = template.split("+")
            assert parts[-1].startswith(f"v2/{kind_name}_example.")
            assert len(parts) == (2 if TASK_KINDS[kind_name].brainstorm else 1)
        examples = sum(n for t, n in by_template.items() if t.startswith(f"v2/{kind_name}_example."))
        assert examples == report["kept_by_kind"][kind_name] == split.num_rows
    assert load_examples(tmp_path / "out")["sts"]["template"] == data["sts"]["template"]


def test_v1_and_v2_answers_never_share_a_cache_entry(fake_server, tmp_path):
    """Grounded prompts are the same text in both versions (v2 keeps v1's): only the key tells them apart."""
    server = fake_server()
    v1 = SyntheticDatasetBuilder(grounded_config(server, tmp_path, prompts_version="v1"))
    v1.build()
    v2 = SyntheticDatasetBuilder(grounded_config(server, tmp_path, prompts_version="v2"))
    v2.build()
    assert v1.report["requests_sent"] > 0 and v2.report["cache_hits"] == 0
    assert v2.report["requests_sent"] == v1.report["requests_sent"]
    again = SyntheticDatasetBuilder(grounded_config(server, tmp_path, prompts_version="v2"))
    again.build()
    assert again.report["requests_sent"] == 0 and again.report["cache_hits"] > 0


def test_the_papers_kind_mix(fake_server, tmp_path):
    weights = resolve_kind_weights("paper")
    total = sum(PAPER_KIND_COUNTS.values())
    assert weights == pytest.approx({k: n / total for k, n in PAPER_KIND_COUNTS.items()})
    server = fake_server()
    config = GenerationConfig(model=server.model, base_url=server.base_url, num_examples=400, kinds="paper",
                              languages="English,German,French", cache=str(tmp_path / "c.sqlite"), concurrency=8,
                              show_progress=False)  # fmt: skip
    builder = SyntheticDatasetBuilder(config)
    builder.build()
    kept = builder.report["kept_by_kind"]
    assert sum(kept.values()) == 400
    for kind_name, share in weights.items():
        assert abs(kept[kind_name] / 400 - share) < 0.04, (kind_name, kept)
    with pytest.raises(ValueError, match=r"cannot be grounded.*retrieval"):  # the paper mix has bitext
        grounded_config(server, tmp_path, kinds="paper")
