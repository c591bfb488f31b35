"""Every `vislang` command in README.md's shell blocks is one the CLI accepts, so a reader can paste it.

Running them all would take hours, so each command is checked as deep as is cheap:

* every one goes through the CLI's own argument parser (``vislang.cli.parse_command``: nothing runs), so an unknown
  subcommand, a misspelt flag or a missing required option fails here;
* ``train`` (and ``demo``) commands also load their run config with the overrides through the loader ``vislang train``
  uses (``vislang.cli.train_run_config``), and the model config it names: an unknown config name or a misspelt
  ``--a.b=value`` key fails here;
* every subcommand's ``--help`` is rendered (a help text that argparse cannot format fails only when asked for);
* a few cheap ones run for real, in a temporary directory, with overrides that make them tiny.

Model and run directories the commands name (``runs/demo/model``...) do not exist here; none of the parse-level checks
needs them.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from vislang.cli import build_parser, main, parse_command, train_run_config

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_FENCES = {"", "bash", "sh", "shell"}  # ```python and other blocks are not shell
CONTROL = {"&&", "||", ";", "|", "&"}  # a line may chain commands
REDIRECT = {">", ">>", "<", "2>", "2>&1"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Command:
    """One `vislang` invocation found in a Markdown file: where it is, as written, and its arguments."""

    lineno: int
    line: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"README.md:{self.lineno}: {self.line.strip()}"


def shell_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line inside a fenced bash/sh/shell/unlabelled block; continuations joined."""
    out: list[tuple[int, str]] = []
    fence: str | None = None  # the opening fence (``` or ~~~ run) while inside a block
    shell = False
    pending: tuple[int, str] | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence is None:
            if m:
                fence, shell = m.group(1), m.group(2).lower() in SHELL_FENCES
            continue
        if m and m.group(1).startswith(fence) and not m.group(2):
            fence = None
            continue
        if not shell:
            continue
        if pending:
            lineno, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (lineno, line.rstrip()[:-1])
            continue
        out.append((lineno, line))
    return out


def vislang_argv(tokens: list[str]) -> tuple[str, ...] | None:
    """The arguments of a simple command if it runs vislang (``vislang``, ``.venv/bin/vislang``, ``-m vislang.cli``)."""
    i = 0
    while i < len(tokens) and ASSIGNMENT.match(tokens[i]):  # FOO=1 vislang ...
        i += 1
    if i < len(tokens) and re.search(r"(^|/)vislang$", tokens[i]):
        return tuple(tokens[i + 1 :])
    for j in range(i, len(tokens) - 1):  # python -m vislang.cli ..., torchrun ... -m vislang.cli ...
        if tokens[j] == "-m" and tokens[j + 1] in ("vislang", "vislang.cli"):
            return tuple(tokens[j + 2 :])
    return None


