"""The generate stage: a configured builder on its endpoint (:func:`served_builder`), and the summary
of its report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from st_synth.data.corpus import Corpus
from st_synth.generation.builder import SyntheticDatasetBuilder
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


def generation_report_summary(report: dict[str, Any]) -> str:
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
