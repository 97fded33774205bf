"""One options value (``pipeline.options.GenerationOptions``): every field reachable from the pipeline's keywords,
from the command line (or marked Python-only with a reason), documented once, and fingerprinted whole."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

from diffsynth_cog.cli.main import build_parser
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.parallel.call_check import fingerprint
from diffsynth_cog.pipeline.cog_video import CogVideoPipeline
from diffsynth_cog.pipeline.options import (
    ATTENTION_BACKENDS,
    SAMPLERS,
    STEP_SKIPPERS,
    GenerationOptions,
    StepCacheSpec,
    option_fields,
)


def generate_parser():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices["generate"]


@pytest.mark.parametrize("name", [f.name for _, f in option_fields()])
def test_every_option_has_help_and_a_command_line_option_or_the_reason_it_has_none(name: str) -> None:
    f = next(f for _, f in option_fields() if f.name == name)
    assert f.metadata["help"].strip(), f"{name}: no help text"
    flags, python_only = f.metadata["flags"], f.metadata["python_only"]
    assert bool(flags) != bool(python_only), f"{name}: give it a command-line Flag, or say why it has none"
    parser = generate_parser()
    text = " ".join(parser.format_help().split())
    for flag in flags:
        assert flag.help.strip(), f"{name} {flag.names}: no help text"
        for option in flag.names:
            assert option in parser._option_string_actions, f"{name}: {option} is not an option of generate"
            assert option in text


def test_the_pipeline_keywords_are_the_options_fields_plus_generator_and_callback() -> None:
    keywords = set(inspect.signature(CogVideoPipeline.__call__).parameters) - {"self"}
    assert keywords == {f.name for _, f in option_fields()} | {"generator", "callback"}
    for _, f in option_fields():  # the docstring is built from the fields' help
        assert f"{f.name}: {f.metadata['help'][:30]}" in " ".join(CogVideoPipeline.__call__.__doc__.split())


def test_unknown_keywords_are_refused_naming_them() -> None:
    with pytest.raises(TypeError, match=r"unknown generation option\(s\) \['steps'\]"):
        GenerationOptions.from_keywords(steps=3)


def test_old_flags_still_set_the_renamed_options() -> None:
    parse = generate_parser().parse_args
    base = ["--prompt", "x"]
    for old, new in (("--steps", "--num-inference-steps"), ("--window-frames", "--windows")):
        assert vars(parse([*base, old, "9"])) == vars(parse([*base, new, "9"]))
    assert parse([*base, "--dynamic-cfg"]).use_dynamic_cfg and parse([*base, "--use-dynamic-cfg"]).use_dynamic_cfg
    assert parse([*base, "--no-tiled-vae"]).tiled is False and parse(base).tiled is True


@pytest.mark.parametrize(
    "registry,module,names",
    [
        (SAMPLERS, "diffsynth_cog.schedulers", "SAMPLERS"),
        (ATTENTION_BACKENDS, "diffsynth_cog.models.attention", "BACKENDS"),
    ],
)
def test_choices_come_from_the_registry_that_defines_them(monkeypatch, registry, module, names) -> None:
    import importlib

    monkeypatch.setattr(importlib.import_module(module), names, ("planted", "other"))
    assert registry.names() == ("planted", "other")
    registry.check("planted", "--x")
    with pytest.raises(ValueError, match="'ddim' is not a known"):
        registry.check("ddim", "--x")


def test_a_new_step_skipping_method_is_offered_once_registered(monkeypatch) -> None:
    from diffsynth_cog import denoise
    from diffsynth_cog.denoise.step_cache import StepCache

    monkeypatch.setitem(denoise.STEP_SKIPPERS, "planted", StepCache)
    assert STEP_SKIPPERS.names() == ("auto", "first-block", "teacache", "planted")


def test_options_fingerprint_by_value_and_differ_when_any_field_differs() -> None:
    def options(**changes):  # noqa: ANN202
        base = dict(prompt="a fox", seed=3, windows=WindowSpec(49, 0.25), step_cache=0.2, attention="window:2")
        return GenerationOptions.from_keywords(**{**base, **changes})

    assert fingerprint(options().flat()) == fingerprint(options().flat())  # fresh parts, equal values
    for change in (
        dict(seed=4),
        dict(windows=WindowSpec(49, 0.5)),
        dict(step_cache="first-block:0.2"),
        dict(attention="window:3"),
        dict(latents=torch.zeros(1, 16, 13, 60, 90)),
    ):
        assert fingerprint(options(**change).flat()) != fingerprint(options().flat()), change
    assert fingerprint(StepCacheSpec(0.2)) != fingerprint(StepCacheSpec(0.2, "teacache"))


def test_seed_minus_one_draws_a_random_seed_and_logs_the_seed_used(caplog) -> None:
    from tiny_models import TINY_DIT

    from diffsynth_cog.configs import DiTConfig
    from diffsynth_cog.models.dit import CogDiT

    torch.manual_seed(0)
    config = DiTConfig(**{k: v for k, v in TINY_DIT.items() if k in DiTConfig.__dataclass_fields__})
    pipe = CogVideoPipeline(CogDiT(config).eval(), None, None, None, device="cpu", torch_dtype=torch.float32)
    emb = torch.randn(1, config.max_text_seq_length, config.text_embed_dim)
    call = dict(prompt_emb=emb, negative_prompt_emb=emb, num_frames=9, height=32, width=48, num_inference_steps=1)
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    first = pipe(seed=-1, output_type="latent", progress_bar=False, **call)
    used = [r.getMessage() for r in caplog.records if r.getMessage().startswith("seed used: ")]
    assert len(used) == 1
    again = pipe(seed=int(used[0].split(": ")[1]), output_type="latent", progress_bar=False, **call)
    assert torch.equal(first, again)


def test_generate_help_reads_the_options_without_importing_torch() -> None:
    """The options module and generate's parser import no torch (the registries are read when a value is checked);
    the package's own __init__ is stubbed, as fast start-up makes it lazy."""
    import subprocess
    import sys
    from pathlib import Path

    import diffsynth_cog.cli

    package = Path(diffsynth_cog.cli.__file__).parent.parent
    code = (
        "import sys, types\n"
        f"m = types.ModuleType('diffsynth_cog'); m.__path__ = [{str(package)!r}]; sys.modules['diffsynth_cog'] = m\n"
        "from diffsynth_cog.cli.generate import add_generate_command\n"
        "import argparse\n"
        "p = argparse.ArgumentParser(); add_generate_command(p.add_subparsers())\n"
        "p._subparsers._group_actions[0].choices['generate'].format_help()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