def split_commands(line: str) -> list[list[str]]:
    """Shell words of each simple command on a line: comments dropped, ``&&``/``;``/``|`` split, redirections out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    skip_next = False
    for tok in lexer:
        if skip_next:
            skip_next = False
        elif tok in CONTROL:
            commands.append([])
        elif tok in REDIRECT:
            skip_next = True  # the file name after > or <
        else:
            commands[-1].append(tok)
    return [c for c in commands if c]


def readme_commands(text: str) -> list[Command]:
    """Every vislang command in the shell blocks of a Markdown text, in order."""
    found = []
    for lineno, line in shell_lines(text):
        for words in split_commands(line):
            argv = vislang_argv(words)
            if argv is not None:
                found.append(Command(lineno, line, argv))
    return found


COMMANDS = readme_commands(README.read_text())


def command_path(argv: tuple[str, ...]) -> tuple[str, ...]:
    """The (sub)command words of ``argv``: ``("index", "build")`` for ``index build DIR --model M``."""
    import argparse

    parser, path = build_parser(), []
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
        path.append(word)
    return tuple(path)


def find(prefix: tuple[str, ...]) -> Command:
    """The first README command whose arguments start with ``prefix`` (the end-to-end tests run these)."""
    for c in COMMANDS:
        if c.argv[: len(prefix)] == prefix:
            return c
    pytest.fail(f"README.md has no `vislang {' '.join(prefix)}` command any more; update {Path(__file__).name}")


def check_model_config(task: str, cfg) -> None:
    """Build the model config a train command names (the run config keeps it as an unchecked mapping)."""
    from vislang.config import from_dict
    from vislang.factory import get_model_config, list_models

    if task == "gan":
        from vislang.models.gan.networks import GANModelConfig

        from_dict(GANModelConfig, dict(cfg.gan.model), "gan.model")
    elif task == "vqa":
        from vislang.config import apply_overrides
        from vislang.models.vqa import VQAConfig
        from vislang.registry import named_config

        from_dict(VQAConfig, apply_overrides(named_config(cfg.model_name, "vislang-vqa"), cfg.model), "model")
    elif task == "vqa-gen":
        get_model_config(cfg.model_name, cfg.model)
    elif cfg.model_name in list_models() or Path(cfg.model_name).is_file():  # a model directory may not exist yet
        get_model_config(cfg.model_name, cfg.model)


# ----------------------------------------------------------------------------------------------- the extractor
def test_extractor_finds_vislang_commands_in_shell_blocks_only():
    text = "\n".join(
        [
            "vislang eval --in-prose  # not in a block",
            "```bash",
            ".venv/bin/vislang models   # built-in configs",
            'vislang embed --texts "a # b" -o t.npy  # the # inside quotes stays',
            "VISLANG_DEBUG=1 vislang train --config demo \\",
            "    --epochs=2",
            "make demo && vislang report runs/demo > log.txt",
            "python -m vislang.cli train --config tiny",
            "src/vislang/        library: models/",
            "```",
            "```python",
            "vislang.list_models()  # python, not shell",
            "```",
            "```sh",
            "vislang search q --index i",
            "```",
            "~~~",
            "vislang report runs/x",
            "~~~",
        ]
    )
    got = [(c.lineno, c.argv) for c in readme_commands(text)]
    assert got == [
        (3, ("models",)),
        (4, ("embed", "--texts", "a # b", "-o", "t.npy")),
        (5, ("train", "--config", "demo", "--epochs=2")),
        (7, ("report", "runs/demo")),
        (8, ("train", "--config", "tiny")),
        (15, ("search", "q", "--index", "i")),
        (18, ("report", "runs/x")),
    ]


def test_readme_has_the_commands_this_test_checks():
    assert len(COMMANDS) >= 30, "the extractor found too few README commands: is README.md's format new?"
    words = {c.argv[0] for c in COMMANDS}
    assert {"models", "train", "eval", "index", "serve", "generate", "compress"} <= words


# ----------------------------------------------------------------------------------------- every command: parse
@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: f"L{c.lineno}-{'-'.join(command_path(c.argv)) or c.argv[0]}")
def test_readme_command_parses(cmd: Command, capsys):
    try:
        args, extra = parse_command(list(cmd.argv))
    except SystemExit as e:
        pytest.fail(f"{cmd}\nthe CLI rejects it (exit {e.code}): {capsys.readouterr().err.strip()}")
    if args.command not in ("train", "demo"):
        return
    config = args.config if args.command == "train" else "demo"  # `vislang demo` trains the packaged demo config
    try:
        task, cfg = train_run_config(config, extra)
        check_model_config(task, cfg)
    except (SystemExit, ValueError) as e:  # ConfigError is a ValueError
        pytest.fail(f"{cmd}\nits config does not load: {e}")


@pytest.mark.parametrize("path", sorted({command_path(c.argv) for c in COMMANDS}), ids="-".join)
def test_readme_subcommand_help(path: tuple[str, ...], capsys):
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: vislang {' '.join(path)}")


# ------------------------------------------------------------------------------ a few cheap ones, end to end
def test_readme_models_command_runs(capsys):
    assert main(list(find(("models",)).argv)) == 0
    out = capsys.readouterr().out
    assert "fmnist-cnn" in out and "shapes-cnn" in out


def test_readme_export_images_command_runs(tmp_path, monkeypatch):
    cmd = find(("export-images",))
    monkeypatch.chdir(tmp_path)  # the command's relative paths (runs/scenes) land here
    assert main(list(cmd.argv)) == 0
    out = Path(cmd.argv[2])
    pngs = sorted(p.name for p in (tmp_path / out).glob("*.png"))
    assert pngs and all((tmp_path / out / png).with_suffix(".txt").read_text().strip() for png in pngs)


TINY_TRAIN = ["--max_steps=2", "--data.max_train=512", "--batch_size=64", "--eval_max=64", "--progress=false"]


@pytest.mark.fashion_mnist
def test_readme_command_line_walkthrough_runs(tmp_path, monkeypatch, capsys):
    """The README's first block, in order: train (tiny), resume, eval, embed, report; runs/demo is the tiny run."""
    monkeypatch.chdir(tmp_path)
    train = find(("train", "--config", "demo"))
    assert main([*train.argv, *TINY_TRAIN, "--threads=1"]) == 0
    args, extra = parse_command(list(train.argv))
    out_dir = Path(train_run_config(args.config, extra)[1].out_dir)
    assert (out_dir / "model" / "config.json").is_file()
    resume = next(c for c in COMMANDS if c.argv[:3] == ("train", "--config", "demo") and "--resume" in c.argv)
    assert main([*resume.argv, *TINY_TRAIN, "--threads=1"]) == 0
    Path("runs").mkdir(exist_ok=True)
    if not Path("runs/demo").exists():
        Path("runs/demo").symlink_to(out_dir.resolve())  # what `make demo` would have written
    assert main([*find(("eval", "--model", "runs/demo/model")).argv, "--max-images", "64", "--no-probe"]) == 0
    embed = find(("embed",))
    assert main(list(embed.argv)) == 0
    assert Path(embed.argv[embed.argv.index("-o") + 1]).is_file()
    assert main(list(find(("report",)).argv)) == 0
    assert Path("runs/demo/report.html").is_file()


