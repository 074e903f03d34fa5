"""Methods B and C (pixelgen/ar.py, models/semantic_ar.py, models/pixel_ar.py, models/ar_generator.py): causality
of both AR levels, KV-cached sampling, guidance arithmetic, the dictionary, the log-likelihood, the logistic head,
the config checks and the saved dictionary.

Every model here is tiny and has its weights drawn at random: the output layers are zero-initialised, so an
untrained model predicts the same thing whatever it is given and every property below would hold vacuously.
"""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelgen import ar
from pixelgen.families import build_generator, check_model_config
from pixelgen.models.config import (DecoderConfig, ModelConfig, ObjectiveConfig, PixelARConfig, RepaConfig,
                                    SamplerConfig, SemanticARConfig, TeacherConfig, TrunkConfig)
from pixelgen.models.pixel_ar import logistic_bin_logp
from pixelgen.models.semantic_ar import kmeans, nearest_entry

NUM_CLASSES = 4
RES = 16  # 4x4 patches: a 4x4 grid of 16-pixel patches
SMALL = 8  # a 2x2 grid, for the tests that sample many times: generate loops in Python over every pixel channel
P = 4
TEACHER = TeacherConfig(name="vit_small_patch16_dinov3", allow_random_init=True, depth=1)


def ar_config(*, mode="discrete", target="teacher", decoder="pixel_ar", output="categorical", context="none",
              class_dropout=0.1, **decoder_kw) -> ModelConfig:
    return ModelConfig(
        num_classes=NUM_CLASSES, class_dropout=class_dropout,
        trunk=TrunkConfig(kind="semantic_ar", patch_size=P, dim=32, depth=2, heads=2,
                          ar=SemanticARConfig(mode=mode, target=target, dict_size=8, z_dim=16, teacher=TEACHER)),
        decoder=DecoderConfig(kind=decoder, pixel_dim=16, depth=2, heads=2,
                              pixel_ar=PixelARConfig(output=output, context=context, mixtures=3), **decoder_kw))


@torch.no_grad()
def ar_model(res=RES, seed=0, **cfg_kw):
    """A built generator with random weights (every matrix, and every all-zero vector such as the null condition
    and the start token) and, in discrete mode, a random dictionary; in eval mode."""
    torch.manual_seed(seed)
    m = build_generator(ar_config(**cfg_kw), res)
    for p in m.parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=0.1)
        elif not p.any():
            nn.init.normal_(p, std=0.1)
    if m.trunk.mode == "discrete":
        m.trunk.dictionary.copy_(torch.randn_like(m.trunk.dictionary))
    return m.eval()


def uint8_images(B=2, res=RES, seed=1):
    """Images in [-1, 1] that came from uint8 values (so to_values is exact on them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, res, res), generator=g).float() / 127.5 - 1


def patch_at(x, k, res=RES):
    """A view of patch k (raster order) of every image in x [B, 3, H, W]."""
    gw = res // P
    r, c = divmod(k, gw)
    return x[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P]


def labels(B=2):
    return torch.arange(B) % NUM_CLASSES


def sample(m, *, seed=0, kv_cache=True, y=None, **sampler_kw):
    cfg = SamplerConfig(**{"steps": 4, **sampler_kw})
    return ar.generate(m, labels() if y is None else y, cfg, objective=ObjectiveConfig(),
                       generator=torch.Generator().manual_seed(seed), kv_cache=kv_cache)


def changed(a, b, atol=1e-4) -> bool:
    return bool((a - b).abs().max() > atol)


# ----------------------------------------------------------------------------------------- 1. semantic AR causality
@torch.no_grad()
def test_semantic_ar_output_at_position_i_sees_only_patches_before_i():
    m = ar_model()
    x, y = uint8_images(), labels()
    L = m.trunk.num_patches
    h = m.trunk(x, y)
    assert h.shape == (2, L, 32)
    for k in (0, 5, L - 2):
        x2 = x.clone()
        patch_at(x2, k).copy_(-patch_at(x, k))
        h2 = m.trunk(x2, y)
        assert torch.equal(h2[:, :k + 1], h[:, :k + 1]), \
            f"changing patch {k} changed the semantic AR's output at a position <= {k} (it would see its own target)"
        assert changed(h2[:, k + 1], h[:, k + 1], 1e-3), \
            f"changing patch {k} left position {k + 1} unchanged: the input at position {k + 1} should be patch {k}"
    # The last patch is never an input: nothing predicts from it.
    x2 = x.clone()
    patch_at(x2, L - 1).copy_(-patch_at(x, L - 1))
    assert torch.equal(m.trunk(x2, y), h), "the last patch reached the semantic AR's input"
    # The class token is position 0's input and conditions every position.
    h_other = m.trunk(x, (y + 1) % NUM_CLASSES)
    assert all(changed(h_other[:, i], h[:, i], 1e-3) for i in (0, L - 1)), "the class does not reach the outputs"


# -------------------------------------------------------------------------------------------- 2. pixel AR causality
def decoder_logp(m, x, z):
    """Each pixel channel's log-prob, every patch conditioned on the dictionary entry z [B, L] names."""
    return m(x, labels(x.shape[0]), semantic=False, decoder=True, indices=z)["logp"]


