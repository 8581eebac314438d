"""The README and docs/ as a user reads them: every `roofserve ...` command shown parses (and its --help
runs), every relative link points at a file that exists, the knob reference matches the code, and the
README stays a short guide that opens with the two commands that matter."""

import re
import shlex
from pathlib import Path

import pytest

from roofserve.cli import build_parser
from roofserve.config import knob_reference

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
# `roofserve` or `.venv/bin/roofserve` at the start of a word, in a code block's line or an inline code span
COMMAND = re.compile(r"(?:^|[\s(])(?:\.venv/bin/)?roofserve ([^`]*)")
SPAN = re.compile(r"`([^`]+)`")
STOP = {"|", "||", "&&", "&", ";", ">", "...", "ARGS"}


def _snippets(text: str) -> list[tuple[bool, str]]:
    """(whole, text): code block lines (whole commands, to run as shown) and inline code spans (which
    may name a command without its arguments, as prose does)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        out += [(True, line)] if fenced else [(False, span) for span in SPAN.findall(line)]
    return out


def _commands() -> list[tuple[str, str, bool]]:
    found = []
    for page in PAGES:
        if page.parent.name == "example-report":
            continue
        for whole, snippet in _snippets(page.read_text()):
            for match in COMMAND.finditer(snippet):
                try:
                    tokens = shlex.split(match.group(1).replace("\\", " "), comments=True)
                except ValueError:  # a quote that closes on another line
                    continue
                words = []
                for word in tokens:
                    if word in STOP or word.endswith(";") or word.startswith(("<", ">")):
                        break
                    words.append(word.split("|")[0] if "|" in word and not word.startswith("-") else word)
                if words and words[0].islower() and not words[0].startswith(("-", ".", "/")):
                    found.append((page.relative_to(ROOT).as_posix(), shlex.join(words), whole))
    return sorted(set(found))


COMMANDS = _commands()


def test_the_pages_show_commands():
    assert len(COMMANDS) > 30 and any(c == "demo" for _, c, _ in COMMANDS)


@pytest.mark.parametrize("page, command, whole", COMMANDS, ids=[f"{p}: {c}"[:90] for p, c, _ in COMMANDS])
def test_every_command_shown_parses_and_its_help_runs(page, command, whole, capsys):
    """A command in a code block parses as shown; every command, with --help added, prints its help."""
    args = shlex.split(command)
    if whole and "--help" not in args:
        try:
            build_parser().parse_args(args)
        except SystemExit as e:
            pytest.fail(f"{page}: `roofserve {command}` does not parse (exit {e.code}): {capsys.readouterr().err}")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*args, "--help"])
    assert e.value.code == 0 and "usage: roofserve" in capsys.readouterr().out


def test_relative_links_point_at_files_that_exist():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken


def test_the_knob_reference_matches_the_config_dataclasses():
    assert (ROOT / "docs" / "knobs.md").read_text() == knob_reference(), "run: python scripts/write_knobs.py"


def test_the_readme_is_a_short_guide_that_opens_with_demo_and_test():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 250
    first_block = readme[readme.index("```bash") + 1:readme.index("```", readme.index("```bash") + 1)]
    assert [line.split()[:2] for line in first_block] == [["make", "demo"], ["make", "test"]]
