"""Loading sources and devices: hub names (ORG/NAME) from an offline Hugging Face cache, local
paths, and every device problem as a typed error with the fix (issue 9)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mechdelta import (
    DeviceError,
    DeviceOutOfMemoryError,
    MechDeltaError,
    MissingTokenizerError,
    ModelLoadError,
    ModelPair,
)
from mechdelta.core import _loading
from mechdelta.core._loading import (
    Processing,
    load_bridge,
    out_of_memory_as_error,
    resolve_device,
    resolve_source,
)
from tests import _builders

CUDA = torch.cuda.is_available()


# --- a Hugging Face hub cache laid out offline ------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache at ``$HF_HOME/hub``, offline, in an empty working directory.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE once, at import, into
    ``huggingface_hub.constants``; it and transformers read those module attributes at call time,
    so patching them (and the environment, for anything started later) redirects every lookup.
    """
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for var, value in (("HF_HOME", home), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformer_lens.utilities.hf_utils.CACHE_DIR", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # no local directory shadows a hub name
    return cache


def cache_repo(
    cache: Path,
    repo: str,
    family: str,
    tokenizer,
    seed: int = 0,
    *,
    files: tuple[str, ...] | None = None,
) -> Path:
    """``models--ORG--NAME/snapshots/<40 hex>/`` (save_pretrained + tokenizer), ``refs/main``.

    ``files`` keeps only those files of the snapshot (a partial download).
    """
    commit = hashlib.sha1(f"{repo}@{seed}".encode()).hexdigest()
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = _builders.save_checkpoint(folder / "snapshots", family, tokenizer, seed, commit)
    if files is not None:
        for f in snapshot.iterdir():
            if f.name not in files:
                f.unlink()
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_names_with_an_organisation_load_from_the_offline_cache(hub_cache, tokenizer):
    from transformers import AutoModelForCausalLM

    snapshots = {
        repo: cache_repo(hub_cache, repo, "neox", tokenizer, seed)
        for seed, repo in enumerate(("acme/tiny-neox", "acme/tiny-neox-sft"))
    }
    # before issue 9 this raised "'acme/tiny-neox' looks like a local path but is not a directory"
    pair = ModelPair.load("acme/tiny-neox", "acme/tiny-neox-sft", device="cpu")
    assert pair.names == ("acme/tiny-neox", "acme/tiny-neox-sft")
    assert pair.reference_hash != pair.intervened_hash
    tokens = pair.reference.to_tokens(["the cat sat on the mat", "hello world"])
    for model, snapshot in zip((pair.reference, pair.intervened), snapshots.values(), strict=True):
        hf = AutoModelForCausalLM.from_pretrained(snapshot, attn_implementation="eager").eval()
        with torch.no_grad():
            assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


def test_hub_name_without_an_organisation(hub_cache, tokenizer):
    cache_repo(hub_cache, "tiny-llama", "llama", tokenizer)
    bridge = load_bridge("tiny-llama", device="cpu", dtype=torch.float32, processing=Processing.RAW)
    assert bridge.cfg.n_layers == 3 and len(bridge.tokenizer) == len(tokenizer)


def test_existing_directory_wins_over_a_hub_name(hub_cache, tokenizer):
    cache_repo(hub_cache, "acme/tiny-neox", "neox", tokenizer)
    assert resolve_source("acme/tiny-neox", need_tokenizer=True).local is False
    local = _builders.save_checkpoint(Path("acme"), "gpt2", tokenizer, name="tiny-neox")
    for name in ("acme/tiny-neox", "./acme/tiny-neox", local.absolute()):
        src = resolve_source(name, need_tokenizer=True)
        assert src.local and Path(src.target).resolve() == local.resolve()


def test_hub_name_missing_offline_says_what_and_how(hub_cache, tokenizer, monkeypatch):
    cache_repo(hub_cache, "acme/tiny-neox", "neox", tokenizer)

    def boot(*args, **kwargs):
        raise AssertionError("nothing may be loaded before both sources are checked")

    from transformer_lens.model_bridge import TransformerBridge

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(boot))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        ModelPair.load("acme/tiny-neox", "acme/no-such-model", device="cpu")
    assert time.perf_counter() - start < 5  # no network retries
    msg = str(info.value)
    for needle in (
        "hub model 'acme/no-such-model' is not in the local Hugging Face cache",
        str(hub_cache / "models--acme--no-such-model"),
        "HF_HUB_OFFLINE=1 is set",
        "`hf download acme/no-such-model`",
        "give a local checkpoint directory",
    ):
        assert needle in msg, (needle, msg)
    assert "\n" not in msg


