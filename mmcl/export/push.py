"""Upload an export to the Hugging Face Hub: one commit, one-sentence errors, the token never shown.

    push_export(folder, "org/name", private=False, revision=None, commit_message=None)

Before any network call: the folder must be a complete export, hold no credential in its
texts (an export written before mmcl redacted them), a token must be available (HF_TOKEN,
else the `hf auth login` token file) and offline mode must be off. Then
`HfApi.create_repo(exist_ok=True)`, `create_branch` for a non-main revision, and one
`create_commit` of exactly the files the export consists of (`export_files`: the list in
mmcl_export.json, else the card's file list): a stray `.env` or checkpoint in the folder stays
home. When something fails the error says whether the commit was created: before the upload
nothing was; during it, the branch head is read again and compared with the head before the
upload. The endpoint is read from HF_ENDPOINT at call time (huggingface_hub reads it once at import).

The uploaded card's usage snippet loads the repo id; the local README.md is changed to the
same bytes only after the commit succeeded, so a failed push leaves the folder as it was.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from mmcl.export.errors import PushError

REQUIRED_FILES = ("config.json", "model.safetensors", "README.md")
TOKENIZER_FILES = ("tokenizer_config.json",)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_NETWORK_ERRORS = {"TransportError", "NetworkError", "ConnectError", "ConnectTimeout", "TimeoutException",
                   "ConnectionError", "Timeout", "OfflineModeIsEnabled"}


def check_export_dir(folder: str | Path) -> Path:
    """Raise PushError unless `folder` holds a complete export (weights, config, card, processor, tokenizer)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PushError(f"export folder {folder} does not exist; create it with `mmcl export --run RUN --out {folder}`.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not _has_image_processor(folder):
        missing.append("preprocessor_config.json (or processor_config.json with an image processor)")
    if _has_text_tower(folder):
        missing += [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise PushError(f"{folder} is not a complete export ({', '.join(missing)} missing); run `mmcl export` again.")
    return folder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _has_image_processor(folder: Path) -> bool:
    if (folder / "preprocessor_config.json").is_file():
        return True
    processor = _read_json(folder / "processor_config.json")
    return isinstance(processor, dict) and "image_processor" in processor


def _has_text_tower(folder: Path) -> bool:
    info = _read_json(folder / "mmcl_export.json")
    if isinstance(info, dict):
        return "text" in info
    config = _read_json(folder / "config.json")
    return isinstance(config, dict) and "text_config" in config


def resolve_token() -> str:
    """HF_TOKEN, else the token saved by `hf auth login`; PushError when there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PushError("no Hugging Face token found; set HF_TOKEN or run `hf auth login` with a token that has write access.")
    return token


def _check_online() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set, which blocks every upload; unset it (and TRANSFORMERS_OFFLINE) for the push.")


def _check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id or ""):
        raise PushError(f"repo id '{repo_id}' must look like 'org/name' (letters, digits, '-', '_', '.').")


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def card_for(folder: Path, repo_id: str) -> bytes:
    """The card with its usage snippet loading `repo_id` (the folder is not changed)."""
    from mmcl.export.card import set_model_id

    return set_model_id((folder / "README.md").read_text(), repo_id).encode()


def point_card_at(folder: Path, repo_id: str) -> None:
    """Make the card's usage snippet load `repo_id` (replaces README.md when it changes)."""
    card = card_for(folder, repo_id)
    if card != (folder / "README.md").read_bytes():
        temporary = folder / ".README.md.tmp"
        temporary.write_bytes(card)
        temporary.replace(folder / "README.md")


def export_files(folder: Path) -> list[str]:
    """Names of the files export `folder` consists of: mmcl_export.json's "files", else the card's
    "## Files" list (exports of older mmcl). PushError when a listed file is missing or neither list exists."""
    info = _read_json(folder / "mmcl_export.json")
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        card = (folder / "README.md").read_text()
        section = card.split("\n## Files\n", 1)[1].split("\n## ", 1)[0] if "\n## Files\n" in card else ""
        files = re.findall(r"^- `([^`/]+)`", section, flags=re.MULTILINE)
    if not files:
        raise PushError(f"{folder} does not say which files it consists of (no 'files' in mmcl_export.json, no file "
                        "list in README.md); run `mmcl export` again.")
    bad = [name for name in files if name in ("", ".", "..") or "/" in name or "\\" in name]
    missing = [name for name in files if name not in bad and not (folder / name).is_file()]
    if bad or missing:
        raise PushError(f"{folder} is not a complete export ({', '.join(bad + missing)} listed but missing); "
                        "run `mmcl export` again.")
    return list(dict.fromkeys(files))


def stray_files(folder: str | Path) -> list[str]:
    """Entries of `folder` that are not part of the export (left out of a push)."""
    folder = Path(folder).expanduser()
    files = set(export_files(folder))
    return sorted(p.name for p in folder.iterdir() if p.name not in files)


TEXT_FILES = ("README.md", "mmcl_config.yaml", "mmcl_export.json", "metrics.json")


def check_no_credentials(folder: Path, files: list[str]) -> None:
    """Raise PushError when a text file of the export holds a credential (`mmcl.redact` would change it)."""
    from mmcl.redact import redact

    for name in TEXT_FILES:
        if name in files:
            text = (folder / name).read_text(errors="replace")
            if redact(text) != text:
                raise PushError(f"{folder / name} holds what looks like a credential (a token in a shard URL, header "
                                "or environment value); export the run again with this mmcl, which redacts it.")


def check_exact(folder: Path) -> None:
    """Raise PushError when mmcl_export.json marks a side that plain transformers does not reproduce."""
    info = _read_json(folder / "mmcl_export.json") or {}
    for kind in ("image", "text"):
        side = info.get(kind)
        if isinstance(side, dict) and not side.get("exact", True):
            raise PushError(
                f"{folder} is not exact in plain transformers on the {kind} side ({side.get('reason')}), so whoever "
                "downloads it gets NaN features unless they use mmcl's loader; retrain with an exact choice (the run's "
                "start-up warning names it) or pass --allow-inexact to push it anyway."
            )


def push_export(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, allow_inexact: bool = False):
    """Upload export `folder` to model repo `repo_id` in one commit; returns huggingface_hub's CommitInfo.

    An export that plain transformers does not reproduce (a NaN projection) is refused unless `allow_inexact`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = check_export_dir(folder)
    files = export_files(folder)
    check_no_credentials(folder, files)
    if not allow_inexact:
        check_exact(folder)
    _check_repo_id(repo_id)
    _check_online()
    token = token or resolve_token()
    url = endpoint()
    api = HfApi(endpoint=url, token=token)
    branch = revision or "main"
    card = card_for(folder, repo_id)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=card if name == "README.md" else str(folder / name))
                  for name in files]
    stage, before = "creating the repository", None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch != "main":
            stage = f"creating branch '{branch}'"
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
        stage = "reading the branch head"
        before = api.repo_info(repo_id, revision=branch, repo_type="model").sha
        stage = "uploading"
        info = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload {folder.name} with mmcl")
    except Exception as error:
        committed = _committed_since(api, repo_id, branch, before) if stage == "uploading" else False
        message = explain(error, repo_id, url, stage, branch, committed)
        raise PushError(message.replace(token, "***"), committed) from error
    point_card_at(folder, repo_id)  # the folder now holds what the repo holds
    return info


def _committed_since(api, repo_id: str, branch: str, before: str | None) -> bool | None:
    """Did the branch head move during the failed upload? None when the Hub cannot be asked."""
    try:
        return api.repo_info(repo_id, revision=branch, repo_type="model").sha != before
    except Exception:
        return None


def explain(error: BaseException, repo_id: str, url: str, stage: str, branch: str, committed: bool | None) -> str:
    """One sentence: what went wrong, what to do, and what happened on the Hub."""
    if committed is False:
        outcome = "nothing was uploaded" if stage != "uploading" else "nothing was committed"
    elif committed:
        outcome = f"the commit was created anyway, see {url}/{repo_id}/commits/{branch}"
    else:
        outcome = f"whether the commit was created could not be checked, see {url}/{repo_id}/commits/{branch}"
    status = getattr(getattr(error, "response", None), "status_code", None)
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & _NETWORK_ERRORS and status is None:
        reason = _first_line(error) or type(error).__name__
        return f"cannot reach {url} while {stage} ({reason}); check the network connection or HF_ENDPOINT; {outcome}."
    if status == 401:
        return (f"the Hub rejected the token as invalid (401 Unauthorized) while {stage}; create a token with write access "
                f"at {url}/settings/tokens and set HF_TOKEN; {outcome}.")
    if status == 403:
        return (f"the token may not write to {repo_id} (403 Forbidden) while {stage}; use a token with write access "
                f"to that namespace or choose another repo id; {outcome}.")
    if status == 404:
        return f"{repo_id} (branch '{branch}') was not found or is not visible to this token (404) while {stage}; {outcome}."
    if status is not None:
        server = getattr(error, "server_message", None) or ""
        detail = f" ({server.splitlines()[0][:200]})" if server.strip() else ""
        return f"the Hub answered HTTP {status} while {stage}{detail}; {outcome}."
    return f"uploading to {repo_id} failed while {stage} ({type(error).__name__}: {_first_line(error)}); {outcome}."


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


# ----------------------------------------------------------------------------- training runs


def check_push_config(cfg) -> None:
    """Fail before training when `push_to_hub` is set but the push could not happen at the end."""
    if getattr(cfg, "push_to_hub", None) is None:
        return
    _check_repo_id(cfg.push_to_hub.repo_id)
    _check_online()
    resolve_token()


def push_after_training(cfg, output_dir: str | Path) -> str:
    """Export the finished run in `output_dir` to `<output_dir>/hf_export` and push it; returns the commit URL.

    Call on rank 0 after metrics.json and training.png are written. Raises ExportError or
    PushError (one sentence each); the run's own outputs are already safe on disk by then.
    """
    from mmcl.export.export import export_run

    settings = cfg.push_to_hub
    folder = export_run(output_dir, Path(output_dir) / "hf_export", overwrite=True)
    info = push_export(folder, settings.repo_id, private=settings.private, revision=settings.revision,
                       commit_message=settings.commit_message or f"Upload {Path(output_dir).name} trained with mmcl",
                       allow_inexact=settings.allow_inexact)
    return info.commit_url
