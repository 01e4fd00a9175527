"""The quality harness on tiny models: CLIP score against a per-pair cosine computed another way, FID
against a numpy Frechet distance of the same features, evaluate() on constructed records, and runs
through the real server (tiny preset) per policy, by the API and by the CLI."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from perf.quality import (FidReference, QualityError, evaluate, fid, generate_with_server,
                          parse_policies, parse_policy_json)
from triffusion.orchestrator.clip import ClipError, ClipScorer

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red fox", "lighthouse at dusk, oil painting with heavy brush strokes", "a bowl of ramen"]


def random_images(n: int, size: int = 64, seed: int = 0, high: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, (size, size, 3), dtype=np.uint8) for _ in range(n)]


class TinyFeatures(torch.nn.Module):
    """A seeded conv net standing in for InceptionV3: (N, 3, H, W) uint8 -> (N, 8)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x.float())).mean(dim=(2, 3))


def reference_cosines(scorer: ClipScorer, images, prompts) -> np.ndarray:
    """Per pair, one at a time, through get_image_features / get_text_features (not the batched forward)."""
    cosines = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            pixels = scorer.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            tokens = scorer.processor.tokenizer([prompt], return_tensors="pt")
            image_emb = scorer.model.get_image_features(pixel_values=pixels).pooler_output
            text_emb = scorer.model.get_text_features(**tokens).pooler_output
            cosines.append(torch.nn.functional.cosine_similarity(image_emb, text_emb).item())
    return np.array(cosines)


# ------------------------------------------------------------------------------------------- CLIP score


def test_clip_score_is_100_times_the_pair_cosine_clamped_at_zero():
    scorer = ClipScorer.random(seed=0)
    scorer.batch_size = 2  # three pairs: two batches, padded to different lengths
    images = random_images(3)
    cosines = reference_cosines(scorer, images, PROMPTS)
    # This seed gives cosines of both signs, so the clamp and the pass-through are both exercised.
    assert (cosines > 0.1).any() and (cosines < -0.1).any()
    scores = scorer.score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, 100.0 * np.maximum(cosines, 0), atol=1e-4)
    np.testing.assert_allclose(scorer.cosine(images, PROMPTS), cosines, atol=1e-6)  # what the CLIP gate reads
    # Flipping the text projection flips every cosine: the other pairs now score.
    scorer.model.text_projection.weight.data.neg_()
    flipped = scorer.score(images, PROMPTS)
    np.testing.assert_allclose(flipped, 100.0 * np.maximum(-cosines, 0), atol=1e-4)
    assert ((scores == 0) != (flipped == 0)).all() and (np.maximum(scores, flipped) <= 100).all()


def test_clip_scorer_is_deterministic_for_a_seed():
    weights = {seed: ClipScorer.random(seed=seed).model.state_dict() for seed in (3, 4)}
    again = ClipScorer.random(seed=3).model.state_dict()
    assert all(torch.equal(again[k], weights[3][k]) for k in again)
    assert not torch.equal(again["text_projection.weight"], weights[4]["text_projection.weight"])


def test_clip_score_needs_one_prompt_per_image():
    scorer = ClipScorer.random(seed=0)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(random_images(2), ["a red fox"])
    assert scorer.score([], []).shape == (0,)


def test_pretrained_names_the_missing_weights_and_how_to_pass_a_folder(tmp_path):
    with pytest.raises(ClipError, match=f"CLIP folder {tmp_path}/none does not exist; give a local folder"):
        ClipScorer.pretrained(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipError, match=f"CLIP weights '{tmp_path}/empty' cannot be loaded .*local folder"):
        ClipScorer.pretrained(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------- FID


def numpy_fid(feature: torch.nn.Module, real, generated) -> float:
    def stats(images):
        with torch.no_grad():
            x = np.concatenate([feature(torch.from_numpy(i).permute(2, 0, 1)[None]).double().numpy() for i in images])
        return x.mean(axis=0), np.cov(x, rowvar=False)

    (mu1, s1), (mu2, s2) = stats(real), stats(generated)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum())


def test_fid_against_itself_is_zero_and_grows_with_a_shift():
    feature = TinyFeatures()
    # Mixed sizes: images go to the metric in runs of one size, NCHW.
    real = random_images(12, size=32, seed=1, high=200) + random_images(12, size=48, seed=2, high=200)
    shifted = {d: [np.clip(i.astype(int) + d, 0, 255).astype(np.uint8) for i in real] for d in (10, 40)}
    assert abs(fid(real, real, feature=feature)) < 1e-6
    small, large = fid(real, shifted[10], feature=feature), fid(real, shifted[40], feature=feature)
    assert 0 < small < large
    assert small == pytest.approx(numpy_fid(feature, real, shifted[10]), rel=1e-4)
    assert large == pytest.approx(numpy_fid(feature, real, shifted[40]), rel=1e-4)


