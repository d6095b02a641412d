"""Pre-training, evaluation and embedding on the tiny shop: checkpoints, resume after a kill, metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrank import shop as shop_module
from mmrank.encoders.evaluate import concept_accuracy, query_recall
from mmrank.encoders.model import encode_items, load_encoder
from mmrank.encoders.train import TrainConfig, batch_rows, learning_rate, train

SMALL_RUN = dict(batch_size=16, checkpoint_every=3, queue_size=32, warmup=2)


@pytest.fixture(scope="module")
def tiny_shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shop_module.generate("tiny", seed=0, out=tmp_path_factory.mktemp("shop") / "tiny")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / "encoder.pt", weights_only=True)


def test_batches_and_schedule_are_functions_of_the_step():
    config = TrainConfig(steps=100, warmup=10, lr=1.0, batch_size=8, seed=3)
    np.testing.assert_array_equal(batch_rows(42, 500, config), batch_rows(42, 500, config))
    assert not np.array_equal(batch_rows(42, 500, config), batch_rows(43, 500, config))
    assert len(set(batch_rows(0, 500, config))) == 8
    assert learning_rate(0, config) == pytest.approx(0.1) and learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(99, config) == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="mae")


@pytest.mark.slow
def test_scl_run_killed_after_a_checkpoint_resumes_and_ends_where_an_uninterrupted_run_ends(tiny_shop, tmp_path):
    out = tmp_path / "killed"
    argv = [
        sys.executable,
        "-m",
        "mmrank",
        "encoders",
        "train",
        "--data",
        str(tiny_shop),
        "--objective",
        "scl",
        "--out",
        str(out),
        "--steps",
        "9",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "3",
        "--queue-size",
        "32",
        "--warmup",
        "2",
        "--no-progress",
    ]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not (out / "train_state.pt").exists():
        assert first.poll() is None, first.stdout.read().decode()[-2000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    saved_step = json.loads((out / "config.json").read_text())["step"]
    assert 3 <= saved_step < 9

    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == saved_step and summary["steps"] == 9

    state = torch.load(out / "train_state.pt", weights_only=False)
    assert [h["step"] for h in state["history"]] == list(range(1, 10))
    assert (out / "loss.png").stat().st_size > 1000

    straight = tmp_path / "straight"
    train(tiny_shop, straight, TrainConfig(objective="scl", steps=9, **SMALL_RUN), progress=False)
    for name, tensor in weights(straight).items():
        torch.testing.assert_close(weights(out)[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_clip_objective_runs_in_the_same_loop_and_leaves_a_usable_checkpoint(tiny_shop, tmp_path):
    summary = train(tiny_shop, tmp_path / "clip", TrainConfig(objective="clip", steps=4, **SMALL_RUN), progress=False)
    assert summary["steps"] == 4 and summary["resumed_from"] == 0
    meta = json.loads((tmp_path / "clip" / "config.json").read_text())
    assert meta["train"]["objective"] == "clip" and meta["step"] == 4
    state = torch.load(tmp_path / "clip" / "train_state.pt", weights_only=False)
    assert state["twin"] is None and all(h["triplet"] == 0.0 for h in state["history"])
    shop = shop_module.load(tiny_shop)
    vectors = encode_items(load_encoder(tmp_path / "clip"), shop.images[:5], shop.items["title"][:5].tolist())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="clip run"):
        train(tiny_shop, tmp_path / "clip", TrainConfig(objective="scl", steps=4, **SMALL_RUN), progress=False)


def test_semantic_metrics_are_perfect_for_oracle_vectors_and_low_for_random_ones(tiny_shop):
    shop = shop_module.load(tiny_shop)
    concepts = shop.items.sort_values("item_id")["concept"].to_numpy()
    oracle = shop_module.concept_vectors(shop, dim=64, seed=0)
    heldout = np.asarray(shop.splits["heldout_items"])
    perfect = concept_accuracy(oracle[heldout], heldout, oracle, concepts)
    assert perfect["concept_top1"] == 1.0 and perfect["concept_recall@10"] == 1.0 and perfect["scored_items"] > 0
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(oracle.shape).astype(np.float32)
    chance = concept_accuracy(noise[heldout], heldout, noise, concepts)
    assert chance["concept_top1"] < 0.3 and chance["concept_recall@10"] < 0.3
    bought = rng.integers(0, len(oracle), 50)
    assert query_recall(noise[bought], noise, bought, k=10) == 1.0
    assert query_recall(noise[bought], noise, (bought + 1) % len(noise), k=1) == 0.0


def test_cli_eval_prints_the_table_and_embed_writes_a_space(tiny_shop, tmp_path, capsys):
    from mmrank.cli import main
    from mmrank.space import load_space

    checkpoint = tmp_path / "scl"
    train(tiny_shop, checkpoint, TrainConfig(objective="scl", steps=3, **SMALL_RUN), progress=False)
    assert (
        main(
            [
                "encoders",
                "eval",
                "--data",
                str(tiny_shop),
                "--checkpoint",
                str(checkpoint),
                "--json",
                str(tmp_path / "metrics.json"),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| scl | scl | 3 |" in table and "concept_top1" in table
    metrics = json.loads((tmp_path / "metrics.json").read_text())["scl"]
    assert 0.0 <= metrics["concept_top1"] <= 1.0 and metrics["heldout_searches"] > 0

    assert (
        main(
            [
                "encoders",
                "embed",
                "--data",
                str(tiny_shop),
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(tmp_path / "space"),
                "--version",
                "enc-test",
            ]
        )
        == 0
    )
    space = load_space(tmp_path / "space")
    shop = shop_module.load(tiny_shop)
    assert space.version == "enc-test" and space.vectors.shape == (shop.n_items, 128) and space.coverage == 1.0
    expected = encode_items(
        load_encoder(checkpoint), shop.images[:7], shop.items.sort_values("item_id")["title"][:7].tolist()
    )
    np.testing.assert_allclose(space.vectors[:7], expected, atol=1e-5)

    assert (
        main(
            [
                "encoders",
                "export",
                "--checkpoint",
                str(checkpoint),
                "--repo",
                str(tmp_path / "repo"),
                "--version",
                "7",
                "--backend",
                "onnxruntime",
                "--max-batch-size",
                "32",
                "--max-queue-delay-us",
                "100",
                "--instance-kind",
                "KIND_GPU",
                "--instance-count",
                "2",
            ]
        )
        == 0
    )
    config = (tmp_path / "repo" / "item_encoder" / "config.pbtxt").read_text()
    assert "max_batch_size: 32" in config and "kind: KIND_GPU" in config and "count: 2" in config
    assert "max_queue_delay_microseconds: 100" in config
    from mmrank.encoders.export import load_exported

    run, tokenizer = load_exported(tmp_path / "repo" / "item_encoder" / "7")
    titles = shop.items.sort_values("item_id")["title"][:7].tolist()
    np.testing.assert_allclose(run(np.array(shop.images[:7]), tokenizer.encode(titles)), expected, atol=1e-4)
