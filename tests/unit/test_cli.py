"""The CLI a user meets first: every option explained, wrong values named with what is accepted."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from sparse_embed.jobs.cli import build_parser, main


def _all_parsers(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, path + (name,))


def test_every_option_of_every_command_has_help():
    missing = []
    for path, parser in _all_parsers(build_parser()):
        parser.format_help()  # a stray % in a help text only fails here
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or len(action.help) < 10:
                missing.append((" ".join(path), action.dest))
    assert not missing, f"options without a help text: {missing}"


@pytest.mark.parametrize("command", [[], ["embed"], ["index", "build"], ["search"], ["demo"], ["store"], ["convert-checkpoint"], ["bench"]])
def test_help_exits_zero_and_is_fast(command):
    out = subprocess.run([sys.executable, "-m", "sparse_embed.jobs.cli", *command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: sparse-embed" in out.stdout


def test_help_does_not_import_torch():
    code = "import sys; from sparse_embed.jobs.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("argv, needle", [
    (["embed", "s3://b/x", "--out", "/tmp/o", "--model", "resnet18", "--max-error-rate", "2"], "--max-error-rate"),
    (["embed", "s3://b/x", "--out", "/tmp/o", "--model", "resnet18", "--pool", "max"], "token"),
    (["embed", "s3://b/x", "--out", "/tmp/o", "--model", "resnet18", "--batch-size", "0"], "--batch-size"),
    (["embed", "s3://b/x", "--out", "/tmp/o", "--model", "resnet18", "--model-arg", "nokey"], "KEY=VALUE"),
    (["search", "--index", "/tmp/x", "--image", "q.jpg", "-k", "-3"], "-k"),
])
def test_wrong_values_are_named_with_accepted_values(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    code = main(["embed", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--model", "resnet_nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and "resnet_nonexistent" in err and "Expected a timm model name" in err


def test_cli_pool_choices_match_heads():
    from sparse_embed.encoders.heads import POOLS
    from sparse_embed.jobs.options import POOLS as CLI_POOLS

    assert CLI_POOLS == POOLS


def test_convert_checkpoint_needs_explicit_trust(tmp_path, capsys):
    code = main(["convert-checkpoint", str(tmp_path / "a.pth"), str(tmp_path / "b.safetensors")])
    assert code == 2 and "--trust-pickle" in capsys.readouterr().err
