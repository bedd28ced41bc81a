"""The model TorchServe serves in the end-to-end test: eager mode, one class (BaseHandler's rule)."""

import torch


class TinyModel(torch.nn.Module):
    """4 features in, 2 scores out; weights fixed so the test can check the answer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
