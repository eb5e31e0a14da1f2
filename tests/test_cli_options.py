"""One CLI: shared options with one default each, every subcommand defines what main() reads, --quiet
reaches the training loops, and exit codes come from the CLI's table, not from the library's exceptions."""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from layertap import cli
from layertap.errors import (
    LayertapError,
    LayertapFailure,
    StorageError,
    UnavailableError,
    option_name,
    option_spelling,
    set_cli_spelling,
)


def _leaves(parser: argparse.ArgumentParser, prog: str = "layertap") -> list[tuple[str, argparse.ArgumentParser]]:
    """(command, parser) for every subcommand that runs something (``train ipcl``, not ``train``)."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _leaves(sub, f"{prog} {name}")
                out.extend(nested or [(f"{prog} {name}", sub)])
    return out


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


@pytest.fixture
def keep_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() installs its own handler and level on the 'layertap' logger (and restores them)."""
    logger = logging.getLogger("layertap")
    for name in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, name, getattr(logger, name))


def test_shared_options_have_one_default_and_one_help() -> None:
    """--workers, --device, --seed, --quiet: the same default, type and help in every command that has them
    (the training commands decoded in 0 workers while extract used the spare cores)."""
    leaves = _leaves(cli.build_parser())
    for flag in ("--workers", "--device", "--seed", "--quiet"):
        found = {name: a for name, p in leaves if (a := _option(p, flag)) is not None}
        assert len(found) >= 2, flag
        defaults = {name: a.default for name, a in found.items()}
        assert len(set(defaults.values())) == 1, (flag, defaults)
        if flag in ("--workers", "--device"):
            helps = {a.help for a in found.values()}
            assert len(helps) == 1, (flag, helps)
    workers = {name for name, p in leaves if _option(p, "--workers")}
    assert {"layertap extract", "layertap train ipcl", "layertap train linear-probe"} <= workers
    assert {_option(p, "--workers").default for _, p in leaves if _option(p, "--workers")} == {None}


def test_every_subcommand_defines_what_main_reads() -> None:
    """main() reads func, quiet and model of every command: each parser defines them itself."""
    for name, p in _leaves(cli.build_parser()):
        for key in ("func", "quiet", "model"):
            defined = key in p._defaults or any(a.dest == key for a in p._actions)
            assert defined, f"{name} does not define {key}"
        assert callable(p._defaults["func"]), name


def test_batch_size_is_checked_at_parse_time_in_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """One validator for every command: a batch size of 0 is refused in one line before anything loads."""
    for argv in (
        ["extract", "--model", "alexnet", "--layers", "fc", "-i", "x", "-o", "y", "--batch-size", "0"],
        ["train", "ipcl", "--images", "x", "--out", "y", "--batch-size", "0"],
        ["train", "linear-probe", "--run", "r", "--layer", "fc", "-i", "x", "--val", "v", "--batch-size", "0"],
    ):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "must be positive, got 0" in err and err.count("\n") == 0, err


