"""``diffsynth-cog webui``: its options and the start (every check before serving; a busy port says ``--port``).
Imported when the command line starts: nothing heavy at the top."""

from __future__ import annotations

import argparse
import errno
import logging
import socket
from pathlib import Path

logger = logging.getLogger(__name__)


def check_port(host: str, port: int) -> None:
    """Raises OSError with our advice when ``host:port`` cannot be served on (another server has it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise OSError(
                    error.errno,
                    f"port {port} on {host} is in use (another web UI?): pass --port with a free one, e.g. "
                    f"--port {port + 1}, or stop the other server",
                ) from None
            raise OSError(error.errno, f"cannot serve on {host}:{port}: {error.strerror} (see --host)") from None


def cmd_webui(args: argparse.Namespace) -> int:
    from diffsynth_cog.cli import webui
    from diffsynth_cog.cli.checks import choose_model, resolve_device
    from diffsynth_cog.cli.webui.models import ModelPipelines, local_loras, model_choices, working_backends
    from diffsynth_cog.cli.webui.page import gradio
    from diffsynth_cog.configs import check_size
    from diffsynth_cog.io.atomic import check_output_path

    # Before serving: a typo in --model or --device, an output folder that cannot be written, a busy port fail now.
    choose_model(args.model)
    if args.height is not None or args.width is not None:
        check_size(args.height or 480, args.width or 720)
    args.device = resolve_device(args.device)
    check_output_path(Path(args.output_dir) / "video.mp4", what="--output-dir")
    check_port(args.host, args.port)
    gradio()  # the webui extra: an install hint instead of a traceback

    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    options = webui.UIOptions(
        output_dir=Path(args.output_dir),
        defaults={"model": args.model, **size},
        choices={"lora": tuple(local_loras(args.models_dir)), "attention": working_backends()},
        families=model_choices(args.models_dir, args.model),
        queue_size=args.queue_size,
    )
    demo = webui.build_ui(ModelPipelines(args), options)
    logger.info("serving the web UI on http://%s:%d (Ctrl+C stops it)", args.host, args.port)
    webui.launch(demo, options, host=args.host, port=args.port, block=True)
    return 0


def add_webui_command(sub: argparse._SubParsersAction) -> None:
    from diffsynth_cog.cli.checks import DEFAULT_MODEL, DTYPES

    p = sub.add_parser(
        "webui",
        help="serve a web page for generating videos (Gradio)",
        description="A Gradio page with every generation option of 'generate' (model, prompt, size and frames, "
        "sampling, long video: windows, masks, RIFLEx, step skipping, continuation; image and video inputs, "
        "memory and speed, LoRA), a job list with Stop, and a gallery of the output folder. Jobs run one at a "
        "time and survive a reload; models are downloaded on first use. Needs the webui extra: pip install "
        "'diffsynth-cog[webui]'.",
    )
    p.add_argument("--models-dir", default="models", help="where downloaded models live (and local models are found)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model selected at start: a preset or a local folder")
    p.add_argument(
        "--device", default="auto", help="auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights' dtype")
    p.add_argument("--height", type=int, help="the page's starting height, pixels (default: the model's)")
    p.add_argument("--width", type=int, help="the page's starting width, pixels (default: the model's)")
    p.add_argument("--output-dir", default="outputs", help="where the videos are written (new names, never replaced)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--queue-size", type=int, default=16, help="jobs that may wait behind the running one")
    p.add_argument("--no-download", action="store_true", help="never download; fail if models are missing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars in the console")
    p.set_defaults(func=cmd_webui)
