"""Model sizes that follow from the table: `model.latent_dim: auto` and `model.hidden_dims: auto`.

    AUTO                                     the word `auto` in a config: chosen here when training starts
    auto_sizes(n_features, algorithm) -> (hidden_dims, latent_dim)
    auto_member_latents(n_features, ensemble) -> each ensemble member's code width
    resolve_model(model, n_features, algorithm) -> ModelSection with the autos replaced
    effective_batch_size(requested, rows_per_worker) -> the batch size, lowered on small tables
    auto_steps(steps, categorical) -> train.steps with `auto` resolved (more on inputs with categorical columns)
    step_budget(batch_size, rows_per_worker, epochs, steps, categorical) -> (batch size, epoch limit)
    large_table_epochs(per_epoch, steps) -> the epoch limit of a very large table under `epochs: auto`
    still_improving(history, epoch_limit, min_delta) -> a note when the epoch limit cut training short
    auto_validation_fraction(rows) / resolve_validation(data, rows) -> `data.validation_fraction: auto`

The rule (measured on ADBench's classical tables, `make eval`; see the README's Evaluation section): one
hidden layer about as wide as the input (4 to MAX_HIDDEN), and a code of about a quarter of the input width,
so a table of 2 features gets a 1-wide code and a 100-feature table a 25-wide one, capped at MAX_LATENT.
The other ensemble members' codes (an eighth and a half of the width, `auto_member_latents`) are capped at
MAX_MEMBER_LATENT instead: only the score reads them, so a wide table's ensemble can keep as many directions
as its input needs while the emitted `latent` stays at most MAX_LATENT wide. Wider or deeper networks
reconstruct the anomalies inside the training data as well as the normal rows, which flattens the ranking
(a fixed [64, 32] -> 8: cardio 0.69 against 0.85 with this rule, same probe). The table's row count sets the
training budget instead (`step_budget`). Explicit values always win (and are checked against the input's
width).

Imports nothing else of the pipeline: the config, the kinds and the models all use these rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, TypeVar

AUTO = "auto"  # a size chosen from the input's width and rows when training starts
AUTO_ENSEMBLE = 5  # model.ensemble: auto with backprop (recirculation trains one model)
MAX_LATENT = 32  # member 0's code, the emitted `latent`
MAX_MEMBER_LATENT = 256  # the other members' codes (the score reads them, no output does)
MAX_HIDDEN = 2 * MAX_MEMBER_LATENT  # wider than every member's code
AUTO_EPOCHS = 20  # train.epochs: auto on a table large enough for train.steps


def auto_latent(n_features: int, divisor: int = 4, cap: int = MAX_LATENT) -> int:
    """About a quarter (1/divisor) of the input width, at least 1, below the input width (undercomplete), at most
    `cap`."""
    return max(1, min(n_features - 1, math.ceil(n_features / divisor), cap))


def auto_hidden(n_features: int, latent: int) -> list[int]:
    """One hidden layer between the input and the code, about as wide as the input."""
    return [min(MAX_HIDDEN, max(2 * latent, 4, n_features - n_features % 2))]


MEMBER_DIVISORS = (8, 2)  # auto codes of members 1, 2, ...: an eighth and a half of the input width in turn


def auto_member_latents(n_features: int, ensemble: int) -> list[int]:
    """Code widths of `ensemble` members: member 0 the auto quarter of the input width (its code is `latent`),
    the others an eighth and a half in turn (4 members: d/4, d/8, d/2, d/8), each within the auto bounds.

    Measured (benchmarks/rank_probe.py, README Evaluation, fourth round): which code width ranks a table's
    anomalies best varies by table (pendigits prefers an eighth, 0.950 against 0.876 with a quarter; vowels
    and thyroid a half), and so does what each width misses; members that span the widths hedge across
    tables instead of betting on one (mean test AUROC of 5-member ensembles over the eight tables 0.860 with
    widths d/4, d/8, d/2, d/8, d/2 against 0.849 with every member at d/4).

    Member 0's code is capped at MAX_LATENT (32), the others' at MAX_MEMBER_LATENT (256), with the hidden layer
    up to MAX_HIDDEN (512): measured on the benchmark tables wider than 64 columns (benchmarks/rank_probe.py,
    two seeds; docs/evaluation.md, seventh round), 17_InternetAds (1,555 mostly binary columns) ranks 0.677
    (AP 0.382) against 0.611 (AP 0.268) when every code was capped at 32 and the hidden layer at 64, and
    24_mnist (100 columns) 0.837 against 0.835. No narrower table changes.
    """
    return [auto_latent(n_features)] + [auto_latent(n_features, MEMBER_DIVISORS[i % len(MEMBER_DIVISORS)],
                                                    MAX_MEMBER_LATENT) for i in range(ensemble - 1)]


def auto_sizes(n_features: int, algorithm: str = "backprop") -> tuple[list[int], int]:
    latent = auto_latent(n_features)
    if algorithm == "recirculation":  # one hidden layer: the code
        return [], latent
    return auto_hidden(n_features, latent), latent


def auto_ensemble(algorithm: str = "backprop") -> int:
    return 1 if algorithm == "recirculation" else AUTO_ENSEMBLE


Section = TypeVar("Section")


def resolve_model(model: Section, n_features: int, algorithm: str = "backprop") -> Section:
    """`model` (the config's model section) with `auto` sizes (and ensemble count) replaced by the rules above;
    explicit values are kept, and checked against the input's width (`check_features`). A one-column input
    gets a 1-wide code, as wide as the input: no code can be narrower, and the score's code terms (the
    code's distance from the validation codes) still rank the column's unusual values."""
    model.check_features(n_features)  # only what the config set: auto sizes fit by construction
    hidden, latent = auto_sizes(n_features, algorithm)
    ensemble = auto_ensemble(algorithm) if model.ensemble == AUTO else model.ensemble
    if model.member_latent_dims != AUTO:
        members = list(model.member_latent_dims)
    elif model.latent_dim == AUTO:
        members = auto_member_latents(n_features, ensemble)
    else:
        members = [model.latent_dim] * ensemble
    resolved = dataclasses.replace(
        model, ensemble=ensemble, latent_dim=members[0] if model.latent_dim == AUTO else model.latent_dim,
        hidden_dims=hidden if model.hidden_dims == AUTO else list(model.hidden_dims), member_latent_dims=members)
    return resolved


# ------------------------------------------------------------------------------------------ training budget


def effective_batch_size(requested: int, rows_per_worker: int, min_steps: int = 20, floor: int = 16) -> int:
    """The configured batch size, lowered on small data so each worker still takes `min_steps` steps."""
    if rows_per_worker <= 0:
        return requested
    return int(max(min(floor, requested), min(requested, rows_per_worker // min_steps)))


AUTO_STEPS = 2000  # train.steps: auto on a numeric-only input
AUTO_STEPS_CATEGORICAL = 4000  # ... and on an input with categorical columns


def auto_steps(steps: Any, categorical: bool = False) -> int:
    """train.steps with `auto` resolved: AUTO_STEPS, or AUTO_STEPS_CATEGORICAL when the input has categorical
    columns. A number is kept.

    Measured (docs/evaluation.md, seventh round): on the demo's mixed-type table (20,000 rows, 11 columns, 110
    input slots) 4000 steps rank the planted rows better than 2000 with two seeds (categorical-only AUROC 0.942
    -> 0.971 with seed 1; see the doc for seed 0), the rows only a categorical column gives away (a currency
    the row's country never pays in, a card swiped through a web form) most: the model learns the
    dependencies between the categorical columns' levels late. On the 26 numeric benchmark tables 4000 steps
    lose (mean AUROC 0.790 against 0.793, AP 0.448 against 0.458; sixth round), so numeric inputs keep 2000.
    """
    if steps != AUTO:
        return int(steps)
    return AUTO_STEPS_CATEGORICAL if categorical else AUTO_STEPS


LARGE_TABLE_STEPS = 10
"""With `epochs: auto`, a table so large that AUTO_EPOCHS epochs hold more than this many times train.steps gets
only the epochs that reach that many steps (at least one): 20,000 steps a worker for a numeric input. Twenty
passes over a billion rows are hours of training that a small autoencoder does not need. No table of `make
eval` is that large (20 epochs of its largest, 11_donors, hold about 7,600 steps), so its figures are the
same. Measured on 2,000,000 rows x 8 columns (2026-12-07, 2 cores, one worker, 12 to 28 s an epoch): 20
epochs reached a validation loss of 0.62930, epoch 12 (where the cap stops it) 0.63656: 1.2% higher after 12 of
the 20 epochs."""


def large_table_epochs(per_epoch: int, steps: int) -> Optional[int]:
    """The epoch limit LARGE_TABLE_STEPS sets on a table of `per_epoch` steps an epoch, where it is below
    AUTO_EPOCHS; else None (`steps` 0: no step budget, no cap)."""
    if steps <= 0:
        return None
    capped = max(1, math.ceil(LARGE_TABLE_STEPS * steps / per_epoch))
    return capped if capped < AUTO_EPOCHS else None


def step_budget(batch_size: int, rows_per_worker: int, epochs: Any, steps: Any,
                categorical: bool = False) -> tuple[int, int]:
    """(batch size, epoch limit) for a run: with `epochs: auto`, about `steps` optimizer steps per worker
    (`auto`: `auto_steps`, which depends on whether the input has categorical columns).

    Auto: the batch is lowered first (down to 16 rows) so that AUTO_EPOCHS epochs reach the steps; on a table
    too small for that, the epoch limit is raised. A large table keeps its batch size and AUTO_EPOCHS: its
    epochs already hold more steps than the budget; a very large one fewer epochs, down to one
    (`large_table_epochs`). An explicit epoch count is a hard limit, and the batch is only lowered to give each
    epoch 20 steps. Early stopping still ends a run sooner.
    """
    if epochs != AUTO:
        return effective_batch_size(batch_size, rows_per_worker), int(epochs)
    steps = auto_steps(steps, categorical)
    min_steps = max(20, math.ceil(steps / AUTO_EPOCHS))
    batch = effective_batch_size(batch_size, rows_per_worker, min_steps=min_steps)
    per_epoch = max(1, math.ceil(rows_per_worker / batch)) if rows_per_worker > 0 else 1
    return batch, large_table_epochs(per_epoch, steps) or max(AUTO_EPOCHS, math.ceil(steps / per_epoch))


# ------------------------------------------------------------------------------------------ validation share

VALIDATION_FRACTION = 0.1  # data.validation_fraction: auto on an input of VALIDATION_ROWS / 0.1 rows or more
VALIDATION_ROWS = 256  # ... on a smaller one, the share that holds out about this many rows
MAX_VALIDATION_FRACTION = 0.3  # ... up to this share


def auto_validation_fraction(rows: int) -> float:
    """`data.validation_fraction: auto` for an input of `rows` rows: VALIDATION_FRACTION, raised on an input
    under 2,560 rows so that about VALIDATION_ROWS rows are held out, up to MAX_VALIDATION_FRACTION (853 rows
    or fewer).

    The validation rows carry more than early stopping: the anomaly score's statistics (each column's mean
    error, the code's mean and variance, the 256 codes of the kNN term) and the threshold quantile come from
    them alone. At 10% a table of 200 rows has 20; the statistics are then noise, and so is the ranking, from
    one seed to the next. Measured (issue 24, tenth round, docs/evaluation.md; benchmarks/rank_probe.py,
    four seeds): on the 16 development tables this changes, mean AUROC +0.010 and AP +0.010 (7 better, 2
    worse: 18_Ionosphere +0.030, 45_wine +0.035, 15_Hepatitis +0.050; 6_cardio -0.013, 46_WPBC -0.015),
    +0.006 over all 26; on the 18 novelty tasks (trained on one class of a bundled scikit-learn table)
    +0.008, 6 better and none worse. Fewer rows train the model: on `--suite codes` the smallest table's codes
    probe a little lower (wine 0.976 against 1.000) and one of its retrains falls under model.align_min_r2.
    """
    if rows <= 0:
        return VALIDATION_FRACTION
    return min(MAX_VALIDATION_FRACTION, max(VALIDATION_FRACTION, VALIDATION_ROWS / rows))


def resolve_validation(data: Section, rows: int) -> Section:
    """The data section with `validation_fraction: auto` resolved for an input of `rows` rows (a number is
    kept)."""
    if data.validation_fraction != AUTO:
        return data
    return dataclasses.replace(data, validation_fraction=auto_validation_fraction(rows))


STILL_FALLING = 0.01
"""The last epoch's relative gain in validation loss above which a run cut by its epoch limit is worth a warning.
Early stopping counts any gain over `train.min_delta` (1e-4), but at under 1% an epoch more training buys
little, and with the default budget most runs end so: on eight tables fed with nothing but the input
(2026-12-07: categorical, boolean, heavy-tailed, hive-partitioned, integer, mostly-null, wide and 2 million
rows), six ran to the limit, four of them by 0.1% to 0.5% in the last epoch, and a warning on nearly every run
is one a user learns to skip."""


def still_improving(history: list[dict], epoch_limit: int, min_delta: float) -> Optional[str]:
    """A note when training ran to its epoch limit with the validation loss still falling, else None.

    "Still falling": the last epoch was the best, by more than `min_delta` and STILL_FALLING (relative) over
    every epoch before it: early stopping would have let the run go on, and the gain was worth going on for.
    """
    if len(history) < epoch_limit:
        return None
    tuned = [h for h in history if h.get("stage", "finetune") == "finetune"]  # stacked: pretraining apart
    if len(tuned) < 2 or tuned[-1].get("best_epoch") != tuned[-1]["epoch"]:
        return None
    before, last = min(h["val_loss"] for h in tuned[:-1]), tuned[-1]
    drop = (before - last["val_loss"]) / abs(before) if before else 0.0
    if not math.isfinite(drop) or drop <= max(min_delta, STILL_FALLING):
        return None
    return (f"validation loss still falling at the epoch limit ({before:.5f} -> {last['val_loss']:.5f}, "
            f"-{drop:.1%} in the last epoch, {epoch_limit} epochs): more training may help; raise "
            "train.epochs or train.steps")


FEW_VALIDATION_ROWS = 100
"""Under this many validation rows the threshold quantile is about their maximum and the score's statistics
are rough (`few_validation_rows`)."""


def few_validation_rows(rows: int, quantile: float) -> Optional[str]:
    """A note when the threshold and the score's statistics rest on fewer than FEW_VALIDATION_ROWS rows, else
    None. Of rows like the validation rows, about 1/(rows+1) score above the largest of them, so a threshold
    from 3 rows flags about a quarter of a like input whatever the quantile; the training rows, which the
    statistics do not see, flag more (an input of 10 rows x 3 columns: 6 flagged; 30 rows: 17)."""
    if rows >= FEW_VALIDATION_ROWS:
        return None
    return (f"only {rows} validation rows: the threshold (q{quantile}) and the score's statistics rest on them, "
            f"so {1 / (rows + 1):.0%} or more of the rows will be flagged; on an input this small read "
            "anomaly_score's ranking rather than is_anomaly")
