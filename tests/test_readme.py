"""README's Quickstart runs what CI runs; README stays short and its links lead somewhere."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
DOCS = ROOT / "docs"
MAX_README_WORDS = 1500
QUIET_FLAGS = {"--quiet", "-q"}  # CI keeps pip quiet; with or without them the commands are the same
SHELL_SET_UP = {"set", "cd"}  # the CI script's own shell options and working folder


def command_chains(line: str) -> list[list[str]]:
    """The commands of one shell line, `a && b` as [a, b]; quotes and comments as the shell reads them."""
    chains = [[]]
    for token in shlex.split(line, comments=True):
        if token == "&&":
            chains.append([])
        elif token not in QUIET_FLAGS:
            chains[-1].append(token)
    return [chain for chain in chains if chain]


def installs_torch(command: list[str]) -> bool:
    """Whether a command is `pip install torch...` (the one step README and CI do differently, on purpose)."""
    return command[:2] == ["pip", "install"] and any(
        re.fullmatch(r"torch([=<>~!].*)?", arg) for arg in command[2:]
    )


def quickstart_lines() -> list[list[list[str]]]:
    """Each command line of the fenced blocks under README's Quickstart heading, as its commands."""
    match = re.search(r"^## Quickstart\n(.*?)(?=^## |\Z)", README.read_text(), re.M | re.S)
    assert match, "README has no '## Quickstart' section"
    blocks = re.findall(r"^```\w*\n(.*?)^```", match.group(1), re.M | re.S)
    return [commands for block in blocks for line in block.splitlines() if (commands := command_chains(line))]


def ci_commands() -> list[list[str]]:
    """The commands .ci/run executes, in order, without its shell set-up and its guarded torch install."""
    commands = []
    for line in CI_SCRIPT.read_text().splitlines():
        for command in command_chains(line):
            if command[0] in SHELL_SET_UP or any(installs_torch(alt) for alt in alternatives(command)):
                continue
            commands.append(command)
    return commands


def alternatives(command: list[str]) -> list[list[str]]:
    """`a || b` as [a, b] (b runs only when a fails); a plain command as [command]."""
    parts = [[]]
    for token in command:
        if token == "||":
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def pip_install_parts(command: list[str]) -> tuple[tuple[str, ...], set[str]]:
    """The options and the requirement files (`-r FILE`) of a `pip install` command."""
    files = {arg for flag, arg in zip(command, command[1:]) if flag == "-r"}
    options = tuple(arg for arg in command[2:] if arg != "-r" and arg not in files)
    return options, files


def markdown_links(path: Path) -> list[str]:
    """Targets of the relative links and images in a markdown file."""
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    return [target for target in targets if not re.match(r"[a-z]+://", target)]


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a markdown file's headings: lowercase, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_quickstart_test_command_is_what_ci_runs():
    ci = ci_commands()
    lines = [line for line in quickstart_lines() if not all(installs_torch(c) for c in line)]
    test_lines = [line for line in lines if line[-1] == ci[-1]]
    assert len(test_lines) == 1, (
        f"README's Quickstart should have one line ending in CI's {shlex.join(ci[-1])!r}"
    )
    assert [shlex.join(c) for c in test_lines[0]] == [shlex.join(c) for c in ci]


def test_quickstart_main_command_installs_what_ci_installs():
    ci = ci_commands()
    lines = [line for line in quickstart_lines() if not all(installs_torch(c) for c in line)]
    main_lines = [line for line in lines if line[-1] != ci[-1]]
    assert len(main_lines) == 1, "README's Quickstart should hold two commands: the main job and the tests"
    *installs, job = main_lines[0]
    ci_installs = [pip_install_parts(c) for c in ci if c[:2] == ["pip", "install"]]
    for install in installs:
        assert install[:2] == ["pip", "install"], f"{shlex.join(install)!r} is not an install"
        options, files = pip_install_parts(install)
        assert any(options == ci_options and files <= ci_files for ci_options, ci_files in ci_installs), (
            f"CI does not run {shlex.join(install)!r}"
        )
    assert job[0] == "python" and (ROOT / job[1]).is_file(), (
        f"{shlex.join(job)!r} runs no script of the package"
    )


def test_readme_is_short():
    words = len(README.read_text().split())
    assert words <= MAX_README_WORDS, f"README has {words} words; the limit is {MAX_README_WORDS}"


def test_links_resolve():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    for page in pages:
        for target in markdown_links(page):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{page.name} links to {target}, which does not exist"
            if anchor and linked.suffix == ".md":
                assert anchor in heading_anchors(linked), f"{page.name} links to {target}: no such heading"
    assert any(target.startswith("docs/") for target in markdown_links(README))
