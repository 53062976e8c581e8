"""The command line's usage errors and one-process refusals, run in-process through `distfinalize.cli.main`.

A bad option is argparse's usage line and exit 2; a bad source is one `distfinalize: error:` line and exit 1.
Nothing is written in either case. (Runs under torchrun are in tests/multirank.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import error_lines

from distfinalize.cli import main


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() configures the `distfinalize` logger for a process; put it back for the other tests."""
    logger = logging.getLogger("distfinalize")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A source that exists (its content never matters: usage errors come first)."""
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "int3"], "invalid choice: 'int3'"),
        (["--max-shard-size", "5 parsecs"], "is not a size"),
        (["--max-shard-size", "lots"], "max shard size 'lots' is not a size"),
        (["--read-batch", "0"], "is not a size"),
        (["--quantize", "fp3"], "--quantize 'fp3' is not a recipe"),
        (["--lora-r", "0"], "--lora-r must be positive"),
        (["--timeout", "0"], "must be positive"),
        (["--private"], "need --push-to-hub"),
        (["--strategy", "teleport"], "invalid choice: 'teleport'"),
    ],
)
def test_bad_options_are_usage_errors(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([str(src), str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and "usage: distfinalize" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rename:\n  - ['^head\\.(', 'lm_head.']\n", "is not a regular expression"),
        ("rename: ['^head']\n", "'rename' must be a list of [PATTERN, REPLACEMENT] string pairs"),
        ("renames: []\n", "a key map file holds a mapping with 'rename'"),
        ("rename: [\n", "cannot read the --key-map file"),
    ],
    ids=["bad-regex", "not-pairs", "unknown-key", "not-yaml"],
)
def test_bad_key_map_file_is_a_usage_error(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exited:
        main([str(src), str(tmp_path / "out"), "--key-map", str(bad)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["inspect"], ["verify"]])
def test_subcommand_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, str(tmp_path), "--no-such-option"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "unrecognized arguments: --no-such-option" in err
    assert f"usage: distfinalize {command[0]}" in err


@pytest.mark.parametrize(
    ("make_src", "message"),
    [
        (lambda tmp: tmp / "missing", "source does not exist"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no checkpoint found"),
    ],
)
def test_bad_source_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], make_src, message: str) -> None:
    src = make_src(tmp_path)
    code = main([str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert error_lines(err) == [line for line in err.splitlines() if line.strip()]
    assert len(error_lines(err)) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.distfinalize-staging").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc-per-node", "0", "SRC", "DEST"], "--nproc-per-node must be at least 1"),
        (["--nnodes", "2", "SRC", "DEST"], "--nnodes 2 needs --rdzv-endpoint"),
        (["--nproc-per-node", "1", "SRC"], "the following arguments are required: DEST"),
        (["--nproc-per-node", "1", "SRC", "DEST", "--dtype", "int3"], "invalid choice: 'int3'"),
        (["--tee", "3", "SRC", "DEST"], "--tee needs --log-dir DIR"),
        (["--local-ranks-filter", "0,x", "SRC", "DEST"], "--local-ranks-filter takes local ranks"),
        (["--rdzv-conf", "join_timeout", "SRC", "DEST"], "--rdzv-conf takes KEY=VALUE pairs"),
    ],
)
def test_run_usage_errors_before_any_rank(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    """`distfinalize run` checks its own options and the finalize's before starting a rank: exit 2, one usage."""
    with pytest.raises(SystemExit) as exited:
        main(["run", *args])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and "Traceback" not in err
