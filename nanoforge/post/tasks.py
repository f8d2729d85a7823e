"""Verifiable tasks for GRPO and the SFT warm start: unlimited problems from a seed, a held-out set, a checker.

    task = get_task("arithmetic", digits=3)            # or get_task("countdown")
    problem = task.sample(random.Random(0))            # Problem(prompt="What is 47 + 85?", answer="132", …)
    task.demonstration(problem)                        # '<think>7+5=12, 4+8+1=13</think><answer>132</answer>'
    task.score("<think>…</think><answer>132</answer>", problem)   # {"correct": 1.0, "format": 1.0}

Every problem belongs to exactly one split, decided by a hash of its prompt: about `heldout_fraction` of
all problems are held out, `sample`/`problems` never return them and `heldout(n)` returns only them, so
held-out accuracy measures generalisation, not recall. A user adds a task with one class:

    @register_task("parity")
    @dataclass(frozen=True)
    class Parity(Task):
        def draw(self, rng): n = rng.randrange(1000); return Problem(f"Is {n} even?", "yes" if n % 2 == 0 else "no")
        def demonstration(self, p): return f"<think>last digit</think><answer>{p.answer}</answer>"
        def check(self, answer, p): return float(answer == p.answer)

    nanoforge grpo --model sft/ --task parity --out grpo/
"""

from __future__ import annotations

import ast
import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from nanoforge.config import build
from nanoforge.errors import NanoforgeError
from nanoforge.post.rewards import extract_answer, format_reward, parse_integer

HELDOUT_SEED = 0x5EED  # the held-out set is always drawn from this stream (and filtered by the split hash)


@dataclass(frozen=True)
class Problem:
    """One problem: the user message, the reference answer and task data (e.g. countdown's target and numbers)."""

    prompt: str
    answer: str
    data: tuple[int, ...] = ()


