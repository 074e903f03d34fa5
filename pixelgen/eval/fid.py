"""FID, Inception Score, sFID and precision/recall through torch-fidelity's InceptionV3, as ADM's evaluator
measures them.

Upstream torch-fidelity cannot take precomputed reference statistics (only the LTH14 fork has
`fid_statistics_file`), so features come from its `FeatureExtractorInceptionV3` and the statistics and
metrics from its own functions (FID and sFID: `fid_features_to_statistics` / `fid_statistics_to_metric`; IS;
precision/recall: `prc_features_to_metric`); nothing numerical is re-implemented here. sFID's spatial
features are ADM's `mixed_6/conv:0`: the TF graph's mixed_6 is torch-fidelity's Mixed_6d (its TF-to-PyTorch
weight map: mixed_6/conv -> Mixed_6d.branch1x1), whose conv + BN + ReLU output is taken with a forward hook;
ADM keeps its first 7 channels, flattened in NHWC order, so that statistics from ADM's reference batch
(`mu_s`, `sigma_s`) line up element for element. Precision/recall use ADM's k = 3 on pool3 features (not
torch-fidelity's default VGG16).
"""

import io
import json
import os
import pickle
import zipfile
from collections.abc import Iterable
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

# torch_fidelity is imported where it is used: its package imports torchvision's every model (~2.4 s), which
# every pipeline stage would pay at start-up through pipeline.stages, although only the FID stage needs it.

from pixelgen.eval.config import FIDConfig, Metric, missing_reference_keys
from pixelgen.io import atomic_write_file, sha256_file
from pixelgen.progress import report

WEIGHTS_ENV = "PIXELGEN_INCEPTION_WEIGHTS"
FEATURE_EXTRACTOR_NAME = "inception-v3-compat"  # the name torch-fidelity registers this extractor under
FEATURE_FID = "2048"
FEATURE_ISC = "logits_unbiased"
FEATURE_SFID = "spatial"  # ADM's mixed_6/conv, first 7 channels: [N, 17 * 17 * 7] at torch-fidelity's 299 px
SFID_MODULE = "Mixed_6d.branch1x1"
SFID_CHANNELS = 7
PRC_NEIGHBORHOOD = 3  # ADM's k


