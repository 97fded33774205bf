"""A new sparse mask, sampler or step-skipping method is one registration beside its class: the spec parser, the
factories, their refusals and the training config take it from the registry with no other edit."""

from __future__ import annotations

import pytest
import torch

from diffsynth_cog.denoise import MASKS, STEP_SKIPPERS, register_mask, register_step_skipper
from diffsynth_cog.denoise.masks import TemporalWindowAttention, parse_attention
from diffsynth_cog.denoise.step_cache import StepCache
from diffsynth_cog.denoise.teacache import make_step_skipper
from diffsynth_cog.schedulers import SAMPLERS, DDIMSampler, make_sampler, register_sampler, scheduler_preset
from diffsynth_cog.training.config import TrainConfig, TrainConfigError


@pytest.fixture
def forget_registrations():
    """Registrations made by a test are removed afterwards (the registries are process-wide)."""
    before = (dict(MASKS), dict(STEP_SKIPPERS), dict(SAMPLERS))
    yield
    for registry, saved in zip((MASKS, STEP_SKIPPERS, SAMPLERS), before, strict=True):
        registry.clear()
        registry.update(saved)


def test_builtin_parts_are_registered_by_importing_the_package():
    assert list(MASKS) == ["window", "radial"]
    assert set(STEP_SKIPPERS) == {"teacache", "first-block"}
    assert list(SAMPLERS) == ["ddim", "dpm", "diffsynth"]


def test_a_registered_mask_is_parsed_listed_and_accepted_for_training(forget_registrations):
    @register_mask("past", "'past:W' (W latent frames back only)")
    def _past(args: list[str], granularity: str) -> TemporalWindowAttention | None:
        return TemporalWindowAttention(int(args[0]), sink=False, granularity=granularity) if len(args) == 1 else None

    part = parse_attention("past:3:token")
    assert isinstance(part, TemporalWindowAttention) and (part.window, part.granularity) == (3, "token")
    with pytest.raises(ValueError, match=r"'radial' or 'radial:DECAY', 'past:W' \(W latent frames back only\)"):
        parse_attention("past:1:2")
    assert TrainConfig(model="m", cache_dir="c", output_dir="o", attention="past:2").attention == "past:2"
    with pytest.raises(TrainConfigError, match="attention: unknown attention 'futur:2'.*'past:W'"):
        TrainConfig(model="m", cache_dir="c", output_dir="o", attention="futur:2")


def test_a_mask_cannot_take_a_kernel_or_another_masks_name(forget_registrations):
    for taken in ("window", "sdpa"):
        with pytest.raises(ValueError, match=f"attention name '{taken}' is taken"):
            register_mask(taken, "")(lambda args, granularity: None)


def test_a_registered_step_skipper_is_made_from_its_name(forget_registrations):
    @register_step_skipper("every-other")
    class EveryOther(StepCache):
        name = "every-other"

    made = make_step_skipper(0.3, "every-other")
    assert type(made) is EveryOther and made.threshold == 0.3
    with pytest.raises(ValueError, match="valid: 'auto', first-block, teacache, every-other"):
        make_step_skipper(0.3, "every-third")
    with pytest.raises(ValueError, match="'auto' is taken"):
        register_step_skipper("auto")(EveryOther)


def test_a_registered_sampler_is_made_by_its_kind(forget_registrations):
    @register_sampler
    class HalfStepDDIM(DDIMSampler):
        kind = "half-ddim"

    sampler = make_sampler("half-ddim", scheduler_preset("cogvideox-5b"), 4)
    assert type(sampler) is HalfStepDDIM and len(sampler) == 4
    assert torch.equal(sampler.timesteps, make_sampler("ddim", scheduler_preset("cogvideox-5b"), 4).timesteps)
    with pytest.raises(ValueError, match=r"choose one of \('ddim', 'dpm', 'diffsynth', 'half-ddim'\)"):
        make_sampler("euler", scheduler_preset("cogvideox-5b"), 4)
    with pytest.raises(ValueError, match="needs a kind of its own"):
        register_sampler(HalfStepDDIM)