# ------------------------------------------------------------------------- every --help ends with examples that parse
def all_subparsers() -> list[tuple[tuple[str, ...], object]]:
    """``(path, parser)`` of every subcommand, nested ones (``index build``) included."""
    import argparse

    out, todo = [], [((), build_parser())]
    while todo:
        path, parser = todo.pop()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if path and not subs:
            out.append((path, parser))
        for action in subs:
            todo.extend(((*path, name), p) for name, p in action.choices.items())
    return sorted(out, key=lambda t: t[0])


SUBPARSERS = all_subparsers()


def help_examples(parser) -> list[str]:
    """The ``vislang ...`` command lines in a parser's help text (after its 'example(s):' heading), continuations
    joined."""
    lines, joined, pending = parser.format_help().splitlines(), [], ""
    start = next((i for i, line in enumerate(lines) if re.match(r"^\s*examples?:\s*$", line, re.I)), len(lines))
    for line in lines[start + 1 :]:
        text = pending + " " + line.strip() if pending else line.strip()
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        joined.append(text)
    return [line for line in joined if re.match(r"^(vislang|torchrun|python -m vislang)", line)]


def test_help_walker_sees_nested_subcommands():
    paths = {p for p, _ in SUBPARSERS}
    assert ("index", "build") in paths and ("train",) in paths and ("models",) in paths


@pytest.mark.parametrize("path,parser", SUBPARSERS, ids=lambda v: "-".join(v) if isinstance(v, tuple) else "")
def test_every_subcommand_help_ends_with_examples(path, parser):
    """The README promises `--help` with examples for every command; the examples are commands too, so they parse."""
    examples = help_examples(parser)
    assert examples, f"`vislang {' '.join(path)} --help` has no 'examples:' section with a vislang command"
    for line in examples:
        for words in split_commands(line):
            argv = vislang_argv(words)
            if argv is None:
                continue
            try:
                parse_command(list(argv))
            except SystemExit as e:
                pytest.fail(f"`vislang {' '.join(path)} --help` example does not parse (exit {e.code}): {line}")


# ------------------------------------------------------------------------------ inline `vislang ...` commands in prose
def inline_commands(text: str) -> list[Command]:
    """Every `vislang ...` code span in the prose (outside fenced blocks; a span may wrap onto the next line) that
    gives more than a subcommand's name. A bare `vislang index build` is a mention and `vislang video example NAME` a
    template; one with real arguments is a command a reader may paste, so it must parse."""
    prose, fence = [], None
    for lineno, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if m:
            fence = None if fence and m.group(1).startswith(fence) else (fence or m.group(1))
            continue
        if fence is None:
            prose.append((lineno, line))
    joined = "\n".join(line for _, line in prose)
    starts = [0]
    for _, line in prose:
        starts.append(starts[-1] + len(line) + 1)
    found = []
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined):
        span = " ".join(m.group(1).split())
        words = span.split()
        argv = vislang_argv(words) if words else None
        if argv is None or len(argv) <= len(command_path(argv)):
            continue
        if any(re.fullmatch(r"[A-Z][A-Z0-9_]*|\.\.\.", w) for w in argv):  # a template: `vislang x NAME`, `...`
            continue
        lineno = prose[next(i for i, s in enumerate(starts) if s > m.start()) - 1][0]
        found.append(Command(lineno, span, tuple(shlex.split(" ".join(argv)))))
    return found


INLINE = inline_commands(README.read_text())


def test_inline_extractor_reads_wrapped_spans_and_skips_mentions():
    text = "see `vislang index build`, `vislang x NAME` and `vislang compare\nruns/a runs/b --rounds 9`\n"
    text += "```\n`vislang x y`\n```\n"
    got = [(c.lineno, c.argv) for c in inline_commands(text)]
    assert got == [(1, ("compare", "runs/a", "runs/b", "--rounds", "9"))]


@pytest.mark.parametrize("cmd", INLINE, ids=lambda c: f"L{c.lineno}-{'-'.join(command_path(c.argv)) or c.argv[0]}")
def test_readme_inline_command_parses(cmd: Command, capsys):
    try:
        args, extra = parse_command(list(cmd.argv))
    except SystemExit as e:
        pytest.fail(f"{cmd}\nthe CLI rejects this inline command (exit {e.code}): {capsys.readouterr().err.strip()}")
    if args.command == "train":
        try:
            train_run_config(args.config, extra)
        except (SystemExit, ValueError) as e:
            pytest.fail(f"{cmd}\nits config does not load: {e}")
