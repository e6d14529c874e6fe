"""What ETO's DPO did to the likelihood of its own pairs: rebuilds an ETO run's pairs of one iteration (the run's
expert demos against its stored exploration, as cluster/methods.py::eto builds them) and scores the winner and the
loser of each under the iteration's starting policy and under its end checkpoint (eto-I). DPO only asks that the
winner gain on the loser; this shows whether the winner itself became likelier or both fell (the policy's mass
went elsewhere), per agent token, in nats.

usage: .venv/bin/python results/dpo_shift.py RUN_DIR [--iteration I] [--pairs N]
       (N: a seeded sample of the pairs, to bound the CPU time: about 2 s per pair and policy on 2 cores here)
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile

from cluster.config import load_config
from cluster.run_dir import RunDir
from cluster.runtime import learner_kwargs
from learners.batching import dpo_pairs, expert_wins
from learners.methods import MethodLearner


def per_token(learner: MethodLearner, samples: list) -> list[float]:
    return [lp / max(1, sum(s.mask)) for lp, s in zip(learner.sequence_logprobs(samples), samples)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--iteration", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=0, help="score a seeded sample of this many pairs (0: all)")
    args = ap.parse_args()
    run = RunDir(args.run)
    cfg = load_config(run.path / "config.yaml")
    i = args.iteration
    # Iteration 1 starts from init.checkpoint, or from the run's own IL (checkpoints/sft) without one.
    checkpoints = run.path / "checkpoints"
    start = (cfg.init.checkpoint or checkpoints / "sft") if i == 1 else checkpoints / f"eto-{i - 1}"
    experts = expert_wins(run.store.episodes("demos"))
    # In task order, so that runs replaying one exploration (eto.replay, stored in another order) sample alike.
    explored = sorted(run.store.episodes(f"explore-{i}"), key=lambda e: e.task_id)
    pairs, counts = dpo_pairs(explored, experts, cfg.eto.extra_turns)
    if args.pairs and args.pairs < len(pairs):
        pairs = random.Random(0).sample(pairs, args.pairs)
    print(f"{counts}; scoring {len(pairs)} pairs under {start} and {checkpoints}/eto-{i}")
    flat = [s for p in pairs for s in p]
    with tempfile.TemporaryDirectory() as tmp:
        learner = MethodLearner(**{**learner_kwargs(cfg), "output_dir": tmp})
        scores = []
        for checkpoint in (start, checkpoints / f"eto-{i}"):
            learner.load_checkpoint(checkpoint)
            scores.append(per_token(learner, flat))
    (before, after) = scores
    for name, side in (("winner", 0), ("loser", 1)):
        b, a = before[side::2], after[side::2]
        deltas = [y - x for x, y in zip(b, a)]
        print(f"{name}: mean log-prob per agent token {statistics.mean(b):+.3f} -> {statistics.mean(a):+.3f} "
              f"(change {statistics.mean(deltas):+.3f}; fell in {sum(d < 0 for d in deltas)} of {len(deltas)})")


if __name__ == "__main__":
    main()
