"""Memory: ``batch_budget="auto"``, peak memory in provenance, two-device pairs (issue 14)."""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import pytest
import torch

import mechdelta as md
from mechdelta.core._loading import resolve_devices
from mechdelta.core.pair import ModelPair
from mechdelta.errors import ConfigError, DeviceError, DeviceMismatchError
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching.results import BothDirections, PatchResult, SweepResult
from mechdelta.scale import _memory
from mechdelta.scale._devices import DeviceRunner, require_one_device
from mechdelta.scale._memory import (
    MAX_AUTO_BUDGET,
    PeakMemory,
    auto_budget,
    resolve_budget,
    row_bytes,
)
from tests import _builders
from tests._reference import N_BOOT, contrast_task, perturb_matching, random_tokens

MiB = 1024**2


@pytest.fixture(scope="module")
def native_pair() -> ModelPair:
    ref, itv = _builders.native_pair(lambda m: perturb_matching(m, lambda k: True))
    return ModelPair(ref, itv, names=("native-ref", "native-itv"))


@pytest.fixture(scope="module")
def task(native_pair):
    return contrast_task(native_pair, random_tokens(6, 7, int(native_pair.cfg.d_vocab), seed=5))


def _one(result: object) -> SweepResult:
    assert isinstance(result, SweepResult)
    return result


def _pairs(
    a: object, b: object
) -> list[tuple[SweepResult | PatchResult, SweepResult | PatchResult]]:
    """The two results of two ``direction="both"`` analyses, direction by direction."""
    assert isinstance(a, BothDirections) and isinstance(b, BothDirections)
    return list(zip(a, b, strict=True))


