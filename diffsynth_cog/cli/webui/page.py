"""The page: controls built from the ``generate`` options (``controls``), a Generate and a Stop button, the shown
job's panel, the video, the job list and the gallery, all redrawn from the server's :class:`JobQueue` by a timer.
So a reloaded page, or a second tab, shows the same running job and results; no job belongs to a page.

Nothing phones home: Gradio's analytics are off, the theme uses the system's fonts, there is no share link.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from diffsynth_cog.cli.webui.bridge import PipelineFactory, UIOptions, job_arguments, run_job
from diffsynth_cog.cli.webui.controls import SECTIONS, TOP, Control, control, page_words
from diffsynth_cog.cli.webui.jobs import JobQueue, PageError, video_path
from diffsynth_cog.cli.webui.views import CSS, STATUS_LOADING, gallery_html, jobs_html, status_html, videos_in

logger = logging.getLogger(__name__)

FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
EXAMPLES = (
    "a lighthouse at dusk, waves rolling in, the beam sweeping over the sea",
    "a red fox trotting through fresh snow in a pine forest, morning light",
    "a time-lapse of clouds drifting over a mountain lake",
)
SIZE_FIELDS = ("height", "width", "num_frames", "fps")
REFRESH_SECONDS = 0.5


def gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    import gradio as gr

    return gr


def make_control(gr: Any, spec: Control, value: Any) -> Any:
    """A Gradio component for one option (its kind, label, help and choices from ``controls``)."""
    common = dict(label=spec.label, info=spec.help or None, elem_id=f"opt-{spec.dest.replace('_', '-')}")
    if spec.kind in ("int", "float"):
        return gr.Number(value=value, precision=None, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind == "choice":
        custom = spec.dest in ("lora", "model")  # a file or folder may be typed
        return gr.Dropdown(list(spec.choices), value=value, allow_custom_value=custom, **common)
    if spec.kind in ("image", "video"):  # no info= on these: the help goes under them
        common.pop("info")
        made = gr.Image(type="filepath", **common) if spec.kind == "image" else gr.Video(**common)
        gr.Markdown(spec.help, elem_classes=["help"])
        return made
    lines = 3 if spec.dest == "prompt" else 1
    return gr.Textbox(value=value or "", lines=lines, **common)


def _start_values(options: UIOptions, model: str) -> dict[str, Any]:
    return {**options.families.get(model, {}), **options.defaults}


def build_controls(gr: Any, options: UIOptions) -> dict[str, Any]:
    """Every control, by option name, in the page's sections."""
    model_spec = control("model", "Model", {"model": tuple(options.families) or ()})
    model = options.defaults.get("model") or (model_spec.choices[0] if model_spec.choices else model_spec.default)
    values = _start_values(options, model)
    built: dict[str, Any] = {"model": make_control(gr, model_spec, model)}
    for dest, label in TOP[1:]:
        built[dest] = make_control(gr, control(dest, label, options.choices), values.get(dest))
    gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[built["prompt"]], label="Example prompts")
    for title, is_open, fields in SECTIONS:
        with gr.Accordion(title, open=is_open, elem_id=f"section-{title.split()[0].lower()}"):
            for dest, label in fields:
                spec = control(dest, label, options.choices)
                built[dest] = make_control(gr, spec, values.get(dest, spec.default))
            if dest == "denoising_strength":
                built["previous_video"] = gr.Dropdown(
                    [], value=None, label="Or continue / edit a video made here", elem_id="opt-previous-video"
                )
    return built


