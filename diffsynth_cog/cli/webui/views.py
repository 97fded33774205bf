"""The page's HTML panels, drawn from the job queue and the output folder: the shown job (its progress bar, drawn
once; its error, escaped and whole; its notes, the seed used and the settings), the job list, and the gallery
of the videos in the output folder with each one's settings read from the file. Every text is escaped."""

from __future__ import annotations

import logging
from functools import lru_cache
from html import escape
from pathlib import Path
from typing import Any

from diffsynth_cog.cli.webui.jobs import DONE, FAILED, RUNNING, Job

logger = logging.getLogger(__name__)

SHOWN_SETTINGS = ("model", "seed", "num_frames", "height", "width", "fps", "steps", "sampler", "cfg_scale",
                  "dynamic_cfg", "denoising_strength", "windows", "mask", "attention", "riflex", "step_cache",
                  "continuation", "lora", "quantization", "offload")  # fmt: skip


def file_url(path: Path) -> str:
    return f"/gradio_api/file={escape(str(Path(path).resolve()), quote=True)}"


def setting_text(key: str, value: Any) -> str:
    """One setting as the page shows it (``pipeline.settings``' keys: the parts are dicts, the LoRAs a list)."""
    if key == "model" and isinstance(value, dict):
        return str(value.get("label") or value.get("family") or value.get("path"))
    if key == "lora" and isinstance(value, list):
        return ", ".join(f"{Path(str(lora.get('file'))).name} x {lora.get('alpha')}" for lora in value) or "none"
    if key == "windows" and isinstance(value, dict):
        return f"{value.get('frames')} frames, overlap {value.get('overlap')}"
    if key == "mask" and isinstance(value, dict):
        return str(value.get("spec") or value.get("name"))
    if key == "riflex" and isinstance(value, dict):
        return f"k {value.get('k')}, N_k {value.get('n_k')}"
    if key == "step_cache" and isinstance(value, dict):
        return f"{value.get('method')} {value.get('threshold')}"
    if key == "continuation" and isinstance(value, dict):
        return f"{value.get('extend_by')} frames after {value.get('source_frames')} (context {value.get('context_frames')})"
    if key == "quantization" and isinstance(value, dict):
        return str(value.get("mode"))
    return str(value)


def settings_html(settings: dict[str, Any] | None) -> str:
    if not settings:
        return "<i>no settings stored in the file</i>"
    rows = "".join(
        f'<tr data-setting="{escape(k)}"><th>{escape(k)}</th><td>{escape(setting_text(k, settings[k]))}</td></tr>'
        for k in SHOWN_SETTINGS
        if settings.get(k) not in (None, [], {})
    )
    prompt = escape(str(settings.get("prompt") or ""))
    return f'<div class="prompt">{prompt}</div><table class="settings">{rows}</table>'


def checks_html(checks: dict[str, Any] | None) -> str:
    """The video's temporal checks (``evaluate``): its headline numbers, its events and its joins' scores."""
    from diffsynth_cog.cli.evaluate import SUMMARY_COLUMNS, finding_lines

    if checks is None:
        return '<div id="job-checks"><i>no temporal checks (pip install "diffsynth-cog[evaluate]")</i></div>'
    summary = checks["summary"]
    rows = "".join(
        f'<tr data-check="{key}"><th>{escape(title)}</th><td>{escape(form.format(summary[key]))}</td></tr>'
        for key, title, form in SUMMARY_COLUMNS
        if summary.get(key) is not None and key not in ("frames", "fps", "size")
    )
    lines = finding_lines(checks.get("events", []), checks.get("joins", []))
    findings = "".join(f"<li>{escape(line)}</li>" for line in lines) or "<li>no events</li>"
    return (
        f'<div id="job-checks"><b>Temporal checks</b><table class="checks">{rows}</table>'
        f'<ul class="findings">{findings}</ul></div>'
    )


