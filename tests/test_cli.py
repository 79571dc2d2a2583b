"""The command line behaves like its neighbours': --version, --config everywhere, -v anywhere, exit codes in
--help, and a path that is not there refused with one message (exit 2, no traceback, nothing paid for)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from st_synth import __version__
from st_synth.cli import main
from st_synth.common.arguments import with_yaml
from st_synth.training.arguments import make_train_parser

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_exit_codes_in_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"st-synth {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "130 "):
        assert f"\n  {code}" in out, code
    assert "exit status:" in out and "Ctrl-C" in out


def test_verbose_after_the_command_too():
    code = ("import logging, sys; from st_synth.cli import main; status = main(sys.argv[1:]); "
            "print(status, logging.getLogger().level)")  # fmt: skip
    for argv in (["-v", "run", "--config", "missing.yaml"], ["run", "--config", "missing.yaml", "--verbose"]):
        done = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True)
        assert done.stdout.split() == ["2", "20"], done.stderr  # refused as a missing file, logging at INFO
        assert "unrecognized arguments" not in done.stderr


def test_train_takes_config_as_a_flag_or_first(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"base_model": "tiny", "lora_r": 4, "dataset": "data"}))
    parser = make_train_parser()
    first = with_yaml(parser, [str(config), "--lora_r", "8"])
    assert with_yaml(parser, ["--config", str(config), "--lora_r", "8"]) == first
    assert with_yaml(parser, ["--lora_r", "8", f"--config={config}"]) == first
    model_args, *_ = parser.parse_args_into_dataclasses(args=first)
    assert (model_args.base_model, model_args.lora_r) == ("tiny", 8)  # the command line wins


def test_run_takes_config_as_a_flag_or_alone(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"no_such_section": {}}))
    messages = []
    for argv in (["run", "--config", str(config)], ["run", str(config)]):
        assert main(argv) == 2
        messages.append(capsys.readouterr().err)
    assert messages[0] == messages[1] and "no_such_section" in messages[0]
    assert main(["run", "--config", str(config), str(config)]) == 2
    assert "give the run config once" in capsys.readouterr().err


def _refused(capsys, argv: list[str], *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_bad_config_files_are_refused_in_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("generate: [unclosed\n")
    _refused(capsys, ["run", "--config", str(tmp_path / "missing.yaml")], "missing.yaml", "does not exist")
    _refused(capsys, ["run", "--config", str(broken)], "broken.yaml", "not readable YAML")
    _refused(capsys, ["train", "--config", str(tmp_path / "missing.yaml")], "missing.yaml", "does not exist")
    _refused(capsys, ["train", str(broken)], "broken.yaml", "not readable YAML")


def test_a_corpus_that_is_not_there_is_refused_before_any_request(fake_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server = fake_server()
    base = ["generate", "--output", str(tmp_path / "out"), "--cache", str(tmp_path / "cache.sqlite"),
            "--num-examples", "4", "--kinds", "retrieval", "--languages", "English", "--no_show_progress",
            "--base-url", server.base_url, "--model", server.model]  # fmt: skip
    _refused(
        capsys, [*base, "--corpus", str(tmp_path / "no-such-folder")], "no-such-folder", "no file or folder"
    )
    _refused(capsys, [*base, "--corpus", "someone/some-dataset"], "someone/some-dataset", "Hub")
    (tmp_path / "notes.xyz").write_text("x")
    _refused(capsys, [*base, "--corpus", str(tmp_path / "notes.xyz")], "unknown format", ".jsonl")
    (tmp_path / "empty").mkdir()
    _refused(capsys, [*base, "--corpus", str(tmp_path / "empty")], "holds no")
    assert server.chat_requests == 0 and not (tmp_path / "out").exists()


def test_training_and_mining_inputs_that_are_not_there_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-data")
    _refused(capsys, ["train", "--config", str(ROOT / "recipes" / "configs" / "smollm2-cpu.yaml"),
                      "--base_model", "tiny", "--dataset", missing, "--output_dir", str(tmp_path / "model")],
             "Training data", "no-such-data")  # fmt: skip
    assert not (tmp_path / "model").exists()
    _refused(capsys, ["mine", "--input", missing, "--output", str(tmp_path / "mined")], "no-such-data")
    (tmp_path / "not-a-dataset").mkdir()
    _refused(capsys, ["mine", "--input", str(tmp_path / "not-a-dataset"), "--output", str(tmp_path / "mined")],
             "neither `save_to_disk` wrote nor `datasets` can read")  # fmt: skip


def test_run_push_and_dedup_flags_come_from_their_dataclasses():
    import dataclasses

    from st_synth.cli import DedupShards, PushTarget, RunCommand, build_parser

    for command, dtype, argv in [
        ("run", RunCommand, ["run", "c.yaml", "--set", "train.seed=1", "--set", "evaluate.baseline=false",
                             "--output", "o", "--push_to_hub", "me/m", "--private"]),
        ("push", PushTarget, ["push", "folder", "--repo", "me/m", "--private"]),
        ("dedup", DedupShards, ["dedup", "a", "b", "--output", "o", "--no_near_duplicates",
                                "--near_duplicate_threshold", "0.9"]),
    ]:  # fmt: skip
        parser, commands = build_parser(command)
        sub = commands[command]
        assert sub.dataclass_types == [dtype]
        flags = {option for action in sub._actions for option in action.option_strings} | {
            action.dest for action in sub._actions if not action.option_strings}  # fmt: skip
        for f in dataclasses.fields(dtype):  # every field is a flag of its own name, or a positional
            assert f"--{f.name}" in flags or f.name in flags, f.name
        (settings,) = sub.namespace_to_dataclasses(parser.parse_args(argv))
        if command == "run":
            assert (settings.config_file, settings.set, settings.output, settings.push_to_hub, settings.private) == (
                "c.yaml", ["train.seed=1", "evaluate.baseline=false"], "o", "me/m", True)  # fmt: skip
        elif command == "push":
            assert (settings.folder, settings.repo, settings.private) == ("folder", "me/m", True)
        else:
            assert (settings.inputs, settings.no_near_duplicates, settings.near_duplicate_threshold) == (
                ["a", "b"], True, 0.9)  # fmt: skip
    with pytest.raises(SystemExit) as exited:  # the folder is required: argparse's usage error
        main(["push", "--repo", "me/m"])
    assert exited.value.code == 2


def test_every_other_path_flag_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """The filter, dedup, push, export and evaluate inputs and the extra training datasets: a path that is not
    there gets exit 2 and one line naming it, before any model is loaded or trained."""
    import datasets

    from st_synth.data.toy import write_toy_synthetic

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-thing")
    _refused(capsys, ["filter", "--input", missing, "--output", str(tmp_path / "f")], missing,
             "is no file or folder here")  # fmt: skip
    _refused(capsys, ["dedup", missing, "--output", str(tmp_path / "d")], missing, "not a saved DatasetDict")
    _refused(capsys, ["push", missing, "--repo", "me/m"], missing, "not a saved SentenceTransformer folder")
    _refused(capsys, ["export", "--model", missing, "--output", str(tmp_path / "e")], missing)
    _refused(capsys, ["evaluate", "--model", missing, "--tasks", "LeeDocSTS", "--output", str(tmp_path / "r.json")],
             "Cannot load a SentenceTransformer", missing)  # fmt: skip
    data = str(write_toy_synthetic(tmp_path / "data", rows_per_kind=4))
    datasets.disable_progress_bars()  # `datasets`' own bars on stderr are not the message
    capsys.readouterr()
    try:
        _refused(capsys, ["train", "--config", str(ROOT / "recipes" / "configs" / "smollm2-cpu.yaml"), "--base_model", "tiny",
                          "--dataset", data, "--extra_datasets", f"x={missing}|Retrieve.", "--output_dir", str(tmp_path / "m")],
                 "Extra dataset 'x'", missing)  # fmt: skip
    finally:
        datasets.enable_progress_bars()
    assert not any((tmp_path / name).exists() for name in ("f", "d", "e", "r.json", "m"))
