"""``file_storage``: a directory where components keep state across restarts (persistent queues).

Exporters name it in ``sending_queue.storage``; each gets its own subdirectory. Start-up
fails with a clear message when the directory cannot be created or written, rather
than the first request failing later.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from sidecar.component import Component, Kind
from sidecar.config import ConfigModel
from sidecar.private_files import make_private_dir
from sidecar.registry import CreateSettings, Factory


class FileStorageConfig(ConfigModel):
    directory: str = "./var/sidecar-storage"
    #: fsync every write and rename: acknowledged data survives a power cut, at a latency cost per request.
    fsync: bool = True
    create_directory: bool = True


class StorageError(RuntimeError):
    pass


class FileStorage(Component):
    def __init__(self, settings: CreateSettings, cfg: FileStorageConfig):
        self.id = str(settings.id)
        self.directory = Path(cfg.directory)
        self.fsync = cfg.fsync
        self._create = cfg.create_directory

    def start(self, host) -> None:
        d = self.directory
        if not d.is_dir():
            if not self._create:
                raise StorageError(f"extensions.{self.id}.directory: {d} does not exist (set create_directory: true "
                                   "or create it)")
            try:
                make_private_dir(d)
            except OSError as e:
                raise StorageError(f"extensions.{self.id}.directory: cannot create {d}: {e.strerror}") from None
        try:
            with tempfile.NamedTemporaryFile(dir=d, prefix=".write-check-"):
                pass
        except OSError as e:
            raise StorageError(f"extensions.{self.id}.directory: {d} is not writable: {e.strerror}") from None

    def directory_for(self, kind: Kind, component_id: str) -> Path:
        """The private subdirectory of one component: ``exporter_otlp_jaeger`` for ``otlp/jaeger``."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(component_id))
        return self.directory / f"{kind.value}_{safe}"


def _create(settings: CreateSettings, cfg: FileStorageConfig, _next) -> FileStorage:
    return FileStorage(settings, cfg)


FACTORY = Factory(type="file_storage", kind=Kind.EXTENSION, config_model=FileStorageConfig, create=_create,
                  signals=frozenset())
