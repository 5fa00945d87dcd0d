"""Datastore credentials, encrypted at rest. The key lives outside the metadata database: in
``$CAIRN_SECRET_KEY`` when set (a team server), else in ``.cairn/secret.key`` (mode 0600)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV_KEY = "CAIRN_SECRET_KEY"


class SecretBox:
    def __init__(self, key_file: Path) -> None:
        self._key_file = key_file
        self._fernet: Any = None

    def _box(self) -> Any:
        if self._fernet is None:
            from cryptography.fernet import Fernet

            key = os.environ.get(ENV_KEY)
            if not key:
                if not self._key_file.exists():
                    self._key_file.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(self._key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(Fernet.generate_key())
                key = self._key_file.read_text().strip()
            self._fernet = Fernet(key.encode() if isinstance(key, str) else key)
        return self._fernet

    def seal(self, secrets: dict[str, Any]) -> str:
        return self._box().encrypt(json.dumps(secrets).encode()).decode()

    def open(self, token: str) -> dict[str, Any]:
        from cryptography.fernet import InvalidToken

        try:
            return json.loads(self._box().decrypt(token.encode()))
        except InvalidToken:
            raise PermissionError(
                f"the datastore credentials cannot be decrypted with the key in {self._key_file} "
                f"(or ${ENV_KEY}); register the datastore again with its credentials") from None
