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
from learners.losses import il_loss, token_logprobs


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return str(resolve_model(TINY_MODEL))


def make(tiny_path: str, tmp_path, **kw) -> Learner:
    kw = {"dtype": "float32", "lr": 1e-2, "gradient_clipping": 1.0, "max_len": 4096, "seed": 0,
          "output_dir": tmp_path / "learner", **kw}
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


def test_zero_role_epochs_keep_a_trained_role_bit_for_bit(tiny_path, tmp_path):
    """{actor: 0}: IL continues for the reflector only, and the actor's adapter does not move, although Adam holds
    momentum for it from the earlier joint epochs (continuing a checkpoint's reflector IL with its actor kept)."""
    learner = make(tiny_path, tmp_path)
    actor, refl = samples(ACTOR, n=3), samples(REFLECTOR, n=3, seed=5)
    learner.train_il(actor + refl, epochs=2, max_tokens_per_batch=4096)
    a0, r0 = snapshot(learner, ACTOR), snapshot(learner, REFLECTOR)
    m = learner.train_il(actor + refl, epochs=1, max_tokens_per_batch=4096, role_epochs={ACTOR: 0, REFLECTOR: 2})
    assert m["steps"] == 2 and m["tokens"] == 2 * sum(s.n_trained for s in refl)
    assert "loss/actor" not in m and m["loss/reflector"] < m["loss_first/reflector"]
    assert same(snapshot(learner, ACTOR), a0)
    assert not same(snapshot(learner, REFLECTOR), r0)


def test_progress_is_readable_while_training(tiny_path, tmp_path, monkeypatch):
    """What the driver polls during a call: the step count moves with each optimizer step, the total and epochs
    are known from the first step, and the end state matches the call's own metrics."""
    learner = make(tiny_path, tmp_path)
    seen = []
    step = learner.optimizer_step

    def watched(parts):  # read as the driver would, between steps
        seen.append(learner.progress())
        return step(parts)

    monkeypatch.setattr(learner, "optimizer_step", watched)
    m = learner.train_il(samples(ACTOR, n=4), epochs=3, max_tokens_per_batch=64)
    total = m["steps"]
    assert total > 3 and [s["step"] for s in seen] == list(range(total))
    assert {(s["total"], s["epochs"], s["method"], s["running"]) for s in seen} == {(total, 3, "il", True)}
    epochs = [s["epoch"] for s in seen]  # the epoch of the last step done (1 before the first)
    assert epochs == sorted(epochs) and set(epochs) == {1, 2, 3}
    assert seen[0]["eta_s"] is None and all(s["eta_s"] >= 0 and s["loss"] > 0 for s in seen[1:])
    end = learner.progress()
    assert (end["step"], end["epoch"], end["running"], end["eta_s"]) == (total, 3, False, 0.0)
    assert end["loss"] == pytest.approx(m["loss/actor"])  # the last epoch's token-weighted loss
    assert end["tokens_per_s"] > 0


# ------------------------------------------------------------------ per-part backward (issue 20)
CRITIC = "critic"  # a third role that no step trains


def pg_objective(batch, lp):
    """A policy-gradient-shaped loss (per-row weights), unlike IL's, so parts of one role differ."""
    mask = batch.loss_mask[:, 1:].to(lp.dtype)
    w = torch.linspace(-1.0, 2.0, lp.shape[0], dtype=lp.dtype, device=lp.device)[:, None]
    return -(w * lp * mask).sum() / mask.sum(), int(mask.sum())


def il_objective(batch, lp):
    return il_loss(lp, batch.loss_mask[:, 1:])


def joint_parts(learner: Learner) -> list:
    """RL + IL for the actor (two parts of one adapter, interleaved with the other role), IL for the reflector."""
    from learners.batching import make_batches

    actor = make_batches(samples(ACTOR, n=3, seed=1), 4096, learner.pad_id)[ACTOR]
    actor_il = make_batches(samples(ACTOR, n=2, seed=2), 4096, learner.pad_id)[ACTOR]
    refl = make_batches(samples(REFLECTOR, n=2, seed=3), 4096, learner.pad_id)[REFLECTOR]
    return [(actor[0], pg_objective), (refl[0], il_objective), (actor_il[0], il_objective)]