def __getattr__(name: str):
    # URL_INCEPTION_V3 and UPSTREAM_WEIGHTS_NAME, looked up in torch-fidelity only when asked for.
    if name == "URL_INCEPTION_V3":
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        return URL_INCEPTION_V3
    if name == "UPSTREAM_WEIGHTS_NAME":
        return os.path.basename(__getattr__("URL_INCEPTION_V3"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _weights_hint(join: str = ", from") -> str:
    return f"{__getattr__('UPSTREAM_WEIGHTS_NAME')}{join} {__getattr__('URL_INCEPTION_V3')}"


def _random_inception_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _InceptionArchitecture(FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3 with its weight loading disabled: building the random state dict from
        torch-fidelity's own module guarantees the exact key set and shapes its strict `load_state_dict`
        expects later."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    # The constructor always loads weights: an empty in-memory state dict keeps it off the network.
    model = _InceptionArchitecture(FEATURE_EXTRACTOR_NAME, [FEATURE_FID], feature_extractor_weights_path=empty)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            # He init keeps the activation scale roughly constant down the ~47-conv-deep path, so pool3
            # features neither vanish nor explode without trained BN statistics.
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=gen)
        elif isinstance(module, nn.BatchNorm2d):
            # Eval-mode BN at identity: random convs have no meaningful running statistics to normalise by.
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
        elif isinstance(module, nn.Linear):
            # Unit-variance head: random pool3 features differ little between images, so the usual
            # 1/sqrt(fan_in) scale would give near-uniform p(y|x) and an IS stuck at 1 whatever the images.
            nn.init.normal_(module.weight, std=1.0, generator=gen)
            nn.init.zeros_(module.bias)
    return model.state_dict()


def resolve_inception_weights(cfg: FIDConfig, cache_dir: str) -> tuple[str, bool]:
    """Return (weights path, is_proxy): `fid.inception_weights`, then $PIXELGEN_INCEPTION_WEIGHTS, then
    (only with `fid.allow_random_features`) a seeded random-init InceptionV3 cached under `cache_dir`."""
    named = (("fid.inception_weights", cfg.inception_weights), (WEIGHTS_ENV, os.environ.get(WEIGHTS_ENV)))
    for source, value in named:
        if value:
            path = os.path.expanduser(value)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{source} points to {path!r}, which is not a file: fix the path or unset {source} "
                    f"(torch-fidelity's weights file is {_weights_hint()})"
                )
            return path, False

    if not cfg.allow_random_features:
        raise FileNotFoundError(
            f"No InceptionV3 weights for FID: set fid.inception_weights or the environment variable {WEIGHTS_ENV} "
            f"to torch-fidelity's {_weights_hint(' (download it from')} on a machine with "
            f"internet access; it is not fetched at run time), or set fid.allow_random_features=true for a "
            f"proxy FID from a random-init Inception that is not comparable to published numbers"
        )

    path = os.path.join(cache_dir, f"inception-random-seed{cfg.seed}.pth")
    if not os.path.isfile(path):
        state_dict = _random_inception_state_dict(cfg.seed)
        atomic_write_file(path, lambda f: torch.save(state_dict, f))
    return path, True


class InceptionFeatures:
    """torch-fidelity's InceptionV3 giving pool3 features (FID) and unbiased logits (IS) for uint8 images."""

    def __init__(self, weights_path: str, device: str | torch.device = "cpu", batch_size: int = 64):
        self.weights_path = weights_path
        self.device = torch.device(device)
        self.batch_size = batch_size
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            model = FeatureExtractorInceptionV3(
                FEATURE_EXTRACTOR_NAME, [FEATURE_FID, FEATURE_ISC], feature_extractor_weights_path=weights_path
            )
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(
                f"Inception weights {weights_path!r} are not a torch-fidelity InceptionV3 state dict ({e}): use "
                f"{_weights_hint()}"
            ) from e
        self.model = model.to(self.device)
        self._spatial: list[torch.Tensor] = []
        self.model.get_submodule(SFID_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, args, output):
        # NCHW -> NHWC, then ADM's first channels, flattened: the element order of ADM's mu_s / sigma_s.
        self._spatial.append(output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).clone())

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [N, 3, H, W] images, any H and W (torch-fidelity resizes to 299 itself) -> float64 CPU features
        {'2048': [N, 2048], 'logits_unbiased': [N, 1008], 'spatial': [N, 2023]}."""
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(
                f"InceptionFeatures expects a uint8 tensor [N, 3, H, W], got {got}; convert model output in [-1, 1] "
                f"with ((x + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)"
            )
        out: dict[str, list[torch.Tensor]] = {FEATURE_FID: [], FEATURE_ISC: [], FEATURE_SFID: []}
        with torch.inference_mode():
            for chunk in images.split(self.batch_size):
                self._spatial.clear()
                features = self.model.convert_features_tuple_to_dict(self.model(chunk.to(self.device)))
                features[FEATURE_SFID] = self._spatial.pop()
                for name, value in features.items():
                    out[name].append(value.to("cpu", torch.float64))
        return {name: torch.cat(values) for name, values in out.items()}

    def extract(
        self, batches: Iterable, progress: bool = False, total: Optional[int] = None
    ) -> dict[str, torch.Tensor]:
        """Features of a stream of uint8 batches (or (images, labels) tuples, labels ignored), concatenated.
        `total` is the number of batches, only for the progress report (none without it)."""
        out: dict[str, list[torch.Tensor]] = {FEATURE_FID: [], FEATURE_ISC: [], FEATURE_SFID: []}
        seen = [0]
        # A bar with an ETA on a terminal, a line every 30 s in a SLURM log.
        for batch in report(batches, total or 0, "Inception features", unit="batches", enabled=progress and bool(total),
                            extra=lambda: f"{seen[0]} images"):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            for name, value in self(images).items():
                out[name].append(value)
            seen[0] += images.shape[0]
        if not out[FEATURE_FID]:
            raise ValueError("InceptionFeatures.extract got no batches: the image stream is empty")
        return {name: torch.cat(values) for name, values in out.items()}


class Moments:
    """Count, mean and centred sum of outer products (float64) of feature rows, for the mean and covariance that
    FID's statistics are, without keeping the rows. Each batch is centred on its own mean and merged with
    Chan et al.'s pairwise update, which stays accurate where the one-pass sum of squares cancels (features whose
    spread is small next to their mean). Ranks' moments merge in rank order (`gather`)."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.mean.device, torch.float64)
        mean = rows.mean(0)
        centred = rows - mean
        self._merge(rows.shape[0], mean, centred.T @ centred)

    def _merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean.to(self.mean.device) - self.mean
        self.m2 += m2.to(self.m2.device) + torch.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def gather(self) -> None:
        """Merge every rank's moments into the main rank's, in rank order (the others keep their own)."""
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return
        mine = (self.count, self.mean.cpu(), self.m2.cpu())
        rank = torch.distributed.get_rank()
        parts = [None] * torch.distributed.get_world_size() if rank == 0 else None
        torch.distributed.gather_object(mine, parts, dst=0)
        if rank == 0:
            self.count = 0
            self.mean.zero_()
            self.m2.zero_()
            for count, mean, m2 in parts:
                self._merge(count, mean, m2)

    def statistics(self) -> dict[str, np.ndarray]:
        """{'mu', 'sigma'}: the mean and the unbiased covariance (np.cov's), as torch-fidelity's
        fid_features_to_statistics gives them for the same rows."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        return {"mu": self.mean.cpu().numpy(), "sigma": (self.m2 / (self.count - 1)).cpu().numpy()}


def reference_statistics(features_2048: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """{'mu', 'sigma'} (float64) of pool3 features, via torch-fidelity."""
    features = torch.as_tensor(features_2048, dtype=torch.float64, device="cpu")
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need features [N >= 2, D], got {tuple(features.shape)}")
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features)


def summarise(chunks: Iterable[dict[str, torch.Tensor]] | dict[str, torch.Tensor], metrics: Iterable[str] = tuple(Metric),
              keep_features: Optional[int] = None) -> dict:
    """What `metrics` need of a set of images, from their features in one dict or a stream of chunks (one in
    memory at a time): FID statistics (`mu`, `sigma`) and sFID's (`mu_s`, `sigma_s`) accumulated; the IS
    logits (`logits`) and the pool3 features for precision/recall (`features`, float32; the first
    `keep_features` only, if given) kept whole; `count`."""
    metrics = {Metric(m) for m in metrics}
    chunks = [chunks] if isinstance(chunks, dict) else chunks
    moments: dict[str, Moments] = {}
    logits, pool3, count = [], [], 0
    for features in chunks:
        names = [FEATURE_FID] + ([FEATURE_SFID] if Metric.sfid in metrics else [])
        for name in names:
            moments.setdefault(name, Moments(features[name].shape[1])).update(features[name])
        if Metric.isc in metrics:
            logits.append(features[FEATURE_ISC].to(torch.float64))
        kept = sum(len(p) for p in pool3)
        if Metric.precision_recall in metrics and (keep_features is None or kept < keep_features):
            rows = features[FEATURE_FID] if keep_features is None else features[FEATURE_FID][:keep_features - kept]
            pool3.append(rows.to(torch.float32))
        count += features[FEATURE_FID].shape[0]
    return summary_from_moments(moments, count, logits, pool3)


def summary_from_moments(moments: dict, count: int, logits: list, pool3: list) -> dict:
    """`summarise`'s result from its parts (the FID stage merges the moments of several ranks first)."""
    if FEATURE_FID not in moments:
        raise ValueError("no features to summarise: the image stream is empty")
    out = {"count": count, **moments[FEATURE_FID].statistics()}
    if FEATURE_SFID in moments:
        spatial = moments[FEATURE_SFID].statistics()
        out.update(mu_s=spatial["mu"], sigma_s=spatial["sigma"])
    if logits:
        out["logits"] = torch.cat(logits)
    if pool3:
        out["features"] = torch.cat(pool3).numpy()
    return out


