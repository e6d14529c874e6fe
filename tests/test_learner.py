"""A real Learner (PEFT + DeepSpeed, CPU, gloo) on the tiny random Llama. No mocks.

The first DeepSpeed init in a fresh cache compiles its shm comm op (~40-70 s, cached under
$RETRORL_CACHE/torch_extensions); every later Learner starts in ~0.3 s (ZeRO 1-3: ~1.5 s).
"""

from __future__ import annotations

import random

import pytest
import torch

from agents.model import TINY_MODEL, load_model, resolve_model
from agents.trajectory import ACTOR, REFLECTOR
from learners.adapters import CONFIG_NAME, WEIGHTS_NAME, adapter_dir, list_versions, load_adapter
from learners.batching import TokenSample
from learners.learner import Learner
from learners.losses import token_logprobs


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return str(resolve_model(TINY_MODEL))


def make(tiny_path: str, tmp_path, **kw) -> Learner:
    kw = {"dtype": "float32", "lr": 1e-2, "seed": 0, "output_dir": tmp_path / "learner", **kw}
    return Learner(tiny_path, **kw)


def samples(role: str, n: int = 4, seed: int = 0, prompt: int = 12, completion: int = 10) -> list[TokenSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, c = prompt + i, completion + (i % 3)
        ids = [rng.randint(100, 5000) for _ in range(p + c)]
        out.append(TokenSample(ids, [0] * p + [1] * c, role))
    return out


def snapshot(learner: Learner, adapter: str) -> dict[str, torch.Tensor]:
    return learner.adapter_tensors(adapter)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_il_lowers_loss_and_leaves_other_role_untouched(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path, max_len=40)
    data = samples(ACTOR)
    too_long = TokenSample(list(range(100, 150)), [0] * 40 + [1] * 10, ACTOR)
    refl = samples(REFLECTOR, n=2, seed=9)
    before = sum(learner.sequence_logprobs(data))
    reflector_before = snapshot(learner, REFLECTOR)
    actor_before = snapshot(learner, ACTOR)

    m = learner.train_il(data + [too_long], epochs=4, max_tokens_per_batch=64)

    assert m["dropped_long"] == 1 and m["samples"] == 4
    assert m["tokens"] == 4 * sum(s.n_trained for s in data)
    assert m["steps"] >= 4 and m["tokens_per_s"] > 0 and learner.step == m["steps"]
    assert m["loss/actor"] < m["loss_first/actor"]
    assert sum(learner.sequence_logprobs(data)) > before + 1.0
    assert not same(snapshot(learner, ACTOR), actor_before)
    assert same(snapshot(learner, REFLECTOR), reflector_before)  # no Adam drift on the untrained adapter
    # an untrained adapter (B = 0) is the base model; the trained one is not
    assert learner.sequence_logprobs(refl) == pytest.approx(learner.sequence_logprobs(refl, base=True), abs=1e-4)
    assert sum(learner.sequence_logprobs(data)) > sum(learner.sequence_logprobs(data, base=True)) + 1.0


def test_joint_step_trains_both_roles(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path)
    actor, refl = samples(ACTOR, n=3), samples(REFLECTOR, n=3, seed=5)
    a0, r0 = snapshot(learner, ACTOR), snapshot(learner, REFLECTOR)
    before = learner.sequence_logprobs(actor + refl)
    m = learner.train_il(actor + refl, epochs=3, max_tokens_per_batch=4096)
    assert m["steps"] == 3  # one batch per role, both in the same optimizer step
    assert {"loss/actor", "loss/reflector"} <= m.keys()
    assert not same(snapshot(learner, ACTOR), a0) and not same(snapshot(learner, REFLECTOR), r0)
    after = learner.sequence_logprobs(actor + refl)
    assert sum(after[:3]) > sum(before[:3]) and sum(after[3:]) > sum(before[3:])


def test_role_epochs_give_a_role_more_passes(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path)
    actor, refl = samples(ACTOR, n=3), samples(REFLECTOR, n=3, seed=5)
    m = learner.train_il(actor + refl, epochs=1, max_tokens_per_batch=4096, role_epochs={REFLECTOR: 3})
    assert m["steps"] == 3  # one joint step, then two reflector-only steps
    assert m["tokens"] == sum(s.n_trained for s in actor) + 3 * sum(s.n_trained for s in refl)
    assert m["loss/reflector"] < m["loss_first/reflector"]  # its last epoch vs its first
    assert m["loss/actor"] == m["loss_first/actor"]  # the actor's only epoch


def test_gradient_checkpointing_one_role_per_step(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path, gradient_checkpointing=True)
    r0 = snapshot(learner, REFLECTOR)
    m = learner.train_il(samples(ACTOR, n=2) + samples(REFLECTOR, n=2, seed=4), epochs=1)
    assert m["steps"] == 2  # recomputation would use the wrong adapter in a joint step
    assert not same(snapshot(learner, REFLECTOR), r0)


@pytest.mark.parametrize("slice_head", [True, False])
def test_token_logprobs_match_plain_hf_forward(tiny_path, tmp_path, slice_head):
    learner = make(tiny_path, tmp_path, slice_head=slice_head)
    data = samples(ACTOR, n=3, seed=2)
    got = learner.token_logprobs(data, base=True)
    model = load_model(tiny_path, torch.float32).eval()
    for s, lp in zip(data, got):
        assert lp.shape == (len(s),)
        ids = torch.tensor([s.ids])
        with torch.no_grad():
            ref = token_logprobs(model(ids).logits[:, :-1], ids[:, 1:])[0]
        mask = torch.tensor(s.mask, dtype=torch.bool)
        assert (lp[~mask] == 0).all()
        assert torch.allclose(lp[1:][mask[1:]], ref[mask[1:]], atol=1e-4)


def test_publish_writes_loadable_adapter(tiny_path, tmp_path):
    from peft import PeftModel

    learner = make(tiny_path, tmp_path)
    assert learner.versions() == {ACTOR: 0, REFLECTOR: 0}
    assert learner.publish() == []  # nothing trained yet
    data = samples(ACTOR)
    learner.train_il(data, epochs=2)
    (update,) = learner.publish()
    assert (update.role, update.version) == (ACTOR, 1) and learner.versions() == {ACTOR: 1, REFLECTOR: 0}
    assert all(".actor." not in k and "lora_" in k for k in update.tensors)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in update.tensors.values())
    folder = adapter_dir(learner.adapter_root, ACTOR, 1)
    assert (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file()
    tensors, config = load_adapter(folder)
    assert same(tensors, update.tensors)
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert sum(t.numel() for t in tensors.values()) < 50_000  # adapter only, never base weights

    # the folder alone reproduces the learner's policy through plain PEFT
    peft_model = PeftModel.from_pretrained(load_model(tiny_path, torch.float32), str(folder)).eval()
    ours = learner.token_logprobs(data[:2])
    for s, lp in zip(data[:2], ours):
        ids = torch.tensor([s.ids])
        with torch.no_grad():
            ref = token_logprobs(peft_model(ids).logits[:, :-1], ids[:, 1:])[0]
        mask = torch.tensor(s.mask[1:], dtype=torch.bool)
        assert torch.allclose(lp[1:][mask], ref[mask], atol=1e-4)

    assert learner.publish() == []
    learner.train_il(data[:1], epochs=1)
    (update2,) = learner.publish()
    assert update2.version == 2 and list_versions(learner.adapter_root, ACTOR) == [1, 2]
    assert same(load_adapter(folder)[0], update.tensors)  # v1 untouched
    assert not same(update2.tensors, update.tensors)
    assert not any(p.name.startswith(".") for p in (learner.adapter_root / ACTOR).iterdir())  # no temp leftovers


def test_checkpoint_roundtrip_resumes_exactly(tiny_path, tmp_path):
    a = make(tiny_path, tmp_path / "a")
    data = samples(ACTOR) + samples(REFLECTOR, n=2, seed=3)
    a.train_il(data, epochs=2)
    a.publish()
    a.train_il(samples(ACTOR, n=2, seed=7), epochs=1)  # actor dirty again, reflector clean
    ckpt = a.save_checkpoint(tmp_path / "ckpt" / "step")
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapters.safetensors", "learner.json", "optimizer.pt", "rng.pt"]

    b = make(tiny_path, tmp_path / "b", seed=123)
    assert not same(snapshot(b, ACTOR), snapshot(a, ACTOR))
    b.load_checkpoint(ckpt)
    for role in (ACTOR, REFLECTOR):
        assert same(snapshot(b, role), snapshot(a, role))
    assert b.versions() == a.versions() == {ACTOR: 1, REFLECTOR: 1}
    assert b.step == a.step

    # same optimizer state, RNG and batch order: the next steps are bit-identical
    state = torch.get_rng_state()  # the torch RNG is process-global; both learners share it here
    a.train_il(data, epochs=1)
    torch.set_rng_state(state)
    b.train_il(data, epochs=1)
    for role in (ACTOR, REFLECTOR):
        assert same(snapshot(b, role), snapshot(a, role))
    assert [u.role for u in b.publish()] == [ACTOR, REFLECTOR] and b.versions() == {ACTOR: 2, REFLECTOR: 2}


def test_shared_adapter(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path, shared_adapter=True)
    refl = samples(REFLECTOR, n=2, seed=4)
    before = learner.sequence_logprobs(refl)
    learner.train_il(samples(ACTOR), epochs=2)
    assert learner.sequence_logprobs(refl) != pytest.approx(before, abs=1e-4)  # one adapter serves both roles
    updates = learner.publish()
    assert [(u.role, u.version) for u in updates] == [(ACTOR, 1), (REFLECTOR, 1)]
    assert same(updates[0].tensors, updates[1].tensors)


@pytest.mark.parametrize("dtype,stage", [("bfloat16", 2), ("float32", 3)])
def test_zero_stages_and_bf16(tiny_path, tmp_path, dtype, stage):
    learner = make(tiny_path, tmp_path, dtype=dtype, zero_stage=stage)
    assert {k: learner.describe()[k] for k in ("dtype", "zero_stage")} == {"dtype": dtype, "zero_stage": stage}
    data = samples(ACTOR)
    r0 = snapshot(learner, REFLECTOR)
    before = sum(learner.sequence_logprobs(data))
    learner.train_il(data, epochs=3)
    assert sum(learner.sequence_logprobs(data)) > before + 0.5
    assert same(snapshot(learner, REFLECTOR), r0)
    (update,) = learner.publish()
    assert same(load_adapter(adapter_dir(learner.adapter_root, ACTOR, 1))[0], update.tensors)
    ckpt = learner.save_checkpoint(tmp_path / "ckpt")
    other = make(tiny_path, tmp_path / "o", dtype=dtype, zero_stage=stage, seed=5)
    other.load_checkpoint(ckpt)
    assert same(snapshot(other, ACTOR), snapshot(learner, ACTOR)) and other.versions() == learner.versions()


def test_pin_ninja_puts_the_environments_ninja_first(monkeypatch):
    """torch's JIT runs the first `ninja` on PATH; a system ninja hashes build commands unlike the venv's, so
    processes started with and without the venv's bin/ on PATH would rebuild DeepSpeed's op for each other."""
    import os
    import shutil
    import sys

    from learners.learner import pin_ninja

    own = os.path.join(os.path.dirname(sys.executable), "ninja")
    if not os.path.isfile(own):
        pytest.skip("this Python environment has no ninja of its own")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    pin_ninja()
    assert shutil.which("ninja") == own
    pin_ninja()  # idempotent: once first, PATH is left alone
    assert os.environ["PATH"] == os.pathsep.join([os.path.dirname(own), "/usr/bin", "/bin"])


def test_the_process_group_is_gone_before_the_interpreter_finalizes(tiny_path, tmp_path):
    """Left to finalization, gloo's threads can free tensors after the GIL is gone (a segfault after a clean
    run). An exit hook registered before the Learner runs after the Learner's own: the group must be gone by then."""
    import os
    import subprocess
    import sys

    script = f"""
import atexit, torch.distributed as dist
atexit.register(lambda: print("group alive at exit:", dist.is_initialized()))
from learners.learner import Learner
learner = Learner({tiny_path!r}, dtype="float32", output_dir={str(tmp_path / "learner")!r})
learner.sequence_logprobs([])
print("built")
"""
    # A fresh single process: not the rendezvous (MASTER_PORT, ...) this process's own Learners set up.
    from learners.learner import SINGLE_PROCESS_RENDEZVOUS

    env = {k: v for k, v in os.environ.items() if k not in {*SINGLE_PROCESS_RENDEZVOUS, "MASTER_PORT"}}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-2:] == ["built", "group alive at exit: False"]
