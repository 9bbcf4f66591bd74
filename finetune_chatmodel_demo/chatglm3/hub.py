"""Model and tokenizer names as upstream takes them: a local folder, or a Hugging Face Hub id such as
`THUDM/chatglm3-6b`, found in the Hub cache or downloaded with `huggingface_hub` (which honours `HF_HOME`,
`HF_HUB_CACHE`, `HF_ENDPOINT` mirrors, `HF_HUB_OFFLINE` and `HF_TOKEN`).

A local folder always wins. The official repository's `*.py` files are fetched as plain files, only so that full
fine-tuning checkpoints can carry them for upstream's tools (chatglm3.checkpoint.upstream_files); nothing here imports or runs them.
"""
import os
from pathlib import Path
from typing import Optional

from chatglm3.errors import ChatGLMError

# What each use needs from a repository. Weights come in two copies on the official repository (safetensors and
# .bin shards, 12 GB each): the safetensors ones are fetched, the .bin ones only when there are no others.
TOKENIZER_FILES = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
MODEL_FILES = ["config.json", "generation_config.json", "*.py", *TOKENIZER_FILES]
SAFETENSORS_WEIGHTS = ["model*.safetensors", "model.safetensors.index.json"]
BIN_WEIGHTS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


class HubError(ChatGLMError):
    """A name that is neither a local folder nor a model the Hub (or its cache) can give; one line for the user."""


def looks_like_path(name: str) -> bool:
    """Written as a path (absolute, ./ ../ ~, a Windows drive, or more than one '/'): never a Hub id."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
            or (len(name) > 1 and name[1] == ":"))


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def _download(repo_id: str, patterns: list, revision, cache_dir, token, shown: str, local_files_only=False) -> Path:
    """snapshot_download, its exceptions turned into one line naming the id (`shown`: with the setting that gave
    it) and what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    endpoint = constants.ENDPOINT
    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                      allow_patterns=patterns, local_files_only=local_files_only))
    except HFValidationError:
        raise HubError(f"错误：{shown} 既不是本地目录，也不是合法的 Hub 模型名 / Error: {shown} is neither a local "
                       "folder nor a valid Hub id (owner/name): check the path") from None
    except GatedRepoError:
        raise HubError(f"错误：{endpoint} 上的 {shown} 需要授权，请设置 HF_TOKEN / Error: {shown} on {endpoint} is gated: "
                       "accept its terms and set HF_TOKEN, or pass a local folder") from None
    except RepositoryNotFoundError:
        raise HubError(f"错误：{shown} 不是本地目录，{endpoint} 上也没有这个模型 / Error: {shown} is neither a local folder "
                       f"nor a model on {endpoint}: check the name, or pass a local folder") from None
    except RevisionNotFoundError:
        raise HubError(f"错误：{shown} 没有版本 {revision} / Error: {shown} has no revision {revision!r} "
                       "(--model_revision)") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE or local_files_only:
            why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "local_files_only"
            zh, en = f"{why} 禁止下载", f"downloads are off ({why})"
        else:
            zh, en = f"无法连接 {endpoint}", f"cannot reach {endpoint} (a mirror: HF_ENDPOINT=https://hf-mirror.com)"
        raise HubError(f"错误：{shown} 不是本地目录，Hugging Face 缓存 {cache} 中也没有，且{zh}；请先联网下载一次或传入本地目录 / "
                       f"Error: {shown} is not a local folder nor in the Hugging Face cache {cache}, and {en}: "
                       "download it once online, or pass a local folder") from None
    except OSError as e:  # IncompleteSnapshotError, disk full, proxy errors ...
        raise HubError(f"错误：无法获取 {shown} / Error: cannot fetch {shown} from {endpoint} or the cache {cache}: "
                       f"{str(e).splitlines()[0]}") from None


def resolve(name_or_path, need: str = "model", revision: Optional[str] = None, cache_dir=None, token=None,
            label: Optional[str] = None, local_files_only: bool = False) -> str:
    """The local folder for `name_or_path`: the folder itself when it exists, else the Hub snapshot holding what
    `need` ("model": config, weights, tokenizer, code files; "tokenizer": the tokenizer files) asks for. `label`:
    the flag or variable the name came from, shown in errors."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    details = ([label] if label else []) + (["tokenizer.model"] if need == "tokenizer" else [])
    shown = f"{name} ({', '.join(details)})" if details else name  # errors name where it came from and what it is for
    if os.path.exists(name):
        raise HubError(f"错误：{shown} 不是目录 / Error: {shown} is not a folder")
    if looks_like_path(name) or not name.strip():
        raise HubError(f"错误：找不到目录 {shown}（也不是 Hub 模型名）/ Error: folder {shown} not found (nor a Hub id)")
    if need == "tokenizer":
        folder = _download(name, TOKENIZER_FILES, revision, cache_dir, token, shown, local_files_only)
    else:
        folder = _download(name, MODEL_FILES + SAFETENSORS_WEIGHTS, revision, cache_dir, token, shown, local_files_only)
        if not _has_weights(folder):
            folder = _download(name, MODEL_FILES + BIN_WEIGHTS, revision, cache_dir, token, shown, local_files_only)
    wanted = ["tokenizer.model"] if need == "tokenizer" else ["config.json"]
    missing = [f for f in wanted if not (folder / f).is_file()]
    if need == "model" and not _has_weights(folder):
        missing.append("weights")
    if missing:
        raise HubError(f"错误：{shown} 的缓存副本 {folder} 缺少 {', '.join(missing)}；请联网重新下载 / Error: the cached copy "
                       f"of {shown} ({folder}) lacks {', '.join(missing)}: download it again online")
    return str(folder)
