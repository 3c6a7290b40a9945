"""Which pair should the learned refinement train a layer on? Held-out error of one SmolLM2 layer.

Layers ``0..L-1`` of SmolLM2-135M are quantized with ``METHOD`` (closed form),
then layer ``L`` is quantized with ``refine="lwc"`` three times, training on a
different (input, target) pair each time, and once without refinement:

* ``pipeline``: the quantized layers' outputs as inputs, the float layer run
  on them as target (what the pipeline hands ``refine_layer``);
* ``fp-inputs``: the full-precision chain's inputs and the float layer's
  outputs on them;
* ``fp-chain``: quantized inputs, the full-precision chain's outputs as target
  (OmniQuant's default).

Every variant calibrates its closed-form plan on the quantized inputs; only
the training pair differs. Printed: mean squared error on held-out sequences
(quantized inputs) against the float layer on those inputs and against the
full-precision chain.

    python bench/refine_inputs.py --layer 3
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace

import torch

from quantcompose import pipeline
from quantcompose.data import calibration_tokens
from quantcompose.models import get_adapter
from quantcompose.models.loading import load_model
from quantcompose.plugin_manager import get_plugin_manager
from quantcompose.quant.weight_quantizers import get_weight_quantizer
from quantcompose.strategy import QuantSettings


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def _run(layers, inputs):
    with torch.no_grad():
        for layer in layers:
            inputs = [(_output(layer(h, **kw)), kw) for h, kw in inputs]
    return inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="duquant")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=4, help="calibration (and training) sequences")
    parser.add_argument("--held-out", type=int, default=2)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--weight-quantizer", default="rtn")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    settings = QuantSettings(wbits=4, abits=4, weight_quantizer=args.weight_quantizer)
    refined = replace(settings, refine="lwc", refine_epochs=args.epochs, refine_samples=0)
    tokens = calibration_tokens("random-zipf", tokenizer, nsamples=args.nsamples + args.held_out,
                                seqlen=args.calib_seqlen, seed=0)
    fp_layers = get_adapter(model).layers()
    with torch.no_grad():
        first = pipeline.capture_first_layer_inputs(model, fp_layers, tokens, batch_size=len(tokens))
    fp_in = _run(fp_layers[: args.layer], first)
    fp_chain_out = _run([fp_layers[args.layer]], fp_in)

    quantized = copy.deepcopy(model)
    adapter = get_adapter(quantized)
    manager = get_plugin_manager()
    run = pipeline.start_run(quantized, tokens[: args.nsamples], args.method, settings, {}, manager=manager,
                             progress=False)
    inputs = pipeline.capture_first_layer_inputs(quantized, adapter.layers(), tokens[: args.nsamples], 4)
    q_first = pipeline.capture_first_layer_inputs(quantized, adapter.layers(), tokens, batch_size=len(tokens))
    for index in range(args.layer):
        inputs = pipeline.quantize_layer_step(run, index, adapter.layers()[index], inputs)
    q_in = _run(adapter.layers()[: args.layer], q_first)  # every sequence, through the quantized layers
    n = args.nsamples

    def split(pairs):
        (hidden, kwargs), = pairs
        return [(hidden[:n], kwargs)], [(hidden[n:], kwargs)]

    q_train, q_held = split(q_in)
    fp_train, _ = split(fp_in)
    fp_layer = fp_layers[args.layer]
    with torch.no_grad():
        fp_on_q_held = _output(fp_layer(*q_held[0][:1], **q_held[0][1]))
        chain_held = fp_chain_out[0][0][n:]
        pairs = {
            "pipeline": None,
            "fp-inputs": (fp_train, [_output(fp_layer(fp_train[0][0], **fp_train[0][1]))]),
            "fp-chain": (q_train, [fp_chain_out[0][0][:n]]),
        }
    original = pipeline.refine_layer
    print(f"{args.model} layer {args.layer}, {args.method} W4A4 ({args.weight_quantizer} weights) on layers "
          f"0-{args.layer - 1}; {n} x {args.calib_seqlen} random-zipf training sequences, {args.held_out} held out; "
          f"{args.epochs} epochs")
    print(f"{'trained on':12s} {'vs float layer':>15s} {'vs fp chain':>12s} {'seconds':>8s}")
    for name, pair in [("closed form", "skip"), *pairs.items()]:
        def patched(ctx, s, pair=pair):
            if pair is not None:
                ctx = replace(ctx, inputs=pair[0], fp_outputs=pair[1])
            return original(ctx, s)

        pipeline.refine_layer = patched
        try:
            layer = copy.deepcopy(adapter.layers()[args.layer])
            job_settings = settings if pair == "skip" else refined
            job = pipeline.LayerJob(
                layer=layer, index=args.layer, places=adapter.places(layer), inputs=q_train,
                strategy=manager.get(args.method), options=manager.resolve(args.method, {}, job_settings),
                settings=job_settings, weight_quantizer=get_weight_quantizer(args.weight_quantizer),
                generator=torch.Generator().manual_seed(0), progress=False)
            start = time.perf_counter()
            pipeline.quantize_layer(job)
            seconds = time.perf_counter() - start
        finally:
            pipeline.refine_layer = original
        with torch.no_grad():
            out = _output(layer(q_held[0][0], **q_held[0][1]))
        print(f"{name:12s} {float((out - fp_on_q_held).pow(2).mean()):15.4f} "
              f"{float((out - chain_held).pow(2).mean()):12.4f} {seconds:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
