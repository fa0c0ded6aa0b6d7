"""Task datasets of the tiny testbed (addition, written-out chains, templated code) and reasoning-gym, with checkers.

Every generator returns a `datasets.Dataset` of strings with columns `prompt`, `completion` (the reference
response, without EOS or padding) and `answer` (the gold final answer), plus task-specific columns. The tiny
tasks use only printable ASCII and newlines, so the character tokenizer encodes them.

A problem's split is a stable hash of its prompt (~10% "test"), so train and test never share a prompt
(`facts`, whose prompt is always the same: a hash of its completion). Reasoning-gym's held-out problems
(`reasoning_gym_held_out`) never repeat the training draw. `problem_key` says when two problems are the same.
The checkers never execute model text: code answers are parsed with `ast` and run by a small interpreter.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Collection, Mapping

from datasets import Dataset

logger = logging.getLogger(__name__)

BOXED = "\\boxed{"
TEST_FRACTION = 10  # one prompt in TEST_FRACTION goes to the test split
MAX_STALL = 10_000  # draws in a row without a new problem before the space counts as exhausted
MAX_ABS = 10**12  # interpreter bound on every constant and intermediate value
CODE_OPS = {"add": "+", "sub": "-", "mul": "*"}
HELD_OUT_DRAWS = 8  # reasoning-gym held-out sets look at up to this many problems per problem wanted


def split_of(prompt: str) -> str:
    """The split ("train" or "test") a prompt belongs to, from a stable hash of its text."""
    digest = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    return "test" if digest % TEST_FRACTION == 0 else "train"


def _collect(
    task: str, draw: Callable[[random.Random], dict[str, object]], n: int, split: str, seed: int, hint: str
) -> Dataset:
    """Draw problems with `random.Random(seed)` until `n` distinct prompts of `split` are collected.

    `hint` tells the user how to get more problems when the space runs out.
    """
    if split not in ("train", "test"):
        raise ValueError(f"{task}: split must be 'train' or 'test', got {split!r}")
    if n < 1:
        raise ValueError(f"{task}: n must be at least 1, got {n}")
    rng, rows, seen, stall = random.Random(seed), [], set(), 0
    while len(rows) < n:
        row = draw(rng)
        prompt = row["prompt"]
        if prompt in seen or split_of(prompt) != split:
            stall += 1
            if stall >= MAX_STALL:
                raise ValueError(
                    f"{task}: found only {len(rows)} distinct {split} problems, fewer than n={n}; {hint}"
                )
            continue
        seen.add(prompt)
        rows.append(row)
        stall = 0
    return Dataset.from_list(rows)


def _operands(rng: random.Random, operands: int, digits: int, task: str) -> list[int]:
    """`operands` uniform integers with exactly `digits` digits each."""
    if operands < 2 or digits < 1:
        raise ValueError(f"{task}: need operands >= 2 and digits >= 1, got operands={operands}, digits={digits}")
    return [rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(operands)]


def addition(n: int, *, operands: int = 3, digits: int = 2, split: str = "train", seed: int = 0) -> Dataset:
    """Sums like `12+57+33=` answered directly as `\\boxed{102}`."""

    def draw(rng: random.Random) -> dict[str, object]:
        xs = _operands(rng, operands, digits, "addition")
        answer = str(sum(xs))
        return {"prompt": "+".join(map(str, xs)) + "=", "completion": BOXED + answer + "}", "answer": answer}

    return _collect("addition", draw, n, split, seed, "lower n or raise operands/digits")


def chain(n: int, *, operands: int = 4, digits: int = 2, split: str = "train", seed: int = 0) -> Dataset:
    """Sums whose completion writes every running sum on its own line before the boxed answer (long content)."""

    def draw(rng: random.Random) -> dict[str, object]:
        xs = _operands(rng, operands, digits, "chain")
        lines, total = [], xs[0]
        for x in xs[1:]:
            lines.append(f"{total}+{x}={total + x}")
            total += x
        answer = str(total)
        completion = "\n".join([*lines, BOXED + answer + "}"])
        return {"prompt": "+".join(map(str, xs)) + "=", "completion": completion, "answer": answer}

    return _collect("chain", draw, n, split, seed, "lower n or raise operands/digits")


FACTS_PROMPT = "#"
FACT_OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}
FACT_RE = re.compile(r"(\d)([-+*])(\d)=(\d)")


def facts(n: int, *, count: int = 21, split: str = "train", seed: int = 0) -> Dataset:
    """Unconditional text for distillation: after the fixed prompt `#`, a chain of `count` one-digit facts mod 10
    such as `3+4=7;7*6=2;2-5=7;` where each fact starts from the previous result (21 facts = 126 characters).

    A problem's split is the hash of its completion (the prompt is always the same)."""
    if split not in ("train", "test") or n < 1 or count < 1:
        raise ValueError(f"facts: need split 'train'/'test', n >= 1, count >= 1; got {split!r}, {n}, {count}")
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        a, parts = rng.randrange(10), []
        for _ in range(count):
            op, b = rng.choice(list(FACT_OPS)), rng.randrange(10)
            c = FACT_OPS[op](a, b)
            parts.append(f"{a}{op}{b}={c};")
            a = c
        text = "".join(parts)
        if text not in seen and split_of(text) == split:  # 30**21 chains: a repeat is vanishingly rare
            seen.add(text)
            rows.append({"prompt": FACTS_PROMPT, "completion": text, "answer": ""})
    return Dataset.from_list(rows)