def build_ui(factory: PipelineFactory, options: UIOptions | None = None) -> Any:
    """The page (a ``gradio.Blocks``) and its job queue (``demo.jobs``). Start it with :func:`launch`."""
    gr = gradio()
    options = options or UIOptions()
    jobs = JobQueue(lambda job: run_job(factory, options, job), max_waiting=options.queue_size)
    with gr.Blocks(title=options.title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {options.title}")
        job_id = gr.State(None)  # this tab's newest job; a reloaded page shows the running or newest one
        shown = gr.State(None)  # the video and gallery drawn last (redrawn only when they change)
        with gr.Row():
            with gr.Column(scale=1):
                controls = build_controls(gr, options)
                with gr.Row():
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=1):
                status = gr.HTML(STATUS_LOADING, elem_id="status")  # the load event draws it
                video = gr.Video(label="Video", buttons=["download"], elem_id="video", autoplay=True, loop=True)
                file = gr.File(label="Download mp4", elem_id="video-file")
                with gr.Accordion("Jobs", open=True, elem_id="jobs-section"):
                    table = gr.HTML(jobs_html(jobs.snapshot()), elem_id="jobs")
                with gr.Accordion("Gallery (the output folder)", open=False, elem_id="gallery-section"):
                    gallery = gr.HTML(gallery_html(videos_in(options.output_dir)), elem_id="gallery")
        names = list(controls)
        fields = [controls[n] for n in names]

        def submit(_: int | None, *values: Any) -> tuple[int, str]:
            return submit_job(jobs, options, dict(zip(names, values, strict=True)))

        def refresh(mine: int | None, drawn: tuple | None) -> tuple:
            return redraw(gr, jobs, options, mine, drawn)

        button.click(submit, [job_id, *fields], [job_id, status], queue=False, show_progress="hidden")
        stop.click(lambda mine: jobs.stop() and None, [job_id], None, queue=False, show_progress="hidden")
        outputs = [status, table, video, file, gallery, controls["previous_video"], shown]
        gr.Timer(REFRESH_SECONDS).tick(refresh, [job_id, shown], outputs, queue=False, show_progress="hidden")
        demo.load(refresh, [job_id, shown], outputs, queue=False, show_progress="hidden")
        size_controls = [controls[n] for n in SIZE_FIELDS]
        controls["model"].change(
            lambda m: [options.families.get(m, {}).get(n, gr.skip()) for n in SIZE_FIELDS],
            [controls["model"]],
            size_controls,
            queue=False,
        )
    demo.jobs = jobs
    return demo


def submit_job(jobs: JobQueue, options: UIOptions, form: dict[str, Any]) -> tuple[int, str]:
    """Queues a job; bad input is refused at once (the job is kept, failed, with the message)."""
    previous = form.pop("previous_video", None)
    if not form.get("input_video") and previous:
        form["input_video"] = str(options.output_dir / previous)
    try:
        args = job_arguments(form, options)
        form["seed"] = args.seed  # -1 drawn now, once: the page shows the seed used
        job = jobs.submit(form)
    except (PageError, ValueError) as error:
        message = page_words(str(error))
        job = jobs.refused(form, message)
        logger.warning("job %d refused: %s", job.id, message)
    return job.id, status_html(job)


def redraw(gr: Any, jobs: JobQueue, options: UIOptions, mine: int | None, drawn: tuple | None) -> tuple:
    """The panels from the queue: this tab's job (else the running or newest one), the list, the video and the
    gallery (those two only when they changed, so a playing video is not restarted)."""
    job = (jobs.get(mine) if mine is not None else None) or jobs.latest()
    path = video_path(job) if job is not None else None
    videos = videos_in(options.output_dir)
    now = (str(path) if path else None, tuple(str(v) for v in videos))
    old = drawn or (None, None)
    new_video = now[0] != old[0]
    new_gallery = now[1] != old[1]
    return (
        status_html(job),
        jobs_html(jobs.snapshot()),
        (str(path) if path else None) if new_video else gr.skip(),
        (str(path) if path else None) if new_video else gr.skip(),
        gallery_html(videos) if new_gallery else gr.skip(),
        gr.Dropdown(choices=[v.name for v in videos]) if new_gallery else gr.skip(),
        now,
    )


def launch(demo: Any, options: UIOptions, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serves the page; returns its URL. ``block=False`` returns at once (tests); stop with ``demo.close()``."""
    gr = gradio()
    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    demo.queue(default_concurrency_limit=1, max_size=options.queue_size)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        quiet=True,
        ssr_mode=False,
        theme=theme,
        css=CSS,
        allowed_paths=[str(Path(options.output_dir).resolve())],
        footer_links=[],
    )
    return url
