"""
README.md and docs/*.md against the repository: what they name exists, and the README's quick start is what the
suite runs. Offline, no model, a few seconds.

The rules, one test each:
1. Links. Every markdown link or image `[text](target)` outside code, whose target has no URL scheme (http:,
   https:, mailto:), resolves relative to its page to a file or folder of the repository; a `#anchor` is a heading
   of the target page (GitHub's rule: lower case, punctuation dropped, spaces to hyphens).
2. Repository files. In code spans and fenced blocks, every token that names a file of this repository exists:
   a bare file name ending in .py, .md, .txt, .ini or .json (`train.py`, `ds_zero3.json`), or a path under docs/
   or .ci/. Not checked: paths under data/, runs/ and results/ (made by a run or a download), ../shared/ (the
   optional real files outside the repository; the tests that read them skip without them, docs/testing.md),
   absolute paths and URLs, any other path with a folder (another repository's file: transformers', DeepSpeed's,
   Video-R1's, always named with its folder), and the bare names in NOT_REPOSITORY_FILES (files of a model folder
   or a run folder, and a script the docs tell you to write).
3. Names. A code span that is a test name (`test_...`) names a test function defined in a test_*.py; a code span
   starting `module.name`, for a module of the repository, names a top-level function, class or constant of it.
4. The quick start. Each command of the README's "Quick start" section (its ```bash blocks; comments dropped,
   continuations joined, `&&` split; a block without a language is output) is one of:
   - `python X.py FLAGS`: a test of the suite (test_docs.py aside) runs X.py with every one of FLAGS: as a subprocess
     (the string "X.py" in its argv, or a `python -c` script calling `X.main(`) or in-process (`X.main([...])`),
     counting the helpers and module constants the test's body uses (not its parametrize table, which lists inputs,
     often bad ones). Flag values may differ: the suite points them at temporary folders and shortens the runs.
   - `pytest`: a command .ci/run runs.
   - set-up: `python3 -m venv DIR`, `source DIR/bin/activate` (DIR made by the venv line), `pip install -r FILE`
     (FILE exists, and the quick start installs every requirements file .ci/run installs), `pip install PKG==VER`
     (VER is requirements.txt's pin).
   - `./NAME.sh ARGS`: a set-up script that .ci/run runs too; its python, pip, source and pytest lines follow these
     rules (its demo line included).
5. Flags. docs/training.md's flag tables list every field of train.Config with its default; the README's table lists
   real flags with their true defaults.
Each rule's checker is also run on a small made-up repository with one fault of each kind, which it must report.
"""
import ast
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
MODULES = ("train", "model", "rewards", "data", "checkpoint", "eval", "plot", "bench", "tiny")
NOT_REPOSITORY_FILES = {
    # files of a Qwen model folder (the hub's, or a run's final/)
    "config.json", "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "tokenizer_config.json", "chat_template.json", "tokenizer.json", "vocab.json", "merges.txt",
    "run_config.json",  # written into a run's folder
    "rss_probe.py",  # docs/models.md gives its text: save it, then run it
}
GENERATED = ("data/", "runs/", "results/", "../shared/")
REPO_FILE = re.compile(r"[\w.-]+\.(?:py|md|txt|ini|json)")
FILE_SUFFIXES = {"py", "md", "json", "txt", "ini", "png", "safetensors", "jsonl"}


def pages(repo=REPO):
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------------------------------- markdown

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def fenced_blocks(text, languages=None):
    """Bodies of the ``` blocks, or of those whose info string is one of `languages`."""
    return [body for info, body in FENCE.findall(text) if languages is None or info.strip() in languages]


def prose(text):
    """The page without its fenced blocks."""
    return FENCE.sub("", text)


def code_spans(text):
    return re.findall(r"`([^`\n]+)`", prose(text))


def links(text):
    """Targets of [text](target) and ![alt](target) outside code."""
    plain = re.sub(r"`[^`\n]+`", "", prose(text))
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", plain)


