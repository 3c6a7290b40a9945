"""Methods × bit settings on one model, one calibration set, one evaluation protocol.

:func:`compare_methods` quantizes a fresh copy of one in-memory model for
every (method, bit setting, seed), evaluates its perplexity and collects the
figures; the writers turn the result into a Markdown table, a CSV, a JSON
document and a bar chart. The model is read from disk once by the caller:
every run deep-copies the caller's model (quantization swaps ``nn.Linear``
modules for ``QuantLinear``, so a state-dict restore would not undo it), and
the caller's model is never modified.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from quantcompose.errors import QuantComposeError, QuantSpecError
from quantcompose.evaluate import perplexity
from quantcompose.pipeline import quantize_model
from quantcompose.plugin_manager import StrategyManager, get_plugin_manager
from quantcompose.strategy import QuantSettings

__all__ = [
    "BitSetting",
    "ComparisonError",
    "ComparisonResult",
    "Protocol",
    "RowSummary",
    "RunResult",
    "RunSpec",
    "compare_methods",
    "library_version",
    "parse_bits",
    "parse_bits_list",
    "parse_method_options",
    "peak_memory_note",
    "plot_bars",
    "run_grid",
    "to_csv",
    "to_json",
    "to_markdown",
    "write_outputs",
]


class ComparisonError(QuantComposeError, ValueError):
    """A comparison was asked for in a form that cannot be run (bad bits string, bad option)."""


# --------------------------------------------------------------------------- what to run

_BITS = re.compile(r"w(\d+)a(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class BitSetting:
    """Weight and activation bits of one run (16: that side stays in floating point)."""

    wbits: int
    abits: int

    @property
    def label(self) -> str:
        return f"W{self.wbits}A{self.abits}"


def parse_bits(text: str) -> BitSetting:
    """``"w4a4"`` → ``BitSetting(4, 4)``; only the form ``wXaY`` is accepted (case-insensitive)."""
    match = _BITS.fullmatch(text.strip())
    if match is None:
        raise ComparisonError(
            f"bit setting {text!r} is not of the form wXaY (for example w4a4, w6a6, w8a8, w4a16); "
            "K/V-cache bits and group sizes are not part of a bit setting"
        )
    wbits, abits = int(match.group(1)), int(match.group(2))
    try:
        QuantSettings(wbits=wbits, abits=abits)
    except QuantSpecError as exc:
        raise QuantSpecError(f"bit setting {text!r}: {exc}") from exc
    return BitSetting(wbits, abits)


def parse_bits_list(text: str) -> list[BitSetting]:
    """``"w4a4,w6a6"`` → two settings, in order, duplicates dropped."""
    settings = [parse_bits(part) for part in text.split(",") if part.strip()]
    if not settings:
        raise ComparisonError("no bit setting given: pass e.g. --bits w4a4,w6a6,w8a8")
    return list(dict.fromkeys(settings))


def parse_method_options(pairs: Iterable[str], methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["duquant:alpha=0.6"]`` → ``{"duquant": {"alpha": "0.6"}}``.

    The method must be one of ``methods`` (a typo would otherwise silently do
    nothing); whether the method accepts the key is decided by its run, which
    reports a rejected option in its own row.
    """
    options: dict[str, dict[str, str]] = {}
    for pair in pairs:
        method, colon, assignment = pair.partition(":")
        key, equals, value = assignment.partition("=")
        method, key = method.strip(), key.strip().replace("-", "_")
        if not colon or not equals or not method or not key:
            raise ComparisonError(f"--opt expects METHOD:KEY=VALUE (for example duquant:alpha=0.6), got {pair!r}")
        if method not in methods:
            raise ComparisonError(
                f"--opt {pair!r} names method {method!r}, which is not among the compared methods {list(methods)}"
            )
        options.setdefault(method, {})[key] = value.strip()
    return options


@dataclass(frozen=True)
class RunSpec:
    """One row of the comparison: a method, a bit setting and the options given to it."""

    method: str
    bits: BitSetting
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} {self.bits.label}"


