"""What `dlm-rl eval` leaves on disk: the generations (one JSON line per completion), the metrics as JSON and a
markdown summary to read."""

from __future__ import annotations

import json
import os
import re

METRIC_NOTES = {
    "n": "problems",
    "greedy_accuracy": "fraction of problems whose greedy (T = 0) completion is correct",
    "pass@1": "unbiased pass@1 from the T = 1 samples",
    "nfe_greedy": "mean forward passes per greedy completion",
    "nfe_sampled": "mean forward passes per T = 1 completion",
    "tokens_per_s_greedy": "canvas tokens (completions x gen_length) per second of greedy sampling",
    "tokens_per_s_sampled": "canvas tokens per second of T = 1 sampling",
    "truncated_prompts": "prompts cut to their last tokens to fit the model's context",
    "seconds": "wall time of the evaluation (sampling and scoring)",
}
EXAMPLES = 3


def default_output_dir(model: str, dataset: str) -> str:
    """eval/<model>-<dataset>/: a name or the last part of a path each, e.g. eval/testbed-code-base-humaneval."""

    def slug(spec: str) -> str:
        if os.path.exists(spec):
            spec = os.path.splitext(os.path.basename(os.path.normpath(spec)))[0]
        return re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-") or "model"

    return os.path.join("eval", f"{slug(model)}-{slug(dataset)}")


def write_report(output_dir: str, settings: dict, result: dict, records: list[dict]) -> dict[str, str]:
    """Write generations.jsonl, metrics.json and summary.md into `output_dir`; returns their paths by kind."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {kind: os.path.join(output_dir, name) for kind, name in
             (("generations", "generations.jsonl"), ("metrics", "metrics.json"), ("summary", "summary.md"))}
    with open(paths["generations"], "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    with open(paths["metrics"], "w") as f:
        json.dump({"settings": settings, **result}, f, indent=2)
    with open(paths["summary"], "w") as f:
        f.write(summary(settings, result, records))
    return paths


def summary(settings: dict, result: dict, records: list[dict]) -> str:
    """Markdown: the metrics with what each means, the settings, and the first problems' greedy completions."""
    lines = [f"# {settings.get('model')} on {settings.get('dataset')}", "", "| metric | value | meaning |",
             "|---|---|---|"]
    for key, value in result.items():
        if key in ("examples", "rewards"):
            continue
        note = METRIC_NOTES.get(key, f"unbiased {key} from the T = 1 samples" if key.startswith("pass@") else "")
        lines.append(f"| {key} | {_number(value)} | {note} |")
    for name, value in (result.get("rewards") or {}).items():
        lines.append(f"| reward/{name} | {_number(value)} | mean over the greedy completions |")
    lines += ["", "A completion is correct when its score is 1 (for code: every test passes). "
              "`generations.jsonl` holds every completion with its score, NFE and finish reason.", "",
              "## Settings", "", "```json", json.dumps(settings, indent=2), "```", "", "## Greedy completions", ""]
    greedy = [r for r in records if r["temperature"] == 0.0][:EXAMPLES]
    for record in greedy:
        lines += [f"**{record['id']}** — score {_number(record['score'])}, NFE {record['nfe']}, "
                  f"finish {record['finish_reason']}", "", "````", _text(record["prompt"]) + record["completion"],
                  "````", ""]
    return "\n".join(lines)


def _number(value) -> str:
    return str(round(value, 4)) if isinstance(value, float) else str(value)


def _text(prompt) -> str:
    """A prompt as text: itself, or its chat messages' contents."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"[{m['role']}] {m['content']}" for m in prompt) + "\n[assistant] "
