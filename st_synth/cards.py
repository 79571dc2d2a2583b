"""Dataset and model cards, rendered from the Jinja templates in ``model_card_templates/``."""

from __future__ import annotations

from importlib import resources
from typing import Any

import jinja2
from datasets import DatasetDict

from st_synth.languages import ISO_CODES
from st_synth.taxonomy import TASK_KINDS


def _template(name: str) -> jinja2.Template:
    text = (resources.files("st_synth.model_card_templates") / name).read_text(encoding="utf-8")
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(text)


def _size_category(rows: int) -> str:
    for bound, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < bound:
            return label
    return "1M<n<10M"


def language_codes(labels: Any) -> list[str]:
    """ISO codes of every language in ``labels`` (bitext labels are ``source-target``)."""
    codes = {ISO_CODES[name] for label in labels for name in str(label).split("-") if name in ISO_CODES}
    return sorted(codes)


def render_dataset_card(dataset: DatasetDict, report: dict[str, Any], repo_id: str) -> str:
    splits = [
        {
            "name": name,
            "paper_table": TASK_KINDS[name].paper_table if name in TASK_KINDS else "user data",
            "rows": split.num_rows,
            "columns": split.column_names,
        }
        for name, split in dataset.items()
    ]
    kept_languages = report.get("kept_by_language", {})
    top = ", ".join(f"{lang} {count}" for lang, count in list(kept_languages.items())[:8])
    more = len(kept_languages) - 8
    summary = f"{len(kept_languages)} ({top}{', ...' if more > 0 else ''})"
    return _template("dataset_card.md").render(
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        splits=splits,
        report=report,
        languages=language_codes(kept_languages),
        languages_summary=summary,
        size_category=_size_category(sum(s["rows"] for s in splits)),
    )