@torch.no_grad()
def test_pixel_ar_pixel_j_sees_only_earlier_pixels_of_its_patch():
    m = ar_model()
    x = uint8_images()
    B, L, Pix = 2, m.trunk.num_patches, P * P
    z = torch.randint(0, m.trunk.dictionary.shape[0], (B, L), generator=torch.Generator().manual_seed(3))
    logp = decoder_logp(m, x, z)
    assert logp.shape == (B * L, Pix, 3)
    k = 6  # patch 6 of image 0: row 6 of logp
    for j in (0, 5, Pix - 1):
        x2 = x.clone()
        r, c = divmod(j, P)
        patch_at(x2, k)[0, :, r, c] = -patch_at(x, k)[0, :, r, c] + 2 / 127.5  # a different uint8 value
        logp2 = decoder_logp(m, x2, z)
        others = torch.ones(B * L, dtype=torch.bool)
        others[k] = False
        assert torch.equal(logp2[others], logp[others]), \
            f"changing pixel {j} of patch {k} changed another patch's log-probs (context none)"
        assert torch.equal(logp2[k, :j], logp[k, :j]), \
            f"changing pixel {j} of patch {k} changed the log-prob of an earlier pixel of that patch"
        assert changed(logp2[k, j], logp[k, j]), f"pixel {j}'s own log-prob did not change with its value"
        if j < Pix - 1:
            assert changed(logp2[k, j + 1:], logp[k, j + 1:]), \
                f"changing pixel {j} did not change any later pixel's log-prob: later pixels do not see it"
    # Within a pixel: channel c of pixel j conditions channels > c only.
    j = 5
    r, cc = divmod(j, P)
    for ch in range(3):
        x2 = x.clone()
        patch_at(x2, k)[0, ch, r, cc] = -patch_at(x, k)[0, ch, r, cc] + 2 / 127.5
        logp2 = decoder_logp(m, x2, z)
        assert torch.equal(logp2[k, j, :ch], logp[k, j, :ch]), \
            f"changing channel {ch} of pixel {j} changed the log-prob of an earlier channel"
        assert changed(logp2[k, j, ch], logp[k, j, ch]), f"channel {ch}'s log-prob ignores its own value"
        if ch < 2:
            assert changed(logp2[k, j, ch + 1:], logp[k, j, ch + 1:]), \
                f"channel {ch} of pixel {j} does not condition the later channels of the same pixel"


@pytest.mark.parametrize("output", ["categorical", "logistic"])
@torch.no_grad()
def test_channel_logits_depend_on_earlier_channels_only(output):
    m = ar_model(output=output)
    dec = m.decoder
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 16, generator=g)
    prev = torch.randint(0, 256, (6, 3), generator=g)
    for c in range(3):
        # Pass all three channels: the ones at and after c must not matter, each one before c must.
        base = dec.channel_logits(h, prev, c)
        assert torch.equal(base, dec.channel_logits(h, prev[:, :c], c)), \
            f"channel {c}'s logits differ when given only the channels before it"
        for j in range(3):
            other = prev.clone()
            other[:, j] = (prev[:, j] + 100) % 256
            moved = dec.channel_logits(h, other, c)
            if j < c:
                assert changed(moved, base), f"channel {c}'s logits ignore the earlier channel {j} ({output})"
            else:
                assert torch.equal(moved, base), f"channel {c}'s logits depend on channel {j} >= {c} ({output})"
    # Channel 0 depends on h alone, and does depend on it.
    assert changed(dec.channel_logits(h + 0.5, prev[:, :0], 0), dec.channel_logits(h, prev[:, :0], 0))


# Which patches have patch (row, col) as context, by the context's definition (pixel_ar.py's docstring):
# prev = the left neighbour; window = left, up-left, up, up-right.
NEIGHBOURS = {"prev": [(0, -1)], "window": [(0, -1), (-1, -1), (-1, 0), (-1, 1)]}


