"""Every repository path and `llmshearing.*` name the text cites exists (issue 24: a map that is true).

The README's layout, the docs, docstrings, comments and recipe comments name files (`llmshearing/pruning/masks.py`,
`docs/plan.md`, `tests/test_model.py`, `yamls/prune_1.3b.yaml`) and modules or their attributes
(`llmshearing.pruning.oneshot`, `llmshearing.registry.callbacks`). A file or name that moved leaves those behind; this
finds them by reading text only (the AST of the cited module, no imports), so it stays fast.
Not checked, by rule: URLs; lines that cite the paper's released code (princeton-nlp/LLM-Shearing names its own
`llmshearing/...` files); paths under folders a run writes (runs/, data/, ...)."""
import ast
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = ("llmshearing", "tests", "docs", "bench", "yamls", "data_prep", "callbacks")
PATH_RE = re.compile(r"(?<![\w./-])((?:%s)/[\w./*{,}-]*[\w*}])" % "|".join(TOP))
# `pruning/shapes.py`: a module named by its path inside the package
SUB_RE = re.compile(r"(?<![\w./-])((?:model|pruning|data|train|eval|experiments)/[\w/]+\.py)\b")
NAME_RE = re.compile(r"(?<![\w./-])(llmshearing(?:\.\w+)+)")
URL_RE = re.compile(r"\w+://\S+")
# a line that names the released code's own files (docs/fidelity.md, comments beside what they match)
THEIRS_RE = re.compile(r"LLM-Shearing|princeton-nlp|released code|the paper's code|upstream", re.I)
# the released code's own files where a table cites them without saying whose they are (docs/fidelity.md)
THEIRS_PATHS = re.compile(r"llmshearing/(models|scripts|datasets|utils)/|callbacks/dynamic_loading_callback")
# files a command writes (`--out X`, a report's default name) and placeholders (yamls/models/MODEL.json)
OUTPUT_RE = re.compile(r"(--out|report:|default:)\s*$")
PLACEHOLDER_RE = re.compile(r"/[A-Z]+(\.\w+)?$")
# `module.name` in backticks, by a module's short name: the module (or one of that name) must define `name`;
# the short names of modules that were renamed away (git log) are stale wherever they are used so
SHORT_RE = re.compile(r"`(\w+)\.(\w+)(?:\(\))?`")
FORMER = {"prune", "arch", "reference", "pruning_monitor", "eval_tasks"}
# short names that are also a recipe section or a file's field (`distill.teacher`, `tokenizer.fingerprint`)
NOT_MODULES = {"config", "fsdp", "distill", "tokenizer", "plan", "plan_trace", "train"}
EXTENSIONS = {"py", "json", "jsonl", "md", "yaml", "txt", "ggml", "gguf", "pt", "safetensors"}
PACKAGE_DIRS = {"llmshearing.recipes": "yamls", "llmshearing.callbacks": "callbacks",
                "llmshearing.data_prep": "data_prep"}  # pyproject's package-dir


def _tracked():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if f.endswith((".py", ".md", ".yaml", ".toml")) or f in ("Makefile",)
            if not f.startswith("tests/fixtures/") and f != "tests/test_repo_map.py"]  # its cases are stale on purpose


def _expand(path):
    """`a/b-{x,y}.json` -> a/b-x.json, a/b-y.json (the brace form the docs use for runs of one name)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand(path[:m.start()] + alt + path[m.end():])]


def _path_exists(path):
    import glob
    path = path.rstrip(".")
    if "}" in path and "{" not in path:  # ${oc.env:NAME,yamls/x.yaml}
        path = path[:path.index("}")]
    if re.search(r"\{\w*\}", path):  # an f-string's placeholder: yamls/{name}
        return True
    if "{" in path:
        return all(_path_exists(p) for p in _expand(path))
    if "*" in path:
        return bool(glob.glob(os.path.join(ROOT, path)))
    for prefix, folder in PACKAGE_DIRS.items():  # an installed path: llmshearing/callbacks/run_guard.py
        installed = prefix.replace(".", "/") + "/"
        if path.startswith(installed):
            path = folder + "/" + path[len(installed):]
    return os.path.exists(os.path.join(ROOT, path))


def _module_file(dotted):
    for prefix, folder in PACKAGE_DIRS.items():
        if dotted == prefix or dotted.startswith(prefix + "."):
            return os.path.join(ROOT, folder, *dotted[len(prefix) + 1:].split(".")) if dotted != prefix else \
                os.path.join(ROOT, folder, "__init__.py")
    base = os.path.join(ROOT, *dotted.split("."))
    for f in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(f):
            return f
    return base if os.path.exists(base) else None  # a data file's folder (eval/tasks/...)


def _short_modules():
    out = {}
    for f in _tracked():
        if f.endswith(".py") and not f.startswith("tests/") and not f.endswith("__init__.py"):
            out.setdefault(os.path.basename(f)[:-3], []).append(os.path.join(ROOT, f))
    return out


def _top_names(pyfile):
    tree = ast.parse(open(pyfile, encoding="utf-8").read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _name_exists(dotted):
    """`llmshearing.a.b` is a module (or package folder), or a module's top-level name, or a class's attribute."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        f = _module_file(".".join(parts[:i]))
        if f is None:
            continue
        rest = parts[i:]
        if not rest:
            return True
        if not f.endswith(".py"):
            return os.path.exists(os.path.join(f, *rest)) or os.path.exists(os.path.join(f, *rest[:-1]) + "." + rest[-1])
        return rest[0] in _top_names(f)
    return False


