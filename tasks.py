"""The task suite: tasks with different kinds of uncertainty, each with its own tiny model of boe.py's class.

  marks      boe.py's built-in task. Many answers are valid, and the decisive token (the pivot) is a free
             choice among them: its uncertainty is aleatoric.
  sudoku     4x4 Sudoku with 10 of 16 cells to fill and a unique solution (as in the masked-diffusion
             reasoning literature, e.g. Ye et al., arXiv 2410.14157), on grids held out of training. The
             uncertainty of an open cell is the model's own: one answer is right, and the model may not
             work it out in one forward.
  countdown  Countdown with three numbers (Ye et al.'s CD3, made small): reach the target with + and -,
             each number once, evaluated left to right. Usually several answers are valid, and the model
             must also get the arithmetic right on prompts it never saw.
  latin      (held out of tuning) 4x4 Latin square completion, the quasigroup completion problem, with 12
             of 16 cells empty: about 6 valid completions a puzzle, and every cell constrains its row and
             column. Added after BoE's defaults were chosen; the grid search never saw it.

Each task gives prompts and one answer per instance, a batch maker for training, a checker that accepts
every valid answer, and `solutions(prompt)`, every valid answer by brute force (for the tests and for
asking whether a partly decoded row can still be completed). Tuning instances come from seed 0,
evaluation instances from seed 1; Sudoku and Countdown keep every instance that evaluation can draw out
of training (held-out grids; held-out prompts), and Countdown's tuning prompts are the other half of its
held-out prompts (seed 0 draws from that half, every other seed from the evaluation half).
"""
import functools
import itertools
from dataclasses import dataclass
from typing import Callable

import torch

import boe


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                      # where the decisive uncertainty lies, in a few words
    model_cfg: boe.ModelConfig     # the task's vocabulary, [MASK] id and length; boe.py's model sizes
    make_instances: Callable       # (n, seed) -> prompts, one valid answer each; [n, L] both, int64
    training_batch: Callable       # (n, seed) -> prompts, answers: what training masks and predicts
    check: Callable                # (prompts, tokens) -> bool [n]: a valid answer to the prompt
    solutions: Callable            # (prompt [L]) -> every valid answer [S, L]
    chars: str                     # one character per token id, for printing
    steps: tuple                   # fixed-schedule budgets worth comparing (the last: one reveal a step)
    train_steps: int = boe.TrainConfig.steps  # training steps (where not the default, the task says why)


def completions(task, prompts, tokens):
    """long [n]: how many valid answers to each prompt agree with every revealed position of `tokens` (a partly
    decoded row; [MASK] agrees with anything)."""
    mask = task.model_cfg.mask_id
    return torch.tensor([int(((sols == row) | (row == mask)).all(1).sum())
                         for sols, row in ((task.solutions(p), r) for p, r in zip(prompts, tokens))], dtype=torch.long)


def completable(task, prompts, tokens):
    """bool [n]: whether a valid answer agrees with every revealed position of `tokens`."""
    return completions(task, prompts, tokens) > 0


# -----------------------------------------------------------------------------
# marks: boe.py's built-in task

def marks_solutions(prompt):
    cells = prompt[: boe.N_CELLS]  # [N]
    answers = []
    for cell in torch.nonzero(cells == boe.OPEN).flatten().tolist():
        marks = torch.full((boe.N_CELLS,), boe.UNMARKED)  # [N]
        marks[cell] = boe.MARKED
        answers.append(torch.cat([prompt[: boe.PROMPT_LEN], marks, torch.tensor([cell])]))
    return torch.stack(answers)  # [S, L]


MARKS = Task("marks", "aleatoric: the pivot is a free choice", boe.ModelConfig(), boe.make_instances,
             boe.make_instances, lambda prompts, tokens: boe.check(tokens) & (tokens[:, : boe.PROMPT_LEN] ==
                                                                              prompts[:, : boe.PROMPT_LEN]).all(1),
             marks_solutions, boe.TOKEN_CHARS, (2, 3, 5, 9))


