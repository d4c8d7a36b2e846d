"""`diffgentor bench compare A.json B.json`: two `bench serve` (or `bench offline`) results side by side, with B/A.

Prints every numeric field present in both files (the headline ones first), A's and B's value and the ratio B/A;
for latencies a ratio below 1 means B is faster, for throughputs above 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEADLINE = ("completed", "failed", "duration", "request_throughput", "images_per_min", "output_throughput",
            "mean_e2el_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms", "mean_ttft_ms", "p99_ttft_ms",
            "mean_tpot_ms", "mean_think_tokens_per_s", "mean_diffusion_ms", "p99_diffusion_ms",
            "max_concurrent_requests")
HIGHER_IS_BETTER = ("throughput", "per_min", "per_s", "completed", "goodput")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[prefix + k] = float(v)
        elif isinstance(v, dict) and k != "errors":
            out |= _flat(v, prefix + k + ".")
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, float, float, float | None]]:
    fa, fb = _flat(a), _flat(b)
    keys = [k for k in HEADLINE if k in fa and k in fb]
    keys += sorted(k for k in fa if k in fb and k not in keys)
    return [(k, fa[k], fb[k], (fb[k] / fa[k]) if fa[k] else None) for k in keys]


def _name(d: dict[str, Any], path: str) -> str:
    return str(d.get("label") or Path(path).stem)[:24]


def render(a: dict[str, Any], b: dict[str, Any], pa: str = "A", pb: str = "B", all_fields: bool = False) -> str:
    rows = compare(a, b)
    if not all_fields:
        rows = [r for r in rows if r[0] in HEADLINE or r[0].startswith("server_mean_")]
    na, nb = _name(a, pa), _name(b, pb)
    lines = [f"{'metric':<34}{na:>24}{nb:>24}{'B/A':>10}", "-" * 92]
    for k, va, vb, r in rows:
        better = ""
        if r is not None and r != 1.0 and not k.startswith("failed"):
            up = any(h in k for h in HIGHER_IS_BETTER)
            better = " +" if (r > 1) == up else " -"
        lines.append(f"{k:<34}{va:>24.4g}{vb:>24.4g}{(f'x{r:.3f}' if r is not None else 'n/a'):>10}{better}")
    for side, d in (("A", a), ("B", b)):
        cfg = {k: d.get(k) for k in ("request_rate", "max_concurrency", "num_prompts", "size", "num_inference_steps",
                                     "max_new_tokens", "bot_task") if k in d}
        meta = {k: v for k, v in d.items() if isinstance(v, str) and k not in ("date", "label", "model_id",
                                                                                "backend", "endpoint_type")}
        lines.append(f"{side}: {cfg} {meta}")
    lines.append("(+ = B better, - = B worse; latencies lower is better, throughputs higher is better)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    a = json.loads(Path(args.a).read_text())
    b = json.loads(Path(args.b).read_text())
    print(render(a, b, args.a, args.b, args.all))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="print two bench results side by side with ratios (B/A)")
    p.add_argument("a", help="baseline result JSON")
    p.add_argument("b", help="result JSON to compare against the baseline")
    p.add_argument("--all", action="store_true", help="every numeric field, not only the headline ones")
    p.set_defaults(func=main)
