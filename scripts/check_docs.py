#!/usr/bin/env python3
"""The docs check, run by scripts/test.sh. Standard library only.

Reads README.md, CONTRIBUTING.md and docs/**/*.md and fails (exit 1, one line per problem) when:

  (a) a relative link does not resolve: the file or folder is missing, or its #anchor matches
      no heading of the target (GitHub's slugs: lowercase, spaces to '-', punctuation other
      than '-' and '_' dropped, repeats numbered -1, -2...);
  (b) evidence named in square brackets does not exist: a backticked snake_case name, as in
      [`a_test_name`] or [`one`, `two`], must be an `fn` in some .rs file of the repository,
      and a backticked path, as in [`shared/tests/rls.rs`], must exist;
  (c) the configuration table of docs/configuration.md and the code disagree: every variable
      in its first column must be read by shared/src or functions/*/src (tests excluded), and
      every variable those read must be in the table (or in PLATFORM_VARIABLES below).

Usage: python3 scripts/check_docs.py [repository root]
"""

import os
import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent

# Read by the code but set by the platform or the shell, never by a deployment: not in the
# configuration table.
PLATFORM_VARIABLES = {
    "AWS_LAMBDA_RUNTIME_API": "set by Lambda; its presence means the code runs inside Lambda",
    "AWS_LAMBDA_FUNCTION_NAME": "set by Lambda; the service name in logs and metrics",
    "AWS_REGION": "set by Lambda (and read by the AWS SDK)",
    "_X_AMZN_TRACE_ID": "set by Lambda per invocation (X-Ray)",
    "USER": "set by the operator's shell; the admin CLI records it as an outbox action's actor",
}

SKIP_DIRS = {".git", "target", ".aws-sam", ".venv", ".local", ".schemathesis", "node_modules"}

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def rel(path):
    return os.path.relpath(path, ROOT)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")


def without_fences(text):
    """The text with fenced code blocks blanked (line numbers kept)."""
    out, fence = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            out.append("")
        elif fence is not None:
            if m and m.group(1).startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def code_spans(text):
    """[(start, end, content)] of the inline code spans of `text` (fences already blanked)."""
    spans, i = [], 0
    while True:
        i = text.find("`", i)
        if i < 0:
            return spans
        run = len(text[i:]) - len(text[i:].lstrip("`"))
        ticks = "`" * run
        j = text.find(ticks, i + run)
        while j >= 0 and (text[j + run : j + run + 1] == "`"):
            j = text.find(ticks, j + run + 1)
        if j < 0:
            i += run
            continue
        spans.append((i, j + run, text[i + run : j].strip()))
        i = j + run


def masked(text, spans):
    """`text` with each code span's characters replaced by 'x' (positions kept)."""
    chars = list(text)
    for start, end, _ in spans:
        for k in range(start, end):
            if chars[k] != "\n":
                chars[k] = "x"
    return "".join(chars)


def slug(heading):
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    kept = []
    for ch in text:
        if ch in "-_ ":
            kept.append(ch)
        elif unicodedata.category(ch)[0] in "LNM":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


anchor_cache = {}


def anchors(path):
    if path not in anchor_cache:
        seen, found = {}, set()
        text = without_fences(path.read_text(encoding="utf-8"))
        for line in text.split("\n"):
            m = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
            if m:
                base = slug(m.group(2))
                n = seen.get(base, 0)
                seen[base] = n + 1
                found.add(base if n == 0 else f"{base}-{n}")
            for a in re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line):
                found.add(a)
        anchor_cache[path] = found
    return anchor_cache[path]


LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def line_of(text, index):
    return text.count("\n", 0, index) + 1


def check_links(path, text, plain):
    count = 0
    for m in LINK.finditer(plain):
        target = text[m.start(2) : m.end(2)]
        where = f"{rel(path)}:{line_of(text, m.start())}"
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:...
            continue
        count += 1
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if not dest.exists():
            problem(where, f"link to {target!r}: {rel(dest)} does not exist")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                continue
            if anchor not in anchors(dest):
                problem(where, f"link to {target!r}: no heading of {rel(dest)} has the anchor #{anchor}")
    return count


