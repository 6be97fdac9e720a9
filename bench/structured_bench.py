"""Schema-constrained generation with speculation: is every output valid, and
what does speculation gain over constrained target-only decoding?

Each prompt (written for this benchmark: extraction and code-summary tasks
whose answers copy names and values from the prompt) asks for JSON matching
a schema; the request carries the schema as its guide. One target is loaded
once and shared; each drafter runs every prompt greedily through the
in-process engine (its default adaptive γ), drafters interleaved prompt by
prompt so load drift hits all alike. An output is valid when it parses as
JSON and validates against its schema (``jsonschema``).

    python -m specray.bench.structured_bench --target qwen2.5-coder-1.5b-instruct \\
        --dtype float32 --drafters none,ngram,qwen2.5-coder-0.5b-instruct

Writes ``structured_<target>_<dtype>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import jsonschema
import torch

from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.factory import EngineSpec, build_engine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.engine.tokenizer import chat_ids
from specray.actors.model.loader import load_model
from specray.actors.sampling.grammar import Guide
from specray.actors.sampling.params import StoppingCriteria
from specray.bench.common import bench_parser, resolve_preferring
from specray.bench.run_report import Cell, column_report, publish_run, run_title

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "languages": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "languages"],
    "additionalProperties": False,
}
FUNCTIONS = {
    "type": "object",
    "properties": {
        "functions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "arguments": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["functions"],
    "additionalProperties": False,
}
CODE = """def load_settings(path, defaults):
    with open(path) as handle:
        return {**defaults, **json.load(handle)}


def merge_records(primary_records, secondary_records, key_field):
    merged = {record[key_field]: record for record in secondary_records}
    merged.update({record[key_field]: record for record in primary_records})
    return list(merged.values())


def format_report(records, columns, title):
    lines = [title, " | ".join(columns)]
    lines += [" | ".join(str(record[c]) for c in columns) for record in records]
    return "\\n".join(lines)
"""
PROMPTS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "person",
        "Extract the person as JSON with name, age, city and languages.\n\n"
        "Margarethe Oyelaran-Lindqvist, 47, moved to Trondheim last spring. She "
        "speaks Norwegian, Yoruba, Swedish and English, and teaches Portuguese.",
        PERSON,
    ),
    (
        "functions",
        "List every function in this module with its argument names, as JSON.\n\n" + CODE,
        FUNCTIONS,
    ),
    (
        "person-2",
        "Return JSON for the speaker: name, age, city, languages.\n\n"
        "My name is Rafael Quispe Mamani; I am 29 and I live in Cochabamba. I "
        "grew up speaking Quechua and Spanish and later learned Aymara and German.",
        PERSON,
    ),
]
COLUMNS: dict[str, Cell] = {
    "drafter": "drafter",
    "valid JSON": lambda row: f"{row['valid']}/{row['requests']}",
    "seconds": "seconds",
    "τ": "tau",
    "speedup over constrained target-only": lambda row: (
        "–" if row["speedup"] is None else f"{row['speedup']}×"
    ),
}


def run_one(engine: Any, prompt_ids: list[int], schema: dict[str, Any], max_tokens: int) -> dict:
    guide = Guide("json_schema", json.dumps(schema))
    request = GenerationRequest(
        "s", prompt_ids, stopping=StoppingCriteria(max_tokens=max_tokens), guide=guide
    )
    token_ids: list[int] = []
    began = time.perf_counter()
    for chunk in engine.generate([request]):
        token_ids += chunk.token_ids
        last = chunk
    seconds = time.perf_counter() - began
    return {
        "token_ids": token_ids,
        "seconds": seconds,
        "finish_reason": last.finish_reason,
        "draft_tokens": last.stats.draft_tokens,
        "accepted_tokens": last.stats.accepted_tokens,
        "rounds": last.stats.rounds,
    }


def is_valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    target_dir = resolve_preferring(args.target, args.dtype)
    shared = LocalTarget(load_model(target_dir, args.dtype), 1, args.max_len, 0)
    engines = {}
    for name in args.drafters.split(","):
        draft = None if name == "none" else DrafterSpec.parse(name)
        spec = EngineSpec(
            str(target_dir), draft, args.dtype, args.k, max_batch=1, max_len=args.max_len,
            prefix_cache_tokens=0,
        )  # fmt: skip
        engines[name] = build_engine(spec, target=shared)
    tokenizer = next(iter(engines.values())).tokenizer
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for label, text, schema in PROMPTS:
        prompt_ids = chat_ids(tokenizer, text)
        for name, loaded in engines.items():
            run = run_one(loaded.engine, prompt_ids, schema, args.max_tokens)
            out_text = str(tokenizer.decode(run.pop("token_ids"), skip_special_tokens=True))
            run |= {"prompt": label, "valid": is_valid(out_text, schema), "text": out_text}
            records[name].append(run)
            print(f"{label:10s} {name:30s} {run['seconds']:.2f}s valid={run['valid']}")
    base = sum(r["seconds"] for r in records["none"]) if "none" in records else None
    rows = []
    for name, runs in records.items():
        seconds = sum(r["seconds"] for r in runs)
        rounds = sum(r["rounds"] for r in runs)
        rows.append(
            {
                "drafter": name,
                "valid": sum(r["valid"] for r in runs),
                "requests": len(runs),
                "seconds": round(seconds, 2),
                "tau": round((sum(r["accepted_tokens"] for r in runs) + rounds) / rounds, 2),
                "speedup": round(base / seconds, 2) if base else None,
            }
        )
    flags = ("target", "dtype", "threads", "max_tokens", "k")
    return publish_run(
        "specray.bench.structured_bench", "structured", argv, args, flags, markdown,
        rows=rows, runs=records,
    )  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    limit, gamma = f"up to {result['max_tokens']} tokens", f"adaptive γ ≤ {result['k']}"
    title = run_title("Schema-constrained generation", result, "greedy", limit, gamma)
    return column_report(title, result, COLUMNS)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__, target="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--drafters", default="none,ngram,qwen2.5-coder-0.5b-instruct")
    p.add_argument("--k", type=int, default=8, help="ceiling of the adaptive γ")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-len", type=int, default=1024)
    return p


if __name__ == "__main__":
    main()
