"""Post-training data: dataset indexes, the encoder "prepare" step and the latent cache.

Tiny encoders (a 2-layer T5 with d_model 32, a 4-level VAE with 8 channels and 4 latent channels,
both randomised) saved in the CogVideoX folder layout and loaded through ``load_encoders``;
synthetic H.264 clips of 9 frames written with ``save_video``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import randomize_
from tiny_text import make_tiny_text_folder

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.io.video import load_video, save_video, video_to_tensor
from diffsynth_cog.training.cache import (
    CacheError,
    CacheInfo,
    LatentCacheDataset,
    manifest_name,
    read_manifests,
    record_name,
)
from diffsynth_cog.training.data import (
    DatasetIndexError,
    SkippedSample,
    VideoClipDataset,
    VideoSample,
    load_dataset_index,
)
from diffsynth_cog.training.prepare import Encoders, load_encoders, posterior_generator, prepare_cache

NUM_FRAMES, HEIGHT, WIDTH = 9, 32, 48
TEXT_LENGTH = 20  # max_text_seq_length of the tiny model folder's transformer config
CLIPS = [  # (file, frames in the file, prompt); index = position
    ("a.mp4", 9, "a cat playing piano"),
    ("short.mp4", 5, "too short to use"),
    ("b.mp4", 12, "a dog running in the garden"),
    ("corrupt.mp4", None, "random bytes, not a video"),
    ("c.mp4", 9, "the sunset over a river"),
    ("d.mp4", 10, "a panda sitting in the forest"),
]
GOOD = [0, 2, 4, 5]
BAD = {1: "too_short", 3: "unreadable"}


def synthetic_clip(num_frames: int, seed: int, height: int = 40, width: int = 64) -> np.ndarray:
    """[F, H, W, 3] uint8: smooth seeded colour blobs drifting right (larger than the 32x48 target,
    with another aspect ratio, so reading resizes and crops)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(5, 8, 3))
    base = np.kron(coarse, np.ones((height // 5, width // 8, 1)))  # [H, W, 3] blocks
    return np.stack([np.roll(base, 2 * i, axis=1) for i in range(num_frames)]).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    for seed, (name, frames, _) in enumerate(CLIPS):
        if frames is None:
            (root / name).write_bytes(np.random.default_rng(seed).bytes(2048))
        else:
            save_video(synthetic_clip(frames, seed), root / name, fps=8, quality=8)
    records = [{"file_name": name, "text": prompt} for name, _, prompt in CLIPS]
    (root / "metadata.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import AutoencoderKLCogVideoX

    root = make_tiny_text_folder(tmp_path_factory.mktemp("model"))
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        # Tiles of half the sample size (32x48) cover the clips, so tiled=True runs in one tile.
        sample_height=64,
        sample_width=96,
    )
    randomize_(vae, seed=1)
    vae.save_pretrained(root / "vae")
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(
        json.dumps({"max_text_seq_length": TEXT_LENGTH, "use_rotary_positional_embeddings": True})
    )
    return root


@pytest.fixture(scope="module")
def encoders(model_dir: Path) -> Encoders:
    return load_encoders(model_dir, dtype=torch.float32)


class CountingEncoder:
    """Wraps ``vae_encoder.encode`` to count calls; raises on call number ``fail_on`` (1-based)."""

    def __init__(self, encoder: torch.nn.Module, fail_on: int | None = None) -> None:
        self.fail_on, self.calls = fail_on, 0
        self.original = encoder.encode

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated crash (e.g. out of memory) in the VAE")
        return self.original(*args, **kwargs)


def run_prepare(encoders: Encoders, source, cache_dir: Path, **kwargs) -> object:
    options = dict(num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, dtype=torch.float32, progress=False)
    options.update(kwargs)
    return prepare_cache(
        source, cache_dir, encoders.text_encoder, encoders.vae_encoder, model_paths=encoders.paths, **options
    )


def remove_manifest_line(cache_dir: Path, index: int, name: str = "manifest.jsonl") -> None:
    path = cache_dir / name
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["index"] != index]
    path.write_text("".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------------------------- index
def test_index_loads_json_csv_and_txt_pair_with_paths_relative_to_the_dataset(tmp_path: Path) -> None:
    json_dir, csv_dir, txt_dir = tmp_path / "j", tmp_path / "c", tmp_path / "t"
    for d in (json_dir, csv_dir, txt_dir):
        d.mkdir()
    (json_dir / "metadata.json").write_text(
        json.dumps([{"file_name": "v0.mp4", "text": "first"}, {"video": "sub/v1.mp4", "prompt": "second"}])
    )
    # A byte-order mark and a quoted comma, as spreadsheet exports write them.
    (csv_dir / "metadata.csv").write_text('\ufeffvideo,prompt\nv0.mp4,"first, with a comma"\nv1.mp4,second\n')
    (txt_dir / "prompts.txt").write_text("first\nsecond\n\n")
    (txt_dir / "videos.txt").write_text("v0.mp4\nv1.mp4\n")

    from_json = load_dataset_index(json_dir)
    assert from_json == [
        VideoSample(json_dir / "v0.mp4", "first", 0),
        VideoSample(json_dir / "sub" / "v1.mp4", "second", 1),
    ]
    from_csv = load_dataset_index(csv_dir / "metadata.csv")  # the index file itself works too
    assert [(s.path, s.prompt, s.index) for s in from_csv] == [
        (csv_dir / "v0.mp4", "first, with a comma", 0),
        (csv_dir / "v1.mp4", "second", 1),
    ]
    from_txt = load_dataset_index(txt_dir)
    assert [(s.path, s.prompt, s.index) for s in from_txt] == [
        (txt_dir / "v0.mp4", "first", 0),
        (txt_dir / "v1.mp4", "second", 1),
    ]


def test_index_finds_clips_in_diffsynth_train_subfolder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "v0.mp4").write_bytes(b"")
    (tmp_path / "metadata.csv").write_text("file_name,text\nv0.mp4,hello\n")
    assert load_dataset_index(tmp_path)[0].path == tmp_path / "train" / "v0.mp4"


def test_index_errors_name_the_files_and_counts(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\n")
    with pytest.raises(DatasetIndexError, match=r"prompts\.txt has 3 prompts but .*videos\.txt has 2 videos"):
        load_dataset_index(tmp_path)

    (tmp_path / "videos.txt").unlink()
    with pytest.raises(DatasetIndexError, match="has prompts.txt but not videos.txt"):
        load_dataset_index(tmp_path)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.csv").write_text("clip,caption\na.mp4,x\n")
    with pytest.raises(DatasetIndexError, match=r"metadata\.csv: no video path column .*columns found: clip, caption"):
        load_dataset_index(bad)
    (bad / "metadata.json").write_text(json.dumps([{"file_name": "a.mp4"}]))  # its first record: "record 1"
    with pytest.raises(DatasetIndexError, match=r"metadata\.json: record 1: no prompt"):
        load_dataset_index(bad)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetIndexError, match="no dataset index found"):
        load_dataset_index(tmp_path / "empty")


# --------------------------------------------------------------------------------------------- clips
def test_clip_dataset_returns_resized_clips_and_reports_bad_ones(dataset_dir: Path) -> None:
    samples = load_dataset_index(dataset_dir)
    dataset = VideoClipDataset(samples, num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, on_error="report")
    item = dataset[2]
    assert item["video"].shape == (3, NUM_FRAMES, HEIGHT, WIDTH)
    assert item["video"].dtype == torch.float32
    assert -1.0 <= item["video"].min() and item["video"].max() <= 1.0
    assert (item["prompt"], item["index"]) == (CLIPS[2][2], 2)
    for index, reason in BAD.items():
        skipped = dataset[index]
        assert isinstance(skipped, SkippedSample)
        assert (skipped.index, skipped.reason) == (index, reason)
        assert CLIPS[index][0] in skipped.message
    missing = VideoClipDataset([VideoSample(dataset_dir / "nope.mp4", "x", 7)], NUM_FRAMES, on_error="report")[0]
    assert isinstance(missing, SkippedSample) and missing.reason == "missing"

    with pytest.raises(ValueError, match=r"8k\+1"):
        VideoClipDataset(samples, num_frames=8)


# --------------------------------------------------------------------------------------------- prepare
def test_prepare_skips_bad_clips_and_caches_what_the_encoders_give(
    dataset_dir: Path, encoders: Encoders, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="diffsynth_cog.training"):
        summary = run_prepare(encoders, dataset_dir, cache)
    assert summary.written == len(GOOD) and summary.skipped_existing == 0
    assert sorted((s.index, s.reason) for s in summary.skipped_bad) == sorted(BAD.items())
    assert summary.skipped_by_reason == {"too_short": 1, "unreadable": 1, "missing": 0}
    assert "2 skipped: 1 too short, 1 unreadable" in caplog.text
    assert "short.mp4" in caplog.text and "corrupt.mp4" in caplog.text

    data = LatentCacheDataset(cache)
    assert len(data) == len(GOOD) and data.indices == GOOD
    info = data.info
    scale = encoders.vae_encoder.config.scaling_factor
    assert info.latent_shape == (4, 3, HEIGHT // 8, WIDTH // 8)
    assert info.prompt_emb_shape == (TEXT_LENGTH, 32)
    assert (info.scaling_factor, info.posterior, info.dtype) == (scale, "mean", "float32")
    assert Path(info.model_paths["vae"]).name == "vae" and Path(info.model_paths["text_encoder"]).is_dir()

    for position, index in enumerate(GOOD):
        item = data[position]
        assert item["index"] == index
        name, _, prompt = CLIPS[index]
        video = video_to_tensor(load_video(dataset_dir / name, HEIGHT, WIDTH, NUM_FRAMES))[None]
        expected_latents = encoders.vae_encoder.encode(video, tiled=True)[0] * scale
        expected_emb = encoders.text_encoder.encode(prompt)[0]
        # Same fp32 ops on the same inputs in the same order, stored in fp32: bitwise equal.
        assert torch.equal(item["latents"], expected_latents)
        assert torch.equal(item["prompt_emb"], expected_emb)
        assert expected_latents.std() > 0.1  # a real, non-degenerate encoding


def test_bf16_storage_and_seeded_posterior_draw(dataset_dir: Path, encoders: Encoders, tmp_path: Path) -> None:
    sample = load_dataset_index(dataset_dir)[4]
    run_prepare(encoders, [sample], tmp_path / "c", dtype=torch.bfloat16, sample_posterior=True, seed=3)
    data = LatentCacheDataset(tmp_path / "c")
    assert data.info.posterior == "sample" and data.info.seed == 3
    item = data[0]
    assert item["latents"].dtype == torch.bfloat16 and item["prompt_emb"].dtype == torch.bfloat16
    video = video_to_tensor(load_video(sample.path, HEIGHT, WIDTH, NUM_FRAMES))[None]
    enc = encoders.vae_encoder
    draw = (
        enc.encode(video, tiled=True, sample=True, generator=posterior_generator(3, 4))[0] * enc.config.scaling_factor
    )
    mean = enc.encode(video, tiled=True)[0] * enc.config.scaling_factor
    # bf16 keeps 8 mantissa bits: relative rounding error <= 2^-8 per element, ~0.4% in norm at most.
    err = (item["latents"].float() - draw).norm() / draw.norm()
    assert err < 4e-3
    assert (draw - mean).norm() / mean.norm() > 1e-2  # the draw really differs from the mean


def test_interrupted_prepare_resumes_without_reencoding_finished_records(
    dataset_dir: Path, encoders: Encoders, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    crashing = CountingEncoder(encoders.vae_encoder, fail_on=3)
    monkeypatch.setattr(encoders.vae_encoder, "encode", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_prepare(encoders, dataset_dir, cache)
    assert sorted(read_manifests(cache)) == GOOD[:2]

    counting = CountingEncoder(encoders.vae_encoder)
    counting.original = crashing.original
    monkeypatch.setattr(encoders.vae_encoder, "encode", counting)
    before = {i: (cache / record_name(i)).stat().st_mtime_ns for i in GOOD[:2]}
    summary = run_prepare(encoders, dataset_dir, cache)
    assert counting.calls == len(GOOD) - 2 and summary.written == len(GOOD) - 2
    assert summary.skipped_existing == 2 and len(summary.skipped_bad) == len(BAD)  # bad clips are re-checked
    assert {i: (cache / record_name(i)).stat().st_mtime_ns for i in GOOD[:2]} == before

    # A finished run re-run: nothing to encode.
    counting.calls = 0
    assert run_prepare(encoders, dataset_dir, cache).written == 0 and counting.calls == 0

    # Record file and manifest line deleted -> redone; file kept but its line lost (a crash between
    # the rename and the append) -> redone too, since only a manifest line marks a record finished.
    (cache / record_name(GOOD[1])).unlink()
    remove_manifest_line(cache, GOOD[1])
    remove_manifest_line(cache, GOOD[3])
    summary = run_prepare(encoders, dataset_dir, cache)
    assert counting.calls == 2 and summary.written == 2
    assert LatentCacheDataset(cache).indices == GOOD


def test_incomplete_manifest_line_is_dropped_and_its_record_redone(
    dataset_dir: Path, encoders: Encoders, tmp_path: Path
) -> None:
    samples = [s for s in load_dataset_index(dataset_dir) if s.index in GOOD[:2]]
    cache = tmp_path / "cache"
    run_prepare(encoders, samples, cache)
    manifest = cache / "manifest.jsonl"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) - 10])  # the second line cut mid-way, as by a kill during the append
    assert sorted(read_manifests(cache)) == [GOOD[0]]
    summary = run_prepare(encoders, samples, cache)
    assert summary.written == 1 and summary.skipped_existing == 1
    assert LatentCacheDataset(cache).indices == GOOD[:2]


def test_two_ranks_write_every_record_once_and_the_reader_merges_them(
    dataset_dir: Path, encoders: Encoders, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    rank0 = run_prepare(encoders, dataset_dir, cache, rank=0, world_size=2)
    # Rank 1 decodes in a worker process: skipped clips must come through the DataLoader too.
    rank1 = run_prepare(encoders, dataset_dir, cache, rank=1, world_size=2, num_workers=1)
    assert not (cache / "manifest.jsonl").exists()
    per_rank = [set(read_manifests_of(cache / manifest_name(r, 2))) for r in (0, 1)]
    assert per_rank[0] == {i for i in GOOD if i % 2 == 0} and per_rank[1] == {i for i in GOOD if i % 2 == 1}
    assert rank0.written + rank1.written == len(GOOD)
    assert sorted(s.index for s in rank0.skipped_bad + rank1.skipped_bad) == sorted(BAD)
    assert rank0.other_ranks == 3 and rank1.other_ranks == 3
    assert LatentCacheDataset(cache).indices == GOOD

    # Resuming with another world size sees every rank's records as done.
    assert run_prepare(encoders, dataset_dir, cache).written == 0


def read_manifests_of(path: Path) -> list[int]:
    return [json.loads(line)["index"] for line in path.read_text().splitlines()]


def test_prepare_refuses_a_cache_made_with_other_settings(
    dataset_dir: Path, encoders: Encoders, tmp_path: Path
) -> None:
    sample = load_dataset_index(dataset_dir)[0]
    run_prepare(encoders, [sample], tmp_path / "c")
    with pytest.raises(CacheError, match=r"num_frames: 9 vs 17"):
        run_prepare(encoders, [sample], tmp_path / "c", num_frames=17)
    with pytest.raises(ValueError, match=r"8k\+1"):
        run_prepare(encoders, [sample], tmp_path / "d", num_frames=8)


# --------------------------------------------------------------------------------------------- cache
def write_fake_cache(cache: Path, shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]) -> CacheInfo:
    """A cache written by hand: cache_info for [4, 3, 4, 6] / [20, 32] fp32, records with the given shapes."""
    from diffsynth_cog.io.atomic import write_json_atomic
    from diffsynth_cog.training.cache import CacheRecord
    from diffsynth_cog.training.prepare import write_record

    cache.mkdir()
    info = CacheInfo(
        latent_shape=(4, 3, 4, 6),
        prompt_emb_shape=(TEXT_LENGTH, 32),
        dtype="float32",
        scaling_factor=0.7,
        num_frames=9,
        height=32,
        width=48,
        frame_interval=1,
        temporal_compression_ratio=4,
        spatial_compression=8,
    )
    write_json_atomic(cache / "cache_info.json", info.to_dict())
    with (cache / "manifest.jsonl").open("w") as manifest:
        for index, (lat, emb) in shapes.items():
            tensors = {"latents": torch.randn(lat), "prompt_emb": torch.randn(emb)}
            size = write_record(cache / record_name(index), tensors, {"prompt": "p"})
            manifest.write(CacheRecord(index, record_name(index), "v.mp4", "p", size).to_json() + "\n")
    return info


def test_cache_reader_validates_every_record_and_names_the_bad_file(tmp_path: Path) -> None:
    good = ((4, 3, 4, 6), (TEXT_LENGTH, 32))
    info = write_fake_cache(tmp_path / "ok", {5: good, 1: good})
    data = LatentCacheDataset(tmp_path / "ok")
    assert data.indices == [1, 5]  # ordered by dataset index, whatever the manifest order
    assert data[1]["latents"].shape == info.latent_shape

    write_fake_cache(tmp_path / "shape", {0: good, 1: ((4, 5, 4, 6), (TEXT_LENGTH, 32))})
    with pytest.raises(CacheError, match=r"00000001\.safetensors: 'latents' is F32 \[4, 5, 4, 6\].*\[4, 3, 4, 6\]"):
        LatentCacheDataset(tmp_path / "shape")

    write_fake_cache(tmp_path / "size", {0: good})
    with (tmp_path / "size" / record_name(0)).open("ab") as handle:
        handle.write(b"junk")
    with pytest.raises(CacheError, match=r"00000000\.safetensors: \d+ bytes, but the manifest recorded"):
        LatentCacheDataset(tmp_path / "size")

    write_fake_cache(tmp_path / "gone", {0: good})
    (tmp_path / "gone" / record_name(0)).unlink()
    with pytest.raises(CacheError, match=r"00000000\.safetensors: listed in the manifest .* but missing"):
        LatentCacheDataset(tmp_path / "gone")

    write_fake_cache(tmp_path / "keys", {0: good})
    record = tmp_path / "keys" / record_name(0)
    save_file({"latents": torch.zeros(4, 3, 4, 6)}, str(record))
    manifest = tmp_path / "keys" / "manifest.jsonl"
    entry = json.loads(manifest.read_text())
    entry["bytes"] = record.stat().st_size
    manifest.write_text(json.dumps(entry) + "\n")
    with pytest.raises(CacheError, match=r"00000000\.safetensors: record lacks \['prompt_emb'\]"):
        LatentCacheDataset(tmp_path / "keys")

    with pytest.raises(CacheError, match="no cache_info.json"):
        LatentCacheDataset(tmp_path / "nothing")


def test_cache_info_checks_the_dit_config(tmp_path: Path) -> None:
    info = write_fake_cache(tmp_path / "c", {})
    fits = DiTConfig(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_embed_dim=32,
        max_text_seq_length=TEXT_LENGTH, num_layers=1,
    )  # fmt: skip
    info.check_dit(fits)
    import dataclasses

    with pytest.raises(CacheError, match=r"prompt_emb width 32, DiT text_embed_dim 64"):
        info.check_dit(dataclasses.replace(fits, text_embed_dim=64))
    with pytest.raises(CacheError, match="image-to-video"):
        info.check_dit(dataclasses.replace(fits, in_channels=8))


def test_rank_comes_from_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffsynth_cog.training.prepare import distributed_rank

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_rank() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_rank() == (3, 4, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=3, WORLD_SIZE=2"):
        distributed_rank()