@pytest.mark.parametrize("context", ["prev", "window"])
@torch.no_grad()
def test_pixel_ar_context_reaches_exactly_the_patches_that_have_it_as_neighbour(context):
    m = ar_model(context=context)
    x = uint8_images()
    B, L, gw = 2, m.trunk.num_patches, RES // P
    z = torch.randint(0, m.trunk.dictionary.shape[0], (B, L), generator=torch.Generator().manual_seed(3))
    logp = decoder_logp(m, x, z)
    for k in (3, 4, 5):  # the end of row 0 (no right neighbour), the start of row 1, an interior patch
        x2 = x.clone()
        patch_at(x2, k)[0] = -patch_at(x, k)[0] + 2 / 127.5
        logp2 = decoder_logp(m, x2, z)
        kr, kc = divmod(k, gw)
        expect = {k} | {q for q in range(L) if any((q // gw + dr, q % gw + dc) == (kr, kc)
                                                   for dr, dc in NEIGHBOURS[context])}
        assert k + 1 in expect or kc == gw - 1, "the right neighbour is missing from the expected set"
        for q in range(B * L):
            if q in expect:  # image 0's patches only
                assert changed(logp2[q], logp[q]), \
                    f"context {context}: changing patch {k} left patch {q} unchanged, which has it as a neighbour"
            else:
                assert torch.equal(logp2[q], logp[q]), \
                    f"context {context}: changing patch {k} changed patch {q % L} of image {q // L}" \
                    + (" (it precedes it in raster order)" if q < k else "")


# -------------------------------------------------------------------------------- 3. KV-cached == uncached sampling
# Sampling loops in Python over every pixel channel: the cases without context sample 8 px images (a 2x2 grid),
# the window context 16 px (a 4x4 grid, so that every slot, up-right included, has interior patches).
B_CASES = {
    "discrete-categorical-none": dict(res=SMALL),
    "discrete-logistic-window": dict(res=RES, output="logistic", context="window"),
    "continuous-categorical": dict(res=SMALL, mode="continuous"),
}


GUIDED_CASES = {
    "guided-z-linear": ("discrete-categorical-none", dict(guidance="z", cfg_scale=2.0, cfg_schedule="linear")),
    "guided-both-linear": ("discrete-logistic-window",
                           dict(guidance="both", cfg_scale=2.0, semantic_cfg_scale=2.0, cfg_schedule="linear")),
}


@pytest.mark.parametrize("case", list(B_CASES) + list(GUIDED_CASES))
def test_kv_cached_sampling_equals_uncached_method_b(case):
    model_case, kw = GUIDED_CASES.get(case, (case, {}))
    m = ar_model(**B_CASES[model_case])
    cached, full = sample(m, kv_cache=True, **kw), sample(m, kv_cache=False, **kw)
    assert torch.equal(cached.images, full.images), f"{case}: cached and uncached sampling drew different pixels"
    if cached.indices is not None:
        assert torch.equal(cached.indices, full.indices), f"{case}: different dictionary indices"
    # Not torch.equal: the draws are the same, but each step's logits come from a one-token attention over the
    # cache on one path and from the last row of a masked full-prefix pass on the other, which round differently
    # (one float32 ulp of the summed log-prob was seen: ~5e-4 on a total near -4.3e3 at 16 px).
    torch.testing.assert_close(cached.logprob, full.logprob, rtol=1e-6, atol=0,
                               msg=f"{case}: cached and uncached log-probs differ beyond float rounding")
    # The equality is not that of a constant sampler: another seed draws other images.
    if case == "discrete-categorical-none":
        assert changed(sample(m, seed=1).images, cached.images, 0.1), "the samples do not depend on the seed"


@pytest.mark.parametrize("mode,kind", [("continuous", "mlp"), ("continuous", "pit"), ("discrete", "mlp")])
def test_kv_cached_sampling_equals_uncached_method_c(mode, kind):
    m = ar_model(res=SMALL, mode=mode, decoder=kind, **({"adaln": "patch"} if kind == "pit" else {}))
    kw = dict(guidance="z", cfg_scale=2.0)
    cached, full = sample(m, kv_cache=True, **kw), sample(m, kv_cache=False, **kw)
    if mode == "discrete":
        # z is a dictionary entry: the continuous pixels depend on the trunk only through the indices drawn.
        assert torch.equal(cached.indices, full.indices) and torch.equal(cached.images, full.images)
    else:
        # The continuous z feeds the diffusion head's floats directly, so the cached path (a one-token step)
        # and the uncached one (a full-prefix pass) agree up to float rounding only: they sum attention over
        # the keys in different orders. generate runs in float32 (its buffers and `.float()` heads), so a
        # float64 model cannot tighten this; the images differ by ~1e-6 and any real divergence by ~1.
        torch.testing.assert_close(cached.images, full.images, rtol=0, atol=1e-5,
                                   msg=f"method C {mode}/{kind}: cached and uncached images differ")
    assert changed(sample(m, seed=1, **kw).images, cached.images, 0.1), "the samples do not depend on the seed"


# ------------------------------------------------------------------------------------------------ 4. CFG arithmetic
def test_guide_and_scale_schedule_on_known_values():
    c, u = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    assert torch.equal(ar.guide(c, u, 0.0), u)
    assert torch.equal(ar.guide(c, u, 1.0), c)
    assert torch.equal(ar.guide(c, u, 3.0), torch.tensor([3.0, -8.0, 0.5]))
    assert [ar.scale_at(3.0, "linear", i, 4) for i in range(4)] == [1.5, 2.0, 2.5, 3.0]
    assert [ar.scale_at(3.0, "constant", i, 4) for i in range(4)] == [3.0] * 4


def test_sample_index_top_k_temperature_and_logprob():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g) * 3
    for seed in range(3):
        idx, lp = ar.sample_index(logits, 1.0, 1, torch.Generator().manual_seed(seed))
        assert torch.equal(idx, logits.argmax(-1)), "top_k=1 did not return the argmax"
        assert torch.equal(lp, torch.zeros(64)), "top_k=1's draw is certain: its log-prob must be 0"
    T = 2.5
    idx, lp = ar.sample_index(logits, T, 0, g)
    torch.testing.assert_close(lp, F.log_softmax(logits / T, -1).gather(-1, idx[:, None])[:, 0])
    assert changed(lp, F.log_softmax(logits, -1).gather(-1, idx[:, None])[:, 0], 1e-3), "the temperature is ignored"
    # top_k=3: only the 3 largest are drawn, renormalised among themselves.
    idx, lp = ar.sample_index(logits, 1.0, 3, g)
    top = logits.topk(3, -1)
    assert (top.indices == idx[:, None]).any(-1).all(), "top_k=3 drew outside the 3 largest logits"
    expect = logits.gather(-1, idx[:, None])[:, 0] - top.values.logsumexp(-1)
    torch.testing.assert_close(lp, expect)
    # The draws follow softmax(logits / T).
    row = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    idx, _ = ar.sample_index(row.expand(20000, -1), 2.0, 0, g)
    freq = torch.bincount(idx, minlength=4).float() / 20000
    torch.testing.assert_close(freq, F.softmax(row[0] / 2.0, -1), atol=0.015, rtol=0)