# -----------------------------------------------------------------------------
# sudoku: 4x4, digits 1-4 (ids 0-3), [MASK] = 4; rows, columns and 2x2 boxes hold each digit once.
#
# There are only 288 grids, and a model trained on all of them learns them by heart: it then solves every
# puzzle in one forward, and the order of reveals cannot matter. So a quarter of the grids is held out of
# training, and every puzzle is cut from a held-out grid: the model must solve grids it has never seen,
# with what it has learnt of the rules. It is trained for 3000 steps, not to convergence: trained as
# long as the other tasks (10000 steps) it learns the rules well enough to solve 99 % of held-out
# puzzles in two forwards, with 10 holes or with 12, and no order of reveals can matter. Stopped early,
# its uncertainty is its own ignorance of the rules, which is what this task is for. (A 6x6 Sudoku,
# with millions of grids, is beyond a model of this size: trained for 3000 steps it solves none.)

SUDOKU_MASK = 4
SUDOKU_HOLES = 10
UNITS = torch.tensor([[4 * r + c for c in range(4)] for r in range(4)] + [[4 * r + c for r in range(4)] for c in range(4)]
                     + [[4 * (br + r) + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)])


def grid_valid(grids, units):
    """bool [n]: each unit (cells [U, 4]: rows, columns, boxes) of each [n, 16] grid holds the digits 0..3 once."""
    return (grids[:, units].sort(-1).values == torch.arange(4)).all(-1).all(-1)  # [n]


def sudoku_valid(grids):
    return grid_valid(grids, UNITS)  # [n]


def all_grids(valid):
    """Every 4x4 grid whose four rows are permutations and which `valid` accepts, [N, 16]."""
    rows = torch.tensor(list(itertools.permutations(range(4))))  # [24, 4]
    boards = torch.cartesian_prod(*[torch.arange(24)] * 4)  # [24^4, 4] four row choices
    full = rows[boards].reshape(-1, 16)  # [331776, 16]
    return full[valid(full)]


