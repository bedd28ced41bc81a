"""Model factories for the replay tests: ``--model tests.instrumentation.replay_models:same``."""

import torch


def same() -> torch.nn.Module:
    """The classifier the recorded requests ran on (fixed seed: every call builds identical weights)."""
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def perturbed() -> torch.nn.Module:
    """The same classifier with noise on its last layer: a candidate version that drifted."""
    model = same()
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        model[2].weight.add_(torch.randn(model[2].weight.shape, generator=gen) * 0.5)
    return model


def not_a_factory():
    raise RuntimeError("never called")