class _Stop(Exception):
    pass


def record_sample_index(monkeypatch, n):
    """Replace ar.sample_index by a wrapper that calls the original, records (logits, drawn index) and stops the
    sampler after n calls."""
    calls = []
    original = ar.sample_index

    def wrapper(logits, temperature, top_k, generator):
        idx, lp = original(logits, temperature, top_k, generator)
        calls.append((logits.clone(), idx.clone()))
        if len(calls) == n:
            raise _Stop
        return idx, lp

    monkeypatch.setattr(ar, "sample_index", wrapper)
    return calls


def first_trunk_logits(m, y):
    """The AR's dictionary logits for patch 0, by hand: step 0's only input is the class token."""
    t = m.trunk
    return t.head(t.run(t.embed_class(y), 0, t.rope("cpu"))[:, -1]).float()


def first_pixel_logits(m, cond):
    """The decoder's channel-0 logits of pixel 0 of a patch given its condition (context none), by hand."""
    dec = m.decoder
    h = dec.run(dec.prefix_tokens(cond), 0, dec.rope())[:, -1]
    return dec.channel_logits(h, torch.zeros(cond.shape[0], 0, dtype=torch.long), 0)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
@torch.no_grad()
def test_sampler_applies_guidance_arithmetic(monkeypatch, schedule):
    m = ar_model()
    y, s, L = labels(), 3.0, m.trunk.num_patches
    null = torch.full_like(y, m.null_class)
    s0 = s if schedule == "constant" else 1 + (s - 1) * 1 / L  # the scale at step 0 of L
    cond_t, null_t = first_trunk_logits(m, y), first_trunk_logits(m, null)
    assert changed(cond_t, null_t), "the null class gives the same logits: the guidance checks would be vacuous"

    # semantic: the dictionary logits are mixed before the draw.
    calls = record_sample_index(monkeypatch, 1)
    with pytest.raises(_Stop):
        sample(m, guidance="semantic", semantic_cfg_scale=s, cfg_schedule=schedule)
    torch.testing.assert_close(calls[0][0], null_t + s0 * (cond_t - null_t), atol=1e-5, rtol=1e-5,
                               msg="semantic guidance: the first draw's logits are not guide(cond, null, s)")

    # decoder: pixel 0, channel 0 of patch 0, given z = the entry drawn vs the decoder's null condition.
    calls = record_sample_index(monkeypatch, 2)
    with pytest.raises(_Stop):
        sample(m, guidance="decoder", cfg_scale=s, cfg_schedule=schedule)
    torch.testing.assert_close(calls[0][0], cond_t, atol=1e-5, rtol=1e-5, msg="decoder guidance altered the AR")
    z = m.trunk.dictionary[calls[0][1]]
    lc = first_pixel_logits(m, m.decoder.condition(z))
    lu = first_pixel_logits(m, m.decoder.null_condition(2))
    assert changed(lc, lu), "the decoder's null condition gives the same logits: the check would be vacuous"
    torch.testing.assert_close(calls[1][0], lu + s0 * (lc - lu), atol=1e-5, rtol=1e-5,
                               msg="decoder guidance: pixel 0's logits are not guide(given z, given null, s)")

    # z: the AR runs for the class and the null class (independent draws), then the decoder's logits given each
    # z are mixed.
    calls = record_sample_index(monkeypatch, 2)
    with pytest.raises(_Stop):
        sample(m, guidance="z", cfg_scale=s, cfg_schedule=schedule)
    torch.testing.assert_close(calls[0][0], torch.cat([cond_t, null_t]), atol=1e-5, rtol=1e-5)
    z = m.trunk.dictionary[calls[0][1]]
    lc, lu = first_pixel_logits(m, m.decoder.condition(z[:2])), first_pixel_logits(m, m.decoder.condition(z[2:]))
    torch.testing.assert_close(calls[1][0], lu + s0 * (lc - lu), atol=1e-5, rtol=1e-5,
                               msg="z guidance: pixel 0's logits are not guide(given z_class, given z_null, s)")