def run_grid(
    methods: Sequence[str], bits: Sequence[BitSetting], options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[RunSpec]:
    """Every method at every bit setting, grouped by bit setting, methods in the given order."""
    options = options or {}
    return [RunSpec(m, b, dict(options.get(m, {}))) for b in bits for m in methods]


@dataclass(frozen=True)
class Protocol:
    """How every run is calibrated and evaluated, as recorded beside the figures."""

    model: str
    eval_data: str  # what the evaluation stream is, e.g. "WikiText-2 raw test"
    seqlen: int
    max_windows: int | None  # None: every full window
    calibration: str  # what the calibration set is, e.g. "16 x 512 random-zipf tokens, drawn with the run's seed"

    def describe(self) -> str:
        windows = "all windows" if self.max_windows is None else f"first {self.max_windows} windows"
        return (
            f"{self.model}; perplexity on {self.eval_data}, {windows} of {self.seqlen} tokens "
            f"(non-overlapping, exp of the mean token NLL); calibration: {self.calibration}"
        )


# --------------------------------------------------------------------------- peak memory


def _rss_bytes() -> int | None:
    """The process's resident set size now, or None where it cannot be read."""
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_memory_note() -> str:
    """What the peak-memory figures measure (written beside them)."""
    return (
        "peak resident set size of the whole process during the run (torch's CPU tensors included; "
        "sampled every 20 ms, so a shorter spike can be missed), and its rise over the resident set "
        "at the start of the run; the process also holds the pristine model the runs are copied from"
    )


class _PeakRSS:
    """Samples the resident set on a daemon thread while a run is in progress.

    ``resource.getrusage`` only knows the peak of the whole process lifetime,
    and tracemalloc does not see torch's allocations, hence the sampling.
    """

    INTERVAL_S = 0.02

    def __init__(self) -> None:
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._record()

    def _record(self) -> None:
        now = _rss_bytes()
        if now is not None:
            self.peak = now if self.peak is None else max(self.peak, now)

    def __enter__(self) -> "_PeakRSS":
        self.start = _rss_bytes()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record()


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


# --------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """The figures of one (method, bit setting, seed) run; ``error`` set when it failed."""

    method: str
    bits: str
    seed: int | None  # None for the full-precision row, which has no seed
    row: int | None  # index of the run's RunSpec in the comparison; None for full precision
    options_given: dict[str, Any]
    options_used: dict[str, Any] = field(default_factory=dict)
    perplexity: float | None = None
    x_fp: float | None = None
    quant_seconds: float | None = None
    eval_seconds: float | None = None
    peak_rss_mib: float | None = None
    rss_increase_mib: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RowSummary:
    """One (method, bit setting) over its seeds: mean, sample standard deviation and range."""

    method: str
    bits: str
    options_given: dict[str, Any]
    runs: int
    succeeded: int
    ppl_mean: float | None
    ppl_std: float | None  # sample std (n − 1) over the seeds that succeeded; None with fewer than two
    ppl_min: float | None
    ppl_max: float | None
    x_fp_mean: float | None
    quant_seconds_mean: float | None
    eval_seconds_mean: float | None
    peak_rss_mib: float | None  # the largest over the seeds
    errors: tuple[str, ...]


@dataclass
class ComparisonResult:
    """Everything a comparison measured, and how."""

    protocol: Protocol
    settings: dict[str, Any]  # the QuantSettings shared by every run (bits and seed vary per run)
    seeds: list[int]
    full_precision: RunResult
    runs: list[RunResult]
    version: str
    memory_note: str = field(default_factory=peak_memory_note)

    def rows(self) -> list[RowSummary]:
        """One summary per (method, bit setting), in the order they were run."""
        # By RunSpec, not by (method, bits): one method may appear with two option sets.
        groups: dict[int | None, list[RunResult]] = {}
        for run in self.runs:
            groups.setdefault(run.row, []).append(run)
        return [_summarize(runs) for runs in groups.values()]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _summarize(runs: list[RunResult]) -> RowSummary:
    ok = [r for r in runs if r.ok]
    ppl = [r.perplexity for r in ok if r.perplexity is not None]
    rss = [r.peak_rss_mib for r in ok if r.peak_rss_mib is not None]
    return RowSummary(
        method=runs[0].method,
        bits=runs[0].bits,
        options_given=runs[0].options_given,
        runs=len(runs),
        succeeded=len(ok),
        ppl_mean=_mean(ppl),
        ppl_std=statistics.stdev(ppl) if len(ppl) > 1 else None,
        ppl_min=min(ppl) if ppl else None,
        ppl_max=max(ppl) if ppl else None,
        x_fp_mean=_mean([r.x_fp for r in ok if r.x_fp is not None]),
        quant_seconds_mean=_mean([r.quant_seconds for r in ok if r.quant_seconds is not None]),
        eval_seconds_mean=_mean([r.eval_seconds for r in ok if r.eval_seconds is not None]),
        peak_rss_mib=max(rss) if rss else None,
        errors=tuple(f"seed {r.seed}: {r.error}" for r in runs if not r.ok),
    )


def library_version() -> str:
    """The installed quantcompose version, or ``"unknown"`` when run from a bare source tree."""
    try:
        return metadata.version("quantcompose")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- running


def _evaluate(model: nn.Module, eval_tokens: torch.Tensor, protocol: Protocol) -> tuple[float, float]:
    start = time.perf_counter()
    ppl = perplexity(model, eval_tokens, seqlen=protocol.seqlen, max_windows=protocol.max_windows, progress=False)
    return ppl, time.perf_counter() - start


def _one_run(
    model: nn.Module,
    spec: RunSpec,
    row: int,
    seed: int,
    calib: torch.Tensor,
    eval_tokens: torch.Tensor,
    protocol: Protocol,
    settings: QuantSettings,
    manager: StrategyManager,
    fp_ppl: float,
) -> RunResult:
    result = RunResult(spec.method, spec.bits.label, seed, row, dict(spec.options))
    work: nn.Module | None = None
    with _PeakRSS() as memory:
        try:
            work = copy.deepcopy(model)
            run_settings = replace(settings, wbits=spec.bits.wbits, abits=spec.bits.abits, seed=seed)
            torch.manual_seed(seed)  # anything drawing from the global generator draws the same per seed
            report = quantize_model(work, calib, spec.method, run_settings, dict(spec.options), manager=manager,
                                    progress=False)
            result.options_used = dict(report.options)
            result.quant_seconds = report.seconds
            ppl, result.eval_seconds = _evaluate(work, eval_tokens, protocol)
            result.perplexity = ppl
            if math.isfinite(ppl):
                result.x_fp = ppl / fp_ppl
            else:
                result.error = f"perplexity is {ppl}: the quantized model diverged"
        except Exception as exc:  # noqa: BLE001 - a failed run is a row of the table, the others go on
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            del work
    result.peak_rss_mib = _mib(memory.peak)
    if memory.peak is not None and memory.start is not None:
        result.rss_increase_mib = _mib(memory.peak - memory.start)
    return result


def compare_methods(
    model: nn.Module,
    runs: Sequence[RunSpec],
    calib: torch.Tensor | Callable[[int], torch.Tensor],
    eval_tokens: torch.Tensor,
    protocol: Protocol,
    seeds: Sequence[int] = (0,),
    *,
    settings: QuantSettings | None = None,
    manager: StrategyManager | None = None,
    progress: bool = True,
) -> ComparisonResult:
    """Quantize a copy of ``model`` for every run and seed; evaluate each and full precision once.

    ``calib`` is a ``(nsamples, seqlen)`` token tensor shared by every seed, or
    a function of the seed returning one (a seed then sets the calibration draw
    and the strategy's random choices together). ``settings`` holds the
    quantizer choices shared by every run; each run overrides its bits and
    seed. ``model`` is left as it was: every run works on a deep copy. A run
    that raises, or whose perplexity is not finite, is reported with its error
    and the comparison goes on. The same inputs and seeds give the same
    perplexities.
    """
    if not runs:
        raise ComparisonError("nothing to compare: give at least one method and one bit setting")
    if not seeds:
        raise ComparisonError("no seed given: pass e.g. --seeds 0 or --seeds 0,1,2")
    settings = settings or QuantSettings()
    manager = manager or get_plugin_manager()
    seeds = [int(s) for s in seeds]
    calib_for: Callable[[int], torch.Tensor] = calib if callable(calib) else (lambda _seed: calib)

    total = 1 + len(runs) * len(seeds)
    with tqdm(total=total, desc="compare", unit="run", disable=not progress) as bar:
        bar.set_postfix_str("full precision")
        fp = RunResult("full precision", "W16A16", None, None, {})
        with _PeakRSS() as memory:
            fp.perplexity, fp.eval_seconds = _evaluate(model, eval_tokens, protocol)
        fp.x_fp = 1.0
        fp.peak_rss_mib = _mib(memory.peak)
        if not math.isfinite(fp.perplexity):
            raise ComparisonError(
                f"the full-precision model's perplexity is {fp.perplexity}; check the model and the evaluation data "
                "before comparing quantized runs"
            )
        bar.update(1)
        results: list[RunResult] = []
        for seed in seeds:
            tokens = calib_for(seed)
            for row, spec in enumerate(runs):
                bar.set_postfix_str(f"{spec.label} seed {seed}")
                results.append(
                    _one_run(model, spec, row, seed, tokens, eval_tokens, protocol, settings, manager, fp.perplexity)
                )
                bar.update(1)
    # Rows in run order, seeds adjacent within a row.
    results.sort(key=lambda r: (r.row, seeds.index(r.seed)))
    shared = {k: v for k, v in asdict(settings).items() if k not in ("wbits", "abits", "seed")}
    return ComparisonResult(protocol, shared, seeds, fp, results, library_version())


# --------------------------------------------------------------------------- writers


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _options_text(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def to_markdown(result: ComparisonResult, *, timings: bool = True) -> str:
    """The comparison as a Markdown table with its protocol above it.

    ``timings=False`` leaves out time and memory, which vary from run to run:
    what remains is the same for the same seeds.
    """
    several = len(result.seeds) > 1
    header = ["method", "bits", "options", "perplexity"]
    if several:
        header += ["std", "min–max"]
    header += ["× full precision"]
    if timings:
        header += ["quantization s", "peak RSS MiB"]
    header += ["error"]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    rows = [line(header), line(["---"] * len(header))]
    fp = result.full_precision
    fp_cells = ["full precision", fp.bits, "", _fmt(fp.perplexity)]
    if several:
        fp_cells += ["", ""]
    fp_cells += ["1.000"]
    if timings:
        fp_cells += ["", _fmt(fp.peak_rss_mib, 0)]
    rows.append(line(fp_cells + [""]))
    for row in result.rows():
        cells = [row.method, row.bits, _options_text(row.options_given), _fmt(row.ppl_mean)]
        if several:
            spread = "" if row.ppl_min is None else f"{row.ppl_min:.2f}–{row.ppl_max:.2f}"
            cells += [_fmt(row.ppl_std), spread]
        cells += [_fmt(row.x_fp_mean, 3)]
        if timings:
            cells += [_fmt(row.quant_seconds_mean, 1), _fmt(row.peak_rss_mib, 0)]
        errors = "; ".join(row.errors).replace("|", "\\|").replace("\n", " ")
        cells.append(errors)
        rows.append(line(cells))
    seeds = ",".join(map(str, result.seeds))
    notes = [
        f"Protocol: {result.protocol.describe()}.",
        f"Seeds: {seeds}"
        + (" (perplexity is the mean over the seeds that succeeded; std is the sample standard deviation)."
           if several else "."),
        f"Shared settings: {_options_text(result.settings)}. quantcompose {result.version}.",
    ]
    if timings:
        notes.append(f"Peak RSS: {result.memory_note}.")
    return "\n".join(notes) + "\n\n" + "\n".join(rows) + "\n"


CSV_COLUMNS = (
    "method", "bits", "seed", "row", "perplexity", "x_fp", "quant_seconds", "eval_seconds",
    "peak_rss_mib", "rss_increase_mib", "options_given", "options_used", "error",
)


def to_csv(result: ComparisonResult) -> str:
    """One CSV row per run (full precision first, then every method, bit setting and seed)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for run in [result.full_precision, *result.runs]:
        record = asdict(run)
        record["options_given"] = json.dumps(run.options_given, sort_keys=True, default=str)
        record["options_used"] = json.dumps(run.options_used, sort_keys=True, default=str)
        writer.writerow({key: "" if record[key] is None else record[key] for key in CSV_COLUMNS})
    return buffer.getvalue()


def to_json(result: ComparisonResult) -> str:
    """Every figure, the per-row summaries, the protocol, settings, seeds and library version."""
    document = {
        "quantcompose_version": result.version,
        "protocol": asdict(result.protocol),
        "protocol_text": result.protocol.describe(),
        "settings": result.settings,
        "seeds": result.seeds,
        "spread": "ppl_std is the sample standard deviation over seeds; ppl_min / ppl_max their range",
        "memory": result.memory_note,
        "full_precision": asdict(result.full_precision),
        "rows": [asdict(row) for row in result.rows()],
        "runs": [asdict(run) for run in result.runs],
    }
    # NaN / inf are not JSON: write them as strings so any reader can load the file.
    return json.dumps(_json_safe(document), indent=2, default=str) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def plot_bars(result: ComparisonResult, path: str | os.PathLike[str]) -> Path:
    """Grouped bars of perplexity × full precision, one group per bit setting.

    The axis is logarithmic when the rows span more than a factor of 3.

    Whiskers span the min–max over seeds; a failed run is marked "failed" at
    the foot of its bar's place.
    """
    from quantcompose.plotting import pyplot

    plt = pyplot()
    rows = result.rows()
    bits = list(dict.fromkeys(r.bits for r in rows))
    def series(row: RowSummary) -> str:  # one method with two option sets is two series
        return f"{row.method} ({_options_text(row.options_given)})" if row.options_given else row.method

    methods = list(dict.fromkeys(series(r) for r in rows))
    by_key = {(series(r), r.bits): r for r in rows}
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(bits) * max(len(methods), 2) / 2), 4.5))
    fp = result.full_precision.perplexity
    for i, method in enumerate(methods):
        xs, heights, low, high, failed = [], [], [], [], []
        for j, b in enumerate(bits):
            row = by_key.get((method, b))
            x = j - 0.4 + width * (i + 0.5)
            if row is None:
                continue
            if row.x_fp_mean is None:
                failed.append(x)
                continue
            xs.append(x)
            heights.append(row.x_fp_mean)
            low.append(row.x_fp_mean - row.ppl_min / fp)
            high.append(row.ppl_max / fp - row.x_fp_mean)
        bars = ax.bar(xs, heights, width * 0.9, label=method)
        if len(result.seeds) > 1 and xs:
            ax.errorbar(xs, heights, yerr=[low, high], fmt="none", ecolor="black", capsize=3, linewidth=1)
        for x in failed:
            ax.text(x, 1.0, "failed", rotation=90, ha="center", va="bottom", fontsize=8,
                    color=bars.patches[0].get_facecolor() if bars.patches else "black")
    ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    ratios = [r.x_fp_mean for r in rows if r.x_fp_mean is not None] + [1.0]
    # A log axis when the rows span orders of magnitude (W4A4 round-to-nearest is tens of
    # times full precision); otherwise a linear one starting just below the best row.
    logarithmic = max(ratios) / min(ratios) > 3
    if logarithmic:
        ax.set_yscale("log")
    else:
        span = max(ratios) - min(ratios)
        ax.set_ylim(min(ratios) - 0.1 * span - 1e-3, max(ratios) + 0.1 * span + 1e-3)
    ax.yaxis.set_major_formatter(lambda value, _pos: f"{value:g}")
    ax.set_xticks(range(len(bits)), bits)
    ax.set_ylabel("perplexity × full precision" + (" (log)" if logarithmic else ""))
    ax.set_title(f"{result.protocol.model}: full precision {fp:.2f}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: ComparisonResult, out_dir: str | os.PathLike[str], *, plot: bool = True) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.csv``, ``compare.json`` and (``plot``) ``compare.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "markdown": out / "compare.md",
        "csv": out / "compare.csv",
        "json": out / "compare.json",
    }
    written["markdown"].write_text(to_markdown(result), encoding="utf-8")
    written["csv"].write_text(to_csv(result), encoding="utf-8")
    written["json"].write_text(to_json(result), encoding="utf-8")
    if plot:
        written["png"] = plot_bars(result, out / "compare.png")
    return written
