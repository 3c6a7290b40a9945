"""Peak resident memory and time of offloaded quantization against loading the model whole.

Each run is its own subprocess, so its peak (``ru_maxrss``) is its own: the
in-memory run loads the safetensors checkpoint whole with ``transformers``
and quantizes it with :func:`quantcompose.quantize`; the offloaded run
quantizes the same checkpoint with :func:`quantcompose.offload.quantize_offloaded`.
Both save the result (the same format) and use the same recipe and
calibration tokens. A third subprocess that only imports the libraries gives
the fixed cost of the interpreter, torch and transformers, printed too.

Models: SmolLM2-135M (written once from its GGUF to a temporary safetensors
folder with :func:`quantcompose.checkpoint.write_checkpoint`) and two random Llama toys of the same width
with ``--toy-layers`` layers (default 4 and 32), to show that the offloaded
peak does not grow with depth while the in-memory one does.

    python bench/offload_memory.py                       # the full figures
    python bench/offload_memory.py --nsamples 4 --calib-seqlen 128 --weight-quantizer rtn   # quick
    python bench/offload_memory.py --no-smollm2          # toys only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux reports KiB


def _recipe(args: argparse.Namespace) -> dict:
    return {"method": args.method, "wbits": args.wbits, "abits": args.abits, "weight_quantizer": args.weight_quantizer,
            "seed": 0, "calibration": {"source": "random-zipf", "nsamples": args.nsamples, "seqlen": args.calib_seqlen}}


def worker(args: argparse.Namespace) -> None:
    """One measured run; prints one JSON line."""
    import torch

    start = time.perf_counter()
    if args.worker == "baseline":
        import transformers  # noqa: F401

        import quantcompose.offload  # noqa: F401
        seconds = 0.0
    elif args.worker == "offload":
        from quantcompose.offload import quantize_offloaded

        report = quantize_offloaded(args.checkpoint, args.output, _recipe(args), progress=False)
        seconds = report.seconds
    else:
        from transformers import AutoModelForCausalLM

        from quantcompose import quantize
        from quantcompose.saving import save_quantized

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
        model, report = quantize(model, recipe=_recipe(args), progress=False)
        save_quantized(model, args.output)
        seconds = report.seconds
    print(json.dumps({"peak_mib": _peak_mib(), "wall_s": time.perf_counter() - start, "quantize_s": seconds}))


def _measure(mode: str, checkpoint: Path, output: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--checkpoint", str(checkpoint), "--output", str(output),
               "--method", args.method, "--wbits", str(args.wbits), "--abits", str(args.abits),
               "--weight-quantizer", args.weight_quantizer, "--nsamples", str(args.nsamples),
               "--calib-seqlen", str(args.calib_seqlen)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _write_smollm2(folder: Path) -> None:
    # In a subprocess: the GGUF de-quantization's memory must not count in this process either.
    code = ("import sys; from quantcompose.models.loading import load_model; "
            "from quantcompose.checkpoint import write_checkpoint; "
            "m, t = load_model('smollm2-135m'); write_checkpoint(m, sys.argv[1], t)")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, capture_output=True)


def _write_toy(folder: Path, layers: int, hidden: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 63) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=("memory", "offload", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="duquant")
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=4)
    parser.add_argument("--weight-quantizer", default="gptq", choices=("rtn", "gptq"))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--toy-layers", type=int, nargs="*", default=[4, 32])
    parser.add_argument("--toy-hidden", type=int, default=512)
    parser.add_argument("--no-smollm2", action="store_true")
    args = parser.parse_args()
    if args.worker is not None:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models: list[tuple[str, Path]] = []
        if not args.no_smollm2:
            _write_smollm2(root / "smollm2")
            models.append(("SmolLM2-135M", root / "smollm2"))
        for layers in args.toy_layers:
            _write_toy(root / f"toy{layers}", layers, args.toy_hidden)
            models.append((f"toy Llama, {layers} layers, hidden {args.toy_hidden}", root / f"toy{layers}"))
        baseline = _measure("baseline", root, root / "unused", args)["peak_mib"]
        print(f"{args.method} W{args.wbits}A{args.abits}, {args.weight_quantizer}, calibration "
              f"{args.nsamples} x {args.calib_seqlen} random-zipf tokens; imports alone: {baseline:.0f} MiB\n")
        print("| model | in memory: peak MiB | offloaded: peak MiB | offloaded / in memory (peak) "
              "| above imports: in memory / offloaded MiB | in memory: s | offloaded: s | offloaded / in memory (time) |")
        print("| --- " * 8 + "|")
        for name, checkpoint in models:
            whole = _measure("memory", checkpoint, root / f"{checkpoint.name}-memory", args)
            offloaded = _measure("offload", checkpoint, root / f"{checkpoint.name}-offload", args)
            print(f"| {name} | {whole['peak_mib']:.0f} | {offloaded['peak_mib']:.0f} "
                  f"| {offloaded['peak_mib'] / whole['peak_mib']:.2f} "
                  f"| {whole['peak_mib'] - baseline:.0f} / {offloaded['peak_mib'] - baseline:.0f} "
                  f"| {whole['wall_s']:.1f} | {offloaded['wall_s']:.1f} "
                  f"| {offloaded['wall_s'] / whole['wall_s']:.2f} |", flush=True)
        print("\ntimes are wall clock of the whole run (load, quantize, save), each in a fresh process")


if __name__ == "__main__":
    main()
