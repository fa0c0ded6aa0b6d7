"""`push_to_hub` settings (`dlm_rl.hub`): checked offline when the config is built; the upload's calls, recorded."""

from __future__ import annotations

import dataclasses
import types

import pytest
from transformers import TrainingArguments

from dlm_rl import hub
from dlm_rl.checkpoint import CheckpointArguments
from dlm_rl.hub import HubArguments, push_final


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: "hf_cached")


def test_off_by_default_and_needs_no_token(no_token):
    assert HubArguments().push_to_hub is False
    HubArguments(hub_model_id="owner/name")


@pytest.mark.parametrize("repo", ["name", "owner/name", "Owner-1/my_model.v2"])
def test_a_repository_and_a_token_pass(token, repo):
    assert HubArguments(push_to_hub=True, hub_model_id=repo).hub_model_id == repo


def test_push_to_hub_needs_a_repository(token):
    with pytest.raises(ValueError, match="push_to_hub needs hub_model_id"):
        HubArguments(push_to_hub=True)


@pytest.mark.parametrize("repo", ["a/b/c", "owner/", "my model", "-name", "a--b", "name.git", "x" * 97])
def test_a_malformed_repository_is_refused(token, repo):
    with pytest.raises(ValueError, match="hub_model_id must be 'name' or 'owner/name'"):
        HubArguments(push_to_hub=True, hub_model_id=repo)
    with pytest.raises(ValueError, match="hub_model_id must be"):
        HubArguments(hub_model_id=repo)


def test_push_to_hub_without_a_token_says_how_to_log_in(no_token):
    with pytest.raises(ValueError, match="needs a Hugging Face token .* `hf auth login`, or set HF_TOKEN or hub_token"):
        HubArguments(push_to_hub=True, hub_model_id="owner/name")
    HubArguments(push_to_hub=True, hub_model_id="owner/name", hub_token="hf_given")


def test_a_saved_login_or_hf_token_is_a_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="needs a Hugging Face token"):
        HubArguments(push_to_hub=True, hub_model_id="name")
    (tmp_path / "token").write_text("hf_saved")  # what `hf auth login` writes
    HubArguments(push_to_hub=True, hub_model_id="name")
    (tmp_path / "token").unlink()
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    HubArguments(push_to_hub=True, hub_model_id="name")


def test_the_check_runs_in_a_trainer_config_after_the_other_bases(token):
    """Listed first among the bases, HubArguments runs its check and the other bases' __post_init__."""

    @dataclasses.dataclass
    class Online(HubArguments, CheckpointArguments):
        pass

    with pytest.raises(ValueError, match="push_to_hub needs hub_model_id"):
        Online(push_to_hub=True)
    with pytest.raises(ValueError, match="save_steps must be"):
        Online(save_steps=-1)
    assert Online(resume="true").resume == "latest"  # CheckpointArguments.__post_init__ ran

    @dataclasses.dataclass
    class SFT(HubArguments, TrainingArguments):
        pass

    with pytest.raises(ValueError, match="push_to_hub needs hub_model_id"):
        SFT(output_dir="out", push_to_hub=True)
    assert SFT(output_dir="out", push_to_hub=True, hub_model_id="owner/name").hub_model_id == "owner/name"
    assert SFT(output_dir="out", use_cpu=True).device.type == "cpu"  # TrainingArguments.__post_init__ ran


class RecordingApi:
    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("HfApi", token))

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))
        return types.SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, **options):
        self.calls.append(("upload_folder", options))
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{options['repo_id']}/commit/1")


def test_push_final_creates_the_repository_and_uploads_the_directory(token, monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    config = HubArguments(push_to_hub=True, hub_model_id="name", hub_private_repo=True, hub_token="hf_given")
    assert push_final(config, str(tmp_path)) == "https://huggingface.co/me/name/commit/1"
    (api, token_used), create, upload = RecordingApi.calls
    assert (api, token_used) == ("HfApi", "hf_given")
    assert create == ("create_repo", "name", {"private": True, "exist_ok": True})
    assert upload[1]["repo_id"] == "me/name" and upload[1]["folder_path"] == str(tmp_path)


def test_push_final_does_nothing_without_push_to_hub(no_token, monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    assert push_final(HubArguments(), str(tmp_path)) is None
    assert RecordingApi.calls == []


def test_a_finished_run_uploads_its_final_model_and_keeps_the_token_out_of_its_files(monkeypatch, tmp_path):
    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    run(TraceRLConfig(model="tiny", gen_length=4, max_steps=1, num_generations=2, prompts_per_step=2, eval_size=2,
                      report_to="none", output_dir=str(tmp_path / "run"), push_to_hub=True, hub_model_id="me/run",
                      hub_token="hf_secret_1234", save_steps=1))
    upload = RecordingApi.calls[-1]
    assert upload[0] == "upload_folder" and upload[1]["folder_path"] == str(tmp_path / "run" / "final")
    written = [p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert written and not any(b"hf_secret_1234" in data for data in written)
