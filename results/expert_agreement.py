"""Where a checkpoint's greedy play leaves the expert's path, on the expert's own demos.

For each task of a split, the expert replay is rebuilt as the actor sees it (the scripted trial IL trains on:
template thought, then action) and, turn by turn with the expert's turns before it as context (teacher forcing),
the actor's greedy action is compared with the expert's. One forward pass per demo finds the turns that greedy
decoding reproduces token for token; only the others are decoded. Greedy free play follows the expert up to the
first turn whose action differs (given a deterministic env and fp32), so that turn is where it leaves the path.
Printed: per demo that turn; over all turns, the share of each expert verb reproduced and what came instead.

usage: .venv/bin/python results/expert_agreement.py CHECKPOINT [--config C] [--split train] [--per-task N]
       [--set KEY=VALUE ...]
       (about 14 s a demo on 2 cores here: 24 ScienceWorld train demos in 5.5 minutes)
"""

from __future__ import annotations

import argparse
import collections
import tempfile

import torch

from agents.actor import ActorPrompt
from agents.chat import ChatFormatter
from agents.expert import scripted_trial
from agents.memory import ReflectionMemory
from agents.model import load_tokenizer, resolve_model
from agents.parsing import parse_react
from agents.trajectory import ACTOR, Episode, new_episode_id
from cluster.config import load_config
from cluster.runtime import learner_kwargs
from envs.core import make_env
from envs.demos import expert_replay
from learners.batching import trial_sample
from learners.methods import MethodLearner


def greedy(model, formatter: ChatFormatter, prompt_ids: list[int], max_new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=formatter.eos_id, pad_token_id=formatter.eos_id)
    return formatter.decode([t for t in out[0, len(prompt_ids):].tolist() if t != formatter.eos_id])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--config", default="configs/sciworld-short.yaml")
    ap.add_argument("--split", default="train")
    ap.add_argument("--per-task", type=int, default=0, help="the first N tasks of each task name (0: all)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--show", type=int, default=12, help="the most common (expert verb, model verb) misses")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    model_path = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    formatter = ChatFormatter(load_tokenizer(model_path))
    prompt = ActorPrompt(formatter, show_actions=cfg.agent.show_actions)
    env = make_env(cfg.env.name, **cfg.env.kwargs)
    env.prepare()
    tasks = env.tasks(args.split)
    if args.per_task:
        kept: collections.Counter = collections.Counter()
        picked = []
        for t in tasks:
            family = t.task_id.rsplit(":", 1)[0]  # the task name without its variation / game number
            kept[family] += 1
            if kept[family] <= args.per_task:
                picked.append(t)
        tasks = picked
    with tempfile.TemporaryDirectory() as tmp:
        learner = MethodLearner(**{**learner_kwargs(cfg), "output_dir": tmp})
        learner.load_checkpoint(args.checkpoint)
        learner._activate(learner.adapter_of[ACTOR])  # the actor's LoRA adapter on the learner's own model
        model = learner.peft
        model.eval()
        rows = []
        for task in tasks:
            replay = expert_replay(env, task.task_id)
            if not replay.won:
                continue
            trial = scripted_trial(prompt, replay, 0, ReflectionMemory(cfg.agent.memory_size))
            episode = Episode(new_episode_id(), cfg.env.name, task.task_id, args.split, "expert", [trial])
            sample = trial_sample(episode, trial)
            ids = torch.tensor([sample.ids])
            with torch.no_grad():
                pred = model(input_ids=ids, use_cache=False).logits[0].argmax(-1).tolist()
            first = None
            turns = []
            for k, step in enumerate(trial.steps):
                gen = step.generation
                start = len(gen.prompt_ids)
                text = gen.text
                if not all(pred[start + j - 1] == tok for j, tok in enumerate(gen.completion_ids)):
                    text = greedy(model, formatter, gen.prompt_ids, cfg.agent.actor.max_new_tokens)
                action = parse_react(text).action
                turns.append((step.action, action == step.action, action))
                if action != step.action and first is None:
                    first = k
            row = {"task": task.task_id, "turns": turns, "first": first, "steps": len(trial.steps)}
            rows.append(row)
            print(f"{task.task_id}: {len(trial.steps)} turns, " + (
                f"leaves the path at {first} (expert {turns[first][0]!r}, model {turns[first][2]!r})"
                if first is not None else "follows every one"), flush=True)
    env.close()
    verb = lambda a: a.split(" ")[0] if not a.startswith("focus") else "focus on"  # noqa: E731
    per_verb: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        for action, ok, _ in r["turns"]:
            per_verb[verb(action)][0] += ok
            per_verb[verb(action)][1] += 1
    followed = sum(r["first"] is None for r in rows)
    print(f"\n{len(rows)} expert demos; the greedy policy follows every turn of {followed}")
    print("turns reproduced under teacher forcing, by expert verb:")
    for v, (ok, n) in sorted(per_verb.items(), key=lambda kv: -kv[1][1]):
        print(f"  {v:12s} {ok:4d} / {n:4d}  ({100 * ok / n:.0f} %)")
    where = collections.Counter(verb(r["turns"][r["first"]][0]) for r in rows if r["first"] is not None)
    print("first turn off the path, by the expert's verb there:", dict(where.most_common()))
    by_name: dict[str, list[int]] = collections.defaultdict(list)
    for r in rows:
        if r["first"] is not None:
            by_name[r["task"].split(":")[1]].append(r["first"])
    for name, firsts in sorted(by_name.items()):
        print(f"  {name}: leaves at turn {sorted(firsts)}")
    wrong = collections.Counter((verb(a), verb(m)) for r in rows for a, ok, m in r["turns"] if not ok)
    print("turns not reproduced, (expert verb, model verb):", dict(wrong.most_common(args.show)))


if __name__ == "__main__":
    main()
