"""``diffsynth-cog webui``: a Gradio page for text-to-video (the CogVideo demo's and DiffSynth-Studio's convention).

The page takes a prompt, a negative prompt, the frame count, steps, CFG, seed and sampler, plus the model
setup (LoRA and its alpha, memory mode, attention kernel); it shows a progress bar while denoising (fed
by the pipeline's step callback), then the video, playable in the page and downloadable as an mp4. Jobs
run one at a time; later ones wait in Gradio's queue.

The UI is built by :func:`build_ui` from a *pipeline factory*: a callable that turns a :class:`ModelSetup`
into a ready :class:`~diffsynth_cog.pipeline.cog_video.CogVideoPipeline`. The command line passes
:class:`ModelPipelines` (loads the model once, swaps LoRAs and memory modes between jobs); tests pass a
tiny CPU model.

Nothing phones home: Gradio's analytics are off (``GRADIO_ANALYTICS_ENABLED=False``), the theme uses
the system's fonts (no Google Fonts), there is no share link, and the server binds to 127.0.0.1 unless
``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

    from diffsynth_cog.pipeline.cog_video import CogVideoPipeline

logger = logging.getLogger(__name__)

MEMORY_MODES = ("none", "model", "sequential")
FRAME_CHOICES = (49, 129)  # base model; ExVideo LoRA. Longer modes are added here as they land.
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]


@dataclass(frozen=True)
class ModelSetup:
    """What a job needs loaded: the LoRA choice and its alpha, the memory mode, the attention kernel.

    ``lora``: "none", "auto" (the ExVideo 129-frame LoRA when ``num_frames`` > 49), a download preset
    name or a ``.safetensors`` path. ``num_frames`` is there for "auto".
    """

    lora: str = "auto"
    lora_alpha: float = 1.0
    memory: str = "none"
    attention: str = "auto"
    num_frames: int = 49


PipelineFactory = Callable[[ModelSetup], "CogVideoPipeline"]


@dataclass(frozen=True)
class UIOptions:
    """Choices and defaults the page offers; the output folder the videos are written to."""

    output_dir: Path = Path("outputs")
    frame_choices: tuple[int, ...] = FRAME_CHOICES
    num_frames: int = 129
    height: int = 480
    width: int = 720
    steps: int = 50
    cfg_scale: float = 7.0
    seed: int = 0
    sampler: str = "ddim"
    fps: int = 8
    loras: tuple[str, ...] = ("auto", "none")
    attention_modes: tuple[str, ...] = ("auto",)
    queue_size: int = 16
    title: str = "diffsynth-cog: CogVideoX long video"


@dataclass
class JobResult:
    video: Path
    status: str
    frames: int = 0
    seconds: float = 0.0


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    import gradio

    return gradio


def run_job(
    factory: PipelineFactory,
    options: UIOptions,
    *,
    prompt: str,
    negative_prompt: str,
    num_frames: int | str,
    steps: int,
    cfg_scale: float,
    seed: int,
    sampler: str,
    setup: ModelSetup,
    progress: Callable[..., Any] | None = None,
) -> JobResult:
    """One generation: checks the inputs, gets the pipeline, denoises with progress, writes the mp4.

    Raises ValueError (or a DiffSynthCogError) with a message for the user on bad input."""
    from diffsynth_cog.configs import check_generation_numbers, check_num_frames
    from diffsynth_cog.io.video import save_video
    from diffsynth_cog.pipeline.options import GenerationOptions, Inputs, Output, Sampling

    if not prompt or not prompt.strip():
        raise ValueError("write a prompt first")
    try:
        frames = int(num_frames)
    except (TypeError, ValueError):
        raise ValueError(f"frames must be a whole number (8k+1, e.g. 49 or 129); got {num_frames!r}") from None
    check_num_frames(frames, name="frames")
    steps, seed = int(steps), int(seed)
    check_generation_numbers(cfg_scale=cfg_scale, num_inference_steps=steps, seed=seed)
    setup = ModelSetup(setup.lora, float(setup.lora_alpha), setup.memory, setup.attention, frames)

    start = time.perf_counter()
    if progress is not None:
        progress(0.0, desc="loading models")
    pipe = factory(setup)

    def on_step(i: int, timestep: int, latents: Any) -> None:
        if progress is not None:
            progress((i + 1, steps), desc=f"denoising (t={timestep})", unit="steps")

    generation = GenerationOptions(
        inputs=Inputs(
            prompt=prompt, negative_prompt=negative_prompt or "", num_frames=frames, height=options.height,
            width=options.width,
        ),
        sampling=Sampling(sampler=sampler, num_inference_steps=steps, cfg_scale=float(cfg_scale), seed=seed),
        output=Output(output_type="pil", progress_bar=False),
    )  # fmt: skip
    video = pipe.generate(generation, callback=on_step)
    if progress is not None:
        progress(1.0, desc="writing the mp4")
    options.output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}-{frames}f"
    path = options.output_dir / f"{stem}.mp4"
    for n in range(1, 1000):  # two jobs in one second with one seed: a new name, never an overwrite
        if not path.exists():
            break
        path = options.output_dir / f"{stem}-{n}.mp4"
    save_video(video, path, fps=options.fps)
    seconds = time.perf_counter() - start
    status = (
        f"{len(video)} frames, {steps} steps, seed {seed}, sampler {sampler}, LoRA {setup.lora}: "
        f"{seconds:.1f} s. Saved {path}"
    )
    logger.info("%s", status)
    return JobResult(video=path, status=status, frames=len(video), seconds=seconds)


def build_ui(factory: PipelineFactory, options: UIOptions | None = None) -> gr.Blocks:
    """The page (a ``gradio.Blocks``, queued: one job at a time). Start it with :func:`launch`."""
    from diffsynth_cog.pipeline.options import SAMPLERS

    gr = _gradio()
    options = options or UIOptions()
    frame_choices = [str(f) for f in options.frame_choices]

    def generate(
        prompt: str,
        negative_prompt: str,
        num_frames: str,
        steps: float,
        cfg_scale: float,
        seed: float,
        sampler: str,
        lora: str,
        lora_alpha: float,
        memory: str,
        attention: str,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to ask for a progress bar
    ) -> tuple[str, str, str]:
        setup = ModelSetup(lora=lora, lora_alpha=lora_alpha, memory=memory, attention=attention)
        try:
            result = run_job(
                factory,
                options,
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_frames=num_frames,
                steps=int(steps),
                cfg_scale=cfg_scale,
                seed=int(seed),
                sampler=sampler,
                setup=setup,
                progress=progress,
            )
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            from diffsynth_cog.errors import DiffSynthCogError

            if isinstance(e, DiffSynthCogError):
                raise gr.Error(str(e)) from None
            raise
        return str(result.video), str(result.video), result.status

    with gr.Blocks(title=options.title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {options.title}")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative-prompt")
                with gr.Row():
                    frames = gr.Dropdown(
                        frame_choices,
                        value=str(options.num_frames),
                        label="Frames (8k+1)",
                        allow_custom_value=True,
                        elem_id="frames",
                    )
                    sampler = gr.Dropdown(list(SAMPLERS.names()), value=options.sampler, label="Sampler")
                with gr.Row():
                    steps = gr.Slider(1, 200, value=options.steps, step=1, label="Steps", elem_id="steps")
                    cfg = gr.Slider(1.0, 15.0, value=options.cfg_scale, step=0.5, label="CFG scale")
                seed = gr.Number(value=options.seed, precision=0, label="Seed", elem_id="seed")
                with gr.Accordion("Model", open=False, elem_id="model-setup"):
                    lora = gr.Dropdown(
                        list(options.loras), value=options.loras[0], label="LoRA", allow_custom_value=True
                    )
                    alpha = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA alpha")
                    memory = gr.Dropdown(list(MEMORY_MODES), value="none", label="Memory mode (CPU offload)")
                    attention = gr.Dropdown(
                        list(options.attention_modes), value=options.attention_modes[0], label="Attention kernel"
                    )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                video = gr.Video(label="Video", buttons=["download"], elem_id="video", autoplay=True, loop=True)
                file = gr.File(label="Download mp4", elem_id="video-file")
                status = gr.Markdown(elem_id="status")
        button.click(
            generate,
            inputs=[prompt, negative, frames, steps, cfg, seed, sampler, lora, alpha, memory, attention],
            outputs=[video, file, status],
            concurrency_limit=1,
        )
    demo.queue(default_concurrency_limit=1, max_size=options.queue_size)
    return demo


def launch(
    demo: gr.Blocks, options: UIOptions, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True
) -> str:
    """Serves the page; returns its URL. ``block=False`` returns at once (tests); stop with ``demo.close()``."""
    gr = _gradio()
    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        quiet=True,
        ssr_mode=False,
        theme=theme,
        allowed_paths=[str(options.output_dir.resolve())],
        footer_links=[],
    )
    return url


class ModelPipelines:
    """The command line's pipeline factory: loads the model on the first job, then between jobs swaps
    the merged LoRA (restoring the exact base weights first), the memory mode and the attention kernel."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pipe: CogVideoPipeline | None = None
        self.manager: Any = None
        self.model: Any = None  # cli_checks.ModelChoice of the loaded model
        self.lora: tuple[Path | None, float] = (None, 0.0)
        self.lock = threading.Lock()

    def __call__(self, setup: ModelSetup) -> CogVideoPipeline:
        import torch

        from diffsynth_cog import CogVideoPipeline, ModelManager
        from diffsynth_cog.cli.checks import DTYPES, LoRAChoice, choose_lora, choose_model, fetch_models, resolve_device
        from diffsynth_cog.models.attention import set_attention_backend

        if setup.memory not in MEMORY_MODES:
            raise ValueError(f"memory mode must be one of {MEMORY_MODES}; got {setup.memory!r}")
        fetch = dict(
            models_dir=self.args.models_dir, download=not self.args.no_download, progress=not self.args.no_progress
        )
        with self.lock:
            set_attention_backend(setup.attention)
            if self.pipe is None:
                model = choose_model(self.args.model)
                model_dir, _ = fetch_models(model, LoRAChoice(), **fetch)
                self.model = dataclasses.replace(model, local=model_dir, preset=None)
                device = resolve_device(self.args.device)
                # Loaded on the CPU; the pipeline moves what the memory mode keeps on the device.
                self.manager = ModelManager(torch_dtype=getattr(torch, DTYPES[self.args.dtype]), device="cpu")
                self.manager.load_models([model_dir])
                self.pipe = CogVideoPipeline.from_model_manager(self.manager, device=device)
            choice = choose_lora(setup.lora, self.model, setup.num_frames, self.args.models_dir)
            _, lora = fetch_models(self.model, choice, **fetch)
            wanted = (lora, setup.lora_alpha if lora is not None else 0.0)
            if wanted != self.lora:
                self.manager.clear_loras()
                self.lora = (None, 0.0)
                if lora is not None:
                    self.manager.load_lora(lora, lora_alpha=setup.lora_alpha)
                self.lora = wanted
            if self.pipe.offloader.mode != setup.memory:
                self.pipe.offloader.set_mode(setup.memory)
            return self.pipe