def anchors(text):
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens; a repeated heading gets -1, -2."""
    seen, out = {}, set()
    for line in prose(text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def section(text, title):
    """The lines under the `## title` heading, up to the next heading of level 1 or 2."""
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^#{{1,2}} |\Z)", text, re.S | re.M)
    return m.group(1) if m else ""


# ---------------------------------------------------------------------------------------------------------------- checkers

def link_problems(page, repo=REPO):
    text = page.read_text()
    problems = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or repo.resolve() not in [dest, *dest.parents]:
            problems.append(f"{page.name}: link {target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{page.name}: link {target}: no heading #{anchor} in {dest.name}")
    return problems


def path_tokens(text):
    """Tokens of code spans and fenced blocks that look like paths or file names."""
    for chunk in [*code_spans(text), *fenced_blocks(text)]:
        for token in re.split(r"[\s`'\"()\[\]{},;=|<>]+|::", chunk):
            token = token.rstrip(".:")
            if token:
                yield token


def path_problems(page, repo=REPO):
    problems = []
    for token in sorted(set(path_tokens(page.read_text()))):
        if token.startswith(GENERATED) or token.startswith(("/", "~", "$")) or "://" in token or "*" in token:
            continue
        if "/" in token:
            if token.split("/")[0] not in ("docs", ".ci"):
                continue  # another repository's file, named with its folder
        elif not REPO_FILE.fullmatch(token) or token in NOT_REPOSITORY_FILES:
            continue
        if not (repo / token).exists():
            problems.append(f"{page.name}: `{token}`: no such file in the repository")
    return problems


def top_level_names(path):
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def name_problems(page, repo=REPO):
    tests = set().union(*[{n for n in top_level_names(f) if n.startswith("test_")} for f in repo.glob("test_*.py")])
    modules = {m: top_level_names(repo / f"{m}.py") for m in MODULES if (repo / f"{m}.py").exists()}
    problems = []
    for span in code_spans(page.read_text()):
        if re.fullmatch(r"test_\w+", span) and span not in tests:
            problems.append(f"{page.name}: `{span}`: no such test in test_*.py")
        m = re.match(r"(\w+)\.(\w+)", span)
        if m and m.group(1) in modules and m.group(2) not in FILE_SUFFIXES and m.group(2) not in modules[m.group(1)]:
            problems.append(f"{page.name}: `{span}`: {m.group(1)}.py has no top-level {m.group(2)}")
    return problems


# ---------------------------------------------------------------------------------------------------------------- commands

def commands(block):
    """The shell commands of a fenced block: comments dropped, continuations joined, `&&` split."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            if words[:cut]:
                out.append(words[:cut])
            words = words[cut + 1:]
    return out


def suite_runs(repo=REPO):
    """What each test of the suite runs: [(test, scripts it runs, every string it uses)], test_docs.py aside.
    A test's reach is its body plus the same-file functions and module constants it names, transitively."""
    found = []
    for path in sorted(repo.glob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for a in node.names if a.name in MODULES}
        top = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                top[node.name] = node
            elif isinstance(node, ast.Assign):
                top.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        for name, node in top.items():
            if not name.startswith("test_") or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            # the body only: a parametrize table in the decorators lists inputs, often bad ones that must fail
            reach, todo = {name}, list(node.body)
            strings, scripts = set(), set()
            while todo:
                for sub in ast.walk(todo.pop()):
                    if isinstance(sub, ast.Name) and sub.id in top and sub.id not in reach:
                        reach.add(sub.id)
                        todo.append(top[sub.id])
                    elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        strings.add(sub.value)
                    elif (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "main"
                          and isinstance(sub.func.value, ast.Name) and sub.func.value.id in aliases):
                        scripts.add(aliases[sub.func.value.id] + ".py")
            for s in strings:
                scripts |= {f"{m}.py" for m in MODULES if s == f"{m}.py" or s.endswith(f"/{m}.py") or f"{m}.main(" in s}
            found.append((f"{path.name}::{name}", scripts, strings))
    return found


