"""The bridge from the page to the pipeline: a job's form becomes the ``generate`` command's arguments (the CLI's
defaults, with the page's values on top), then the same :class:`GenerationOptions` the CLI builds
(``cli.generate.generation_options``), run with a step callback that reports progress and obeys Stop.

Errors a user can act on become :class:`PageError` in the page's words (one console line each; the traceback
only with ``-v``); warnings logged during a job (a prompt cut to T5's length) become the job's notes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsynth_cog.cli.webui.controls import generate_defaults, labels, page_words
from diffsynth_cog.cli.webui.jobs import Job, PageError

if TYPE_CHECKING:
    from diffsynth_cog.pipeline.cog_video import CogVideoPipeline

logger = logging.getLogger(__name__)

RANDOM_SEED = -1
# Controls that only change how another one works: (this control, the one it works on); set alone they do nothing.
MODIFIERS = (("window_overlap", "window_frames"), ("step_cache_method", "step_cache"), ("context_frames", "extend_by"))
MAX_WINDOWED_FRAMES = 8 * 128 + 1  # with windows: any length at one window's memory; this bounds a typo


@dataclass(frozen=True)
class ModelSetup:
    """What a job needs loaded: the model, the LoRA (and its alpha), offload, quantization, the attention kernel.

    ``lora``: "none", "auto" (the family's long-video LoRA past its trained length), a preset or a file;
    ``num_frames`` is there for "auto"."""

    model: str = ""
    lora: str = "auto"
    lora_alpha: float = 1.0
    memory: str = "none"
    attention: str = "auto"
    num_frames: int = 49
    quantize: str = "none"


Report = Callable[[float, str], None]  # (fraction, what is happening): a job's progress line
PipelineFactory = Callable[[ModelSetup, Report], "CogVideoPipeline"]


@dataclass(frozen=True)
class UIOptions:
    """What the page offers and starts with. ``defaults``: values shown at start, by ``generate`` option name
    (the chosen model's family fills size, frames and fps); ``choices``: per option, what is offered instead of
    the parser's (the models and LoRAs found, the attention kernels that work on this machine)."""

    output_dir: Path = Path("outputs")
    defaults: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    families: dict[str, dict[str, Any]] = field(default_factory=dict)  # model choice -> its family's defaults
    queue_size: int = 16
    title: str = "diffsynth-cog: CogVideoX long video"


@dataclass
class JobResult:
    video: Path
    status: str
    frames: int = 0
    seconds: float = 0.0
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  # the settings written into the video
    checks: dict[str, Any] | None = None  # the temporal checks (``VideoReport.to_dict``), None without them


@contextlib.contextmanager
def user_errors(job: Job) -> Iterator[None]:
    """Errors a user can act on become a PageError in the page's words; one console line each."""
    from diffsynth_cog.errors import DiffSynthCogError

    try:
        yield
    except PageError as error:
        logger.warning("job %d refused: %s", job.id, error)
        raise
    except (ValueError, FileNotFoundError, DiffSynthCogError) as error:
        message = page_words(str(error))
        logger.warning("job %d refused: %s", job.id, message)
        logger.debug("the error's traceback:", exc_info=True)
        raise PageError(message) from None
    except RuntimeError as error:
        if "out of memory" not in str(error):
            raise
        logger.warning("job %d: out of GPU memory", job.id)
        raise PageError(
            "out of GPU memory: try Offload model (or sequential), Quantization int8, fewer frames, a smaller "
            "size, or windows (Long video)"
        ) from None


class JobNotes(logging.Handler):
    """Collects the warnings logged by the package while a job runs (the job's own thread) into its notes."""

    def __init__(self, job: Job) -> None:
        super().__init__(logging.WARNING)
        self.job = job

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("diffsynth_cog") and record.name != __name__:
            self.job.notes.append(page_words(record.getMessage()))


def whole_number(value: Any, label: str) -> int:
    """A number typed in the page that must be whole: 1.5 is refused, never rounded."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PageError(f"{label} must be a whole number; got {value!r}") from None
    if not number.is_integer():
        raise PageError(f"{label} must be a whole number; got {value:g}")
    return int(number)


def longest_frames(args: argparse.Namespace, family: dict[str, Any]) -> int:
    """The most frames the chosen mode makes: the family's long length in one pass (1.0 with the ExVideo LoRA:
    129; 1.5: 161), any length with windows."""
    if args.window_frames:
        return MAX_WINDOWED_FRAMES
    return int(family.get("long_frames", family.get("num_frames", args.num_frames)))


def job_arguments(form: dict[str, Any], ui: UIOptions) -> argparse.Namespace:
    """The ``generate`` arguments of a job: the CLI's defaults, the page's values on top (typed values
    checked: whole numbers stay whole, -1 draws the seed used). An emptied number field whose option is off by
    default (Window frames, Denoising strength) reaches the server as 0: it leaves the option off."""
    from diffsynth_cog.cli.checks import GENERATE_CHECKS, check_options
    from diffsynth_cog.cli.generate_checks import check_input_rules
    from diffsynth_cog.configs import check_size

    args = generate_defaults()
    for dest, value in form.items():
        off_by_default = getattr(args, dest, None) is None and isinstance(value, int | float) and value == 0
        if value is not None and value != "" and not off_by_default:
            setattr(args, dest, value)
    if not (args.prompt or "").strip():
        raise PageError("write a prompt first")
    for dest, label in (("height", "Height"), ("width", "Width"), ("num_frames", "Frames"), ("fps", "FPS")):
        setattr(args, dest, whole_number(getattr(args, dest), label))
    for dest, label in (("num_inference_steps", "Steps"), ("extend_by", "Extend by"), ("context_frames", "Context")):
        setattr(args, dest, whole_number(getattr(args, dest), label))
    args.window_frames = whole_number(args.window_frames, "Window frames") if args.window_frames else None
    args.seed = whole_number(args.seed, "Seed")
    if args.seed == RANDOM_SEED:
        args.seed = random.SystemRandom().randrange(2**63)
    args.riflex = riflex_value(args.riflex)
    check_options(args, GENERATE_CHECKS)
    check_size(args.height, args.width)
    check_input_rules(args, ui.families.get(args.model, {}).get("family"))
    longest = longest_frames(args, ui.families.get(args.model, {}))
    if args.num_frames > longest:
        raise PageError(
            f"Frames {args.num_frames}: this model makes at most {longest} frames at once; set Window frames "
            "(Long video) for longer videos"
        )
    args.progress_bar = False
    return args


def idle_modifiers(args: argparse.Namespace) -> list[str]:
    """Notes for the controls set away from their default that do nothing here (their partner is off)."""
    defaults, names = generate_defaults(), labels()
    return [
        f"{names[modifier]} {getattr(args, modifier)} does nothing without {names[partner]}"
        for modifier, partner in MODIFIERS
        if getattr(args, modifier) != getattr(defaults, modifier) and not getattr(args, partner)
    ]


def riflex_value(text: Any) -> list[int] | None:
    """RIFLEx as typed: empty or "off" = off; "on" = the model's published (k, N_k); "K N_K" = that pair."""
    if isinstance(text, list | tuple) or text is None:
        return list(text) if text is not None else None
    words = str(text).replace(",", " ").split()
    if not words or words == ["off"]:
        return None
    if words == ["on"]:
        return []
    try:
        return [int(w) for w in words]
    except ValueError:
        raise PageError(f'RIFLEx: type "on", "off" or two whole numbers K N_K (e.g. "2 20"); got {text!r}') from None


def setup_of(args: argparse.Namespace) -> ModelSetup:
    attention = args.attention if not args.sparse_attention else "auto"
    return ModelSetup(
        model=args.model,
        lora=args.lora,
        lora_alpha=float(args.lora_alpha),
        memory=args.offload,
        attention=attention,
        num_frames=args.num_frames + (args.extend_by or 0),
        quantize=args.quantize,
    )


def temporal_checks(path: Path, frames: int) -> dict[str, Any] | None:
    """The temporal checks of the video written (``evaluate``: flicker, warping error, colour drift, sharpness,
    events, the scores of the joins its settings record) for the result panel; None without the evaluate extras
    or for a single frame."""
    try:
        from diffsynth_cog.evaluate.report import evaluate_video
    except ImportError as error:
        logger.info("no temporal checks (pip install 'diffsynth-cog[evaluate]'): %s", error)
        return None
    return evaluate_video(path).to_dict(with_curves=False) if frames >= 2 else None


def _input_frames(args: argparse.Namespace) -> list | None:
    """The input video's frames (V2V: cut to Frames; extension: whole), measured before any model loads."""
    from diffsynth_cog.cli.generate_checks import measure_input_video

    if not args.input_video:
        return None
    return measure_input_video(args, None)


def run_job(factory: PipelineFactory, ui: UIOptions, job: Job) -> JobResult:
    """One job: its arguments and options checked (nothing loaded for a bad one), the pipeline, the denoising
    with progress (Stop ends it at the next step), the video written with its settings."""
    notes = JobNotes(job)
    package = logging.getLogger("diffsynth_cog")
    package.addHandler(notes)
    try:
        with user_errors(job):
            return _run(factory, ui, job)
    finally:
        package.removeHandler(notes)


def _run(factory: PipelineFactory, ui: UIOptions, job: Job) -> JobResult:
    from diffsynth_cog.cli.generate import EXTENSION_SETS, file_settings, generation_options
    from diffsynth_cog.io.video import save_video

    start = time.perf_counter()
    job.report(0.0, "checking the settings")
    args = job_arguments(job.form, ui)
    options = generation_options(args, input_video=_input_frames(args)).replace(output_type="pil")
    job.form["seed used"] = args.seed
    job.notes.extend(idle_modifiers(args))
    steps = args.num_inference_steps
    pipe = factory(setup_of(args), lambda fraction, text: job.report(0.0, text))

    def on_step(i: int, timestep: int, latents: Any) -> None:
        job.report((i + 1) / steps, f"denoising: step {i + 1} of {steps}")

    job.report(0.0, f"denoising: step 0 of {steps}")
    if args.extend_by:
        keywords = {k: v for k, v in options.flat().items() if k not in EXTENSION_SETS}
        video = pipe.extend_video(
            options.inputs.input_video, args.extend_by, context_frames=args.context_frames, callback=on_step,
            **keywords,
        )  # fmt: skip
    else:
        video = pipe.generate(options, callback=on_step)
    job.report(1.0, "writing the mp4")
    path = new_video_path(ui.output_dir, args.seed, len(video))
    settings = file_settings(pipe, args)  # what the command line writes: the pipeline's settings + the run's
    save_video(video, path, fps=args.fps, quality=args.quality, settings=settings)
    seconds = time.perf_counter() - start
    status = f"{len(video)} frames, {steps} steps, seed {args.seed}, sampler {args.sampler}: {seconds:.1f} s"
    logger.info("job %d: %s; saved %s", job.id, status, path)
    job.report(1.0, "checking the video (flicker, warping, colour drift, joins)")
    checks = temporal_checks(path, len(video))
    return JobResult(
        video=path, status=status, frames=len(video), seconds=seconds, seed=args.seed, settings=settings,
        checks=checks,
    )  # fmt: skip


def new_video_path(output_dir: Path, seed: int, frames: int) -> Path:
    """A new file name under ``output_dir`` (never an existing one)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}-{frames}f"
    path = output_dir / f"{stem}.mp4"
    n = 1
    while path.exists():
        path, n = output_dir / f"{stem}-{n}.mp4", n + 1
    return path