# The status panel as served, until the page's first refresh draws the queue's state: a snapshot taken when the page
# was built would say "No jobs yet" to every tab opened after a job was submitted.
STATUS_LOADING = '<div id="job-loading">Loading the jobs...</div>'


def status_html(job: Job | None) -> str:
    """The panel of one job (this tab's, else the running or newest one)."""
    if job is None:
        return '<div id="job-none">No jobs yet: write a prompt and press Generate.</div>'
    title = f"Job {job.id}: {job.state}"
    activity = f" - {escape(job.activity)}" if job.activity != job.state else ""  # not "done - done"
    parts = [f'<div class="job job-{job.state}" data-job="{job.id}"><b>{escape(title)}</b>{activity}']
    if job.state == RUNNING or job.state == DONE:
        parts.append(f'<progress id="job-progress" max="100" value="{job.progress * 100:.0f}"></progress> '
                     f"{job.progress:.0%}")  # fmt: skip
    if job.state == FAILED:
        parts.append(f'<div class="job-error" id="job-error">{escape(job.error)}</div>')
    if "seed used" in job.form:
        parts.append(f'<div id="seed-used">seed used: {job.form["seed used"]}</div>')
    if job.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in job.notes) + "</ul>")
    if job.state == DONE:
        parts.append(f'<div id="job-result">{escape(job.result.status)}</div>')
        parts.append(settings_html(job.result.settings))
        parts.append(checks_html(getattr(job.result, "checks", None)))
    return "".join(parts) + "</div>"


def jobs_html(jobs: list[Job]) -> str:
    """Every job the server remembers, newest first: state, progress, prompt, result."""
    if not jobs:
        return ""
    rows = []
    for job in reversed(jobs):
        prompt = str(job.form.get("prompt") or "")
        result = ""
        if job.state == DONE:
            result = f'<a href="{file_url(job.result.video)}" target="_blank">{escape(job.result.video.name)}</a>'
        elif job.state == FAILED:
            result = escape(job.error[:120])
        rows.append(
            f'<tr class="job-row job-{job.state}" data-job="{job.id}"><td>{job.id}</td><td>{escape(job.state)}</td>'
            f"<td>{job.progress:.0%}</td><td>{escape(prompt[:60])}</td><td>{result}</td></tr>"
        )
    return '<table id="job-table"><tr><th>#</th><th>state</th><th>progress</th><th>prompt</th><th>result</th></tr>' + (
        "".join(rows) + "</table>"
    )


def videos_in(folder: Path, limit: int = 12) -> list[Path]:
    """The newest videos of the output folder."""
    if not folder.is_dir():
        return []
    found = sorted(folder.glob("*.mp4"), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[:limit]


@lru_cache(maxsize=256)
def _settings(path: Path, mtime: float) -> dict[str, Any] | None:
    from diffsynth_cog.io.settings import read_settings

    try:
        return read_settings(path)
    except (OSError, ValueError) as error:
        logger.debug("no settings read from %s: %s", path, error)
        return None


def gallery_html(videos: list[Path]) -> str:
    """The output folder's videos, each with the settings stored in it."""
    if not videos:
        return "<i>No videos in the output folder yet.</i>"
    items = [
        f'<figure class="gallery-item"><video src="{file_url(v)}" controls muted loop preload="metadata"></video>'
        f"<figcaption><b>{escape(v.name)}</b>{settings_html(_settings(v, v.stat().st_mtime))}</figcaption></figure>"
        for v in videos
    ]
    return '<div id="gallery-items">' + "".join(items) + "</div>"


CSS = """
.job-error { color: #b00020; white-space: pre-wrap; font-weight: 600; margin: .4em 0; }
#job-progress { width: 70%; }
table.settings th, table.checks th { text-align: left; padding-right: 1em; }
#gallery-items { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: .6em; }
.gallery-item video { width: 100%; }
.gallery-item figcaption { font-size: .8em; }
"""
