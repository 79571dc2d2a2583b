"""The images of the dataset and model cards, drawn with matplotlib (the ``plots`` extra).

Each function writes PNG files under ``<folder>/images/`` and returns ``[{"title", "path"}]`` with paths
relative to the folder, for the card to link (on the Hub, relative links resolve inside the repository,
and the images are uploaded with the card). Without matplotlib the cards are text only and say so once.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IMAGES = "images"
# Text columns whose lengths are not worth a panel (labels and bookkeeping).
NOT_TEXT = {"language", "template", "kind", "source", "passage_id", "label", "labels", "task"}
_warned = False


def _pyplot() -> Any | None:
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            logger.warning("Cards are written without images: pip install 'st-synth[plots]' for them.")
            _warned = True
        return None
    return plt


def _save(plt: Any, fig: Any, folder: Path, name: str, title: str) -> dict[str, str]:
    (folder / IMAGES).mkdir(parents=True, exist_ok=True)
    path = f"{IMAGES}/{name}.png"
    fig.tight_layout()
    # No timestamp or software version in the file: the same data gives the same bytes.
    fig.savefig(folder / path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return {"title": title, "path": path}


def _bars(
    plt: Any, labels: list[str], values: list[float], xlabel: str, title: str, width: float = 6.0
) -> Any:
    fig, ax = plt.subplots(figsize=(width, 0.35 * len(labels) + 1.2))
    ax.barh(labels[::-1], values[::-1], color="#4C72B0")
    for y, value in enumerate(values[::-1]):
        ax.text(value, y, f" {value:,.0f}" if float(value).is_integer() else f" {value:.3f}", va="center",
                fontsize=8)  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.margins(x=0.15)
    return fig


def dataset_images(folder: str | Path, dataset: Any, report: dict[str, Any]) -> list[dict[str, str]]:
    """Examples per kind, per language (top 20), text lengths per column, drop reasons."""
    plt = _pyplot()
    if plt is None:
        return []
    folder, images = Path(folder), []
    splits = dict(dataset.items())
    if splits:
        fig = _bars(plt, list(splits), [split.num_rows for split in splits.values()], "examples",
                    "Examples per kind (split)")  # fmt: skip
        images.append(_save(plt, fig, folder, "kinds", "Examples per kind"))
    languages = Counter(report.get("kept_by_language") or {})
    if languages:
        top = languages.most_common(20)
        rest = sum(languages.values()) - sum(count for _, count in top)
        labels, values = [name for name, _ in top], [count for _, count in top]
        if rest:
            labels, values = [*labels, "others"], [*values, rest]
        fig = _bars(plt, labels, values, "examples", f"Examples per language ({len(languages)} languages)")
        images.append(_save(plt, fig, folder, "languages", "Examples per language"))
    lengths: dict[str, list[int]] = {}
    for split in splits.values():
        for column, feature in split.features.items():
            if column in NOT_TEXT or getattr(feature, "dtype", None) != "string":
                continue
            lengths.setdefault(column, []).extend(len(text) for text in split[column] if text)
    if lengths:
        fig, axes = plt.subplots(1, len(lengths), figsize=(3.2 * len(lengths), 2.8), squeeze=False)
        for ax, (column, values) in zip(axes[0], lengths.items(), strict=True):
            ax.hist(values, bins=30, color="#55A868")
            ax.set_title(f"{column} (median {sorted(values)[len(values) // 2]:,})", fontsize=9)
            ax.set_xlabel("characters")
        axes[0][0].set_ylabel("texts")
        images.append(_save(plt, fig, folder, "lengths", "Text length per column (all kinds)"))
    drops = report.get("drops") or {}
    if drops:
        ordered = sorted(drops.items(), key=lambda item: -item[1])
        fig = _bars(plt, [name for name, _ in ordered], [count for _, count in ordered], "answers",
                    f"Dropped answers by reason ({sum(drops.values()):,})")  # fmt: skip
        images.append(_save(plt, fig, folder, "drops", "Dropped answers by reason"))
    return images


def model_images(folder: str | Path, facts: dict[str, Any]) -> list[dict[str, str]]:
    """Training loss, scores before/after (the trained model and the compared ones), and score against
    bytes per vector for each evaluated cut size and precision."""
    plt = _pyplot()
    if plt is None:
        return []
    folder, images = Path(folder), []
    curve = facts.get("loss_curve") or []
    if len(curve) > 1:  # a run shorter than logging_steps logs no step losses, only their mean
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([step for step, _ in curve], [loss for _, loss in curve], marker="o" if len(curve) < 30 else None,
                color="#C44E52")  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_title("Training loss")
        ax.grid(alpha=0.3)
        images.append(_save(plt, fig, folder, "loss", "Training loss"))
    evaluation = facts.get("evaluation") or {}
    storage = facts.get("storage") or []
    variants = {row["name"] for row in storage}
    models = {"this model": evaluation, **{name: scores for name, scores in (facts.get("comparison") or {}).items()
                                            if name not in variants}}  # fmt: skip
    if evaluation:
        tasks = list(evaluation)
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) + 2), 3.4))
        width = 0.8 / len(models)
        for index, (name, scores) in enumerate(models.items()):
            xs = [task_index + index * width for task_index in range(len(tasks))]
            ax.bar(xs, [scores.get(task, 0.0) for task in tasks], width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, fontsize=8)
        ax.set_ylabel("main score")
        ax.set_title("Evaluation: this model and the compared ones")
        ax.legend(fontsize=8)
        images.append(_save(plt, fig, folder, "scores", "Scores before and after training"))
    if len(storage) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot([row["bytes_per_vector"] for row in storage], [row["mean"] for row in storage], "o",
                color="#8172B2")  # fmt: skip
        for row in storage:
            ax.annotate(row["name"], (row["bytes_per_vector"], row["mean"]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per vector")
        ax.set_ylabel("mean main score")
        ax.set_title("Score against storage (cut sizes and precisions)")
        ax.grid(alpha=0.3)
        images.append(_save(plt, fig, folder, "storage", "Score against bytes per vector"))
    return images
