"""The hotpotqa family: ReAct's Search / Lookup / Finish tools, HotpotQA's EM / F1, splits, expert demos, errors.

No package registry ships HotpotQA, so these tests write a small file of hand-written questions in HotpotQA's
official JSON format (_id, question, answer, type, level, supporting_facts, context; the distractor setting's
context paragraphs, fewer than its 10 per question) and play real episodes on it. Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envs import INVALID_ACTION_OBS, SPLITS, EnvError
from envs.hotpotqa_env import (
    CORRECT, DEV_URL, FIRST_OBS, INCORRECT, NO_MORE, NO_PAGE, REFLEXION_DEV_IDS, HotpotQAEnv, exact_match, f1_score,
    normalize_answer,
)
from hotpotqa_data import EVAL_QUESTIONS, QUESTIONS

SIZES = {"train": 2, "valid": 0, "seen": 2, "unseen": 2}  # 6 questions: none left for valid


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hotpot")
    paths = {"data": root / "hotpot_small.json", "eval": root / "hotpot_eval.json", "cache": root / "cache"}
    paths["data"].write_text(json.dumps(QUESTIONS))
    paths["eval"].write_text(json.dumps(EVAL_QUESTIONS))
    return paths


@pytest.fixture(scope="module")
def env(files) -> HotpotQAEnv:
    return HotpotQAEnv(data_file=files["data"], n_train=2, n_seen=2, n_unseen=2, cache_dir=files["cache"])


def _play(env: HotpotQAEnv, task_id: str, actions: list[str]):
    env.reset(options={"task": task_id})
    return [env.step(a) for a in actions]


def test_official_metrics():
    assert normalize_answer("The  Saimaa Gesture!") == "saimaa gesture"
    assert exact_match("arthur's magazine", "Arthur's Magazine") and not exact_match("Arthur", "Arthur's Magazine")
    assert f1_score("Richard Nixon", "President Richard Nixon") == pytest.approx(0.8)
    assert f1_score("no", "yes") == 0.0 and f1_score("yes", "yes") == 1.0


def test_missing_or_bad_file_names_where_to_get_it(tmp_path):
    with pytest.raises(EnvError, match="data_file") as err:
        HotpotQAEnv(data_file=tmp_path / "nope.json", cache_dir=tmp_path)
    assert DEV_URL in str(err.value)
    with pytest.raises(EnvError, match=DEV_URL.replace(".", r"\.")):
        HotpotQAEnv(cache_dir=tmp_path / "empty-cache")  # the default path, absent
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EnvError, match="unreadable"):
        HotpotQAEnv(data_file=bad, cache_dir=tmp_path).tasks("train")
    bad.write_text(json.dumps([{"question": "q?"}]))
    with pytest.raises(EnvError, match="lacks"):
        HotpotQAEnv(data_file=bad, cache_dir=tmp_path / "other").tasks("train")


def test_splits_are_disjoint_hash_samples(env: HotpotQAEnv, files):
    tasks = {split: env.tasks(split) for split in SPLITS}
    assert {split: len(ts) for split, ts in tasks.items()} == SIZES == env.split_sizes()
    ids = [t.task_id for ts in tasks.values() for t in ts]
    assert len(set(ids)) == 6 and all(i.startswith("hotpotqa:5a") for i in ids)
    assert {t.kind for ts in tasks.values() for t in ts} <= {"bridge", "comparison"}
    assert all(t.max_steps == 6 and t.split == s for s, ts in tasks.items() for t in ts)
    # the file's order does not matter; a fresh cache gives the same split
    shuffled = files["data"].with_name("reversed.json")
    shuffled.write_text(json.dumps(QUESTIONS[::-1]))
    other = HotpotQAEnv(data_file=shuffled, n_train=2, n_seen=2, n_unseen=2, max_steps=7,
                        cache_dir=files["cache"] / "fresh")
    assert [t.task_id for t in other.tasks("unseen")] == [t.task_id for t in tasks["unseen"]]
    assert other.tasks("seen")[0].max_steps == 7
    assert list((files["cache"] / "fresh" / "hotpotqa").glob("split-*.json"))
    prepared = HotpotQAEnv(data_file=files["data"], n_train=1, n_seen=1, n_unseen=1, cache_dir=files["cache"] / "p")
    prepared.prepare()  # writes the split cache: a worker built afterwards reads it instead of the file
    (cached,) = (files["cache"] / "p" / "hotpotqa").glob("split-*.json")
    assert {k: len(v) for k, v in json.loads(cached.read_text()).items()} == {"train": 1, "valid": 1, "seen": 1,
                                                                               "unseen": 1}
    assert len(HotpotQAEnv(data_file=files["data"], n_train=None, n_seen=1, n_unseen=1, n_valid=0,
                           cache_dir=files["cache"]).tasks("train")) == 4


def test_valid_is_the_end_of_the_hash_order(env: HotpotQAEnv, files):
    # ids recorded before valid existed: the other splits are unchanged
    assert [t.task_id for t in env.tasks("train")] == ["hotpotqa:5ab3b0bf5542992ade7c6e39",
                                                       "hotpotqa:5a8b57f25542995d1e6f1371"]
    assert [t.task_id for t in env.tasks("seen")] == ["hotpotqa:5a8c7595554299585d9e36b6",
                                                      "hotpotqa:5a7bbc50554299042af8f7d0"]
    assert [t.task_id for t in env.tasks("unseen")] == ["hotpotqa:5a8e3ea95542995a26add48d",
                                                        "hotpotqa:5a7a06935542990198eaf050"]
    last = "hotpotqa:5a8b57f25542995d1e6f1371"  # the last question by hash
    small = HotpotQAEnv(data_file=files["data"], n_train=1, n_seen=1, n_unseen=1, cache_dir=files["cache"])
    assert small.split_sizes() == {"train": 1, "valid": 1, "seen": 1, "unseen": 1}  # valid: as many as seen
    assert [t.task_id for t in small.tasks("train")] == ["hotpotqa:5a8c7595554299585d9e36b6"]  # as before valid
    assert [t.task_id for t in small.tasks("valid")] == [last]
    every = [t.task_id for split in SPLITS for t in small.tasks(split)]
    assert len(every) == len(set(every))
    # train uncapped: it stops where valid starts (valid: at most half of what seen leaves)
    uncapped = HotpotQAEnv(data_file=files["data"], n_train=None, n_seen=1, n_unseen=1, n_valid=10,
                           cache_dir=files["cache"])
    assert len(uncapped.tasks("train")) == 2 and [t.task_id for t in uncapped.tasks("valid")][-1] == last
    assert not {t.task_id for t in uncapped.tasks("train")} & {t.task_id for t in uncapped.tasks("valid")}
    assert HotpotQAEnv(data_file=files["data"], cache_dir=files["cache"]).counts["valid"] == 100  # = n_seen
    for task in small.tasks("valid"):  # expert wins
        env.reset(options={"task": task.task_id})
        assert [env.step(a) for a in env.expert_actions(task.task_id)][-1][4]["won"]


def test_eval_file_is_unseen_and_kept_out_of_training(files):
    env = HotpotQAEnv(data_file=files["data"], eval_file=files["eval"], n_train=None, n_seen=1,
                      cache_dir=files["cache"])
    unseen = {t.task_id for t in env.tasks("unseen")}
    assert unseen == {f"hotpotqa:{q['_id']}" for q in EVAL_QUESTIONS}
    seen_train = {t.task_id for split in ("seen", "train", "valid") for t in env.tasks(split)}
    assert len(seen_train) == 5 and not seen_train & unseen and len(env.tasks("valid")) == 1
    for task in env.tasks("unseen"):  # expert wins on the eval file's questions too
        steps = _play(env, task.task_id, env.expert_actions(task.task_id))
        assert steps[-1][4]["won"]


def test_unseen_ids_pick_the_evaluation_questions(files):
    picked = [QUESTIONS[4]["_id"], QUESTIONS[1]["_id"], QUESTIONS[4]["_id"]]
    env = HotpotQAEnv(data_file=files["data"], unseen_ids=picked, n_train=None, n_seen=1, cache_dir=files["cache"])
    assert [t.task_id for t in env.tasks("unseen")] == [f"hotpotqa:{q}" for q in picked[:2]]  # in order, once
    others = {t.task_id for split in ("seen", "train", "valid") for t in env.tasks(split)}
    assert len(others) == 4 and not others & {t.task_id for t in env.tasks("unseen")}
    with pytest.raises(EnvError, match="1 of the 2 unseen_ids"):
        HotpotQAEnv(data_file=files["data"], unseen_ids=[picked[0], "5a0000000000000000000000"],
                    cache_dir=files["cache"]).tasks("unseen")
    assert len(set(REFLEXION_DEV_IDS)) == 100  # Reflexion's / Retroformer's 100 dev questions: not in this file
    with pytest.raises(EnvError, match="100 of the 100 unseen_ids.*hotpot_dev_distractor"):
        HotpotQAEnv(data_file=files["data"], unseen_ids="reflexion", cache_dir=files["cache"]).prepare()
    with pytest.raises(EnvError, match="'reflexion'"):
        HotpotQAEnv(data_file=files["data"], unseen_ids="react", cache_dir=files["cache"])


@pytest.mark.parametrize("split", SPLITS)
def test_expert_wins_every_question(env: HotpotQAEnv, split: str):
    for task in env.tasks(split):
        actions = env.expert_actions(task.task_id)
        assert actions[-1].startswith("finish[") and all(a.startswith("search[") for a in actions[:-1])
        obs, info = env.reset(options={"task": task.task_id})
        assert obs == FIRST_OBS and info["instruction"].endswith("?") and info["max_steps"] == task.max_steps
        for i, action in enumerate(actions):
            obs, reward, terminated, truncated, step_info = env.step(action)
            assert step_info["valid"] and not truncated and terminated == (i == len(actions) - 1)
            if i < len(actions) - 1:
                assert not obs.startswith("Could not find") and step_info["score"] == 0.0
        assert obs == CORRECT and reward == 1.0 and step_info["won"] and step_info["score"] == 1.0


def test_search_lookup_and_not_found(env: HotpotQAEnv):
    task = "hotpotqa:5a8b57f25542995d1e6f1371"  # Milhouse
    out = _play(env, task, ["lookup[named after]", "search[milhouse van houten]", "lookup[milhouse]",
                            "lookup[milhouse]", "lookup[milhouse]", "lookup[milhouse]"])
    obs = [o[0] for o in out]
    assert obs[0] == NO_PAGE
    assert obs[1].startswith("Milhouse Mussolini Van Houten is a recurring") and "best friend" in obs[1]
    assert obs[2].startswith("(Result 1 / 3) Milhouse Mussolini")
    assert obs[3] == "(Result 2 / 3) Milhouse was named after U.S. president Richard Nixon, whose middle name was " \
                     "Milhous."
    assert obs[4].startswith("(Result 3 / 3) Milhouse is Bart") and obs[5] == NO_MORE
    assert all(o[4]["valid"] and not o[2] for o in out)
    env.reset(options={"task": task})
    obs, *_ = env.step("search[milhouse]")  # partial title: "Could not find" with the closest context titles
    assert obs.startswith("Could not find [milhouse]. Similar: ['Milhouse Van Houten', ")
    assert env.step("lookup[nixon]")[0] == NO_PAGE  # a failed search leaves no page to look up
    assert env.step("Search[Milhouse Van Houton]")[0].startswith("Milhouse Mussolini")  # misspelt: fuzzy match
    assert env.step("search[Allie  Goertz]")[0].startswith("Allison Beth")  # case and spaces ignored
    assert env.step("think[I know it now]")[0] == "Nice thought."


def test_wrong_answers_score_f1_and_end_the_episode(env: HotpotQAEnv):
    (obs, reward, terminated, truncated, info), = _play(env, "hotpotqa:5a8b57f25542995d1e6f1371",
                                                         ["finish[richard nixon]"])
    assert obs == INCORRECT and terminated and reward == 0.0 and not info["won"]
    assert info["score"] == pytest.approx(0.8)  # F1 against "President Richard Nixon"
    obs, reward, terminated, truncated, info = env.step("finish[President Richard Nixon]")
    assert obs == INVALID_ACTION_OBS and terminated and not info["won"] and info["score"] == pytest.approx(0.8)
    (_, _, _, _, info), = _play(env, "hotpotqa:5ab3b0bf5542992ade7c6e39", ["finish[no]"])
    assert info["score"] == 0.0 and not info["won"]


def test_invalid_actions_are_observations(env: HotpotQAEnv):
    env.reset(options={"task": "hotpotqa:5a7a06935542990198eaf050"})
    for action in ["dance", "jump[arthur's magazine]", "search[]", "", "finish [ ]"]:
        obs, reward, terminated, truncated, info = env.step(action)
        assert obs == f"Invalid action: {action}"
        assert info["valid"] is False and not terminated and info["score"] == 0.0
    assert env.step("search[arthur's magazine]")[4]["valid"]  # the episode goes on


def test_truncation_at_max_steps(env: HotpotQAEnv):
    task = env.tasks("seen")[0]
    env.reset(options={"task": task.task_id})
    for i in range(task.max_steps):
        _, _, terminated, truncated, _ = env.step("lookup[anything]")
        assert not terminated and truncated == (i == task.max_steps - 1)


def test_unknown_task_and_split(env: HotpotQAEnv):
    with pytest.raises(EnvError, match="unknown task"):
        env.reset(options={"task": "hotpotqa:no-such-id"})
    with pytest.raises(EnvError, match="unknown task"):
        env.expert_actions("textworld:cooking-train-0001")
    with pytest.raises(EnvError, match="unknown split"):
        env.tasks("dev")
