"""Training prompts available offline: the machine's own Python.

The head learns to imitate the target on the target's own answers, so a
prompt only has to steer the target into the kinds of text it will write
when served: code edits and explanations (stdlib source), summaries,
explanations and translations of prose (stdlib docstrings and the reference
manual's topics in ``pydoc_data``), arithmetic word problems (numbers drawn
from the seed) and everyday chat (a small template set of our own, phrased
unlike the benchmark's held-out prompts). Deterministic for a seed.
"""

from __future__ import annotations

import importlib
import inspect
import random
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# Pure-Python stdlib modules with readable functions and docstrings.
SOURCE_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "difflib", "email.utils", "enum", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
    "html", "http.cookies", "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder",
    "logging", "mailbox", "mimetypes", "netrc", "ntpath", "numbers", "operator", "optparse",
    "pathlib", "pdb", "pickletools", "pkgutil", "platform", "plistlib", "posixpath", "pprint",
    "queue", "quopri", "random", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil",
    "smtplib", "socketserver", "statistics", "string", "subprocess", "tabnanny", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "turtle",
    "typing", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "zipfile", "zipimport",
)  # fmt: skip

CODE_TASKS = (
    "Explain what this Python function does, step by step:",
    "Add type hints to this function. Return the complete updated code.",
    "Write a clear docstring for this function and return the complete code.",
    "Rewrite this function to be easier to read without changing its behaviour. "
    "Return the complete updated code.",
    "Write two pytest tests for this function.",
    "Point out possible bugs or unhandled edge cases in this function.",
    "Rename the variables in this function to more descriptive names. "
    "Return the complete updated code and nothing else.",
    "Summarise in two sentences what this code is for.",
)
DOC_TASKS = (
    "Summarise this documentation in one or two sentences:",
    "Explain the following to a beginner, with a small example:",
    "Rewrite this text in plain English for a non-programmer:",
    "List the key points of this text as short bullet points:",
)
LANGUAGES = ("French", "German", "Spanish", "Italian", "Portuguese", "Dutch")
CHAT_TEMPLATES = (
    "Give me five tips for {topic}. Keep each tip to one sentence.",
    "Explain {topic} to a twelve-year-old in one short paragraph.",
    "Write a friendly message to a colleague about {topic}.",
    "What are the pros and cons of {topic}? Answer with two short lists.",
    "Write a four-line rhyming verse about {topic}.",
    "I want to get started with {topic}. What should I do in my first week?",
    "Describe common mistakes people make with {topic} and how to avoid them.",
    "Write a short blog introduction (about 80 words) about {topic}.",
)
CHAT_TOPICS = (
    "learning a new language", "saving money on groceries", "training for a 10 km run",
    "keeping houseplants alive", "working from home", "planning a road trip",
    "cooking for a large family", "starting a vegetable garden", "learning to play guitar",
    "reading more books", "keeping a daily journal", "cycling to work",
    "adopting a rescue dog", "preparing for a job interview", "organising a small kitchen",
    "taking better photos with a phone", "reducing screen time", "visiting a museum with kids",
    "baking bread at home", "public speaking", "moving to a new city", "learning to swim",
    "volunteering at a food bank", "writing a cover letter", "camping in the rain",
    "making friends as an adult", "studying for exams", "repairing a bicycle puncture",
    "composting kitchen scraps", "hosting a board game night",
)  # fmt: skip
MATH_TEMPLATES = (
    "A shop sells notebooks for ${a} each and pens for ${b} each. Sam buys {n} notebooks and "
    "{m} pens. How much does Sam pay? Show your working.",
    "A car travels {a} km in {n} hours. At the same speed, how far does it travel in {m} hours? "
    "Explain step by step.",
    "Solve for x: {n}x + {a} = {b}. Show each step.",
    "A recipe needs {a} grams of flour for {n} people. How much flour is needed for {m} people? "
    "Explain your reasoning.",
    "What is {a} percent of {b}? Then add {n} to the result. Show each step.",
    "A tank holds {b} litres and is filled at {a} litres per minute. How many minutes until it "
    "is full, and how many litres are in it after {n} minutes?",
    "The sum of two numbers is {b} and their difference is {a}. What are the numbers? Solve "
    "step by step.",
)


@dataclass(frozen=True)
class CorpusPrompt:
    """One user message and where it came from."""

    kind: str  # code | docs | translation | chat | math | shipped
    text: str