def test_fid_reference_keeps_its_features_across_generated_sets():
    feature, real = TinyFeatures(), random_images(16, size=32, seed=1)
    reference = FidReference(real, feature=feature)
    other = random_images(16, size=32, seed=5)
    first, itself, second = reference(other), reference(real), reference(other)
    assert first == second and abs(itself) < 1e-6 and first == fid(real, other, feature=feature)


def test_fid_needs_two_images_on_each_side():
    feature = TinyFeatures()
    with pytest.raises(QualityError, match="at least 2 reference images, got 1"):
        fid(random_images(1), random_images(3), feature=feature)
    with pytest.raises(QualityError, match="at least 2 generated images, got 1"):
        fid(random_images(3), random_images(1), feature=feature)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed here")
def test_fid_without_torch_fidelity_names_what_inception_needs():
    with pytest.raises(QualityError, match="InceptionV3 cannot be loaded .*torch-fidelity.*--inception-weights"):
        fid(random_images(2), random_images(2))


# ------------------------------------------------------------------------------------------ evaluate


class FixedScorer:
    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def score(self, images, prompts):
        assert len(images) == len(prompts)
        return np.array([self.scores[p] for p in prompts])


def record(prompt, latency_ms, steps, unet, seed=0):
    return {"prompt": prompt, "image": random_images(1, size=32, seed=seed)[0], "latency_ms": latency_ms,
            "steps": steps, "unet": unet}


def test_evaluate_aggregates_each_policy():
    scorer = FixedScorer({"a": 10.0, "b": 20.0, "c": 30.0, "d": 55.0})
    results = {
        "fixed_50": [record("a", 100.0, 50, "unet", 1), record("b", 200.0, 50, "unet", 2),
                     record("c", 600.0, 50, "unet", 3)],
        "cascade": [record("a", 50.0, 20, "unet_tiny_lite", 4), record("b", 150.0, 50, "unet", 5),
                    record("c", 40.0, 20, "unet_tiny_lite", 6)],
        "one": [record("d", 70.0, 7, "unet", 7)],
    }
    feature, reference = TinyFeatures(), random_images(6, size=32, seed=9)
    summary = evaluate(results, scorer, reference_images=reference, feature=feature)
    assert summary["fixed_50"] == {
        "n": 3, "clip_score_mean": 20.0, "clip_score_std": pytest.approx((200 / 3) ** 0.5, rel=1e-12),
        "fid": pytest.approx(fid(reference, [r["image"] for r in results["fixed_50"]], feature=feature), rel=1e-9),
        "latency_ms_mean": 300.0, "steps_mean": 50.0, "unet_fraction": {"unet": 1.0}}
    cascade = summary["cascade"]
    assert (cascade["latency_ms_mean"], cascade["steps_mean"]) == (80.0, 30.0)
    assert cascade["unet_fraction"] == {"unet": pytest.approx(1 / 3), "unet_tiny_lite": pytest.approx(2 / 3)}
    assert cascade["fid"] > 0 and cascade["fid"] != summary["fixed_50"]["fid"]
    assert summary["one"] == {"n": 1, "clip_score_mean": 55.0, "clip_score_std": 0.0, "fid": None,
                              "latency_ms_mean": 70.0, "steps_mean": 7.0, "unet_fraction": {"unet": 1.0}}
    # Without reference images there is no FID; a prebuilt FidReference gives the same figures.
    assert evaluate(results, scorer)["fixed_50"]["fid"] is None
    prebuilt = evaluate(results, scorer, reference_images=FidReference(reference, feature=feature))
    assert prebuilt["cascade"]["fid"] == pytest.approx(cascade["fid"], rel=1e-9)
    with pytest.raises(QualityError, match="policy empty: no records"):
        evaluate({"empty": []}, scorer)


# ---------------------------------------------------------------------------------------------- policies


def test_policy_shorthands_and_json():
    assert parse_policies("fixed_50, auto,auto_12,cascade,cascade_8", steps=30) == {
        "fixed_50": {"steps": 50}, "auto": {"steps": 30, "step_mode": "auto"},
        "auto_12": {"steps": 12, "step_mode": "auto"}, "cascade": {"steps": 30, "unet": "cascade"},
        "cascade_8": {"steps": 8, "unet": "cascade"}}
    for bad in ("fixed", "fast", "auto_", "fixed_x"):
        with pytest.raises(QualityError, match=f"policy '{bad}' is unknown; use fixed_N"):
            parse_policies(bad, steps=30)
    assert parse_policy_json('lite={"steps": 30, "unet": "tiny-lite"}') == ("lite", {"steps": 30, "unet": "tiny-lite"})
    with pytest.raises(QualityError, match="expected NAME="):
        parse_policy_json('{"steps": 30}')
    with pytest.raises(QualityError, match="--policy lite={steps: 3}: Expecting property name"):
        parse_policy_json("lite={steps: 3}")


