"""Builds what a real TorchServe needs: a model store holding ``tiny.mar`` and a ``config.properties``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from .tiny_model import TinyModel

HERE = Path(__file__).resolve().parent
MODEL_NAME = "tiny"
MODEL_VERSION = "2.0"
#: Fixed weights: ``[1, 2, 3, 4]`` scores ``[10.0, -1.5]``.
WEIGHT = [[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0]]
BIAS = [0.0, 0.5]


def _tool(name: str) -> str:
    """A console script of this venv (the one TorchServe was installed into)."""
    return str(Path(sys.executable).with_name(name))


def build_model_store(store: Path, work: Path) -> Path:
    """Save the eager model's state_dict and archive it with our handler into ``store/tiny.mar``."""
    store.mkdir(parents=True, exist_ok=True)
    model = TinyModel()
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor(WEIGHT))
        model.linear.bias.copy_(torch.tensor(BIAS))
    weights = work / "tiny.pt"
    torch.save(model.state_dict(), weights)
    subprocess.run([_tool("torch-model-archiver"), "--model-name", MODEL_NAME, "--version", MODEL_VERSION,
                    "--model-file", str(HERE / "tiny_model.py"), "--serialized-file", str(weights),
                    "--handler", str(HERE / "tiny_handler.py"), "--export-path", str(store), "--force"],
                   check=True, capture_output=True, timeout=60)
    return store / f"{MODEL_NAME}.mar"


def write_config(path: Path, *, inference: int, management: int, metrics: int, store: Path) -> Path:
    """Loopback-only addresses, one worker, no token auth, and the worker on this venv's Python."""
    path.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{inference}",
        f"management_address=http://127.0.0.1:{management}",
        f"metrics_address=http://127.0.0.1:{metrics}",
        f"model_store={store}",
        "disable_token_authorization=true",
        "enable_envvars_config=true",
        "default_workers_per_model=1",
        "number_of_netty_threads=2",
        "netty_client_threads=1",
        "job_queue_size=16",
        "install_py_dep_per_model=false",
        # The frontend also passes --python sys.executable; naming it keeps the worker on this venv either way.
        f"python={sys.executable}",
        "",
    ]))
    return path
