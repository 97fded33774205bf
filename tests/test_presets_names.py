"""Preset names as users type them: any case, the family names the logs print, the repository names; and a
local copy is complete without the files the loader never reads (model_index.json)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_downloads import fake_cogvideox_repo

from diffsynth_cog.cli.checks import choose_model
from diffsynth_cog.hub.downloads import check_local, local_status
from diffsynth_cog.hub.presets import PRESETS, ModelPreset, UnknownPresetError, get_preset


@pytest.mark.parametrize(
    "typed,preset",
    [
        ("cogvideox-5b", "CogVideoX-5B"),  # the family name every log line prints
        ("COGVIDEOX-2B", "CogVideoX-2B"),
        ("cogvideox-5b-i2v", "CogVideoX-5B-I2V"),
        ("CogVideoX-5b", "CogVideoX-5B"),  # the repository's (and the download folder's) spelling
        ("ZhipuAI/CogVideoX-5b-I2V", "CogVideoX-5B-I2V"),  # the ModelScope repository
        ("exvideo-cogvideox-lora-129f-v1", "ExVideo-CogVideoX-LoRA-129f-v1"),
    ],
)
def test_preset_names_are_found_whatever_their_case_or_spelling(typed: str, preset: str) -> None:
    assert get_preset(typed) is PRESETS[preset]


def test_an_unknown_name_lists_the_valid_ones_and_says_case_does_not_matter() -> None:
    with pytest.raises(UnknownPresetError) as error:
        get_preset("cogvideox-7b")
    assert "CogVideoX-5B" in str(error.value) and "any case" in str(error.value)


def test_two_presets_that_differ_only_in_case_are_refused_as_ambiguous() -> None:
    registry = {
        name: ModelPreset(name=name, model_id=f"me/{name}", subfolder=name, files=("a.safetensors",))
        for name in ("lora-a", "LoRA-A")
    }
    assert get_preset("LoRA-A", registry).name == "LoRA-A"  # the exact name wins
    with pytest.raises(UnknownPresetError, match="ambiguous"):
        get_preset("lora-A", registry)


def test_generate_accepts_the_family_name_as_model() -> None:
    choice = choose_model("cogvideox-5b")
    assert choice.family == "cogvideox-5b" and choice.local is None
    assert get_preset(choice.preset) is PRESETS["CogVideoX-5B"]


def test_a_local_copy_without_model_index_json_is_complete(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "CogVideo" / "CogVideoX-2b"
    for repo_path, data in fake_cogvideox_repo().items():
        if repo_path != "model_index.json":
            (folder / repo_path).parent.mkdir(parents=True, exist_ok=True)
            (folder / repo_path).write_bytes(data)
    assert check_local("cogvideox-2b", tmp_path / "models") == [folder]
    assert local_status(PRESETS["CogVideoX-2B"], tmp_path / "models").state == "present"  # complete, copied by hand
