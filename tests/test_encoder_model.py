"""The item encoder's parts on small tensors: Triton config, tokenizer, towers, losses, exports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from mmrank.encoders import scl
from mmrank.encoders.model import EncoderConfig, ItemEncoder, encode_items, load_encoder, save_encoder
from mmrank.encoders.tokenizer import CLS_ID, PAD_ID, WordTokenizer, load_tokenizer
from mmrank.encoders.triton_config import config_pbtxt

TINY_RESNET = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 300,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
}


def parse_config(text: str):  # type: ignore[no-untyped-def]
    """Parse with Triton's own ModelConfig protobuf (shipped in tritonclient)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def random_items(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "wool", "silk", "hat", "scarf", "boot", "lamp", "oak", "steel"]
    titles = [" ".join(rng.choice(words, size=rng.integers(2, 6))) for _ in range(n)]
    return rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), titles


# --- Triton config ------------------------------------------------------------------------------


def test_python_backend_config_follows_the_contract_and_parses_as_triton_model_config():
    config = parse_config(
        config_pbtxt(max_batch_size=32, max_queue_delay_us=500, instance_kind="KIND_GPU", instance_count=2)
    )
    assert (config.name, config.backend, config.max_batch_size) == ("item_encoder", "python", 32)
    inputs = {i.name: (i.data_type, list(i.dims)) for i in config.input}
    from tritonclient.grpc import model_config_pb2 as pb

    assert inputs == {"IMAGE": (pb.TYPE_UINT8, [64, 64, 3]), "TITLE": (pb.TYPE_STRING, [1])}
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("EMBEDDING", pb.TYPE_FP32, [128])]
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, 2)]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500


@pytest.mark.parametrize("backend,platform", [("onnxruntime", "onnxruntime_onnx"), ("pytorch", "pytorch_libtorch")])
def test_token_id_backends_take_token_ids_instead_of_titles(backend, platform):
    config = parse_config(config_pbtxt(backend=backend, dim=64, dynamic_batching=False))
    from tritonclient.grpc import model_config_pb2 as pb

    assert (config.backend, config.platform) == (backend, platform)
    assert {i.name: (i.data_type, list(i.dims)) for i in config.input} == {
        "IMAGE": (pb.TYPE_UINT8, [64, 64, 3]),
        "TOKEN_IDS": (pb.TYPE_INT64, [32]),
    }
    assert list(config.output[0].dims) == [64]
    assert not config.HasField("dynamic_batching")


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"backend": "tensorrt"}, "backend"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"instance_kind": "GPU"}, "instance_kind"),
        ({"instance_count": 0}, "instance_count"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
    ],
)
def test_config_rejects_arguments_triton_would_refuse(kwargs, word):
    with pytest.raises(ValueError, match=word):
        config_pbtxt(**kwargs)