def facts_validity(text: str, count: int = 21) -> float:
    """Fraction of the `count` facts of a `facts` text that are well formed, correct mod 10 and chained (their
    first digit is the previous fact's result); missing facts count as invalid, and so does any extra text."""
    pieces = text.split(";")
    if pieces[-1] == "":
        pieces.pop()
    valid, previous = 0, None
    for piece in pieces[:count]:
        fact = FACT_RE.fullmatch(piece)
        if fact is not None:
            a, op, b, c = int(fact[1]), fact[2], int(fact[3]), int(fact[4])
            if FACT_OPS[op](a, b) == c and (previous is None or a == previous):
                valid += 1
            previous = c
        else:
            previous = None
    if len(pieces) > count or not text.endswith(";"):
        valid = min(valid, count - 1)  # extra or unterminated text spoils the sample
    return valid / count


def code(n: int, *, max_ops: int = 2, split: str = "train", seed: int = 0) -> Dataset:
    """Write `f(x)` for a pipeline of 1..max_ops ops (add/sub/mul k, k in 1..9); checked by four unit tests.

    Extra columns: `tests` (assert strings, inputs 0, a negative and two positives), `entry_point` ("f").
    `answer` is the reference expression, e.g. `(x+3)*2`; grade with `code_pass_rate`, not string equality.
    """

    def draw(rng: random.Random) -> dict[str, object]:
        ops = [(rng.choice(list(CODE_OPS)), rng.randint(1, 9)) for _ in range(rng.randint(1, max_ops))]
        prompt = "f(x): " + ", ".join(f"{op} {k}" for op, k in ops) + "\n"
        # Every op after the first wraps what came before, "((x+3)*2)-5": the text of op i sits at a fixed
        # place, so the tiny models learn the mapping rather than operator precedence.
        expr = "x"
        for op, k in ops:
            expr = f"{expr if expr == 'x' else f'({expr})'}{CODE_OPS[op]}{k}"
        # Inputs depend on the prompt only, so a problem is the same whatever the seed.
        inputs_rng = random.Random(prompt)
        inputs = [0, inputs_rng.randint(-9, -1), inputs_rng.randint(1, 9), inputs_rng.randint(10, 99)]
        tests = [f"assert f({x}) == {_apply(ops, x)}" for x in inputs]
        return {
            "prompt": prompt,
            "completion": f"def f(x):\n return {expr}",
            "answer": expr,
            "tests": tests,
            "entry_point": "f",
        }

    if max_ops < 1:
        raise ValueError(f"code: max_ops must be at least 1, got {max_ops}")
    size = sum((len(CODE_OPS) * 9) ** k for k in range(1, max_ops + 1))
    return _collect("code", draw, n, split, seed, f"lower n or raise max_ops (the task has {size} problems, ~10% test)")


def _apply(ops: list[tuple[str, int]], x: int) -> int:
    """The value of the op pipeline at `x`."""
    for op, k in ops:
        x = {"add": x + k, "sub": x - k, "mul": x * k}[op]
    return x


def reasoning_gym_task(name: str, n: int, *, seed: int = 0) -> Dataset:
    """Problems from the offline `reasoning_gym` generator `name`; the reference completion is the boxed answer.

    The entry's metadata is kept as a JSON string column `metadata`, since the package's scorers may read it.
    Questions of some generators contain non-ASCII text: use them with a real tokenizer, not the character one.
    These are the generator's first `n` problems for `seed`, as it makes them: its generators are procedural (most
    make problem i from seed + i), so a draw can repeat a problem and two seeds can make the same one (see
    `reasoning_gym_held_out`).
    """
    import reasoning_gym

    if n < 1:
        raise ValueError(f"reasoning_gym task {name!r}: n must be at least 1, got {n}")
    return _reasoning_gym_rows(name, list(reasoning_gym.create_dataset(name, size=n, seed=seed)))