@torch.no_grad()
def test_guidance_scale_one_is_the_conditional_model():
    m = ar_model(res=SMALL)
    other = copy.deepcopy(m)  # the same model but for its unconditional branch
    other.trunk.y_embed.table.weight[m.null_class].normal_()
    other.decoder.null_cond.normal_()
    ref = sample(m)
    for guidance in ar.GUIDANCE:
        one = sample(other, guidance=guidance, cfg_scale=1.0, semantic_cfg_scale=1.0, cfg_schedule="linear")
        for name in ("images", "indices", "logprob"):
            assert torch.equal(getattr(one, name), getattr(ref, name)), \
                f"guidance {guidance} at scale 1 used the unconditional branch ({name} changed with it)"
        kw = dict(guidance=guidance, cfg_scale=2.0, semantic_cfg_scale=2.0)
        assert changed(sample(other, **kw).images, sample(m, **kw).images, 0.1), \
            f"guidance {guidance} at scale 2 ignores the unconditional branch"


# ------------------------------------------------------------------------------------------------ 5. the dictionary
def brute_nearest(f, d):
    return ((f.double()[:, None] - d.double()[None]) ** 2).sum(-1)


def test_nearest_entry_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    f, d = torch.randn(3000, 32, generator=g), torch.randn(64, 32, generator=g)
    dist = brute_nearest(f, d)
    for chunk in (8192, 100, 7):
        idx = nearest_entry(f, d, chunk=chunk)
        assert idx.shape == (3000,) and idx.dtype == torch.long
        # The chosen entry is a nearest one up to float32 rounding of the distances ...
        chosen = dist.gather(1, idx[:, None])[:, 0]
        assert (chosen - dist.min(1).values).abs().max() < 1e-4, f"chunk={chunk}: an entry that is not the nearest"
        # ... and exactly the brute-force argmin wherever the runner-up is not within that rounding.
        two = dist.topk(2, largest=False).values
        clear = (two[:, 1] - two[:, 0]) > 1e-3
        assert clear.float().mean() > 0.95
        assert torch.equal(idx[clear], dist.argmin(1)[clear]), f"chunk={chunk}: not the brute-force argmin"
    perm = torch.randperm(64, generator=g)
    assert torch.equal(nearest_entry(d[perm], d), perm), "an entry is not its own nearest entry"


def assert_lloyd_fixed_point(x, centers, k, what):
    assert centers.shape == (k, x.shape[1]), what
    assert torch.cdist(centers, centers).add(torch.eye(k) * 1e9).min() > 1e-6, f"{what}: two entries coincide"
    assign = brute_nearest(x, centers).argmin(1)
    counts = torch.bincount(assign, minlength=k)
    assert (counts > 0).all(), f"{what}: entry {counts.argmin().item()} is nearest to no feature"
    means = torch.stack([x[assign == j].mean(0) for j in range(k)])
    torch.testing.assert_close(centers, means, atol=1e-5, rtol=1e-5,
                               msg=f"{what}: an entry is not the mean of the features assigned to it")


def test_kmeans_converges_to_a_lloyd_fixed_point_with_distinct_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    c = kmeans(x, 6, 100, torch.Generator().manual_seed(0))
    assert_lloyd_fixed_point(x, c, 6, "k-means on gaussian data")
    # Opposite case: with no iteration the entries are k distinct features, which are not their clusters' means.
    c0 = kmeans(x, 6, 0, torch.Generator().manual_seed(0))
    assert all((x == row).all(-1).any() for row in c0), "the initial entries are not features"
    with pytest.raises(AssertionError):
        assert_lloyd_fixed_point(x, c0, 6, "no iterations")
    with pytest.raises(ValueError):
        kmeans(x[:5], 6, 10, g)


def test_kmeans_recovers_blob_centres():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 32, generator=g) * 5
    x = (centres[:, None] + 0.1 * torch.randn(4, 150, 32, generator=g)).flatten(0, 1)
    # Lloyd's algorithm from a random start only finds a local optimum: keep the best of a few starts (its SSE).
    runs = [kmeans(x, 4, 20, torch.Generator().manual_seed(s)) for s in range(4)]
    for s, c in enumerate(runs):
        assert_lloyd_fixed_point(x, c, 4, f"blobs, seed {s}")
    best = min(runs, key=lambda c: brute_nearest(x, c).min(1).values.sum())
    d = torch.cdist(best, centres)
    assert sorted(d.argmin(1).tolist()) == [0, 1, 2, 3], "two entries share a blob"
    assert d.min(1).values.max() < 0.05, f"the entries are not the blob centres (off by {d.min(1).values.max():.3f})"