def reference_from_features(features: dict[str, torch.Tensor], prc_images: int) -> dict[str, np.ndarray]:
    """A reference from its images' features: FID statistics (`mu`, `sigma`), sFID statistics (`mu_s`,
    `sigma_s`) and the pool3 features of the first `prc_images` images (`features`, float32) for
    precision/recall."""
    out = summarise(features, (Metric.fid, Metric.sfid, Metric.precision_recall), keep_features=prc_images)
    return {k: out[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "features")}


_REFERENCE_ARRAYS = ("mu", "sigma", "mu_s", "sigma_s", "features")


def save_statistics(path: str, stats: dict[str, np.ndarray], meta: dict) -> None:
    """npz with `mu`, `sigma` (the keys of ADM's and LTH14's files), `mu_s`, `sigma_s` and `features` where
    present, and `meta`, a JSON string."""
    arrays = {key: np.asarray(stats[key], dtype=np.float32 if key == "features" else np.float64)
              for key in _REFERENCE_ARRAYS if key in stats}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    atomic_write_file(path, lambda f: np.savez(f, **arrays))


def load_statistics(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(reference, meta) from `save_statistics` or a reference file from elsewhere: `mu`, `sigma` always, and
    `mu_s`, `sigma_s` (sFID) and `features` (precision/recall) where the file has them. An ADM reference batch
    gives its statistics (its images, `arr_0`, come from `load_reference_images`); a file without `meta`
    gives meta {}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID reference statistics {path!r} not found: compute them over a reference split "
            f"(fid.reference) with reference_statistics + save_statistics"
        )
    try:
        # Our own handle: np.load leaks the one it opens when the zip is unreadable.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            arrays = {key: data[key] for key in (*_REFERENCE_ARRAYS, "meta") if key in data.files}
        meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"FID reference statistics {path!r} are unreadable ({e}): delete the file and recompute it"
        ) from e
    missing = {"mu", "sigma"} - arrays.keys()
    if missing:
        raise ValueError(f"FID reference statistics {path!r} lack {sorted(missing)}: delete the file and recompute it")
    out = {}
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mu_key not in arrays:
            continue
        mu, sigma = arrays[mu_key].astype(np.float64), arrays[sigma_key].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(
                f"FID reference statistics {path!r} are malformed ({mu_key} {mu.shape}, {sigma_key} {sigma.shape}, "
                f"or non-finite values): delete the file and recompute it"
            )
        out[mu_key], out[sigma_key] = mu, sigma
    if "features" in arrays:
        out["features"] = arrays["features"].astype(np.float32)
    return out, meta


