"""Generate long videos with CogVideoX, download its models, and post-train long-video LoRAs.

    diffsynth-cog download CogVideoX-5B ExVideo-CogVideoX-LoRA-129f-v1
    diffsynth-cog generate --prompt "an astronaut riding a horse on Mars." --num-frames 129 --output video.mp4
    torchrun --nproc_per_node 2 -m diffsynth_cog.cli generate --prompt "..."    (one video on 2 GPUs)
    torchrun --nproc_per_node 8 -m diffsynth_cog.cli generate --prompts prompts.txt --output-dir videos
    diffsynth-cog prepare / train / export-lora    (long-video post-training, see train/README.md)

Defaults aim at the ExVideo use case: CogVideoX-5B with ExVideo-CogVideoX-LoRA-129f-v1, 129 frames at
480x720, cfg 7.0, fps 8. Missing models are downloaded from ModelScope into ``--models-dir`` first.

Building the parser imports no torch, transformers, gradio or Lightning (each ``add_*_command`` keeps them inside
its command functions), so ``--help`` and ``--version`` answer at once; ``tests/test_cli_start.py`` checks it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from diffsynth_cog.cli.console import setup_logging

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "main"]
# Optional packages -> the extra that installs them (setup.py extras_require).
EXTRAS = {
    "lightning": "train",
    "deepspeed": "train",
    "gradio": "webui",
    "cv2": "evaluate",
    "skimage": "evaluate",
    "matplotlib": "evaluate",
}


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already tells it or there is none (a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not action.option_strings or no_default or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The parser of the command and of each subcommand (they inherit its class): defaults in every help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_download(sub: argparse._SubParsersAction) -> None:
    from diffsynth_cog.hub.presets import preset_names

    p = sub.add_parser(
        "download",
        help="download model presets from ModelScope",
        description="Download presets into --models-dir (DiffSynth-Studio's layout). Presets (any case; the family "
        f"names the logs print, such as cogvideox-5b, work too): {', '.join(preset_names())}",
    )
    p.add_argument("names", nargs="+", help="preset names")
    p.add_argument("--models-dir", default="models", help="where downloaded models live")
    p.add_argument(
        "--endpoint", default=None, help="ModelScope endpoint (default: $MODELSCOPE_ENDPOINT or the public one)"
    )
    p.add_argument("--verify", action="store_true", help="re-check every local file against the repository")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)


def _add_upload(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upload-lora",
        help="upload a trained LoRA file (or folder) to a ModelScope model repository",
        description="Creates the repository if needed (private by default) and uploads the LoRA. The token comes "
        "from --token or the MODELSCOPE_API_TOKEN environment variable.",
    )
    p.add_argument("path", help="the exported LoRA .safetensors file, or a folder")
    p.add_argument("--repo-id", required=True, help="owner/name on ModelScope")
    p.add_argument("--token", default=None, help="ModelScope access token (default: $MODELSCOPE_API_TOKEN)")
    p.add_argument(
        "--endpoint", default=None, help="ModelScope endpoint (default: $MODELSCOPE_ENDPOINT or the public one)"
    )
    p.add_argument("--visibility", choices=["private", "public"], default="private", help="of a new repository")
    p.set_defaults(func=cmd_upload)


def cmd_upload(args: argparse.Namespace) -> int:
    from diffsynth_cog.hub.uploads import upload_lora

    token = args.token or os.environ.get("MODELSCOPE_API_TOKEN")
    url = upload_lora(args.path, args.repo_id, token=token, endpoint=args.endpoint, visibility=args.visibility)
    logger.info("uploaded %s -> %s", args.path, url)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from diffsynth_cog.hub.downloads import MANIFEST_FOLDER, download_models
    from diffsynth_cog.hub.presets import get_preset
    from diffsynth_cog.io.atomic import check_output_path

    for name in args.names:  # a typo fails before any download
        get_preset(name)
    check_output_path(Path(args.models_dir) / MANIFEST_FOLDER / "check.json", what="--models-dir")
    paths = download_models(
        args.names,
        models_dir=args.models_dir,
        endpoint=args.endpoint,
        progress=not args.no_progress,
        verify=args.verify,
    )
    for name, path in zip(args.names, paths, strict=True):
        logger.info("%s -> %s", name, path)
    return 0


DESCRIPTION = (
    "Generate long videos with CogVideoX (and ExVideo's long-video LoRA), download its models from ModelScope, "
    "and post-train and export long-video LoRAs. Run 'diffsynth-cog COMMAND --help' for a command's options."
)


def build_parser() -> argparse.ArgumentParser:
    from diffsynth_cog import __version__

    parser = Parser(prog="diffsynth-cog", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages, and tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from diffsynth_cog.cli.generate import add_generate_command

    add_generate_command(sub)
    _add_download(sub)
    _add_upload(sub)
    from diffsynth_cog.cli.evaluate import add_evaluate_command
    from diffsynth_cog.cli.info import add_info_command
    from diffsynth_cog.cli.webui import add_webui_command

    add_info_command(sub)
    add_webui_command(sub)
    add_evaluate_command(sub)
    try:
        from diffsynth_cog.cli.training import add_training_commands
    except ImportError:  # training extras (lightning) not installed
        add_training_commands = None
    if add_training_commands is not None:
        add_training_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. Output cut short by the reader (``diffsynth-cog info | head``) ends
    quietly with 141, the status of a shell command stopped by SIGPIPE."""
    try:
        return _run(argv)
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a pipe of ours (ffmpeg's, a worker's) broke: a real error
        # Later writes, and the interpreter's final flush, go nowhere instead of raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # SIGPIPE


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), or stdout is not a file
        return False


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logger.error("interrupted; no file was left half-written (each is replaced only once complete)")
        return 130
    except Exception as e:
        if isinstance(e, BrokenPipeError) and _stdout_closed():
            raise  # the reader of our output has gone: main() ends quietly
        message = error_message(e, args.command)
        if message is None or args.verbose:
            raise
        logger.error("%s", message)
        return 2


def error_message(error: BaseException, command: str) -> str | None:
    """The one-line message of an error a user can act on; None for a bug (its traceback is printed)."""
    from diffsynth_cog.errors import DiffSynthCogError

    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in EXTRAS:
        extra = EXTRAS[(error.name or "").split(".")[0]]
        return (
            f"diffsynth-cog {command} needs the {extra!r} extras, which are not installed (no module "
            f"{error.name!r}): pip install 'diffsynth-cog[{extra}]' (or pip install -e '.[{extra}]' in a checkout)"
        )
    if isinstance(error, (DiffSynthCogError, ValueError, FileNotFoundError)):
        return str(error)
    if isinstance(error, OSError):  # a folder in the way, permissions, a full disk outside the atomic writer
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{where}"
    if isinstance(error, RuntimeError) and "out of memory" in str(error):
        return (
            f"out of GPU memory ({str(error).splitlines()[0][:200]}). Try --offload model (or sequential), "
            "--quantize int8, fewer --num-frames or a smaller size"
        )
    return None


if __name__ == "__main__":
    sys.exit(main())