def test_kmeans_refills_empty_entries():
    # Six distinct points, 100 copies each: the random start picks copies of the same point, and a duplicate entry
    # is nearest to nothing (ties go to the first) and stays so unless it is moved; Lloyd's steps alone end with
    # some points sharing an entry.
    g = torch.Generator().manual_seed(0)
    points = torch.randn(6, 16, generator=g) * 3
    x = points.repeat_interleave(100, 0)
    for seed in range(3):
        c0 = kmeans(x, 6, 0, torch.Generator().manual_seed(seed))
        assert len(torch.unique(c0, dim=0)) < 6, "the start has no duplicate entries: this test would prove nothing"
        c = kmeans(x, 6, 30, torch.Generator().manual_seed(seed))
        assert_lloyd_fixed_point(x, c, 6, f"duplicated features, seed {seed}")
        assert torch.cdist(c, points).min(1).values.max() < 1e-4, "the entries are not the six points"


@torch.no_grad()
def test_discrete_semantic_target_is_the_nearest_dictionary_entry():
    mc = ar_config(class_dropout=0.0)
    m = ar_model()
    obj = ar.ARObjective(mc, ObjectiveConfig(), RES, "cpu", train_semantic=True, train_decoder=False)
    x, y = uint8_images(), labels()
    feats = obj.teacher(x).flatten(0, 1)  # [B*L, 384]
    # Entries near a few of the features, so the nearest entry varies across patches.
    g = torch.Generator().manual_seed(0)
    m.trunk.dictionary.copy_(feats[torch.randperm(len(feats), generator=g)[:8]]
                             + 0.5 * torch.randn(8, feats.shape[1], generator=g))
    dist = brute_nearest(feats, m.trunk.dictionary)
    target = dist.argmin(1)
    assert len(target.unique()) > 3, "the targets hardly vary: the check would be weak"
    assert torch.equal(nearest_entry(feats, m.trunk.dictionary), target)
    _, logs = obj.loss(m, x, y)
    logits = m(x, y, semantic=True, decoder=False)["semantic"].flatten(0, 1)
    torch.testing.assert_close(logs["semantic_ce"], F.cross_entropy(logits, target),
                               msg="the semantic loss's target is not the nearest dictionary entry")
    second = dist.topk(2, largest=False).indices[:, 1]
    assert changed(F.cross_entropy(logits, second), logs["semantic_ce"], 1e-3), "the target index does not matter"


# --------------------------------------------------------------------------------------------- 6. log-likelihood
@pytest.mark.parametrize("case", list(B_CASES))
@torch.no_grad()
def test_log_likelihood_is_the_sum_of_the_sampling_log_probs(case):
    m = ar_model(**B_CASES[case])
    y = labels()
    s = sample(m, y=y, guidance="z", cfg_scale=1.0, semantic_cfg_scale=1.0, temperature=1.0,
               semantic_temperature=1.0, top_k=0)
    ll = ar.log_likelihood(m, s.images, y, s.indices)
    assert ll.shape == (2,) and (ll < 0).all()
    torch.testing.assert_close(ll, s.logprob, rtol=1e-5, atol=0,
                               msg=f"{case}: the teacher-forced log-likelihood is not the sampling path's")
    # Sensitive to one pixel, and (discrete) to the indices.
    x2 = s.images.clone()
    x2[0, 1, 5, 2] = -x2[0, 1, 5, 2] + 2 / 127.5
    ll2 = ar.log_likelihood(m, x2, y, s.indices)
    assert changed(ll2[0], ll[0], 1e-3) and ll2[1] == ll[1], "log_likelihood ignores one pixel's value"
    if s.indices is not None:
        idx2 = s.indices.clone()
        idx2[1, 2] = (idx2[1, 2] + 1) % 8
        assert changed(ar.log_likelihood(m, s.images, y, idx2)[1], ll[1], 1e-3), "log_likelihood ignores the indices"


# --------------------------------------------------------------------------------------------- 7. logistic head
@torch.no_grad()
def test_logistic_head_bins_form_a_distribution():
    m = ar_model(output="logistic")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(32, 16, generator=g) * 3
    prev = torch.randint(0, 256, (32, 3), generator=g)
    for c in range(3):
        logits = m.decoder.channel_logits(h, prev[:, :c], c)
        assert logits.shape == (32, 256)
        torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(32), atol=1e-4, rtol=0,
                                   msg=f"channel {c}'s 256 bins do not sum to one")
        assert (logits.max(-1).values - logits.min(-1).values > 1).all(), "the head is near uniform: weak check"


