"""Hand-written questions in HotpotQA's official JSON format (_id, question, answer, type, level, supporting_facts,
context; the distractor setting's context paragraphs, fewer than its 10 per question) for the tests: no package
registry ships HotpotQA.
"""

from __future__ import annotations

import json
from pathlib import Path

ARTHUR = ["Arthur's Magazine", [
    "Arthur's Magazine (1844–1846) was an American literary periodical published in Philadelphia in the 19th "
    "century.",
    " Edited by T.S. Arthur, it featured work by Edgar A. Poe, J.H. Ingraham, Sarah Josepha Hale and others.",
    " In May 1846 it was merged into \"Godey's Lady's Book\".",
]]
FIRST_FOR_WOMEN = ["First for Women", [
    "First for Women is a woman's magazine published by Bauer Media Group in the USA.",
    " The magazine was started in 1989.",
    " It is based in Englewood Cliffs, New Jersey.",
    " In 2011 the circulation of the magazine was 1,310,696 copies.",
]]
MILHOUSE = ["Milhouse Van Houten", [
    "Milhouse Mussolini Van Houten is a recurring character in the Fox animated television series The Simpsons.",
    " He was created by Matt Groening.",
    " Milhouse was named after U.S. president Richard Nixon, whose middle name was Milhous.",
    " Milhouse is Bart Simpson's best friend.",
]]
GOERTZ = ["Allie Goertz", [
    "Allison Beth \"Allie\" Goertz is an American musician and satirist.",
    " Goertz is known for her satirical songs based on various pop culture topics, such as \"The Simpsons\".",
]]
NIXON = ["Richard Nixon", [
    "Richard Milhous Nixon was the 37th president of the United States, serving from 1969 to 1974.",
    " Nixon was born in Yorba Linda, California.",
]]
URYSOHN = ["Pavel Urysohn", [
    "Pavel Samuilovich Urysohn was a Soviet mathematician who is best known for his contributions in dimension "
    "theory.",
]]
LEVIN = ["Leonid Levin", [
    "Leonid Anatolievich Levin is a Soviet-American mathematician and computer scientist.",
]]
KAZAN = ["Elia Kazan", ["Elia Kazan was an American film and theatre director, producer, screenwriter and actor."]]
RAY = ["Nicholas Ray", [
    "Nicholas Ray was an American film director, screenwriter, and actor best known for the 1955 film Rebel Without "
    "a Cause.",
]]
SAIMAA = ["The Saimaa Gesture", [
    "The Saimaa Gesture is a 1981 Finnish documentary film about three Finnish rock groups aboard the steamboat "
    "Heinävesi on their tour around Lake Saimaa.",
]]
POWELL = ["Adam Clayton Powell (film)", [
    "Adam Clayton Powell is a 1989 American documentary film directed by Richard Kilberg.",
    " The film is about the rise and fall of influential African-American politician Adam Clayton Powell Jr.",
]]


def _q(qid: str, question: str, answer: str, qtype: str, facts: list, context: list) -> dict:
    return {"_id": qid, "question": question, "answer": answer, "type": qtype, "level": "hard",
            "supporting_facts": facts, "context": context}


QUESTIONS = [
    _q("5a7a06935542990198eaf050", "Which magazine was started first Arthur's Magazine or First for Women?",
       "Arthur's Magazine", "comparison", [["Arthur's Magazine", 0], ["First for Women", 1]],
       [FIRST_FOR_WOMEN, MILHOUSE, ARTHUR, NIXON]),
    _q("5a8b57f25542995d1e6f1371", "Musician and satirist Allie Goertz wrote a song about the \"The Simpsons\" "
       "character Milhouse, who Matt Groening named after who?", "President Richard Nixon", "bridge",
       [["Allie Goertz", 0], ["Allie Goertz", 1], ["Milhouse Van Houten", 2]], [GOERTZ, NIXON, MILHOUSE, ARTHUR]),
    _q("5ab3b0bf5542992ade7c6e39", "Were Pavel Urysohn and Leonid Levin known for the same type of work?", "yes",
       "comparison", [["Pavel Urysohn", 0], ["Leonid Levin", 0]], [LEVIN, KAZAN, URYSOHN]),
    _q("5a8c7595554299585d9e36b6", "What profession does Nicholas Ray and Elia Kazan have in common?",
       "director, screenwriter, actor", "comparison", [["Nicholas Ray", 0], ["Elia Kazan", 0]],
       [RAY, KAZAN, SAIMAA, LEVIN]),
    _q("5a7bbc50554299042af8f7d0", "Which documentary is about Finnish rock groups, Adam Clayton Powell or The "
       "Saimaa Gesture?", "The Saimaa Gesture", "comparison", [["Adam Clayton Powell (film)", 0],
       ["The Saimaa Gesture", 0]], [POWELL, SAIMAA, RAY]),
    _q("5a8e3ea95542995a26add48d", "Who was the 37th president of the country whose president Milhouse Van Houten "
       "was named after?", "Richard Nixon", "bridge", [["Milhouse Van Houten", 2], ["Richard Nixon", 0]],
       [MILHOUSE, NIXON, GOERTZ]),
]
EVAL_QUESTIONS = [
    _q("5ae0185b55429942ec259c1b", "What was the circulation of First for Women in 2011?", "1,310,696 copies",
       "bridge", [["First for Women", 3]], [FIRST_FOR_WOMEN, ARTHUR]),
    _q("5a7a06935542990198eaf050", QUESTIONS[0]["question"], QUESTIONS[0]["answer"], "comparison",
       QUESTIONS[0]["supporting_facts"], QUESTIONS[0]["context"]),  # also in the train file: kept out of train
]


def write_questions(path: Path) -> Path:
    """QUESTIONS as a HotpotQA file at `path`."""
    path.write_text(json.dumps(QUESTIONS))
    return path
