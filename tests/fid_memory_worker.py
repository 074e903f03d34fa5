"""Peak memory of the FID stage's sampling path against the number of images, for tests/test_fid_stage.py.

    MALLOC_MMAP_THRESHOLD_=65536 python -m tests.fid_memory_worker SPEC_JSON

spec: {"folder": str, "weights": str (Inception), "resolution": int, "chunk_size": int, "batch_size": int,
       "counts": [images per class, ...], "num_classes": int}
Each count runs in a child forked after the imports and an Inception warm-up: the chunks are drawn and
featurised (pixelgen.eval.sampling.draw_chunks, real torch-fidelity InceptionV3), scored from the chunks
(compute_metrics over feature_chunks) and assembled into samples.npz, as the stage does. The generator is a
stand-in that turns each image's noise stream into an image: what is measured is the pipeline around it.
Prints one JSON list: per count, the resident bytes before and the peak (VmHWM, reset first) during the run.
"""

import gc
import json
import sys
from pathlib import Path

import torch

from pixelgen import noise
from pixelgen.eval import fid, sampling
from tests.memory_probe import in_child, peak_resident_bytes, resident_bytes


def run(spec: dict, per_class: int, extractor) -> dict:
    res = spec["resolution"]
    folder = Path(spec["folder"]) / f"per_class{per_class}"
    plan = sampling.Plan(spec["num_classes"], per_class, spec["chunk_size"], spec["batch_size"], 0, {"test": 1})

    def draw(model, y, g):
        return noise.randn((len(y), 3, res, res), g).tanh()

    gc.collect()
    before = resident_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    todo = sampling.open_plan(folder, plan)
    assert sampling.draw_chunks(folder, plan, todo, draw, None, extractor, torch.device("cpu"))
    gen = fid.summarise(sampling.feature_chunks(folder, plan))
    reference = {k: gen[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "features")}
    fid.compute_metrics(gen, reference, list(fid.Metric))
    sampling.write_samples_npz(folder, plan, folder / "samples.npz")
    return {"before": before, "peak": peak_resident_bytes(),
            "image_bytes": plan.num_samples * 3 * res * res}


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    extractor = fid.InceptionFeatures(spec["weights"], batch_size=spec["batch_size"])
    extractor(torch.zeros(spec["batch_size"], 3, spec["resolution"], spec["resolution"], dtype=torch.uint8))
    results = [in_child(lambda per_class=per_class: run(spec, per_class, extractor)) for per_class in spec["counts"]]
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"a measuring child failed: {failed[0]}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
