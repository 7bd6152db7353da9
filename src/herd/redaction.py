"""Secrets never reach a file: values under keys that name a credential, and the values of secret environment
variables wherever they appear, are blanked out of everything a run writes.

What is redacted (tests/test_redaction.py holds the table):

- The value under a key that names a credential. The key is split into words at `_ - . /`, spaces and
  camelCase (`hub_token`, `WANDB_API_KEY`, `apiKey`, `db.password` -> hub|token, wandb|api|key, api|key,
  db|password); it names a credential when a word is one of CREDENTIAL_WORDS (token, secret, password,
  passwd, credential, auth, authorization, key, apikey, private_key and access_key through `key`, ...) or
  ends in one of CREDENTIAL_SUFFIXES (hftoken, dbpassword). Values of every kind are blanked (strings,
  numbers, whole dicts and lists) except None, booleans and empty ones, which carry no secret
  (`use_auth_token: true` stays readable).
- Any string, anywhere (values, keys, list items, free text such as a system prompt, run names, tags),
  containing the value of a secret environment variable: SECRET_ENV, and every variable whose name names a
  credential by the rule above (GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, ...) with a value of at least
  MIN_ENV_SECRET characters (shorter values such as "1" are flags, and would blank every "1" in a file).

What is not, on purpose, so that configs and metrics stay usable:

- Words that count or describe credentials rather than hold one: a key with a word among NOT_A_SECRET
  (`max_new_tokens` has `tokens`, not `token`; `num_key_value_heads`, `token_id`, `pad_token_id`,
  `auth_type`, `key_len`, `api_key_env`, `token_file`: a count, an id, a type, the name of a variable or a
  path to a file, not the secret).
- Tokenizer vocabulary: `bos_token`, `eos_token`, `pad_token`, `unk_token`, ... (a special token's text).
- Words that merely contain a credential word: `tokenizer`, `monkey`, `keys`, `author`, `keyword`; and `pwd`
  (PWD is the working directory: every path under it would be blanked).
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
REDACTED = "<redacted>"
MIN_ENV_SECRET = 8

CREDENTIAL_WORDS = frozenset({
    "token", "secret", "secrets", "password", "passwd", "passphrase", "credential", "credentials",
    "auth", "authorization", "apikey", "key", "cookie", "bearer",
})
CREDENTIAL_SUFFIXES = ("token", "secret", "password", "passwd", "apikey", "credential", "credentials")
NOT_A_SECRET = frozenset({
    "id", "ids", "len", "length", "size", "count", "counts", "num", "type", "types", "max", "min", "limit",
    "budget", "index", "dim", "env", "var", "file", "path", "dir", "url",
})
SPECIAL_TOKENS = frozenset({"bos", "eos", "pad", "unk", "sep", "cls", "mask"})

_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def key_words(key: Any) -> list[str]:
    """`key` split into lowercase words at separators and camelCase: "hubToken_v2" -> hub, token, v, 2."""
    return [word.lower() for word in _WORD.findall(str(key))]


def is_secret_key(key: Any) -> bool:
    """True when `key` names a credential (module docstring: the rule and its exceptions)."""
    words = key_words(key)
    if not words or any(word in NOT_A_SECRET for word in words):
        return False
    for index, word in enumerate(words):
        if word == "token" and index > 0 and words[index - 1] in SPECIAL_TOKENS:
            continue  # pad_token, eos_token: tokenizer vocabulary
        if word in CREDENTIAL_WORDS or (word.endswith(CREDENTIAL_SUFFIXES) and len(word) > 5):
            return True
    return False


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values of the secret environment variables set now, longest first (a secret that contains
    another is replaced whole)."""
    environ = os.environ if environ is None else environ
    found = {value for name, value in environ.items()
             if value and (name in SECRET_ENV or (is_secret_key(name) and len(value) >= MIN_ENV_SECRET))}
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every secret environment value in it replaced by REDACTED."""
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def _blank(value: Any) -> bool:
    return value is None or isinstance(value, bool) or (isinstance(value, (str, dict, list, tuple)) and not value)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a config container (dicts, lists, tuples, scalars, any depth) with the values of secret-looking
    keys and every secret environment value blanked out."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {
            (redact_text(k, secrets) if isinstance(k, str) else k):
                (REDACTED if is_secret_key(k) and not _blank(v) else redact(v, secrets))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value
