"""The cascade's quality gate: it learns real from generated, its threshold escalates the fraction
asked for, its weights round-trip, and its CLI fails in one line."""

import subprocess
import sys

import numpy as np
import pytest

from triffusion.orchestrator.clip import ClipScorer
from triffusion.orchestrator.gate import (ClipGate, Gate, calibrate_threshold, load_gate, random_gate, save_clip_gate,
                                         save_gate, train)


def smooth_images(n, rng, size=48):
    """'Real': smooth colour gradients. 'Generated' below: the same with high-frequency noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 1, 3)
        image = np.stack([a * x + (1 - a) * y, b * y, c * x], axis=-1)
        images.append((image * 255).astype(np.uint8))
    return images


def noisy(images, rng):
    return [np.clip(im.astype(int) + rng.integers(-90, 90, im.shape), 0, 255).astype(np.uint8) for im in images]


def test_trained_gate_tells_real_from_generated_on_held_out_images():
    rng = np.random.default_rng(0)
    real, generated = smooth_images(48, rng), noisy(smooth_images(48, rng), rng)
    gate = Gate(train(real, generated, epochs=15, seed=0, log=lambda *_: None))
    held_real, held_generated = smooth_images(16, rng), noisy(smooth_images(16, rng), rng)
    accuracy = ((gate.score(held_real) >= 0.5).sum() + (gate.score(held_generated) < 0.5).sum()) / 32
    assert accuracy >= 0.9, accuracy
    # Images of any size score (the gate resizes), one score each, in [0, 1].
    scores = gate.score([held_real[0], np.zeros((96, 64, 3), np.uint8)])
    assert scores.shape == (2,) and ((0 <= scores) & (scores <= 1)).all()


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_calibrated_threshold_escalates_exactly_the_fraction_asked_for(fraction):
    scores = np.random.default_rng(1).uniform(size=200)
    threshold = calibrate_threshold(scores, fraction)
    assert (scores < threshold).mean() == fraction


def test_calibration_rejects_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match="escalate_fraction: 1.5 is out of range; allowed 0..1"):
        calibrate_threshold(np.array([0.5]), 1.5)


def test_saved_gate_scores_the_same_after_loading(tmp_path):
    model = random_gate(seed=3)
    path = save_gate(model, tmp_path / "gate.pt", source="random")
    images = smooth_images(4, np.random.default_rng(2))
    assert np.array_equal(Gate(model).score(images), load_gate(path).score(images))
    with pytest.raises(FileNotFoundError, match="train them with `python -m triffusion.orchestrator.gate train`"):
        load_gate(tmp_path / "missing.pt")


def test_train_cli_on_an_empty_folder_is_one_line(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "gen").mkdir()
    done = subprocess.run([sys.executable, "-m", "triffusion.orchestrator.gate", "train", "--real", str(tmp_path / "real"),
                           "--generated", str(tmp_path / "gen"), "--out", str(tmp_path / "g.pt")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "no .png/.jpg/.webp images" in done.stderr and "Traceback" not in done.stderr


def test_clip_gate_maps_the_cosine_of_each_image_with_its_own_prompt_into_0_1(tmp_path):
    folder = save_clip_gate("random", tmp_path / "clip", seed=1)
    gate = load_gate(folder)
    assert isinstance(gate, ClipGate)
    images = list(smooth_images(3, np.random.default_rng(4)))
    prompts = ["a red fox", "a bowl of ramen", "lighthouse at dusk"]
    scores = gate.score(np.stack(images), prompts)
    reference = (1 + ClipScorer.random(seed=1).cosine(images, prompts)) / 2  # same seed: the same weights
    assert scores.dtype == np.float32 and scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=1e-6)
    # Each image is scored against its own prompt: swapping two prompts moves their scores.
    swapped = gate.score(np.stack(images), [prompts[1], prompts[0], prompts[2]])
    np.testing.assert_allclose(swapped, (1 + ClipScorer.random(seed=1).cosine(images, [prompts[1], prompts[0],
                                                                                      prompts[2]])) / 2,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(swapped[:2], scores[:2])
    with pytest.raises(ValueError, match="prompt: the CLIP gate scores each image against its prompt; expected 3 "
                                         "prompts, got none"):
        gate.score(np.stack(images))


def test_export_rejects_a_clip_gate_it_cannot_load_and_a_bare_folder(tmp_path):
    from triffusion.export.build import _write_gate

    with pytest.raises(ValueError, match=f"--gate clip:{tmp_path}/none: CLIP folder {tmp_path}/none does not exist"):
        _write_gate(tmp_path / "repo", f"clip:{tmp_path}/none", 0, log=lambda *a: None)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=f"--gate {tmp_path}/folder is a folder; for a CLIP score gate write "
                                         f"--gate clip:{tmp_path}/folder"):
        _write_gate(tmp_path / "repo", str(tmp_path / "folder"), 0, log=lambda *a: None)
    with pytest.raises(ValueError, match="needs a CLIP folder or hub id after 'clip:'"):
        _write_gate(tmp_path / "repo", "clip:", 0, log=lambda *a: None)