def _free(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(_memory, "free_memory", lambda device: nbytes)


def _trim_heap() -> None:
    """Return freed heap memory to the system (glibc), so new allocations raise the RSS."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# --- batch_budget="auto" --------------------------------------------------------------------------


def test_row_bytes_is_the_documented_formula(native_pair):
    cfg = native_pair.cfg  # d_model 64, 4 heads x 16, d_mlp 256, vocab 50
    got = row_bytes(cfg, seq_len=7, n_read=1, dtype=torch.float32)
    per_position = 4 * 64 + 4 * 4 * 16 + 2 * 4 * 7 + 2 * int(cfg.d_mlp)
    assert got == 7 * per_position * 4 * 2 + 1 * 50 * 4 * 3
    assert row_bytes(cfg, seq_len=7, n_read=1, dtype=torch.bfloat16) < got  # half the activations


def test_auto_budget_positive_and_shrinks_with_free_memory(native_pair, task, monkeypatch):
    prepared = task.prepare(native_pair.tokenizer, n_ctx=16, d_vocab=50)
    per_row = row_bytes(native_pair.cfg, seq_len=7, n_read=1, dtype=torch.float32)
    real = auto_budget(native_pair, prepared)  # the machine's real free RAM
    assert isinstance(real, int) and 1 <= real <= MAX_AUTO_BUDGET
    budgets = []
    for rows in (3000, 300, 30, 3):
        _free(monkeypatch, int(rows * per_row / _memory.SAFETY_FRACTION))
        budgets.append(resolve_budget("auto", native_pair, prepared))
    assert budgets == [3000, 300, 30, 3]  # half the free memory / bytes per row
    _free(monkeypatch, 10**15)
    assert resolve_budget("auto", native_pair, prepared) == MAX_AUTO_BUDGET
    _free(monkeypatch, 0)
    assert resolve_budget("AUTO", native_pair, prepared) == 1  # never below one row
    assert resolve_budget(None, native_pair, prepared) == 64
    assert resolve_budget(5, native_pair, prepared) == 5
    for bad in (0, -1, True, 2.5, "big"):
        with pytest.raises(ConfigError, match="batch_budget must be a positive int"):
            resolve_budget(bad, native_pair, prepared)


def test_auto_sweep_equals_int_budget_sweep(native_pair, task, monkeypatch):
    per_row = row_bytes(native_pair.cfg, seq_len=7, n_read=1, dtype=torch.float32)
    _free(monkeypatch, int(5 * per_row / _memory.SAFETY_FRACTION))  # "auto" -> 5 rows
    auto = _one(md.sweep(native_pair, task, "head_out", batch_budget="auto", n_boot=N_BOOT))
    fixed = _one(md.sweep(native_pair, task, "head_out", batch_budget=64, n_boot=N_BOOT))
    engine = auto.provenance["engine"]
    assert (engine["batch_budget"], engine["batch_budget_auto"]) == (5, True)
    assert fixed.provenance["engine"]["batch_budget_auto"] is False
    # batching differently moves float32 metrics by an ulp or so (measured 1.2e-6 on ~3.5)
    torch.testing.assert_close(auto.per_prompt, fixed.per_prompt, rtol=1e-6, atol=1e-6)
    assert bool(auto.per_prompt.abs().sum() > 0)  # not a vacuous comparison


def test_engine_rejects_bad_budget_before_preparing(native_pair, task):
    with pytest.raises(ConfigError, match="positive int .* or 'auto'"):
        PatchEngine(native_pair, task, batch_budget=0)


# --- peak memory ----------------------------------------------------------------------------------


def test_peak_memory_sees_an_allocation_freed_inside_the_block():
    _trim_heap()
    with PeakMemory("cpu") as peak:
        block = torch.ones(32 * MiB // 4)  # 32 MiB, pages touched
        time.sleep(0.2)  # the sampler (every 5 ms) sees it ...
        del block  # ... before it is gone at the block's end
    assert peak.method == "rss_sampled"
    assert peak.bytes >= 24 * MiB, peak.as_dict()
    assert peak.as_dict() == {"device": "cpu", "bytes": peak.bytes, "method": "rss_sampled"}
    with PeakMemory(["cpu", torch.device("cpu")]) as twice:  # one device, counted once
        pass
    assert twice.devices == (torch.device("cpu"),) and "per_device" not in twice.as_dict()
    with pytest.raises(ConfigError):
        PeakMemory([])


def test_sweep_provenance_records_a_positive_peak(native_pair, task):
    _trim_heap()
    result = _one(md.sweep(native_pair, task, "resid_pre", per_position=True, n_boot=N_BOOT))
    peak = result.provenance["engine"]["peak_memory"]
    assert peak["device"] == "cpu" and peak["method"] == "rss_sampled"
    assert isinstance(peak["bytes"], int) and peak["bytes"] > 0


# --- two devices ----------------------------------------------------------------------------------


def test_resolve_devices():
    cpu = torch.device("cpu")
    assert resolve_devices("cpu") == (cpu, cpu)
    assert resolve_devices(("cpu", cpu)) == (cpu, cpu)
    assert resolve_devices(["cpu", "cpu"]) == (cpu, cpu)
    with pytest.raises(DeviceError, match="holds 3 devices"):
        resolve_devices(("cpu", "cpu", "cpu"))
    with pytest.raises(DeviceError, match="holds 1 devices"):
        resolve_devices(("cpu",))
    with pytest.raises(DeviceError, match=r"device\[1\] \(the intervened model's device\)"):
        resolve_devices(("cpu", "gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"device\[0\].*cuda:0"):
            resolve_devices(("cuda:0", "cpu"))


def test_split_devices_flag_relaxes_only_the_device_check():
    from mechdelta.core._compat import check_compatible

    a, b = _builders.native_bridge(0), _builders.native_bridge(1)
    meta = torch.nn.Parameter(torch.empty(1, device="meta"))
    b.parameters = lambda: iter([meta])  # type: ignore[method-assign]
    with pytest.raises(DeviceMismatchError, match="device=\\(reference's, intervened's\\)"):
        check_compatible(a, b, check_activations=False)
    check_compatible(a, b, check_activations=False, split_devices=True)


def test_two_device_tuple_on_cpu_equals_one_device(hf_checkpoints, hf_checkpoints_seed1, hf_pairs):
    one = hf_pairs["gpt2"]
    two = md.ModelPair.load(
        hf_checkpoints["gpt2"], hf_checkpoints_seed1["gpt2"], device=("cpu", "cpu")
    )
    cpu = torch.device("cpu")
    assert two.devices == (cpu, cpu) and two.device == cpu
    assert "devices" not in two.provenance_models()  # only recorded when they differ
    task = contrast_task(one, random_tokens(4, 6, int(one.cfg.d_vocab), seed=3))
    a = md.sweep(one, task, "head_out", "both", per_position=True, n_boot=N_BOOT)
    b = md.sweep(two, task, "head_out", "both", per_position=True, n_boot=N_BOOT)
    for x, y in _pairs(a, b):
        assert torch.equal(x.per_prompt, y.per_prompt)
    sites = ["L1.attn_out", "L0H2.head_out"]
    pa = md.patch(one, task, sites, n_boot=N_BOOT)
    pb = md.patch(two, task, sites, n_boot=N_BOOT)
    assert isinstance(pa, PatchResult) and isinstance(pb, PatchResult)
    assert torch.equal(pa.per_prompt, pb.per_prompt)
    assert bool(pa.per_prompt.ne(pa.shift.intervened).any())  # the patch did something


def test_require_one_device_and_device_runner(native_pair):
    require_one_device(native_pair, "attribute")  # one device: fine

    class Split:
        devices = (torch.device("cuda", 0), torch.device("cuda", 1))

    with pytest.raises(DeviceError, match="two-device pairs are supported by sweep and patch"):
        require_one_device(Split(), "attribute")
    runner = DeviceRunner(native_pair.reference, home=torch.device("cpu"))
    tokens = random_tokens(2, 5, 50, seed=1)
    positions = torch.full((2, 1), 4)
    runner.record_block_convention(tokens)
    got = runner.logits_at(positions, tokens=tokens)
    want = native_pair.reference(tokens)[:, -1:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (a cuda:0 + cpu split)")
def test_split_pair_on_gpu_and_cpu_matches_cpu(hf_checkpoints, hf_checkpoints_seed1, hf_pairs):
    """Runs on a GPU machine: reference on cuda:0, intervened on the CPU (a real split)."""
    for family in ("gpt2", "llama"):
        one = hf_pairs[family]
        split = md.ModelPair.load(
            hf_checkpoints[family], hf_checkpoints_seed1[family], device=("cuda:0", "cpu")
        )
        assert split.devices == (torch.device("cuda", 0), torch.device("cpu"))
        assert split.provenance_models()["devices"] == ["cuda:0", "cpu"]
        task = contrast_task(one, random_tokens(4, 6, int(one.cfg.d_vocab), seed=3))
        for per_position in (False, True):
            a = md.sweep(one, task, "head_out", "both", per_position=per_position, n_boot=N_BOOT)
            b = md.sweep(split, task, "head_out", "both", per_position=per_position, n_boot=N_BOOT)
            for x, y in _pairs(a, b):
                torch.testing.assert_close(y.per_prompt, x.per_prompt, rtol=1e-4, atol=1e-4)
            peak = _pairs(a, b)[0][1].provenance["engine"]["peak_memory"]
            assert peak["device"] == "cuda:0,cpu" and set(peak["per_device"]) == {"cuda:0", "cpu"}
            assert peak["method"] == "cuda_max_allocated+rss_sampled"
        for sites in (["L1.attn_out", "L0H2.head_out"], ["L1.resid_mid"]):
            pa = md.patch(one, task, sites, "both", n_boot=N_BOOT)
            pb = md.patch(split, task, sites, "both", n_boot=N_BOOT, batch_budget="auto")
            for x, y in _pairs(pa, pb):
                torch.testing.assert_close(y.per_prompt, x.per_prompt, rtol=1e-4, atol=1e-4)