def reasoning_gym_held_out(name: str, n: int, *, seed: int, exclude: Collection[str] = ()) -> Dataset:
    """`n` problems of reasoning-gym generator `name` for a held-out check: the first ones of the generator's stream
    for `seed` whose question is new, that is neither asked earlier in the set nor in `exclude` (`problem_key`s,
    e.g. of the training draw, which a different seed can repeat since the generators are procedural).

    Deterministic: the same arguments give the same problems. It looks at up to HELD_OUT_DRAWS * n problems of the
    stream; a generator with fewer new ones there gives those, with a warning naming how many (none at all is an
    error: the generator cannot supply a held-out set apart from `exclude`).
    """
    import reasoning_gym

    if n < 1:
        raise ValueError(f"reasoning_gym task {name!r}: n must be at least 1, got {n}")
    stream = reasoning_gym.create_dataset(name, size=HELD_OUT_DRAWS * n, seed=seed)
    seen, entries, skipped = set(exclude), [], 0
    for i in range(len(stream)):
        entry = stream[i]
        key = problem_key({"prompt": entry["question"]})
        if key in seen:
            skipped += 1
            continue
        seen.add(key)
        entries.append(entry)
        if len(entries) == n:
            break
    if not entries:
        raise ValueError(f"reasoning_gym task {name!r}: none of {len(stream)} problems drawn with seed {seed} is "
                         "new (every one repeats a training problem): the generator cannot give a held-out set")
    if len(entries) < n:
        logger.warning("reasoning_gym task %r: only %d held-out problems, fewer than the %d asked: %d of the %d "
                       "problems drawn repeat a training problem or each other", name, len(entries), n, skipped,
                       len(stream))
    elif skipped:
        logger.info("reasoning_gym task %r: %d drawn held-out problems repeated a training problem or each other; "
                    "the next ones of the stream took their place", name, skipped)
    return _reasoning_gym_rows(name, entries)


def _reasoning_gym_rows(name: str, entries: list[dict]) -> Dataset:
    """The rows of reasoning-gym entries of generator `name` (prompt, boxed completion, answer, task, metadata)."""
    if not all(isinstance(e["answer"], str) for e in entries):
        raise ValueError(
            f"reasoning_gym task {name!r} has no reference answer (its scorer checks the metadata); "
            "pick a task with gold answers, e.g. 'basic_arithmetic' or 'chain_sum'"
        )
    rows = [
        {
            "prompt": e["question"],
            "completion": BOXED + e["answer"] + "}",
            "answer": e["answer"],
            "task": name,
            "metadata": json.dumps(e["metadata"], default=str),  # some hold Fractions
        }
        for e in entries
    ]
    return Dataset.from_list(rows)


def problem_key(row: Mapping, generator: str | None = None) -> str:
    """What makes two problems the same, as a string: the prompt (its `repr`, so conversations compare by their
    messages), since a policy trained on a prompt has seen the problem whatever the answer; for the `facts`
    generator, whose prompt is always `#`, the prompt and the completion (the text is the problem)."""
    if generator == "facts":
        return repr((row["prompt"], row["completion"]))
    return repr(row["prompt"])


