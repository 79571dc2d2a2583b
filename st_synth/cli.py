"""The ``st-synth`` command line.

Every subcommand's flags are the fields of the stage dataclasses (``st_synth.common.arguments``), under the same
names as the keys of an ``st-synth run`` YAML file; ``st-synth train`` is ``recipes/train_mistral.py``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from st_synth.common.arguments import SettingsParser


@dataclass
class GenerateOutput:
    """Where ``st-synth generate`` puts the dataset (in ``st-synth run``, the run's folder decides)."""

    output: str = field(metadata={"help": "Folder for the DatasetDict and its generation_report.json."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Also push the dataset to this Hub repo.",
                                                            "metavar": "REPO"})  # fmt: skip
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    batch_export: str | None = field(default=None, metadata={
        "help": "Send nothing: write the requests the answer cache cannot answer to this file as OpenAI Batch "
        "API lines (for vLLM's run_batch, OpenAI's Batch API, ...) and exit with status 4; no endpoint or key "
        "needed. Rerun with --batch_import RESULTS (and --batch_export for the next round) until it saves "
        "the dataset.", "metavar": "REQUESTS.jsonl"})  # fmt: skip
    batch_import: str | None = field(default=None, metadata={
        "help": "First put the answers of a Batch API results file (answering a --batch_export file) into the "
        "answer cache.", "metavar": "RESULTS.jsonl"})  # fmt: skip
    batch: bool = field(default=False, metadata={
        "help": "Send the requests through the endpoint's Batch API (OpenAI files + batches: half the price, "
        "answers within 24 h) instead of one by one: each round one batch, polled until it ends, its answers "
        "put in the answer cache. Interrupted, the same command polls the batches already submitted instead "
        "of paying for them again."})  # fmt: skip
    batch_poll_interval: float = field(default=30.0, metadata={
        "help": "Seconds between two looks at a running batch (--batch)."})  # fmt: skip
    batch_max_requests: int = field(default=50_000, metadata={
        "help": "At most this many requests in one batch (--batch): a round that needs more goes as several "
        "batches. OpenAI's limit is 50,000."})  # fmt: skip
    batch_max_bytes: int = field(default=200_000_000, metadata={
        "help": "At most this many bytes of requests file in one batch (--batch). OpenAI's limit is 200 MB."})  # fmt: skip


@dataclass
class FilterFolders:
    input: str = field(metadata={"help": "A `st-synth generate` folder."})
    output: str = field(metadata={"help": "Where the filtered DatasetDict (and filter_report.json) go."})


@dataclass
class EvaluateTarget:
    model: str = field(metadata={"help": "A SentenceTransformer folder or Hub id."})
    output: str = field(
        default="results.json", metadata={"help": "mteb results plus a summary (main score, mean)."}
    )
    update_card: bool = field(default=False, metadata={
        "help": "Write the scores (and compared models') into the model folder's card (a folder trained by the "
        "recipe)."})  # fmt: skip


@dataclass
class RunCommand:
    """The flags of ``st-synth run`` (the config's top-level keys are :class:`st_synth.pipeline.RunArguments`;
    a flag given here overrides its key)."""

    config: str | None = field(
        default=None, metadata={"help": "Run config, e.g. recipes/configs/local-smollm2.yaml."}
    )
    config_file: str | None = field(default=None, metadata={"positional": "?", "metavar": "CONFIG.yaml",
                                                            "help": "The same as --config."})  # fmt: skip
    set: list[str] = field(default_factory=list, metadata={
        "repeatable": True, "metavar": "SECTION.KEY=VALUE",
        "help": "Override one setting (VALUE is read as YAML), e.g. --set generate.num_examples=50 (repeatable)."})  # fmt: skip
    output: str | None = field(
        default=None, metadata={"help": "Output folder (overrides the config's `output`)."}
    )
    push_to_hub: str | None = field(default=None, metadata={
        "metavar": "REPO", "help": "Push the trained model to this repo (overrides the config's `push_to_hub`)."})  # fmt: skip
    private: bool = field(
        default=False, metadata={"help": "Create the Hub repo as private (overrides the config's `private`)."}
    )
    push_dataset_to_hub: str | None = field(default=None, metadata={
        "metavar": "REPO", "help": "Push the training data to this Hub dataset repo (overrides the config's "
        "`push_dataset_to_hub`)."})  # fmt: skip


@dataclass
class PushTarget:
    """The settings of ``st-synth push``."""

    folder: str = field(
        metadata={
            "positional": None,
            "help": "A saved SentenceTransformer folder, e.g. outputs/e5-model/final.",
        }
    )
    repo: str = field(metadata={"help": "Hub repository id, e.g. you/e5-smollm2."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})


@dataclass
class DedupShards:
    """The settings of ``st-synth dedup``."""

    inputs: list[str] = field(
        metadata={"positional": "+", "help": "The `st-synth generate` folders of the shards."}
    )
    output: str = field(metadata={"help": "Folder for the joined DatasetDict and dedup_report.json."})
    no_near_duplicates: bool = field(default=False, metadata={"help": "Remove exact repeats only."})
    near_duplicate_threshold: float = field(default=0.8, metadata={
        "help": "Jaccard similarity of character 5-grams (0.8 to 1.0) from which two examples are near-duplicates."})  # fmt: skip


def _fail(command: str, error: BaseException, code: int = 2, kind: str = "error") -> int:
    print(f"st-synth {command}: {kind}: {error}", file=sys.stderr)
    return code


# -- generate ---------------------------------------------------------------------------------------------
def _add_generate(subparsers: Any) -> None:
    from st_synth.generation.config import GenerationConfig

    subparsers.add_parser(
        "generate",
        help=COMMANDS["generate"][0],
        description="Brainstorm tasks and write one JSON example per task with an LLM; save a DatasetDict "
        "with one split per kind plus generation_report.json. Answers are cached: re-running the same "
        "command resumes where it stopped and re-pays nothing.",
        dataclass_types=(GenerationConfig, GenerateOutput),
    ).set_defaults(func=_generate)


def _generate(config: Any, target: GenerateOutput) -> int:
    from st_synth.generation.builder import SyntheticDatasetBuilder
    from st_synth.generation.cache import AnswerCache, CacheError
    from st_synth.generation.client import EndpointError
    from st_synth.generation.config import check_output_folder
    from st_synth.generation.stage import DatasetNotSaved, generate, generation_report_summary, save_dataset

    batch = bool(target.batch_export or target.batch_import)
    try:
        if (batch or target.batch) and config.local:
            raise ValueError("--batch, --batch_export and --batch_import need no local server: drop --local (for "
                             "files, run the engine on the exported file yourself).")  # fmt: skip
        if target.batch and batch:
            raise ValueError("Choose one batch route: --batch (the endpoint's Batch API) or --batch_export / "
                             "--batch_import (files for an engine you run).")  # fmt: skip
        if target.batch_poll_interval <= 0:
            raise ValueError(f"batch_poll_interval must be positive, got {target.batch_poll_interval}")
        if target.batch_max_requests < 1 or target.batch_max_bytes < 1:
            raise ValueError(f"batch_max_requests and batch_max_bytes must be positive, got "
                             f"{target.batch_max_requests} and {target.batch_max_bytes}")  # fmt: skip
        # Everything is validated before the local server starts or any request is sent.
        SyntheticDatasetBuilder(config, deferred=batch or target.batch)
        if target.batch:
            config.validate_endpoint_settings()
        output = check_output_folder(target.output)
        AnswerCache.check(config.cache_path)
    except (ValueError, RuntimeError) as error:
        return _fail("generate", error)
    builder = None
    if batch:
        try:
            builder, code = _batch_round(config, target)
        except (CacheError, ValueError) as error:
            return _fail("generate", error, 1)
        if code is not None:
            return code
    try:
        if target.batch:
            builder = _batch_api(config, target)
        if builder is None:
            builder = generate(config, output)
        else:  # finished through a batch route
            save_dataset(builder, output)
    except (CacheError, ValueError, DatasetNotSaved) as error:
        return _fail("generate", error, 1)
    except EndpointError as error:
        return _fail("generate", error, 1, "endpoint error")
    except RuntimeError as error:  # BatchAPIError, openai.APIError
        return _fail("generate", error, 1, "batch error" if target.batch else "error")
    except KeyboardInterrupt as stop:
        if target.batch:
            print("st-synth generate: interrupted. The batches already submitted keep running at the endpoint "
                  f"and are recorded in the cache {config.cache_path}: run the same command again to collect "
                  "them (nothing is submitted or paid twice).", file=sys.stderr)  # fmt: skip
            return 130
        stored = getattr(stop, "answers_stored", 0)
        print(f"st-synth generate: interrupted. {stored} answers from this run are safe in the cache "
              f"{config.cache_path}; run the same command again to resume from them.", file=sys.stderr)  # fmt: skip
        return 130
    report = builder.report or {}
    print(generation_report_summary(report))
    print(f"saved to {output}")
    if target.push_to_hub:
        from st_synth.cards.hub import push_dataset

        url = push_dataset(builder.dataset, report, target.push_to_hub, metadata=builder.metadata,
                           private=target.private or None)  # fmt: skip
        print(f"pushed to {url}")
    return 0 if report.get("complete") else 3


def _batch_api(config: Any, target: GenerateOutput) -> Any:
    """``--batch``: rounds of Batch API batches until the plan is settled; the report says what they cost."""
    import openai

    from st_synth.generation.batch import BatchAPIRun
    from st_synth.generation.cache import AnswerCache

    cache = AnswerCache(config.cache_path)
    try:
        run = BatchAPIRun(config, cache, poll_interval=target.batch_poll_interval,
                          max_requests=target.batch_max_requests, max_bytes=target.batch_max_bytes)  # fmt: skip
        try:
            builder = run.run()
        except openai.APIError as error:
            raise RuntimeError(f"the Batch API answered {error.__class__.__name__}: {error}") from None
        account = run.describe()
        builder.report["batch"].update(account)
        if config.priced:
            builder.report["cost_usd"] = account["imported_cost_usd"]
        return builder
    finally:
        cache.close()


def _batch_round(config: Any, target: GenerateOutput) -> tuple[Any, int | None]:
    """Import results (if given), replay the plan from the cache, export what it still needs. Returns the
    finished builder and None when nothing is pending (the caller saves the dataset), else an exit code."""
    from st_synth.generation.batch import export_requests, import_results
    from st_synth.generation.builder import SyntheticDatasetBuilder
    from st_synth.generation.cache import AnswerCache
    from st_synth.generation.client import starting_mode

    cache = AnswerCache(config.cache_path)
    counts = None
    try:
        if target.batch_import:
            counts = import_results(cache, target.batch_import,
                                    starting_mode(config.response_format, cache, config.model))  # fmt: skip
            print(f"imported {target.batch_import}: {counts['answered']} answers, {counts['refused']} refused "
                  f"(dropped), {counts['to_retry']} failed transiently (exported again), {counts['already']} "
                  "already in the cache")  # fmt: skip
        builder = SyntheticDatasetBuilder(config, deferred=True)
        builder.build()
        if not builder.pending:
            if counts is not None:
                builder.report["batch"].update(route="files", imported_this_run=counts)
                if config.priced:
                    builder.report["cost_usd"] = config.cost(counts["prompt_tokens"], counts["completion_tokens"],
                                                             batch=True)  # fmt: skip
            return builder, None
        waiting = builder.report["batch"]["waiting_examples"]
        if not target.batch_export:
            print(f"st-synth generate: {waiting} examples still wait for {len(builder.pending)} requests: add "
                  "--batch_export FILE to write them.", file=sys.stderr)  # fmt: skip
            return builder, 4
        round_number = export_requests(cache, builder.pending, target.batch_export)
    finally:
        cache.close()
    print(f"round {round_number}: {len(builder.pending)} requests for {waiting} examples written to "
          f"{target.batch_export} ({builder.report['num_examples_kept']}/{builder.report['num_examples_requested']} "
          "kept so far). Answer them with a batch engine (e.g. python -m vllm.entrypoints.openai.run_batch -i "
          f"{target.batch_export} -o results.jsonl), then run this command again with --batch_import results.jsonl "
          "(and --batch_export for the next round).")  # fmt: skip
    return builder, 4


# -- filter -----------------------------------------------------------------------------------------------
def _add_filter(subparsers: Any) -> None:
    from st_synth.data.filtering import ConsistencyFilter

    subparsers.add_parser(
        "filter",
        help=COMMANDS["filter"][0],
        dataclass_types=(ConsistencyFilter, FilterFolders),
    ).set_defaults(func=_filter)


def _filter(settings: Any, folders: FilterFolders) -> int:
    from st_synth.data.filtering import filter_folder

    try:
        report = filter_folder(folders.input, folders.output, settings)
    except (ValueError, FileNotFoundError) as error:
        return _fail("filter", error)
    print(f"kept {report['kept']} of {report['rows']} -> {folders.output}")
    return 0


# -- mine -------------------------------------------------------------------------------------------------
@dataclass
class MineFolders:
    input: str = field(metadata={"help": "A `st-synth generate` folder, or any `datasets` folder or Hub id with "
                                 "query and positive columns (your own pairs)."})  # fmt: skip
    output: str = field(metadata={"help": "Where the data with mined negatives (and mining_report.json) go."})


def _add_mine(subparsers: Any) -> None:
    from st_synth.data.corpus import CorpusArguments
    from st_synth.data.mining import MiningArguments

    subparsers.add_parser(
        "mine",
        help=COMMANDS["mine"][0],
        dataclass_types=(MiningArguments, CorpusArguments, MineFolders),
    ).set_defaults(func=_mine)


def _mine(settings: Any, corpus: Any, folders: MineFolders) -> int:
    from st_synth.data.mining import mine_folder

    try:
        report = mine_folder(folders.input, folders.output, settings, corpus)
    except (ValueError, FileNotFoundError) as error:
        return _fail("mine", error)
    kept = ", ".join(f"{name} {entry['kept']}/{entry['rows']}" for name, entry in report["splits"].items())
    print(f"negatives from {report['corpus']} ({report['passages']} passages): {kept or 'nothing to mine'} "
          f"-> {folders.output}")  # fmt: skip
    return 0


# -- train (main() hands its arguments to the recipe's own parser: it takes a YAML file first) -----------
def _train_command(argv: list[str]) -> int:
    from st_synth.common.arguments import SettingsError
    from st_synth.training.trainer import run_recipe

    try:
        run_recipe(argv)
    except (ValueError, SettingsError) as error:
        return _fail("train", error)
    return 0


# -- evaluate ---------------------------------------------------------------------------------------------
def _add_evaluate(subparsers: Any) -> None:
    from st_synth.evaluation.evaluate import EvaluationArguments

    subparsers.add_parser(
        "evaluate",
        help=COMMANDS["evaluate"][0],
        description="Each task with its instruction, by the paper authors' protocol for e5-style models (retrieval "
        "instructs queries only, other task types every text; classification unnormalised) or st-synth's (--protocol).",
        dataclass_types=(EvaluationArguments, EvaluateTarget),
    ).set_defaults(func=_evaluate)


def _evaluate(settings: Any, target: EvaluateTarget) -> int:
    import json
    from pathlib import Path

    from st_synth.common.names import CARD_DATA_FILE
    from st_synth.evaluation.evaluate import score_table
    from st_synth.evaluation.stage import evaluate_models

    facts_file = Path(target.model) / CARD_DATA_FILE
    facts = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
    try:
        result = evaluate_models(settings, target.model, base_model=facts.get("base_model"),
                                 instruction_template=facts.get("instruction_template"))  # fmt: skip
    except ValueError as error:
        return _fail("evaluate", error)
    payload, scores = result.trained, result.scores["trained"]
    comparison = {name: column for name, column in result.scores.items() if name != "trained"}
    if target.output:
        Path(target.output).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if comparison:
        print(score_table({"trained": scores, **comparison}))
    else:
        for task, score in scores.items():
            print(f"{task}: {score:.4f}")
    print(
        f"mean: {payload['summary']['mean']:.4f} ({payload['summary']['wall_time_s']:.1f} s) -> {target.output}"
    )
    if target.update_card:
        from st_synth.cards.render import render_model_card

        try:
            readme = render_model_card(target.model, evaluation=scores, comparison=comparison or None,
                                       variants=settings.variants() or None)  # fmt: skip
        except FileNotFoundError as error:
            return _fail("evaluate", error)
        print(f"updated {readme}")
    return 0


# -- run --------------------------------------------------------------------------------------------------
def _add_run(subparsers: Any) -> None:
    subparsers.add_parser(
        "run",
        help=COMMANDS["run"][0],
        description="Each stage reuses what is still valid from an earlier run under the same output folder. "
        "The YAML sections take the flags of `st-synth generate`, `filter`, `mine`, `train` and `evaluate` as keys.",
        dataclass_types=(RunCommand,),
    ).set_defaults(func=_run)


def _run(args: RunCommand) -> int:
    from st_synth import pipeline

    if (args.config is None) == (args.config_file is None):
        return _fail("run", ValueError("give the run config once: --config FILE.yaml (or FILE.yaml alone)."))
    try:
        config = pipeline.load_config(args.config or args.config_file, pipeline.parse_overrides(args.set))
        for key in pipeline.RUN_KEYS:
            if getattr(args, key) not in (None, False):  # given on the command line
                config[key] = getattr(args, key)
        plan = pipeline.plan_run(config)
    except (ValueError, TypeError, RuntimeError) as error:
        return _fail("run", error)
    try:
        pipeline.run(plan)
    except (ValueError, RuntimeError) as error:
        return _fail("run", error, 1)
    return 0


# -- export -----------------------------------------------------------------------------------------------
def _add_export(subparsers: Any) -> None:
    from st_synth.model.export import ExportArguments

    subparsers.add_parser(
        "export",
        help=COMMANDS["export"][0],
        description="The folder loads with SentenceTransformer(folder, trust_remote_code=True) wherever "
        "onnxruntime is installed; prompts, EOS handling and last-token pooling are the model's own.",
        dataclass_types=(ExportArguments,),
    ).set_defaults(func=_export)


def _export(settings: Any) -> int:
    from st_synth.model.export import export_onnx

    try:
        report = export_onnx(settings.model, settings.output, quantize=settings.quantize, opset=settings.opset,
                             verify=settings.verify)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        return _fail("export", error)
    except RuntimeError as error:
        return _fail("export", error, code=1)
    for name, graph in report["graphs"].items():
        checked = graph.get("agreement")
        agreement = f", min cosine with torch {checked['min_cosine']:.4f}" if checked else ""
        print(f"{name}: {graph['file']} ({graph['bytes'] / 2**20:,.1f} MiB{agreement})")
    print(f"-> {settings.output} (default graph {report['default_graph']})")
    return 0


# -- push -------------------------------------------------------------------------------------------------
def _add_push(subparsers: Any) -> None:
    subparsers.add_parser(
        "push",
        help=COMMANDS["push"][0],
        description="The token comes from huggingface_hub's own lookup (HF_TOKEN or `hf auth login`).",
        dataclass_types=(PushTarget,),
    ).set_defaults(func=_push)


def _push(args: PushTarget) -> int:
    from st_synth.cards.hub import push_model

    try:
        url = push_model(args.folder, args.repo, private=args.private or None)
    except FileNotFoundError as error:
        return _fail("push", error)
    print(f"pushed {args.folder} to {url}")
    return 0


# -- dedup ------------------------------------------------------------------------------------------------
def _add_dedup(subparsers: Any) -> None:
    subparsers.add_parser(
        "dedup",
        help=COMMANDS["dedup"][0],
        description="Walk the shards in shard_index order and drop every example that repeats an earlier one "
        "(the same texts, or a near-duplicate by the generator's MinHash rule). Nothing is asked again: "
        "dedup_report.json counts what was removed, per kind.",
        dataclass_types=(DedupShards,),
    ).set_defaults(func=_dedup)


def _dedup(args: DedupShards) -> int:
    from st_synth.data.dedup import DEDUP_REPORT, dedup_shards
    from st_synth.data.examples import InstructionFormat, save_examples
    from st_synth.generation.config import check_output_folder

    try:
        output = check_output_folder(args.output)
        dataset, report = dedup_shards(
            args.inputs, not args.no_near_duplicates, args.near_duplicate_threshold
        )
    except (ValueError, FileNotFoundError) as error:
        return _fail("dedup", error)
    save_examples(dataset, output, InstructionFormat.of(report))
    (output / DEDUP_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    removed = ", ".join(
        f"{kind} {c['duplicate']} + {c['near_duplicate']}" for kind, c in report["removed_by_kind"].items()
    )
    print(f"kept {report['num_examples_kept']}/{report['num_examples_in']} examples of {len(args.inputs)} shards; "
          f"removed (exact + near-duplicates): {removed}")  # fmt: skip
    print(f"saved to {output}")
    return 0


# name -> (one-line help, adds the full subparser): the one place each command's help is written. A command's parser (and its imports: mteb for evaluate)
# is built only when that command runs, so `st-synth generate` starts fast. `train` has none here: main()
# passes its arguments to the recipe's parser (st_synth.training.trainer.make_train_parser).
COMMANDS: dict[str, tuple[str, Any]] = {
    "generate": ("Generate a synthetic embedding dataset through an OpenAI-compatible endpoint.", _add_generate),
    "dedup": ("Join the shards of a generation into one dataset without repeats across shards.", _add_dedup),
    "filter": ("Keep the generated examples a guide encoder agrees with (the run's filter stage).", _add_filter),
    "mine": ("Give (query, positive) pairs a hard negative mined from a corpus (the run's mine stage).", _add_mine),
    "train": ("Train with the recipe: LoRA, InfoNCE (as recipes/train_mistral.py).", None),
    "evaluate": ("Evaluate a model on mteb tasks, each with its instruction.", _add_evaluate),
    "run": ("The whole path from one YAML file: generate, filter, mine, train, evaluate, card (and push).", _add_run),
    "export": ("Export a model to ONNX Runtime (optionally int8 weights), checked against the original.", _add_export),
    "push": ("Upload a trained model folder (weights, configs, prompts, card) to the Hugging Face Hub.", _add_push),
}  # fmt: skip


EXIT_CODES = """exit status:
  0    done
  1    a fault of the machine or the endpoint (named in the message); what was done is kept: run it again
  2    a bad setting, path or input, refused before any request is paid for
  3    generation incomplete: some examples used up their attempts (the rest is saved)
  4    generation waits for a batch (--batch / --batch_export): run the same command again later
  130  interrupted (Ctrl-C); answers and finished stages are kept: run the same command again"""


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """The ``st-synth`` parser, with the full parser of ``command`` (the others by name and help only)."""
    from st_synth import __version__

    parser = argparse.ArgumentParser(prog="st-synth", description=__doc__.splitlines()[0], epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"st-synth {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="Log at INFO level (also after the command)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=SettingsParser)
    for name, (summary, add) in COMMANDS.items():
        if name == command and add is not None:
            add(subparsers)
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser, subparsers.choices


VERBOSE_FLAGS = ("-v", "--verbose")


def main(argv: list[str] | None = None) -> int:
    """The ``st-synth`` command: ``main(argv)`` runs one subcommand and returns its exit status (see
    ``st-synth --help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # -v / --verbose is st-synth's own, before or after the command (no stage has a flag of that name).
    verbose = any(arg in VERBOSE_FLAGS for arg in argv)
    argv = [arg for arg in argv if arg not in VERBOSE_FLAGS]
    command_at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    command = argv[command_at] if command_at is not None else None
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if command == "train":  # `st-synth train CONFIG.yaml [flags]`: the recipe's own parsing
            return _train_command(argv[command_at + 1 :])
        parser, commands = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        sub = commands[args.command]
        if sub.dataclass_types:
            try:
                settings = sub.namespace_to_dataclasses(args)
            except (ValueError, TypeError) as error:
                return _fail(args.command, error)
            return args.func(*settings)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"st-synth {command}: interrupted. Every answer received so far is in the answer cache and "
              "each finished stage is kept: run the same command again to resume.", file=sys.stderr)  # fmt: skip
        return 130
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(f"st-synth {command}: error: no space left on the disk ({error.filename or 'while writing'}). "
              "Answers and finished stages already written are kept: free some space and run the same command "
              "again.", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
