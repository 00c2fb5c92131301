"""README.md (model card) of a converted directory."""

from __future__ import annotations

import re


def model_card(config: dict, conversion: dict, shards) -> str:
    source = conversion["source"]
    hub = bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source))
    total = sum(j.out_bytes for s in shards for j in s.jobs)
    lines = ["---", "library_name: mlx", "tags:", "  - mlx", "  - mlx-v4", "  - deepseek_v4"]
    if hub:
        lines += [f"base_model: {source}"]
    lines += ["---", "", f"# {source.rstrip('/').split('/')[-1]} ({conversion['recipe']}, MLX)", "",
              f"Converted by `mlx-v4 convert` from `{source}` with the **{conversion['recipe']}** recipe: "
              f"{conversion['description']}.", "",
              f"{len(shards)} shard(s), {total / 1e9:.2f} GB.", "",
              "| tensor class | format |", "|---|---|"]
    for klass, fmt in conversion["classes"].items():
        lines.append(f"| {klass} | {fmt if isinstance(fmt, str) else ', '.join(fmt)} |")
    lines += ["", "```python", "import mlx_v4", "", "model, tokenizer = mlx_v4.load(\"PATH_OR_REPO\")",
              "print(mlx_v4.generate(model, tokenizer, \"Hello\", max_tokens=64))", "```", ""]
    return "\n".join(lines)
