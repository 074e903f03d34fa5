"""FID / IS through torch-fidelity with a seeded random-init InceptionV3 (no weights download possible here).

On 2 CPU cores InceptionV3 at 299x299 costs ~0.15 s per image and each FID (torch-fidelity's eigvals of a
2048x2048 matrix) several seconds, so the image sets are small and shared features and metrics are computed
once per session.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from pixelgen.eval.config import FIDConfig
from pixelgen.eval.fid import (
    WEIGHTS_ENV,
    InceptionFeatures,
    compute_metrics,
    load_statistics,
    protocol,
    reference_statistics,
    resolve_inception_weights,
    save_statistics,
)

NUM_IMAGES = 16
BATCH = 8
NOISE_LEVELS = (8.0, 32.0)  # std of additive noise in uint8 units


def structured_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Coloured rectangles and discs on colour gradients: real structure, unlike pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    images = []
    for _ in range(n):
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3
        img = rng.uniform(0, 1, (3, 1, 1)) * t + rng.uniform(0, 1, (3, 1, 1)) * (1 - t)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            r = rng.uniform(0.1, 0.3)
            if rng.random() < 0.5:
                mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
            else:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            img = np.where(mask, rng.uniform(0, 1, (3, 1, 1)), img)
        images.append(img)
    return torch.from_numpy((np.stack(images) * 255).round().astype(np.uint8))


def add_noise(images: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    # One noise field for all levels, so a larger level is strictly the same perturbation, stronger.
    noise = torch.from_numpy(np.random.default_rng(seed).standard_normal(images.shape))
    return (images.double() + std * noise).round().clamp(0, 255).to(torch.uint8)


class TensorImages(Dataset):
    """uint8 CHW tensors, the Dataset form torch-fidelity's calculate_metrics accepts."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    # Real weights named in the environment would take precedence over the random ones these tests need.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(WEIGHTS_ENV, raising=False)
        cfg = FIDConfig(allow_random_features=True, seed=0)
        return resolve_inception_weights(cfg, str(tmp_path_factory.mktemp("inception")))


@pytest.fixture(scope="session")
def extractor(weights):
    # One batch shape throughout: each new shape costs a slow first pass on CPU, and small batches run fastest.
    return InceptionFeatures(weights[0], batch_size=BATCH)


@pytest.fixture(scope="session")
def base_images():
    return structured_images(NUM_IMAGES)


@pytest.fixture(scope="session")
def base_features(extractor, base_images):
    return extractor(base_images)


@pytest.fixture(scope="session")
def ref_stats(base_features):
    return reference_statistics(base_features["2048"])


@pytest.fixture(scope="session")
def noisy_metrics(extractor, base_images, ref_stats):
    return [compute_metrics(extractor(add_noise(base_images, std)), ref_stats, isc_splits=4) for std in NOISE_LEVELS]


def test_random_weights_are_proxy_cached_and_deterministic(weights, extractor, tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    path, is_proxy = weights
    assert is_proxy and os.path.basename(path) == "inception-random-seed0.pth"
    mtime = os.stat(path).st_mtime_ns
    reused = resolve_inception_weights(FIDConfig(allow_random_features=True, seed=0), os.path.dirname(path))
    assert reused == (path, True)
    assert os.stat(path).st_mtime_ns == mtime, "an existing weights file must be reused, not rewritten"

    again, _ = resolve_inception_weights(FIDConfig(allow_random_features=True, seed=0), str(tmp_path / "a"))
    other, _ = resolve_inception_weights(FIDConfig(allow_random_features=True, seed=1), str(tmp_path / "b"))
    sd, sd_again, sd_other = (torch.load(p, weights_only=True) for p in (path, again, other))
    assert sd.keys() == sd_again.keys() == sd_other.keys()
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)
    assert not torch.equal(sd["Conv2d_1a_3x3.conv.weight"], sd_other["Conv2d_1a_3x3.conv.weight"])

    images = structured_images(2, seed=5)
    a, b = extractor(images), InceptionFeatures(again)(images)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_load_in_torch_fidelity_itself(weights):
    # Strict load_state_dict inside torch-fidelity's own constructor: same keys and shapes as the real file.
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights[0])
    assert model.fc.weight.shape == (1008, 2048)