def requirement_pins(repo=REPO):
    pins = {}
    for f in repo.glob("requirements*.txt"):
        for line in f.read_text().splitlines():
            m = re.match(r"\s*([A-Za-z0-9_.-]+)==([^\s#;]+)", line)
            if m:
                pins[m.group(1).lower()] = m.group(2)
    return pins


def script_commands(script):
    """The commands of a set-up script (./setup.sh) that the quick-start rules read: its python, pip, source and pytest
    lines (the shell's own control lines aside)."""
    return [cmd for cmd in commands(script) if cmd[0] in ("python", "python3", "pip", "source", ".", "pytest")]


def command_problems(cmds, runs, ci_commands, repo=REPO):
    """Each quick-start command must be run by the suite, be CI's test command, or be one of the set-up steps; a
    set-up script (`./setup.sh ARGS`) must be run by .ci/run too, and its own commands follow the same rules."""
    problems, venvs, installed = [], set(), set()
    pins = requirement_pins(repo)
    todo = list(cmds)
    while todo:
        cmd = todo.pop(0)
        shown = " ".join(cmd)
        if re.fullmatch(r"\./[\w.-]+\.sh", cmd[0]):
            if not (repo / cmd[0]).is_file():
                problems.append(f"quick start: `{shown}`: no file {cmd[0]}")
            elif not any(c[0] == cmd[0] for c in ci_commands):
                problems.append(f"quick start: `{shown}`: .ci/run does not run {cmd[0]}")
            else:
                todo[:0] = script_commands((repo / cmd[0]).read_text())
        elif cmd[0] in ("python", "python3") and len(cmd) > 1 and cmd[1].endswith(".py"):
            flags = {w.split("=")[0] for w in cmd[2:] if w.startswith("--")}
            if not any(cmd[1] in scripts and flags <= strings for _, scripts, strings in runs):
                problems.append(f"quick start: `{shown}`: no test runs {cmd[1]} with {sorted(flags)}")
        elif cmd[0] == "pytest":
            if cmd not in ci_commands:
                problems.append(f"quick start: `{shown}`: .ci/run does not run it")
        elif cmd[0] in ("python", "python3") and cmd[1:3] == ["-m", "venv"] and len(cmd) == 4:
            venvs.add(cmd[3].rstrip("/"))
        elif cmd[0] in ("source", ".") and len(cmd) == 2:
            if cmd[1].removesuffix("/bin/activate") not in venvs:
                problems.append(f"quick start: `{shown}`: activates no environment made above")
        elif cmd[:2] == ["pip", "install"]:
            words = iter(w for w in cmd[2:] if w != "-q")
            for word in words:
                if word == "-r":
                    file = next(words, "")
                    installed.add(file)
                    if not (repo / file).is_file():
                        problems.append(f"quick start: `{shown}`: no file {file}")
                elif "==" in word:
                    name, version = word.split("==", 1)
                    if pins.get(name.lower()) != version:
                        problems.append(f"quick start: `{shown}`: requirements pin {name}=={pins.get(name.lower())}")
                elif word in ("--index-url", "--extra-index-url"):
                    next(words, None)
        else:
            problems.append(f"quick start: `{shown}`: not a command the suite runs nor a set-up step")
    ci_files = {c[c.index("-r") + 1] for c in ci_commands if c[0].endswith("pip") and "-r" in c[:-1]}
    for file in sorted(ci_files - installed):
        problems.append(f"quick start: installs no {file}, which .ci/run installs")
    return problems


def config_defaults(repo=REPO):
    """train.Config's fields and their defaults, read from train.py's source (no torch import): {name: default}."""
    tree = ast.parse((repo / "train.py").read_text())
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    return {node.target.id: ast.literal_eval(next(k.value for k in node.value.keywords if k.arg == "default"))
            for node in config.body if isinstance(node, ast.AnnAssign)}


