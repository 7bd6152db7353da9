"""Secrets never reach a file: config keys that look secret and the values of secret environment variables are
blanked out of everything a run writes."""

from __future__ import annotations

import os
import re
from typing import Any

_SECRET_KEY = re.compile(r"(token|secret|password|api_key|apikey|credential)", re.IGNORECASE)
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """A copy of a config container with secret-looking keys and any secret env value blanked out."""
    secrets = [os.environ[name] for name in SECRET_ENV if os.environ.get(name)]
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) and v else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value
