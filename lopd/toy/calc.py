"""Calculator world: a toy tool-use task, so that multi-step (tool-calling) trajectories exist on a CPU.

A prompt is an expression of 2-3 small integers joined by + - *, evaluated strictly left to right
(`12*7+5=`). The model is expected to call the calculator on the leftmost pair, `[12*7]`; the environment
appends the tool's observation `84;`; the model continues with the running value, `[84+5]`, gets `89;`, and
then writes the final answer, `89<eos>`. The response of a 2-operation prompt is therefore

    [12*7]  84;  [84+5]  89;  89<eos>
    student  obs  student obs student        -> three student steps, two observations (masked out of the loss)

Everything here is plain Python: the prompt splits, the outcome verifier (`verify`), the tool environment
(`ENVIRONMENT`, used with `lopd rollout --tool lopd.toy.calc:ENVIRONMENT`) and a rule-based rubric judge
(`judge`, used with `--judge lopd.toy.calc:judge`). It shares the character tokenizer of the words world.
"""
from __future__ import annotations

import random
import re
from typing import Any

from lopd.environment import ToolEnvironment
from lopd.toy.splits import Prompt, write_prompts_jsonl  # noqa: F401  (re-exported)
from lopd.verifier import rubric_score

SEPARATOR = "="
CALL_OPEN, CALL_CLOSE, OBSERVATION_END = "[", "]", ";"
OPERATORS = "+-*"
MAX_OPERAND = 20  # operands 0..MAX_OPERAND-1 (1-2 digits); keeps every trace well under 64 positions
SPLIT_SEEDS = {"teacher": 111, "sft": 222, "opd": 333, "eval": 444, "test": 555}

_CALL = re.compile(r"^(-?\d+)([+\-*])(-?\d+)$")
_PROMPT = re.compile(r"^(\d+(?:[+\-*]\d+)*)=$")


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def parse_expression(prompt: str) -> tuple[list[int], list[str]]:
    """`12*7+5=` -> ([12, 7, 5], ['*', '+']); raises ValueError on anything else."""
    match = _PROMPT.match(prompt.strip())
    if not match:
        raise ValueError(f"not a calculator prompt: {prompt!r}")
    tokens = re.findall(r"\d+|[+\-*]", match.group(1))
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def evaluate_left_to_right(prompt: str) -> int:
    operands, ops = parse_expression(prompt)
    value = operands[0]
    for op, b in zip(ops, operands[1:]):
        value = apply(value, op, b)
    return value


def random_expression(rng: random.Random, min_ops: int = 1, max_ops: int = 2, max_operand: int = MAX_OPERAND) -> str:
    ops = rng.randint(min_ops, max_ops)
    text = str(rng.randrange(max_operand))
    for _ in range(ops):
        text += rng.choice(OPERATORS) + str(rng.randrange(max_operand))
    return text + SEPARATOR


def make_prompts(split: str, n: int, min_ops: int = 1, max_ops: int = 2) -> list[Prompt]:
    """`n` expressions of min_ops+1..max_ops+1 integers, deterministic per split."""
    rng = random.Random(SPLIT_SEEDS[split])
    prompts = []
    for i in range(n):
        text = random_expression(rng, min_ops, max_ops)
        prompts.append(Prompt(id=f"calc-{split}-{i}", prompt=text, answer=str(evaluate_left_to_right(text))))
    return prompts


def reference_steps(prompt: str) -> list[tuple[str, str]]:
    """The ideal trace as (student text, observation text) steps; the last step has no observation.

    `12*7+5=` -> [("[12*7]", "84;"), ("[84+5]", "89;"), ("89", "")] (the final step is followed by <eos>).
    """
    operands, ops = parse_expression(prompt)
    steps, value = [], operands[0]
    for op, b in zip(ops, operands[1:]):
        result = apply(value, op, b)
        steps.append((f"{CALL_OPEN}{value}{op}{b}{CALL_CLOSE}", f"{result}{OBSERVATION_END}"))
        value = result
    steps.append((str(value), ""))
    return steps


def calculator(call: str) -> str:
    """The tool: `12*7` -> `84;`; anything that is not `int op int` -> `?;`."""
    match = _CALL.match(call)
    if not match:
        return "?" + OBSERVATION_END
    return f"{apply(int(match.group(1)), match.group(2), int(match.group(3)))}{OBSERVATION_END}"


def pending_call(response: str) -> str | None:
    """The body of the call the response ends with (`...[12*7]` -> `12*7`), or None when it does not end in one."""
    if not response.endswith(CALL_CLOSE):
        return None
    start = response.rfind(CALL_OPEN)
    return response[start + 1 : -1] if start >= 0 else response[:-1].rsplit(OBSERVATION_END, 1)[-1]


def observe(row: dict[str, Any], response: str) -> str | None:
    call = pending_call(response)
    return None if call is None else calculator(call)


# The tool environment for `lopd rollout/eval --tool lopd.toy.calc:ENVIRONMENT`: a call ends at "]".
ENVIRONMENT = ToolEnvironment(name="calc", stop=(CALL_CLOSE,), max_calls=4, observe=observe)


def final_answer(response: str) -> str:
    """The text after the last observation (the whole response when no tool was called)."""
    return response.rsplit(OBSERVATION_END, 1)[-1].strip()


def verify(prompt: dict, response: str) -> float:
    """Outcome reward: 1.0 when the final answer (after the last observation) is the expression's value."""
    try:
        expected = evaluate_left_to_right(prompt["prompt"])
    except ValueError:
        return 0.0
    return float(final_answer(response) == str(expected))


def calls(response: str) -> list[str]:
    """Every tool call the response made (the bodies between [ and ])."""
    return re.findall(r"\[([^\[\]]*)\]", response)


# Rubric items: (name, weight). The judge returns the weighted fraction of items met, in [0, 1].
RUBRIC = (("final_answer_correct", 3.0), ("calls_well_formed", 1.0), ("used_calculator", 1.0),
          ("no_extra_calls", 1.0))


def rubric(prompt: dict, response: str) -> dict[str, bool]:
    """Which rubric items the response meets."""
    made = calls(response)
    try:
        needed = len(parse_expression(prompt["prompt"])[1])
    except ValueError:
        needed = 0
    return {
        "final_answer_correct": verify(prompt, response) == 1.0,
        "calls_well_formed": all(_CALL.match(c) for c in made) and response.count(CALL_OPEN) == len(made),
        "used_calculator": len(made) > 0 or needed == 0,
        "no_extra_calls": len(made) <= needed,
    }


def judge(prompt: dict, response: str) -> float:
    """Rule-based rubric judge (`lopd rollout --judge lopd.toy.calc:judge`): weighted score in [0, 1]."""
    return rubric_score(rubric(prompt, response), RUBRIC)