def flag_table_problems(text, defaults, where, complete):
    """The `| `--flag` | default | meaning |` rows of a page: each names a Config field and shows its default (`on` /
    `off` for booleans, `''` for an empty string, a number or a code span otherwise; a row of several flags gives one
    default each, or one for all). complete: every field has a row."""
    problems, named = [], set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `--") or len(cells) < 3:
            continue
        flags = re.findall(r"`--([\w-]+)`", cells[0])
        items = re.findall(r"`[^`]*`|[^,\s][^,]*", cells[1])  # code spans (commas and all) or plain words
        shown = [(item.strip("`") if item.startswith("`") else item.split()[0]).replace("−", "-") for item in items]
        if len(shown) == 1:
            shown = shown * len(flags)
        if len(shown) != len(flags):
            problems.append(f"{where}: row {cells[0]}: {len(flags)} flags, {len(shown)} defaults")
            continue
        for flag, value in zip(flags, shown):
            named.add(flag)
            if flag not in defaults:
                problems.append(f"{where}: `--{flag}`: not a train.py flag")
                continue
            default = defaults[flag]
            if isinstance(default, bool):
                ok = value in ("on", "off") and (value == "on") == default
            elif isinstance(default, str):
                ok = value == default or (default == "" and value == "''")
            else:
                try:
                    ok = float(value) == default
                except ValueError:
                    ok = False
            if not ok:
                problems.append(f"{where}: `--{flag}`: default shown {value!r}, train.Config has {default!r}")
    if complete:
        problems += [f"{where}: `--{name}` missing" for name in defaults if name not in named]
    return problems


def ci_commands(repo=REPO):
    """.ci/run's commands, and those of the set-up scripts it runs."""
    cmds = commands((repo / ".ci" / "run").read_text())
    scripts = [c[0] for c in cmds if re.fullmatch(r"\./[\w.-]+\.sh", c[0]) and (repo / c[0]).is_file()]
    return cmds + [c for s in scripts for c in script_commands((repo / s).read_text())]


def quick_start(repo=REPO):
    blocks = fenced_blocks(section((repo / "README.md").read_text(), "Quick start"), languages=("bash", "sh", "shell"))
    return [cmd for block in blocks for cmd in commands(block)]


# ---------------------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_links_resolve(page):
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_named_repository_files_exist(page):
    problems = path_problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_named_tests_and_functions_exist(page):
    problems = name_problems(page)
    assert not problems, "\n".join(problems)


def test_quick_start_commands_are_run_by_the_suite():
    cmds = quick_start()
    # the quick start has the set-up script (it runs the demo) and the test command: not an empty section
    assert ["./setup.sh"] in cmds and ["pytest"] in cmds and ["python", "train.py", "--tiny"] in cmds, cmds
    assert ["python", "train.py", "--tiny", "--overwrite_output_dir"] in script_commands((REPO / "setup.sh").read_text())
    problems = command_problems(cmds, suite_runs(), ci_commands())
    assert not problems, "\n".join(problems)


def test_flags_tables_match_config():
    # docs/training.md lists every train.py flag with its default; the README's table, the main ones, with true defaults
    defaults = config_defaults()
    assert len(defaults) > 60 and defaults["beta"] == 0.04 and defaults["bf16"] is True  # the parse found Config
    problems = flag_table_problems(section((REPO / "docs" / "training.md").read_text(), "Flags"), defaults,
                                   "docs/training.md", complete=True)
    problems += flag_table_problems((REPO / "README.md").read_text(), defaults, "README.md", complete=False)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path):
    # a made-up repository with one fault of each kind; each checker must report it
    (tmp_path / "docs").mkdir()
    (tmp_path / "train.py").write_text("def grpo_loss():\n    pass\n")
    (tmp_path / "test_x.py").write_text(
        'import subprocess, sys\n'
        'def test_demo():\n    subprocess.run([sys.executable, "train.py", "--tiny"])\n')
    (tmp_path / "requirements.txt").write_text("torch==2.13.0\n")
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Flags\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#flags) [gone](docs/b.md) [bad anchor](docs/a.md#nope) [web](https://x.org/y.md)\n"
                    "`train.py`, `trian.py`, `docs/a.md`, `data/made_by_a_run.json`, `config.json`\n"
                    "`test_demo`, `test_missing`, `train.grpo_loss`, `train.no_such_name`\n")
    assert link_problems(page, tmp_path) == [
        "README.md: link docs/b.md: no such file in the repository",
        "README.md: link docs/a.md#nope: no heading #nope in a.md"]
    assert path_problems(page, tmp_path) == ["README.md: `trian.py`: no such file in the repository"]
    assert name_problems(page, tmp_path) == ["README.md: `test_missing`: no such test in test_*.py",
                                             "README.md: `train.no_such_name`: train.py has no top-level no_such_name"]
    runs = suite_runs(tmp_path)
    assert runs[0][:2] == ("test_x.py::test_demo", {"train.py"})
    ci = [["pip", "install", "-r", "requirements.txt"], ["pytest"]]
    good = commands("python3 -m venv .venv && source .venv/bin/activate\npip install -r requirements.txt\n"
                    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu\n"
                    "python train.py --tiny   # the demo\npytest\n")
    assert command_problems(good, runs, ci, tmp_path) == []
    (tmp_path / "setup.sh").write_text("set -e\nif [ ! -x .venv/bin/python ]; then\n  python3 -m venv .venv\nfi\n"
                                       "source .venv/bin/activate\npip install -q -r requirements.txt\n"
                                       "python train.py --tiny --lora_rank 8\n")
    scripted = commands("./setup.sh\nsource .venv/bin/activate && pytest\n./missing.sh\n")
    assert command_problems(scripted, runs, ci + [["./setup.sh", "--no-demo"]], tmp_path) == [
        "quick start: `python train.py --tiny --lora_rank 8`: no test runs train.py with ['--lora_rank', '--tiny']",
        "quick start: `./missing.sh`: no file ./missing.sh"]
    assert command_problems(scripted[:1], runs, ci, tmp_path)[0] == "quick start: `./setup.sh`: .ci/run does not run ./setup.sh"
    bad = commands("source env/bin/activate\npip install torch==2.12.0\npython train.py --tiny --lora_rank 8\n"
                   "python eval.py --tiny\npytest -x\nmake demo\n")
    assert command_problems(bad, runs, ci, tmp_path) == [
        "quick start: `source env/bin/activate`: activates no environment made above",
        "quick start: `pip install torch==2.12.0`: requirements pin torch==2.13.0",
        "quick start: `python train.py --tiny --lora_rank 8`: no test runs train.py with ['--lora_rank', '--tiny']",
        "quick start: `python eval.py --tiny`: no test runs eval.py with ['--tiny']",
        "quick start: `pytest -x`: .ci/run does not run it",
        "quick start: `make demo`: not a command the suite runs nor a set-up step",
        "quick start: installs no requirements.txt, which .ci/run installs"]
    defaults = {"beta": 0.04, "bf16": True, "run_name": "", "rewards": "accuracy,format", "max_steps": -1}
    table = ("| `--beta` | 0.4 | typo |\n| `--bf16`, `--rewards` | on, `accuracy,format` | fine |\n"
             "| `--max_steps` | −1 | fine |\n| `--no_such` | `1` | gone |\n| `--run_name` | `x`, `y` | two |\n")
    assert flag_table_problems(table, defaults, "t.md", complete=True) == [
        "t.md: `--beta`: default shown '0.4', train.Config has 0.04", "t.md: `--no_such`: not a train.py flag",
        "t.md: row `--run_name`: 1 flags, 2 defaults", "t.md: `--run_name` missing"]
