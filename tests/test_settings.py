"""One source of truth for settings: every stage field is a flag and a YAML key of the same name, renamed
settings keep working (with a warning), `st-synth train` is the recipe, and the saved prompts and the model
card follow the training settings."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from sentence_transformers import SentenceTransformer

from st_synth.cli import build_parser
from st_synth.common.arguments import SettingsParser
from st_synth.data.filtering import ConsistencyFilter
from st_synth.data.mining import MiningArguments
from st_synth.data.toy import write_toy_synthetic
from st_synth.evaluation.evaluate import EvaluationArguments
from st_synth.generation.config import GenerationConfig
from st_synth.pipeline import RunArguments, load_config, plan_run
from st_synth.testing.tiny import build_tiny_mistral
from st_synth.training.arguments import TRAIN_DATACLASSES, make_train_parser

ROOT = Path(__file__).resolve().parents[1]

# YAML section -> (the stage dataclasses it holds, the subcommand whose flags they are)
STAGES = {
    "generate": ((GenerationConfig,), "generate"),
    "filter": ((ConsistencyFilter,), "filter"),
    "mine": ((MiningArguments,), "mine"),
    "train": (TRAIN_DATACLASSES, "train"),
    "evaluate": ((EvaluationArguments,), "evaluate"),
    "top level": ((RunArguments,), "run"),
}
# A value other than the default for fields a generic rule cannot guess, and what else it needs.
SPECIAL = {
    "GenerationConfig.kinds": ("sts", {}), "languages": ("English,French", {}), "shard_index": (1, {"num_shards": 2}),
    "top_p": (0.5, {}), "near_duplicate_threshold": (0.9, {}), "base_url": ("http://127.0.0.1:9/v1", {}), "response_format": ("text", {}),
    "lora_target_modules": (["q_proj"], {}), "extra_datasets": (["mine=some/data|Find it."], {}),
    "no_in_batch_negatives": (["sts"], {}), "tasks": (["LeeDocSTS"], {}), "task_instructions": (["A=do"], {}),
    "torch_dtype": ("bfloat16", {}), "fused_kernels": ("off", {}), "packed_sequences": ("off", {}),
    "instruction_template": ("Task: {instruction}\nText: ", {}), "local": (True, {"base_url": None}),
    "local_model": ("someone/repo:model.gguf", {"local": True, "base_url": None}),
    "loss": ("own_negatives", {}), "multi_dataset_batch_sampler": ("round_robin", {}),
    "batch_sampler": ("no_duplicates", {}), "max_tokens": (256, {}), "report_to": (["tensorboard"], {}),
    "corpus": (["builtin:wikipedia"], {"kinds": "sts", "languages": "English"}),
    "grounded_kinds": ("long_long", {"corpus": ["builtin:wikipedia"], "kinds": "sts,long_long", "languages": "English"}),
    "grounded_prompts": ({"long_long": "retelling"}, {"corpus": ["builtin:wikipedia"], "kinds": "long_long", "languages": "English"}),
    "public_datasets": ([{"name": "mine", "path": "some/data", "instructions": ["Find it."]}], {}),
    "MiningArguments.splits": (["long_long"], {}), "max_positive_similarity": (0.9, {}), "range_min": (1, {}), "matryoshka_dims": ([16, 8], {}), "directions": (["query_to_doc", "doc_to_query"], {}),
    "hardness_mode": ("hard_negatives", {"hardness_strength": 5.0}), "truncate_dim": ([16], {}), "precision": (["int8"], {}),
}  # fmt: skip


def _other_value(dtype: type, f: dataclasses.Field):
    """A valid value for ``f`` other than its default."""
    for key in (f"{dtype.__name__}.{f.name}", f.name):
        if key in SPECIAL:
            return SPECIAL[key]
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    if isinstance(default, bool):
        return not default, {}
    if isinstance(default, int):
        return default + 1, {}
    if isinstance(default, float):
        return round(default + 0.5, 3), {}
    if isinstance(default, list):
        return ["sts"], {}
    choices = f.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != default), {}
    types = str(f.type)
    if isinstance(default, dict) or "dict" in types:
        return {"use_reentrant": True}, {}
    if "bool" in types:
        return True, {}
    if "list" in types:
        return ["sts"], {}
    if "int" in types:
        return 3, {}
    if "float" in types:
        return 0.5, {}
    return "you/some-name", {}


def _own_fields(dtype) -> list[dataclasses.Field]:
    """The fields a stage dataclass declares itself (for the recipe's training arguments: the recipe's own
    defaults; sentence-transformers' ~200 inherited ones are checked for reachability below)."""
    fields = [f for f in dataclasses.fields(dtype) if f.init]
    if dtype is TRAIN_DATACLASSES[-1]:
        own = set(dtype.__dataclass_fields__) - set(dtype.__mro__[1].__dataclass_fields__)
        own |= {"output_dir", "batch_sampler", "multi_dataset_batch_sampler", "report_to", "logging_steps"}
        fields = [f for f in fields if f.name in own or "checkpointing" in f.name]
    return fields


def _flags(command: str) -> set[str]:
    parser = make_train_parser() if command == "train" else build_parser(command)[1][command]
    return {option for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("section", list(STAGES))
def test_every_stage_field_is_a_flag_and_a_yaml_key_of_the_same_name(section):
    dtypes, command = STAGES[section]
    flags = _flags(command)
    names = [f.name for dtype in dtypes for f in dataclasses.fields(dtype) if f.init]
    assert names and not [name for name in names if f"--{name}" not in flags]
    # YAML: the run reads the section with the same dataclasses, key by key: a non-default value of every
    # field comes back in the parsed dataclass under the same name.
    parser = make_train_parser() if section == "train" else SettingsParser(list(dtypes))
    assert set(parser.field_names()) == set(names)
    for dtype in dtypes:
        for f in _own_fields(dtype):
            value, extra = _other_value(dtype, f)
            parsed = parser.parse_settings({f.name: value, **extra}, section)
            got = getattr(next(obj for obj in parsed if isinstance(obj, dtype)), f.name)
            if f.name == "batch_sampler":
                got = getattr(got, "value", got)
            assert got == value, (section, f.name, got, value)


def test_the_run_reads_each_section_through_the_stage_parsers(tmp_path):
    config = load_config("recipes/configs/local-smollm2.yaml")
    config.update(output=str(tmp_path / "run"), private=True)
    config["generate"].update(retry_base_delay=0.25, block_size=8, price_prompt_per_million=0.15)
    config["filter"].update(margin=0.1)
    config["train"].update(loss="own_negatives", cached_loss=True, mini_batch_size=4, license="mit",
                           batch_sampler="no_duplicates")  # fmt: skip
    config["evaluate"].update(task_instructions=["LeeDocSTS=Find similar news."])
    plan = plan_run(config)
    assert plan.run.private and plan.output == tmp_path / "run"
    assert (plan.generation.retry_base_delay, plan.generation.block_size) == (0.25, 8)
    assert plan.generation.price_prompt_per_million == 0.15 and plan.consistency.margin == 0.1
    assert (plan.loss_args.loss, plan.loss_args.cached_loss, plan.loss_args.mini_batch_size) == (
        "own_negatives",
        True,
        4,
    )
    assert plan.output_args.license == "mit" and plan.training_args.batch_sampler.value == "no_duplicates"
    assert plan.evaluation.overrides == {"LeeDocSTS": "Find similar news."}
    assert plan.training_args.output_dir == str(tmp_path / "run" / "model")


def test_renamed_settings_still_work_and_warn():
    parser = build_parser("generate")[1]["generate"]
    old = ["--output", "x", "--model", "m", "--price-prompt", "0.15", "--price-completion", "0.6",
           "--local-backend", "transformers", "--no-progress"]  # fmt: skip
    with pytest.warns(FutureWarning, match="'local_backend' is now called 'llm_backend'"):
        config, *_ = parser.parse_args_into_dataclasses(args=old)
    assert (config.price_prompt_per_million, config.price_completion_per_million) == (0.15, 0.6)
    assert config.llm_backend == "transformers" and config.show_progress is False

    train = make_train_parser()
    for flags, expected in [(["--length_grouping", "false"], "no_duplicates"), (["--no_length_grouping"], "no_duplicates"),
                            (["--length_grouping"], "length_grouped"), ([], "length_grouped")]:  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            *_, args = train.parse_args_into_dataclasses(args=["--dataset", "d", *flags])
        sampler = args.batch_sampler
        assert getattr(sampler, "value", None) == expected or (
            expected == "length_grouped" and callable(sampler)
        )
        assert bool(flags) == any("length_grouping" in str(w.message) for w in caught)
    # The same old names as YAML keys.
    with pytest.warns(FutureWarning, match="length_grouping"):
        *_, args = train.parse_settings({"dataset": "d", "length_grouping": False}, "train")
    assert args.batch_sampler.value == "no_duplicates"
    evaluate = build_parser("evaluate")[1]["evaluate"]
    with pytest.warns(FutureWarning, match="'instruction' is now called 'task_instructions'"):
        settings, *_ = evaluate.parse_args_into_dataclasses(
            args=["--model", "m", "--tasks", "A,B", "--instruction", "A=x", "--instruction", "B=y"]
        )
    assert settings.tasks == ["A", "B"] and settings.overrides == {"A": "x", "B": "y"}


def test_bad_settings_name_the_valid_choices(tmp_path):
    from st_synth.common.arguments import SettingsError

    with pytest.raises(
        SettingsError, match=r"loss 'infonce' is unknown; choose one of: in_batch, own_negatives"
    ):
        make_train_parser().parse_settings({"loss": "infonce"}, "train")
    with pytest.raises(
        SettingsError, match=r"batch_sampler 'grouped' is unknown; choose one of: length_grouped"
    ):
        make_train_parser().parse_settings({"batch_sampler": "grouped"}, "train")
    with pytest.raises(SettingsError, match=r"Unknown key\(s\) \['temprature'\] in section 'train'"):
        make_train_parser().parse_settings({"temprature": 0.1}, "train")
    with pytest.raises(ValueError, match="local starts its own endpoint"):
        SettingsParser([GenerationConfig]).parse_settings(
            {"local": True, "base_url": "http://x/v1"}, "generate"
        )


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The same tiny recipe run through `st-synth train` and `recipes/train_mistral.py`, and once without
    instructions."""
    folder = tmp_path_factory.mktemp("runs")
    backbone = str(build_tiny_mistral(folder / "tiny", "none"))
    data = str(write_toy_synthetic(folder / "data", rows_per_kind=16))
    base = {"base_model": backbone, "dataset": data, "max_seq_length": 32, "lora_r": 4, "lora_alpha": 8,
            "per_device_train_batch_size": 8, "max_steps": 3, "use_cpu": True, "save_strategy": "no",
            "logging_steps": 1, "seed": 5, "license": "apache-2.0", "dataset_id": "you/toy-synthetic"}  # fmt: skip
    runs = {}
    for name, command, extra in [
        ("cli", [sys.executable, "-m", "st_synth.cli", "train"], {}),
        ("recipe", [sys.executable, str(ROOT / "recipes" / "train_mistral.py")], {}),
        ("plain", [sys.executable, "-m", "st_synth.cli", "train"], {"use_instructions": False}),
    ]:
        config = folder / f"{name}.yaml"
        config.write_text(yaml.safe_dump({**base, **extra, "output_dir": str(folder / name)}))
        done = subprocess.run([*command, str(config), "--max_steps", "2"], capture_output=True, text=True,
                              timeout=600, cwd=ROOT)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = folder / name
    return runs


def test_st_synth_train_does_what_the_recipe_script_does(tiny_runs):
    summaries = {
        name: json.loads((tiny_runs[name] / "training_summary.json").read_text())
        for name in ("cli", "recipe")
    }
    losses = {name: [e["loss"] for e in s["log_history"] if "loss" in e] for name, s in summaries.items()}
    assert len(losses["cli"]) == 2 and losses["cli"] == losses["recipe"]  # --max_steps 2 beat the YAML's 3
    assert summaries["cli"]["batch_sampler"] == "length_grouped"
    assert summaries["cli"]["loss"]["classification"] == "OwnNegativesLoss"
    texts = ["cat dog bird", "stock market price"]
    a, b = (SentenceTransformer(str(tiny_runs[name] / "final")).encode(texts, convert_to_tensor=True)
            for name in ("cli", "recipe"))  # fmt: skip
    torch.testing.assert_close(a, b)


def test_saved_prompts_follow_the_training_instructions(tiny_runs):
    texts = ["cat dog bird", "stock market price"]
    instructed = SentenceTransformer(str(tiny_runs["cli"] / "final"))
    prompt = instructed.prompts["query"]
    assert prompt.startswith("Instruct: ") and prompt.endswith("\nQuery: ")
    torch.testing.assert_close(instructed.encode_query(texts, convert_to_tensor=True),
                               instructed.encode([prompt + t for t in texts], convert_to_tensor=True))  # fmt: skip
    plain = SentenceTransformer(str(tiny_runs["plain"] / "final"))
    assert plain.prompts["query"] == "" and plain.prompts["document"] == ""
    torch.testing.assert_close(plain.encode_query(texts, convert_to_tensor=True),
                               plain.encode(texts, convert_to_tensor=True))  # fmt: skip
    card = (tiny_runs["plain"] / "final" / "README.md").read_text()
    assert "trained on plain text, without task instructions" in card and "Instruct:" not in card


def test_the_card_is_hub_metadata_with_every_evaluated_task(tiny_runs):
    from huggingface_hub import ModelCard

    from st_synth.cards.render import render_model_card

    final = tiny_runs["cli"] / "final"
    scores = {"LeeDocSTS": 0.51, "MiniNewsgroupsClassification": 0.72, "ChatterbotQARetrieval": 0.19}
    readme = render_model_card(final, evaluation=scores, comparison={"untrained": {"LeeDocSTS": 0.1}})
    card = ModelCard.load(readme)
    data = card.data.to_dict()
    assert data["library_name"] == "sentence-transformers" and data["license"] == "apache-2.0"
    assert data["datasets"] == ["you/toy-synthetic"] and "st-synth" in data["tags"]
    assert data["language"] == ["en"] and data.get("widget")  # from sentence-transformers' card data
    results = {r.dataset_name: r for r in card.data.eval_results}
    assert set(results) == {f"MTEB {task}" for task in scores}
    for task, score in scores.items():
        assert results[f"MTEB {task}"].metric_value == score
    assert results["MTEB LeeDocSTS"].task_type == "STS"
    assert results["MTEB ChatterbotQARetrieval"].metric_type == "ndcg_at_10"
    assert data["model-index"][0]["name"] == "cli"
    assert "| LeeDocSTS | 0.5100 | 0.1000 |" in card.text  # st-synth's own body stays
    SentenceTransformer(str(final)).encode(["still loads"])


def test_yaml_null_sets_a_field_that_takes_none():
    from st_synth.data.mining import MiningArguments

    (mining,) = SettingsParser([MiningArguments]).parse_settings(
        {"relative_margin": None, "range_max": 6}, "mine"
    )
    assert mining.relative_margin is None and mining.range_max == 6
    (default,) = SettingsParser([MiningArguments]).parse_settings({}, "mine")
    assert default.relative_margin == 0.05


@pytest.mark.parametrize("command", ["generate", "filter", "mine", "train", "evaluate", "run", "push"])
def test_every_command_prints_its_help(command, capsys):
    """argparse formats every help text (a bare '%' in one breaks --help for the whole command)."""
    from st_synth.cli import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0 and "--" in capsys.readouterr().out


def test_importing_st_synth_calls_no_deprecated_api_of_its_dependencies():
    """Every module of the package and the recipe, imported in a fresh interpreter: a moved or deprecated
    import path of sentence-transformers, transformers, mteb, ... would warn here, pointing at our file."""
    code = """
import importlib, pathlib, pkgutil, runpy, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as seen:
    import st_synth
    for module in pkgutil.walk_packages(st_synth.__path__, "st_synth."):
        if not module.name.endswith("__main__"):  # runs a program
            importlib.import_module(module.name)
    runpy.run_path("recipes/train_mistral.py", run_name="not_main")
root = pathlib.Path.cwd().resolve()
def ours(filename):  # the project's code, not a virtual environment that may sit inside the checkout
    path = pathlib.Path(filename).resolve()
    return path.is_relative_to(root) and path.relative_to(root).parts[0] in ("st_synth", "recipes", "tests")
ours = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in seen
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and ours(w.filename)]
print("\\n".join(ours))
print(f"imported, {len(seen)} warnings in all")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("imported"), done.stdout
    assert lines[:-1] == [], "\n".join(lines[:-1])


def test_settings_that_take_several_names_read_a_string_or_a_list_the_same():
    from st_synth.common.text import name_list
    from st_synth.data.corpus import CorpusArguments
    from st_synth.data.mining import MiningArguments
    from st_synth.evaluation.evaluate import EvaluationArguments

    assert name_list("retrieval, sts") == name_list(["retrieval", " sts "]) == ["retrieval", "sts"]
    assert name_list(["LeeDocSTS,ChatterbotQARetrieval", "", "x"]) == [
        "LeeDocSTS",
        "ChatterbotQARetrieval",
        "x",
    ]
    assert name_list(None) == name_list("") == []
    assert EvaluationArguments(tasks=["LeeDocSTS, x"]).tasks == ["LeeDocSTS", "x"]
    assert CorpusArguments(corpus="a.jsonl, builtin:wikipedia").corpus == ["a.jsonl", "builtin:wikipedia"]
    assert MiningArguments(splits="retrieval, sts").splits == ["retrieval", "sts"]
