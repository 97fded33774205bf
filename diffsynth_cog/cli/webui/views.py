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

SHOWN_SETTINGS = ("model", "seed", "num_frames", "height", "width", "steps", "sampler", "cfg_scale", "windows",
                  "mask", "riflex", "step_cache", "continuation", "lora")  # fmt: skip


def file_url(path: Path) -> str:
    return f"/gradio_api/file={escape(str(Path(path).resolve()), quote=True)}"


def settings_html(settings: dict[str, Any] | None) -> str:
    if not settings:
        return "<i>no settings stored in the file</i>"
    rows = "".join(
        f"<tr><th>{escape(k)}</th><td>{escape(str(settings[k]))}</td></tr>" for k in SHOWN_SETTINGS if k in settings
    )
    prompt = escape(str(settings.get("prompt", "")))
    return f'<div class="prompt">{prompt}</div><table class="settings">{rows}</table>'


def status_html(job: Job | None) -> str:
    """The panel of one job (this tab's, else the running or newest one)."""
    if job is None:
        return '<div id="job-none">No jobs yet: write a prompt and press Generate.</div>'
    title = f"Job {job.id}: {job.state}"
    parts = [f'<div class="job job-{job.state}" data-job="{job.id}"><b>{escape(title)}</b> - {escape(job.activity)}']
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
table.settings th { text-align: left; padding-right: 1em; }
#gallery-items { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: .6em; }
.gallery-item video { width: 100%; }
.gallery-item figcaption { font-size: .8em; }
"""
