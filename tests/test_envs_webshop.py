"""The webshop family: the WebShop client (ReAct's / Reflexion's / Retroformer's search / click protocol) against a
test server.

No package registry ships WebShop's products, goals or search index, so the real server cannot run here: these
tests play full episodes over HTTP against tests/webshop_server.py, a small stand-in that serves the same routes and
page structure as WebShop's Flask app and computes WebShop's reward formula on a small catalogue (simplified
matching and search: see that module). Standard library only.
"""

from __future__ import annotations

import socket

import pytest

from envs import INVALID_ACTION_OBS, SPLITS, EnvError, EnvLost
from envs.webshop_env import INVALID, SCORE_LABEL, WebShopEnv, render
from webshop_server import ShopServer, catalogue, goals

QUERY = "search[3 ounce bright citrus deodorant sensitive skin]"
WIN = [QUERY, "click[b078gwrc1j]", "click[bright citrus]", "click[3 ounce (pack of 1)]", "click[buy now]"]


@pytest.fixture(scope="module")
def server():
    with ShopServer(catalogue(), goals()) as shop:
        yield shop


@pytest.fixture(scope="module")
def env(server: ShopServer) -> WebShopEnv:
    return WebShopEnv(server_url=server.url, n_train=1, n_seen=1, n_unseen=2, n_valid=0)


def _play(env: WebShopEnv, task_id: str, actions: list[str]):
    env.reset(options={"task": task_id})
    return [env.step(a) for a in actions]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_splits_follow_webshop_goal_ranges():
    env = WebShopEnv()  # listing tasks needs no server
    tasks = {split: env.tasks(split) for split in SPLITS}
    assert env.split_sizes() == {"train": 1000, "valid": 100, "seen": 100, "unseen": 100}  # valid: as many as seen
    assert [t.task_id for t in tasks["unseen"][:2]] == ["webshop:fixed_0", "webshop:fixed_1"]
    assert tasks["seen"][0].task_id == "webshop:fixed_500" and tasks["train"][0].task_id == "webshop:fixed_1500"
    assert tasks["unseen"][-1].task_id == "webshop:fixed_99" and tasks["train"][-1].task_id == "webshop:fixed_2499"
    # valid: a block of WebShop's train range that train cannot reach (its cap ends where valid starts)
    assert [t.task_id for t in tasks["valid"]] == [f"webshop:fixed_{n}" for n in range(5000, 5100)]
    widest = WebShopEnv(n_train=3500, n_valid=1000)
    assert widest.tasks("train")[-1].task_id == "webshop:fixed_4999" and len(widest.tasks("valid")) == 1000
    every = [t.task_id for split in SPLITS for t in widest.tasks(split)]
    assert len(every) == len(set(every))
    with pytest.raises(EnvError, match=r"n_train must be in \[0, 3500\].*fixed_1500\.\.fixed_4999"):
        WebShopEnv(n_train=3501)
    with pytest.raises(EnvError, match=r"n_valid must be in \[0, 1000\].*fixed_5000\.\.fixed_5999"):
        WebShopEnv(n_valid=1001)
    assert all(t.max_steps == 14 and t.kind == "shop" and t.split == s for s, ts in tasks.items() for t in ts)
    assert WebShopEnv(n_unseen=500, max_steps=20).tasks("unseen")[-1].max_steps == 20
    with pytest.raises(EnvError, match="n_unseen"):
        WebShopEnv(n_unseen=501)  # WebShop's test goals are 0..499
    with pytest.raises(EnvError, match="unknown split"):
        env.tasks("test")
    with pytest.raises(EnvError, match="unknown task"):
        env.task("webshop:fixed_100")


def test_no_expert_demos():
    with pytest.raises(EnvError, match="demos: none"):
        WebShopEnv().expert_actions("webshop:fixed_0")


def test_unreachable_server_names_how_to_start_it():
    env = WebShopEnv(server_url=f"http://127.0.0.1:{_free_port()}", timeout_s=5)
    with pytest.raises(EnvError, match=r"run_dev\.sh.*server_url"):
        env.reset(options={"task": "webshop:fixed_0"})
    with pytest.raises(EnvError, match=r"run_dev\.sh.*server_url"):
        env.prepare()


def test_full_episode_wins_with_reward_one(env: WebShopEnv, server: ShopServer):
    obs, info = env.reset(options={"task": "webshop:fixed_0"})
    assert info["instruction"].startswith("i would like a 3 ounce bottle of bright citrus deodorant")
    assert obs == "WebShop\n[Search]" and info["max_steps"] == 14  # the goal is the instruction, not the obs
    out = [env.step(a) for a in WIN]
    results, item = out[0][0], out[1][0]
    # the clients' text: buttons, the first 3 products (of 4 found) with title and price, no instruction
    assert results.startswith("[Back to Search] \nPage 1 (Total results: 4) \n[Next >] \n[B078GWRC1J] \nBright")
    assert results.count("\n[B0") == 3 and "B07QXZ1111" not in results and "Instruction" not in results
    assert "scent [assorted scents][bright citrus]" in item and "[Buy Now]" in item and "Price: $10.99" in item
    assert out[2][0] == "You have clicked bright citrus." and out[3][0] == "You have clicked 3 ounce (pack of 1)."
    obs, reward, terminated, truncated, info = out[-1]
    assert obs == f"{SCORE_LABEL}: 1.0" and reward == 1.0 and terminated and not truncated
    assert info == {"score": 1.0, "won": True, "valid": True}
    assert all(o[4]["valid"] and not o[2] for o in out[:-1])
    assert server.paths[-1].startswith("/done/fixed_0/B078GWRC1J/")  # bought through WebShop's route
    obs, _, terminated, _, info = env.step("click[buy now]")  # after the end: outcome kept
    assert obs == INVALID_ACTION_OBS and terminated and info["won"] and not info["valid"]


