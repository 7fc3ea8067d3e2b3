"""Every shell command the docs show for a command we own (cosed, ray_jobs/*.py) or Ray's CLI parses with the
real parser: a renamed flag or a removed verb breaks this test, not a newcomer's first hour."""

import re
import shlex
from pathlib import Path

import click
import pytest

from cosed.cli import build_parser

from conftest import REPO

DOCS = [REPO / "README.md", REPO / "cluster" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)
SEPARATORS = {"&&", "||", ";", "|", "&"}


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of every shell block: continuations joined, comments and here-documents dropped,
    split at ``&&``, ``||``, ``;``, ``|`` and ``&``, leading ``VAR=value`` assignments removed."""
    commands = []
    for block in FENCE.findall(text):
        block = re.sub(r"<<-?\s*'?(\w+)'?.*?\n.*?\n\1\n", "\n", block, flags=re.S)  # here-documents
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            try:
                words = list(lexer)
            except ValueError:
                continue  # not shell syntax we can read (an example of output, say)
            current: list[str] = []
            for word in words + [";"]:
                if word in SEPARATORS or set(word) <= set("&|;"):
                    while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                        current.pop(0)
                    if current:
                        commands.append(current)
                    current = []
                else:
                    current.append(word)
    return commands


def owned(command: list[str]) -> tuple[str, list[str]] | None:
    """('cosed', argv) or ('ray', argv) for commands we parse; None for everyone else's (kubectl, aws, ...)."""
    if command[0] in ("cosed", ".venv/bin/cosed"):
        return "cosed", command[1:]
    if command[0].startswith("python") and len(command) > 1:
        if command[1:3] == ["-m", "cosed.cli"]:
            return "cosed", command[3:]
        if command[1].endswith("ray_jobs/generate.py"):
            return "cosed", ["generate", *command[2:]]
        if command[1].endswith("ray_jobs/train_selector.py"):
            return "cosed", ["train-selector", *command[2:]]
    if command[0] == "ray" and len(command) > 1:
        return "ray", command[1:]
    return None


def parse_ray(argv: list[str]) -> None:
    """Parse with Ray's own click groups, down to the command, without running it; the entrypoint after `--`
    of `ray job submit` is parsed as our command when it is ours."""
    from ray.scripts.scripts import cli

    entry = argv[argv.index("--") + 1:] if "--" in argv else []
    command, name, args, parent = cli, "ray", argv, None
    while True:
        ctx = command.make_context(name, list(args), parent=parent)
        if not isinstance(command, click.Group):
            break
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        assert rest, f"ray {' '.join(argv)}: no subcommand"
        name, command, args = command.resolve_command(ctx, rest)
        parent = ctx
    if entry:
        ours = owned(entry)
        if ours is not None:
            parse_owned(*ours)


def parse_owned(program: str, argv: list[str]) -> None:
    if program == "ray":
        parse_ray(argv)
    elif argv[:1] != ["--help"] and "--help" not in argv:
        build_parser().parse_args(argv)


def documented() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for command in shell_commands(doc.read_text(encoding="utf-8")):
            if owned(command) is not None:
                found.append((f"{doc.relative_to(REPO)}: {' '.join(command)}"[:160], command))
    return found


def test_the_docs_show_commands_of_ours():
    names = {owned(c)[0] for _, c in documented()}
    assert names == {"cosed", "ray"}


@pytest.mark.parametrize("where, command", documented(), ids=[w for w, _ in documented()])
def test_every_documented_command_parses(where, command):
    try:
        parse_owned(*owned(command))
    except SystemExit as exc:
        pytest.fail(f"{where}: the parser refused it (exit {exc.code})")
    except click.ClickException as exc:
        pytest.fail(f"{where}: {exc.format_message()}")


def test_the_reader_splits_and_cleans_commands():
    text = "```bash\nA=1 cosed generate --tasks t \\\n  --out o && ray status  # note\n" \
           "cat <<'EOF' > f\ncosed nonsense\nEOF\n```\n"
    assert shell_commands(text) == [["cosed", "generate", "--tasks", "t", "--out", "o"], ["ray", "status"],
                                    ["cat"]]
    with pytest.raises(SystemExit):
        parse_owned("cosed", ["generate", "--no-such-flag"])
    with pytest.raises(click.ClickException):
        parse_ray(["job", "submit", "--no-such-flag", "--", "python", "x.py"])
