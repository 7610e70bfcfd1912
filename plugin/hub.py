"""Upload a quantized model folder to the Hugging Face Hub (thin wrapper over huggingface_hub).

Kept tiny on purpose: tests replace ``_api_factory`` with a fake and check the arguments it receives.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .graph_passes.errors import OutputPathError, UserError

__all__ = ["HubUploadError", "push_to_hub"]


class HubUploadError(UserError):
    """The upload failed (no token, no network, no write access to the repository...)."""


def _default_api_factory(token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token)


_api_factory: Callable[[str | None], Any] = _default_api_factory


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload ONNX model quantized with optimum-adaround",
) -> str:
    """Create ``repo_id`` (model repository) if needed and upload every file of ``folder``; returns its URL."""
    folder = Path(folder)
    if not (folder / "model.onnx").is_file() and not any(folder.glob("*.onnx")):
        raise OutputPathError(f"{folder} holds no .onnx model: nothing to push to {repo_id}")
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise HubUploadError(f"--push-to-hub {repo_id!r}: give a repository id such as user/model-name")
    api = _api_factory(token)
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message
        )
    except UserError:
        raise
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, auth): one line for the user
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise HubUploadError(f"uploading {folder} to {repo_id} failed: {type(e).__name__}: {first}") from e
    return str(url)
