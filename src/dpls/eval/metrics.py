"""Every evaluation metric (docs/reference.md, section 6), in one streaming accumulator.

`MetricAccumulator.update(logits, targets)` folds a batch of token predictions into a
fixed-size state; `compute()` turns the state into the metrics. The state does not grow
with the number of tokens, so the same object serves the trainer's periodic validation
and a full `dpls eval`, on any device, and ranks can sum their states (`reduce_`).

Per token (logits ``z``, ``d = z − max z``, ``p = softmax(z)``, target ``y``) the state
holds sums of:

* cross-entropy ``lse(z) − z_y`` and predictive entropy ``H(p) = lse(d) − Σ p·d``;
* entropy of the top-k renormalised distribution for k = 10, 100, 1000 (clipped to V);
* top-1 correctness, and the Brier score ``Σ_j (p_j − 1[j=y])² = 1 − 2·p_y + Σ_j p_j²``
  (no dense one-hot is formed);
* per-bin count / confidence / correctness for 15 equal-width bins of the top-1
  confidence (ECE, reliability diagram) and for a fine histogram of ``fine_bins``
  equal-width bins (adaptive ECE, see below);
* a fixed-bin histogram of the entropy over ``[0, log V]`` (for the entropy plot);
* for each temperature ``T`` of a fixed grid, the summed temperature-scaled
  cross-entropy ``f(β) = lse(β·z) − β·z_y`` at ``β = 1/T`` *and its first two
  derivatives* ``f'(β) = E_β[z] − z_y`` and ``f''(β) = Var_β[z]`` (moments under
  ``softmax(β·z)``; they cost little beyond the one ``exp`` per logit that ``f`` needs),
  and the fine histogram of that temperature's top-1 confidence ``1 / Σ_j exp(β·d_j)``
  (count and correct per bin: selective prediction after temperature scaling);
* with ``token_bytes`` (bytes of text per token id): the bytes of the targets and the CE of
  the targets that have bytes (bits per byte);
* with ``frequency_bins`` (a bin per token id, by its training-set frequency): count, CE
  and correctness per bin of the target.

**Selective prediction** (accept the tokens whose top-1 confidence is highest, abstain on the
rest): ``aurc`` is the area under the risk–coverage curve (Geifman & El-Yaniv 2017; Geifman et
al. 2019), ``(1/N)·Σ_{k=1..N} errors among the k most confident / k``, lower is better;
``auroc`` is the probability that a correct token has a higher confidence than an incorrect
one (ties count ½), the misclassification-detection AUROC of Hendrycks & Gimpel (2017).
Both come from the fine confidence histogram: tokens in one fine bin (confidences within
``1/fine_bins``) count as ties, accepted in random order (for ``aurc`` its expected value,
``Σ_{j=1..m} (E + e·j/m)/(A + j)`` for a bin of ``m`` tokens with ``e`` errors after ``A``
accepted tokens with ``E`` errors, summed in closed form with the digamma function). After
temperature scaling they are those of the grid temperatures' histograms, interpolated
linearly in ``β`` to the best temperature.

**Temperature scaling** without a second pass: ``f`` is convex in the inverse
temperature ``β`` (``lse`` of a linear function is convex), so the minimiser lies in
the one grid interval where the summed derivative changes sign. On that interval the
value, slope and curvature at both ends define a quintic Hermite interpolant, whose
minimum gives ``best_temperature`` and ``loss_at_best_temperature`` (interpolation
error O(h⁶): with the default 17-point grid over T ∈ [0.1, 10] the temperature is
within ~1e-4 relative and the loss within ~1e-5 nats of a dense float64 search, see
the tests). A minimiser outside the grid is clipped to its end.

**Adaptive (equal-mass) ECE** without keeping every confidence: the 15 equal-mass bins
are cut from the fine confidence histogram at the exact token quantiles. A fine bin
straddling a cut is shared in proportion to its count (its tokens have confidences
within ``1/fine_bins`` of each other, so this is a random tie-break in expectation).
The result differs from sorting all tokens by at most the mass of the 14 straddling
fine bins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

# The metric keys of metrics.json that every evaluation computes and the study reports compare,
# in the order it lists them (docs/reference.md, section 6).
METRIC_KEYS: tuple[str, ...] = (
    "loss",
    "ppl",
    "entropy",
    "entropy_top10",
    "entropy_top100",
    "entropy_top1000",
    "top1_acc",
    "ece",
    "ece_adaptive",
    "brier",
    "best_temperature",
    "loss_at_best_temperature",
    "tokens",
)
# metrics.json also holds these, after METRIC_KEYS: selective prediction by the top-1
# confidence, raw and after temperature scaling; bits per byte (None without the tokens'
# bytes); CE and accuracy by the target's training-set frequency (None without the bins).
EXTRA_METRIC_KEYS: tuple[str, ...] = (
    "aurc",
    "auroc",
    "aurc_at_best_temperature",
    "auroc_at_best_temperature",
    "bits_per_byte",
    "ce_by_frequency",
)

TOPK_ENTROPIES: tuple[int, ...] = (10, 100, 1000)

# Log-spaced T ∈ [0.1, 10], ratio 10^(1/8) ≈ 1.33 between neighbours; T = 1 is on the grid.
DEFAULT_TEMPERATURES: tuple[float, ...] = tuple(float(t) for t in np.logspace(-1.0, 1.0, 17))

# Logits of -inf (masked vocabulary entries) are clamped to this offset below the row
# maximum: probability exactly 0 in float32, and 0·d stays 0 instead of NaN.
_MIN_OFFSET = -1.0e4

# Indices into the vector of scalar sums.
_N, _CE, _ENT, _CORRECT, _BRIER = range(5)
_TOPK0 = 5
_N_SCALARS = _TOPK0 + len(TOPK_ENTROPIES)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin data of a reliability diagram: bin ``i`` covers ``[lower[i], upper[i]]``.

    ``confidence`` and ``accuracy`` are the bin's mean top-1 confidence and accuracy
    (NaN for an empty bin); ``count`` is its number of tokens (fractional for adaptive
    bins cut inside a fine histogram bin).
    """

    lower: list[float]
    upper: list[float]
    count: list[float]
    confidence: list[float]
    accuracy: list[float]

    def to_dict(self) -> dict[str, list[float]]:
        return asdict(self)


