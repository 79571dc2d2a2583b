"""Reading a dataset the user named: a folder written by ``datasets``' ``save_to_disk``, or a Hub dataset id.

A name that is neither fails with one message that says what was looked for and why it was not found (no
such file or folder, the Hub unreachable or offline), before any request is paid for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk


def load_saved_or_hub(source: str | Path, what: str, **kwargs: Any) -> Dataset | DatasetDict:
    """``source`` as a saved dataset folder if it is a folder here, else as a Hub dataset id (``kwargs`` go to
    ``load_dataset``). ``what`` names it in errors ("Corpus", "Training data", ...).

    Raises:
        ValueError: naming ``source`` and what went wrong.
    """
    source = str(source)
    path = Path(source)
    if path.is_dir():
        try:
            return load_from_disk(source)
        except FileNotFoundError as error:
            raise ValueError(
                f"{what} {source} is a folder but not one `save_to_disk` wrote: {error}"
            ) from None
    try:
        return load_dataset(source, **kwargs)
    # No such repo, no network, offline mode, a file of no known format.
    except (OSError, ValueError) as error:
        where = "is a file of no format it can read" if path.is_file() else "is no file or folder here"
        raise ValueError(
            f"{what} {source!r} {where}, and loading it as a Hub dataset failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}). Check the path, or the Hub id and "
            "your network (HF_HUB_OFFLINE)."
        ) from None
