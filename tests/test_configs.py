"""configs.py as the one home of family rules and input checks: every entry point gives the same answer."""

from __future__ import annotations

import pytest

from diffsynth_cog.configs import (
    DIT_PRESETS,
    VAE_PRESETS,
    check_num_frames,
    check_size,
    dit_family,
    vae_scaling_factor,
)
from diffsynth_cog.schedulers import scheduler_preset


@pytest.mark.parametrize("frames", [1, 9, 49, 57, 129])
def test_valid_frame_counts_pass(frames):
    check_num_frames(frames)


@pytest.mark.parametrize(
    "frames,nearest",
    [(48, "41 or 49"), (50, "49 or 57"), (53, "49 or 57"), (2, "1 or 9"), (0, ": 1$"), (-7, ": 1$")],
)
def test_invalid_frame_count_names_value_rule_and_nearest_valid_values(frames, nearest):
    with pytest.raises(ValueError, match=rf"num_frames must be 8k\+1 .*got {frames}\. Nearest valid values") as info:
        check_num_frames(frames)
    assert info.match(nearest)


def test_frame_rule_follows_the_compression_and_the_callers_name():
    check_num_frames(17, 8)
    with pytest.raises(ValueError, match=r"clip_frames must be 8k\+1 .*got 13\. Nearest valid values: 9 or 17"):
        check_num_frames(13, 8, name="clip_frames")
    with pytest.raises(ValueError, match="must be an integer"):
        check_num_frames(49.0)  # type: ignore[arg-type]


def test_size_check_names_each_bad_side_with_its_nearest_multiples():
    check_size(480, 720)
    with pytest.raises(ValueError, match=r"multiples of 16 .*got 40x48: height 40 \(nearest valid: 32 or 48\)$"):
        check_size(40, 48)
    with pytest.raises(ValueError, match=r"height 0 \(nearest valid: 16\); width 33 \(nearest valid: 32 or 48\)"):
        check_size(0, 33)


def test_every_entry_point_uses_the_same_frame_rule(tmp_path):
    """The pipeline, the clip dataset and the training config all reject 50 frames with the one message."""
    from diffsynth_cog.training.config import TrainConfig, TrainConfigError
    from diffsynth_cog.training.data import VideoClipDataset

    with pytest.raises(ValueError, match="Nearest valid values: 49 or 57"):
        VideoClipDataset([], num_frames=50)
    common = dict(model=str(tmp_path), cache_dir=str(tmp_path), output_dir=str(tmp_path))
    with pytest.raises(TrainConfigError, match=r"validation_num_frames: validation_num_frames must be 8k\+1.*49 or 57"):
        TrainConfig(**common, validation_num_frames=50)
    with pytest.raises(TrainConfigError, match=r"validation_width: .*got 100 \(nearest valid: 96 or 112\)"):
        TrainConfig(**common, validation_width=100)


def test_family_rule_no_rope_means_2b():
    assert {name: dit_family(config) for name, config in DIT_PRESETS.items()} == {name: name for name in DIT_PRESETS}


@pytest.mark.parametrize("family,shift,scale", [("cogvideox-2b", 3.0, 1.15258426), ("cogvideox-5b", 1.0, 0.7)])
def test_family_decides_scheduler_shift_and_vae_scale(family, shift, scale):
    assert scheduler_preset(dit_family(DIT_PRESETS[family])).snr_shift_scale == shift
    assert vae_scaling_factor(family) == scale == VAE_PRESETS[family].scaling_factor
    assert scheduler_preset(dit_family(DIT_PRESETS["cogvideox-5b-i2v"])).snr_shift_scale == 1.0
    with pytest.raises(ValueError, match="unknown model family"):
        vae_scaling_factor("cogvideox-1.5")
