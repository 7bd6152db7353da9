"""Secret redaction (herd.redaction), table-driven: which key names are secret and which are not, containers
of any depth (lists of dicts too), secret environment values typed into free text; and every file a real
tiny run writes (a one-job sweep tracked with offline W&B) free of the secrets in its environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from herd.redaction import REDACTED, is_secret_key, redact, secret_values
from tests.conftest import FAST_TRAIN, REPO

FAKE_HF_TOKEN = "hf_SECRETHFTOKEN0123456789abcdefABCDEF"
FAKE_WANDB_KEY = "f" * 8 + "SECRETWANDBKEY0123456789abcdefabcdef"
FAKE_DB_PASSWORD = "SECRETdbPassw0rd-xyz"
SECRETS = (FAKE_HF_TOKEN, FAKE_WANDB_KEY, FAKE_DB_PASSWORD)

SECRET_KEYS = [
    "token", "hub_token", "HF_TOKEN", "hf-token", "hfToken", "hftoken", "access_token", "AccessToken",
    "secret", "client_secret", "aws.secret_access_key", "password", "db.password", "DB_PASSWORD", "passwd",
    "passphrase", "api_key", "apiKey", "APIKey", "apikey", "WANDB_API_KEY", "x-api-key", "credential",
    "credentials", "aws_credentials", "auth", "Authorization", "private_key", "access_key", "key", "ssh-key",
    "cookie", "session_cookie", "bearer",
]
ORDINARY_KEYS = [
    "max_new_tokens", "num_tokens", "train/num_tokens", "completion_tokens", "prompt_tokens", "tokens_per_s",
    "train/tokens_per_s", "num_input_tokens_seen", "tokenizer", "tokenizer_location", "chat_template",
    "pad_token", "eos_token", "bos_token", "unk_token", "pad_token_id", "eos_token_id", "token_id",
    "num_key_value_heads", "num_keys", "keys", "sort_keys", "monkey", "keyword", "author", "auth_type",
    "key_len", "api_key_env", "token_file", "learning_rate", "max_steps", "system_prompt", "name", "tags",
    "PWD", "OLDPWD", "TOKENIZERS_PARALLELISM", "", "max_seq_len", "save_total_limit",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_key_names_a_credential(key):
    assert is_secret_key(key)
    assert redact({key: "s3cr3t-value"}) == {key: REDACTED}


@pytest.mark.parametrize("key", ORDINARY_KEYS)
def test_ordinary_key_is_kept(key):
    assert not is_secret_key(key)
    assert redact({key: "value", "nested": {key: 48}}) == {key: "value", "nested": {key: 48}}


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("MY_DB_PASSWORD", FAKE_DB_PASSWORD)  # not a known name: secret by its name
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # a flag: too short to be a secret
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


# (input, redacted): any depth, dicts in lists in dicts, tuples, secret-named keys holding containers
CONTAINERS = {
    "nested dicts": ({"a": {"b": {"hub_token": "x", "lr": 1}}}, {"a": {"b": {"hub_token": REDACTED, "lr": 1}}}),
    "list of dicts": ({"extra": [{"password": "p"}, {"name": "n"}]},
                      {"extra": [{"password": REDACTED}, {"name": "n"}]}),
    "lists in lists": ([[{"api_key": "k"}], ["plain"]], [[{"api_key": REDACTED}], ["plain"]]),
    "tuple": (({"secret": "s"}, 3), ({"secret": REDACTED}, 3)),
    "secret key holding a dict": ({"credentials": {"user": "u", "pass": "p"}}, {"credentials": REDACTED}),
    "secret key holding a list": ({"tokens": [1, 2], "auth": ["u", "p"]}, {"tokens": [1, 2], "auth": REDACTED}),
    "number under a secret key": ({"db_password": 1234}, {"db_password": REDACTED}),
    "nothing to hide": ({"token": None, "use_auth_token": True, "hf_token": "", "key": []},
                        {"token": None, "use_auth_token": True, "hf_token": "", "key": []}),
    "ordinary settings": ({"max_new_tokens": 48, "num_key_value_heads": 8, "pad_token": "<unk>"},
                          {"max_new_tokens": 48, "num_key_value_heads": 8, "pad_token": "<unk>"}),
}


@pytest.mark.parametrize("name", CONTAINERS)
def test_containers_of_any_depth(name, secret_env):
    value, expected = CONTAINERS[name]
    before = json.dumps(value)
    assert redact(value) == expected
    assert json.dumps(value) == before  # a copy: the input is left as it was


# (input, redacted): a secret environment value typed into free text, wherever it sits
FREE_TEXT = {
    "system prompt": ({"data": {"system_prompt": f"Use {FAKE_HF_TOKEN} to log in."}},
                      {"data": {"system_prompt": f"Use {REDACTED} to log in."}}),
    "run name": ({"tracking": {"name": f"run-{FAKE_WANDB_KEY}"}}, {"tracking": {"name": f"run-{REDACTED}"}}),
    "tags": ({"tags": ["a", FAKE_HF_TOKEN, f"x{FAKE_DB_PASSWORD}y"]}, {"tags": ["a", REDACTED, f"x{REDACTED}y"]}),
    "a key": ({FAKE_WANDB_KEY: 1}, {REDACTED: 1}),
    "a command line": (f"python -m train data.system_prompt='Bearer {FAKE_HF_TOKEN}'",
                       f"python -m train data.system_prompt='Bearer {REDACTED}'"),
    "lists of dicts": ([{"notes": [f"pw {FAKE_DB_PASSWORD}"]}], [{"notes": [f"pw {REDACTED}"]}]),
    "a short flag value is not a secret": ({"x": "1 and 11"}, {"x": "1 and 11"}),
}


@pytest.mark.parametrize("name", FREE_TEXT)
def test_secret_environment_values_in_free_text(name, secret_env):
    value, expected = FREE_TEXT[name]
    assert redact(value) == expected


def test_secret_values_come_from_known_and_secret_named_variables(secret_env):
    assert sorted(secret_values()) == sorted(SECRETS)


# ---- every file a real run writes ---------------------------------------------------------------------------

def files_containing(roots, needles) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {needle[:12]}..." for needle in needles if needle.encode() in data]
    return found


@pytest.mark.slow  # ~40 s on 2 cores: one short tracked training run
def test_no_file_a_run_writes_holds_a_secret(tmp_path):
    """A one-job sweep (so Hydra writes multirun.yaml), tracked with offline W&B, with fake secrets in the
    environment and typed into free-text keys: data.system_prompt, tracking.name, tracking.tags."""
    import os

    from herd.training.tracking.wandb import offline_run_dirs
    from tests.conftest import OFFLINE_ENV
    from tests.wandb_reader import read_wandb_run

    sweep_dir, home, cache = tmp_path / "sweep", tmp_path / "wandb-home", tmp_path / "cache"
    env = {**os.environ, **OFFLINE_ENV, "HF_TOKEN": FAKE_HF_TOKEN, "WANDB_API_KEY": FAKE_WANDB_KEY,
           "MY_DB_PASSWORD": FAKE_DB_PASSWORD, "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_DATA_DIR": str(home / "data"), "WANDB_CONFIG_DIR": str(home / "config"), "HERD_RUN_ID": "t"}
    for name in ("WANDB_DIR", "WANDB_SERVICE", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    overrides = [*FAST_TRAIN, "tracking=wandb_offline", "train.max_steps=2", "train.eval_steps=2",
                 "train.save_steps=2", "data.max_samples=24", f"data.cache_dir={cache}",
                 f"data.system_prompt='Answer like {FAKE_HF_TOKEN} would.'",
                 f"tracking.name=run-{FAKE_WANDB_KEY}", f"tracking.tags=[t1,{FAKE_DB_PASSWORD}]",
                 f"output_dir={sweep_dir}"]
    result = subprocess.run([sys.executable, "-m", "train", "-m", "train.learning_rate=3e-3", *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = sweep_dir / "0"
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    for name in ("sweep/multirun.yaml", "sweep/0/config.yaml", "sweep/0/herd_run.json", "sweep/0/manifest.json",
                 "sweep/0/metrics.json", "sweep/0/metrics.jsonl", "sweep/0/wandb_run_id"):
        assert name in written, sorted(written)
    [offline] = offline_run_dirs(run_dir)
    assert any(p.suffix == ".wandb" for p in offline.iterdir())
    assert not files_containing([tmp_path], SECRETS)

    # Redacted, not dropped: the free text keeps its shape, and nothing else was blanked.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["system_prompt"] == f"Answer like {REDACTED} would."
    assert config["tracking"]["name"] == f"run-{REDACTED}" and config["tracking"]["tags"] == ["t1", REDACTED]
    blanked = [line for line in (run_dir / "config.yaml").read_text().splitlines() if REDACTED in line]
    assert len(blanked) == 3, blanked
    assert json.loads((run_dir / "herd_run.json").read_text())["data"]["system_prompt"] == \
        f"Answer like {REDACTED} would."
    run = read_wandb_run(offline)
    assert run.name == f"run-{REDACTED}" and run.config["data"]["system_prompt"] == f"Answer like {REDACTED} would."
    multirun = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
    assert f"data.system_prompt='Answer like {REDACTED} would.'" in multirun["hydra"]["overrides"]["task"]
