"""Upload a finished conversion to the Hugging Face Hub."""

from __future__ import annotations

import logging
from pathlib import Path

from .marker import MANIFEST, MARKER, is_complete
from .recipes import ConvertError

log = logging.getLogger("mlx_v4.quantize")


def upload(path: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload the directory; -> the commit URL. Only a
    finished conversion is uploaded; local bookkeeping files stay behind."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    path = Path(path)
    if not is_complete(path):
        raise ConvertError(f"{path}: not a finished conversion ({MARKER} is missing); nothing uploaded")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model",
                                 commit_message="Upload mlx-v4 conversion",
                                 ignore_patterns=[MARKER, MANIFEST, ".*.partial"])
    except HfHubHTTPError as e:
        raise ConvertError(f"{repo_id}: upload to the Hugging Face Hub failed: {e}") from None
    url = getattr(info, "commit_url", None) or str(info)
    log.info("uploaded %s to %s", path, url)
    return url
