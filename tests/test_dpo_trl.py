"""Our DPO (learners.losses.dpo_loss over sequence_logprob) against TRL's own DPOTrainer loss on the same batch.

TRL 1.16 builds the PEFT model from `peft_config` and, with no ref_model, uses the same model with the adapter disabled
as the reference; its `compute_loss` runs the policy and reference forwards through its fused LM head. We compute the
same quantities our way (one unpadded forward per sequence, token_logprobs -> sequence_logprob -> dpo_loss) and
require the loss, the implicit rewards and every LoRA gradient to match.
"""

from __future__ import annotations

import pytest
import torch

from learners.losses import (
    dpo_loss,
    sequence_logprob,
    shift_for_next_token,
    token_logprobs,
)

pytest.importorskip("trl")

BETA = 0.5
PAIRS = {
    "prompt": ["You are in the kitchen. Your task: heat an egg.", "Find the apple.", "Open the door > "],
    "chosen": [" go to microwave 1", " take apple 1 from table 2", " open door"],
    "rejected": [" look", " go to garden now and wait", " inventory please"],
}


@pytest.fixture
def trainer(tiny_model_path, tmp_path, monkeypatch):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    # A Learner built earlier in this process leaves DeepSpeed's single-rank variables set; accelerate would then
    # treat the Trainer as one rank of a multi-process job and wrap the model in DDP. TRL runs as a plain process.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,
        per_device_train_batch_size=len(PAIRS["prompt"]),
        save_strategy="no",
        logging_strategy="no",
        seed=0,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(PAIRS),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_path),
        peft_config=lora,
    )
    # A fresh adapter has B = 0 (policy == reference); perturb B so the log-ratios and gradients are non-trivial.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    trainer.model.train()
    return trainer


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def _our_sequence_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + completion_ids])
    mask = torch.tensor([[0] * len(prompt_ids) + [1] * len(completion_ids)])
    labels, label_mask = shift_for_next_token(ids, mask)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return sequence_logprob(token_logprobs(logits[:, :-1], labels), label_mask)[0]


def test_dpo_loss_and_lora_grads_match_trl(trainer):
    model = trainer.model
    # TRL's own tokenisation (prompt / completion split, EOS appended): both sides score exactly these ids.
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert all(len(e["chosen_ids"]) > 1 and len(e["rejected_ids"]) > 1 for e in examples)

    def seqs(key: str) -> torch.Tensor:
        return torch.stack([_our_sequence_logprob(model, e["prompt_ids"], e[key]) for e in examples])

    chosen, rejected = seqs("chosen_ids"), seqs("rejected_ids")
    with torch.no_grad(), model.disable_adapter():
        ref_chosen, ref_rejected = seqs("chosen_ids"), seqs("rejected_ids")
    # The perturbed adapter really moves the policy away from the reference.
    assert (chosen - ref_chosen).abs().min() > 1e-3 and (rejected - ref_rejected).abs().min() > 1e-3

    ours, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, BETA)
    model.zero_grad()
    ours.backward()
    our_grads = _lora_grads(model)

    model.zero_grad()
    batch = trainer.data_collator(examples)  # right-padded [chosen..., rejected...], as in training
    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    their_grads = _lora_grads(model)

    assert abs(ours.item() - theirs.item()) <= 1e-5, (ours.item(), theirs.item())
    metrics = trainer._metrics["train"]
    assert abs(metrics["rewards/chosen"][-1] - float(chosen_rewards.mean())) <= 1e-5
    assert abs(metrics["rewards/rejected"][-1] - float(rejected_rewards.mean())) <= 1e-5

    # every q/v LoRA A and B of both layers, all with a real gradient
    assert set(our_grads) == set(their_grads) and len(our_grads) == 8
    for name, g in our_grads.items():
        assert g.abs().max() > 1e-6, name
        # absolute tolerance 1e-5, relative to the largest entry of that gradient (floor 1)
        diff = float((g - their_grads[name]).abs().max())
        assert diff <= 1e-5 * max(1.0, float(g.abs().max())), (name, diff)
