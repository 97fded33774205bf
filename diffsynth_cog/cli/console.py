"""Console handlers of the entry points: set up once, on rank 0 only (the library only creates loggers)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence


def setup_logging(verbose: bool = False) -> None:
    """Handlers live in entry points only, and only on rank 0 of a distributed run."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # the ModelScope client's retries log a warning each; our error says what failed
        logging.getLogger("urllib3").setLevel(logging.ERROR)


def adopt_library_loggers(names: Sequence[str] = ("lightning", "lightning.pytorch", "lightning.fabric")) -> None:
    """After importing a library that gives its loggers a console handler of its own (Lightning does, at
    import), its lines go through our handler only: else each prints twice. Entry points only."""
    if not logging.getLogger().handlers:
        return
    for name in names:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if isinstance(handler, logging.StreamHandler):
                library.removeHandler(handler)
        library.propagate = True
