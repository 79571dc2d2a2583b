"""The package stage: a trained model's card rendered once (README.md and its images, from the facts training
saved beside the weights and whatever was measured since) and the model pushed once."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from st_synth.cards.hub import push_model
from st_synth.cards.render import render_model_card


def package_model(
    folder: str | Path,
    *,
    also: Iterable[str | Path] = (),
    repo_id: str | None = None,
    private: bool | None = None,
    **card: Any,
) -> dict[str, Any]:
    """Render the card of the saved model ``folder`` and push it when ``repo_id`` is given.

    Args:
        folder: a model folder trained by the recipe (it holds the card facts).
        also: other folders of the same training whose card is rendered too (the LoRA adapter).
        repo_id: the Hub model repo to push ``folder`` to, in one commit, card included.
        private: create the repo private.
        card: what :func:`~st_synth.cards.render.render_model_card` adds to the card (``evaluation``,
            ``comparison``, ``consistency_filter``, ``mining``, ``variants``).

    Returns:
        ``{"card": README path, "pushed": commit URL or None}``.

    Example::

        from st_synth.cards.package import package_model

        package_model("outputs/e5-model/final", also=["outputs/e5-model/adapter"], repo_id="you/e5-smollm2")
    """
    readme = render_model_card(folder, **card)
    for other in also:
        if Path(other) != Path(folder):
            render_model_card(other)
    pushed = push_model(folder, repo_id, private=private) if repo_id else None
    return {"card": str(readme), "pushed": pushed}