@dataclass(frozen=True)
class Task:
    """A problem generator with a rule-based checker; subclasses implement `draw`, `demonstration`, `check`."""

    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.heldout_fraction < 1:
            raise NanoforgeError(f"{type(self).__name__}: heldout_fraction must be in [0, 1), "
                                 f"got {self.heldout_fraction}")

    def draw(self, rng: random.Random) -> Problem:
        """One problem from either split."""
        raise NotImplementedError

    def demonstration(self, problem: Problem) -> str:
        """An ideal assistant reply in the R1 template: short worked steps, then the answer."""
        raise NotImplementedError

    def check(self, answer: str | None, problem: Problem) -> float:
        """1.0 when the extracted answer (None when the reply has none) solves the problem, else 0.0."""
        raise NotImplementedError

    def is_heldout(self, problem: Problem) -> bool:
        """Whether the problem belongs to the held-out split (a stable hash of its prompt)."""
        digest = hashlib.sha256(problem.prompt.encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.heldout_fraction

    def sample(self, rng: random.Random) -> Problem:
        """One training problem (never a held-out one)."""
        for _ in range(10_000):
            problem = self.draw(rng)
            if not self.is_heldout(problem):
                return problem
        raise NanoforgeError(f"{type(self).__name__}: no training problem found; lower heldout_fraction")

    def problems(self, seed: int, n: int) -> list[Problem]:
        """The training stream: the first n problems drawn from `seed` (repeats possible in small spaces)."""
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    def heldout(self, n: int) -> list[Problem]:
        """A fixed set of n distinct held-out problems, the same on every call and machine."""
        rng, seen, out = random.Random(HELDOUT_SEED), set(), []
        for _ in range(200 * n + 10_000):
            if len(out) == n:
                break
            problem = self.draw(rng)
            if problem.prompt not in seen and self.is_heldout(problem):
                seen.add(problem.prompt)
                out.append(problem)
        if len(out) < n:
            raise NanoforgeError(f"{type(self).__name__}: only {len(out)} distinct held-out problems exist, "
                                 f"asked for {n}; ask for fewer or widen the task (e.g. more digits)")
        return out

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        """Reward components of a completion: `correct` (the checker on the <answer>) and `format` (R1 template)."""
        return {"correct": float(self.check(extract_answer(completion), problem)),
                "format": format_reward(completion)}


TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator that makes a task available to `get_task(name)` and `nanoforge grpo --task name`."""
    def add(cls: type[Task]) -> type[Task]:
        TASKS[name] = cls
        return cls
    return add


def get_task(name: str, **options: object) -> Task:
    """The task called `name`, built with its options (e.g. `get_task("arithmetic", digits=3)`); option values
    given as strings (`--task-option digits=3`) are converted to the option's type."""
    if name not in TASKS:
        raise NanoforgeError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    return build(TASKS[name], dict(options), f"task {name}")


def _digits(rng: random.Random, max_digits: int) -> int:
    """A number whose length is uniform in 1..max_digits, so short numbers are not drowned out."""
    d = rng.randint(1, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


@register_task("arithmetic")
@dataclass(frozen=True)
class Arithmetic(Task):
    """`What is 47 + 85?`: + and − of numbers with up to `digits` digits, × by a number of up to `mul_digits`."""

    digits: int = 2
    mul_digits: int = 1
    ops: str = "+-*"
    negative: bool = False  # allow a − b < 0; by default the larger number comes first

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ops or set(self.ops) - set("+-*") or self.digits < 1 or self.mul_digits < 1:
            raise NanoforgeError(f"arithmetic: bad options digits={self.digits} mul_digits={self.mul_digits} "
                                 f"ops={self.ops!r} (ops is a subset of '+-*', digits ≥ 1)")

    def draw(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        a = _digits(rng, self.digits)
        b = _digits(rng, self.mul_digits if op == "*" else self.digits)
        if op == "-" and a < b and not self.negative:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return Problem(f"What is {a} {op} {b}?", str(value), (a, ord(op), b))

    def demonstration(self, problem: Problem) -> str:
        a, op, b = problem.data
        steps = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}[chr(op)](a, b)
        return f"<think>{steps}</think><answer>{problem.answer}</answer>"

    def check(self, answer: str | None, problem: Problem) -> float:
        return float(parse_integer(answer) == int(problem.answer))


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    """Digit pairs of a and b from the ones column up."""
    width = max(len(str(a)), len(str(b)))
    return [(a // 10**i % 10, b // 10**i % 10) for i in range(width)]


def _add_steps(a: int, b: int) -> str:
    """Column addition: `7+5=12, 4+8+1=13`."""
    steps, carry = [], 0
    for x, y in _columns(a, b):
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return ", ".join(steps)


def _sub_steps(a: int, b: int) -> str:
    """Column subtraction with borrows (`13-8=5, 8-2=6`); a negative result is b − a, negated."""
    if a < b:
        return f"{b}-{a}: " + _sub_steps(b, a) + ", negate"
    steps, borrow = [], 0
    for x, y in _columns(a, b):
        x -= borrow
        borrow = int(x < y)
        steps.append(f"{x + 10 * borrow}-{y}={x + 10 * borrow - y}")
    return ", ".join(steps)


def _mul_steps(a: int, b: int) -> str:
    """Digit-by-digit when b has one digit (`7*6=42, 5*6+4=34`), else partial products and their sum."""
    if b >= 10:
        parts = [(a, d * 10**i) for i, d in enumerate(map(int, reversed(str(b)))) if d]
        sums = "+".join(str(x * y) for x, y in parts) or "0"
        return ", ".join(f"{x}*{y}={x * y}" for x, y in parts) + f", {sums}={a * b}"
    steps, carry = [], 0
    for x in map(int, reversed(str(a))):
        s = x * b + carry
        steps.append(f"{x}*{b}{f'+{carry}' if carry else ''}={s}")
        carry = s // 10
    return ", ".join(steps)


@register_task("countdown")
@dataclass(frozen=True)
class Countdown(Task):
    """`Using the numbers 3, 5, 2, make 16`: an expression of + − × ÷ using each given number at most once."""

    count: int = 3
    max_number: int = 20
    max_target: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.count < 2 or self.max_number < 2 or self.max_target < 1:
            raise NanoforgeError(f"countdown: bad options count={self.count} max_number={self.max_number} "
                                 f"max_target={self.max_target} (count ≥ 2, max_number ≥ 2, max_target ≥ 1)")

    def draw(self, rng: random.Random) -> Problem:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            expr, value = str(numbers[0]), numbers[0]
            for n in numbers[1:]:
                op = rng.choice("+-*/")
                if op == "/" and (value % n or n == 1):
                    op = "+"
                value = value + n if op == "+" else value - n if op == "-" else value * n if op == "*" else value // n
                expr = f"({expr}{op}{n})"
            if 0 < value <= self.max_target:
                break
        shown = sorted(numbers)
        return Problem(f"Using the numbers {', '.join(map(str, shown))}, make {value}.", expr[1:-1], (value, *shown))

    def demonstration(self, problem: Problem) -> str:
        steps: list[str] = []
        _evaluate(problem.answer, [], steps)
        return f"<think>{', '.join(steps)}</think><answer>{problem.answer}</answer>"

    def check(self, answer: str | None, problem: Problem) -> float:
        target, numbers = problem.data[0], problem.data[1:]
        used: list[int] = []
        value = _evaluate(answer, used) if answer is not None and len(answer) <= 100 else None
        return float(value == target and not Counter(used) - Counter(numbers))


_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
    ast.Div: lambda x, y: x / y,
}
_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _evaluate(text: str, used: list[int], steps: list[str] | None = None) -> Fraction | None:
    """Exact value of an expression of integers, + − × ÷ and parentheses (None for anything else). The
    integers it uses go to `used`, each operation as `13*14=182` to `steps`. Never evals: it walks Python's
    parse tree of the text."""
    try:
        tree = ast.parse(text.strip().replace("×", "*").replace("÷", "/"), mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None

    def walk(node: ast.AST) -> Fraction | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
                return None
            value = _OPS[type(node.op)](left, right)
            if steps is not None:
                steps.append(f"{left}{_SYMBOLS[type(node.op)]}{right}={value}")
            return value
        return None

    return walk(tree)
