"""The training-memory estimator: ZeRO accounting on known numbers, and the traced activation estimate against
the memory a real CPU training step takes."""

import json
import math
import os
import subprocess
import sys

import pytest

from pixelgen.families import build_generator
from pixelgen.models import count_params
from pixelgen.models.config import DecoderConfig, ModelConfig, TrunkConfig
from pixelgen.models.memory import estimate_memory, model_state_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
TINY = ModelConfig(trunk=TrunkConfig(size="tiny", patch_size=4), num_classes=NUM_CLASSES)


def decoder_only(name: str) -> bool:
    return name.startswith("decoder.")


@pytest.fixture(scope="module")
def tiny_estimate():
    """bf16, everything trains, ZeRO-2 over 4 ranks: shared by the tests below (each estimate costs two traces)."""
    return estimate_memory(TINY, 32, world_size=4, zero_stage=2)


def test_zero_stages_partition_exactly_their_parts(tiny_estimate):
    """bf16: 2 B weights, 2 B grads, 12 B optimizer states per parameter; stage k splits the k-th part over the
    ranks (1: optimizer states, 2: + gradients, 3: + weights), and the rest stays whole."""
    n = 1_000_003  # not a multiple of 4: each rank's partition is padded to ceil(n / 4)
    quarter = 250_001
    expected = {  # stage: (weights, gradients, optimizer states)
        0: (2 * n, 2 * n, 12 * n),
        1: (2 * n, 2 * n, 12 * quarter),
        2: (2 * n, 2 * quarter, 12 * quarter),
        3: (2 * quarter, 2 * quarter, 12 * quarter),
    }
    for stage, parts in expected.items():
        assert model_state_bytes(n, n, world_size=4, zero_stage=stage, precision="bf16") == parts, stage
    assert model_state_bytes(n, n, world_size=4, zero_stage=0, precision="fp32") == (4 * n, 4 * n, 8 * n)
    # Frozen parameters are weights only, partitioned by stage 3 like the rest.
    assert model_state_bytes(n, 3, world_size=4, zero_stage=3, precision="bf16") == (2 * quarter, 2, 12)

    est = tiny_estimate  # ZeRO-2 over 4 ranks
    n, quarter = est.params_total, math.ceil(est.params_total / 4)
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == (2 * n, 2 * quarter, 12 * quarter)
    assert est.ema_bytes == 4 * quarter  # the trainer's fp32 EMA is sharded like the fp32 masters it averages
    two = estimate_memory(TINY, 32, world_size=4, zero_stage=0, emas=2)  # ema_decays of two entries
    assert two.ema_bytes == 2 * 4 * n  # whole on every rank without ZeRO, one copy per decay
    assert est.model_state_bytes + est.activation_bytes == est.total_bytes


def test_frozen_params_cost_only_their_weights(tiny_estimate):
    model = build_generator(TINY, 32)
    n_total, n_decoder = count_params(model), count_params(model.decoder)
    assert tiny_estimate.params_total == tiny_estimate.params_trainable == n_total
    est = estimate_memory(TINY, 32, world_size=1, zero_stage=0, trainable=decoder_only)
    assert (est.params_total, est.params_trainable) == (n_total, n_decoder)
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes, est.ema_bytes) == (
        2 * n_total, 2 * n_decoder, 12 * n_decoder, 4 * n_decoder)
    # A frozen trunk records nothing for backward: its depth leaves the activations unchanged.
    assert est.activations_per_sample < tiny_estimate.activations_per_sample
    deeper = ModelConfig(trunk=TrunkConfig(patch_size=4, dim=64, depth=6, heads=4),  # "tiny" has depth 2
                         decoder=DecoderConfig(pixel_dim=8, depth=1, heads=4), num_classes=NUM_CLASSES)
    deeper_est = estimate_memory(deeper, 32, world_size=1, zero_stage=0, trainable=decoder_only)
    assert deeper_est.params_total > n_total
    assert deeper_est.activations_per_sample == est.activations_per_sample


def test_bf16_halves_activations_except_what_computes_in_fp32(tiny_estimate):
    fp32 = estimate_memory(TINY, 32, precision="fp32").activations_per_sample
    bf16 = tiny_estimate.activations_per_sample
    # RMSNorm, RoPE and the loss save fp32 tensors whatever the model's dtype.
    assert 0.5 * fp32 < bf16 < 0.8 * fp32


def test_checkpointing_cuts_a_deep_decoders_activations():
    cfg = ModelConfig(trunk=TrunkConfig(patch_size=4, dim=64, depth=2, heads=4),
                      decoder=DecoderConfig(kind="pit", pixel_dim=16, depth=6, heads=4), num_classes=NUM_CLASSES)
    est = estimate_memory(cfg, 32, batch_size=4, trainable=decoder_only)
    # Six blocks' saves become their six inputs plus one block's saves, recomputed in backward.
    assert est.activations_per_sample_checkpointed < 0.35 * est.activations_per_sample
    assert est.activation_bytes == 4 * est.activations_per_sample  # the config checkpoints nothing

    # Checkpointing only the decoder while everything trains lands between none and all.
    cfg.decoder.activation_checkpointing = True
    est = estimate_memory(cfg, 32, batch_size=4)
    assert (est.activations_per_sample_checkpointed < est.activations_per_sample_configured
            < est.activations_per_sample)
    assert est.activation_bytes == 4 * est.activations_per_sample_configured


