"""The command line starts fast: its parser, every ``--help`` and ``--version`` import no heavy library, and a
reader that stops early (``diffsynth-cog info | head``) ends the command quietly."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "transformers", "gradio", "lightning", "safetensors", "imageio", "modelscope")
SUBCOMMANDS = ("generate", "download", "upload-lora", "info", "webui", "prepare", "train", "export-lora")


def _python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120, **kwargs
    )


def _heavy_after(statement: str) -> list[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = _python(code)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_no_heavy_library():
    assert _heavy_after("from diffsynth_cog.cli.main import build_parser; build_parser()") == []


def test_importing_the_package_imports_no_heavy_library_until_a_name_is_used():
    assert _heavy_after("import diffsynth_cog") == []
    assert "torch" in _heavy_after("import diffsynth_cog; diffsynth_cog.CogVideoPipeline")


def test_every_help_and_the_version_run_without_importing_a_heavy_library():
    statement = (
        "from diffsynth_cog.cli.main import main\n"
        f"for argv in [['--help'], ['--version']] + [[c, '--help'] for c in {SUBCOMMANDS!r}]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "    else:\n"
        "        raise AssertionError(argv)"
    )
    assert _heavy_after(statement) == []


def test_every_subcommand_has_a_help():
    from diffsynth_cog.cli.main import build_parser

    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(SUBCOMMANDS) <= set(choices)


def test_version_prints_the_installed_package_version():
    result = _python("from diffsynth_cog.cli import main; main(['--version'])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"diffsynth-cog {importlib.metadata.version('diffsynth-cog')}"


def test_the_top_level_description_is_a_sentence_not_a_docstring_title():
    from diffsynth_cog.cli.main import build_parser

    description = build_parser().description
    assert "``" not in description and "command line." not in description
    assert description[0].isupper() and description.endswith(".")
    assert "generate" in description.lower() and "lora" in description.lower()


def test_ulysses_transports_of_the_parser_are_the_exchange_s_own():
    from diffsynth_cog.cli.main import build_parser
    from diffsynth_cog.parallel.context import TRANSPORTS

    generate = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    transport = next(a for a in generate._actions if a.dest == "ulysses_transport")
    assert tuple(transport.choices) == TRANSPORTS == ("auto", "nccl", "p2p")


def _with_closed_stdout(*argv: str) -> subprocess.CompletedProcess:
    """Run the command with a standard output whose reader has already gone (``| head`` that stopped)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "diffsynth_cog.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.stderr.close()
    return subprocess.CompletedProcess(process.args, process.wait(timeout=120), "", stderr)


@pytest.mark.slow
def test_info_into_a_closed_pipe_ends_quietly_with_sigpipe_status():
    result = _with_closed_stdout("info", "--models-dir", str(ROOT / "no-models-here"))
    assert "Broken pipe" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == ""
    assert result.returncode == 128 + 13


def test_a_broken_pipe_that_is_not_standard_output_is_still_reported(monkeypatch, caplog):
    import diffsynth_cog.cli.info as info

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")  # e.g. ffmpeg died while frames were written to it

    monkeypatch.setattr(info, "cmd_info", broken)
    from diffsynth_cog.cli.main import main

    assert main(["info"]) == 2
    assert "Broken pipe" in caplog.text
