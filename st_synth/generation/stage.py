"""The generate stage, one function for ``st-synth generate`` and the run's generate step
(:func:`generate`): a builder on its endpoint or the local server (:func:`served_builder`), built and saved,
and the summary of its report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from st_synth.data.corpus import Corpus
from st_synth.generation.builder import SyntheticDatasetBuilder
from st_synth.generation.cache import AnswerCache
from st_synth.generation.config import GenerationConfig, serving


@contextmanager
def served_builder(
    config: GenerationConfig, corpus: Corpus | None = None
) -> Iterator[SyntheticDatasetBuilder]:
    """The builder of a run: on the local server when ``config.local`` (started here, watched through the run,
    stopped on exit; ``builder.server`` is it), else on the configured endpoint (``builder.server`` None).
    ``corpus``: ``config.corpus`` already loaded (the run loads it once for generation, filter and mining)."""
    if corpus is None and config.corpus:  # a bad corpus fails before the server starts
        corpus = Corpus.load(config)
    with serving(config) as (served, running):
        builder = SyntheticDatasetBuilder(
            served, health_check=running.check_alive if running else None,
            report_extra={"local_server": running.describe()} if running else None, corpus=corpus,
        )  # fmt: skip
        builder.server = running
        yield builder


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation; ``answers_stored``: the answers this run put in the cache (all kept there)."""

    def __init__(self, answers_stored: int) -> None:
        super().__init__(answers_stored)
        self.answers_stored = answers_stored


class DatasetNotSaved(RuntimeError):
    """The dataset was built but could not be written; every answer is in the cache, so a rerun sends no
    request."""


def generate(
    config: GenerationConfig, output: str | Path, corpus: Corpus | None = None
) -> SyntheticDatasetBuilder:
    """Build the dataset ``config`` describes and save it to ``output`` (``save_to_disk`` and the report).

    Args:
        config: the generation's settings (validated already: on creation).
        output: the folder to save to.
        corpus: ``config.corpus`` already loaded (else loaded here, before the server starts).

    Returns:
        The finished builder: ``.dataset``, ``.report`` and ``.server`` (the local server that answered, if any).

    Raises:
        GenerationInterrupted: on Ctrl-C, saying how many answers are safe in the cache.
        DatasetNotSaved: when the dataset cannot be written to ``output``.
    """
    AnswerCache.check(config.cache_path)  # a file that is no cache is refused before a server starts
    with served_builder(config, corpus=corpus) as builder:
        try:
            builder.build()
        except KeyboardInterrupt as stop:
            raise GenerationInterrupted((builder.report or {}).get("answers_stored", 0)) from stop
    save_dataset(builder, output)
    return builder


def save_dataset(builder: SyntheticDatasetBuilder, output: str | Path) -> None:
    """``builder``'s dataset and report saved to ``output``.

    Raises:
        DatasetNotSaved: naming ``output`` and the cache that holds every answer.
    """
    try:
        builder.save(output)
    except OSError as error:
        raise DatasetNotSaved(
            f"cannot save the dataset to {output} ({error.strerror or error}). Every answer is in the cache "
            f"{builder.config.cache_path}: fix that and run the same command again (it sends no request)."
        ) from error


def generation_report_summary(report: dict[str, Any]) -> str:
    """The generation report in a few lines: kept per kind, requests, cache hits, tokens, drops, cost."""
    kept = ", ".join(f"{k} {v}" for k, v in report["kept_by_kind"].items())
    lines = [
        f"kept {report['num_examples_kept']}/{report['num_examples_requested']} ({kept})",
        f"requests sent {report['requests_sent']}, cache hits {report['cache_hits']}, retries {report['retries']}",
        f"tokens this run: {report['prompt_tokens']} prompt + {report['completion_tokens']} completion",
        f"drops: {report['drops'] or 'none'}",
    ]
    if imported := report.get("batch", {}).get("imported_this_run"):
        lines.insert(3, f"from batches this run: {imported['answered']} answers, {imported['prompt_tokens']} prompt + "
                        f"{imported['completion_tokens']} completion tokens")  # fmt: skip
    if "cost_usd" in report:
        lines.append(
            f"cost this run: ${report['cost_usd']:.4f} (dataset total ${report['total_cost_usd']:.4f})"
        )
    if not report["complete"]:
        lines.append(f"INCOMPLETE: {report['stop_reason']}")
    return "\n".join(lines)
