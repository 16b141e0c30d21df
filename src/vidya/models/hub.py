"""A Hugging Face hub id as a local directory: from the cache if it holds the model whole (no
network, nothing written: a cache mounted read-only, or owned by another user, serves as it is),
else downloaded into it. Each way it can fail is one error that says what to do."""
from __future__ import annotations

import glob
import json
import os


class HubError(ValueError):
    """The model could not be had from the hub or the cache; the message says what to do."""


HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def _complete(path: str) -> bool:
    """A cached snapshot holds a config and all its weights (a tokenizer or config fetched alone
    by transformers leaves a snapshot without them)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        return all(os.path.isfile(os.path.join(path, s)) for s in shards)
    return bool(glob.glob(os.path.join(path, "*.safetensors")))


def fetch(repo_id: str) -> str:
    """A hub id: from the Hugging Face cache if it is there (no network, nothing written: a cache
    mounted read-only, or owned by another user, serves as it is), else downloaded into it. Each
    way it can fail says what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub
    cache = constants.HF_HUB_CACHE
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
        if _complete(path):
            return path
    except Exception:  # noqa: BLE001 - not (all) in the cache: fetch it below
        pass
    if constants.HF_HUB_OFFLINE:
        raise HubError(
            f"{repo_id} is not in the Hugging Face cache at {cache}, and HF_HUB_OFFLINE is set. Mount a cache "
            f"that holds it there (docker: -v ~/.cache/huggingface:{os.path.dirname(cache)}), set HF_HOME to "
            f"one, unset HF_HUB_OFFLINE to download it, or pass its local directory with --model /path/to/dir")
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except hub.GatedRepoError:
        raise HubError(
            f"{repo_id} is a gated model: accept its license on https://huggingface.co/{repo_id} with your "
            f"account, then pass a token that may read it (HF_TOKEN=hf_... in the environment), or mount a "
            f"Hugging Face cache that already holds it at {cache}") from None
    except hub.RepositoryNotFoundError:
        raise HubError(
            f"{repo_id} is not a model on the Hugging Face hub, or it is private and no token that may read "
            f"it was given (HF_TOKEN); check the name, or pass a local directory with --model /path/to/dir") from None
    except PermissionError as e:
        raise HubError(
            f"could not write the download of {repo_id} into the Hugging Face cache at {cache} ({e.strerror}: "
            f"{e.filename}); it is not writable by this user (uid {os.getuid()}). Make it writable "
            f"(docker: --user $(id -u):$(id -g)), set HF_HOME to a writable folder, or download the model "
            f"into the cache first") from None
    except Exception as e:  # no network, a proxy, a hub outage...
        raise HubError(
            f"Could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}); the hub may be "
            f"unreachable from here, and the model is not in the cache at {cache}. Mount a cache that holds "
            f"it, download the model elsewhere and pass its local directory (config.json, *.safetensors, "
            f"tokenizer files) with --model /path/to/dir, or use --model smollm2 for the embedded "
            f"default.") from None