def test_logistic_bin_logp_matches_reference_and_stays_finite():
    values = torch.arange(256)[:, None]
    mean = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.004, 1.0, 1.5])
    # Moderate scales: the log of the logistic CDF's difference over each bin, the edge bins taking the tails.
    for log_scale in (-4.0, -2.0, 0.0):
        ls = torch.full_like(mean, log_scale)
        got = logistic_bin_logp(values, mean, ls)
        x = values.double() / 127.5 - 1
        inv_s = torch.exp(-ls.double())
        cdf_hi = torch.where(values == 255, 1.0, torch.sigmoid(inv_s * (x - mean.double() + 1 / 255)))
        cdf_lo = torch.where(values == 0, 0.0, torch.sigmoid(inv_s * (x - mean.double() - 1 / 255)))
        ref = torch.log(cdf_hi - cdf_lo)
        ok = ref > -30  # where float64's naive difference is still accurate
        torch.testing.assert_close(got.double()[ok], ref[ok], atol=1e-4, rtol=1e-4,
                                   msg=f"logistic_bin_logp differs from the reference at log_scale {log_scale}")
    # Extreme scales: finite everywhere. Down to the head's clamp (log_scale >= -7) the bins still sum to one;
    # below it they need not: each bin's edges x +- 1/255 are rounded in float32 on their own, and a scale of
    # e^-15 magnifies that rounding into a visible gap between adjacent bins (~5% of the mass at mean 0).
    edges = (torch.arange(0, 257, 16) - 128) / 127.5  # means on bin edges, the worst case for a tiny scale
    mean = torch.cat([mean, edges])
    for log_scale in (-7.0, -15.0, -30.0, 5.0, 15.0, 30.0):
        got = logistic_bin_logp(values, mean, torch.full_like(mean, log_scale))
        assert torch.isfinite(got).all(), f"logistic_bin_logp is not finite at log_scale {log_scale}"
        if log_scale >= -7:
            torch.testing.assert_close(got.logsumexp(0), torch.zeros(len(mean)), atol=1e-4, rtol=0,
                                       msg=f"the bins do not sum to one at log_scale {log_scale}")


# -------------------------------------------------------------------------------------------- 8. config checks
def with_trunk_ar(mc, **kw):
    return replace(mc, trunk=replace(mc.trunk, ar=replace(mc.trunk.ar, **kw)))


BAD_CONFIGS = {
    "model.decoder.kind": lambda mc: replace(mc, trunk=TrunkConfig(kind="pixeldit", patch_size=P, dim=32, depth=2,
                                                                   heads=2)),
    "model.trunk.ar.mode": lambda mc: with_trunk_ar(mc, mode="foo"),
    "model.trunk.ar.target": lambda mc: with_trunk_ar(mc, mode="discrete", target="end_to_end"),
    "model.repa.weight": lambda mc: replace(mc, repa=RepaConfig(weight=0.5, block=1)),
    "model.decoder.heads": lambda mc: replace(mc, decoder=replace(mc.decoder, pixel_dim=16, heads=3)),
}


@pytest.mark.parametrize("key", list(BAD_CONFIGS))
def test_config_check_names_the_key(key):
    good = ar_config()
    check_model_config(good, RES)  # the base is valid: the error below comes from the one change
    with pytest.raises(ValueError, match=f"'{key}'"):
        check_model_config(BAD_CONFIGS[key](good), RES)


def test_valid_ar_variants_pass_the_config_check():
    for cfg in (ar_config(mode="continuous", target="end_to_end"), ar_config(output="logistic", context="window"),
                ar_config(decoder="pit", adaln="patch")):
        check_model_config(cfg, RES)


# ------------------------------------------------------------------------------------- 9. the saved dictionary
def test_dictionary_is_saved_and_restored_with_the_weights():
    m = ar_model()
    sd = m.state_dict()
    assert "trunk.dictionary" in sd, "the dictionary is not in the state dict"
    assert torch.equal(sd["trunk.dictionary"], m.trunk.dictionary)
    fresh = build_generator(ar_config(), RES)
    assert not torch.equal(fresh.trunk.dictionary, m.trunk.dictionary), "a fresh model already has the dictionary"
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.trunk.dictionary, m.trunk.dictionary), "loading the weights did not restore it"
    # A continuous trunk has no dictionary.
    assert "trunk.dictionary" not in build_generator(ar_config(mode="continuous"), RES).state_dict()


