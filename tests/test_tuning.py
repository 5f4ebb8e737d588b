"""The opt-in config tuner (nvlm_kernels/_tuning.py): off, it launches the table's entry;
on, it times every candidate once per key and keeps the fastest; and every candidate a launch
can pick is one the compile gate builds."""

from __future__ import annotations

import threading

import pytest
import torch

from nvlm_kernels import _tuning
from nvlm_kernels.ops._attention_core import ALTERNATIVES, CONFIGS, shipped_configs


class FakeTimer:
    """Times a launch by the config it ran with (a table of made-up milliseconds)."""

    def __init__(self, milliseconds: dict[str, float]):
        self.milliseconds = milliseconds
        self.timed: list[str] = []

    def launch(self, config: str) -> None:
        self.last = config

    def __call__(self, run) -> float:
        run()
        self.timed.append(self.last)
        return self.milliseconds[self.last]


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv("NVLM_KERNELS_AUTOTUNE", raising=False)
    monkeypatch.setattr(_tuning, "_CHOSEN", {})


def test_off_launches_the_first_candidate_untimed():
    timer = FakeTimer({"a": 3.0, "b": 1.0})
    assert _tuning.pick(("k",), ["a", "b"], timer.launch, timer) == "a"
    assert timer.timed == []


def test_on_picks_the_fastest_once_per_key(monkeypatch):
    timer = FakeTimer({"a": 3.0, "b": 1.0, "c": 2.0})
    with _tuning.autotuning():
        assert _tuning.pick(("k", 1), ["a", "b", "c"], timer.launch, timer) == "b"
        assert _tuning.pick(("k", 1), ["a", "b", "c"], timer.launch, timer) == "b"
    assert timer.timed == ["a", "b", "c"]          # the second call reused the choice
    timer.milliseconds["c"] = 0.5
    monkeypatch.setenv("NVLM_KERNELS_AUTOTUNE", "1")
    assert _tuning.pick(("k", 2), ["a", "b", "c"], timer.launch, timer) == "c"  # another key
    assert _tuning.tuned_configs() == {"k/1": "b", "k/2": "c"}


def test_a_single_candidate_is_never_timed():
    timer = FakeTimer({"a": 1.0})
    with _tuning.autotuning():
        assert _tuning.pick(("k",), ["a"], timer.launch, timer) == "a"
    assert timer.timed == [] and _tuning.tuned_configs() == {}


def test_autotuning_reaches_other_threads():
    """autograd runs a CUDA backward on its own device thread: the setting must reach it."""
    seen = []
    with _tuning.autotuning():
        worker = threading.Thread(target=lambda: seen.append(_tuning.autotune_enabled()))
        worker.start()
        worker.join()
    assert seen == [True]


def test_autotuning_block_restores_the_previous_setting():
    with _tuning.autotuning():
        with _tuning.autotuning(False):
            assert not _tuning.autotune_enabled()
        assert _tuning.autotune_enabled()
    assert not _tuning.autotune_enabled()


@pytest.mark.triton_interpret
@pytest.mark.parametrize("op", ["varlen_attention", "varlen_attention+atomic_dq",
                                "cross_attention"])
