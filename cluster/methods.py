"""The four training pipelines of ALGORITHMS.md as short scripts over a `Session`, selected by `cfg.method`.

Every pipeline starts the same way (expert demos on the training tasks, then the starting policy: IL for actor
and reflector, or a learner checkpoint) and ends with the evaluation protocol on the held-out splits. What lies in
between is the method: ETO's explore / pair / DPO iterations, Retroformer's reflector policy gradient with a frozen
actor, RetroAct's off-policy joint policy gradient for both roles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

from agents.trajectory import REFLECTOR, Episode
from cluster.config import Config
from cluster.evaluation import markdown_table
from cluster.pipeline import Prepared, Session, derive_seed
from cluster.producer import Round, RolloutProducer
from cluster.replay import explored_tasks
from cluster.console import closing_lines, transcript
from cluster.progress import duration, say
from cluster.run_dir import RunDir
from learners.batching import bound_policy_lag, dpo_pairs, expert_wins, reflection_replay, retroact_samples

Rows = list[dict[str, Any]]


def _per_iteration(values: list[float], i: int) -> float:
    return values[min(i, len(values) - 1)]


def log_round(session: Session, method: str, index: int, episodes: list[Episode], **fields: Any) -> None:
    """One `round` record per training round: the mean return of its training rollouts (all trials), first and
    final trial returns and success rate, for `retrorl report`'s plot."""
    if session.resume.logged("round", method=method, round=index):  # logged before a --resume
        return
    returns = [t.ret for e in episodes for t in e.trials]
    session.run.log(
        "round", method=method, round=index,
        train_return=mean(returns) if returns else 0.0,
        first_return=mean(e.trials[0].ret for e in episodes) if episodes else 0.0,
        final_return=mean(e.trials[-1].ret for e in episodes) if episodes else 0.0,
        success=mean(1.0 if e.success else 0.0 for e in episodes) if episodes else 0.0,
        episodes=len(episodes), **fields,
    )


def _start(session: Session, evaluate_start: bool = True) -> tuple[list[Episode], Rows]:
    """Demos, an optional zero-shot eval, the starting policy, an optional eval of it."""
    cfg = session.cfg
    demos = session.demos(session.il_tasks())
    rows: Rows = session.evaluate("zero-shot") if cfg.eval.zero_shot else []
    session.start_policy(demos)
    if evaluate_start and cfg.eval.before_training:
        rows += session.evaluate("SFT")
    return demos, rows


def sft(session: Session) -> Rows:
    """IL (SFT) of actor and reflector on the expert demos: every other method's starting point. From an
    init.checkpoint, IL continues from its adapters and optimizer state (learner.role_epochs can keep a role)."""
    demos, rows = _start(session, evaluate_start=False)
    if session.cfg.init.checkpoint is not None:
        session.train_il(demos)
    return rows + session.evaluate("SFT")


def eto(session: Session) -> Rows:
    """SFT, then N x [explore each training task (eto.samples times), (win, lose) pairs against the expert, DPO]."""
    cfg, e = session.cfg, session.cfg.eto
    demos, rows = _start(session)
    experts = expert_wins(demos)
    tasks = explored_tasks(cfg, session.explore_tasks())
    for i in range(e.iterations):
        settings = session.settings(1, actor_temperature=e.temperature, seed=derive_seed(cfg.seed, "eto", i))
        phase = f"explore-{i + 1}"
        if i == 0 and session.replayed is not None:  # eto.replay, read and checked by preflight
            explored = _store_replayed(session, phase, session.replayed)
        else:
            explored = session.rollout(tasks, phase, 1, settings)
        if session.resumed(f"eto-{i + 1}"):
            continue
        pairs, counts = dpo_pairs(explored, experts, e.extra_turns)
        log_round(session, "eto", i + 1, explored, **counts)
        say(f"[eto {i + 1}] {counts}")
        if not pairs:
            say(f"[eto {i + 1}] no pairs (every explored trajectory tied its expert); nothing to train")
            continue
        session.train(f"dpo-{i + 1}", "train_dpo", pairs, beta=_per_iteration(e.beta, i),
                      epochs=e.epochs, lr=_per_iteration(e.lr, i), nll_coef=e.nll_coef,
                      max_tokens_per_batch=cfg.learner.max_tokens_per_batch)
        session.checkpoint(f"eto-{i + 1}")
    return rows + session.evaluate("ETO")