# Small enough for a few seconds per step on one CPU thread, big enough that activations are 25-125 MiB and
# allocator noise (a few MiB) stays small. Patch 8 at 64 px: 64 patches of 64 pixels per image.
MEASURED_TRUNK = dict(patch_size=8, dim=64, depth=2, heads=4)
MEASURED_DECODERS = {  # name -> DecoderConfig keywords
    "pit pixel_dim 16": dict(kind="pit", pixel_dim=16, depth=2, heads=4),
    "pit pixel_dim 32": dict(kind="pit", pixel_dim=32, depth=2, heads=4),
    "pit attention pixel": dict(kind="pit", pixel_dim=16, depth=2, heads=4, attention="pixel", attn_dim=32),
    "mlp adaln factored": dict(kind="mlp", pixel_dim=16, depth=4, adaln="factored"),
    "mixer adaln patch": dict(kind="mixer", pixel_dim=16, depth=2, adaln="patch"),
}
# (name, precision): fp32 for every decoder; bf16 (the GPU's training dtype) for one, which checks the casts
# and the fp32 islands (RMSNorm, RoPE, loss) the trace keeps.
MEASURED_CASES = [(name, "fp32") for name in MEASURED_DECODERS] + [("pit pixel_dim 16", "bf16")]
MEASURED_RESOLUTION, MEASURED_BATCH = 64, 4


@pytest.fixture(scope="module")
def measured_steps():
    """(name, precision, checkpointing) -> bytes that one training step (forward + flow-matching loss +
    backward) grows the resident memory by: the peak during the step minus what was resident just before it,
    which already holds the model, its pre-allocated gradients and the input batch. Measured in a fresh
    interpreter (tests/memory_probe.py), each config in its own forked child, started before the test computes
    the estimates so the two overlap on the two CPUs."""
    names, cases = [], []
    for name, precision in MEASURED_CASES:
        for ckpt in (False, True):
            names.append((name, precision, ckpt))
            cases.append({"trunk": dict(MEASURED_TRUNK, activation_checkpointing=ckpt),
                          "decoder": dict(MEASURED_DECODERS[name], activation_checkpointing=ckpt),
                          "precision": precision})
    spec = {"resolution": MEASURED_RESOLUTION, "batch": MEASURED_BATCH, "num_classes": NUM_CLASSES, "cases": cases}
    # Every free of a block over 64 KiB goes back to the OS at once, so resident memory follows live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tests.memory_probe", json.dumps(spec)], cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield names, proc
    if proc.poll() is None:  # the test failed before collecting it
        proc.kill()
        proc.wait()


def estimated_steps(name: str, precision: str) -> tuple[int, int]:
    """Estimated activations of the batch (without, with checkpointing)."""
    cfg = ModelConfig(trunk=TrunkConfig(**MEASURED_TRUNK), decoder=DecoderConfig(**MEASURED_DECODERS[name]),
                      num_classes=NUM_CLASSES)
    est = estimate_memory(cfg, MEASURED_RESOLUTION, batch_size=MEASURED_BATCH, precision=precision)
    return MEASURED_BATCH * est.activations_per_sample, MEASURED_BATCH * est.activations_per_sample_checkpointed


def test_activation_estimate_matches_a_measured_cpu_step(measured_steps):
    """Estimated activations vs the measured growth of one CPU training step (peak during forward + loss +
    backward, minus what was resident before it: model, pre-allocated gradients, batch), within 25% for every
    decoder kind, with and without checkpointing. The estimate counts what autograd saves (with checkpointing:
    the saves outside the blocks, the kept block inputs and one block's recompute); it misses backward's
    transient buffers (estimate a few percent under) and, with checkpointing, counts every outside save as
    alive during each recompute though backward has freed the later ones (a few percent over)."""
    names, proc = measured_steps
    estimates = {}
    for name, precision in MEASURED_CASES:
        plain, ckpt = estimated_steps(name, precision)
        estimates[name, precision, False], estimates[name, precision, True] = plain, ckpt
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    failures, report = [], []
    for key, result in zip(names, json.loads(out)):
        assert "error" not in result, (key, result["error"])
        measured = result["peak"] - result["before"]
        ratio = estimates[key] / measured
        report.append(f"{key[0]:<22} {key[1]} ckpt={key[2]!s:<5} measured {measured / 2**20:6.1f} MiB  "
                      f"estimated {estimates[key] / 2**20:6.1f} MiB  ratio {ratio:.2f}")
        if not 0.75 <= ratio <= 1.25:
            failures.append(key)
    print("\n".join(report))
    assert not failures, "\n".join(report)
