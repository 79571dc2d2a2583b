"""Opt-in: generation against a real local LLM (llama.cpp serving SmolLM2-135M-Instruct).

Run with ``ST_SYNTH_LLM_TESTS=1 pytest -m llm -s``; prints the keep rate per kind.
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = [
    pytest.mark.llm,
    pytest.mark.skipif(os.environ.get("ST_SYNTH_LLM_TESTS") != "1", reason="set ST_SYNTH_LLM_TESTS=1 to run"),
]


def _generate(server, tmp_path, examples: str, **settings):
    """Start ``server``, generate with it one request at a time, return (dataset, report)."""
    from st_synth import GenerationConfig, SyntheticDatasetBuilder
    from st_synth.generation.local_llm import backend_generation_defaults

    settings = {**backend_generation_defaults(server.backend), **settings}
    config = GenerationConfig(
        model=server.served_model, base_url=server.base_url, cache=str(tmp_path / "cache.sqlite"),
        num_examples=int(os.environ.get("ST_SYNTH_LLM_EXAMPLES", examples)), concurrency=1,
        show_progress=False, **settings,
    )  # fmt: skip
    with server:
        builder = SyntheticDatasetBuilder(config)
        dataset = builder.build()
    return dataset, builder.report


def test_llama_cpp_server_proves_itself_alive_before_any_request():
    """The warm-up completion of the real server: the check that catches a build that crashes on its
    first answer (llama.cpp's native build on AMX CPUs)."""
    from st_synth.generation.local_llm import LocalLLMServer

    with LocalLLMServer(backend="llama.cpp") as server:
        assert server.warmup_seconds is not None and server.warmup_seconds < 60
        server.check_alive()  # raises if the process had exited
        assert server.describe()["backend"] == "llama.cpp"


def test_smollm2_through_llama_cpp_generates_every_kind(tmp_path):
    from st_synth.common.taxonomy import TASK_KINDS
    from st_synth.generation.local_llm import LocalLLMServer

    dataset, report = _generate(LocalLLMServer(), tmp_path, "24", languages="English,German,French")
    keep_rate = {
        kind: report["kept_by_kind"][kind]
        / max(1, report["kept_by_kind"][kind] + report["drops_by_kind"][kind])
        for kind in TASK_KINDS
    }
    print(json.dumps({"keep_rate": keep_rate, "drops": report["drops"], "formats": report["response_formats"],
                      "wall_time_s": report["wall_time_s"], "completion_tokens": report["completion_tokens"]}, indent=1))  # fmt: skip
    assert report["format_downgrades"] == 1 and set(report["response_formats"]) == {"json_object_schema"}
    assert report["requests_sent"] > 0 and sum(d.num_rows for d in dataset.values()) > 0


def test_smollm2_through_transformers_serve_generates(tmp_path):
    """The fallback server: no compile step, slower, no schema-constrained decoding."""
    from st_synth.generation.local_llm import LocalLLMServer

    server = LocalLLMServer(backend="transformers", threads=2)
    kinds = os.environ.get("ST_SYNTH_LLM_KINDS", "sts,short_short")
    dataset, report = _generate(server, tmp_path, "4", kinds=kinds, languages="English")
    print(json.dumps({"kept": report["kept_by_kind"], "drops": report["drops"], "formats": report["response_formats"],
                      "wall_time_s": report["wall_time_s"], "requests": report["requests_sent"]}, indent=1))  # fmt: skip
    assert report["requests_sent"] > 0 and report["completion_tokens"] > 0
    assert sum(d.num_rows for d in dataset.values()) + sum(report["drops"].values()) > 0