def _fake_training(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the training loop by a recorder of the arguments the command passes."""
    import layertap.training.ipcl as ipcl

    seen: dict[str, Any] = {}

    @functools.wraps(ipcl.train_ipcl)  # the real signature: the command derives its arguments from it
    def train_ipcl(images: Any, out: Any, **kwargs: Any) -> SimpleNamespace:
        seen.update(kwargs, images=images, out=out)
        seen["log_level"] = logging.getLogger("layertap").level
        return SimpleNamespace(history=[{"epoch": 1}], checkpoint=Path(out) / "checkpoint.pth.tar")

    monkeypatch.setattr(ipcl, "train_ipcl", train_ipcl)
    return seen


def test_train_honours_quiet(monkeypatch: pytest.MonkeyPatch, keep_logger: None, tmp_path: Path) -> None:
    """`train ipcl --quiet` turns the progress bar and the info messages off (it had no --quiet, and read
    a `quiet` attribute it never defined, so training always showed its bar)."""
    seen = _fake_training(monkeypatch)
    base = ["train", "ipcl", "--images", str(tmp_path), "--out", str(tmp_path / "run"), "--epochs", "3"]
    assert cli.main([*base, "--quiet"]) == 0
    assert seen["progress"] is False and seen["log_level"] == logging.WARNING
    assert seen["epochs"] == 3 and seen["detach_prototype"] is True and seen["batch_size"] == 128
    assert isinstance(seen["workers"], int) and seen["workers"] >= 1  # the shared default: the spare cores
    seen.clear()
    assert cli.main([*base, "--workers", "0"]) == 0
    assert seen["progress"] is True and seen["log_level"] == logging.INFO and seen["workers"] == 0


def test_library_messages_spell_options_for_their_reader() -> None:
    """Python users read `weights='random'`, the command line `--weights random`; the error's class (not a
    number on it) says it is the environment's fault, and the CLI's table makes that exit code 1."""
    from layertap.cli.app import exit_code_for
    from layertap.models.weights import weights_unavailable

    assert option_spelling("weights", "random") == "weights='random'"
    assert option_name("chunk_rows") == "chunk_rows"
    err = weights_unavailable("pretrained weights for alexnet", OSError("offline"), "connect to the internet once")
    assert isinstance(err, UnavailableError) and exit_code_for(err) == 1
    assert "use weights='random' only if you want an untrained model" in str(err) and "--weights" not in str(err)
    try:
        set_cli_spelling(True)
        assert option_spelling("weights", "random") == "--weights random"
        assert option_name("chunk_rows") == "--chunk-rows"
        err = weights_unavailable("pretrained weights for alexnet", OSError("offline"), "connect to the internet once")
        assert "use --weights random only if you want an untrained model" in str(err) and "weights='" not in str(err)
    finally:
        set_cli_spelling(False)


class _Quota(StorageError):
    """A library error the CLI has never heard of: only its class says what kind it is."""


class _Typo(LayertapError):
    pass


@pytest.mark.parametrize(("exc", "code"), [(_Quota, 1), (_Typo, 2), (UnavailableError, 1), (LayertapError, 2)])
def test_cli_maps_exception_classes_to_exit_codes(
    exc: type[LayertapError], code: int, monkeypatch: pytest.MonkeyPatch, keep_logger: None, capsys
) -> None:  # noqa: ANN001
    import layertap.cli.extract as commands

    def failing(args: argparse.Namespace) -> None:
        raise exc("quota exceeded on /scratch")

    monkeypatch.setattr(commands, "cmd_verify", failing)
    assert cli.main(["verify", "somewhere"]) == code
    assert capsys.readouterr().err == "layertap: error: quota exceeded on /scratch\n"
    assert issubclass(exc, LayertapFailure) == (code == 1)


def test_exit_codes_come_from_the_cli_table(monkeypatch: pytest.MonkeyPatch, keep_logger: None, capsys) -> None:  # noqa: ANN001
    """The table in the CLI decides, not a number carried by the exception."""
    import layertap.cli.app as app
    import layertap.cli.extract as commands

    def failing(args: argparse.Namespace) -> None:
        raise _Quota("quota exceeded")

    monkeypatch.setattr(commands, "cmd_verify", failing)
    monkeypatch.setitem(app.EXIT_CODES, _Quota, 75)
    assert cli.main(["verify", "somewhere"]) == 75
    assert app.exit_code_for(StorageError("x")) == 1 and app.exit_code_for(LayertapError("x")) == 2
    capsys.readouterr()


def test_every_extract_option_reaches_the_library() -> None:
    """cmd_extract passes options by name (derived from extract()'s signature): each option of the extract
    parser is a keyword of extract(), plan() or open_stimuli(), or one the command itself consumes."""
    import inspect

    from layertap.data.stimuli import open_stimuli
    from layertap.extraction.pipeline import extract
    from layertap.extraction.planning import plan

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["extract"]
    keywords = {n for f in (extract, plan, open_stimuli) for n in inspect.signature(f).parameters}
    consumed = {  # read by cmd_extract itself: model loading, the layer prompt, post-processing, export, the plan
        "help", "model", "images", "out", "layers", "interactive", "weights", "pretrained", "model_path", "option",
        "file_format", "center_acts", "normalize_reps", "compress_acts", "quiet", "dry_run", "yes", "no_channels_last",
    }  # fmt: skip
    missing = [a.dest for a in parser._actions if a.dest not in keywords | consumed]
    assert not missing, f"extract options that reach no library keyword: {missing}"
    parsed = parser.parse_args(["--model", "m", "--layers", "l", "-i", "x", "-o", "y", "--no-fold-bn", "--no-merge"])
    assert parsed.fold_bn is False and parsed.merge is False and parsed.exif_transpose is True


def test_slurm_rewrites_every_spelling_of_the_extract_options_that_take_files() -> None:
    # the Slurm writer lives below the CLI and keeps its own list of extract's spellings: they must agree
    from layertap.shards import slurm

    extract = dict(_leaves(cli.build_parser()))["layertap extract"]
    listed = {*slurm._PATH_OPTIONS, *slurm._MAYBE_PATH_OPTIONS, *slurm._MODEL_OPTIONS}
    for dest in ("images", "out", "weights", "model_path", "model", "option", "times", "ids"):
        spellings = {s for a in extract._actions if a.dest == dest for s in a.option_strings}
        assert spellings and spellings <= listed, (dest, spellings - listed)


def test_library_errors_name_options_as_python_callers_spell_them(tmp_path: Path) -> None:
    # the same checks answer a Python caller with keywords and the layertap command with flags
    from layertap.devices import mps_available, resolve_device
    from layertap.extraction.pipeline import ExtractConfig
    from layertap.shards.spec import parse_shard

    checks = [
        (lambda: ExtractConfig(workers=-1), "workers must be 0", "--workers must be 0"),
        (lambda: ExtractConfig(chunk_rows=0), "chunk_rows must be at least 1", "--chunk-rows must be at least 1"),
        (lambda: parse_shard("3"), "shard must look like i/n", "--shard must look like i/n"),
        (lambda: resolve_device("cuda:0" if mps_available() else "mps"), "device=", "--device "),
    ]
    for call, python, flag in checks:
        with pytest.raises(LayertapError) as err:
            call()
        assert str(err.value).startswith(python) or python in str(err.value), err.value
        assert "--" not in str(err.value), err.value
        try:
            set_cli_spelling(True)
            with pytest.raises(LayertapError, match=flag):
                call()
        finally:
            set_cli_spelling(False)

