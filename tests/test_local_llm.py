"""Choosing the local LLM server: llama.cpp where it is installed, else `transformers serve`."""

from __future__ import annotations

import importlib.util

import pytest

from st_synth.generation import local_llm
from st_synth.generation.local_llm import LocalLLMServer, resolve_backend


def _hide(monkeypatch, *names: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a)
    )


def test_auto_prefers_llama_cpp_then_transformers_serve(monkeypatch):
    if importlib.util.find_spec("llama_cpp") is not None:
        assert resolve_backend("auto") == "llama.cpp"
    _hide(monkeypatch, "llama_cpp")
    assert resolve_backend("auto") == "transformers"
    with pytest.raises(RuntimeError, match="llama-cpp-python is not installed"):
        resolve_backend("llama.cpp")
    _hide(monkeypatch, "llama_cpp", "fastapi")
    with pytest.raises(RuntimeError, match=r"llama-cpp-python .*fastapi and uvicorn"):
        resolve_backend("auto")
    with pytest.raises(
        ValueError, match=r"Unknown local LLM backend .vllm.; choose one of: auto, llama\.cpp, transformers"
    ):
        resolve_backend("vllm")


def test_transformers_backend_serves_the_packaged_gguf_on_loopback():
    server = LocalLLMServer(backend="transformers", port=12345)
    command = server.command()
    gguf = local_llm.packaged_smollm2_gguf()
    folder = local_llm.gguf_as_causal_lm_folder(gguf)
    assert command[3:5] == ["serve", str(folder)]
    assert "LlamaForCausalLM" in (folder / "config.json").read_text()
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in (
        folder / "tokenizer_config.json"
    ).read_text()
    assert command[command.index("--host") + 1] == "127.0.0.1" and "12345" in command
    assert server.base_url == "http://127.0.0.1:12345/v1"


def test_run_refuses_an_unknown_backend_before_starting(tmp_path, capsys):
    from st_synth.cli import main

    code = main(["run", "--config", "recipes/configs/local-smollm2.yaml", "--output", str(tmp_path / "out"),
                 "--set", "generate.llm_backend=vllm"])  # fmt: skip
    assert code == 2 and "choose one of: auto, llama.cpp, transformers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_transformers_backend_caps_answers_unless_the_user_sets_limits(monkeypatch):
    from st_synth.pipeline import load_config, plan_run

    _hide(monkeypatch, "llama_cpp")
    assert local_llm.backend_generation_defaults("auto") == {
        "max_tokens": 384, "request_timeout": 600.0, "response_format": "text"
    }  # fmt: skip
    config = load_config("recipes/configs/local-smollm2.yaml")
    generation = plan_run(config).generation
    limits = (generation.max_tokens, generation.request_timeout, generation.response_format)
    assert limits == (384, 600.0, "text")
    config["generate"].update(max_tokens=128, request_timeout=30.0)
    generation = plan_run(config).generation
    assert (generation.max_tokens, generation.request_timeout) == (128, 30.0)
    monkeypatch.undo()
    if importlib.util.find_spec("llama_cpp") is not None:  # llama.cpp keeps each kind's own budget
        generation = plan_run(load_config("recipes/configs/local-smollm2.yaml")).generation
        limits = (generation.max_tokens, generation.request_timeout, generation.response_format)
        assert limits == (None, 120.0, "auto")


def test_cli_generate_takes_the_backend_limits_unless_given(monkeypatch, tmp_path):
    from st_synth.cli import main
    from st_synth.generation import builder, stage

    # stage imports the builder by name: imported first under the patch, it would keep the stand-in for good.
    assert stage.SyntheticDatasetBuilder is builder.SyntheticDatasetBuilder
    _hide(monkeypatch, "llama_cpp")
    seen = []

    def capture(config, **kwargs):
        seen.append(config)
        raise ValueError("captured before any server starts")

    monkeypatch.setattr(builder, "SyntheticDatasetBuilder", capture)
    command = ["generate", "--local", "--local-backend", "transformers", "--output", str(tmp_path / "out")]
    assert main(command) == 2
    assert (
        main([*command, "--max-tokens", "100", "--request-timeout", "30", "--response-format", "json_object"])
        == 2
    )
    assert (
        main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--output", str(tmp_path)])
        == 2
    )
    limits = [(config.max_tokens, config.request_timeout, config.response_format) for config in seen]
    assert limits == [(384, 600.0, "text"), (100, 30.0, "json_object"), (None, 120.0, "auto")]


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python (the local extra)"
)
def test_local_model_serves_the_users_own_gguf_with_its_settings(tmp_path):
    """--local_model: llama.cpp serves the user's file under the file's name, with the context size, threads and
    GPU layers given; the run's model name and prompts follow."""
    import shutil
    import urllib.request

    from st_synth.generation.config import GenerationConfig, serving

    own = tmp_path / "my-model.gguf"
    shutil.copy(local_llm.packaged_smollm2_gguf(), own)
    config = GenerationConfig(local=True, local_model=str(own), llm_context=1024, llm_backend="llama.cpp",
                              num_examples=2, kinds="sts", languages="English", cache=str(tmp_path / "c.sqlite"))  # fmt: skip
    assert config.model == "my-model" and config.prompts_version == "v2"
    with serving(config) as (served, server):
        command = server.command()
        assert command[command.index("--model") + 1] == str(own)
        assert (
            command[command.index("--n_ctx") + 1] == "1024"
            and command[command.index("--n_gpu_layers") + 1] == "0"
        )
        assert served.model == "my-model" and served.base_url == server.base_url
        with urllib.request.urlopen(f"{server.base_url}/models", timeout=10) as answer:
            assert "my-model" in answer.read().decode()


def test_a_local_model_that_cannot_be_served_is_refused_before_a_server_starts(tmp_path, monkeypatch):
    from st_synth.generation.config import GenerationConfig
    from st_synth.generation.local_llm import resolve_local_model

    (tmp_path / "weights.bin").write_bytes(b"x")
    for spec, message in ((str(tmp_path / "weights.bin"), "llama.cpp serves GGUF files"),
                          ("no-such-model", "is no .gguf file here; give a .gguf file or REPO_ID:FILE.gguf")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            GenerationConfig(local=True, local_model=spec)
    with pytest.raises(ValueError, match="local_model is what --local serves: add --local"):
        GenerationConfig(model="m", local_model="someone/repo:model.gguf")
    for name, value, message in (
        ("llm_context", 10, "at least 256"),
        ("llm_gpu_layers", -2, "-1 .all. or more"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be {message}"):
            GenerationConfig(local=True, **{name: value})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = GenerationConfig(
        local=True, local_model="someone/repo:model-q4.gguf"
    )  # the download waits for serving
    assert config.model == "model-q4"
    with pytest.raises(ValueError, match=r"downloading model-q4.gguf from someone/repo failed"):
        resolve_local_model(config.local_model)
