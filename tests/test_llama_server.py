"""The local server's grammar sampler: the same answers as llama-cpp-python's own, from a window of candidates."""

from __future__ import annotations

import pytest

from st_synth.common.taxonomy import get_kind
from st_synth.generation import llama_server

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write one example for the task 'Retrieve recipes for a given dish'. Answer with a JSON object.",
    "Write one example for the task 'Given a question about tax law, retrieve the statute'. Answer in JSON.",
    "Write a user query, a passage that answers it and a passage that does not, about volcanoes. JSON only.",
]


def answers(llm, schema: dict, seeds: list[int]) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        for seed in seeds:
            llm.reset()  # every prompt read whole: the comparison is of sampling, not of prompt reuse
            response = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                response_format={"type": "json_object", "schema": schema},
                temperature=1.0, top_p=1.0, max_tokens=160, seed=seed,
            )  # fmt: skip
            texts.append(response["choices"][0]["message"]["content"])
    return texts


@pytest.fixture(scope="module")
def smollm2():
    llama_cpp = pytest.importorskip("llama_cpp")
    from st_synth.model.backbones import packaged_smollm2_gguf

    return llama_cpp.Llama(str(packaged_smollm2_gguf()), n_ctx=1024, n_threads=2, verbose=False)


def test_the_window_sampler_writes_exactly_what_the_whole_vocabulary_grammar_writes(smollm2):
    """Grammar then top-k over all 49,152 candidates, against the grammar asked about the highest-scoring
    window first: at temperature 1 and the same seeds, every answer is the same text, most tokens came from the
    window, and the JSON structure (where fewer than k candidates are allowed) fell back to the whole vocabulary."""
    schema = get_kind("retrieval").json_schema()
    seeds = [1, 2, 3]
    plain = answers(smollm2, schema, seeds)
    llama_server.counts.clear()
    with llama_server.top_k_grammar():
        windowed = answers(smollm2, schema, seeds)
    assert windowed == plain
    assert len(set(plain)) == len(plain)  # the seeds and prompts did give different answers
    print(llama_server.counts)
    windowed_tokens = sum(n for route, n in llama_server.counts.items() if route != "vocabulary")
    assert llama_server.counts["top-k in 512"] > llama_server.counts["min-p in 512"] > 0, llama_server.counts
    assert windowed_tokens > 10 * llama_server.counts["vocabulary"], llama_server.counts
    # Outside the block llama-cpp-python's own grammar sampler is back.
    llama_server.counts.clear()
    assert answers(smollm2, schema, seeds[:1]) == plain[:: len(seeds)]
    assert not llama_server.counts


def test_a_small_window_falls_back_to_the_whole_vocabulary_and_still_agrees(smollm2):
    """With windows that cannot hold 4 x top-k candidates every token goes to the whole vocabulary."""
    schema = get_kind("sts").json_schema()
    plain = answers(smollm2, schema, [7])
    llama_server.counts.clear()
    with llama_server.top_k_grammar(windows=(64,)):
        assert answers(smollm2, schema, [7]) == plain
    assert set(llama_server.counts) == {"vocabulary"}


def test_a_llama_cpp_python_with_another_sampler_api_keeps_its_own_sampling(monkeypatch, caplog):
    """The patch knows llama-cpp-python 0.3.x's chain; another release's sampler is left as it is, with a warning."""
    pytest.importorskip("llama_cpp")
    from llama_cpp.llama import Llama

    def other(self, temperature=0.8, grammar=None):  # not 0.3.x's settings
        return None

    monkeypatch.setattr(Llama, "_init_sampler", other)
    with llama_server.top_k_grammar():
        assert Llama._init_sampler is other
    assert "samples differently" in caplog.text
