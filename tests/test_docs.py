"""The README and docs/: the README's length, relative links, the CLI options their shell snippets use, and the
snippets marked `toy` (```bash toy / ```python toy) run as written on the embedded toy backbone."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from mmdiff_gen.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SEPARATORS = {"|", "||", "&", "&&", ";", ";;", "(", ")", "<", ">", ">>", "2>", "&>"}


def blocks(page: Path) -> list[tuple[list[str], str, int]]:
    """Every fenced block of a page: (info-string words, body, line number of its opening fence)."""
    text = page.read_text()
    return [(m["info"].split(), m["body"], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def shell_lines(body: str) -> list[str]:
    """A shell snippet's logical lines: continuations joined, blank lines dropped."""
    return [ln.strip() for ln in body.replace("\\\n", " ").splitlines() if ln.strip()]


def shell_words(line: str) -> list[str]:
    """Words and operators of one shell line, comments dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def cli_invocations(body: str):
    """Each `mmdiff-gen …` (or `python -m mmdiff_gen.cli …`, torchrun's) of a shell snippet, as its words after the
    program, with the snippet's own `NAME=value` variables expanded."""
    variables: dict[str, list[str]] = {}
    for line in shell_lines(body):
        words = shell_words(line)
        segment: list[str] = []
        for w in [*words, ";"]:
            if w not in SEPARATORS:
                segment.append(w)
                continue
            assigned = [re.fullmatch(r"([A-Za-z_]\w*)=(.*)", s, re.S) for s in segment]
            if segment and all(assigned):
                variables.update({m[1]: m[2].split() for m in assigned})
            else:
                expanded = [x for s in segment for x in _expand(s, variables)]
                starts = [i for i, s in enumerate(expanded) if s in ("mmdiff-gen", "mmdiff_gen.cli")]
                if starts:
                    yield expanded[starts[0] + 1:]
            segment = []


def _expand(word: str, variables: dict[str, list[str]]) -> list[str]:
    m = re.fullmatch(r"\$\{?(\w+)\}?", word)
    return variables.get(m[1], [word]) if m else [word]


def command_options() -> dict[tuple[str, ...], set[str]]:
    """{command path: its option names} from the Typer app; () holds the global ones (--verbose, --version)."""
    table: dict[tuple[str, ...], set[str]] = {}

    def walk(cmd, path):
        table[path] = {o for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}
        table[path].add("--help")
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return table


OPTIONS = command_options()


def test_readme_is_at_most_300_lines():
    n = len(README.read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines: move the detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files_without_anchors(page):
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    links = [u for u in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", u)]
    assert not [u for u in links if "#" in u], "anchors rot when a heading changes: link the file"
    missing = [u for u in links if not (page.parent / u).exists()]
    assert not missing, f"{page.name}: links to files that do not exist: {missing}"


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text()
    orphans = [p.name for p in PAGES[1:] if f"](docs/{p.name})" not in text]
    assert not orphans, f"docs pages the README does not list: {orphans}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shell_snippets_use_only_options_that_exist(page):
    checked, wrong = 0, []
    for info, body, line in blocks(page):
        if not info or info[0] not in ("bash", "sh", "shell"):
            continue
        for words in cli_invocations(body):
            while words and words[0] in OPTIONS[()]:  # global options before the command
                words = words[1:]
            path: tuple[str, ...] = ()
            while words and not words[0].startswith("-") and (*path, words[0]) in OPTIONS:
                path, words = (*path, words[0]), words[1:]
            if not path:
                wrong.append(f"line {line}: no such command: mmdiff-gen {' '.join(words[:2])}")
                continue
            if any(len(k) > len(path) and k[:len(path)] == path for k in OPTIONS):
                wrong.append(f"line {line}: `mmdiff-gen {' '.join(path)}` needs a subcommand")
                continue
            for w in words:
                if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", w, re.S):
                    name = w.split("=", 1)[0]
                    checked += 1
                    if name not in OPTIONS[path]:
                        wrong.append(f"line {line}: mmdiff-gen {' '.join(path)} has no option {name}")
    assert not wrong, f"{page.name}:\n" + "\n".join(wrong)
    if page == README:
        assert checked >= 20  # the parser found the README's commands


# --- toy snippets: run as written, in document order, in one working folder --------------------------------------

TOY = [(page, info[0], body, line) for page in PAGES for info, body, line in blocks(page) if "toy" in info[1:]]


def _toy_id(snippet) -> str:
    page, lang, _, line = snippet
    return f"{page.relative_to(ROOT).as_posix()}:{line}:{lang}"


def _run_shell(body: str) -> None:
    output = ""
    for line in shell_lines(body):
        if line.startswith("# →"):  # the output the line above prints
            want = " ".join(line[len("# →"):].split())
            assert want in " ".join(output.split()), f"expected {want!r} in:\n{output}"
            continue
        words = shell_words(line)
        if not words:
            continue
        assert words[0] == "mmdiff-gen" and not SEPARATORS & set(words), f"not one mmdiff-gen command: {line}"
        res = CliRunner().invoke(app, words[1:])
        output = res.output
        assert res.exit_code == 0, f"{line}\nexit {res.exit_code}: {output}{res.exception!r}"


def _run_python(body: str, name: str) -> None:
    """Run a Python snippet; a `# → TEXT` comment on a line says that TEXT appears in what the snippet prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(body, name, "exec"), {"__name__": "__docs__"})
    for want in re.findall(r"# → (.*)$", body, re.M):
        assert " ".join(want.split()) in " ".join(out.getvalue().split()), f"expected {want!r} in:\n{out.getvalue()}"


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """Run every toy snippet once, in order (later ones read what earlier ones wrote); record each outcome."""
    import datasets.config

    work = tmp_path_factory.mktemp("docs")
    (work / "prompts").symlink_to(ROOT / "prompts")
    outcomes: dict[str, str | None] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, a second thread waiting on a busy core made generation 9× slower
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(work)
            mp.setattr(datasets.config, "HF_DATASETS_CACHE", work / ".hf_cache")  # not the home folder's cache
            for snippet in TOY:
                _, lang, body, _ = snippet
                try:
                    _run_python(body, _toy_id(snippet)) if lang == "python" else _run_shell(body)
                    outcomes[_toy_id(snippet)] = None
                except Exception as e:  # reported by the snippet's own test
                    outcomes[_toy_id(snippet)] = f"{type(e).__name__}: {e}"
    finally:
        torch.set_num_threads(threads)
    return outcomes


def test_toy_snippets_are_found():
    langs = {(p.name, lang) for p, lang, _, _ in TOY}
    assert {("README.md", "bash"), ("README.md", "python")} <= langs
    assert all(lang in ("bash", "python") for _, lang, _, _ in TOY)


@pytest.mark.parametrize("snippet", TOY, ids=_toy_id)
def test_toy_snippet_runs_as_written(toy_runs, snippet):
    error = toy_runs[_toy_id(snippet)]
    assert error is None, f"{_toy_id(snippet)}:\n{snippet[2]}\n{error}"