def perturbed(tiny_path, tmp_path, **kw) -> Learner:
    """A learner over three roles whose LoRA B are random (not 0), so A gets gradients too; no clipping, so
    a gradient of the wrong size cannot be hidden by it. Same tensors for the same kw."""
    learner = make(tiny_path, tmp_path, roles=(ACTOR, REFLECTOR, CRITIC), gradient_clipping=0.0, **kw)
    gen = torch.Generator().manual_seed(7)
    for a in (ACTOR, REFLECTOR):
        t = learner.adapter_tensors(a)
        learner._set_adapter_tensors(a, {k: torch.randn(v.shape, generator=gen) * 0.05 if "lora_B" in k else v
                                         for k, v in t.items()})
    return learner


def captured_grads(learner: Learner) -> list:
    """Records the gradients the inner optimizer is handed (after DeepSpeed's reduction and accumulation; fp32
    masters or partitions under ZeRO), per param group, one entry per call (ZeRO 1/2 call it once per group)."""
    seen: list = []
    inner_step = learner._opt.step

    def step(*a, **kw):
        seen.extend([None if p.grad is None else p.grad.detach().float().clone() for p in g["params"]]
                    for g in learner._opt.param_groups)
        return inner_step(*a, **kw)

    learner._opt.step = step
    return seen


def summed_backward_step(learner: Learner, parts) -> None:
    """The pre-issue-20 optimizer step: every part's forward, the losses summed, one backward, one step."""
    adapters = {learner.adapter_of[b.role] for b, _ in parts}
    for group in learner._opt.param_groups:
        group["active"] = group["adapter"] in adapters
    learner.engine.train()
    total = 0
    for batch, objective in parts:
        learner._activate(learner.adapter_of[batch.role])
        b = batch.to(learner.device)
        total = total + objective(b, learner.engine(b.input_ids, b.attention_mask, b.loss_mask))[0]
    learner.engine.backward(total)
    learner.engine.step()


def assert_grads_close(got: list, want: list) -> None:
    """Same gradients, group by group, up to float rounding; then forget them (the next step records afresh)."""
    assert len(got) == len(want) > 0
    for g_got, g_want in zip(got, want):
        assert len(g_got) == len(g_want)
        for x, y in zip(g_got, g_want):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.allclose(x, y, rtol=1e-4, atol=1e-6 * float(y.abs().max()) + 1e-9), \
                    float((x - y).abs().max())
    got.clear()
    want.clear()


def trained_groups(grads: list) -> int:
    return sum(any(x is not None and bool(x.abs().max() > 0) for x in g) for g in grads)


@pytest.mark.parametrize(
    "dtype,stage", [("float32", 0), ("bfloat16", 0), ("float32", 1), ("bfloat16", 2), ("float32", 3)]
)
def test_per_part_backward_matches_summed_loss_backward(tiny_path, tmp_path, dtype, stage):
    new = perturbed(tiny_path, tmp_path / "new", dtype=dtype, zero_stage=stage)
    ref = perturbed(tiny_path, tmp_path / "ref", dtype=dtype, zero_stage=stage)
    for a in (ACTOR, REFLECTOR, CRITIC):
        assert same(snapshot(new, a), snapshot(ref, a))
    critic0 = snapshot(new, CRITIC)
    got, want = captured_grads(new), captured_grads(ref)

    for step in range(2):  # the second step also checks that the accumulators were reset by the first
        torch.manual_seed(step)  # same LoRA-dropout masks on both
        new.optimizer_step(joint_parts(new))
        torch.manual_seed(step)
        summed_backward_step(ref, joint_parts(ref))
        assert trained_groups(want) == 2  # actor and reflector got gradients, the critic none
        norm = float(torch.cat([x.flatten() for g in want for x in g if x is not None]).norm())
        assert_grads_close(got, want)
    for a in (ACTOR, REFLECTOR):
        assert torch.allclose(torch.cat([t.flatten() for t in snapshot(new, a).values()]),
                              torch.cat([t.flatten() for t in snapshot(ref, a).values()]), atol=1e-5)
    assert same(snapshot(new, CRITIC), critic0) and same(snapshot(ref, CRITIC), critic0)  # untrained: bit-identical
    assert new.grad_norm() == pytest.approx(norm, rel=1e-4)  # the step's norm (ZeRO 0: `_plain_grad_norm`)