def test_tuned_launches_match_the_reference(monkeypatch, device, op):
    """The launchers under the tuner, on the interpreter with two candidate tiles: every
    candidate launch (and the final one) writes the whole result, also when dQ is accumulated
    with atomics (each timed launch starts from a zeroed buffer), and each kernel is tuned."""
    from nvlm_kernels.ops import _attention_core
    from nvlm_kernels.testing import assert_matches_reference, backend_unavailable_reason

    if device != "cpu":
        pytest.skip("the interpreter stand-in for a card's candidates; GPU runs the real ones")
    op, _, atomic = op.partition("+")
    reason = backend_unavailable_reason("triton", op, device, torch.float32)
    if reason:
        pytest.skip(reason)
    import test_cross_attention
    import test_varlen_attention

    monkeypatch.setattr(_attention_core, "candidates",
                        lambda *args: ((32, 32, 4, 1), (16, 64, 4, 1)))
    monkeypatch.setattr(_attention_core, "config_key", lambda *args: ("cpu",))
    if atomic:
        monkeypatch.setenv("NVLM_KERNELS_ATOMIC_DQ", "1")
    kernels = {"fwd", "bwd_dkdv"} if atomic else {"fwd", "bwd_dkdv", "bwd_dq"}
    milliseconds = iter([2.0, 1.0] * len(kernels))  # per kernel: the first, then the second
    monkeypatch.setattr(_tuning, "cuda_time", lambda run: (run(), next(milliseconds))[1])
    if op == "varlen_attention":
        inputs = test_varlen_attention.pack([5, 40, 70], [5, 40, 70], 4, 2, 32, torch.float32,
                                            device, True)
    else:
        inputs = test_cross_attention.make_inputs(70, 53, 4, 2, 32, torch.float32, device)
    with _tuning.autotuning():
        assert_matches_reference(op, inputs, "triton")
    picked = {key.split("/")[1]: config for key, config in _tuning.tuned_configs().items()}
    assert set(picked) == kernels
    assert all(config == (16, 64, 4, 1) for config in picked.values())  # the faster one
    assert next(milliseconds, None) is None  # each kernel timed both candidates once


def test_every_alternative_is_a_compile_gate_spec():
    from nvlm_kernels.compile_specs import shipped_specs

    names = {spec.name for spec in shipped_specs()}
    alternatives = [(key, index) for key, index, _config in shipped_configs() if index]
    assert len(alternatives) == sum(len(options) for options in ALTERNATIVES.values())
    for (arch, kind, padded, width), index in alternatives:
        assert (arch, kind, padded, width) in CONFIGS
        dtype = "bf16" if width == "16bit" else "fp32"
        # the keys-on-M dK/dV pass is varlen attention's only
        ops = ("varlen_attention",) if kind == "bwd_dkdv_kq" else ("varlen_attention",
                                                                    "cross_attention")
        for op in ops:
            assert any(name.startswith(f"{op}_{kind}[{arch},d={padded},")
                       and name.endswith(f"{dtype},alt{index}]") for name in names), (op, kind)


def test_forced_tiles_replace_the_candidates_of_every_launch():
    """forced_tiles(arch, option): the table entry or the option-th alternative (the last one
    where a kernel has fewer), 16-bit tiles on the interpreter whatever the dtype; restored on
    exit, also nested; a bad arch or option is refused by name."""
    from nvlm_kernels.ops._attention_core import INTERPRETER_CONFIG, candidates, forced_tiles

    cpu = torch.device("cpu")
    assert candidates(cpu, 128, "fwd", torch.float32) == (INTERPRETER_CONFIG,)
    with forced_tiles("sm90"):
        assert candidates(cpu, 128, "fwd", torch.float32) == (CONFIGS[("sm90", "fwd", 128, "16bit")],)
        with forced_tiles("sm90", 2):
            dq = ALTERNATIVES[("sm90", "bwd_dq", 128, "16bit")]
            assert candidates(cpu, 128, "bwd_dq", torch.float16) == (dq[1],)
            assert candidates(cpu, 128, "fwd", torch.float16) == (
                ALTERNATIVES[("sm90", "fwd", 128, "16bit")][-1],)
        assert candidates(cpu, 64, "bwd_dkdv_kq", torch.float16) == (
            CONFIGS[("sm90", "bwd_dkdv_kq", 64, "16bit")],)
    with forced_tiles("sm80", 1):
        assert candidates(cpu, 256, "bwd_dkdv", torch.float16) == (
            CONFIGS[("sm80", "bwd_dkdv", 256, "16bit")],)
    assert candidates(cpu, 128, "fwd", torch.float32) == (INTERPRETER_CONFIG,)
    for arch, option in (("sm75", 0), ("sm90", -1)):
        with pytest.raises(ValueError, match="forced_tiles"), forced_tiles(arch, option):
            pass
