"""Uploading a run's final model to the Hugging Face Hub. The settings are checked, offline, when the config is
built: an upload that cannot work would otherwise fail only after the training it was to publish."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

logger = logging.getLogger(__name__)


@dataclass
class HubArguments:
    """Hub upload settings, named as in transformers' TrainingArguments."""

    push_to_hub: bool = False
    """Upload the final model (output_dir/final) to the Hub repository hub_model_id when the run ends."""
    hub_model_id: str | None = None
    """The repository: 'name' (under the token's account) or 'owner/name'; created when missing."""
    hub_private_repo: bool | None = None
    """Create the repository private (None: the account's default); an existing repository keeps its visibility."""
    hub_token: str | None = None
    """The token to upload with (default: HF_TOKEN, else the token `hf auth login` saved)."""

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        check_hub_settings(self)


def check_hub_settings(config) -> None:
    """Refuse a malformed hub_model_id, and push_to_hub without a repository or a token to upload with."""
    if config.hub_model_id is not None:
        try:
            validate_repo_id(config.hub_model_id)
        except HFValidationError as error:
            raise ValueError(f"hub_model_id must be 'name' or 'owner/name': letters, digits, '-', '_' and '.', "
                             f"at most 96 characters ({error})") from None
    if not config.push_to_hub:
        return
    if config.hub_model_id is None:
        raise ValueError("push_to_hub needs hub_model_id, the repository to upload to: 'name' or 'owner/name'")
    if not (config.hub_token or get_token()):
        raise ValueError("push_to_hub needs a Hugging Face token with write access: log in with `hf auth login`, "
                         "or set HF_TOKEN or hub_token")


def push_final(config, directory: str) -> str | None:
    """Upload `directory` to the repository config.hub_model_id (created if missing) when config.push_to_hub;
    returns the commit's URL (None without push_to_hub)."""
    if not config.push_to_hub:
        return None
    api = HfApi(token=config.hub_token)
    repo = api.create_repo(config.hub_model_id, private=config.hub_private_repo, exist_ok=True)
    commit = api.upload_folder(repo_id=repo.repo_id, folder_path=directory,
                               commit_message=f"dlm-rl: upload the final model ({type(config).__name__})")
    logger.info("uploaded %s to %s", directory, commit.commit_url)
    return commit.commit_url