def load_reference_images(path: str) -> torch.Tensor:
    """The images of an ADM reference batch (`arr_0`, uint8 NHWC) as uint8 [N, 3, H, W], for the reference
    features that precision/recall need."""
    why = missing_reference_keys(path, [Metric.precision_recall])
    if why:
        raise ValueError(f"reference file {path!r} {why}")
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"reference file {path!r}: arr_0 is {images.dtype} {images.shape}, not uint8 images "
                         f"[N, H, W, 3] as in ADM's reference batches")
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _frechet(gen: dict, ref: dict, mu_key: str, sigma_key: str, what: str) -> float:
    # torch-fidelity asserts equal dtypes; statistics from elsewhere (e.g. float32 files) are cast to match.
    gen = {"mu": np.asarray(gen[mu_key], dtype=np.float64), "sigma": np.asarray(gen[sigma_key], dtype=np.float64)}
    ref = {"mu": np.asarray(ref[mu_key], dtype=np.float64), "sigma": np.asarray(ref[sigma_key], dtype=np.float64)}
    if ref["mu"].shape != gen["mu"].shape:
        raise ValueError(
            f"Reference {what} statistics have dimension {ref['mu'].shape[0]} but the generated features "
            f"{gen['mu'].shape[0]}: both must come from torch-fidelity's InceptionV3 at its own 299 px"
        )
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return fid_statistics_to_metric(gen, ref, verbose=False)[KEY_METRIC_FID]


