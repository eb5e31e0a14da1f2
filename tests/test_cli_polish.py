"""Command line polish: fast help (no torch before parsing), one-line argument errors."""

from __future__ import annotations

import subprocess
import sys


def test_parsing_and_help_do_not_import_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import layertap.cli as c\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        c.main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'extract' in out.getvalue() and 'plan' in out.getvalue()\n"
        "c.build_parser().parse_args(['extract', '--model', 'alexnet', '--layers', 'fc', '-i', 'x', '-o', 'y'])\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'scipy', 'pandas') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_argument_errors_are_one_line_with_a_help_pointer(layertap_cli) -> None:
    p = layertap_cli("extract", "--model", "alexnet")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0
    assert "required: --images" in p.stderr and "(see 'layertap extract --help')" in p.stderr
    p = layertap_cli("models", "--nope")
    assert p.returncode == 2 and p.stderr.strip() == "layertap: error: unrecognized arguments: --nope (see 'layertap --help')"


def test_errors_name_the_model_instead_of_a_placeholder(capsys, image_dir, tmp_path) -> None:  # noqa: ANN001
    from layertap.cli import app as cli

    args = ["extract", "--model", "alexnet", "--weights", "random", "--layers", "classifer.4"]
    assert cli.main([*args, "--images", str(image_dir), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "run 'layertap layers alexnet' to see the names" in err and "MODEL" not in err


def test_models_marks_pretrained_weights_and_extras(capsys) -> None:  # noqa: ANN001
    import timm

    from layertap.cli import app as cli

    no_weights = next(n for n in timm.list_models() if not timm.is_model_pretrained(n))
    assert cli.main(["models", "--source", "timm", no_weights]) == 0
    lines = {ln.split()[0]: ln.split()[1:3] for ln in capsys.readouterr().out.splitlines()}
    assert lines[f"timm:{no_weights}"] == ["random-only", "timm"]
    assert cli.main(["models", "--source", "timm", "resnet18", "--pretrained"]) == 0
    names = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()]
    assert "timm:resnet18" in names and all(timm.is_model_pretrained(n.split(":")[1]) for n in names)
    assert cli.main(["models", "--source", "ipcl"]) == 0
    lines = {ln.split()[0]: ln.split()[1:3] for ln in capsys.readouterr().out.splitlines()}
    assert lines["ipcl:ipcl1"] == ["pretrained", "core"] and lines["ipcl:ipcl16"][0] == "random-only"
    assert cli.main(["models", "--sources"]) == 0
    out = capsys.readouterr().out
    assert "pip install 'layertap[clip]'" in out and len(out.splitlines()) == 6


def test_every_subcommand_has_a_description_and_examples() -> None:
    import argparse

    from layertap.cli import app as cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    mine = ["models", "layers", "extract", "plan", "text", "merge", "process", "ensemble", "export", "report"]
    for name in mine:
        p = sub.choices[name]
        assert p.description, name
        assert p.epilog and "layertap " in p.epilog, name
    text = sub.choices["extract"].format_help()
    assert text.count("options:") == 1 and "FILE_FORMAT" not in text
    assert "--seed SEED seed for random weights (default: 0)" in " ".join(sub.choices["text"].format_help().split())


def _walk_parsers(parser, prog: str = "layertap"):  # noqa: ANN001, ANN202
    """Yield (command path, parser) for every subcommand of the CLI, nested ones (``train ipcl``) included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prog} {name}", sub
                yield from _walk_parsers(sub, f"{prog} {name}")


def test_every_subcommand_documents_its_options_defaults_and_examples() -> None:
    """Every subcommand: a description, an examples section with a real ``layertap ...`` line, a help text for
    every option, and each option's default (when it has one) written in its rendered help."""
    import argparse
    import re

    from layertap.cli import app as cli

    parsers = list(_walk_parsers(cli.build_parser()))
    names = {name for name, _ in parsers}
    assert {"layertap train ipcl", "layertap train linear-probe", "layertap slurm", "layertap encode"} <= names
    problems = []
    for name, p in parsers:
        text = p.format_help()
        bare = "".join(text.split())  # argparse wraps lines at spaces and after hyphens
        if not p.description:
            problems.append(f"{name}: no description")
        tail = text[text.lower().find("example") :] if "example" in text.lower() else ""
        if not re.search(r"(?m)^\s*(examples?:\s*)?(\S+ )*?layertap \w", tail):
            problems.append(f"{name}: no examples section with a 'layertap ...' line")
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            opt = "/".join(action.option_strings)
            if not (action.help or "").strip():
                problems.append(f"{name} {opt}: no help text")
                continue
            default = action.default
            if action.nargs == 0 or default in (None, False, [], argparse.SUPPRESS):
                continue  # flags, and options with nothing to show
            shown = " ".join(formatter._expand_help(action).split())
            if "".join(shown.split()) not in bare:
                problems.append(f"{name} {opt}: help not rendered as {shown!r}")
            spellings = {str(default), f"{default:g}"} if isinstance(default, float) else {str(default)}
            if not any(s in shown for s in spellings):
                problems.append(f"{name} {opt}: default {default!r} not in its help {shown!r}")
    assert not problems, "\n".join(problems)