@pytest.mark.parametrize("stage", [0, 3])
def test_gradient_checkpointing_joint_step_matches_plain(tiny_path, tmp_path, stage):
    gc = perturbed(tiny_path, tmp_path / "gc", zero_stage=stage, gradient_checkpointing=True)
    plain = perturbed(tiny_path, tmp_path / "plain", zero_stage=stage)
    critic0 = snapshot(gc, CRITIC)
    q_proj = gc.peft.get_base_model().get_decoder().layers[0].self_attn.q_proj  # LoRA-wrapped
    calls = []
    q_proj.register_forward_hook(lambda *_: calls.append(1))
    got, want = captured_grads(gc), captured_grads(plain)

    parts = joint_parts(gc)
    torch.manual_seed(0)
    gc.optimizer_step(parts)
    torch.manual_seed(0)
    plain.optimizer_step(parts)

    assert len(calls) == 2 * len(parts)  # each part's layer ran again in its backward: checkpointing is on
    assert_grads_close(got, want)
    for a in (ACTOR, REFLECTOR):
        assert torch.allclose(torch.cat([t.flatten() for t in snapshot(gc, a).values()]),
                              torch.cat([t.flatten() for t in snapshot(plain, a).values()]), atol=1e-5)
    assert same(snapshot(gc, CRITIC), critic0)


def test_gradient_checkpointing_trains_all_roles_in_one_step(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path, gradient_checkpointing=True)
    a0, r0 = snapshot(learner, ACTOR), snapshot(learner, REFLECTOR)
    m = learner.train_il(samples(ACTOR, n=2) + samples(REFLECTOR, n=2, seed=4), epochs=1, max_tokens_per_batch=4096)
    assert m["steps"] == 1  # per-part backward: the recompute runs under each part's own adapter
    assert not same(snapshot(learner, ACTOR), a0) and not same(snapshot(learner, REFLECTOR), r0)


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
    learner.train_il(data, epochs=2, max_tokens_per_batch=4096)
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
    learner.train_il(data[:1], epochs=1, max_tokens_per_batch=4096)
    (update2,) = learner.publish()
    assert update2.version == 2 and list_versions(learner.adapter_root, ACTOR) == [1, 2]
    assert same(load_adapter(folder)[0], update.tensors)  # v1 untouched
    assert not same(update2.tensors, update.tensors)
    assert not any(p.name.startswith(".") for p in (learner.adapter_root / ACTOR).iterdir())  # no temp leftovers


def test_checkpoint_roundtrip_resumes_exactly(tiny_path, tmp_path):
    a = make(tiny_path, tmp_path / "a")
    data = samples(ACTOR) + samples(REFLECTOR, n=2, seed=3)
    a.train_il(data, epochs=2, max_tokens_per_batch=4096)
    a.publish()
    a.train_il(samples(ACTOR, n=2, seed=7), epochs=1, max_tokens_per_batch=4096)  # actor dirty again, reflector clean
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
    a.train_il(data, epochs=1, max_tokens_per_batch=4096)
    torch.set_rng_state(state)
    b.train_il(data, epochs=1, max_tokens_per_batch=4096)
    for role in (ACTOR, REFLECTOR):
        assert same(snapshot(b, role), snapshot(a, role))
    assert [u.role for u in b.publish()] == [ACTOR, REFLECTOR] and b.versions() == {ACTOR: 2, REFLECTOR: 2}

    # Served again after a restore (--resume): the actor, trained since v1, becomes v2; the reflector's weights
    # are still v1's and go out as v1, so the restart does not look like a policy update.
    c = make(tiny_path, tmp_path / "c")
    c.load_checkpoint(ckpt)
    forced = {u.role: u for u in c.publish(force=True)}
    assert {r: u.version for r, u in forced.items()} == {ACTOR: 2, REFLECTOR: 1}
    from learners.adapters import adapter_dir, load_adapter

    assert same(forced[REFLECTOR].tensors, load_adapter(adapter_dir(a.adapter_root, REFLECTOR, 1))[0])


