"""Saved size and load time of a W4A8 DuQuant SmolLM2 (RTN weights), for comparing saved formats.

Quantizes with whichever quantcompose is importable, saves to OUT, and loads
it back five times:

    python bench/load_time.py /tmp/new_save
    # the format before the integrity checks (issue 13's "today"), from a worktree of that commit:
    git worktree add --detach /tmp/old d44ef77^   # then give it a PYTHONPATH shim of its packages
    PYTHONPATH=/tmp/old/.shim python bench/load_time.py /tmp/old_save

Only the DuQuant plugin is registered, so the script also runs against
versions whose other plugins differ.
"""

import shutil
import statistics
import sys
import time
from pathlib import Path

import quantcompose
import quantcompose_plugins.duquant as duquant
from quantcompose.data import calibration_tokens
from quantcompose.models.loading import load_model
from quantcompose.pipeline import quantize_model
from quantcompose.plugin_manager import StrategyManager
from quantcompose.saving import load_quantized, save_quantized
from quantcompose.strategy import QuantSettings


def main() -> None:
    out = Path(sys.argv[1])
    model, tokenizer = load_model("smollm2-135m")
    calib = calibration_tokens("random", tokenizer, nsamples=4, seqlen=256, seed=0, vocab_size=model.config.vocab_size)
    manager = StrategyManager(load_entry_points=False)
    manager.register(duquant)
    settings = QuantSettings(wbits=4, abits=8, weight_quantizer="rtn")
    quantize_model(model, calib, "duquant", settings, manager=manager, progress=False)
    if out.exists():
        shutil.rmtree(out)
    save_quantized(model, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    del model
    times = []
    for _ in range(5):
        start = time.perf_counter()
        loaded, _ = load_quantized(out)
        times.append(time.perf_counter() - start)
        del loaded
    print(f"{quantcompose.__file__}: {size / 2**20:.1f} MiB on disk, load times "
          f"{[round(t, 2) for t in times]} s, median {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()
