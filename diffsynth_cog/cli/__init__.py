"""The ``diffsynth-cog`` command line: one subcommand a module (generate, info, webui, training stages).

Nothing heavy is imported here, so ``diffsynth-cog --help`` starts fast; each command imports what it runs.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The console script's entry point (``diffsynth-cog``)."""
    from diffsynth_cog.cli.main import main as run

    return run(argv)


__all__ = ["main"]