def _functions(module_name: str, max_lines: int) -> Iterator[tuple[str, str, str]]:
    """(qualified name, source, docstring) of short module-level functions and methods."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module this Python lacks (or refuses to import)
        return
    for name, obj in sorted(vars(module).items()):
        members = [(name, obj)]
        if inspect.isclass(obj):
            members += [(f"{name}.{n}", m) for n, m in sorted(vars(obj).items())]
        for qualname, member in members:
            if not inspect.isfunction(member) or member.__module__ != module.__name__:
                continue
            try:
                source = textwrap.dedent(inspect.getsource(member))
            except (OSError, TypeError):
                continue
            if 3 <= source.count("\n") <= max_lines:
                yield f"{module_name}.{qualname}", source, inspect.getdoc(member) or ""


def _topics_passages(min_chars: int, max_chars: int) -> list[str]:
    """Paragraph groups of the reference manual's topics (``pydoc_data``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    passages = []
    for key in sorted(topics):
        paragraphs = [p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 40]
        chunk = ""
        for paragraph in paragraphs:
            if len(chunk) + len(paragraph) > max_chars:
                if len(chunk) >= min_chars:
                    passages.append(chunk.strip())
                chunk = ""
            chunk += paragraph + "\n\n"
        if min_chars <= len(chunk) <= max_chars:
            passages.append(chunk.strip())
    return passages


def build_corpus(
    count: int, seed: int = 0, extra: Sequence[str] = (), max_source_lines: int = 30
) -> list[CorpusPrompt]:
    """``count`` prompts (``extra`` first, all of them), the rest drawn from
    the stdlib in fixed shares: code 35 %, docs 15 %, translation 10 %,
    chat 20 %, math 20 %."""
    rng = random.Random(seed)
    prompts = [CorpusPrompt("shipped", text) for text in extra]
    functions = [f for name in SOURCE_MODULES for f in _functions(name, max_source_lines)]
    docs = [doc.split("\n\n")[0] for _, _, doc in functions if len(doc.split("\n\n")[0]) >= 80]
    docs += _topics_passages(200, 900)
    rest = max(0, count - len(prompts))
    shares = {"code": 0.35, "docs": 0.15, "translation": 0.10, "chat": 0.20, "math": 0.20}
    drawn = [
        CorpusPrompt(kind, _draw(kind, rng, functions, docs))
        for kind, share in shares.items()
        for _ in range(round(rest * share))
    ]
    rng.shuffle(drawn)
    return prompts + drawn[:rest]


@dataclass(frozen=True)
class ForcedPair:
    """A user message and an existing answer that the target reads (teacher forcing)."""

    kind: str  # code | docs
    prompt: str
    answer: str


def build_forced_pairs(count: int, seed: int = 0, max_source_lines: int = 40) -> list[ForcedPair]:
    """``count`` (request, answer) pairs whose answers already exist on this
    machine: a stdlib function written from its name and docstring, and a
    reference-manual passage explained. Reading is several times cheaper
    per token than generating, so these stretch the data budget; their
    labels are still the target's own distribution at every position."""
    rng = random.Random(seed + 1)
    functions = [f for name in SOURCE_MODULES for f in _functions(name, max_source_lines)]
    passages = _topics_passages(300, 1500)
    pairs = []
    for _ in range(count):
        if functions and (not passages or rng.random() < 0.7):
            qualname, source, doc = rng.choice(functions)
            what = f" that does the following:\n\n{doc}" if doc else "."
            prompt = f"Write the Python function `{qualname.rsplit('.', 1)[-1]}`{what}"
            pairs.append(ForcedPair("code", prompt, f"```python\n{source}```"))
        elif passages:
            passage = rng.choice(passages)
            prompt = "Explain this part of the Python language reference in your own words."
            pairs.append(ForcedPair("docs", prompt, passage))
    return pairs


def _draw(
    kind: str, rng: random.Random, functions: Sequence[tuple[str, str, str]], docs: Sequence[str]
) -> str:
    if kind == "code" and functions:
        _, source, _ = rng.choice(functions)
        return f"{rng.choice(CODE_TASKS)}\n\n```python\n{source}```"
    if kind in ("docs", "translation") and docs:
        text = rng.choice(docs)[:900]
        if kind == "translation":
            return f"Translate the following text into {rng.choice(LANGUAGES)}:\n\n{text}"
        return f"{rng.choice(DOC_TASKS)}\n\n{text}"
    if kind == "math":
        a, b = rng.randint(2, 90), rng.randint(100, 900)
        n, m = rng.randint(2, 12), rng.randint(2, 12)
        return rng.choice(MATH_TEMPLATES).format(a=a, b=b, n=n, m=m)
    return rng.choice(CHAT_TEMPLATES).format(topic=rng.choice(CHAT_TOPICS))