GRIDS = all_grids(sudoku_valid)  # [288, 16]
HELD_OUT = torch.randperm(len(GRIDS), generator=torch.Generator().manual_seed(2026))[: len(GRIDS) // 4]  # [72]
TRAIN_GRIDS = GRIDS[~torch.isin(torch.arange(len(GRIDS)), HELD_OUT)]  # [216, 16]


def grid_solutions(grids, prompt):
    """The grids that agree with every given cell of `prompt` [16]: [S, 16]."""
    given = prompt != SUDOKU_MASK  # [16]
    return grids[(grids[:, given] == prompt[given]).all(1)]  # [S, 16]


def sudoku_solutions(prompt):
    return grid_solutions(GRIDS, prompt)  # [S, 16]


def sudoku_instances(n, seed):
    """n puzzles with SUDOKU_HOLES holes and a unique solution, cut from held-out grids: the cells of a grid
    are emptied in a random order, skipping a cell whose removal would allow a second solution."""
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = [], []
    while len(prompts) < n:
        grid = GRIDS[HELD_OUT[torch.randint(len(HELD_OUT), (1,), generator=gen)]][0]  # [16]
        puzzle = grid.clone()  # [16]
        for cell in torch.randperm(16, generator=gen).tolist():
            trial = puzzle.clone()
            trial[cell] = SUDOKU_MASK
            if len(sudoku_solutions(trial)) == 1:
                puzzle = trial
            if (puzzle == SUDOKU_MASK).sum() == SUDOKU_HOLES:
                prompts.append(puzzle)
                answers.append(grid)
                break
    return torch.stack(prompts), torch.stack(answers)  # [n, 16] each


def grid_training_batch(grids, n, seed):
    """n of `grids`, whole, every cell an answer position: training masks a random fraction of them."""
    chosen = grids[torch.randint(len(grids), (n,), generator=torch.Generator().manual_seed(seed))]  # [n, 16]
    return torch.full_like(chosen, SUDOKU_MASK), chosen


def grid_check(valid, prompts, tokens):
    """bool [n]: `valid` accepts the grid, and it keeps every given cell of its prompt."""
    given = prompts != SUDOKU_MASK  # [n, 16]
    return valid(tokens) & ((tokens == prompts) | ~given).all(1)  # [n]


SUDOKU = Task("sudoku", "epistemic: one solution, on a grid the model never saw",
              boe.ModelConfig(vocab_size=5, mask_id=SUDOKU_MASK, seq_len=16), sudoku_instances,
              functools.partial(grid_training_batch, TRAIN_GRIDS), functools.partial(grid_check, sudoku_valid),
              sudoku_solutions, "1234_", (2, 3, 5, 10), train_steps=3000)


# -----------------------------------------------------------------------------
# countdown: prompt "a b c = t", answer "x op y op z" with (x op y) op z = t, {x, y, z} = {a, b, c}
#
# Token ids: 0..8 the numbers 1..9, 9 and 10 the operations + and -, 11 '=', then the targets 0..27 (every
# value a + b + c can take), then [MASK]. Layout: a b c = t | x op y op z  (5 prompt positions, 5 to fill).
# Multiplication is left out: with it, a model of this size fails most held-out prompts at any order.

CD_NUMBERS = 9
CD_PLUS, CD_MINUS, CD_EQUALS = 9, 10, 11
CD_TARGETS = 3 * CD_NUMBERS + 1
CD_TARGET0 = 12
CD_MASK = CD_TARGET0 + CD_TARGETS  # 40
CD_PROMPT_LEN, CD_LEN = 5, 10
OPERATIONS = {CD_PLUS: lambda a, b: a + b, CD_MINUS: lambda a, b: a - b}


def countdown_value(x, op1, y, op2, z):
    """(x op1 y) op2 z for number tokens x, y, z (values token + 1) and operation tokens."""
    return OPERATIONS[op2](OPERATIONS[op1](x + 1, y + 1), z + 1)


def countdown_expressions(numbers):
    """Every answer over the three number tokens: (answer tokens [5], value), 6 orders x 4 operations."""
    return [((x, op1, y, op2, z), countdown_value(x, op1, y, op2, z))
            for x, y, z in set(itertools.permutations(numbers)) for op1 in OPERATIONS for op2 in OPERATIONS]


def countdown_held_out(numbers, target):
    """A fifth of the prompts, by a fixed rule on the number multiset and target, never reach training."""
    a, b, c = sorted(numbers)
    return (a * 131 + b * 31 + c * 7 + target * 17) % 5 == 0


# The held-out fifth, split once more: half of its (number multiset, target) pairs, drawn at random with a
# fixed seed, are for tuning, the other half for evaluation, so that no knob is chosen on an evaluation prompt.
CD_HELD_OUT_KEYS = sorted({(tuple(sorted(numbers)), value) for numbers in itertools.product(range(CD_NUMBERS), repeat=3)
                           for _, value in countdown_expressions(numbers)
                           if 0 <= value < CD_TARGETS and countdown_held_out(numbers, value)})
CD_TUNING_KEYS = {CD_HELD_OUT_KEYS[i] for i in torch.randperm(len(CD_HELD_OUT_KEYS),
                                                               generator=torch.Generator().manual_seed(2026))
                  [: len(CD_HELD_OUT_KEYS) // 2].tolist()}


def countdown_pool(numbers, target):
    """Which prompts a prompt is among: "train" (four fifths), "tune" or "eval" (half the held-out fifth each)."""
    if not countdown_held_out(numbers, target):
        return "train"
    return "tune" if (tuple(sorted(numbers)), target) in CD_TUNING_KEYS else "eval"


def countdown_draw(n, seed, pool):
    """n prompts and one answer each: three numbers, then a random expression over them whose value is a
    target in [0, CD_TARGETS); only prompts of `pool` (countdown_pool)."""
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = [], []
    while len(prompts) < n:
        numbers = (torch.randint(CD_NUMBERS, (3,), generator=gen)).tolist()
        expression = [numbers[i] for i in torch.randperm(3, generator=gen).tolist()]
        ops = [list(OPERATIONS)[i] for i in torch.randint(len(OPERATIONS), (2,), generator=gen).tolist()]
        value = countdown_value(expression[0], ops[0], expression[1], ops[1], expression[2])
        if not 0 <= value < CD_TARGETS or countdown_pool(numbers, value) != pool:
            continue
        prompt = numbers + [CD_EQUALS, CD_TARGET0 + value]
        prompts.append(prompt + [CD_MASK] * 5)
        answers.append(prompt + [expression[0], ops[0], expression[1], ops[1], expression[2]])
    return torch.tensor(prompts), torch.tensor(answers)  # [n, 10] each


def countdown_solutions(prompt):
    numbers, target = prompt[:3].tolist(), int(prompt[4]) - CD_TARGET0
    valid = sorted(tokens for tokens, value in countdown_expressions(numbers) if value == target)
    return torch.tensor([prompt[:CD_PROMPT_LEN].tolist() + list(tokens) for tokens in valid]).reshape(-1, CD_LEN)


def countdown_check(prompts, tokens):
    ok = []
    for prompt, row in zip(prompts.tolist(), tokens.tolist()):
        x, op1, y, op2, z = row[CD_PROMPT_LEN:]
        numbers_ok = all(t < CD_NUMBERS for t in (x, y, z)) and sorted((x, y, z)) == sorted(prompt[:3])
        ops_ok = op1 in OPERATIONS and op2 in OPERATIONS
        ok.append(row[:CD_PROMPT_LEN] == prompt[:CD_PROMPT_LEN] and numbers_ok and ops_ok
                  and countdown_value(x, op1, y, op2, z) == prompt[4] - CD_TARGET0)
    return torch.tensor(ok, dtype=torch.bool)


COUNTDOWN = Task("countdown", "mixed: several valid answers, and arithmetic to get right",
                 boe.ModelConfig(vocab_size=CD_MASK + 1, mask_id=CD_MASK, seq_len=CD_LEN),
                 lambda n, seed: countdown_draw(n, seed, "tune" if seed == 0 else "eval"),
                 lambda n, seed: countdown_draw(n, seed, "train"),
                 countdown_check, countdown_solutions,
                 "123456789+-=" + "".join(chr(ord("A") + i) if i < 26 else chr(ord("a") + i - 26)
                                           for i in range(CD_TARGETS)) + "_",
                 (2, 3, 5))

TASKS = {task.name: task for task in (MARKS, SUDOKU, COUNTDOWN)}  # every study's, the grid search's included


# -----------------------------------------------------------------------------
# latin: complete a 4x4 Latin square (the quasigroup completion problem), symbols 1-4 (ids 0-3), [MASK] = 4
#
# A held-out task: it joined the suite after BoE's defaults were chosen, and no tuning run has seen it.
# Rows and columns hold each symbol once; 12 of the 16 cells are empty, so a puzzle has about 6 valid
# completions (2 % have one). The model is trained on whole squares, all 576 of them, as the built-in
# task's model sees every prompt: it knows the squares, and what is left is a free choice among the
# completions, with every cell constraining its row and column. Cells committed together from their
# marginals can clash.

LATIN_MASK = SUDOKU_MASK  # the grid tasks share their tokens
LATIN_HOLES = 12


def latin_valid(grids):
    return grid_valid(grids, UNITS[:8])  # [n] rows and columns, no boxes


SQUARES = all_grids(latin_valid)  # [576, 16]


def latin_solutions(prompt):
    return grid_solutions(SQUARES, prompt)  # [S, 16]


def latin_instances(n, seed):
    """n puzzles: a random square with LATIN_HOLES random cells emptied, and the square as one answer."""
    gen = torch.Generator().manual_seed(seed)
    answers = SQUARES[torch.randint(len(SQUARES), (n,), generator=gen)]  # [n, 16]
    holes = torch.rand(n, 16, generator=gen).argsort(1) < LATIN_HOLES  # [n, 16] a random set of cells
    return answers.masked_fill(holes, LATIN_MASK), answers


LATIN = Task("latin", "aleatoric: several completions, each cell constrains its row and column",
             boe.ModelConfig(vocab_size=5, mask_id=LATIN_MASK, seq_len=16), latin_instances,
             functools.partial(grid_training_batch, SQUARES), functools.partial(grid_check, latin_valid),
             latin_solutions, "1234_", (2, 3, 5, LATIN_HOLES))
HELD_OUT_TASKS = {LATIN.name: LATIN}  # in the suite only, never in a tuning run
ALL_TASKS = TASKS | HELD_OUT_TASKS