def test_triton_config_module_imports_neither_torch_nor_numpy():
    code = (
        "import sys, mmrank.encoders.triton_config as t; t.config_pbtxt(); "
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- tokenizer ----------------------------------------------------------------------------------


def test_word_tokenizer_uses_vocabulary_then_stable_hash_buckets(tmp_path):
    tok = WordTokenizer.build(["Red wool hat", "red silk scarf"], vocab_size=64, max_length=6)
    ids = tok.encode(["red HAT", "red zebra", "red zebra", "a b c d e f g h"])
    assert ids.dtype == np.int64 and ids.shape == (4, 6)
    assert ids[0, 0] == CLS_ID and ids[0, 3] == PAD_ID
    known = {tok.word_id(w) for w in ("hat", "red", "scarf", "silk", "wool")}
    assert known == set(range(2, 7))
    assert ids[1, 2] >= 7 and ids[1, 2] == ids[2, 2] < 64
    assert (ids[3] != PAD_ID).all()  # truncated to max_length
    tok.save(tmp_path)
    np.testing.assert_array_equal(load_tokenizer(tmp_path).encode(["red zebra hat"]), tok.encode(["red zebra hat"]))


# --- towers and fusion --------------------------------------------------------------------------


def test_default_encoder_gives_unit_vectors_independent_of_the_batch():
    torch.manual_seed(0)
    encoder = ItemEncoder()
    images, titles = random_items(6)
    batch = encode_items(encoder, images, titles)
    assert batch.shape == (6, 128) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    alone = encode_items(encoder, images[2:3], titles[2:3])
    np.testing.assert_allclose(alone[0], batch[2], atol=1e-5)
    assert not np.allclose(batch[0], batch[1])


def test_fusion_starts_as_the_sum_of_image_and_text_vectors():
    torch.manual_seed(0)
    encoder = ItemEncoder(EncoderConfig(dim=16))
    images, titles = random_items(3)
    pixels, ids = torch.from_numpy(images), torch.from_numpy(encoder.tokenizer.encode(titles))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(encoder.encode_image(pixels) + encoder.encode_text(ids), dim=-1)
        torch.testing.assert_close(encoder(pixels, ids), expected)


def test_hugging_face_towers_build_from_a_config_and_round_trip_through_a_checkpoint_and_export(tmp_path):
    torch.manual_seed(0)
    config = EncoderConfig(
        dim=32, image_tower="hf", image_backbone=TINY_RESNET, text_tower="hf", text_backbone=TINY_BERT
    )
    encoder = ItemEncoder(config)
    assert type(encoder.image_tower.model).__name__ == "ResNetModel"
    assert type(encoder.text_tower.model).__name__ == "BertModel"
    images, titles = random_items(4)
    before = encode_items(encoder, images, titles)
    assert before.shape == (4, 32)
    save_encoder(encoder, tmp_path / "ckpt")
    again = load_encoder(tmp_path / "ckpt")
    np.testing.assert_allclose(encode_items(again, images, titles), before, atol=1e-6)

    from mmrank.encoders.export import export_repository, load_exported

    run, tokenizer = load_exported(export_repository(again, tmp_path / "repo", backend="pytorch") / "1")
    np.testing.assert_allclose(run(images, tokenizer.encode(titles)), before, atol=1e-5)


def test_minilm_text_tower_loads_the_real_pretrained_weights_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = ItemEncoder(EncoderConfig(text_tower="hf", text_model="minilm"))
    ids = encoder.tokenizer.encode(["red wool hat", "crimson woollen cap", "laptop battery charger"])
    assert ids[0, 0] == 101  # BERT's [CLS]: the MiniLM tokenizer, not ours
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(encoder.text_tower(torch.from_numpy(ids)), dim=-1)
    # Pretrained sentence embeddings know that a hat is closer to a cap than to a charger.
    assert float(pooled[0] @ pooled[1]) > float(pooled[0] @ pooled[2]) + 0.2


def test_unknown_tower_names_are_refused():
    with pytest.raises(ValueError, match="image_tower"):
        ItemEncoder(EncoderConfig(image_tower="vgg"))
    with pytest.raises(ValueError, match="text_tower"):
        ItemEncoder(EncoderConfig(text_tower="rnn"))


# --- losses -------------------------------------------------------------------------------------


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_info_nce_is_low_for_matched_pairs_and_masks_duplicate_items():
    torch.manual_seed(0)
    keys = unit(torch.randn(8, 16))
    assert scl.info_nce(keys, keys, 0.05) < 0.01 < scl.info_nce(keys, keys.roll(1, 0), 0.05)
    # Two rows with the same item: without ids each is the other's negative, with ids it is not.
    duplicated = torch.cat([keys[:1], keys[:7]])
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    assert scl.info_nce(duplicated, duplicated, 0.05, ids) < 0.01 < scl.info_nce(duplicated, duplicated, 0.05)


def test_queue_entries_of_the_same_item_are_not_negatives():
    key = unit(torch.randn(1, 8))
    own = float(scl.info_nce(key, key, 1.0, torch.tensor([7]), key.clone(), torch.tensor([7])))
    other = float(scl.info_nce(key, key, 1.0, torch.tensor([7]), key.clone(), torch.tensor([8])))
    assert own == pytest.approx(0.0, abs=1e-6)
    assert other == pytest.approx(np.log(2.0), rel=1e-5)  # one negative as close as the positive


def test_triplet_term_counts_only_hard_negatives_closer_than_the_margin():
    q = unit(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    pos = unit(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    far = torch.tensor([[[-1.0, 0.0]], [[-1.0, 0.0]]])
    near = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    mask = torch.ones(2, 1)
    assert float(scl.triplet_loss(q, pos, far, mask, 0.2)) == 0.0
    assert float(scl.triplet_loss(q, pos, near, mask, 0.2)) == pytest.approx(0.2)
    assert float(scl.triplet_loss(q, pos, near, torch.zeros(2, 1), 0.2)) == 0.0


def test_scl_loss_weights_the_triplet_term():
    torch.manual_seed(0)
    q, k = unit(torch.randn(4, 8)), unit(torch.randn(4, 8))
    hard, mask = q.unsqueeze(1).clone(), torch.ones(4, 1, dtype=torch.bool)
    without, parts = scl.scl_loss(q, k, hard, mask, triplet_weight=0.0)
    weighted, parts_w = scl.scl_loss(q, k, hard, mask, triplet_weight=2.0)
    assert parts["triplet"] > 0
    assert float(weighted - without) == pytest.approx(2.0 * parts_w["triplet"], rel=1e-5)


def test_clip_loss_is_symmetric_in_image_and_text():
    torch.manual_seed(0)
    a, b = unit(torch.randn(6, 8)), unit(torch.randn(6, 8))
    assert float(scl.clip_loss(a, b)[0]) == pytest.approx(float(scl.clip_loss(b, a)[0]), rel=1e-6)


def test_momentum_queue_is_a_fifo_that_skips_empty_slots():
    queue = scl.MomentumQueue(size=4, dim=2)
    assert queue.entries()[0].shape == (0, 2)
    queue.push(torch.ones(3, 2), torch.tensor([1, 2, 3]))
    queue.push(2 * torch.ones(2, 2), torch.tensor([4, 5]))
    vectors, ids = queue.entries()
    assert sorted(ids.tolist()) == [2, 3, 4, 5]
    assert float(vectors[ids == 5].sum()) == 4.0


def test_momentum_update_moves_the_twin_a_fraction_toward_the_model():
    model = torch.nn.Linear(2, 2)
    twin = scl.momentum_copy(model)
    assert not any(p.requires_grad for p in twin.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    before = twin.weight.clone()
    scl.momentum_update(model, twin, 0.9)
    torch.testing.assert_close(twin.weight, 0.9 * before + 0.1 * model.weight)


# --- exports without a server -------------------------------------------------------------------


@pytest.mark.parametrize("backend,file", [("onnxruntime", "model.onnx"), ("pytorch", "model.pt")])
def test_token_id_exports_equal_torch(tmp_path, backend, file):
    from mmrank.encoders.export import export_repository, load_exported

    torch.manual_seed(0)
    encoder = ItemEncoder()
    model_dir = export_repository(encoder, tmp_path / "repo", version="3", backend=backend, max_batch_size=16)
    version = model_dir / "3"
    assert (version / file).exists() and (version / "tokenizer.json").exists()
    assert parse_config((model_dir / "config.pbtxt").read_text()).max_batch_size == 16
    run, tokenizer = load_exported(version)
    images, titles = random_items(5, seed=1)
    got = run(images, tokenizer.encode(titles))
    expected = encode_items(encoder, images, titles)
    cosine = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1)
    assert got.shape == (5, 128) and cosine.min() >= 0.9999