def test_features_shapes_finite_and_not_collapsed(base_features):
    f, logits = base_features["2048"], base_features["logits_unbiased"]
    assert f.dtype == logits.dtype == torch.float64
    assert f.shape == (NUM_IMAGES, 2048) and logits.shape == (NUM_IMAGES, 1008)
    assert torch.isfinite(f).all() and torch.isfinite(logits).all()
    # Distinct images must span the full (N-1)-dim centred space; collapsed features would not.
    assert torch.linalg.matrix_rank(f - f.mean(0)) == NUM_IMAGES - 1
    assert (f.std(0) > 0).float().mean() > 0.5


def test_any_resolution_and_streaming_match(extractor, base_images, base_features):
    big = torch.nn.functional.interpolate(base_images[:BATCH].float(), size=(48, 40)).to(torch.uint8)
    assert extractor(big)["2048"].shape == (BATCH, 2048)
    labels = torch.zeros(BATCH, dtype=torch.long)
    batches = [(base_images[:BATCH], labels), base_images[BATCH : 2 * BATCH]]
    streamed = extractor.extract(batches, progress=True, total=2)
    assert torch.allclose(streamed["2048"], base_features["2048"][: 2 * BATCH], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="uint8"):
        extractor(base_images.float())


def test_fid_self_zero_and_monotonic_in_noise(base_features, ref_stats, noisy_metrics):
    self_fid = compute_metrics(base_features, ref_stats)["fid"]
    fids = [m["fid"] for m in noisy_metrics]
    assert abs(self_fid) < 1e-3 * fids[0]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_matches_torch_fidelity_calculate_metrics(weights, base_images, noisy_metrics):
    ours = noisy_metrics[-1]
    theirs = torch_fidelity.calculate_metrics(
        input1=TensorImages(add_noise(base_images, NOISE_LEVELS[-1])),
        input2=TensorImages(base_images),
        fid=True,
        isc=True,
        isc_splits=4,
        batch_size=BATCH,
        feature_extractor_weights_path=weights[0],
        cache=False,
        cuda=False,
        save_cpu_ram=True,
        verbose=False,
    )
    assert ours["fid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-4)
    # IS of a random network sits close to 1, so compare its excess over 1.
    isc_excess = theirs[torch_fidelity.KEY_METRIC_ISC_MEAN] - 1
    assert isc_excess > 1e-3
    assert ours["isc_mean"] - 1 == pytest.approx(isc_excess, rel=1e-4)
    assert ours["isc_std"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_STD], rel=1e-3)


def test_isc_splits_clamped_to_sample_count():
    # Small stand-in features: the clamp does not need the network, and a 2048-d FID costs seconds.
    rng = np.random.default_rng(0)
    features = {"2048": torch.from_numpy(rng.standard_normal((6, 8))), "logits_unbiased": torch.randn(6, 10)}
    result = compute_metrics(features, reference_statistics(torch.from_numpy(rng.standard_normal((30, 8)))))
    assert result["isc_splits"] == 6
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    # One sample per split: p(y|x) equals the split's marginal, so each split scores exactly 1.
    assert result["isc_mean"] == pytest.approx(1.0) and result["isc_std"] == pytest.approx(0.0, abs=1e-12)


def test_missing_weights_without_random_features(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="fid.inception_weights") as err:
        resolve_inception_weights(FIDConfig(), str(tmp_path))
    message = str(err.value)
    assert WEIGHTS_ENV in message and "weights-inception-2015-12-05-6726825d.pth" in message
    assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" in message
    assert "fid.allow_random_features=true" in message
    assert not list(tmp_path.iterdir()), "no random weights may be written without allow_random_features"