def retroformer(session: Session) -> Rows:
    """Frozen actor; rounds of multi-trial rollouts whose reflections, rated R_{k+1} - R_k, fill a replay set
    the reflector is trained on by policy gradient with a KL penalty to its starting point."""
    cfg, r = session.cfg, session.cfg.retroformer
    _, rows = _start(session)
    session.call("set_reference", [REFLECTOR])  # the KL penalty's reference: the reflector as RL starts
    tasks = session.explore_tasks()
    replay = []
    ranker_ready = False
    for i in range(r.rounds):
        settings = session.settings(r.trials, reflector_temperature=r.temperature,
                                    seed=derive_seed(cfg.seed, "retroformer", i))
        episodes = session.rollout(tasks, f"collect-{i + 1}", r.trials, settings)
        new = reflection_replay(episodes)
        replay += new
        if session.resumed(f"retroformer-{i + 1}"):
            trained = session.resume.logged("train", phase=f"reward-model-{i + 1}")
            ranker_ready = ranker_ready or bool(trained and trained.get("trained"))
            continue
        log_round(session, "retroformer", i + 1, episodes, reflections=len(new),
                  improved=sum(s.reward > 0 for s in new), worsened=sum(s.reward < 0 for s in new))
        if not any(s.reward != 0 for s in replay):
            say(f"[retroformer {i + 1}] every rating is 0 so far: no gradient; collecting again")
            continue
        session.train(f"reflector-pg-{i + 1}", "train_reflector_pg", replay, epochs=r.epochs, lr=r.lr,
                      baseline=r.baseline, max_tokens_per_batch=cfg.learner.max_tokens_per_batch)
        if r.reward_model:
            metrics = session.call("train_reward_model", replay)
            ranker_ready = ranker_ready or bool(metrics["trained"])
            session.run.log("train", phase=f"reward-model-{i + 1}", **metrics)
            say(f"[reward-model {i + 1}] {metrics}")
        session.checkpoint(f"retroformer-{i + 1}")
    rows += session.evaluate("Retroformer")
    if r.best_of_n > 1 and not ranker_ready:
        say("[retroformer] no best-of-n eval: the replay never held both helpful and unhelpful reflections, "
            "so there is no reward model to rank with")
    elif r.best_of_n > 1:
        rows += session.evaluate(f"Retroformer best-of-{r.best_of_n}", best_of=r.best_of_n, temperature=r.temperature)
    return rows


def retroact(session: Session) -> Rows:
    """IL for both roles, then rounds of exploration at temperature 1 with reflections, stored with their
    behaviour log-probs and versions, and the off-policy joint update with the IL regulariser. In async mode
    (rollout.mode=async) the next rounds are played while the learner trains, within rollout.max_policy_lag."""
    cfg, r = session.cfg, session.cfg.retroact
    tasks = session.explore_tasks()
    # Read and checked by preflight, before the run directory existed. A --resume finds its copy stored (one
    # part, written atomically) and reuses it like a played round, without the source.
    replayed = session.replayed
    demos, rows = _start(session)
    imitation = session.imitation(demos)
    rounds = [Round(f"explore-{i + 1}", r.trials,
                    session.settings(r.trials, actor_temperature=r.temperature, reflector_temperature=r.temperature,
                                     seed=derive_seed(cfg.seed, "retroact", i)))
              for i in range(r.rounds)]
    if cfg.rollout.mode == "sync":
        for i, plan in enumerate(rounds):
            if i == 0 and replayed is not None:
                episodes = _store_replayed(session, plan.phase, replayed)
            else:
                episodes = session.rollout(tasks, plan.phase, plan.trials, plan.settings)
            _retroact_update(session, i, episodes, imitation)
    else:
        session.restore_pending()  # the starting policy is served before the first round is played
        with RolloutProducer(session, tasks, rounds, cfg.rollout.max_policy_lag) as producer:
            for i in range(len(rounds)):
                _retroact_update(session, i, producer.take(i), imitation)
                producer.trained(i)
    return rows + session.evaluate("RetroAct")


def _store_replayed(session: Session, phase: str, episodes: list[Episode]) -> list[Episode]:
    """This run keeps its own copy of the replayed round, so `retrorl report` and --resume read it like a
    played one."""
    session.run.store.append(episodes, phase=phase)
    session.run.log("replay", phase=phase, source=str(Path(session.cfg.replay).resolve()), episodes=len(episodes))
    say(f"[{phase}] replayed {len(episodes)} episodes from {session.cfg.replay}")
    return episodes


def _retroact_update(session: Session, i: int, episodes: list[Episode], imitation: list) -> None:
    cfg, r = session.cfg, session.cfg.retroact
    if session.resumed(f"retroact-{i + 1}"):
        return
    samples, counts = retroact_samples(episodes, r.alpha, r.scaled_reflection_reward, r.actor_reward,
                                       r.actor_steps)
    if cfg.rollout.mode == "async":
        samples, lag = bound_policy_lag(samples, session.call("versions"), cfg.rollout.max_policy_lag,
                                        cfg.rollout.stale)
        counts.update(lag)
    log_round(session, "retroact", i + 1, episodes, rl_samples=len(samples), **counts)
    if not samples:
        say(f"[retroact {i + 1}] no sample passed the filters (no positive return); nothing to train")
        return
    session.train(f"retroact-{i + 1}", "train_retroact", samples, imitation, epochs=r.epochs, lr=r.lr,
                  eps=r.eps, il_coef=r.il_coef, max_tokens_per_batch=cfg.learner.max_tokens_per_batch)
    session.checkpoint(f"retroact-{i + 1}")


PIPELINES: dict[str, Callable[[Session], Rows]] = {
    "sft": sft, "eto": eto, "retroformer": retroformer, "retroact": retroact,
}


def run_method(cfg: Config, run: RunDir, prepared: Prepared) -> Rows:
    """Run cfg.method end to end; the evaluation rows go to RUN/eval/ and the terminal, whose lines are copied to
    RUN/logs/driver.log."""
    with transcript(run.path):
        t0 = time.perf_counter()
        session = Session(cfg, run, prepared)
        try:
            rows = PIPELINES[cfg.method](session)
        finally:
            session.close()
        table = markdown_table(rows)
        run.write_json("eval/results.json", rows)
        run.write_text("eval/table.md", table)
        run.log("done", method=cfg.method, seconds=time.perf_counter() - t0)
        say("\n" + table)
        say(f"finished in {duration(time.perf_counter() - t0)}")
        for line in closing_lines(run.path):
            say(line)
    return rows
