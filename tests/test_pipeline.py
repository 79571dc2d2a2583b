"""`st-synth run`: the whole path (generate -> filter -> train -> evaluate -> card) on a shortened config.

A real HTTP endpoint on 127.0.0.1 (the fake OpenAI server), the real all-MiniLM-L6-v2 as guide and
reference, a tiny Mistral built in place as backbone, and the three shipped real evaluation tasks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from datasets import load_from_disk

from st_synth.cli import main
from st_synth.data.examples import InstructionFormat, load_examples, save_examples
from st_synth.pipeline import load_config, plan_run, score_table
from tests.helpers import assert_images_linked


def _corpus(folder) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    topics = ["river floods", "library books", "school buses", "city budget", "bakery bread", "harbour ships",
              "mountain trails", "solar panels", "football cup", "museum paintings", "train delays", "hospital beds"]  # fmt: skip
    for i, topic in enumerate(topics):
        (folder / f"{i}.txt").write_text(f"Report {i} covers {topic} in the town of Place{i}. Officials said the "
                                         f"{topic} changed this year, with {i + 3} new plans announced.")  # fmt: skip
    return str(folder)


def _config(tmp_path, base_url: str) -> dict:
    return {
        "output": str(tmp_path / "run"),
        "generate": {"base_url": base_url, "model": "fake-llm", "num_examples": 18, "languages": "English",
                     "kinds": {"retrieval": 1, "short_short": 1, "sts": 1, "long_long": 1}, "concurrency": 4,
                     "cache": str(tmp_path / "answers.sqlite"), "show_progress": False,
                     "corpus": _corpus(tmp_path / "corpus"), "passage_tokens": 24, "min_tokens": 8,
                     # as the main job: retellings in prose beside free generation (here sts)
                     "grounded_kinds": ["retrieval", "short_short", "long_long"],
                     "grounded_prompts": {"long_long": "retelling"}},
        "filter": {"enabled": True, "top_k": 3, "round_trip_top_k": 12},
        "mine": {"enabled": True, "range_max": 6, "relative_margin": None},
        "train": {"base_model": "tiny", "max_seq_length": 32, "lora_r": 4, "per_device_train_batch_size": 4,
                  "max_steps": 2, "use_cpu": True, "gradient_checkpointing": False},
        "evaluate": {"tasks": ["LeeDocSTS", "MiniNewsgroupsClassification", "ChatterbotQARetrieval"],
                     "baseline": True, "reference": "all-MiniLM-L6-v2", "max_seq_length": 32},
    }  # fmt: skip


@pytest.mark.slow
def test_shortened_main_job_composes_every_stage_and_reuses_its_work(tmp_path, fake_server, capsys):
    server = fake_server(model="fake-llm")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(_config(tmp_path, server.base_url)))
    assert main(["run", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    for stage in ("[1/6] generate", "[2/6] filter", "[3/6] mine", "[4/6] train", "[5/6] evaluate",
                  "[6/6] package"):  # fmt: skip
        assert stage in out
    run = tmp_path / "run"
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["generation"]["num_examples_kept"] == 18 and summary["generation"]["complete"]
    filtered = summary["filter"]
    assert filtered["rows"] == 18 and 0 < filtered["kept"] <= 18
    assert filtered["kinds"]["retrieval"]["round_trip"] and filtered["kinds"]["long_long"]["round_trip"]
    assert not filtered["kinds"]["sts"]["round_trip"]  # free generation: the usual check
    # Grounded retrieval, titles and retellings get negatives mined over the corpus; free sts has its own.
    mined = {kind for kind in ("retrieval", "short_short", "long_long") if filtered["kinds"][kind]["kept"]}
    assert mined and set(summary["mining"]["splits"]) == mined
    data = load_examples(run / "data")
    for kind in summary["mining"]["splits"]:
        assert data[kind].column_names == [
            "instruction",
            "query",
            "positive",
            "negative",
            "language",
            "template",
        ]
        assert all(row["negative"] != row["positive"] for row in data[kind])
    # Decontaminated against the evaluated tasks without being asked, and said so.
    assert set(summary["training"]["decontamination"]["tasks"]) == set(
        scores_tasks := summary["evaluation"]["trained"]
    )
    assert scores_tasks
    assert summary["training"]["global_steps"] == 2
    scores = summary["evaluation"]
    assert list(scores) == ["untrained", "trained", "all-MiniLM-L6-v2"]
    for model_scores in scores.values():
        assert set(model_scores) == {"LeeDocSTS", "MiniNewsgroupsClassification", "ChatterbotQARetrieval"}
        assert all(-1 <= value <= 1 for value in model_scores.values())
    assert scores["untrained"] != scores["trained"]  # two steps of LoRA moved the embeddings
    assert "| task | untrained | trained | all-MiniLM-L6-v2 | trained - untrained |" in out
    card = (run / "model" / "final" / "README.md").read_text()
    assert "| task | this model | untrained | all-MiniLM-L6-v2 |" in card
    assert "### Smaller embeddings" not in card and "](images/storage.png)" not in card  # no cut sizes yet
    assert f"| consistency filter | kept {filtered['kept']} of 18 examples" in card
    assert (
        "| grounded in | " in card
        and "wrote the other side of the retrieval, short_short, long_long examples (prompts: long_long retelling) |"
        in card
        and "(grounded queries: their own passage in the top 12 of the corpus)" in card
    )
    assert "| decontamination | no training text equals or shares 13 words with a text of LeeDocSTS" in card
    passages = summary["mining"]["passages"]
    assert (
        f"| hard negatives | mined by `all-MiniLM-L6-v2` among {tmp_path / 'corpus'} ({passages} texts): "
        in card
    )
    sent = server.chat_requests

    # The same command again: no request, no training, no evaluation is paid twice.
    assert main(["run", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    again = json.loads((run / "run_summary.json").read_text())
    assert server.chat_requests == sent and again["generation"]["requests_sent"] == 0
    assert "reusing the trained model" in out and out.count("unchanged, scores from") == 3
    assert again["evaluation"] == scores

    # A changed training setting retrains and re-evaluates the trained model only.
    assert main(["run", "--config", str(config_file), "--set", "train.learning_rate=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "reusing the trained model" not in out and out.count("unchanged, scores from") == 2

    # Cut sizes are scored beside the full embeddings, as columns of the table and the card; nothing else reruns.
    assert main(["run", "--config", str(config_file), "--set", "train.learning_rate=1e-3",
                 "--set", "evaluate.truncate_dim=[16]", "--set", "evaluate.precision=[binary]"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "reusing the trained model" in out and out.count("unchanged, scores from") == 3
    cut = json.loads((run / "run_summary.json").read_text())["evaluation"]
    assert list(cut) == ["untrained", "trained", "all-MiniLM-L6-v2", "16 dims", "binary"]
    card = (run / "model" / "final" / "README.md").read_text()
    assert "| task | this model | untrained | all-MiniLM-L6-v2 | 16 dims | binary |" in card
    # The card's storage table: bytes per vector and the share of the full embedding's mean score kept.
    full, cut16, binary = (
        line for line in card.splitlines() if line.startswith(("| full |", "| 16 dims |", "| binary |"))
    )
    assert full.startswith("| full | 32 | float32 | 128 |") and full.endswith("| 100.0% |")
    assert cut16.startswith("| 16 dims | 16 | float32 | 64 |") and binary.startswith(
        "| binary | 32 | binary | 4 |"
    )
    means = {row: float(row.split(" | ")[4]) for row in (full, cut16)}
    # (from the card's rounded means: within a tenth of a point of the exact share the card prints)
    assert abs(float(cut16.split(" | ")[-1].rstrip("% |")) - 100 * means[cut16] / means[full]) <= 0.11
    final = run / "model" / "final"
    saved = {str(p.relative_to(final)): p.read_bytes() for p in (final / "images").glob("*.png")}
    # Two training steps log no step losses (logging_steps 5): no loss plot; scores and storage plots.
    assert_images_linked(card, saved, ["scores", "storage"])
    assert not (final / "images" / "loss.png").exists()

    # `st-synth generate`, `filter` and `evaluate` are the run's own stages: the same settings give the same
    # dataset (every answer from the cache: no request), the same filter verdicts and the same scores.
    g = _config(tmp_path, server.base_url)["generate"]
    flags = [f"--{key}={','.join(f'{k}={v}' for k, v in value.items()) if isinstance(value, dict) else ','.join(value) if isinstance(value, list) else value}"
             for key, value in g.items() if key != "show_progress"]  # fmt: skip
    assert main(["generate", *flags, "--no_show_progress", "--output", str(tmp_path / "generated")]) == 0
    assert server.chat_requests == sent
    ran, generated = load_from_disk(str(run / "synthetic")), load_from_disk(str(tmp_path / "generated"))
    assert {kind: split.to_list() for kind, split in generated.items()} == {
        kind: split.to_list() for kind, split in ran.items()}  # fmt: skip
    assert main(["filter", "--input", str(tmp_path / "generated"), "--output", str(tmp_path / "filtered"),
                 "--top_k", "3", "--round_trip_top_k", "12"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "filtered" / "filter_report.json").read_text())
    assert {kind: entry["kept"] for kind, entry in report["kinds"].items()} == {
        kind: entry["kept"] for kind, entry in filtered["kinds"].items()}  # fmt: skip
    tasks = ",".join(_config(tmp_path, server.base_url)["evaluate"]["tasks"])
    assert main(["evaluate", "--model", str(final), "--tasks", tasks, "--reference", "all-MiniLM-L6-v2",
                 "--max_seq_length", "32", "--truncate_dim", "16", "--precision", "binary",
                 "--output", str(tmp_path / "results.json")]) == 0  # fmt: skip
    by_cli, by_run = (
        json.loads(path.read_text()) for path in (tmp_path / "results.json", run / "eval" / "trained.json")
    )
    assert by_cli["summary"]["main_score"] == pytest.approx(by_run["summary"]["main_score"], abs=1e-6)
    assert by_cli["by_dimension"].keys() == by_run["by_dimension"].keys() == {"16"}
    assert by_cli["by_dimension"]["16"] == pytest.approx(by_run["by_dimension"]["16"], abs=1e-6)
    assert by_cli["by_precision"]["binary"]["main_score"] == pytest.approx(
        by_run["by_precision"]["binary"]["main_score"], abs=1e-6
    )
    out = capsys.readouterr().out
    reference = json.loads((run / "run_summary.json").read_text())["evaluation"]["all-MiniLM-L6-v2"]
    assert all(f"{score:.4f}" in out for score in reference.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trian": {}}, r"Unknown key\(s\) \['trian'\] in section 'top level'; valid keys: .*train"),
        (
            {"train": {"lora_rank": 8}},
            r"Unknown key\(s\) \['lora_rank'\] in section 'train'; valid keys: .*lora_r",
        ),
        ({"filter": {"top_k": 0}}, r"top_k must be at least 1"),
        ({"evaluate": {"tasks": ["LeeDocSTSS"]}}, r"'LeeDocSTSS'\. Did you mean 'LeeDocSTS'"),
        ({"generate": {"kinds": "retrieval,poems"}}, r"poems.*retrieval"),
        ({"train": {"dataset": "x"}}, r"train.dataset and train.output_dir are set by the run"),
        ({"mine": {"range_max": 3}}, r"candidates must be in 1..range_max - range_min \(3\), got 5"),
        ({"train": {"instruction_template": "Query: "}}, r"must contain '\{instruction\}' exactly once"),
        (
            {
                "generate": {
                    "kinds": "bitext,sts",
                    "languages": "English,German",
                    "grounded_kinds": None,
                    "grounded_prompts": None,
                }
            },
            r"bitext cannot be grounded",
        ),
        (
            {"generate": {"grounded_prompts": {"sts": "retelling"}}},
            r"names 'sts', which is not a grounded kind",
        ),
    ],
)
def test_bad_run_configs_fail_before_anything_starts(tmp_path, change, message):
    config = _config(tmp_path, "http://127.0.0.1:9/v1")
    for section, values in change.items():
        config[section] = {**(config.get(section) or {}), **values}
    with pytest.raises(ValueError, match=message):
        plan_run(config)
    assert not (tmp_path / "run").exists()


def test_remote_endpoint_without_key_and_cli_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = _config(tmp_path, "https://api.example.com/v1")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(config_file)]) == 2
    assert "No API key for https://api.example.com/v1" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["run", "--config", str(config_file), "--set", "nodot=1"]) == 2
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_shipped_main_job_config_is_valid_and_overridable():
    config = load_config("recipes/configs/local-smollm2.yaml", {"generate": {"num_examples": 7}})
    plan = plan_run(config)
    assert plan.local and plan.generation.num_examples == 7 and plan.consistency is not None
    assert plan.model_args.base_model == "smollm2-135m" and plan.training_args.use_cpu
    # README's block: two epochs (ablations.md, over three seeds)
    assert plan.training_args.num_train_epochs == 2
    assert plan.tasks == ["LeeDocSTS", "MiniNewsgroupsClassification", "ChatterbotQARetrieval"]
    assert plan.data_args.decontaminate == plan.tasks  # on by default, against what is evaluated
    # Every pair with an LLM-written side: retellings of shipped news passages beside free generation of the
    # other kinds (no free retrieval), no heuristic pairs.
    assert plan.generation.corpus == ["builtin:lee-background"]
    assert plan.generation.grounded == ("long_long",) and set(plan.generation.kind_weights) == {
        "classification", "short_short", "sts", "long_long"
    }  # fmt: skip
    assert plan.generation.grounded_prompts == {"long_long": "retelling"}
    assert (
        not plan.data_args.extra_datasets and plan.consistency.round_trip_top_k == 5 and plan.mining is None
    )
    # The earlier main job, now the ablation with the heuristic pairs: free generation beside real pairs.
    heuristic = plan_run(load_config("recipes/configs/local-smollm2-heuristic.yaml"))
    assert not heuristic.generation.corpus and len(heuristic.data_args.extra_datasets) == 2
    assert heuristic.generation.num_examples == 160 and heuristic.training_args.num_train_epochs == 2
    grounded = plan_run(load_config("recipes/configs/local-smollm2-grounded.yaml"))
    assert grounded.generation.corpus == ["builtin:lee-background", "builtin:wikipedia"]
    assert grounded.mining is not None and grounded.consistency.round_trip_top_k == 5
    assert not grounded.data_args.extra_datasets and grounded.stages[2] == "mine"
    off = plan_run(load_config("recipes/configs/local-smollm2.yaml", {"train": {"decontaminate": []}}))
    assert off.data_args.decontaminate == []


def test_the_run_saves_its_data_with_the_instructions_it_trains_with(tmp_path):
    config = _config(tmp_path, "http://127.0.0.1:9/v1")
    assert (plan_run(config).generation.instruction_format) == InstructionFormat()
    template = "Task: {instruction}\nText: "
    for train, mode in (({"use_instructions": False}, "none"), ({"symmetric_instructions": False}, "anchor")):
        config["train"].update(train, instruction_template=template)
        assert plan_run(config).generation.instruction_format == InstructionFormat(mode, template)
        config["train"].pop(next(iter(train)))
    config["generate"]["instructions"] = "none"  # the generate section's own choice wins
    assert plan_run(config).generation.instruction_format == InstructionFormat("none", template)


def test_the_runs_training_checkpoints_and_resumes_only_from_its_own(tmp_path):
    from st_synth.pipeline import CHECKPOINTS_FILE, own_checkpoints

    plan = plan_run(_config(tmp_path, "http://127.0.0.1:9/v1"))
    assert (
        str(getattr(plan.training_args.save_strategy, "value", plan.training_args.save_strategy)) == "steps"
    )
    assert plan.training_args.save_total_limit == 2
    model = tmp_path / "model"
    (model / "checkpoint-4").mkdir(parents=True)
    own_checkpoints(model, "first")  # unmarked: another training's, never resumed
    assert not (model / "checkpoint-4").exists() and (model / CHECKPOINTS_FILE).is_file()
    (model / "checkpoint-8").mkdir()
    own_checkpoints(model, "first")  # the same data and settings, killed: resumed from its own checkpoint
    assert (model / "checkpoint-8").is_dir()
    own_checkpoints(model, "second")  # the data or a setting changed
    assert not (model / "checkpoint-8").exists()


def test_the_training_fingerprint_covers_the_metadata_training_reads(tmp_path):
    from datasets import load_from_disk

    from st_synth.data.toy import write_toy_synthetic
    from st_synth.pipeline import dataset_fingerprint

    folder = write_toy_synthetic(tmp_path / "data", rows_per_kind=4)
    before = dataset_fingerprint(folder)
    metadata = load_from_disk(str(folder / "metadata"))
    metadata["sts"] = metadata["sts"].map(lambda row: {"instruction": "Another task."})
    metadata.save_to_disk(str(tmp_path / "other"))
    shutil.rmtree(folder / "metadata")
    shutil.copytree(tmp_path / "other", folder / "metadata")
    assert dataset_fingerprint(folder) != before  # same texts, other instructions: training must run again


def test_score_table_reports_the_change():
    table = score_table({"untrained": {"A": 0.1}, "trained": {"A": 0.35}, "ref": {"A": 0.5}})
    assert table.splitlines()[2] == "| A | 0.1000 | 0.3500 | 0.5000 | +0.2500 |"


def test_the_mine_stage_without_a_corpus_mines_among_the_datas_own_positives(tmp_path):
    """Free generation (no corpus): each pair's negative is the closest other pair's positive; classification
    keeps its labels and never lends them; LLM-written negatives are replaced only when asked."""
    from datasets import Dataset, DatasetDict

    from st_synth.pipeline import _mine, _Stages

    topics = ["river floods", "library books", "school buses", "city budget", "bakery bread", "harbour ships"]
    provenance = {"language": ["English"] * 6, "template": ["t"] * 6}

    def split(prefix: str, negatives: bool) -> Dataset:
        rows = {"instruction": ["Find it."] * 6, "query": [f"{prefix} {t}?" for t in topics],
                "positive": [f"{prefix}: the {t} of the town changed this year, officials said." for t in topics]}  # fmt: skip
        if negatives:
            rows["negative"] = [f"An LLM-written negative about {t}." for t in topics]
        return Dataset.from_dict({**rows, **provenance})

    labels = Dataset.from_dict({"instruction": ["Classify."] * 6, "query": [f"News on {t}." for t in topics],
                                "positive": ["local"] * 6, "negative": ["sport"] * 6, **provenance})  # fmt: skip
    written = DatasetDict({"retrieval": split("what about", True), "classification": labels,
                           "short_short": split("headline", False), "sts": split("said", True)})  # fmt: skip
    for replace in (False, True):
        config = _config(tmp_path, "http://127.0.0.1:9/v1")
        config["generate"].update(corpus=None, grounded_kinds=None, grounded_prompts=None)
        config["mine"] = {
            "range_max": 6,
            "relative_margin": None,
            "candidates": 3,
            "replace_negatives": replace,
        }
        plan = plan_run(config)
        assert plan.stages[2] == "mine"
        save_examples(written, plan.output / "data", InstructionFormat())
        (plan.output / "data" / "generation_report.json").write_text("{}")
        lines = []
        report = _mine(plan, _Stages(plan, lines.append))
        assert lines[0] == "[3/6] mine: hard negatives among the data's own positives with all-MiniLM-L6-v2"
        data = load_examples(plan.output / "data")
        assert (plan.output / "data" / "generation_report.json").is_file()
        assert json.loads((plan.output / "data" / "mining_report.json").read_text()) == report
        assert (
            report["corpus"] == "the data's own positives" and report["passages"] == 18
        )  # no label among them
        assert data["classification"].to_dict() == labels.to_dict()
        assert set(report["splits"]) == ({"short_short", "retrieval", "sts"} if replace else {"short_short"})
        pool = {text for kind in ("retrieval", "short_short", "sts") for text in written[kind]["positive"]}
        for kind in ("retrieval", "short_short", "sts"):
            if kind in report["splits"]:
                assert (
                    report["splits"][kind] == {"rows": 6, "kept": data[kind].num_rows} and data[kind].num_rows
                )
                for row in data[kind]:
                    assert row["negative"] in pool and row["negative"] != row["positive"]
            else:  # the LLM's own negatives, untouched
                assert data[kind].to_dict() == written[kind].to_dict()
        counts = ", ".join(f"{kind} {entry['kept']}/6" for kind, entry in report["splits"].items())
        assert lines[1].startswith(f"      {counts} (")


def test_the_ablation_benchmark_reports_each_variant_over_its_seeds(capsys, monkeypatch, tmp_path):
    """benchmarks/bench_ablations.py --seeds: per task the mean over seeds, and the lowest and highest mean of
    one seed (a variant's spread is what tells a real change from seed noise)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ablations.py"
    spec = importlib.util.spec_from_file_location("bench_ablations", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = [{"seed": 42, "scores": {"A": 0.5, "B": 0.9}, "train_rows": 10},
            {"seed": 43, "scores": {"A": 0.7, "B": 0.9}, "train_rows": 10}]  # fmt: skip
    full = bench.summarize(runs)
    assert full["scores"] == pytest.approx({"A": 0.6, "B": 0.9})
    assert full["mean"] == pytest.approx(0.75) and full["seed_means"] == pytest.approx([0.7, 0.8])
    other = bench.summarize([{**runs[0], "scores": {"A": 0.3, "B": 0.9}}])
    table = bench.render({"seeds": [42, 43], "untrained": {"A": 0.1, "B": 0.5},
                          "variants": {"full": full, "other": other}})  # fmt: skip
    assert table.splitlines() == [
        "| variant | train rows | A | B | mean | seeds 42, 43: lowest-highest mean | mean - full |",
        "|---|---|---|---|---|---|---|",
        "| untrained backbone | 0 | 0.1000 | 0.5000 | 0.3000 | | -0.4500 |",
        "| full | 10 | 0.6000 | 0.9000 | 0.7500 | 0.7000-0.8000 | +0.0000 |",
        "| other | 10 | 0.3000 | 0.9000 | 0.6000 | 0.6000-0.6000 | -0.1500 |",
    ]
    monkeypatch.setattr(sys, "argv", ["bench_ablations.py", "--variants", "full", "--seeds", "42,x"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--seeds takes whole numbers separated by commas, got '42,x'" in capsys.readouterr().err
    # The retellings variant trains on bench_prose_pairs.py's files: without them it says how to make them.
    monkeypatch.setattr(
        sys, "argv", ["bench_ablations.py", "--variants", "retellings", "--prose_pairs", str(tmp_path)]
    )
    with pytest.raises(SystemExit):
        bench.main()
    error = capsys.readouterr().err
    assert (
        "No retelling_lee, retelling_wiki under" in error
        and "bench_prose_pairs.py --variants retelling" in error
    )
    (tmp_path / "retelling_lee").mkdir()
    (tmp_path / "retelling_wiki").mkdir()
    assert bench.retelling_sources(tmp_path) == [
        f"retelling_{name}={tmp_path / f'retelling_{name}'}|Retrieve semantically similar text."
        for name in ("lee", "wiki")
    ]


def test_the_run_prepares_the_data_then_trains_and_packages_and_pushes_once(tmp_path, monkeypatch):
    """The run's train stage runs the data stage (decontamination against the evaluated tasks) and hands its
    output to training, which neither renders the card nor pushes: the package stage does both, once, to the
    train section's hub_model_id when that asked for a push."""
    import st_synth.cards.package as package
    import st_synth.training.trainer as trainer
    from st_synth.data.toy import write_toy_synthetic
    from st_synth.pipeline import _package, _Stages, _train, plan_run

    config = _config(tmp_path, "http://127.0.0.1:9/v1")
    config["train"].update(push_to_hub=True, hub_model_id="me/run-model")
    plan = plan_run(config)
    write_toy_synthetic(plan.output / "data", rows_per_kind=6)
    calls = {}

    def fake_train(
        model_args, data_args, training_args, output_args, loss_args, *, sources=None, package=True
    ):
        calls["train"] = {"package": package, "sources": sources}
        (Path(training_args.output_dir) / "final").mkdir(parents=True)
        return {"train_loss": 1.0, "global_steps": 1, "sources": {n: d.num_rows for n, d in sources[0].items()},
                "decontamination": sources[1].get("decontamination"), "hub_model_id": "me/run-model"}  # fmt: skip

    pushes = []
    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setattr(package, "package_model", lambda folder, **kw: pushes.append(kw["repo_id"])
                        or {"card": str(folder / "README.md"), "pushed": f"https://hub.local/{kw['repo_id']}"})  # fmt: skip
    stages = _Stages(plan, lambda line: None)
    record = _train(plan, stages)
    prepared, report = calls["train"]["sources"]
    assert calls["train"]["package"] is False
    assert set(prepared) == set(load_examples(plan.output / "data")) and report["kept_by_kind"]
    assert set(report["decontamination"]["tasks"]) == set(plan.tasks)  # the evaluated tasks, unasked
    assert record["hub_model_id"] == "me/run-model"
    _package(
        plan, stages, {"training": record, "evaluation": {"trained": {}}, "filter": None, "mining": None}
    )
    assert pushes == ["me/run-model"]
