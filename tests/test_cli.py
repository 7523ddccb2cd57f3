"""``ldct_tf.cli.run_main``: one way for every command to end on an error, and the errors' common base."""

from __future__ import annotations

import argparse

import pytest

from ldct_tf import cli, config
from ldct_tf.errors import LdctError
from tests.conftest import REPO


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.example")
    parser.add_argument("--n", type=int, required=True)
    return parser


def test_a_project_error_is_one_line_and_exit_status_1(capsys):
    def work(args):
        raise config.ConfigError("configs/x.yaml: train.steps must be >= 1,\n  got 0")

    assert cli.run_main(_parser(), work, ["--n", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "python -m ldct_tf.example: error: configs/x.yaml: train.steps must be >= 1, got 0\n"
    assert "Traceback" not in captured.err


def test_a_missing_file_names_the_path_without_errno(tmp_path, capsys):
    def work(args):
        open(tmp_path / "missing.csv")

    assert cli.run_main(_parser(), work, ["--n", "1"]) == 1
    assert capsys.readouterr().err == f"python -m ldct_tf.example: error: {tmp_path / 'missing.csv'}: " \
                                      "no such file or directory\n"


def test_a_usage_error_stays_argparse_exit_status_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.run_main(_parser(), lambda args: 0, ["--n", "x"])
    assert info.value.code == 2 and "python -m ldct_tf.example: error: argument --n" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_a_success_returns_the_work_code():
    def work(args):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run_main(_parser(), work, ["--n", "1"])
    assert cli.run_main(_parser(), lambda args: None, ["--n", "1"]) == 0
    assert cli.run_main(_parser(), lambda args: args.n, ["--n", "3"]) == 3


def test_unknown_options_pass_through_only_when_asked():
    seen = {}
    assert cli.run_main(_parser(), lambda args: seen.update(unknown=args.unknown), ["--n", "1", "--runner", "X"],
                        pass_unknown=True) == 0
    assert seen["unknown"] == ["--runner", "X"]
    with pytest.raises(SystemExit):
        cli.run_main(_parser(), lambda args: 0, ["--n", "1", "--runner", "X"])


def test_stage_errors_share_the_base_and_keep_their_builtin_bases():
    from ldct_tf import baselines, simulate
    from ldct_tf.audit import AuditInputError
    from ldct_tf.evaluate import EvaluateInputError

    assert issubclass(config.ConfigError, LdctError) and issubclass(config.ConfigError, ValueError)
    assert issubclass(baselines.BaselineUnavailable, ImportError) and issubclass(baselines.BaselineUnavailable,
                                                                                LdctError)
    assert issubclass(simulate.SimulationError, ValueError) and issubclass(AuditInputError, LdctError)
    assert issubclass(EvaluateInputError, ValueError) and issubclass(EvaluateInputError, LdctError)


def test_default_paths_of_the_stages_point_into_the_checkout():
    """The stages moved one folder deeper; their defaults must still name the checkout's configs and models."""
    from ldct_tf import demo, denoise
    from ldct_tf.audit import scores

    assert scores.DEFAULT_CONFIG == REPO / "configs" / "audit.yaml" and scores.DEFAULT_CONFIG.exists()
    assert denoise.DEFAULT_MODEL == REPO / "saved_models" / "ldct_denoiser" == demo.DEFAULT_MODEL
    assert denoise.DEFAULT_MODEL.is_dir()


def test_the_resolved_config_is_printed_only_with_verbose(capsys):
    parser = argparse.ArgumentParser()
    cli.add_config_arguments(parser, "config", "train.steps=1")
    cli.add_run_arguments(parser)
    smoke = str(REPO / "configs" / "smoke.yaml")
    cli.load_config(parser.parse_args(["--data", "d", "--config", smoke]))
    assert capsys.readouterr().out == ""
    cli.load_config(parser.parse_args(["--data", "d", "--config", smoke, "--verbose", "train.steps=3"]))
    out = capsys.readouterr().out
    assert out.startswith("Resolved config:") and "steps: 3" in out


def test_progress_defaults_to_a_line_and_takes_its_own_option():
    parser = argparse.ArgumentParser()
    cli.add_run_arguments(parser)
    assert cli.progress_level(parser.parse_args(["--data", "d"])) == 1
    assert cli.progress_level(parser.parse_args(["--data", "d", "--progress", "0"])) == 0
    assert cli.stdout_is_terminal() is False  # pytest captures stdout: no bar codes reach it