def test_partial_cache_and_missing_tokenizer(hub_cache, tokenizer):
    cache_repo(
        hub_cache, "acme/no-tok", "gpt2", tokenizer, files=("config.json", "model.safetensors")
    )
    with pytest.raises(MissingTokenizerError, match="cached at .* without tokenizer files"):
        ModelPair.load("acme/no-tok", "acme/no-tok")
    files = ("config.json", "tokenizer.json", "tokenizer_config.json")  # no weights
    cache_repo(hub_cache, "acme/no-weights", "gpt2", tokenizer, files=files)
    with pytest.raises(ModelLoadError, match="cached copy may be incomplete") as info:
        load_bridge("acme/no-weights", device="cpu", dtype=torch.float32, processing=Processing.RAW)
    assert "could not load hub model 'acme/no-weights'" in str(info.value)


def test_clear_paths_that_do_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("./missing-dir", "../missing-dir", "~/mechdelta-no-such-dir", tmp_path / "nope"):
        with pytest.raises(ModelLoadError, match="local checkpoint directory .* does not exist"):
            ModelPair.load(name, name)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file, not a checkpoint directory"):
        ModelPair.load("a-file", "a-file")
    with pytest.raises(ModelLoadError, match="neither an existing local directory nor a hub name"):
        ModelPair.load("acme/tiny/neox", "acme/tiny/neox")


# --- devices ----------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="checks the error for a machine without CUDA; this one has it")
def test_cuda_without_cuda_is_a_typed_error(hf_checkpoints):
    ckpt = hf_checkpoints["gpt2"]
    for device in ("cuda", "cuda:7", torch.device("cuda:0")):
        with pytest.raises(DeviceError, match="use device='cpu'") as info:
            ModelPair.load(ckpt, ckpt, device=device)
        if torch.version.cuda is None:  # a CPU-only build of torch, as on these machines
            assert "torch has no CUDA support in this environment" in str(info.value)
            assert f"(torch {torch.__version__})" in str(info.value)


@pytest.mark.parametrize(
    "device, needle",
    [
        ("gpu", "a GPU is 'cuda' to torch"),
        ("cuda:x", "not a device name torch understands"),
        ("", "not a device name torch understands"),
        ("meta", "meta holds shapes, no weights"),
        ("opengl", "loads models onto cpu, cuda, mps, xpu only"),
    ],
)
def test_unusable_device_strings(device, needle, hf_checkpoints, tokenizer):
    with pytest.raises(DeviceError, match="use 'cpu', 'cuda', 'cuda:N'") as info:
        ModelPair.load(hf_checkpoints["gpt2"], hf_checkpoints["gpt2"], device=device)
    assert needle in str(info.value)
    model = _builders.hf_model("gpt2", len(tokenizer))
    with pytest.raises(DeviceError, match="use 'cpu'"):
        ModelPair.from_hf(model, model, tokenizer=tokenizer, device=device)
    with pytest.raises(DeviceError, match="use 'cpu'"):  # checked before peft is imported
        ModelPair.from_peft(hf_checkpoints["gpt2"], hf_checkpoints["gpt2"], device=device)


@pytest.mark.parametrize("device", ["mps", "xpu:0"])
def test_accelerators_this_torch_cannot_see(device):
    kind = device.split(":")[0]
    module = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
    if module is not None and module.is_available():
        pytest.skip(f"{kind} is available here")
    with pytest.raises(DeviceError, match=f"'{device}' is not available in this environment"):
        resolve_device(device)


