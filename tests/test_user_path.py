"""The user path of generation: every input checked before anything expensive, no faked or lost output, one
message instead of a traceback, no silent surprise.

On a tiny CPU model folder (tests/tiny_models.py: its DiT is trained on 9 frames, where the real ones are
trained on 49, so ``--lora auto`` wants the long-video LoRA beyond 9 frames here).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from modelscope_emulator import closed_port_endpoint, isolate_modelscope
from safetensors.torch import save_file
from tiny_models import save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.cli.main import build_parser, main
from diffsynth_cog.errors import LoRAError
from diffsynth_cog.io.video import VideoWriteError, load_video, save_video

LORA_NAME = "ExVideo-CogVideoX-LoRA-129f-v1.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b"), "cogvideox-5b", seed=2)


def tiny_lora(path: Path, value: float | None = None) -> Path:
    """A DiffSynth-layout LoRA for the tiny DiT's first query projection (inner dim 32, rank 4)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    if value is not None:
        a, b = torch.full_like(a, value), torch.full_like(b, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"blocks.0.attn1.to_q.lora_A.default.weight": a, "blocks.0.attn1.to_q.lora_B.default.weight": b}, path)
    return path


def generate_args(folder: Path, tmp_path: Path, **options: str) -> list[str]:
    """``generate`` on the tiny folder (9 frames, 32x48, one step, CPU, offline); ``options`` replace values
    (``num_frames="17"`` is ``--num-frames 17``); a value None drops the option."""
    values = {
        "prompt": "a lighthouse",
        "model": str(folder),
        "lora": "none",
        "device": "cpu",
        "dtype": "fp32",
        "num_frames": "9",
        "height": "32",
        "width": "48",
        "steps": "1",
        "models_dir": str(tmp_path / "models"),
        "output": str(tmp_path / "out.mp4"),
    }
    values.update(options)
    argv = ["generate", "--no-download", "--no-progress"]
    for name, value in values.items():
        if value is not None:
            argv += ["--" + name.replace("_", "-"), value]
    return argv


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --------------------------------------------------------------------------------------------- checks first
def partial_folder(folder: Path, root: Path, leave_out: str) -> Path:
    """A model folder of links to ``folder``'s parts, without ``leave_out``."""
    root.mkdir()
    for part in folder.iterdir():
        if part.name != leave_out:
            (root / part.name).symlink_to(part)
    return root


def folder_with_config(folder: Path, root: Path, **changes: object) -> Path:
    """A copy of ``folder`` whose transformer/config.json has ``changes``."""
    import json

    shutil.copytree(folder, root)
    config = root / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return root