def local_loras(models_dir: str | Path) -> list[str]:
    """LoRA choices: "auto", "none", the ExVideo preset, and the .safetensors files under ``models_dir/lora``."""
    from diffsynth_cog.cli.checks import DEFAULT_LORA
    from diffsynth_cog.hub.presets import get_preset

    preset_file = get_preset(DEFAULT_LORA).result_path(models_dir)
    found = sorted(str(p) for p in (Path(models_dir) / "lora").glob("*.safetensors") if p != preset_file)
    return ["auto", "none", DEFAULT_LORA, *found]


def cmd_webui(args: argparse.Namespace) -> int:
    from diffsynth_cog.cli.checks import choose_model, resolve_device
    from diffsynth_cog.configs import check_size
    from diffsynth_cog.io.atomic import check_output_path
    from diffsynth_cog.pipeline.options import ATTENTION_BACKENDS

    # Before serving: a typo in --model, a size or a device, or an output folder that cannot be written fails
    # now, not at the first job.
    check_size(args.height, args.width)
    choose_model(args.model)
    args.device = resolve_device(args.device)
    check_output_path(Path(args.output_dir) / "video.mp4", what="--output-dir")
    _gradio()  # the webui extra: an install hint instead of a traceback

    options = UIOptions(
        output_dir=Path(args.output_dir),
        height=args.height,
        width=args.width,
        loras=tuple(local_loras(args.models_dir)),
        attention_modes=ATTENTION_BACKENDS.names(),
        queue_size=args.queue_size,
    )
    demo = build_ui(ModelPipelines(args), options)
    logger.info("serving the web UI on http://%s:%d (Ctrl+C stops it)", args.host, args.port)
    launch(demo, options, host=args.host, port=args.port, block=True)
    return 0


def add_webui_command(sub: argparse._SubParsersAction) -> None:
    from diffsynth_cog.cli.checks import DEFAULT_MODEL, DTYPES

    p = sub.add_parser(
        "webui",
        help="serve a web page for generating videos (Gradio)",
        description="A Gradio page for text-to-video: prompt, frames, steps, CFG, seed, sampler, LoRA, memory "
        "and attention modes, with a progress bar and the video to watch and download. One job at a time; "
        "the model is loaded on the first job. Needs the webui extra: pip install 'diffsynth-cog[webui]'.",
    )
    p.add_argument("--models-dir", default="models", help="where downloaded models live")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a download preset or a local model folder")
    p.add_argument(
        "--device", default="auto", help="auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights' dtype")
    p.add_argument("--height", type=int, default=480, help="pixels, a multiple of 16")
    p.add_argument("--width", type=int, default=720, help="pixels, a multiple of 16")
    p.add_argument("--output-dir", default="outputs", help="where the videos are written (new names, never replaced)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--queue-size", type=int, default=16, help="jobs that may wait behind the running one")
    p.add_argument("--no-download", action="store_true", help="never download; fail if models are missing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars in the console")
    p.set_defaults(func=cmd_webui)