def test_named_weights_path(monkeypatch, tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="fid.inception_weights") as err:
        resolve_inception_weights(FIDConfig(inception_weights=missing, allow_random_features=True), str(tmp_path))
    assert missing in str(err.value)

    monkeypatch.setenv(WEIGHTS_ENV, missing)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_ENV) as err:
        resolve_inception_weights(FIDConfig(allow_random_features=True), str(tmp_path))
    assert missing in str(err.value)

    real = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    real.write_bytes(b"stand-in")
    monkeypatch.setenv(WEIGHTS_ENV, str(real))
    assert resolve_inception_weights(FIDConfig(), str(tmp_path)) == (str(real), False)


def test_wrong_weights_format_is_a_clear_error(tmp_path):
    path = tmp_path / "pt_inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="pt_inception.pth"):
        InceptionFeatures(str(path))


def test_statistics_round_trip_and_corruption(tmp_path):
    features = torch.from_numpy(np.random.default_rng(0).standard_normal((20, 8)))
    stats = reference_statistics(features)
    meta = {"split": "val", "num_images": 20, "weights_sha256": "ab" * 32}
    path = str(tmp_path / "ref.npz")
    save_statistics(path, stats, meta)
    assert sorted(os.listdir(tmp_path)) == ["ref.npz"], "no temp file may be left behind"
    loaded, loaded_meta = load_statistics(path)
    assert np.array_equal(loaded["mu"], stats["mu"]) and np.array_equal(loaded["sigma"], stats["sigma"])
    assert loaded_meta == meta

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(Path(path).read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(ValueError, match="truncated.npz"):
        load_statistics(str(truncated))
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_statistics(str(tmp_path / "absent.npz"))


def test_protocol_labels_proxy(weights):
    path, is_proxy = weights
    info = protocol(FIDConfig(allow_random_features=True), path, is_proxy, num_gen=10, num_ref=20)
    assert info["metric_name"].startswith("proxy-FID") and info["proxy"] is True
    assert info["feature_extractor"] == "torch-fidelity InceptionV3 2048-d pool3"
    assert info["weights_sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert (info["num_gen"], info["num_ref"]) == (10, 20)
    assert info["torch_fidelity_version"] == torch_fidelity.__version__
    assert protocol(FIDConfig(), path, False, 10, 20)["metric_name"] == "FID"


# ----------------------------------------------------------------------------- sFID, precision/recall, references
def test_spatial_features_are_adms_mixed_6_conv_first_7_channels_in_nhwc_order(weights, base_images, base_features):
    """ADM's sFID layer `mixed_6/conv` is torch-fidelity's Mixed_6d.branch1x1 (conv + BN + ReLU); its first 7
    channels, flattened channel-last, line up with ADM's mu_s / sigma_s element for element."""
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights[0])
    seen = []
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    with torch.inference_mode():
        model(base_images[:4])
    (maps,) = seen
    assert maps.shape == (4, 192, 17, 17)  # at torch-fidelity's 299 px
    nhwc = maps[:, :7].permute(0, 2, 3, 1).reshape(4, -1).double()
    assert base_features["spatial"].shape == (NUM_IMAGES, 17 * 17 * 7)
    torch.testing.assert_close(base_features["spatial"][:4], nhwc, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(maps[:, :7].reshape(4, -1).double(), nhwc)  # the order is a real choice


def _frechet_numpy(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _precision_recall_numpy(gen: np.ndarray, ref: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al.'s improved precision/recall, as ADM computes it: a point of one set is covered when
    it lies within the k-th-nearest-neighbour radius of some point of the other set."""
    def dist(x, y):
        return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))

    radius_ref = np.sort(dist(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    radius_gen = np.sort(dist(gen, gen), axis=1)[:, k]
    precision = (dist(gen, ref) <= radius_ref[None, :]).any(1).mean()
    recall = (dist(ref, gen) <= radius_gen[None, :]).any(1).mean()
    return float(precision), float(recall)


def test_sfid_and_precision_recall_match_an_independent_numpy_computation():
    from pixelgen.eval.fid import reference_from_features

    rng = np.random.default_rng(0)
    # Small stand-in features (the metrics do not care where they come from): overlapping, shifted clouds.
    ref = {"2048": rng.standard_normal((60, 6)), "spatial": rng.standard_normal((60, 5)),
           "logits_unbiased": rng.standard_normal((60, 10))}
    gen = {"2048": rng.standard_normal((50, 6)) * 1.3 + 0.4, "spatial": rng.standard_normal((50, 5)) + 0.5,
           "logits_unbiased": rng.standard_normal((50, 10))}
    ref_t, gen_t = ({k: torch.from_numpy(v) for k, v in d.items()} for d in (ref, gen))
    reference = reference_from_features(ref_t, prc_images=60)
    out = compute_metrics(gen_t, reference, ["fid", "sfid", "precision_recall"])
    assert out["fid"] == pytest.approx(_frechet_numpy(gen["2048"], ref["2048"]), rel=1e-6)
    assert out["sfid"] == pytest.approx(_frechet_numpy(gen["spatial"], ref["spatial"]), rel=1e-6)
    precision, recall = _precision_recall_numpy(gen["2048"].astype(np.float32), ref["2048"].astype(np.float32))
    assert 0 < precision < 1 and 0 < recall < 1  # a comparison that can tell
    assert (out["precision"], out["recall"]) == pytest.approx((precision, recall), abs=1e-6)  # counts of 50, 60
    # Fewer reference images for P/R: the first ones, as documented.
    assert reference_from_features(ref_t, prc_images=20)["features"].shape == (20, 6)
    with pytest.raises(ValueError, match="mu_s, sigma_s, which sfid needs"):
        compute_metrics(gen_t, {k: reference[k] for k in ("mu", "sigma")}, ["fid", "sfid"])


def _adm_reference(path: Path, images: torch.Tensor, features: dict, stats_only: bool = False) -> Path:
    """A reference batch in ADM's layout: statistics, spatial statistics and the images (uint8 NHWC, arr_0)."""
    pool, spatial = reference_statistics(features["2048"]), reference_statistics(features["spatial"])
    arrays = {"mu": pool["mu"], "sigma": pool["sigma"]}
    if not stats_only:
        arrays.update(mu_s=spatial["mu"], sigma_s=spatial["sigma"], arr_0=images.permute(0, 2, 3, 1).numpy())
    np.savez(path, **arrays)
    return path


def test_an_adm_reference_batch_scores_like_its_own_images(tmp_path, extractor, base_images, base_features):
    from pixelgen.eval.fid import load_reference_images, reference_from_features

    path = _adm_reference(tmp_path / "VIRTUAL_test.npz", base_images, base_features)
    ref, meta = load_statistics(str(path))
    assert meta == {} and {"mu", "sigma", "mu_s", "sigma_s"} <= ref.keys()
    images = load_reference_images(str(path))
    assert torch.equal(images, base_images)
    ref["features"] = extractor(images)["2048"].float().numpy()
    noisy = extractor(add_noise(base_images, NOISE_LEVELS[0]))
    metrics = ["fid", "sfid", "precision_recall"]
    from_file = compute_metrics(noisy, ref, metrics)
    direct = compute_metrics(noisy, reference_from_features(base_features, NUM_IMAGES), metrics)
    assert from_file == pytest.approx(direct, rel=1e-6)
    assert from_file["sfid"] > 0 and 0 <= from_file["precision"] <= 1


def test_a_reference_file_must_hold_what_each_requested_metric_needs(tmp_path, base_images, base_features):
    from pipeline.config import ConfigError, load_config
    from pixelgen.eval.config import missing_reference_keys

    stats_only = _adm_reference(tmp_path / "jit_stats.npz", base_images, base_features, stats_only=True)
    why = missing_reference_keys(str(stats_only), ["fid", "is", "sfid", "precision_recall"])
    assert "sfid needs mu_s, sigma_s" in why and "precision_recall needs arr_0" in why
    assert missing_reference_keys(str(stats_only), ["fid", "is"]) is None
    base = ["data.imagenet_dir=x", f"fid.reference={stats_only}"]
    with pytest.raises(ConfigError, match="jit_stats.npz.*precision_recall needs arr_0"):
        load_config("configs/tiny.yaml", base)  # before anything runs
    assert load_config("configs/tiny.yaml", [*base, "fid.metrics=[fid,is]"]).fid.reference == str(stats_only)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert "not a readable .npz" in missing_reference_keys(str(tmp_path / "broken.npz"), ["fid"])
    with pytest.raises(ConfigError, match="must include fid"):
        load_config("configs/tiny.yaml", ["data.imagenet_dir=x", "fid.metrics=[is]"])


def test_the_fid_stage_takes_a_reference_file_hashes_it_and_featurises_its_images_once(
        tmp_path, extractor, base_images, base_features):
    from pipeline.config import load_config
    from pipeline.stages import _reference

    path = _adm_reference(tmp_path / "VIRTUAL_test.npz", base_images, base_features)
    cfg = load_config("configs/tiny.yaml", ["data.imagenet_dir=x", f"fid.reference={path}"])
    calls = []

    class Counting:
        def extract(self, batches, **kw):
            calls.append(1)
            return extractor.extract(batches, **kw)

    out = tmp_path / "fid"
    out.mkdir()
    ref, count, desc = _reference(cfg, tmp_path, {}, out, Counting(), "weights-sha")
    assert desc == {"reference": "file", "reference_file": str(path.resolve()),
                    "reference_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert count is None  # what the file's statistics summarise is the file's business
    assert ref["features"].shape == (NUM_IMAGES, 2048) and len(calls) == 1
    again, _, _ = _reference(cfg, tmp_path, {}, out, Counting(), "weights-sha")
    assert len(calls) == 1 and np.array_equal(again["features"], ref["features"])  # cached, keyed by the file
    _reference(cfg, tmp_path, {}, out, Counting(), "other-weights")
    assert len(calls) == 2  # other Inception weights: featurised again
    # FID alone on weights of its own (pixelgen import) against a reference file reads no shards; against a split
    # it needs them.
    from pipeline.config import ConfigError
    from pipeline.stages import _needs_shards

    (tmp_path / "w.safetensors").write_bytes(b"")
    alone = ["stages=[fid]", f"fid.weights={tmp_path / 'w.safetensors'}"]
    assert not _needs_shards(load_config("configs/tiny.yaml", [*alone, f"fid.reference={path}"]))
    with pytest.raises(ConfigError, match=r"'data.shard_dir'.*or fid.reference at a reference .npz file"):
        load_config("configs/tiny.yaml", alone)


def test_streamed_statistics_match_torch_fidelitys_over_all_rows_at_once():
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from pixelgen.eval.fid import Moments, summarise

    rng = np.random.default_rng(0)
    # Spread small next to the mean, where a one-pass sum of squares would cancel: the centred merge does not.
    rows = torch.from_numpy(100.0 + 1e-3 * rng.standard_normal((257, 16)))
    want = fid_features_to_statistics(rows)
    moments = Moments(16)
    for part in rows.split(50):
        moments.update(part)
    got = moments.statistics()
    np.testing.assert_allclose(got["mu"], want["mu"], rtol=1e-14)
    np.testing.assert_allclose(got["sigma"], want["sigma"], rtol=1e-8, atol=1e-14)
    # A stream of feature chunks summarises like the same features in one dict (what the FID stage scores).
    feats = {"2048": rows, "spatial": rows[:, :8] * 2, "logits_unbiased": rows[:, :4]}
    whole = summarise(feats)
    chunked = summarise({k: v[i:i + 64] for k, v in feats.items()} for i in range(0, 257, 64))
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-10, atol=1e-14)
    assert torch.equal(chunked["logits"], whole["logits"]) and np.array_equal(chunked["features"], whole["features"])
    assert chunked["count"] == 257