def boxed_answer(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` in `text` (braces balanced), or None if there is none."""
    start = text.rfind(BOXED)
    while start != -1:
        depth, i = 1, start + len(BOXED)
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start + len(BOXED) : i]
            i += 1
        start = text.rfind(BOXED, 0, start)
    return None


def exact_match(completion: str, answer: str) -> bool:
    """Whether the last boxed answer of `completion` equals `answer`, ignoring surrounding whitespace."""
    boxed = boxed_answer(completion)
    return boxed is not None and boxed.strip() == answer.strip()


class _Rejected(Exception):
    """The code is outside the accepted subset or a value left the interpreter's bounds."""


def _function_expr(text: str, entry_point: str) -> tuple[str, ast.expr]:
    """The argument name and return expression of a lone `def <entry_point>(x): return <expr>`."""
    fences = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    source = fences[-1] if fences else text
    try:
        module = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _Rejected("unparsable") from e
    if len(module.body) != 1 or not isinstance(fn := module.body[0], ast.FunctionDef):
        raise _Rejected("not a single function definition")
    a = fn.args
    if (
        fn.name != entry_point
        or fn.decorator_list
        or fn.returns is not None
        or a.posonlyargs
        or a.vararg
        or a.kwonlyargs
        or a.kwarg
        or a.defaults
        or len(a.args) != 1
        or a.args[0].annotation is not None
        or len(fn.body) != 1
        or not isinstance(fn.body[0], ast.Return)
        or fn.body[0].value is None
    ):
        raise _Rejected("not of the form def f(x): return <expr>")
    arg, expr = a.args[0].arg, fn.body[0].value
    _check(expr, arg)
    return arg, expr


_BINOPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


def _check(node: ast.expr, arg: str) -> None:
    """Reject any node outside: the argument, int constants, unary minus, + - * // %."""
    if isinstance(node, ast.Name) and node.id == arg:
        return
    if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= MAX_ABS:
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _check(node.operand, arg)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        _check(node.left, arg)
        return _check(node.right, arg)
    raise _Rejected(f"disallowed expression {type(node).__name__}")


def _evaluate(node: ast.expr, arg: str, x: int) -> int:
    """Value of a checked expression at `x`; raises _Rejected on division by zero or |value| > MAX_ABS."""
    if isinstance(node, ast.Name):
        value = x
    elif isinstance(node, ast.Constant):
        value = node.value
    elif isinstance(node, ast.UnaryOp):
        value = -_evaluate(node.operand, arg, x)
    else:
        left, right = _evaluate(node.left, arg, x), _evaluate(node.right, arg, x)
        if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
            raise _Rejected("division by zero")
        value = _BINOPS[type(node.op)](left, right)
    if abs(value) > MAX_ABS:
        raise _Rejected("value out of bounds")
    return value


def _int_literal(node: ast.expr) -> int | None:
    """The value of `5` or `-5` as an AST node, else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _int_literal(node.operand)
        return None if inner is None else -inner
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _parse_test(test: str, entry_point: str) -> tuple[int, int]:
    """(input, expected) of a trusted test string `assert f(<int>) == <int>`."""
    body = ast.parse(test).body
    if len(body) == 1 and isinstance(body[0], ast.Assert) and isinstance(cmp := body[0].test, ast.Compare):
        call = cmp.left
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == entry_point
            and len(call.args) == 1
            and not call.keywords
            and len(cmp.ops) == 1
            and isinstance(cmp.ops[0], ast.Eq)
        ):
            x, expected = _int_literal(call.args[0]), _int_literal(cmp.comparators[0])
            if x is not None and expected is not None:
                return x, expected
    raise ValueError(f"test {test!r} is not of the form 'assert {entry_point}(<int>) == <int>'")


def code_pass_rate(completion: str, tests: list[str], entry_point: str = "f") -> float:
    """Fraction of `tests` the completion's function passes, evaluated by an AST interpreter (never exec)."""
    cases = [_parse_test(t, entry_point) for t in tests]
    if not cases:
        raise ValueError("code_pass_rate: no tests given; every code problem needs at least one test")
    try:
        arg, expr = _function_expr(completion, entry_point)
    except (_Rejected, RecursionError):
        return 0.0
    passed = 0
    for x, expected in cases:
        try:
            passed += _evaluate(expr, arg, x) == expected
        except (_Rejected, RecursionError):
            pass
    return passed / len(cases)


@functools.lru_cache(maxsize=None)
def _reasoning_gym_scorer(name: str) -> Callable[[str | None, dict], float]:
    """The package's `score_answer(answer, entry)` for generator `name`."""
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


def score(task_name: str, completion: str, row: Mapping) -> float:
    """Reward in [0, 1] of `completion` for dataset row `row` of task `task_name`.

    `task_name` is "addition", "chain", "code", "facts" (the fraction of valid facts), "reasoning_gym" (the
    generator is `row["task"]`), or a reasoning-gym generator name.
    """
    if task_name in ("addition", "chain"):
        return float(exact_match(completion, row["answer"]))
    if task_name == "facts":
        return facts_validity(completion)
    if task_name == "code":
        return code_pass_rate(completion, list(row["tests"]), row.get("entry_point", "f"))
    from reasoning_gym.factory import DATASETS

    name = row["task"] if task_name == "reasoning_gym" else task_name
    if name not in DATASETS:
        raise ValueError(
            f"score: unknown task {task_name!r}; use 'addition', 'chain', 'code', 'reasoning_gym' "
            "or a reasoning_gym generator name"
        )
    boxed = boxed_answer(completion)
    if boxed is None:
        return 0.0
    entry = {"question": row["prompt"], "answer": row["answer"], "metadata": json.loads(row["metadata"])}
    return float(_reasoning_gym_scorer(name)(boxed.strip(), entry))
