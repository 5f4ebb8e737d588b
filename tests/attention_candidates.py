"""The attention candidates the attention tests run over: every form a user or the tuner can
select is checked against the float64 reference by the same tests as the default.

A candidate is a set of backward switches (varlen attention's BACKWARD_VARIANTS and their
combinations; cross-attention has none) plus, optionally, a card's tiles forced on every launch
(ops/_attention_core.forced_tiles). Forced tiles matter most on the CPU: the interpreter's own
tiles are 32 x 32, so without them the block arithmetic of the tiles a GPU launches (128-key
blocks, 16-row steps, BLOCK_M != BLOCK_N) would never run here. On a GPU only the device's own
arch can be forced; the others are skipped there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from nvlm_kernels.ops._attention_core import device_arch, forced_tiles
from nvlm_kernels.ops.varlen_attention import BACKWARD_VARIANTS
from nvlm_kernels.testing import interpreter_safe_dtypes

SWITCHES = sorted({switch for switches in BACKWARD_VARIANTS.values() for switch in switches})
# each switch by the name of the variant that sets it alone ("atomic_dq", "kq", "split_group")
_SHORT = {switches[0]: name for name, switches in BACKWARD_VARIANTS.items() if len(switches) == 1}


@dataclass(frozen=True)
class Candidate:
    switches: tuple[str, ...] = ()
    tiles: tuple[str, int] | None = None   # forced_tiles(arch, option)

    def __str__(self) -> str:
        parts = [_SHORT[switch] for switch in self.switches]
        if self.tiles:
            parts.append(f"{self.tiles[0]}.{self.tiles[1]}")
        return "+".join(parts) or "default"

    def dtypes(self, device: str) -> list[torch.dtype]:
        """The dtypes of the widest sweep: every one the device can check for the default and on
        a GPU; on the interpreter one per candidate, to keep CI's time: fp16 where it forces a
        card's (16-bit) tiles, else fp32 (the switches change no precision, and fp32 has the
        tighter tolerance)."""
        if device == "cuda" or self == Candidate():
            return interpreter_safe_dtypes(device)
        return [torch.float16 if self.tiles else torch.float32]

    @contextlib.contextmanager
    def active(self, monkeypatch: pytest.MonkeyPatch, device: str):
        """Every switch set explicitly (on or off, whatever the caller's environment) and the
        tiles forced, for the duration of one test."""
        for switch in SWITCHES:
            monkeypatch.setenv(switch, "1" if switch in self.switches else "0")
        if self.tiles is None:
            yield
            return
        if device == "cuda" and self.tiles[0] != device_arch(torch.device("cuda")):
            pytest.skip(f"{self.tiles[0]} tiles are forced on the interpreter or that card")
        with forced_tiles(*self.tiles):
            yield


_ATOMIC, _KQ, _SPLIT = (BACKWARD_VARIANTS[name][0] for name in ("atomic_dq", "kq", "split_group"))

# sm_90's tiles at option 0 (the table), 1 and 2 (the tuner's alternatives; a kernel with fewer
# takes its last), each beside the backward form it most changes; sm_80's table once.
TILES = [Candidate(tiles=("sm90", 0)), Candidate((_KQ, _SPLIT), ("sm90", 0)),
         Candidate((_KQ, _ATOMIC), ("sm90", 1)), Candidate((_SPLIT,), ("sm90", 2)),
         Candidate((_KQ,), ("sm80", 0))]

VARLEN = [Candidate(), *(Candidate(switches) for switches in BACKWARD_VARIANTS.values()),
          Candidate((_ATOMIC, _KQ, _SPLIT)), *TILES]

# cross-attention reads no backward switch: its candidates are the tiles
CROSS = [Candidate(), *(Candidate(tiles=tiles) for tiles in dict.fromkeys(
    candidate.tiles for candidate in TILES))]
