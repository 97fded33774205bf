"""Video-text datasets for post-training: index files and a clip dataset.

Three index layouts are read (paths in them are relative to the folder holding the index):

* DiffSynth-Studio ``metadata.json``: a list of objects, each with the video under ``file_name``,
  ``video`` or ``path`` and the caption under ``text`` or ``prompt``;
* DiffSynth-Studio ``metadata.csv``: a header row with the same column names;
* diffusers ``prompts.txt`` + ``videos.txt``: one caption / one video path per line, line ``i`` of one
  belonging to line ``i`` of the other.

DiffSynth-Studio's older video examples keep the clips in a ``train/`` subfolder next to
``metadata.csv`` while naming them relative to it; such a path is found there too.

Every record becomes a :class:`VideoSample` whose ``index`` is its position in the index file. The
index is the record's identity from then on: cache file names, sharding across ranks and resumption
all key on it, so it must not change when other records are skipped.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from diffsynth_cog.configs import check_num_frames
from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.io.frames import video_to_tensor
from diffsynth_cog.io.json_files import read_json
from diffsynth_cog.io.video import VideoReadError, VideoTooShortError, load_video

logger = logging.getLogger(__name__)

PATH_KEYS = ("file_name", "video", "path")
PROMPT_KEYS = ("text", "prompt")
JSON_INDEX = "metadata.json"
CSV_INDEX = "metadata.csv"
PROMPTS_TXT, VIDEOS_TXT = "prompts.txt", "videos.txt"
LEGACY_VIDEO_SUBFOLDER = "train"  # DiffSynth-Studio's older examples: <dataset>/train/<file_name>

# Reasons a clip is skipped, in the order summaries list them.
SKIP_REASONS = ("too_short", "unreadable", "missing")
SkipReason = Literal["too_short", "unreadable", "missing"]


class DatasetIndexError(DiffSynthCogError, ValueError):
    """A dataset index is missing, malformed, or its files disagree (the message names the file)."""


@dataclass(frozen=True)
class VideoSample:
    """One video-caption pair of a dataset index.

    path: absolute (or as given) path of the video file. prompt: its caption. index: position of the
    record in the index file (0-based), the record's stable identity. where: the record's place as a person
    finds it in the index file, for messages (``metadata.json record 3``, ``metadata.csv line 4``,
    ``prompts.txt line 2``; 1-based).
    """

    path: Path
    prompt: str
    index: int
    where: str = field(default="", compare=False)  # a label for messages, not part of the record's identity

    @property
    def label(self) -> str:
        return self.where or f"record {self.index + 1}"


@dataclass(frozen=True)
class SkippedSample:
    """A clip that could not be used: ``reason`` is one of :data:`SKIP_REASONS`, ``message`` says why."""

    index: int
    path: Path
    reason: SkipReason
    message: str
    where: str = field(default="", compare=False)  # VideoSample.where


# --------------------------------------------------------------------------------------------- index files
def _resolve_video_path(base: Path, name: str) -> Path:
    """``name`` relative to ``base`` (absolute names kept); falls back to ``base/train/name`` when only that exists."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    direct = base / path
    if not direct.exists():
        legacy = base / LEGACY_VIDEO_SUBFOLDER / path
        if legacy.exists():
            return legacy
    return direct


def _pick(record: Mapping[str, Any], keys: Sequence[str], what: str, where: str) -> Any:
    """The value of the first of ``keys`` present in ``record``; an error naming the record otherwise."""
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    found = ", ".join(repr(k) for k in record) or "none"
    raise DatasetIndexError(f"{where}: no {what} (expected one of {', '.join(keys)}); keys found: {found}")


def _make_samples(
    rows: Sequence[Mapping[str, Any]], base: Path, source: Path, places: Sequence[str]
) -> list[VideoSample]:
    """``places[i]``: where row i is in ``source`` ("record 3", "line 4"), as its messages name it."""
    samples = []
    for i, (row, place) in enumerate(zip(rows, places, strict=True)):
        where = f"{source}: {place}"
        if not isinstance(row, Mapping):
            raise DatasetIndexError(f"{where} is a {type(row).__name__}, expected an object with a video and a prompt")
        name = _pick(row, PATH_KEYS, "video path", where)
        prompt = _pick(row, PROMPT_KEYS, "prompt", where)
        if not isinstance(name, str) or not name.strip():
            raise DatasetIndexError(f"{where}: the video path must be a non-empty string, got {name!r}")
        if not isinstance(prompt, str):
            raise DatasetIndexError(f"{where}: the prompt must be a string, got {type(prompt).__name__} {prompt!r}")
        path = _resolve_video_path(base, name.strip())
        samples.append(VideoSample(path=path, prompt=prompt, index=i, where=f"{source.name} {place}"))
    return samples