def test_wrong_product_or_options_get_partial_reward(env: WebShopEnv):
    # WebShop's formula: (attributes + options + price) / (1 + 2 + 1) x type reward (same query: 1)
    wrong = _play(env, "webshop:fixed_0", [QUERY, "click[b08kbvj4xn]", "click[buy now]"])[-1]
    assert wrong[2] and wrong[4]["score"] == pytest.approx(0.25) and not wrong[4]["won"] and wrong[1] == 0.0
    no_options = _play(env, "webshop:fixed_0", WIN[:2] + ["click[buy now]"])[-1]
    assert no_options[4]["score"] == pytest.approx(0.5)
    one_option = _play(env, "webshop:fixed_0", WIN[:3] + ["click[buy now]"])[-1]
    assert one_option[4]["score"] == pytest.approx(0.75)


def test_invalid_actions_are_observations(env: WebShopEnv):
    env.reset(options={"task": "webshop:fixed_1"})
    for action in ["click[buy now]", "click[back to search]", "buy the shoes", "", "click[]", "search[]"]:
        obs, reward, terminated, truncated, info = env.step(action)  # nothing to click on the search page
        assert obs == INVALID and info["valid"] is False and not terminated
    assert env.step("think[I should search for running shoes]")[0] == "OK."
    results = env.step("search[men's running shoes lightweight]")[0]
    assert "[B01SHOE001]" in results
    for action in ["search[other shoes]", "click[b000nothere]", "click[black]", "click[description]"]:
        obs, _, terminated, _, info = env.step(action)  # no search box, no such product, options not here
        assert obs == INVALID and not info["valid"] and not terminated
    env.step("click[b01shoe001]")
    for action in ["click[purple]", "click[attributes]", "click[next >]"]:  # no such option / button here
        assert env.step(action)[0] == INVALID
    assert env.step("click[black]")[0] == "You have clicked black."
    assert env.step("click[features]")[4]["valid"]
    item = env.step("click[< prev]")[0]  # back on the item page, the chosen option is marked
    assert "[[black]]" in item and "[blue]" in item
    assert "Page 1" in env.step("click[< prev]")[0]  # to the results
    assert env.step("click[< prev]")[0] == INVALID  # no page before page 1
    assert "Page 2 (Total results:" in env.step("click[next >]")[0]
    assert "Page 1" in env.step("click[< prev]")[0]
    home = env.step("click[back to search]")[0]  # the search page again, as the clients show it
    assert home.startswith("WebShop") and home.endswith("[Search]") and "running shoes" in home
    assert env.step("search[shoes]")[4]["valid"]


def test_truncation_and_other_splits(env: WebShopEnv):
    task = env.task("webshop:fixed_500")
    env.reset(options={"task": task.task_id})
    for i in range(task.max_steps):
        _, _, terminated, truncated, _ = env.step("click[nothing]")
        assert not terminated and truncated == (i == task.max_steps - 1)
    _, info = env.reset(options={"task": "webshop:fixed_1500"})
    assert "lavender deodorant cream" in info["instruction"]


def test_valid_goal_plays_like_the_others():
    with ShopServer(catalogue(), {**goals(), 5000: goals()[0]}) as shop:  # goal 5000: a copy of goal 0
        env = WebShopEnv(server_url=shop.url, n_train=1, n_seen=1, n_unseen=2, n_valid=1)
        env.prepare()  # goals 0, 1, 500, 1500, 5000: there
        assert env.task("webshop:fixed_5000").split == "valid"
        *_, (obs, reward, terminated, _, info) = _play(env, "webshop:fixed_5000", WIN)
        assert terminated and info["won"] and reward == 1.0


def test_goal_missing_on_server_is_an_env_error(server: ShopServer):
    WebShopEnv(server_url=server.url, n_train=1, n_seen=1, n_unseen=2, n_valid=0).prepare()  # 0, 1, 500, 1500: there
    with pytest.raises(EnvError, match="fixed_5000.*n_valid"):
        WebShopEnv(server_url=server.url, n_train=1, n_seen=1, n_unseen=2).prepare()  # valid's goal 5000 is not
    env = WebShopEnv(server_url=server.url, n_train=1, n_seen=1, n_unseen=3, n_valid=0)
    with pytest.raises(EnvError, match="fixed_2"):
        env.reset(options={"task": "webshop:fixed_2"})  # the server has no goal 2 (HTTP 500)
    with pytest.raises(EnvError, match="fixed_2.*n_unseen"):
        env.prepare()


def test_server_lost_mid_episode_is_env_lost():
    with ShopServer(catalogue(), goals()) as shop:
        env = WebShopEnv(server_url=shop.url, timeout_s=5)
        env.reset(options={"task": "webshop:fixed_0"})
    with pytest.raises(EnvLost, match="stopped answering"):
        env.step(QUERY)


def test_render_copes_with_the_templates_markup():
    html = ("<html><head><title>t</title><style>p {}</style></head><body>"
            "<div id='instruction-text'><h4>Instruction:<br>find a hat</h4></div>"
            "<form><button>Back to Search</button></form><h3>Page 1 (Total results: 1)</h3>"
            "<h4><a class='product-link' href='#'>B0HAT</a></h5><h4>A red hat</h5><h5>$5.00</h6>"
            "<!-- <h5>hidden</h5> --><script>var x = 1;</script></body></html>")
    page = render(html, "search")
    assert page.observation == "\n[Back to Search] \nPage 1 (Total results: 1) \n[B0HAT] \nA red hat \n$5.00 "
    assert page.asins == ["B0HAT"] and page.instruction == "find a hat" and page.buttons == ["Back to Search"]
