"""Code of many languages and libraries, read from the files installed on this machine.

Each loader is ``(n, seed) -> list[Example]`` (domain ``code``), deterministic in ``seed`` for a given
set of installed files; a language with no files here gives ``[]``. A text is a window of 4-30
consecutive lines of one file (license headers and comment-only windows skipped), at most 1,200
characters, as a user pastes code into a chat ("what does this do?" is up to the user):

- ``python_packages``: the Python sources of the third-party packages in site-packages, round-robin
  over packages so that a large one (torch) does not dominate; half the texts are bare ``def`` +
  docstring stubs of their public functions;
- ``c_family``: C and C++ headers and sources (/usr/include, headers shipped in site-packages);
- ``shell``: shell scripts (``*.sh``, and ``#!/bin/sh`` scripts in /usr/bin);
- ``javascript``: ``*.js`` files of Debian and pip packages (minified files skipped);
- ``sql``: ``*.sql`` files (e.g. PostgreSQL's catalog scripts);
- ``other_languages``: Perl, Tcl, CMake, Emacs Lisp, Go, awk and make files.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from meswitch.data.examples import Example

_SYSTEM_ROOTS = ("/usr/include", "/usr/share", "/usr/lib", "/usr/local/lib", "/usr/local/include")
_COMMENT = ("#", "//", "/*", "*", "--", ";", "%", "'''", '"""', "<!--", "=")
MAX_FILES = 4000  # per language: enough variety, bounded scan time


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


@lru_cache(maxsize=8)
def _walk(root: str) -> tuple[str, ...]:
    """Every file path under ``root`` (one walk per root per process), sorted."""
    import os

    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.lower().startswith(("test", "__pycache__")))
        out += [os.path.join(dirpath, f) for f in filenames]
    return tuple(sorted(out))


def find_files(suffixes: tuple[str, ...], roots: tuple[str, ...], min_bytes: int = 400,
               max_bytes: int = 400_000) -> tuple[Path, ...]:
    """Sorted files under ``roots`` whose name ends with one of ``suffixes`` (test and minified files
    excluded), at most ``MAX_FILES`` spread evenly over the sorted list."""
    found: set[Path] = set()
    for root in roots:
        for name in _walk(root):
            low = name.lower()
            if not low.endswith(suffixes) or ".min." in low or "/test" in low:
                continue
            p = Path(name)
            try:
                if p.is_symlink() or not min_bytes <= p.stat().st_size <= max_bytes:
                    continue
            except OSError:
                continue
            found.add(p)
    ordered = sorted(found)
    step = max(1, len(ordered) // MAX_FILES)
    return tuple(ordered[::step][:MAX_FILES])


def _read(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    lines = text.splitlines()
    return [] if any(len(line) > 400 for line in lines[:50]) else lines  # minified or data, not code


def code_window(lines: list[str], rng: random.Random, max_chars: int = 1200) -> str | None:
    """A window of 4-30 consecutive lines that is mostly code (not comments), or None."""
    if len(lines) < 4:
        return None
    for _ in range(6):
        start = rng.randrange(0, max(1, len(lines) - 4))
        while start < len(lines) and not lines[start].strip():
            start += 1
        chunk = lines[start : start + rng.randint(4, 30)]
        body = [ln.strip() for ln in chunk if ln.strip()]
        if len(body) < 3:
            continue
        comments = sum(ln.startswith(_COMMENT) for ln in body)
        if comments > len(body) // 2 or any(w in "\n".join(body).lower() for w in ("copyright", "license")):
            continue
        text = "\n".join(chunk).strip("\n")
        if len(text) > max_chars:
            text = text[:max_chars].rsplit("\n", 1)[0]
        if len(text) >= 40:
            return text
    return None


def windows(files: Iterable[Path], n: int, seed: int, source: str) -> list[Example]:
    """``n`` code windows from ``files`` (a random file each time), source ``source``; fewer if none fit."""
    files = list(files)
    rng = random.Random(seed)
    out: list[Example] = []
    seen: set[str] = set()
    for _ in range(n * 4):
        if not files or len(out) >= n:
            break
        text = code_window(_read(rng.choice(files)), rng)
        if text and text not in seen:
            seen.add(text)
            out.append(Example(text, "code", "", source))
    return out


def python_packages(n: int, seed: int) -> list[Example]:
    """Windows of and ``def`` stubs from third-party Python packages, round-robin over packages."""
    from meswitch.router.data import function_stubs

    site = _site_packages()
    files = find_files((".py",), (str(site),))
    by_pkg: dict[str, list[Path]] = {}
    for p in files:
        top = p.relative_to(site).parts[0]
        if top.startswith(("_", "meswitch")) or top.endswith((".dist-info", ".py")):
            continue
        by_pkg.setdefault(top, []).append(p)
    rng = random.Random(seed)
    pkgs = sorted(by_pkg)
    out: list[Example] = []
    seen: set[str] = set()
    for i in range(n * 4):
        if not pkgs or len(out) >= n:
            break
        pkg = pkgs[i % len(pkgs)]
        path = rng.choice(by_pkg[pkg])
        if rng.random() < 0.5:
            stubs = function_stubs(path, f"site-packages/{pkg}")
            text = rng.choice(stubs).text if stubs else None
        else:
            text = code_window(_read(path), rng)
        if text and text not in seen:
            seen.add(text)
            out.append(Example(text, "code", "", "site-packages/python"))
    rng.shuffle(out)
    return out


def c_family(n: int, seed: int) -> list[Example]:
    roots = (*_SYSTEM_ROOTS, str(_site_packages()))
    return windows(find_files((".h", ".c", ".hpp", ".cpp", ".cc"), roots), n, seed, "files/c-cpp")


def _shebang_scripts(root: str) -> tuple[Path, ...]:
    base = Path(root)
    out = []
    if base.is_dir():
        for p in sorted(base.iterdir()):
            try:
                if p.is_file() and not p.is_symlink() and 200 < p.stat().st_size < 100_000:
                    with open(p, "rb") as f:
                        head = f.read(32)
                    if head.startswith((b"#!/bin/sh", b"#!/bin/bash", b"#! /bin/sh", b"#!/usr/bin/env bash")):
                        out.append(p)
            except OSError:
                continue
    return tuple(out)


def shell(n: int, seed: int) -> list[Example]:
    files = (*find_files((".sh", ".bash"), (*_SYSTEM_ROOTS, str(_site_packages()))), *_shebang_scripts("/usr/bin"))
    return windows(sorted(files), n, seed, "files/shell")


def javascript(n: int, seed: int) -> list[Example]:
    return windows(find_files((".js", ".mjs", ".ts"), (*_SYSTEM_ROOTS, str(_site_packages()))), n, seed,
                   "files/javascript")


def sql(n: int, seed: int) -> list[Example]:
    return windows(find_files((".sql",), (*_SYSTEM_ROOTS, str(_site_packages()))), n, seed, "files/sql")


def other_languages(n: int, seed: int) -> list[Example]:
    suffixes = (".pm", ".pl", ".tcl", ".cmake", ".el", ".go", ".awk", ".mk", ".rs", ".rb", ".lua", ".java")
    return windows(find_files(suffixes, _SYSTEM_ROOTS), n, seed, "files/other-languages")
