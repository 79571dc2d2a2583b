"""The ``st-synth`` command line."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from st_synth.client import RESPONSE_FORMATS
from st_synth.local_llm import BACKENDS


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="Generate a synthetic embedding dataset through an OpenAI-compatible endpoint.",
        description="Brainstorm tasks and write one JSON example per task with an LLM; save a DatasetDict "
        "with one split per kind plus generation_report.json. Answers are cached: re-running the same "
        "command resumes where it stopped and re-pays nothing.",
    )
    p.add_argument("--output", required=True, help="Folder for the DatasetDict and generation_report.json.")
    p.add_argument("--num-examples", type=int, default=100, help="Examples to KEEP (after validation).")
    p.add_argument(
        "--kinds",
        default=None,
        help="Comma-separated kinds, optionally weighted (retrieval=3,sts=1). Default: all six, "
        "uniform. Kinds: retrieval, classification, short_short, long_long, sts, bitext.",
    )
    p.add_argument(
        "--languages",
        default="paper",
        help="'paper' (the paper's weighted mix of 93 languages) or comma-separated names.",
    )
    p.add_argument("--base-url", default=None, help="Endpoint (default: $OPENAI_BASE_URL or OpenAI).")
    p.add_argument("--model", default=None, help="Generator model name as the endpoint serves it.")
    p.add_argument(
        "--local",
        action="store_true",
        help="Start a local server (llama.cpp, else `transformers serve`) on 127.0.0.1 serving the packaged "
        "SmolLM2-135M-Instruct for this run (needs the 'local' extra); --base-url and --model then default "
        "to it.",
    )
    p.add_argument(
        "--local-backend",
        default="auto",
        choices=BACKENDS,
        help="Server behind --local: llama.cpp (fast, schema-constrained JSON) or `transformers serve` (no "
        "compile step, about 10x slower); auto takes llama.cpp where llama-cpp-python is installed.",
    )
    p.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="Environment variable holding the API key (never pass keys on the command line).",
    )
    p.add_argument("--concurrency", type=int, default=16, help="Requests in flight at once.")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--cache", default=None, help="SQLite answer cache (default: ~/.cache/st_synth/answers.sqlite)."
    )
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--response-format",
        default=None,
        choices=("auto", *RESPONSE_FORMATS),
        help="How to ask for JSON (default auto: the strictest the endpoint accepts; text for "
        "--local-backend transformers, which ignores response_format).",
    )
    p.add_argument("--max-attempts", type=int, default=5, help="Attempts per example before giving it up.")
    p.add_argument(
        "--failure-budget",
        type=int,
        default=None,
        help="Dropped answers allowed before the run stops (default: 2 x examples + 20).",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="Seconds per request (default 120; 600 for --local-backend transformers).",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="Cap on completion tokens per request (default: each kind's own budget, 384-2048; 384 for "
        "--local-backend transformers).",
    )
    p.add_argument("--max-retries", type=int, default=8, help="Retries of one request on 429/5xx/timeouts.")
    p.add_argument("--price-prompt", type=float, default=None, help="Price per million prompt tokens.")
    p.add_argument(
        "--price-completion", type=float, default=None, help="Price per million completion tokens."
    )
    p.add_argument(
        "--push-to-hub", default=None, metavar="REPO", help="Also push the dataset to this Hub repo."
    )
    p.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from st_synth.builder import (
        GenerationConfig,
        SyntheticDatasetBuilder,
        check_output_folder,
        generation_report_summary,
    )
    from st_synth.cache import AnswerCache, CacheError
    from st_synth.client import EndpointError
    from st_synth.local_llm import LocalLLMServer, backend_generation_defaults, serving

    try:
        if args.local and args.base_url:
            raise ValueError("--local starts its own endpoint; drop --base-url or --local")
        # Everything is validated before the local server starts or any request is sent.
        server = LocalLLMServer(backend=args.local_backend) if args.local else None
        given = {"request_timeout": args.request_timeout, "max_tokens": args.max_tokens,
                 "response_format": args.response_format}  # fmt: skip
        given = {key: value for key, value in given.items() if value is not None}
        # The user's settings, else the local backend's, else GenerationConfig's defaults.
        limits = {**(backend_generation_defaults(server.backend) if server else {}), **given}
        config = GenerationConfig(
            model=args.model or (server.served_model if server else None),
            num_examples=args.num_examples,
            kinds=args.kinds,
            languages=args.languages,
            seed=args.seed,
            base_url=server.base_url if server else args.base_url,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            temperature=args.temperature,
            top_p=args.top_p,
            cache=args.cache,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            max_attempts=args.max_attempts,
            failure_budget=args.failure_budget,
            max_retries=args.max_retries,
            price_prompt_per_million=args.price_prompt,
            price_completion_per_million=args.price_completion,
            show_progress=not args.no_progress,
            **limits,
        )
        builder = SyntheticDatasetBuilder(config)
        output = check_output_folder(args.output)
        AnswerCache.check(config.cache_path)
    except (ValueError, RuntimeError) as error:
        print(f"st-synth generate: error: {error}", file=sys.stderr)
        return 2
    user_given = {*given, *(["model"] if args.model else [])}
    context = serving(config, server, user_given) if server else nullcontext((config, None))
    try:
        with context as (config, running):
            if running is not None:
                builder = SyntheticDatasetBuilder(config, health_check=running.check_alive,
                                                  report_extra={"local_server": running.describe()})  # fmt: skip
            builder.build()
    except CacheError as error:
        print(f"st-synth generate: error: {error}", file=sys.stderr)
        return 1
    except EndpointError as error:
        print(f"st-synth generate: endpoint error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stored = (builder.report or {}).get("answers_stored", 0)
        print(f"st-synth generate: interrupted. {stored} answers from this run are safe in the cache "
              f"{config.cache_path}; run the same command again to resume from them.", file=sys.stderr)  # fmt: skip
        return 130
    try:
        builder.save(output)
    except OSError as error:
        print(f"st-synth generate: error: cannot save the dataset to {output} ({error.strerror or error}). "
              f"Every answer is in the cache {config.cache_path}: fix that and run the same command again "
              "(it sends no request).", file=sys.stderr)  # fmt: skip
        return 1
    report = builder.report or {}
    print(generation_report_summary(report))
    print(f"saved to {output}")
    if args.push_to_hub:
        from st_synth.hub import push_dataset

        url = push_dataset(builder.dataset, report, args.push_to_hub, private=args.private or None)
        print(f"pushed to {url}")
    return 0 if report.get("complete") else 3


def _add_push(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="Upload a trained model folder (weights, configs, prompts, card) to the Hugging Face Hub.",
        description="The token comes from huggingface_hub's own lookup (HF_TOKEN or `hf auth login`).",
    )
    p.add_argument("folder", help="A saved SentenceTransformer folder, e.g. outputs/e5-model/final.")
    p.add_argument("--repo", required=True, help="Hub repository id, e.g. you/e5-smollm2.")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=_push)


def _push(args: argparse.Namespace) -> int:
    from st_synth.hub import push_model

    try:
        url = push_model(args.folder, args.repo, private=args.private or None)
    except FileNotFoundError as error:
        print(f"st-synth push: error: {error}", file=sys.stderr)
        return 2
    print(f"pushed {args.folder} to {url}")
    return 0


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="Evaluate a model on mteb tasks, each with its instruction.",
        description="Retrieval and reranking instruct queries only; other task types instruct every text.",
    )
    p.add_argument("--model", required=True, help="A SentenceTransformer folder or Hub id.")
    p.add_argument("--tasks", default="", help="Comma-separated mteb task names.")
    p.add_argument(
        "--benchmark",
        default=None,
        help="An mteb benchmark name (e.g. 'MTEB(eng, v2)'), or 'st-synth-offline' for the shipped tasks.",
    )
    p.add_argument("--output", default="results.json", help="mteb results plus a summary (main score, mean).")
    p.add_argument(
        "--instruction",
        action="append",
        default=[],
        metavar="TASK=TEXT",
        help="Override a task's instruction (repeatable).",
    )
    p.add_argument("--no-instructions", action="store_true", help="Encode without any instruction.")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--update-card",
        action="store_true",
        help="Write the scores into the model folder's card (a folder trained by the recipe).",
    )
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from st_synth import evaluation

    try:
        overrides = dict(item.split("=", 1) for item in args.instruction)
    except ValueError:
        print("st-synth evaluate: error: --instruction takes TASK=TEXT", file=sys.stderr)
        return 2
    try:
        names = [name.strip() for name in args.tasks.split(",") if name.strip()]
        if not names and not args.benchmark:
            raise ValueError("give --tasks NAME[,NAME...] or --benchmark NAME")
        tasks = evaluation.resolve_benchmark(args.benchmark) if args.benchmark else []
        chosen = {task.metadata.name for task in tasks}
        tasks += [task for task in evaluation.resolve_tasks(names) if task.metadata.name not in chosen]
        payload = evaluation.evaluate(args.model, tasks, overrides=overrides, output=args.output,
                                      use_instructions=not args.no_instructions, batch_size=args.batch_size)  # fmt: skip
    except ValueError as error:
        print(f"st-synth evaluate: error: {error}", file=sys.stderr)
        return 2
    for task, score in payload["summary"]["main_score"].items():
        print(f"{task}: {score:.4f}")
    print(
        f"mean: {payload['summary']['mean']:.4f} ({payload['summary']['wall_time_s']:.1f} s) -> {args.output}"
    )
    if args.update_card:
        from st_synth.cards import render_model_card

        try:
            readme = render_model_card(args.model, evaluation=payload["summary"]["main_score"])
        except FileNotFoundError as error:
            print(f"st-synth evaluate: error: {error}", file=sys.stderr)
            return 2
        print(f"updated {readme}")
    return 0


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="The whole path from one YAML file: generate, filter, train, evaluate, model card (and push).",
        description="Each stage reuses what is still valid from an earlier run under the same output folder.",
    )
    p.add_argument("--config", required=True, help="Run config, e.g. recipes/configs/local-smollm2.yaml.")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="Override one setting (VALUE is read as YAML), e.g. --set generate.num_examples=50 (repeatable).",
    )
    p.add_argument("--output", default=None, help="Output folder (overrides the config's `output`).")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="Push the trained model to this repo.")
    p.set_defaults(func=_run)


def _parse_sets(items: list[str]) -> dict[str, dict]:
    import yaml

    overrides: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise ValueError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    return overrides


def _run(args: argparse.Namespace) -> int:
    from st_synth import pipeline

    try:
        config = pipeline.load_config(args.config, _parse_sets(args.set))
        if args.output:
            config["output"] = args.output
        if args.push_to_hub:
            config["push_to_hub"] = args.push_to_hub
        plan = pipeline.plan_run(config)
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"st-synth run: error: {error}", file=sys.stderr)
        return 2
    try:
        pipeline.run(plan)
    except (ValueError, RuntimeError) as error:
        print(f"st-synth run: error: {error}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-synth", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_push(subparsers)
    _add_evaluate(subparsers)
    _add_run(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"st-synth {args.command}: interrupted. Every answer received so far is in the answer cache and "
              "each finished stage is kept: run the same command again to resume.", file=sys.stderr)  # fmt: skip
        return 130
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(f"st-synth {args.command}: error: no space left on the disk ({error.filename or 'while writing'}). "
              "Answers and finished stages already written are kept: free some space and run the same command "
              "again.", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