BAD_INPUTS = {
    # name: (options, what the message says)
    "gif output": (dict(output="{tmp}/out.gif"), "videos are written as H.264 in .mp4, .mkv, .mov files; got '.gif'"),
    "webm output": (dict(output="{tmp}/out.webm"), "got '.webm'"),
    "output is a folder": (dict(output="{tmp}/folder.mp4"), "is a folder; give the path of a file"),
    "a file in the output's path": (dict(output="{tmp}/plain.txt/out.mp4"), "plain.txt is a file, not a folder"),
    "53 frames": (dict(num_frames="53"), "--num-frames must be 8k+1"),
    "13 frames": (dict(num_frames="13"), "Nearest valid values: 9 or 17"),
    "height 40": (dict(height="40"), "height 40 (nearest valid: 32 or 48)"),
    "cfg NaN": (dict(cfg_scale="nan"), "--cfg-scale must be a number >= 0; got nan"),
    "cfg negative": (dict(cfg_scale="-1"), "--cfg-scale must be a number >= 0; got -1.0"),
    "no steps": (dict(steps="0"), "--steps must be an integer >= 1; got 0"),
    "fps 0": (dict(fps="0"), "--fps must be a number > 0"),
    "quality 11": (dict(quality="11"), "--quality must be a number >= 1 and <= 10"),
    "lora alpha NaN": (dict(lora_alpha="nan"), "--lora-alpha must be a number; got nan"),
    "strength NaN": (dict(input_video="{tmp}/v.mp4", denoising_strength="nan"), "--denoising-strength must be"),
    "lora file missing": (dict(lora="{tmp}/my_lora.safetensors"), "my_lora.safetensors: no such file"),
    "lora not a safetensors file": (dict(lora="{tmp}/plain.txt"), "plain.txt"),
    "model path typo": (dict(model="./modls/CogVideoX-5b"), "--model ./modls/CogVideoX-5b: no such folder"),
    "unknown preset": (dict(model="CogVideoX-9B"), "unknown model preset 'CogVideoX-9B'"),
    "model without vae": (dict(model="{tmp}/no-vae"), "no vae/ in the model folder"),
    "config field of the wrong type": (dict(model="{tmp}/bad-config"), "'num_layers' must be an integer, found '2'"),
    "input video missing": (dict(input_video="{tmp}/missing.mp4"), "video file not found"),
    "image for a text-to-video model": (dict(input_image="{tmp}/plain.txt"), "--input-image needs an image-to-video"),
    "device typo": (dict(device="gpu"), "--device 'gpu' is not a device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_one_message_before_any_model_loads(
    case: str, folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "plain.txt").write_text("not a video, not a LoRA")
    partial_folder(folder, tmp_path / "no-vae", "vae")
    folder_with_config(folder, tmp_path / "bad-config", num_layers="2")
    save_video(np.zeros((9, 32, 48, 3), np.uint8), tmp_path / "v.mp4")
    options, message = BAD_INPUTS[case]
    options = {k: v.format(tmp=tmp_path) for k, v in options.items()}
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(generate_args(folder, tmp_path, **options)) == 2
    assert len(errors(caplog)) == 1 and message in errors(caplog)[0], caplog.text
    assert "loaded cog_" not in caplog.text  # refused before any weight was read
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_api_refuses_frames_the_vae_cannot_honour_and_guidance_that_would_silently_be_off(folder: Path) -> None:
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    pipe = CogVideoPipeline.from_model_manager(manager, device="cpu")
    encoded = []
    pipe.encode_prompt = lambda prompt: encoded.append(prompt)  # type: ignore[method-assign]
    common = dict(prompt="x", height=32, width=48, num_frames=9, num_inference_steps=1, progress_bar=False)
    for changes, message in [
        (dict(num_frames=53), r"num_frames must be 8k\+1 .* Nearest valid values: 49 or 57"),
        (dict(num_frames=13), "Nearest valid values: 9 or 17"),
        (dict(num_frames=9.0), "must be an integer"),
        (dict(cfg_scale=math.nan), "cfg_scale must be a number >= 0; got nan"),
        (dict(cfg_scale=-2.0), "cfg_scale must be a number >= 0; got -2.0"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1"),
        (dict(denoising_strength=math.nan), "denoising_strength must be"),
        (dict(seed="7"), "seed must be an integer"),
        (dict(prompt=5), "prompt must be a string"),
        (dict(output_type="gif"), "output_type must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe(**{**common, **changes})
    assert encoded == []  # nothing was encoded for a call that cannot run


def test_decoded_frames_are_the_frames_asked_for(folder: Path) -> None:
    """Why 8k+1: the VAE decodes the latent frames after the first in pairs, so 13 frames would come out 16."""
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    decoder = manager.fetch_model("cog_vae_decoder")
    for frames in (9, 17):
        latents = torch.randn(1, 4, (frames - 1) // 4 + 1, 4, 6)
        assert decoder.decode(latents, tiled=False, progress=False).shape[2] == frames
    assert decoder.decode(torch.randn(1, 4, 4, 4, 6), tiled=False, progress=False).shape[2] == 16  # 13 asked


# --------------------------------------------------------------------------------------------- models and LoRAs
def test_lora_auto_with_a_local_folder_merges_the_long_video_lora_found_in_models_dir(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    tiny_lora(tmp_path / "models" / "lora" / LORA_NAME)
    assert main(generate_args(folder, tmp_path, lora="auto", num_frames="17")) == 0
    assert "--lora auto: ExVideo-CogVideoX-LoRA-129f-v1 (found in" in caplog.text
    assert "merged LoRA" in caplog.text and LORA_NAME in caplog.text
    assert len(load_video(tmp_path / "out.mp4")) == 17


def test_lora_auto_offline_without_the_lora_says_what_is_missing_and_how_to_go_on(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    assert main(generate_args(folder, tmp_path, lora="auto", num_frames="17")) == 2
    (message,) = errors(caplog)
    assert f"{LORA_NAME} -> {(tmp_path / 'models' / 'lora' / LORA_NAME).resolve()}" in message
    assert "pass --lora none to generate without it" in message
    assert "loaded cog_" not in caplog.text


def test_offline_message_lists_the_models_and_the_loras_missing_files_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_modelscope(monkeypatch, tmp_path / "home", closed_port_endpoint())
    for download in (False, True):
        caplog.clear()
        argv = generate_args(Path("unused"), tmp_path, model="CogVideoX-5B", lora="auto", num_frames="129")
        argv += ["--height", "480", "--width", "720"]
        if download:
            argv.remove("--no-download")
        assert main(argv) == 2
        (message,) = errors(caplog)
        models = tmp_path / "models"
        assert f"-> {(models / 'CogVideo' / 'CogVideoX-5b' / 'transformer' / 'config.json').resolve()}" in message
        assert f"{LORA_NAME} -> {(models / 'lora' / LORA_NAME).resolve()}" in message


def test_the_same_lora_file_merged_twice_is_refused_and_changes_nothing(folder: Path, tmp_path: Path) -> None:
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    lora = tiny_lora(tmp_path / "style.safetensors")
    weight = manager.fetch_model("cog_dit").blocks[0].attn1.to_q.weight
    manager.load_lora(lora, lora_alpha=0.5)
    once = weight.detach().clone()
    (tmp_path / "link.safetensors").symlink_to(lora)
    for again in (lora, tmp_path / "link.safetensors"):
        with pytest.raises(LoRAError, match=r"already merged into this model \(alpha 0.5\).*lora_alpha=1"):
            manager.load_lora(again, lora_alpha=0.5)
    assert torch.equal(weight, once) and len(manager.loras) == 1
    manager.clear_loras()
    manager.load_lora(lora, lora_alpha=0.5)  # after a clear it merges again
    assert torch.equal(weight, once)


def test_fp16_merge_that_overflows_is_rolled_back_with_an_error(folder: Path, tmp_path: Path) -> None:
    manager = ModelManager(torch_dtype=torch.float16, device="cpu", file_path_list=[folder])
    dit = manager.fetch_model("cog_dit")
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    lora = tiny_lora(tmp_path / "loud.safetensors", value=200.0)  # B @ A = 4 * 200 * 200 = 160000 > 65504
    with pytest.raises(LoRAError, match=r"inf or NaN in float16 .* rolled back; no weight was changed"):
        manager.load_lora(lora)
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())
    assert manager.loras == []


# --------------------------------------------------------------------------------------------- outputs
def test_existing_output_is_kept_unless_overwrite_and_then_replaced_only_by_a_complete_video(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    out = tmp_path / "out.mp4"
    out.write_bytes(b"an earlier video")
    assert main(generate_args(folder, tmp_path)) == 2
    assert "already exists; pass --overwrite" in errors(caplog)[0] and "loaded cog_" not in caplog.text
    assert out.read_bytes() == b"an earlier video"
    assert main(generate_args(folder, tmp_path) + ["--overwrite"]) == 0
    assert len(load_video(out)) == 9 and "replacing the file that was there" in caplog.text


def test_interrupted_generation_exits_130_with_a_message_and_leaves_the_old_file(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self, options, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CogVideoPipeline, "generate", interrupted)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"an earlier video")
    assert main(generate_args(folder, tmp_path) + ["--overwrite"]) == 130
    assert "interrupted" in errors(caplog)[0]
    assert out.read_bytes() == b"an earlier video" and sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


VIDEO = np.random.default_rng(0).integers(0, 255, (9, 32, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".gif", ".webm", ".avi", ""])
def test_save_video_refuses_containers_it_cannot_write_and_keeps_the_file(tmp_path: Path, suffix: str) -> None:
    target = tmp_path / f"video{suffix}"
    target.write_bytes(b"a good file")
    with pytest.raises(ValueError, match="videos are written as H.264 in .mp4, .mkv, .mov files"):
        save_video(VIDEO, target)
    assert target.read_bytes() == b"a good file" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("suffix", [".mkv", ".mov"])
def test_save_video_writes_the_other_h264_containers(tmp_path: Path, suffix: str) -> None:
    assert len(load_video(save_video(VIDEO, tmp_path / f"v{suffix}"))) == 9


def test_save_video_never_replaces_a_good_file_with_one_ffmpeg_got_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ffmpeg can exit 0 having written a truncated or empty file: the file is read back before it counts."""
    import imageio_ffmpeg

    good = save_video(VIDEO, tmp_path / "video.mp4")
    content = good.read_bytes()
    real = imageio_ffmpeg.write_frames

    def truncating(path, *args, **kwargs):
        """imageio-ffmpeg's writer, whose file is cut to half once ffmpeg has finished (as a full disk would)."""
        writer = real(path, *args, **kwargs)
        writer.send(None)
        try:
            while True:
                frame = yield
                if frame is not None:
                    writer.send(frame)
        finally:
            writer.close()
            Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", truncating)
    with pytest.raises(VideoWriteError, match=r"did not write .*video\.mp4 completely .*existing file was left"):
        save_video(VIDEO, good)
    assert good.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]


# --------------------------------------------------------------------------------------------- device, logs
def test_default_device_without_a_gpu_is_the_cpu_and_the_user_is_told(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(generate_args(folder, tmp_path, device=None)) == 0
    assert "no CUDA GPU found" in caplog.text and "running on the CPU" in caplog.text
    caplog.clear()
    assert main(generate_args(folder, tmp_path, device="cuda", output=str(tmp_path / "b.mp4"))) == 2
    assert "--device cuda: this machine has no CUDA GPU" in errors(caplog)[0] and "loaded cog_" not in caplog.text


def test_a_ten_thousand_character_prompt_is_shortened_in_the_logs(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    prompt = " ".join(f"word{i}" for i in range(1700))[:10_000]
    assert main(generate_args(folder, tmp_path, prompt=prompt)) == 0
    assert "was cut off" in caplog.text
    assert max(len(r.getMessage()) for r in caplog.records) < 800


# --------------------------------------------------------------------------------------------- help
def all_parsers():
    parser = build_parser()
    yield "diffsynth-cog", parser
    for action in parser._subparsers._group_actions:  # the subcommands
        yield from action.choices.items()


@pytest.mark.parametrize("name", [name for name, _ in all_parsers()])
def test_every_option_says_what_it_does_and_its_default(name: str) -> None:
    parser = dict(all_parsers())[name]
    text = " ".join(parser.format_help().split())  # argparse wraps lines anywhere
    for action in parser._actions:
        if action.dest in ("help", "command"):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        flag = action.default in (False, None, argparse.SUPPRESS) and action.nargs == 0  # a flag, --version
        if action.option_strings and not flag and not action.required:
            shown = action.help if action.default is None else str(action.default)
            assert "default" in action.help.lower() or f"(default: {shown})" in text, (
                f"{name} {action.option_strings}: the help does not say the default ({action.default!r})"
            )


# --------------------------------------------------------------------------------------------- other commands
def test_training_commands_without_the_training_extras_give_the_install_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "lightning" or m.startswith(("lightning.", "diffsynth_cog.training."))]:
        if name != "diffsynth_cog.cli.training":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # "import lightning" now fails as if not installed
    job = tmp_path / "job.json"
    job.write_text('{"model": "m", "cache_dir": "c", "output_dir": "o"}')
    for argv in (["train", "--config", str(job)], ["export-lora", "--checkpoint", "c", "--output", "x.safetensors"]):
        caplog.clear()
        monkeypatch.chdir(tmp_path)
        assert main(argv) == 2
        assert (
            "needs the 'train' extras" in errors(caplog)[0]
            and "pip install 'diffsynth-cog[train]'" in errors(caplog)[0]
        )


def test_upload_lora_offline_prints_one_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib3

    endpoint = closed_port_endpoint()
    isolate_modelscope(monkeypatch, tmp_path / "home", endpoint)
    monkeypatch.setattr(urllib3.util.retry.Retry, "get_backoff_time", lambda self: 0)  # retried, without the waits
    lora = tiny_lora(tmp_path / "my.safetensors")
    assert main(["upload-lora", str(lora), "--repo-id", "me/lora", "--token", "t", "--endpoint", endpoint]) == 2
    (message,) = errors(caplog)
    assert f"cannot reach {endpoint} to upload me/lora" in message and "Traceback" not in caplog.text


def test_download_refuses_a_models_dir_that_is_a_file_before_any_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffsynth_cog.hub.downloads as downloads

    monkeypatch.setattr(downloads, "_download_one", lambda *a, **k: pytest.fail("a download was started"))
    (tmp_path / "models").write_text("not a folder")
    assert main(["download", "CogVideoX-2B", "--models-dir", str(tmp_path / "models")]) == 2
    assert "is a file, not a folder" in errors(caplog)[0]


@pytest.mark.parametrize(
    "options,message",
    [
        (["--model", "./modls/CogVideoX-5b"], "no such folder"),
        (["--output-dir", "{tmp}/plain.txt"], "plain.txt is a file, not a folder"),
        (["--height", "500"], "height 500 (nearest valid: 496 or 512)"),
        (["--device", "gpu"], "is not a device"),
    ],
)
def test_webui_refuses_bad_setup_before_serving(
    options: list[str],
    message: str,
    folder: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import diffsynth_cog.cli.webui as webui

    monkeypatch.setattr(webui, "launch", lambda *a, **k: pytest.fail("the page was served"))
    (tmp_path / "plain.txt").write_text("x")
    argv = ["webui", "--model", str(folder), "--output-dir", str(tmp_path / "videos"), "--device", "cpu"]
    argv += [o.format(tmp=tmp_path) for o in options]
    assert main(argv) == 2
    assert message in errors(caplog)[0]
