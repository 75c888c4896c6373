"""Where a ``model.*`` path points: a local folder, a ``.gguf`` file, or a Hugging Face Hub repo.

- an existing folder is used as it is (nothing is looked up online);
- ``FILE.gguf`` is a local GGUF checkpoint; ``org/name/FILE.gguf`` is one file of a Hub repo;
- anything else shaped like a repo id (``org/name``, optionally ``org/name@revision``) is resolved through
  ``huggingface_hub``: downloaded when online, read from the local cache when ``HF_HUB_OFFLINE=1``.

Only configs, safetensors weights and tokenizer files are fetched from a repo (Python files too with
``trust_remote_code``), never ``.bin``, ``.gguf`` or ONNX copies of the same weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tether.errors import TetherError, first_line

TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
WEIGHT_FILES = ["*.safetensors"]
CODE_FILES = ["*.py"]
GGUF_EXTRA = "pip install 'tether[gguf]'"


@dataclass(frozen=True)
class ModelSource:
    """A local place ``from_pretrained`` reads: a folder, and for a GGUF checkpoint the file's name inside it."""

    folder: str
    gguf_file: str | None = None


def hub_offline() -> bool:
    """True when the Hub must not be contacted: ``HF_HUB_OFFLINE`` (read now and when huggingface_hub loaded)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def require_gguf(what: str, path: str) -> None:
    """Raise a one-line TetherError unless the ``gguf`` package (transformers' GGUF reader) is importable."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise TetherError(f"{what} '{path}': loading a .gguf file needs the gguf package ({GGUF_EXTRA})") from None


def resolve(path: str, what: str, weights: bool = True, trust_remote_code: bool = False) -> ModelSource:
    """The local folder (and GGUF file) that ``path`` names, downloading from the Hub if it must and may.

    Args:
        path: a folder, a ``.gguf`` file, a repo id ``org/name[@revision]`` or ``org/name[@revision]/FILE.gguf``.
        what: the role named in error messages (``policy``, ``tokenizer``, ...).
        weights: fetch safetensors weights from a repo (False for a tokenizer).
        trust_remote_code: also fetch a repo's Python files.
    """
    if path.lower().endswith(".gguf"):
        return _gguf(path, what)
    local = Path(path).expanduser()
    if local.is_dir():
        return ModelSource(str(local))
    repo = _repo_id(path)
    if repo is None or local.exists():
        raise TetherError(f"{what} '{path}': no such folder")
    patterns = TOKENIZER_FILES + (WEIGHT_FILES if weights else []) + (CODE_FILES if trust_remote_code else [])
    from huggingface_hub import snapshot_download

    download = partial(snapshot_download, repo[0], revision=repo[1], allow_patterns=patterns)
    return ModelSource(_from_hub(download, path, what))


def _gguf(path: str, what: str) -> ModelSource:
    """A local ``.gguf`` file, or ``org/name[@revision]/FILE.gguf`` fetched from the Hub (or its cache)."""
    require_gguf(what, path)
    local = Path(path).expanduser()
    if local.is_file():
        return ModelSource(str(local.parent), local.name)
    parts = path.split("/", 2)  # org, name[@revision], file inside the repo
    repo = _repo_id("/".join(parts[:2])) if len(parts) == 3 else None
    if repo is None or local.exists():
        raise TetherError(f"{what} '{path}': no such file")
    from huggingface_hub import hf_hub_download

    download = partial(hf_hub_download, repo[0], parts[2], revision=repo[1])
    file = Path(_from_hub(download, path, what, "file"))
    return ModelSource(str(file.parent), file.name)


def _repo_id(path: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``path`` is shaped like ``name``, ``org/name`` or ``org/name@revision``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if path.startswith((".", "/", "~")) or "\\" in path:
        return None
    repo, _, revision = path.partition("@")
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return repo, revision or None


def _from_hub(download, path: str, what: str, local: str = "folder") -> str:
    """The local path ``download`` returns; every huggingface_hub failure becomes a one-line TetherError."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return download(local_files_only=hub_offline())
    except LocalEntryNotFoundError:
        message = f"not a local {local}, and not in the Hugging Face cache"
        if hub_offline():
            message += " (offline: HF_HUB_OFFLINE=1; set HF_HUB_OFFLINE=0 to download it)"
        else:
            message += " (the Hub could not be reached)"
    except GatedRepoError:
        message = "a gated Hugging Face repo: accept its terms on huggingface.co, then log in (hf auth login)"
    except RepositoryNotFoundError:
        message = f"not a local {local}, and no Hugging Face repo has it (a private repo needs hf auth login)"
    except RevisionNotFoundError:
        message = "no such revision on the Hugging Face Hub"
    except EntryNotFoundError:
        message = "no such file in that Hugging Face repo"
    except (HfHubHTTPError, OSError, ValueError) as e:
        message = first_line(e)
    raise TetherError(f"{what} '{path}': {message}")