# ---------------------------------------------------------------------------------- through the server


@pytest.mark.server
def test_generate_with_server_reports_steps_and_unet_per_policy(server):
    policies = {"base": {"steps": 4}, "lite": {"steps": 4, "unet": "tiny-lite"},
                "auto": {"steps": 10, "step_mode": "auto"}}
    results = generate_with_server(server.grpc, PROMPTS[:2], policies, seed=11, height=64, width=64)
    assert list(results) == ["base", "lite", "auto"]
    for policy, records in results.items():
        assert [r["prompt"] for r in records] == PROMPTS[:2]
        assert [r["metadata"]["seed"] for r in records] == [11, 12]
        assert all(r["image"].shape == (64, 64, 3) and r["image"].dtype == np.uint8 for r in records)
        # Client-side latency covers the server's own total plus the round trip.
        assert all(r["latency_ms"] >= r["metadata"]["timings_ms"]["total"] > 0 for r in records)
    assert [(r["steps"], r["unet"]) for r in results["base"]] == [(4, "unet"), (4, "unet")]
    assert [(r["steps"], r["unet"]) for r in results["lite"]] == [(4, "unet_tiny_lite")] * 2
    # The test server's entropy threshold stops auto at its 0.4 minimum fraction (4 of 10), plus the last step.
    assert [(r["steps"], r["metadata"]["early_stop"]) for r in results["auto"]] == [(5, True)] * 2
    # Same seed and prompt, another UNet: another image.
    assert not np.array_equal(results["base"][0]["image"], results["lite"][0]["image"])

    summary = evaluate(results, ClipScorer.random(seed=0))
    assert {p: (s["n"], s["steps_mean"], s["unet_fraction"]) for p, s in summary.items()} == {
        "base": (2, 4.0, {"unet": 1.0}), "lite": (2, 4.0, {"unet_tiny_lite": 1.0}), "auto": (2, 5.0, {"unet": 1.0})}


@pytest.mark.server
def test_generate_with_server_names_the_policy_and_prompt_that_failed(server):
    with pytest.raises(QualityError, match=r"policy bad, prompt 0 \('a red fox'\): .*'nope' is not served"):
        generate_with_server(server.grpc, PROMPTS[:1], {"bad": {"steps": 2, "unet": "nope"}}, height=64, width=64)


# ------------------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "perf.quality", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.server
def test_cli_writes_quality_next_to_latency(server, tmp_path):
    scorer = ClipScorer.random(seed=0)
    scorer.model.save_pretrained(tmp_path / "clip")
    scorer.processor.save_pretrained(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\nlighthouse at dusk\n")
    out = tmp_path / "quality.json"
    proc = run_cli("--url", server.grpc, "--prompts", str(prompts), "--n", "3", "--policies", "fixed_3",
                   "--policy", 'lite={"steps": 3, "unet": "tiny-lite"}', "--clip", str(tmp_path / "clip"),
                   "--height", "64", "--width", "64", "--seed", "5", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert (report["clip"], report["n"], report["fid_feature"]) == (str(tmp_path / "clip"), 3, None)
    assert report["policies"]["fixed_3"]["inputs"] == {"steps": 3}
    assert report["policies"]["lite"]["inputs"] == {"steps": 3, "unet": "tiny-lite"}
    for policy, unet in (("fixed_3", "unet"), ("lite", "unet_tiny_lite")):
        summary = report["policies"][policy]
        figures = (summary["n"], summary["steps_mean"], summary["unet_fraction"], summary["fid"])
        assert figures == (3, 3.0, {unet: 1.0}, None)
        assert 0 <= summary["clip_score_mean"] <= 100 and summary["latency_ms_mean"] > 0
    table = proc.stdout.strip().splitlines()
    assert table[0].split() == ["policy", "n", "CLIP", "score", "FID", "latency", "ms", "steps", "unet"]
    assert table[1].startswith("fixed_3") and table[2].split()[:2] == ["lite", "3"]
    assert "unet_tiny_lite 100%" in table[2]


@pytest.mark.parametrize("args, message", [
    (["--clip", "/nonexistent/clip"],
     "error: --clip: CLIP folder /nonexistent/clip does not exist; give a local folder"),
    (["--policies", "fast"], "error: policy 'fast' is unknown; use fixed_N"),
    (["--prompts", "/nonexistent/prompts.txt"], "error: /nonexistent/prompts.txt: cannot read prompts"),
    (["--reference", "/nonexistent/ref"], "error: --reference /nonexistent/ref: not a directory"),
    (["--n", "0"], "error: --n 0: expected at least 1"),
])
def test_cli_errors_are_one_line(args, message):
    proc = run_cli("--url", "localhost:1", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