# ------------------------------------------------------------------------------- training both levels, subsets
def test_learned_dictionary_trains_through_the_codebook_loss_and_kmeans_stays_fixed():
    x, y = uint8_images(B=2), labels(2)
    objective_cfg = ObjectiveConfig()
    learned = ar_config()
    learned.trunk.ar.dictionary = "learned"
    for cfg, trains in ((ar_config(), False), (learned, True)):
        torch.manual_seed(0)
        m = build_generator(cfg, RES)
        with torch.no_grad():
            m.trunk.dictionary.copy_(torch.randn_like(m.trunk.dictionary))
        assert ("trunk.dictionary" in dict(m.named_parameters())) == trains
        assert "trunk.dictionary" in m.state_dict()
        obj = ar.ARObjective(cfg, objective_cfg, RES, "cpu", train_semantic=True, train_decoder=False)
        loss, logs = obj.loss(m, x, y)
        assert ("codebook_mse" in logs) == trains
        if not trains:
            continue
        loss.backward()
        grad = m.trunk.dictionary.grad
        used = torch.zeros(grad.shape[0], dtype=torch.bool)
        used[nearest_entry(obj.teacher(x).flatten(0, 1), m.trunk.dictionary)] = True
        # The codebook loss moves exactly the entries some feature was assigned to.
        assert (grad[used].abs().sum(-1) > 0).all() and (grad[~used] == 0).all()


def test_joint_training_sends_the_decoder_loss_into_the_continuous_ar():
    x, y = uint8_images(B=2), labels(2)
    cfg = ar_config(mode="continuous")
    objective_cfg = ObjectiveConfig(semantic_weight=0.0)  # only the decoder's loss can reach the AR
    m = ar_model(mode="continuous").train()
    ar.ARObjective(cfg, objective_cfg, RES, "cpu", train_semantic=True, train_decoder=True).loss(m, x, y)[0].backward()
    assert m.trunk.head.weight.grad.abs().sum() > 0, "joint training: the decoder's loss does not reach z"
    m.zero_grad(set_to_none=True)
    # The decoder stage with a frozen trunk: the decoder sees the teacher's features, the AR does not even run.
    ar.ARObjective(cfg, objective_cfg, RES, "cpu", train_semantic=False, train_decoder=True).loss(m, x, y)[0].backward()
    assert all(p.grad is None for p in m.trunk.parameters())
    assert m.decoder.z_proj.weight.grad.abs().sum() > 0


@torch.no_grad()
@pytest.mark.parametrize("context", ["none", "window"])
def test_decoder_on_a_subset_of_patches_equals_those_rows_of_all_patches(context):
    m = ar_model(context=context)
    x, y = uint8_images(B=2), labels(2)
    L = m.trunk.num_patches
    idx = torch.randint(0, m.trunk.dictionary.shape[0], (2, L), generator=torch.Generator().manual_seed(0))
    full = m(x, y, semantic=False, decoder=True, indices=idx)["logp"].view(2, L, -1, 3)
    sel = torch.tensor([[3, 9, 14], [0, 5, 6]])
    part = m(x, y, semantic=False, decoder=True, indices=idx, patches=sel)["logp"].view(2, 3, -1, 3)
    torch.testing.assert_close(part, full[torch.arange(2)[:, None], sel], atol=1e-5, rtol=1e-5)


def test_a_random_stand_in_teacher_is_the_same_wherever_it_is_built():
    # The dictionary (trunk stage, rank 0) and the targets (each objective) come from separate instances; with a
    # random teacher they must still agree, whatever the global RNG did in between.
    torch.manual_seed(1)
    a = ar.SemanticTeacher(ar_config(), RES, "cpu")
    torch.manual_seed(2)
    b = ar.SemanticTeacher(ar_config(), RES, "cpu")
    x = uint8_images()
    assert torch.equal(a(x), b(x))


# ------------------------------------------------------------------------------------- cached position tables
@pytest.mark.parametrize("case", ["discrete-logistic-window", "method-c-pit"])
def test_cached_position_tables_give_bit_identical_sampling_and_likelihood(case, monkeypatch):
    from pixelgen.models import layers

    monkeypatch.setattr(layers, "_TABLES", {})
    if case == "method-c-pit":
        m = ar_model(res=SMALL, mode="continuous", decoder="pit", adaln="patch")
    else:
        m = ar_model(**B_CASES[case])
    x, y = uint8_images(res=m.resolution), labels()
    kw = dict(guidance="both", cfg_scale=2.0, semantic_cfg_scale=2.0)

    def outputs():
        out = [sample(m, kv_cache=kv, **kw) for kv in (True, False)]
        tensors = [t for s in out for t in (s.images, s.logprob) + ((s.indices,) if s.indices is not None else ())]
        with torch.no_grad():
            tensors.append(m.trunk(x, y))
            if m.method == "pixel_ar":
                indices = torch.zeros(x.shape[0], m.trunk.num_patches, dtype=torch.long)
                tensors.append(ar.log_likelihood(m, x, y, indices))
        return tensors

    with layers.tables_uncached():  # every table rebuilt per call, as before the cache
        reference = outputs()
    for run in ("cold", "warm"):
        for got, want in zip(outputs(), reference, strict=True):
            assert torch.equal(got, want), f"{case}, {run} cache: differs from tables built per call"
    if m.method == "pixel_ar":
        assert m.decoder.rope()[0] is m.decoder.rope()[0], "the pixel AR's table is rebuilt per call"
    assert m.trunk.rope("cpu")[0] is m.trunk.rope("cpu")[0], "the semantic AR's table is rebuilt per call"
