"""The denoiser's contracts with its parts, in the open: each part's ``check_compatible`` receives the transformer's
config and the other parts (nothing else of the denoiser), a part without the declared members is refused naming
what it lacks, and the dense kernel the blocks call is the one the DiT resolves (per call, model, process)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_diffusers_dit

from diffsynth_cog.denoise.denoiser import Denoiser, DenoiserParts, WholeCall
from diffsynth_cog.denoise.step_cache import StepCache
from diffsynth_cog.loading.dit_loader import load_dit
from diffsynth_cog.models import attention as attn


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dit-contracts")
    make_diffusers_dit("cogvideox-5b", seed=5, num_layers=2).save_pretrained(folder)
    return load_dit(folder, dtype=torch.float32, device="cpu")


class RecordingSplit(WholeCall):
    name = "recording-split"

    def __init__(self) -> None:
        self.seen: list[DenoiserParts] = []

    def check_compatible(self, parts: DenoiserParts) -> None:
        self.seen.append(parts)


class RecordingCache(StepCache):
    """Records what each part check received and which attention the blocks were given."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.seen: list[DenoiserParts] = []
        self.attends: list[object] = []

    def check_compatible(self, parts: DenoiserParts) -> None:
        self.seen.append(parts)

    def run(self, dit, state, key, reduce):  # noqa: ANN001, ANN201
        self.attends.append(state.attend)
        return super().run(dit, state, key, reduce)


def test_every_part_is_checked_once_against_the_config_and_the_other_parts(dit):
    split, cache = RecordingSplit(), RecordingCache()
    Denoiser(dit, attention="sdpa", split=split, step_skip=cache)
    expected = DenoiserParts(dit.config, "sdpa", split, cache)
    assert split.seen == [expected] and cache.seen == [expected]


def test_parts_without_the_declared_members_are_refused_naming_what_they_lack(dit):
    class NoCheck:
        name = "no-check"

        def scatter(self, state):  # noqa: ANN001, ANN201
            return state

        def gather(self, patches, state):  # noqa: ANN001, ANN201
            return patches

        def all_reduce(self, values):  # noqa: ANN001, ANN201
            return values

    with pytest.raises(TypeError, match=r"split must be a TokenSplit; NoCheck lacks \['check_compatible'\]"):
        Denoiser(dit, split=NoCheck())
    with pytest.raises(
        TypeError,
        match=r"step_skip must be a StepSkipper; NoCheck lacks \['check_compatible', 'end_step', 'run', 'start'\]",
    ):
        Denoiser(dit, step_skip=NoCheck())

    class MaskWithoutCheck:
        name = "mask"

        def build(self, layout, device, kernel=None):  # noqa: ANN001, ANN201
            return lambda q, k, v: v

    with pytest.raises(TypeError, match=r"AttentionPart; MaskWithoutCheck lacks \['check_compatible'\]"):
        Denoiser(dit, attention=MaskWithoutCheck())


def test_the_blocks_get_the_kernel_the_dit_resolves_or_the_one_named(dit):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 7, 32, generator=g)
    try:
        dit.set_attention_backend("sdpa-cudnn")
        for attention, expected in ((None, "sdpa-cudnn"), ("sdpa", "sdpa")):
            cache = RecordingCache()
            denoiser = Denoiser(dit, attention=attention, step_skip=cache)
            denoiser.start(1)
            with torch.no_grad():
                denoiser(x, 500, context)
            assert cache.attends == [attn.DenseAttention(expected)]
            assert denoiser.parts()["attention"] == expected
        cache = RecordingCache()
        denoiser = Denoiser(dit, step_skip=cache)
        denoiser.start(1)
        with attn.attention_backend("sdpa"), torch.no_grad():  # a per-call choice reaches the blocks
            denoiser(x, 500, context)
        assert cache.attends == [attn.DenseAttention("sdpa")]
    finally:
        dit.set_attention_backend(None)