def test_accepted_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = torch.device("cuda" if CUDA else "cpu")
    assert resolve_device(None) == expected and resolve_device("auto") == expected


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend torch is a CUDA build; the test sets how many GPUs it sees."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")

    def set_gpus(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_gpus


def test_gpu_index_beyond_those_visible(fake_cuda):
    fake_cuda(2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device(None) == torch.device("cuda")
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda:7")
    assert "'cuda:7' asks for cuda device 7, but only 2 are visible (cuda:0, cuda:1)" in str(
        info.value
    )
    assert "CUDA_VISIBLE_DEVICES" in str(info.value)
    fake_cuda(0)
    with pytest.raises(DeviceError, match="built with CUDA but sees no GPU.*use device='cpu'"):
        resolve_device("cuda")


def test_out_of_memory_while_loading_is_typed(hf_checkpoints, tokenizer, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    raised: list[BaseException] = []

    def boot(*args, **kwargs):
        raise raised[-1]

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(boot))
    ckpt = hf_checkpoints["gpt2"]
    raised.append(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(DeviceOutOfMemoryError) as info:
        ModelPair.load(ckpt, ckpt, device="cpu")
    msg = str(info.value)
    assert msg.startswith(f"out of memory loading {str(ckpt)!r} onto cpu in torch.float32")
    assert "Tried to allocate 2.00 GiB" in msg and "dtype='bfloat16'" in msg
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)

    raised.append(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"))
    with pytest.raises(DeviceOutOfMemoryError, match="use a machine with more memory") as info:
        ModelPair.load(ckpt, ckpt, device="cpu", dtype="bfloat16")
    assert "smaller dtype" not in str(info.value)  # already half precision

    raised.append(RuntimeError("size mismatch for wte.weight"))  # not memory: a load error
    with pytest.raises(ModelLoadError, match="size mismatch") as load_info:
        ModelPair.load(ckpt, ckpt, device="cpu")
    assert not isinstance(load_info.value, DeviceError)

    raised.append(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    model = _builders.hf_model("gpt2", len(tokenizer))
    with pytest.raises(DeviceOutOfMemoryError, match="in-memory GPT2LMHeadModel"):
        ModelPair.from_hf(model, model, tokenizer=tokenizer)


def test_out_of_memory_fixes_on_a_gpu():
    with (
        pytest.raises(DeviceOutOfMemoryError) as info,
        out_of_memory_as_error("'m'", torch.device("cuda:0"), torch.float32),
    ):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    msg = str(info.value)
    assert "dtype='bfloat16'" in msg and "device='cpu'" in msg and "empty_cache()" in msg
    with (
        pytest.raises(ValueError, match="unrelated"),
        out_of_memory_as_error("'m'", torch.device("cpu"), torch.float32),
    ):
        raise ValueError("unrelated")


def test_all_loading_errors_are_mechdelta_errors():
    for cls in (DeviceError, DeviceOutOfMemoryError):
        assert issubclass(cls, MechDeltaError)
    assert _loading.is_local_path("./x") and not _loading.is_local_path("EleutherAI/pythia-160m")


# --- the command line: one line, exit 1 ---------------------------------------------------------


def _experiment(tmp_path: Path, reference: str, intervened: str, device: str) -> Path:
    pair = {"reference": reference, "intervened": intervened, "device": device}
    toml = "\n".join(
        [
            'name = "device-check"',
            "[pair]",
            *(f"{k} = {json.dumps(v)}" for k, v in pair.items()),
            "[task]",
            'prompts = ["the cat sat on the"]',
            'answers = [" mat"]',
            'wrong = [" log"]',
            "[[analyses]]",
            'kind = "shift"',
        ]
    )
    path = tmp_path / "exp.toml"
    path.write_text(toml + "\n")
    return path


@pytest.mark.parametrize(
    "device, source, needle",
    [
        ("gpu", "checkpoint", "error: device 'gpu' is not a device name torch understands"),
        ("cpu", "acme/no-such-model", "error: hub model 'acme/no-such-model' is not in the local"),
        pytest.param(
            "cuda",
            "checkpoint",
            "error: device 'cuda' needs CUDA",
            marks=pytest.mark.skipif(
                CUDA or torch.version.cuda is not None, reason="needs a CPU-only build of torch"
            ),
        ),
    ],
)
def test_cli_prints_one_line(
    device, source, needle, tmp_path, monkeypatch, hf_checkpoints, hub_cache
):
    from mechdelta.cli import app

    monkeypatch.chdir(tmp_path)
    ckpt = str(hf_checkpoints["gpt2"])
    exp = _experiment(tmp_path, ckpt if source == "checkpoint" else source, ckpt, device)
    res = CliRunner().invoke(app, ["run", str(exp), "--quiet"])
    assert res.exit_code == 1, res.output
    assert res.stderr.startswith(needle), res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output
