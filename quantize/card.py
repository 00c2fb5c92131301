"""README.md (model card) of a converted directory."""

from __future__ import annotations

import re

from mlx_v4.mlx_lm_hook import HOOK_FILE


def model_card(config: dict, conversion: dict, shards) -> str:
    source = conversion["source"]
    hub = bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source))
    total = sum(j.out_bytes for s in shards for j in s.jobs)
    v41 = conversion.get("family") == "v41"
    lines = ["---", "library_name: mlx", "tags:", "  - mlx", "  - mlx-v4", "  - deepseek_v41" if v41 else "  - deepseek_v4"]
    if hub:
        lines += [f"base_model: {source}"]
    lines += ["---", "", f"# {source.rstrip('/').split('/')[-1]} ({conversion['recipe']}, MLX)", "",
              f"Converted by `mlx-v4 convert` from `{source}` with the **{conversion['recipe']}** recipe: "
              f"{conversion['description']}.", "",
              f"{len(shards)} shard(s), {total / 1e9:.2f} GB.", "",
              "| tensor class | format |", "|---|---|"]
    for klass, fmt in conversion["classes"].items():
        lines.append(f"| {klass} | {fmt if isinstance(fmt, str) else ', '.join(fmt)} |")
    if v41:
        return "\n".join(lines + _run_v41())
    lines += ["", "## Run it", "",
              "Both routes need the mlx-v4 package (from a clone of its repository: `pip install -e .`), "
              "which provides the DeepSeek V4 model.", "",
              "With mlx-v4 (chat, server, memory planner, KV cache that saves and rewinds):", "",
              "```bash", "mlx-v4 chat --model PATH_OR_REPO", "```", "",
              "```python", "import mlx_v4", "", "model, tokenizer = mlx_v4.load(\"PATH_OR_REPO\")",
              "print(mlx_v4.generate(model, tokenizer, \"Hello\", max_tokens=64))", "```", "",
              f"With mlx-lm: this directory carries mlx-lm's model file (`{HOOK_FILE}`, which imports "
              "mlx-v4), so mlx-lm needs `trust_remote_code`. The chat template renders DeepSeek's V4 "
              "encoding (`enable_thinking`, `reasoning_effort`, tools).", "",
              "```bash",
              "mlx_lm.generate --model PATH_OR_REPO --trust-remote-code --prompt \"Hello\" "
              "--chat-template-config '{\"enable_thinking\": false}'",
              "mlx_lm.server --model PATH_OR_REPO --trust-remote-code",
              "```", "",
              "```python", "from mlx_lm import load, generate", "",
              "model, tokenizer = load(\"PATH_OR_REPO\", trust_remote_code=True)",
              "messages = [{\"role\": \"user\", \"content\": \"Hello\"}]",
              "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)",
              "print(generate(model, tokenizer, prompt, max_tokens=64))", "```", ""]
    return "\n".join(lines)


def _run_v41() -> list[str]:
    return ["", "The Engram tables are copied as released (FP8 rows, each table in a shard of its own): "
            "mlx-v4 reads them from disk row by row and never holds them in memory.", "",
            "## Run it", "",
            "With mlx-v4 (from a clone of its repository: `pip install -e .`), which provides the "
            "DeepSeek V4.1 text model (images are not supported):", "",
            "```bash", "mlx-v4 chat --model PATH_OR_REPO", "```", "",
            "```python", "import mlx_v4", "", "model, tokenizer = mlx_v4.load(\"PATH_OR_REPO\")",
            "print(mlx_v4.generate(model, tokenizer, \"Hello\", max_tokens=64))", "```", "",
            "mlx-lm cannot run this directory: mlx-v4's mlx-lm model file builds DeepSeek V4 only, so "
            "none is written here (and no `model_file` in config.json).", ""]