def _read_json_index(path: Path) -> list[VideoSample]:
    rows = read_json(path, DatasetIndexError, expect=list, shape="of {'file_name': ..., 'text': ...} objects")
    return _make_samples(rows, path.parent, path, [f"record {i + 1}" for i in range(len(rows))])


def _read_csv_index(path: Path) -> list[VideoSample]:
    # utf-8-sig: spreadsheet programs often start CSV exports with a byte-order mark, which would
    # otherwise become part of the first column's name.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise DatasetIndexError(f"{path}: empty CSV file (expected a header row such as 'file_name,text')")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        for keys, what in ((PATH_KEYS, "video path"), (PROMPT_KEYS, "prompt")):
            if not any(k in reader.fieldnames for k in keys):
                raise DatasetIndexError(
                    f"{path}: no {what} column (expected one of {', '.join(keys)}); columns found: "
                    f"{', '.join(reader.fieldnames)}"
                )
        rows, lines = [], []
        for row in reader:
            rows.append(row)
            lines.append(f"line {reader.line_num}")  # where the row ends (a quoted field may span lines)
    return _make_samples(rows, path.parent, path, lines)


def _read_lines(path: Path) -> list[str]:
    """Lines of a text file without their line ends; blank lines at the end (editor artefacts) dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _read_txt_pair(prompts_path: Path, videos_path: Path) -> list[VideoSample]:
    prompts, videos = _read_lines(prompts_path), _read_lines(videos_path)
    if len(prompts) != len(videos):
        raise DatasetIndexError(
            f"{prompts_path} has {len(prompts)} prompts but {videos_path} has {len(videos)} videos; "
            "line i of one must belong to line i of the other"
        )
    blank = [i + 1 for i, v in enumerate(videos) if not v.strip()]
    if blank:
        raise DatasetIndexError(f"{videos_path}: blank video path on line(s) {blank[:10]}")
    empty = sum(1 for p in prompts if not p.strip())
    if empty:
        logger.warning("%s: %d empty prompt(s); those clips train unconditionally", prompts_path, empty)
    base = videos_path.parent
    return [
        VideoSample(
            path=_resolve_video_path(base, v.strip()),
            prompt=p.strip(),
            index=i,
            where=f"{prompts_path.name} line {i + 1}",
        )
        for i, (p, v) in enumerate(zip(prompts, videos, strict=True))
    ]


def load_dataset_index(path: str | os.PathLike[str]) -> list[VideoSample]:
    """Reads a dataset index; returns the records in file order (``index`` = position).

    ``path``: a dataset folder holding ``metadata.json``, ``metadata.csv`` or ``prompts.txt`` +
    ``videos.txt`` (looked for in that order; the first found is used), or one of those files
    (``prompts.txt``/``videos.txt`` then need their partner beside them). Video files are not opened
    here: a missing or bad video is reported when it is read (see :class:`VideoClipDataset`).

    Raises:
        DatasetIndexError: no index found, malformed rows, or prompts/videos counts that differ.
    """
    target = Path(path).expanduser()
    if target.is_file():
        folder, name = target.parent, target.name
        if name in (PROMPTS_TXT, VIDEOS_TXT):
            prompts_path, videos_path = folder / PROMPTS_TXT, folder / VIDEOS_TXT
            missing = [p for p in (prompts_path, videos_path) if not p.is_file()]
            if missing:
                raise DatasetIndexError(f"{target}: its partner file {missing[0]} is missing")
            samples = _read_txt_pair(prompts_path, videos_path)
        elif target.suffix.lower() == ".json":
            samples = _read_json_index(target)
        elif target.suffix.lower() == ".csv":
            samples = _read_csv_index(target)
        else:
            raise DatasetIndexError(
                f"{target}: unknown index format; expected a .json or .csv metadata file, {PROMPTS_TXT} or {VIDEOS_TXT}"
            )
    elif target.is_dir():
        found = [n for n in (JSON_INDEX, CSV_INDEX, PROMPTS_TXT, VIDEOS_TXT) if (target / n).is_file()]
        if JSON_INDEX in found:
            used: tuple[str, ...] = (JSON_INDEX,)
            samples = _read_json_index(target / JSON_INDEX)
        elif CSV_INDEX in found:
            used = (CSV_INDEX,)
            samples = _read_csv_index(target / CSV_INDEX)
        elif PROMPTS_TXT in found and VIDEOS_TXT in found:
            used = (PROMPTS_TXT, VIDEOS_TXT)
            samples = _read_txt_pair(target / PROMPTS_TXT, target / VIDEOS_TXT)
        elif found:
            have, lacking = found[0], VIDEOS_TXT if found[0] == PROMPTS_TXT else PROMPTS_TXT
            raise DatasetIndexError(f"{target}: has {have} but not {lacking}; the two come as a pair")
        else:
            raise DatasetIndexError(
                f"{target}: no dataset index found; expected {JSON_INDEX}, {CSV_INDEX} or {PROMPTS_TXT} + {VIDEOS_TXT}"
            )
        ignored = [n for n in found if n not in used]
        if ignored:
            logger.warning("%s: several dataset indexes; using %s, ignoring %s", target, " + ".join(used), ignored)
    else:
        raise DatasetIndexError(f"dataset path not found: {target}")
    if not samples:
        raise DatasetIndexError(f"{target}: the dataset index lists no videos")
    missing = sum(1 for s in samples if not s.path.is_file())
    logger.info("dataset index %s: %d records", target, len(samples))
    if missing:
        logger.warning("%s: %d of %d listed videos do not exist; they will be skipped", target, missing, len(samples))
    return samples


# --------------------------------------------------------------------------------------------- clip dataset
class VideoClipDataset(Dataset):
    """Fixed-size clips of the videos of a dataset index.

    Item ``i`` is ``{"video": [3, F, H, W] float32 in [-1, 1], "prompt": str, "index": int}`` for
    ``samples[i]``: frames ``0, frame_interval, ...`` (``num_frames`` of them) resized to cover
    ``height x width`` and centre-cropped to it.

    A clip that cannot be read (missing file, undecodable, fewer frames than needed) raises
    :class:`VideoReadError` / :class:`VideoTooShortError` by default. With ``on_error="report"`` the
    item is a :class:`SkippedSample` instead, so a ``DataLoader`` with worker processes can pass bad
    clips through to the consumer (an exception would end the whole loader) and nothing is retried.
    """

    def __init__(
        self,
        samples: Sequence[VideoSample],
        num_frames: int = 129,
        height: int = 480,
        width: int = 720,
        frame_interval: int = 1,
        *,
        on_error: Literal["raise", "report"] = "raise",
    ) -> None:
        check_num_frames(num_frames)
        if height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive, got {height}x{width}")
        if frame_interval < 1:
            raise ValueError(f"frame_interval must be >= 1, got {frame_interval}")
        if on_error not in ("raise", "report"):
            raise ValueError(f"on_error must be 'raise' or 'report', got {on_error!r}")
        self.samples = list(samples)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.frame_interval = frame_interval
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, position: int) -> dict[str, Any]:
        """Item ``position`` (always raising on a bad clip, whatever ``on_error`` says)."""
        sample = self.samples[position]
        frames = load_video(
            sample.path,
            height=self.height,
            width=self.width,
            num_frames=self.num_frames,
            frame_interval=self.frame_interval,
        )
        video = video_to_tensor(frames)  # [3, F, H, W] in [-1, 1]
        return {"video": video, "prompt": sample.prompt, "index": sample.index}

    def __getitem__(self, position: int) -> dict[str, Any] | SkippedSample:
        if self.on_error == "raise":
            return self.load(position)
        sample = self.samples[position]
        try:
            return self.load(position)
        except VideoTooShortError as error:
            return SkippedSample(sample.index, sample.path, "too_short", str(error), sample.label)
        except VideoReadError as error:
            reason: SkipReason = "unreadable" if sample.path.is_file() else "missing"
            return SkippedSample(sample.index, sample.path, reason, str(error), sample.label)


def first_item(batch: Sequence[Any]) -> Any:
    """DataLoader ``collate_fn`` for ``batch_size=1`` that hands the single item through unchanged.

    (A module-level function, so worker processes can pickle it.)
    """
    return batch[0]


def describe_skips(skipped: Sequence[SkippedSample]) -> str:
    """'3 skipped: 1 too short, 2 unreadable' (reasons with a zero count left out)."""
    counts = {reason: sum(1 for s in skipped if s.reason == reason) for reason in SKIP_REASONS}
    parts = [f"{n} {reason.replace('_', ' ')}" for reason, n in counts.items() if n]
    return f"{len(skipped)} skipped" + (f": {', '.join(parts)}" if parts else "")
