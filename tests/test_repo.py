"""Repository-wide rules: no machine paths in tracked files, no import circles between rooms."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MACHINE_PATHS = ("/work/", "../shared", "/home/", "/Users/")


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in names.splitlines():
        path = ROOT / name
        if path.suffix in {".safetensors", ".png", ".jpg"} or not path.is_file():
            continue
        try:
            yield name, path.read_text()
        except UnicodeDecodeError:
            continue


def test_no_machine_paths_in_tracked_files():
    me = Path(__file__).name
    hits = [f"{name}:{i}: {line.strip()}"
            for name, text in tracked_text_files() if not name.endswith(me)
            for i, line in enumerate(text.splitlines(), 1)
            if any(p in line for p in MACHINE_PATHS)]
    assert hits == []


def test_docs_cited_by_kernels_exist():
    text = (ROOT / "mlx_v4" / "kernels" / "_base.py").read_text()
    assert "docs/kernels.md" in text
    assert (ROOT / "docs" / "kernels.md").is_file()