def test_il_stopped_by_its_budget_continues_from_a_checkpoint_exactly(tiny_path, tmp_path):
    """A long IL phase is cut into calls by `budget_s` (here: one step each) with a checkpoint after the first,
    loaded by another learner (a --resume): the phase continues at the next planned step, and the adapters and
    the returned metrics equal those of one uninterrupted call."""
    data = samples(ACTOR, n=6) + samples(REFLECTOR, n=3, seed=3)
    kw = {"epochs": 2, "role_epochs": {REFLECTOR: 3}, "max_tokens_per_batch": 64}  # 2-3 steps an epoch
    whole = make(tiny_path, tmp_path / "whole")
    expected = whole.train_il(data, **kw)
    assert expected["steps"] >= 6

    first = make(tiny_path, tmp_path / "first")  # same seed: same LoRA init, torch RNG (dropout) and batch order
    out = first.train_il(data, budget_s=0, **kw)
    assert out == {"finished": False, "step": 1, "total": expected["steps"]}
    ckpt = first.save_checkpoint(tmp_path / "ckpt")

    resumed = make(tiny_path, tmp_path / "resumed", seed=5)
    resumed.load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="unfinished IL phase"):  # other samples cannot continue this phase
        resumed.train_il(samples(ACTOR, n=2, seed=9), budget_s=0, **kw)
    calls = 1
    while out.get("finished") is False:
        out = resumed.train_il(data, budget_s=0, **kw)
        calls += 1
        assert out.get("step", expected["steps"]) == calls
        shown = resumed.progress()  # the live line counts from the phase's start, its ETA from this call's pace
        assert (shown["step"], shown["total"]) == (calls, expected["steps"]) and shown["eta_s"] >= 0
    assert calls == expected["steps"]
    for role in (ACTOR, REFLECTOR):
        assert same(snapshot(resumed, role), snapshot(whole, role))
    keys = ["steps", "tokens", "seq_tokens", "loss/actor", "loss/reflector", "loss_first/actor",
            "loss_first/reflector", "samples", "padding_frac"]
    assert {k: out[k] for k in keys} == {k: expected[k] for k in keys}
    assert resumed.train_il(data, **kw)["steps"] == expected["steps"]  # a finished phase: the next call is new


def test_a_start_checkpoint_trains_with_the_new_runs_seed(tiny_path, tmp_path):
    """init.checkpoint loads another run's learner, RNG included; `reseed` then draws batch order and dropout from
    this learner's seed: two learners of one seed train identically from that start, a third seed differently.
    (Without it, runs from one SFT checkpoint at three seeds trained with one RNG.)"""
    data = samples(ACTOR, n=6)
    start = make(tiny_path, tmp_path / "start")
    start.train_il(data, epochs=1, max_tokens_per_batch=64)
    ckpt = start.save_checkpoint(tmp_path / "ckpt")

    def trained(seed: int, where: str) -> dict:
        learner = make(tiny_path, tmp_path / where, seed=seed)
        learner.load_checkpoint(ckpt)
        learner.reseed()
        learner.train_il(data, epochs=2, max_tokens_per_batch=64)
        return snapshot(learner, ACTOR)

    first = trained(1, "a")
    assert same(trained(1, "b"), first) and not same(trained(2, "c"), first)


def test_shared_adapter(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path, shared_adapter=True)
    refl = samples(REFLECTOR, n=2, seed=4)
    before = learner.sequence_logprobs(refl)
    learner.train_il(samples(ACTOR), epochs=2, max_tokens_per_batch=4096)
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
    learner.train_il(data, epochs=3, max_tokens_per_batch=4096)
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
learner = Learner({tiny_path!r}, dtype="float32", lr=1e-4, gradient_clipping=1.0, max_len=4096,
                  output_dir={str(tmp_path / "learner")!r})
learner.sequence_logprobs([])
print("built")
"""
    # A fresh single process: not the rendezvous (MASTER_PORT, ...) this process's own Learners set up.
    from learners.learner import SINGLE_PROCESS_RENDEZVOUS

    env = {k: v for k, v in os.environ.items() if k not in {*SINGLE_PROCESS_RENDEZVOUS, "MASTER_PORT"}}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-2:] == ["built", "group alive at exit: False"]
