"""instrument_model leaves the user's module what it was: same object, same checkpoints, same hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from opentelemetry.trace import StatusCode

from instrumentation import instrument_model, uninstrument_model


def net() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_same_object_same_class_indexing_and_state_dict_keys(spans):
    model = net()
    keys = list(model.state_dict())
    out = instrument_model(model, "seq", "1", tracer_provider=spans.provider)
    assert out is model and type(model) is torch.nn.Sequential and isinstance(model, torch.nn.Sequential)
    assert isinstance(model[0], torch.nn.Linear) and len(model) == 3
    assert list(model.state_dict()) == keys == ["0.weight", "0.bias", "2.weight", "2.bias"]
    model(torch.randn(2, 4))
    assert [s.name for s in spans.finished()] == ["ml.forward seq"]


def test_checkpoint_saved_from_the_plain_model_loads_into_the_instrumented_one(spans, tmp_path):
    plain = net()
    torch.save(plain.state_dict(), tmp_path / "ckpt.pt")
    model = instrument_model(net(), "seq", tracer_provider=spans.provider)
    result = model.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, 4)
    assert torch.equal(model(x), plain(x))
    # and the other way: a checkpoint of the instrumented model loads into a plain one
    torch.save(model.state_dict(), tmp_path / "back.pt")
    net().load_state_dict(torch.load(tmp_path / "back.pt"))


def test_the_users_own_hooks_run_inside_the_forward_span(spans):
    model = net()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append("user-pre"))
    model.register_forward_hook(lambda m, args, out: calls.append("user-post"))
    instrument_model(model, "seq", tracer_provider=spans.provider)
    model.register_forward_hook(lambda m, args, out: out * 0)  # a hook that replaces the output
    out = model(torch.randn(2, 4))
    assert calls == ["user-pre", "user-post"] and torch.count_nonzero(out) == 0
    (span,) = spans.finished()
    assert span.attributes["ml.output.shapes"] == ("2x2",)


def test_a_failing_user_pre_hook_still_ends_the_span_with_the_error(spans):
    model = instrument_model(net(), "seq", tracer_provider=spans.provider)

    def bad(m, args):
        raise ValueError("rejected input")

    model.register_forward_pre_hook(bad)
    with pytest.raises(ValueError):
        model(torch.randn(2, 4))
    (span,) = spans.finished()
    assert span.status.status_code is StatusCode.ERROR
    with spans.provider.get_tracer("t").start_as_current_span("after"):
        pass
    assert spans.named("after")[0].parent is None  # the context was restored


def test_to_device_train_eval_and_deepcopy(spans):
    model = instrument_model(net(), "seq", tracer_provider=spans.provider)
    assert model.to(torch.float64) is model and model[0].weight.dtype == torch.float64
    model.to("cpu")
    model.eval()
    assert not model.training and not model[0].training
    model.train()
    assert model.training
    clone = copy.deepcopy(model)
    clone(torch.randn(1, 4, dtype=torch.float64))
    assert spans.finished()[0].attributes["ml.input.dtypes"] == ("float64",)


def add_one(module, args: tuple[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    return out + 1


def test_torch_jit_script_of_the_instrumented_model(spans):
    model = net()
    model.register_forward_hook(add_one)  # the user's hook is scriptable
    instrument_model(model, "seq", tracer_provider=spans.provider,
                     submodules={"max_depth": 1})
    scripted = torch.jit.script(model)
    x = torch.randn(2, 4)
    assert torch.allclose(scripted(x), model(x))  # the user's hook is compiled in, ours are not
    assert list(scripted.state_dict()) == list(model.state_dict())
    assert isinstance(model[0], torch.nn.Linear) and not isinstance(model[0], torch.jit.ScriptModule)
    names = [s.name for s in spans.finished()]
    assert names.count("ml.forward seq") == 1  # only the eager call is traced


def test_compile_after_instrumenting(spans):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x).relu()

    model = instrument_model(Net(), "net", tracer_provider=spans.provider)
    compiled = torch.compile(model, backend="eager")
    for n in (2, 2, 3):
        compiled(torch.randn(n, 4))
    assert [s.attributes["ml.batch_size"] for s in spans.named("ml.forward net")] == [2, 2, 3]


def test_uninstrument_removes_only_our_hooks(spans):
    model = net()
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append("user"))
    instrument_model(model, "seq", tracer_provider=spans.provider, submodules={"max_depth": 1})
    assert instrument_model(model, "seq") is model  # idempotent: still one set of hooks
    model(torch.randn(1, 4))
    assert len(spans.named("ml.forward seq")) == 1
    assert uninstrument_model(model) is model
    model(torch.randn(1, 4))
    assert len(spans.finished()) == 1 + 3 and calls == ["user", "user"]
    assert "__prepare_scriptable__" not in model.__dict__
    assert not model[0]._forward_hooks and len(model._forward_hooks) == 1


def test_whole_model_pickles_and_loads_still_instrumented(spans, tmp_path):
    model = instrument_model(net(), "seq", "4", tracer_provider=spans.provider)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert isinstance(loaded, torch.nn.Sequential) and list(loaded.state_dict()) == list(model.state_dict())
    loaded(torch.randn(1, 4))  # traced on the global providers (none in this test): it runs, it is no wrapper
    assert instrument_model(loaded) is loaded and uninstrument_model(loaded) is loaded