# What each metric needs of a loaded reference (the file's arr_0 becomes `features` once extracted).
_NEEDS = {Metric.fid: ("mu", "sigma"), Metric.isc: (), Metric.sfid: ("mu_s", "sigma_s"),
          Metric.precision_recall: ("features",)}


def compute_metrics(generated: dict | Iterable[dict], ref_stats: dict[str, np.ndarray],
                    metrics: Iterable[str] = (Metric.fid, Metric.isc), isc_splits: int = 10) -> dict:
    """`metrics` of generated images against a reference (`load_statistics`' or `reference_from_features`'
    keys), via torch-fidelity: fid; is (isc_mean, isc_std, isc_splits); sfid; precision_recall (precision,
    recall). `generated`: their features (one dict or a stream of chunks) or `summarise`'s summary of them."""
    metrics = {Metric(m) for m in metrics}
    for metric in metrics:
        lacking = [k for k in _NEEDS[metric] if k not in ref_stats]
        if lacking:
            raise ValueError(f"the reference has no {', '.join(lacking)}, which {metric} needs")
    gen = generated if isinstance(generated, dict) and "count" in generated else summarise(generated, metrics)
    out = {"fid": _frechet(gen, ref_stats, "mu", "sigma", "pool3")}
    if Metric.isc in metrics:
        from torch_fidelity.defaults import DEFAULTS
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

        logits = gen["logits"]
        # Each IS split needs at least one sample; small demo runs have fewer samples than the 10 standard splits.
        splits = max(1, min(isc_splits, logits.shape[0]))
        isc = isc_features_to_metric(
            logits, splits=splits, shuffle=DEFAULTS["samples_shuffle"], rng_seed=DEFAULTS["rng_seed"]
        )
        out.update(isc_mean=isc[KEY_METRIC_ISC_MEAN], isc_std=isc[KEY_METRIC_ISC_STD], isc_splits=splits)
    if Metric.sfid in metrics:
        out["sfid"] = _frechet(gen, ref_stats, "mu_s", "sigma_s", "spatial")
    if Metric.precision_recall in metrics:
        from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

        prc = prc_features_to_metric(torch.as_tensor(gen["features"], dtype=torch.float32),
                                     torch.as_tensor(ref_stats["features"], dtype=torch.float32),
                                     prc_neighborhood=PRC_NEIGHBORHOOD, prc_batch_size=10_000, save_cpu_ram=True,
                                     verbose=False)
        out.update(precision=prc[KEY_METRIC_PRECISION], recall=prc[KEY_METRIC_RECALL])
    return out


def protocol(cfg: FIDConfig, weights_path: str, is_proxy: bool, num_gen: int, num_ref: int,
             reference: Optional[dict] = None) -> dict:
    """How the numbers were measured, for the result JSON: enough to tell comparable runs apart. `reference`
    describes what was scored against (`reference`: train | val | file, and for a file its path and sha256)."""
    import torch_fidelity

    return {
        "metric_name": "proxy-FID (random-init Inception: not comparable to published numbers)" if is_proxy else "FID",
        "proxy": is_proxy,
        "metrics": list(cfg.metrics),
        "feature_extractor": "torch-fidelity InceptionV3 2048-d pool3",
        "feature_layer_fid": FEATURE_FID,
        "feature_layer_isc": FEATURE_ISC,
        "feature_layer_sfid": f"{SFID_MODULE} (ADM's mixed_6/conv), first {SFID_CHANNELS} channels, NHWC",
        "precision_recall_k": PRC_NEIGHBORHOOD,
        "weights_file": os.path.abspath(weights_path),
        "weights_sha256": sha256_file(weights_path),
        "num_gen": num_gen,
        "num_ref": num_ref,
        "samples_per_class": cfg.samples_per_class,
        **(reference or {"reference": cfg.reference}),
        "weights": cfg.weights,
        "seed": cfg.seed,
        "torch_fidelity_version": torch_fidelity.__version__,
    }