@dataclass(frozen=True)
class FrequencyBins:
    """Token ids grouped by how often they occur in the training set (`frequency_bins`).

    ``bin_of[i]`` is the bin of id ``i``; bin 0 holds the most frequent ids. Per bin:
    ``types`` (ids in it), ``train_share`` (its share of the training tokens) and the range
    of its ids' training frequencies (occurrences per training token).
    """

    bin_of: np.ndarray  # [V] int64
    types: list[int]
    train_share: list[float]
    frequency_min: list[float | None]
    frequency_max: list[float | None]

    def describe(self, b: int) -> dict[str, Any]:
        return {
            "bin": b,
            "train_frequency_min": self.frequency_min[b],
            "train_frequency_max": self.frequency_max[b],
            "train_share": self.train_share[b],
            "types": self.types[b],
        }


def frequency_bins(counts: np.ndarray | Sequence[int], n_bins: int = 10) -> FrequencyBins:
    """Quantile bins of training-token mass (deciles by default), deterministic.

    Ids are ranked by their training count (most frequent first, ties by id) and id ``i``
    goes to bin ``⌊n_bins·C_i / N⌋``, where ``C_i`` counts the training tokens of the ids
    ranked before it and ``N`` all of them: each bin covers about ``1/n_bins`` of the
    training tokens (an id is never split, so one very frequent id can leave the bin after
    it empty). Ids never seen in training fall in the last (rarest) bin.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size == 0 or bool((counts < 0).any()):
        raise ValueError("counts must be a non-empty 1-D array of non-negative token counts")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no training tokens were counted: frequency bins need the training split")
    order = np.argsort(-counts, kind="stable")
    ranked = counts[order]
    before = np.cumsum(ranked) - ranked
    ranked_bin = np.minimum(before * n_bins // total, n_bins - 1)
    bin_of = np.empty_like(order)
    bin_of[order] = ranked_bin
    freq = ranked / total
    lo, hi = [], []
    for b in range(n_bins):
        inside = freq[ranked_bin == b]
        lo.append(float(inside.min()) if inside.size else None)
        hi.append(float(inside.max()) if inside.size else None)
    return FrequencyBins(
        bin_of=bin_of,
        types=np.bincount(ranked_bin, minlength=n_bins).tolist(),
        train_share=(np.bincount(ranked_bin, weights=ranked, minlength=n_bins) / total).tolist(),
        frequency_min=lo,
        frequency_max=hi,
    )


def selective_metrics(count: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """``(aurc, auroc)`` of a confidence histogram (bins in ascending confidence; ``count`` and
    ``correct`` tokens per bin), the tokens of a bin counting as ties (module docstring)."""
    count, correct = np.asarray(count, np.float64), np.asarray(correct, np.float64)
    wrong = count - correct
    n, n_right, n_wrong = count.sum(), correct.sum(), wrong.sum()
    if n <= 0:
        return math.nan, math.nan
    auroc = math.nan
    if n_right > 0 and n_wrong > 0:
        wrong_below = np.cumsum(wrong) - wrong
        auroc = float((correct * (wrong_below + 0.5 * wrong)).sum() / (n_right * n_wrong))
    keep = count[::-1] > 0  # most confident first
    m, e = count[::-1][keep], wrong[::-1][keep]
    accepted, errors = np.cumsum(m) - m, np.cumsum(e) - e
    # Σ_{j=1..m} 1/(A + j) = ψ(A + m + 1) − ψ(A + 1), and Σ_j j/(A + j) = m − A·(that)
    digamma = torch.special.digamma
    harmonic = (
        digamma(torch.from_numpy(accepted + m + 1.0)) - digamma(torch.from_numpy(accepted + 1.0))
    ).numpy()
    aurc = float((errors * harmonic + (e / m) * (m - accepted * harmonic)).sum() / n)
    return aurc, auroc


def _calibration_error(count: np.ndarray, conf_sum: np.ndarray, correct_sum: np.ndarray) -> float:
    """Σ_b (n_b / N)·|acc_b − conf_b| = Σ_b |correct_b − conf_b| / N."""
    n = count.sum()
    return float(np.abs(correct_sum - conf_sum).sum() / n) if n > 0 else math.nan


# p(t) = Σ c_k t^k on t ∈ [0, 1] with given value, slope and curvature at both ends:
# rows are p(0), p'(0), p''(0), p(1), p'(1), p''(1) applied to (c_0, ..., c_5).
_QUINTIC_HERMITE = np.array(
    [
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 2, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [0, 1, 2, 3, 4, 5],
        [0, 0, 2, 6, 12, 20],
    ],
    dtype=np.float64,
)


def _hermite_minimum(
    b0: float, b1: float, left: Sequence[float], right: Sequence[float]
) -> tuple[float, float]:
    """Minimiser and minimum over [b0, b1] of the quintic matching (f, f', f'') at both ends."""
    h = b1 - b0
    scale = np.array([1.0, h, h * h])
    rhs = np.concatenate([np.asarray(left) * scale, np.asarray(right) * scale])
    poly = np.polynomial.Polynomial(np.linalg.solve(_QUINTIC_HERMITE, rhs))
    roots = [complex(r) for r in poly.deriv().roots()]
    candidates = [0.0, 1.0] + [r.real for r in roots if abs(r.imag) < 1e-9 and 0.0 <= r.real <= 1.0]
    t_best = min(candidates, key=lambda t: float(poly(t)))
    return b0 + t_best * h, float(poly(t_best))


class MetricAccumulator:
    """Streaming evaluation metrics over token predictions (the keys of `METRIC_KEYS`).

    ``n_bins``: equal-width and equal-mass bins for ECE (15 in metrics.json).
    ``temperatures``: the grid for temperature scaling (``None``: `DEFAULT_TEMPERATURES`;
    an empty sequence skips it, and both temperature metrics are NaN: the cheap setting
    for frequent validation). ``fine_bins``: resolution of the confidence histogram that
    adaptive ECE is cut from. ``entropy_bins``: bins of the entropy histogram over
    ``[0, log V]``. ``chunk_elements``: rows are processed in chunks of about this many
    logits, bounding the temporary memory of `update`. ``topk_entropies=False`` skips the
    entropies over the top 10/100/1000 tokens (they come out NaN): the top-1000 selection
    costs more than all other metrics together, and validation during training needs none.
    ``token_bytes``: bytes of text per token id (`dpls.data.Tokenizer.byte_lengths`), for
    ``bits_per_byte``. ``frequency_bins``: the bin of every id by its training frequency
    (`frequency_bins`), for ``ce_by_frequency``. Either may be shorter than V (ids past it
    have no bytes / fall in the last bin), never longer.
    """

    def __init__(
        self,
        n_bins: int = 15,
        temperatures: Sequence[float] | None = None,
        *,
        fine_bins: int = 10_000,
        entropy_bins: int = 100,
        chunk_elements: int = 1 << 24,
        topk_entropies: bool = True,
        token_bytes: Sequence[int] | np.ndarray | None = None,
        frequency_bins: FrequencyBins | None = None,
    ) -> None:
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        if fine_bins < n_bins:
            raise ValueError(f"fine_bins must be >= n_bins ({n_bins}), got {fine_bins}")
        if entropy_bins < 1:
            raise ValueError(f"entropy_bins must be >= 1, got {entropy_bins}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        temps = DEFAULT_TEMPERATURES if temperatures is None else tuple(float(t) for t in temperatures)
        if any(not (math.isfinite(t) and t > 0) for t in temps):
            raise ValueError(f"temperatures must be finite and > 0, got {temps}")
        self.n_bins = n_bins
        self.fine_bins = fine_bins
        self.entropy_bins = entropy_bins
        self.chunk_elements = chunk_elements
        self.topk_entropies = topk_entropies
        self.token_bytes = None if token_bytes is None else np.asarray(token_bytes, dtype=np.float64)
        if self.token_bytes is not None and (
            self.token_bytes.ndim != 1 or bool((self.token_bytes < 0).any())
        ):
            raise ValueError("token_bytes must be a 1-D array of non-negative byte counts, one per token id")
        self.frequency_bins = frequency_bins
        # Ascending inverse temperatures β = 1/T: the variable in which the loss is convex.
        self._betas = sorted({1.0 / t for t in temps})
        self.vocab_size: int | None = None
        self._state: dict[str, torch.Tensor] | None = None

    # -- state ------------------------------------------------------------------------

    @property
    def temperatures(self) -> list[float]:
        """The temperature grid, ascending."""
        return [1.0 / b for b in reversed(self._betas)]

    def _init_state(self, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.vocab_size = vocab_size
        for name, table in (("token_bytes", self.token_bytes), ("frequency_bins", self.frequency_bins)):
            size = len(table) if isinstance(table, np.ndarray) else len(table.bin_of) if table else 0
            if size > vocab_size:
                raise ValueError(f"{name} has {size} entries, more than the logits' V={vocab_size}")
        per_id = {}  # per token id: its bytes, its frequency bin (ids past the table: 0 bytes, the last bin)
        if self.token_bytes is not None:
            per_id["bytes"] = np.pad(self.token_bytes, (0, vocab_size - len(self.token_bytes)))
        n_freq = 0
        if self.frequency_bins is not None:
            n_freq = len(self.frequency_bins.types)
            ids = self.frequency_bins.bin_of
            per_id["bin"] = np.pad(ids, (0, vocab_size - len(ids)), constant_values=n_freq - 1)
        self._per_id = {k: torch.from_numpy(v).to(device) for k, v in per_id.items()}
        self._state = {
            "scalars": zeros(_N_SCALARS),
            "temperature": zeros(len(self._betas), 3),
            "temperature_count": zeros(len(self._betas), self.fine_bins),
            "temperature_correct": zeros(len(self._betas), self.fine_bins),
            "bytes": zeros(2),  # Σ bytes of the targets, Σ CE of the targets that have bytes
            "frequency": zeros(3, n_freq),  # per bin: tokens, Σ CE, Σ correct
            "bin_count": zeros(self.n_bins),
            "bin_conf": zeros(self.n_bins),
            "bin_correct": zeros(self.n_bins),
            "fine_count": zeros(self.fine_bins),
            "fine_conf": zeros(self.fine_bins),
            "fine_correct": zeros(self.fine_bins),
            "entropy_hist": zeros(self.entropy_bins),
        }
        return self._state

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.vocab_size = None
        self._state = None

    @property
    def tokens(self) -> int:
        """Number of (non-ignored) tokens seen."""
        return 0 if self._state is None else int(self._state["scalars"][_N].item())

    def reduce_(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> MetricAccumulator:
        """Sum the state over ranks in place with one collective, e.g. ``DistContext.all_reduce_sum``.

        Every rank must have seen at least one batch (of the same vocabulary).
        """
        if self._state is None:
            raise ValueError("reduce_ needs at least one update on every rank (the state is empty)")
        keys = list(self._state)
        flat = all_reduce_sum(torch.cat([self._state[k].reshape(-1) for k in keys]))
        for k, part in zip(keys, flat.split([self._state[k].numel() for k in keys])):
            self._state[k] = part.to(self._state[k].device).reshape(self._state[k].shape).clone()
        return self

    # -- update -----------------------------------------------------------------------

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> None:
        """Fold in predictions ``logits [..., V]`` (any float dtype) for ``targets [...]`` (int).

        Tokens whose target is ``ignore_index`` are left out of every metric.
        """
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
        if logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
        if tuple(targets.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must match logits shape without the last "
                f"dimension {tuple(logits.shape[:-1])}"
            )
        vocab = logits.shape[-1]
        if self.vocab_size is not None and vocab != self.vocab_size:
            raise ValueError(f"logits have V={vocab}, but earlier updates had V={self.vocab_size}")
        z = logits.reshape(-1, vocab)
        y = targets.reshape(-1).to(device=z.device, dtype=torch.int64)
        keep = y != ignore_index
        if keep.numel() and bool(((y[keep] < 0) | (y[keep] >= vocab)).any()):
            raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
        state = self._state if self._state is not None else self._init_state(vocab, z.device)
        if not bool(keep.all()):
            z, y = z[keep], y[keep]
        rows = max(1, self.chunk_elements // vocab)
        for start in range(0, z.shape[0], rows):
            self._update_chunk(state, z[start : start + rows], y[start : start + rows])

    def _update_chunk(self, state: dict[str, torch.Tensor], logits: torch.Tensor, y: torch.Tensor) -> None:
        vocab = logits.shape[-1]
        dev = state["scalars"].device
        z = logits.float()
        zmax, pred = z.max(dim=-1)
        d = (z - zmax.unsqueeze(-1)).clamp_min_(_MIN_OFFSET)  # ≤ 0, exactly 0 at the argmax
        d_y = d.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        e = d.exp()
        s = e.sum(dim=-1)
        log_s = s.log()
        p = e.div_(s.unsqueeze(-1))  # softmax; e is not needed any more
        ce = log_s - d_y
        entropy = log_s - (p * d).sum(dim=-1)
        conf = s.reciprocal()  # max_j p_j = exp(0) / s
        correct = (pred == y).to(torch.float64)
        brier = 1.0 - 2.0 * (d_y.exp() / s) + (p * p).sum(dim=-1)
        del p

        topk_entropy = [torch.zeros((), dtype=torch.float64, device=z.device)] * len(TOPK_ENTROPIES)
        if self.topk_entropies:
            ks = [min(k, vocab) for k in TOPK_ENTROPIES]
            top = d.topk(max(ks), dim=-1, sorted=True).values
            for i, k in enumerate(ks):
                sub = top[:, :k]
                ek = sub.exp()
                sk = ek.sum(dim=-1)
                topk_entropy[i] = (sk.log() - (ek * sub).sum(dim=-1) / sk).double().sum()
            del top

        temp = []  # per β: Σ f, Σ f', Σ f''
        sums = []  # per β: Σ exp(β·d), whose reciprocal is the top-1 confidence at that temperature
        for beta in self._betas:
            eb = (d * beta).exp_()
            sb = eb.sum(dim=-1)
            sums.append(sb)
            m1 = eb.mul_(d).sum(dim=-1) / sb  # E_β[d]
            m2 = eb.mul_(d).sum(dim=-1) / sb  # E_β[d²]
            f = sb.log() - beta * d_y
            var = (m2 - m1 * m1).clamp_min_(0.0)
            temp.append(torch.stack([f, m1 - d_y, var]).double().sum(dim=-1))
        del d

        scalars = torch.stack(
            [
                torch.tensor(float(y.numel()), dtype=torch.float64, device=z.device),
                ce.double().sum(),
                entropy.double().sum(),
                correct.sum(),
                brier.double().sum(),
                *topk_entropy,
            ]
        )
        state["scalars"] += scalars.to(dev)
        if temp:
            state["temperature"] += torch.stack(temp).to(dev)
        self._update_extras(state, y, ce, correct, sums)

        conf64, correct = conf.double().to(dev), correct.to(dev)
        coarse = (conf64 * self.n_bins).long().clamp_(0, self.n_bins - 1)
        state["bin_count"].index_add_(0, coarse, torch.ones_like(conf64))
        state["bin_conf"].index_add_(0, coarse, conf64)
        state["bin_correct"].index_add_(0, coarse, correct)
        fine = (conf64 * self.fine_bins).long().clamp_(0, self.fine_bins - 1)
        state["fine_count"].index_add_(0, fine, torch.ones_like(conf64))
        state["fine_conf"].index_add_(0, fine, conf64)
        state["fine_correct"].index_add_(0, fine, correct)
        log_v = math.log(vocab) if vocab > 1 else 1.0
        ent_bin = (entropy.double().to(dev) / log_v * self.entropy_bins).long()
        state["entropy_hist"].index_add_(0, ent_bin.clamp_(0, self.entropy_bins - 1), torch.ones_like(conf64))

    def _update_extras(
        self,
        state: dict[str, torch.Tensor],
        y: torch.Tensor,
        ce: torch.Tensor,
        correct: torch.Tensor,
        sums: list[torch.Tensor],
    ) -> None:
        """Selective-prediction histograms per grid temperature (``sums``: Σ exp(β·d) per β),
        bytes, and per-frequency-bin sums."""
        dev = state["scalars"].device
        correct = correct.to(dev)
        ones = torch.ones_like(correct)
        if sums:  # one index_add over every grid temperature: offset g·fine_bins for the g-th
            fine = (
                torch.stack(sums)
                .double()
                .reciprocal_()
                .mul_(self.fine_bins)
                .long()
                .clamp_(0, self.fine_bins - 1)
            )
            offsets = torch.arange(len(sums), device=fine.device)[:, None] * self.fine_bins
            where = (fine + offsets).reshape(-1).to(dev)
            state["temperature_count"].view(-1).index_add_(0, where, ones.repeat(len(sums)))
            state["temperature_correct"].view(-1).index_add_(0, where, correct.repeat(len(sums)))
        ce = ce.double().to(dev)
        if "bytes" in self._per_id:
            nbytes = self._per_id["bytes"][y].to(dev)
            state["bytes"] += torch.stack([nbytes.sum(), torch.where(nbytes > 0, ce, 0.0).sum()])
        if "bin" in self._per_id:
            freq = state["frequency"]
            b = self._per_id["bin"][y].to(dev)
            for row, values in enumerate((ones, ce, correct)):
                freq[row].index_add_(0, b, values)

    # -- results ----------------------------------------------------------------------

    def _host_state(self) -> dict[str, np.ndarray]:
        if self._state is None or self._state["scalars"][_N].item() == 0:
            raise ValueError("no tokens to compute metrics from: every update was empty or ignored")
        return {k: v.detach().cpu().numpy() for k, v in self._state.items()}

    def _best_temperature(self, st: dict[str, np.ndarray], n: float) -> tuple[float, float]:
        if not self._betas:
            return math.nan, math.nan
        betas = self._betas
        fgc = st["temperature"] / n  # [G, 3]: mean f, f', f'' at each β
        g = fgc[:, 1]
        if len(betas) == 1 or g[0] >= 0:  # increasing everywhere: hottest grid point
            return 1.0 / betas[0], float(fgc[0, 0])
        if g[-1] <= 0:  # decreasing everywhere: coldest grid point
            return 1.0 / betas[-1], float(fgc[-1, 0])
        i = int(np.argmax(g > 0)) - 1  # g[i] <= 0 < g[i + 1]
        beta, loss = _hermite_minimum(betas[i], betas[i + 1], fgc[i], fgc[i + 1])
        return 1.0 / beta, loss

    def compute(self) -> dict[str, Any]:
        """The evaluation metrics over everything seen so far: `METRIC_KEYS`, then `EXTRA_METRIC_KEYS`."""
        st = self._host_state()
        sc = st["scalars"]
        n = float(sc[_N])
        loss = float(sc[_CE] / n)
        best_t, best_loss = self._best_temperature(st, n)
        out: dict[str, Any] = {
            "loss": loss,
            "ppl": math.exp(loss) if loss < 709.0 else math.inf,
            "entropy": float(sc[_ENT] / n),
        }
        for i, k in enumerate(TOPK_ENTROPIES):
            out[f"entropy_top{k}"] = float(sc[_TOPK0 + i] / n) if self.topk_entropies else math.nan
        out["top1_acc"] = float(sc[_CORRECT] / n)
        out["ece"] = _calibration_error(st["bin_count"], st["bin_conf"], st["bin_correct"])
        adaptive = self._adaptive_bins(st)
        out["ece_adaptive"] = _calibration_error(*adaptive[2:])
        out["brier"] = float(sc[_BRIER] / n)
        out["best_temperature"] = best_t
        out["loss_at_best_temperature"] = best_loss
        out["tokens"] = round(n)
        out["aurc"], out["auroc"] = selective_metrics(st["fine_count"], st["fine_correct"])
        out["aurc_at_best_temperature"], out["auroc_at_best_temperature"] = self._selective_at(best_t, st)
        n_bytes, ce_with_bytes = st["bytes"]
        has_bytes = self.token_bytes is not None and n_bytes > 0
        out["bits_per_byte"] = float(ce_with_bytes / (math.log(2.0) * n_bytes)) if has_bytes else math.nan
        out["ce_by_frequency"] = self._by_frequency(st)
        return out

    def _selective_at(self, temperature: float, st: dict[str, np.ndarray]) -> tuple[float, float]:
        """AURC and AUROC after temperature scaling: those of the grid temperatures' histograms,
        interpolated linearly in β = 1/T (clipped to the grid's ends)."""
        if not self._betas or not math.isfinite(temperature):
            return math.nan, math.nan
        per_beta = [
            selective_metrics(c, r) for c, r in zip(st["temperature_count"], st["temperature_correct"])
        ]
        aurc, auroc = (np.interp(1.0 / temperature, self._betas, [v[i] for v in per_beta]) for i in (0, 1))
        return float(aurc), float(auroc)

    def _by_frequency(self, st: dict[str, np.ndarray]) -> list[dict[str, Any]] | None:
        """Per training-frequency bin: its description, tokens, mean CE and top-1 accuracy."""
        if self.frequency_bins is None:
            return None
        count, ce_sum, correct = st["frequency"]
        rows = []
        for b in range(len(count)):
            seen = count[b] > 0
            rows.append(
                {
                    **self.frequency_bins.describe(b),
                    "tokens": round(float(count[b])),
                    "ce": float(ce_sum[b] / count[b]) if seen else None,
                    "top1_acc": float(correct[b] / count[b]) if seen else None,
                }
            )
        return rows

    def _adaptive_bins(self, st: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """(lower, upper, count, conf_sum, correct_sum) of ``n_bins`` equal-mass bins."""
        count, conf, correct = st["fine_count"], st["fine_conf"], st["fine_correct"]
        n = count.sum()
        cum_hi = np.cumsum(count)
        cum_lo = cum_hi - count
        cuts = n * np.arange(self.n_bins + 1) / self.n_bins
        # overlap[i, b]: tokens of fine bin i that fall in equal-mass bin b (mass interval cuts[b:b+2])
        overlap = np.clip(
            np.minimum(cum_hi[:, None], cuts[None, 1:]) - np.maximum(cum_lo[:, None], cuts[None, :-1]),
            0,
            None,
        )
        share = np.divide(overlap, count[:, None], out=np.zeros_like(overlap), where=count[:, None] > 0)
        b_count, b_conf, b_correct = share.T @ count, share.T @ conf, share.T @ correct
        lower, upper = np.full(self.n_bins, np.nan), np.full(self.n_bins, np.nan)
        for b in range(self.n_bins):  # confidence range actually covered by each bin
            used = np.nonzero(overlap[:, b] > 0)[0]
            if used.size:
                lower[b], upper[b] = used[0] / self.fine_bins, (used[-1] + 1) / self.fine_bins
        return lower, upper, b_count, b_conf, b_correct

    def reliability(self, adaptive: bool = False) -> ReliabilityBins:
        """Per-bin data for a reliability diagram: equal-width bins, or equal-mass ones."""
        st = self._host_state()
        if adaptive:
            lower, upper, count, conf, correct = self._adaptive_bins(st)
        else:
            edges = np.arange(self.n_bins + 1) / self.n_bins
            lower, upper = edges[:-1], edges[1:]
            count, conf, correct = st["bin_count"], st["bin_conf"], st["bin_correct"]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_conf = np.where(count > 0, conf / count, np.nan)
            accuracy = np.where(count > 0, correct / count, np.nan)
        return ReliabilityBins(
            lower=lower.tolist(),
            upper=upper.tolist(),
            count=count.tolist(),
            confidence=mean_conf.tolist(),
            accuracy=accuracy.tolist(),
        )

    def entropy_histogram(self) -> tuple[list[float], list[float]]:
        """(edges, counts) of the per-token predictive entropy, in nats, over ``[0, log V]``."""
        st = self._host_state()
        assert self.vocab_size is not None
        log_v = math.log(self.vocab_size) if self.vocab_size > 1 else 1.0
        edges = np.linspace(0.0, log_v, self.entropy_bins + 1)
        return edges.tolist(), st["entropy_hist"].tolist()