# ---------------------------------------------------------------------------------------------
# Evidence named in brackets
# ---------------------------------------------------------------------------------------------

TEST_NAME = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$")
PATH_LIKE = re.compile(r"^[\w.-]+(?:/[\w.-]+)*\.(?:rs|py|sh|sql|md|yaml|yml|toml|json)$|^[\w.-]+(?:/[\w.-]+)+/?$")


def bracket_groups(plain):
    """[(open, close)] of the square-bracket spans of `plain` that are not links."""
    groups, stack = [], []
    for i, ch in enumerate(plain):
        if ch == "[":
            stack.append(i)
        elif ch == "]" and stack:
            start = stack.pop()
            after = plain[i + 1 : i + 2]
            before = plain[start - 1 : start] if start else ""
            if after in ("(", "[", ":") or before in ("!", "]"):
                continue
            groups.append((start, i))
    return groups


def rust_functions():
    names = set()
    for path in ROOT.rglob("*.rs"):
        if SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            continue
        names.update(re.findall(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)", path.read_text(encoding="utf-8", errors="replace")))
    return names


def check_evidence(path, text, spans, plain, functions):
    count = 0
    for start, end in bracket_groups(plain):
        for s_start, s_end, content in spans:
            if not (start < s_start and s_end <= end):
                continue
            where = f"{rel(path)}:{line_of(text, s_start)}"
            if PATH_LIKE.match(content) and ("/" in content or "." in content):
                count += 1
                if not (ROOT / content).exists():
                    problem(where, f"evidence [`{content}`]: no such file in the repository")
            elif TEST_NAME.match(content):
                count += 1
                if content not in functions:
                    problem(where, f"evidence [`{content}`]: no `fn {content}` in any .rs file")
    return count


# ---------------------------------------------------------------------------------------------
# Environment variables: the table against the code
# ---------------------------------------------------------------------------------------------


def rust_code_only(source):
    """The source with comments blanked and #[cfg(test)] modules removed; strings kept."""
    out, i, n = [], 0, len(source)
    while i < n:
        ch = source[i]
        if source.startswith("//", i):
            j = source.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif source.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if source.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif source.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", source[i:j]))
            i = j
        elif ch == "r" and re.match(r'r#*"', source[i:]) and not (i and (source[i - 1].isalnum() or source[i - 1] == "_")):
            hashes = len(re.match(r"r(#*)", source[i:]).group(1))
            close = '"' + "#" * hashes
            j = source.find(close, i + 2 + hashes)
            j = n if j < 0 else j + len(close)
            out.append(source[i:j])
            i = j
        elif ch == '"':
            j = i + 1
            while j < n and source[j] != '"':
                j += 2 if source[j] == "\\" else 1
            out.append(source[i : j + 1])
            i = j + 1
        elif ch == "'":
            m = re.match(r"'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'])'", source[i:])
            if m:
                out.append(source[i : i + m.end()])
                i += m.end()
            else:
                out.append(ch)
                i += 1
        else:
            out.append(ch)
            i += 1
    code = "".join(out)
    # Remove #[cfg(test)] modules, brace-balanced (strings may hold braces: skip them).
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{", code)
        if not m:
            return code
        depth, j = 1, m.end()
        while j < len(code) and depth:
            c = code[j]
            if c == '"':
                j += 1
                while j < len(code) and code[j] != '"':
                    j += 2 if code[j] == "\\" else 1
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            j += 1
        code = code[: m.start()] + code[j:]


def read_methods():
    """Names of the `Env` methods (shared/src/config.rs) that take a variable's name."""
    config = (ROOT / "shared/src/config.rs").read_text(encoding="utf-8")
    methods = set(re.findall(r"\bfn\s+(\w+)\s*(?:<[^>]*>)?\s*\(\s*&self\s*,\s*name\s*:\s*&'static\s+str", config))
    if not methods:
        problem("shared/src/config.rs", "found no Env method taking a variable's name (`fn x(&self, name: &'static str`)")
    return methods


def code_files():
    folders = [ROOT / "shared/src"] + sorted(p / "src" for p in (ROOT / "functions").iterdir() if (p / "src").is_dir())
    for folder in folders:
        for path in sorted(folder.rglob("*.rs")):
            parts = path.relative_to(ROOT / "shared/src").parts if folder == ROOT / "shared/src" else ()
            # The `testing` module (feature "testing") is test helpers, not a function's config.
            if parts and (parts[0] in ("testing.rs", "testing")):
                continue
            yield path


def variables_read():
    methods = read_methods()
    found = {}
    for path in code_files():
        code = rust_code_only(path.read_text(encoding="utf-8"))
        consts = dict(re.findall(r"\bconst\s+([A-Z][A-Z0-9_]*)\s*:\s*&(?:'static\s+)?str\s*=\s*\"([^\"]*)\"", code))
        # Helpers (functions or closures) whose first parameter is a variable's name, such as
        # a closure that refuses a variable inside Lambda and then reads it with `optional`.
        helpers = set(methods)
        helpers.update(re.findall(r"\bfn\s+(\w+)\s*(?:<[^>]*>)?\s*\(\s*name\s*:\s*&'static\s+str", code))
        helpers.update(re.findall(r"\blet\s+(\w+)\s*=\s*(?:move\s+)?\|\s*name\s*:\s*&'static\s+str", code))
        calls = [rf"\b(?:{'|'.join(sorted(map(re.escape, helpers)))})\s*\(",
                 r"\benv::var(?:_os)?\s*\(",
                 r"\bstd::env::var(?:_os)?\s*\("]
        for call in calls:
            for m in re.finditer(call + r"\s*(?:\"([^\"]+)\"|([A-Z][A-Z0-9_]*)\s*[,)])", code):
                name = m.group(1) or consts.get(m.group(2))
                if name is None:
                    problem(f"{rel(path)}:{code.count(chr(10), 0, m.start()) + 1}",
                            f"reads a variable through {m.group(2)!r}, whose value this check cannot see")
                    continue
                found.setdefault(name, f"{rel(path)}:{code.count(chr(10), 0, m.start()) + 1}")
    return found


def variables_documented():
    path = ROOT / "docs/configuration.md"
    if not path.exists():
        problem("docs/configuration.md", "missing")
        return {}
    text = without_fences(path.read_text(encoding="utf-8"))
    documented, in_table = {}, False
    for number, line in enumerate(text.split("\n"), 1):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] if line.strip().startswith("|") else None
        if cells is None:
            in_table = False
            continue
        if not in_table:
            in_table = bool(cells) and cells[0].lower() == "variable"
            continue
        if set(cells[0]) <= set("-: "):
            continue
        names = re.findall(r"`([A-Z_][A-Z0-9_]*)`", cells[0])
        if not names:
            problem(f"docs/configuration.md:{number}", f"a row of the configuration table names no variable: {cells[0]!r}")
        for name in names:
            documented.setdefault(name, number)
    if not documented:
        problem("docs/configuration.md", "no table whose first column is 'variable'")
    return documented


def check_variables():
    read = variables_read()
    documented = variables_documented()
    for name, line in sorted(documented.items()):
        if name not in read:
            problem(f"docs/configuration.md:{line}", f"{name} is in the configuration table, but no code in shared/src or functions/*/src reads it")
    for name, where in sorted(read.items()):
        if name not in documented and name not in PLATFORM_VARIABLES:
            problem(where, f"reads {name}, which is not in the configuration table of docs/configuration.md")
    return len(read), len(documented)


# ---------------------------------------------------------------------------------------------


def markdown_files():
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    files += sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    for path in files:
        if path.exists():
            yield path
        else:
            problem(rel(path), "missing")


def main():
    functions = rust_functions()
    files = links = evidence = 0
    for path in markdown_files():
        files += 1
        text = without_fences(path.read_text(encoding="utf-8"))
        spans = code_spans(text)
        plain = masked(text, spans)
        links += check_links(path, text, plain)
        evidence += check_evidence(path, text, spans, plain, functions)
    read, documented = check_variables()
    if problems:
        for line in problems:
            print(f"docs check: {line}")
        print(f"docs check: {len(problems)} problem(s)")
        return 1
    print(f"docs check: {files} files, {links} relative links, {evidence} evidence names, "
          f"{documented} documented variables, {read} read by the code: all consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