def stale_references(text):
    """(cited, kind) for every path or name in `text` that does not exist in the repository."""
    bad = []
    for line in text.splitlines():
        if THEIRS_RE.search(line):
            continue
        line = URL_RE.sub(" ", line)
        for m in PATH_RE.finditer(line):
            if THEIRS_PATHS.match(m.group(1)) or OUTPUT_RE.search(line[:m.start()]) or PLACEHOLDER_RE.search(m.group(1)):
                continue
            if not _path_exists(m.group(1)):
                bad.append((m.group(1), "path"))
        for m in SUB_RE.finditer(line):
            if not os.path.exists(os.path.join(ROOT, "llmshearing", m.group(1))):
                bad.append((m.group(1), "path in the package"))
        for m in NAME_RE.finditer(line):
            name = m.group(1).rstrip(".")
            if name.endswith((".py", ".yaml", ".md", ".jsonl", ".json")) or re.search(r"\.__\w+__$", name):
                continue
            if not _name_exists(name):
                bad.append((name, "name"))
        for m in SHORT_RE.finditer(line):
            mod, attr = m.groups()
            if attr in EXTENSIONS or mod in NOT_MODULES:
                continue
            if mod in FORMER or (mod in SHORT and not any(attr in _top_names(f) for f in SHORT[mod])):
                bad.append((f"{mod}.{attr}", "short name"))
    return bad


SHORT = _short_modules()
LINK_RE = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def broken_links(md_file, text):
    """Markdown links `[x](target)` that are relative to the page and lead nowhere."""
    here = os.path.dirname(os.path.join(ROOT, md_file))
    return [t for t in LINK_RE.findall(text) if "://" not in t and not t.startswith("mailto:")
            and not os.path.exists(os.path.normpath(os.path.join(here, t)))]


def test_every_cited_path_and_name_exists():
    found = []
    for f in _tracked():
        text = open(os.path.join(ROOT, f), encoding="utf-8").read()
        found += [f"{f}: {cited} ({kind})" for cited, kind in stale_references(text)]
        if f.endswith(".md"):
            found += [f"{f}: {t} (link)" for t in broken_links(f, text)]
    assert not found, "stale references:\n" + "\n".join(found)


@pytest.mark.parametrize("text", [
    "see `llmshearing/prune.py` for the rule",            # a module that moved
    "docs/no_such_page.md states it",                     # a doc that never was
    "as in tests/test_compat.py",                         # a test file that is not there
    "call `llmshearing.pruning.masks.finalize_mask`",     # an attribute the module lacks
    "python -m llmshearing.oneshot",                      # a module that is not there
    "the slicer is `prune.finalize`",                     # a module's old short name
    "`masks.finalize` slices",                            # a short name's module lacks it
    "reports in docs/throughput/smollm2-cpu-run{1,9}.json",  # one of a brace form is missing
    "counts in pruning/arch.py",                          # a path inside the package
])
def test_a_stale_reference_is_caught(text):
    assert stale_references(text)


@pytest.mark.parametrize("text", [
    "llmshearing/pruning/masks.py and docs/plan.md",
    "`llmshearing.pruning.oneshot.activation_scores`, `llmshearing.recipes`",
    "the released code's llmshearing/models/composer_llama.py",   # the paper's repository, not this one
    "https://github.com/x/y/blob/main/docs/other.md",
    "`export.finalize` and `oneshot.activation_scores`; docs/throughput/smollm2-cpu-run{1,2}.json",
    "python -m bench.fsdp --out docs/throughput/new.json",       # an output
])
def test_existing_and_foreign_references_pass(text):
    assert not stale_references(text)


def test_a_broken_link_is_caught():
    assert broken_links("docs/x.md", "[figure](reproduce_mini/loss_curves.png) [gone](runs/nothing.md)") == \
        ["runs/nothing.md"]


def readme_map():
    """The README's map of the code: the paths its first column names (indented ones relative to the folder above)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths, folder = [], ""
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        first = re.split(r"\s{2,}", line.strip())[0]
        if indent >= 10:  # a continued description
            continue
        names = [n.strip() for n in first.split(",")]
        if indent == 0:
            folder = names[0] if names[0].endswith("/") else ""
            paths += names
        else:
            paths += [folder + n for n in names]
    return paths


def test_the_readme_map_is_true_and_complete():
    paths = readme_map()
    assert len(paths) > 30
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"the README's layout names what is not there: {missing}"
    # every module of the package is on the map, by itself or by the folder named for it
    named = [p for p in paths if p.startswith("llmshearing/")]
    unmapped = [f for f in _tracked() if f.startswith("llmshearing/") and f.endswith(".py")
                and not f.endswith("__init__.py") and not any(f == p or (p.endswith("/") and f.startswith(p))
                                                              for p in named)]
    assert not unmapped, f"modules missing from the README's layout: {unmapped}"
