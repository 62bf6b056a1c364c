"""RQ-VAE semantic IDs: k-means init, gradient paths, training, unique level, vocabulary,
trie and the on-disk set (tiny sizes; random embeddings except one MiniLM test)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from recjax.models import rqvae

TINY = rqvae.RQVAEConfig(input_dim=16, hidden_dims=(32,), latent_dim=8, num_levels=2, codebook_size=8,
                         dropout=0.0, steps=60, batch_size=64, log_every=20)


def clustered(n=512, dim=16, clusters=8, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(clusters, dim)) * 3
  return (centers[rng.integers(0, clusters, n)] + 0.1 * rng.normal(size=(n, dim))).astype(np.float32)


def latent_error(model, x):
  out = model(jnp.asarray(x))
  return float(jnp.mean(jnp.square(out["z"] - out["q"])))


def test_kmeans_init_beats_random_codebooks_on_clustered_data():
  x = clustered()
  centroids, assign = rqvae.kmeans(x, 8, key=jax.random.key(0), iters=5)
  err = np.mean(np.square(x - np.asarray(centroids)[np.asarray(assign)]))
  assert err < 0.05  # every cluster found (noise variance 0.01 per dim)
  model = rqvae.RQVAE(TINY, rngs=nnx.Rngs(0))
  random_error = latent_error(model, x)
  rqvae.kmeans_init(model, jnp.asarray(x), key=jax.random.key(1), iters=5)
  assert latent_error(model, x) < 0.1 * random_error
  again = rqvae.RQVAE(TINY, rngs=nnx.Rngs(0))  # seeded: the same codebooks again
  rqvae.kmeans_init(again, jnp.asarray(x), key=jax.random.key(1), iters=5)
  np.testing.assert_array_equal(model.codebooks[...], again.codebooks[...])


@pytest.mark.parametrize("gradient", ["ste", "rotation"])
def test_gradient_path_reaches_the_encoder(gradient):
  cfg = rqvae.RQVAEConfig(**{**TINY.__dict__, "gradient": gradient})
  model = rqvae.RQVAE(cfg, rngs=nnx.Rngs(0))
  x = jnp.asarray(clustered(64))
  rqvae.kmeans_init(model, x, key=jax.random.key(0), iters=2)
  out = model(x)
  # The decoder sees exactly the quantised latent ...
  path = rqvae.straight_through if gradient == "ste" else rqvae.rotation_trick
  np.testing.assert_allclose(path(out["z"], out["q"]), out["q"], atol=1e-5)

  # ... yet the reconstruction loss alone moves the encoder, and never the codebooks.
  grads = nnx.grad(lambda m: jnp.mean(jnp.square(m(x)["x_hat"] - x)))(model)
  assert float(jnp.abs(grads.encoder.out.kernel[...]).sum()) > 0
  assert float(jnp.abs(grads.encoder.hidden[0].kernel[...]).sum()) > 0
  assert float(jnp.abs(grads.codebooks[...]).sum()) == 0
  w = jax.random.normal(jax.random.key(2), out["z"].shape)
  dz = jax.grad(lambda z: jnp.sum(w * path(z, out["q"])))(out["z"])
  if gradient == "ste":
    np.testing.assert_allclose(dz, w, atol=1e-6)  # copied verbatim
  else:
    assert not np.allclose(dz, w) and float(jnp.abs(dz).sum()) > 0  # rotated and rescaled


def test_training_reduces_reconstruction_and_is_deterministic():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(256, 4)) @ rng.normal(size=(4, 16))).astype(np.float32)  # rank-4 data
  x, _, _ = rqvae.standardize(x)
  cfg = rqvae.RQVAEConfig(**{**TINY.__dict__, "dead_code_every": 20})
  a = rqvae.train_rqvae(x, cfg)
  assert a.history[-1]["recon"] < 0.7 * a.history[0]["recon"]
  assert a.codes.shape == (256, 2) and a.codes.dtype == np.int32
  assert 0 < a.metrics["reconstruction_mse"] < a.history[0]["recon"]
  assert 0 < min(a.metrics["codebook_usage"]) <= 1
  b = rqvae.train_rqvae(x, cfg)
  np.testing.assert_array_equal(a.codes, b.codes)
  assert a.history == b.history


def test_code_metrics_and_unique_level():
  codes = np.array([[1, 2], [0, 0], [1, 2], [3, 3], [1, 2]], np.int32)
  m = rqvae.code_metrics(codes, codebook_size=4)
  assert m["collision_rate"] == 0.6 and m["unique_fraction"] == 0.4
  assert m["distinct_prefixes_fraction"] == 0.6 and m["max_items_per_prefix"] == 3
  assert m["codebook_usage"] == [0.75, 0.75]
  full = rqvae.add_unique_level(codes, size=4)
  np.testing.assert_array_equal(full[:, -1], [0, 0, 1, 0, 2])  # by item id within a prefix
  assert len(np.unique(full, axis=0)) == len(codes)
  # Deterministic: the same items in another row order get the same IDs.
  perm = np.array([4, 2, 0, 3, 1])
  shuffled = rqvae.add_unique_level(codes[perm], size=4, item_ids=perm)
  np.testing.assert_array_equal(shuffled, full[perm])


def test_unique_level_overflow_names_the_prefix():
  codes = np.array([[5, 6, 7]] * 3 + [[0, 1, 2]] * 2, np.int32)
  with pytest.raises(ValueError, match=r"prefix \(5, 6, 7\) holds 3 items .* only 2 codes"):
    rqvae.add_unique_level(codes, size=2)


def test_token_offsets_map_each_level_code_to_a_distinct_token():
  sizes = [4, 3, 5, 2]
  offsets = rqvae.token_offsets(sizes)
  assert offsets == [2, 6, 9, 14]
  tokens = [o + c for o, s in zip(offsets, sizes) for c in range(s)]
  assert len(set(tokens)) == sum(sizes) and min(tokens) == rqvae.NUM_SPECIAL
  assert max(tokens) == offsets[-1] + sizes[-1] - 1
  sids = rqvae.SemanticIds(codes=np.array([[-1] * 4, [-1] * 4, [3, 2, 4, 1], [0, 0, 0, 0]], np.int32),
                           metadata={"offsets": offsets, "codebook_sizes": sizes})
  np.testing.assert_array_equal(sids.tokens, [[-1] * 4, [-1] * 4, [5, 8, 13, 15], [2, 6, 9, 14]])


def test_trie_returns_only_valid_children():
  codes = np.array([[1, 2, 0], [1, 2, 1], [1, 3, 0], [4, 0, 0]])
  trie = rqvae.PrefixTrie(codes)
  np.testing.assert_array_equal(trie.valid_next(()), [1, 4])
  np.testing.assert_array_equal(trie.valid_next((1,)), [2, 3])
  np.testing.assert_array_equal(trie.valid_next((1, 2)), [0, 1])
  np.testing.assert_array_equal(trie.valid_next((4, 0)), [0])
  assert trie.valid_next((2,)).size == 0 and trie.valid_next((1, 2, 0)).size == 0
  assert (1, 3, 0) in trie and (1, 3, 1) not in trie and (1, 3) not in trie


def fake_prepared(path, titles, content_hash="sha256:aaa"):
  """A minimal prepared dataset: items table + manifest (what item_texts and the loader read)."""
  path.mkdir(parents=True, exist_ok=True)
  n = len(titles)
  pq.write_table(pa.table({"item_id": list(range(2, n + 2)), "title": titles, "brand": [None] * n,
                           "categories": [["Beauty", "Skin"]] * n}), path / "items.parquet")
  (path / "manifest.json").write_text(json.dumps(
      {"content_hash": content_hash, "item_ids": {"pad": 0, "mask": 1, "vocab_size": n + 2}}))
  return path


def test_loader_refuses_a_changed_content_hash(tmp_path):
  from recjax.artifacts import semantic_ids
  data = fake_prepared(tmp_path / "ds", ["a", "b", "c"])
  codes = np.array([[-1, -1], [-1, -1], [0, 0], [0, 1], [2, 0]], np.int32)
  semantic_ids.save(data, "t", codes, [4, 2], {"metrics": {"collision_rate": 0.5}})
  sids = semantic_ids.load(data, "t")
  np.testing.assert_array_equal(sids.codes, codes)
  assert sids.metadata["offsets"] == [2, 6] and sids.vocab_size == 8
  assert sids.metadata["metrics"]["collision_rate"] == 0.5
  assert sids.item_of((0, 1)) == 3 and sids.item_of((3, 3)) is None
  np.testing.assert_array_equal(sids.trie.valid_next((0,)), [0, 1])
  manifest = json.loads((data / "manifest.json").read_text())
  (data / "manifest.json").write_text(json.dumps({**manifest, "content_hash": "sha256:bbb"}))
  with pytest.raises(ValueError, match="built from dataset content sha256:aaa but .* now has sha256:bbb"):
    semantic_ids.load(data, "t")
  with pytest.raises(FileNotFoundError, match="recjax fit --gin_file=fits/rqvae.gin .* --gin.NAME=missing"):
    semantic_ids.load(data, "missing")


def test_build_with_minilm_end_to_end(tmp_path, monkeypatch):
  from recjax.artifacts import semantic_ids, text_embeddings
  from recjax.models import text
  titles = ["red lipstick", "matte red lipstick", "shampoo for dry hair", "hair conditioner",
            "sunscreen spf 50", "face sunscreen lotion", "nail polish remover", "pink nail polish"]
  data = fake_prepared(tmp_path / "ds", titles)
  enc = text.load_text_encoder("minilm")
  cfg = rqvae.RQVAEConfig(hidden_dims=(32,), latent_dim=8, num_levels=2, codebook_size=4,
                          steps=10, batch_size=8, log_every=10)
  with pytest.raises(FileNotFoundError, match="fits/text_embeddings.gin"):  # named, never built behind one's back
    semantic_ids.fit(data, "mini", config=cfg, unique_codes=8, log=None)
  text_embeddings.fit(data, "minilm", encoder=enc, log=None)
  metrics = semantic_ids.fit(data, "mini", config=cfg, unique_codes=8, log=None)
  sids = semantic_ids.load(data, "mini")
  emb, meta = text_embeddings.load(data, "minilm")
  assert emb.shape == (10, 384) and not emb[:2].any() and meta["encoder_fingerprint"] == enc.fingerprint
  np.testing.assert_allclose(np.linalg.norm(emb[2:], axis=1), 1.0, atol=1e-4)
  assert sids.codes.shape == (10, 3) and (sids.codes[:2] == -1).all()
  assert len(np.unique(sids.codes[2:], axis=0)) == len(titles) and metrics["unique_after_last_level"]
  assert sids.metadata["encoder_fingerprint"] == enc.fingerprint
  # Another fit reads the embeddings artifact instead of encoding again, and gives the same codes.
  monkeypatch.setattr(text_embeddings, "embed_by_length", lambda *a, **k: pytest.fail("re-encoded"))
  semantic_ids.fit(data, "again", config=cfg, unique_codes=8, log=None)
  np.testing.assert_array_equal(semantic_ids.load(data, "again").codes, sids.codes)


def test_cli_rejects_bad_options_in_one_sentence(tmp_path, capsys):
  from recjax import main
  data = fake_prepared(tmp_path / "ds", ["a", "b"])
  assert main.main(["fit", "--gin_file=fits/rqvae.gin", "--dataset", f"ds={data}",
                    "--gin.rqvae.RQVAEConfig.steps=0"]) == 2
  assert "RQVAEConfig.steps must be >= 1" in capsys.readouterr().err
