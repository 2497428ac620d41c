"""Retriever on a tiny random encoder: role embeddings, save/load, scoring, training, resume, CLI."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import replace

import pytest
import torch

from caredpo.records import Dataset, Sentence, Video
from caredpo.retrieval.loss import info_nce
from caredpo.retrieval.model import Retriever, RetrieverConfig
from caredpo.retrieval.score import Scorer, evaluate, reference_captions, similarity_matrix
from caredpo.retrieval.train import (
    RetrieverTrainConfig,
    draw_pairs,
    epoch_batches,
    preset,
    train_retriever,
    units_per_batch,
)

COLOURS = ["red", "blue", "green", "yellow", "white", "black"]
MOTIONS = ["left to right", "right to left", "upwards", "downwards"]
T, F = 4, 1280


def tiny_cfg(**kw) -> RetrieverConfig:
    return RetrieverConfig(text_encoder="tiny", num_frames=T, **kw)


class Feats:
    """FeatureStore stand-in: `.ids` and `.global_feats(ids) -> [B, T, 1280]`."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table, self.ids = table, list(table)

    def global_feats(self, ids):
        return torch.stack([self.table[i] for i in ids])


def synthetic(n_groups: int = 6, seed: int = 0) -> tuple[Dataset, Feats]:
    """Twin groups of 4: same colour (shared feature base), different motion (small feature offset)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(len(COLOURS), F, generator=g)
    motion = torch.randn(len(MOTIONS), F, generator=g)
    videos, sents, queries, table = [], [], {}, {}
    for gi in range(n_groups):
        colour = COLOURS[gi % len(COLOURS)]
        for mi, m in enumerate(MOTIONS):
            vid = f"v{gi}_{mi}"
            split = "test" if gi >= n_groups - 2 else "train"
            videos.append(Video(vid, f"{vid}.mp4", split, group=f"g{gi}"))
            texts = [
                f"a {colour} circle",
                f"a {colour} circle moves {m}",
                f"the {colour} ball goes {m}",
                f"a small {colour} circle slides {m} on grass",
            ]
            sents += [Sentence(vid, t) for t in texts]
            if split == "test":
                queries[vid] = [texts[3]]
            table[vid] = (base[COLOURS.index(colour)] + motion[mi]).expand(T, F) + 0.1 * torch.randn(T, F, generator=g)
    return Dataset("/nonexistent", videos, sents, queries, name="synthetic"), Feats(table)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Retriever(tiny_cfg())


# ---- role embeddings -----------------------------------------------------------------------------


def pair_with_and_without_roles():
    with_role = Retriever(tiny_cfg(role_embeddings=True)).eval()
    without = Retriever(tiny_cfg(role_embeddings=False), copy.deepcopy(with_role.encoder), with_role.tokenizer).eval()
    missing, unexpected = without.load_state_dict(with_role.state_dict(), strict=False)
    return with_role, without, missing, unexpected


def test_role_table_starts_at_zero_and_is_the_only_difference():
    with_role, without, missing, unexpected = pair_with_and_without_roles()
    assert missing == [] and unexpected == ["role.weight"]
    assert torch.count_nonzero(with_role.role.weight) == 0 and with_role.role.weight.requires_grad
    feats, caps, qs = torch.randn(3, T, F), ["a red circle", None, "a blue ball goes up"], ["a red circle moves"]
    with torch.no_grad():
        assert torch.allclose(with_role.encode_queries(qs), without.encode_queries(qs), atol=1e-6)
        assert torch.allclose(
            with_role.encode_candidates(feats, caps), without.encode_candidates(feats, caps), atol=1e-6
        )


def test_each_role_row_changes_only_its_own_span():
    model, _, _, _ = pair_with_and_without_roles()
    feats, caps, qs = torch.randn(2, T, F), ["a red circle", None], ["a red circle moves"]
    with torch.no_grad():
        q0, c0 = model.encode_queries(qs), model.encode_candidates(feats, caps)
        model.role.weight[2].normal_()  # query row only
        assert not torch.allclose(model.encode_queries(qs), q0, atol=1e-4)
        assert torch.allclose(model.encode_candidates(feats, caps), c0, atol=1e-6)
        model.role.weight[1].normal_()  # caption row: moves captioned candidates, not video-only ones
        c1 = model.encode_candidates(feats, caps)
        assert not torch.allclose(c1[0], c0[0], atol=1e-4) and torch.allclose(c1[1], c0[1], atol=1e-6)


def test_role_gradient_flows_and_variants_are_validated():
    model = Retriever(tiny_cfg())
    q, c, scale = model(["a red circle"] * 2, torch.randn(2, T, F), ["x", "y"])
    info_nce(q, c, scale).backward()
    assert model.role.weight.grad is not None and model.role.weight.grad.abs().sum() > 0
    assert tiny_cfg().with_variant("no_caption").variant == "no_caption"
    with pytest.raises(ValueError, match="role_embeddings"):
        tiny_cfg(use_caption=False, role_embeddings=True)
    with pytest.raises(ValueError, match="video_pooling"):
        tiny_cfg(video_pooling="max")


# ---- encoding, pooling, save/load ----------------------------------------------------------------


def test_mean_pooling_is_blind_to_frame_order_and_sequence_is_not():
    feats = torch.randn(2, T, F)
    rev = feats.flip(1)
    with torch.no_grad():
        mean = Retriever(tiny_cfg(use_caption=False, role_embeddings=False)).eval()
        assert torch.allclose(mean.encode_candidates(feats), mean.encode_candidates(rev), atol=1e-5)
        seq = Retriever(tiny_cfg(video_pooling="sequence", use_caption=False, role_embeddings=False)).eval()
        assert not torch.allclose(seq.encode_candidates(feats), seq.encode_candidates(rev), atol=1e-4)
        with pytest.raises(ValueError, match="frames"):
            seq.encode_candidates(torch.randn(1, T + 1, F))


def test_video_span_is_framed_by_cls_and_sep_at_word_scale():
    # A bare video token as the whole input left the MiniLM video arm at chance loss; the span is
    # framed like a BERT sentence and its video tokens enter at the RMS of a word embedding.
    for pooling, n in (("mean", 1), ("sequence", T)):
        model = Retriever(tiny_cfg(video_pooling=pooling, role_embeddings=False)).eval()
        words = model.encoder.embeddings.word_embeddings
        with torch.no_grad():
            span = model._video_span(torch.randn(2, T, F) * 5 + 3)
            assert span.shape == (2, n + 2, model.hidden_size)
            assert torch.equal(span[:, 0], words.weight[model.tokenizer.cls_token_id].expand(2, -1))
            assert torch.equal(span[:, -1], words.weight[model.tokenizer.sep_token_id].expand(2, -1))
            rms = model._project(torch.randn(2, T, F) * 5 + 3).pow(2).mean(-1).sqrt()
            assert torch.allclose(rms, words.weight.pow(2).mean().sqrt().expand_as(rms), rtol=1e-3)


def test_caption_joins_the_video_span_without_its_own_cls():
    model = Retriever(tiny_cfg()).eval()
    seen = []
    model.encoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    ids = model.tokenizer(["a red circle"])["input_ids"][0]  # [CLS] ... [SEP]
    with torch.no_grad():
        model.encode_candidates(torch.randn(1, T, F), ["a red circle"])
    assert seen == [1 + 1 + 1 + len(ids) - 1]  # [CLS] video [SEP] + caption tokens and [SEP]


def test_video_shortcut_starts_at_zero_and_gets_gradient():
    on = Retriever(tiny_cfg(video_shortcut=True)).eval()
    off = Retriever(tiny_cfg(video_shortcut=False), copy.deepcopy(on.encoder), on.tokenizer).eval()
    _, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert sorted(unexpected) == ["shortcut.bias", "shortcut.weight", "shortcut_norm.bias", "shortcut_norm.weight"]
    feats, caps = torch.randn(3, T, F), ["a red circle", None, "a ball"]
    with torch.no_grad():
        assert torch.allclose(on.encode_candidates(feats, caps), off.encode_candidates(feats, caps), atol=1e-6)
    q, c, scale = on.train()(["a red circle", "a ball", "a cube"], feats, caps)
    info_nce(q, c, scale).backward()
    assert on.shortcut.weight.grad.abs().sum() > 0 and on.video_proj.weight.grad.abs().sum() > 0


def test_save_and_load_round_trip(tmp_path, tiny):
    with torch.no_grad():
        tiny.role.weight.normal_()
        tiny.shortcut.weight.normal_()  # zero at init: perturb so the round trip checks it
        tiny.video_scale.fill_(0.5)  # a buffer: must come back from the file, not the random encoder
    tiny.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["text_encoder"] == "tiny" and cfg["role_embeddings"] is True
    back = Retriever.from_pretrained(tmp_path / "m")
    assert back.config == tiny.config
    feats = torch.randn(3, T, F)
    a = similarity_matrix(tiny, ["a red circle", "a ball"], feats, ["x", None, "a green one"])
    b = similarity_matrix(back, ["a red circle", "a ball"], feats, ["x", None, "a green one"])
    assert torch.allclose(a, b, atol=1e-6)


def test_similarity_matrix_shape_batching_and_missing_captions(tiny):
    feats = torch.randn(5, T, F)
    caps = ["a red circle", None, "a much longer caption about a blue ball rolling", None, "x"]
    qs = ["q one", "a second query text", "three"]
    full = similarity_matrix(tiny, qs, feats, caps, batch_size=64)
    assert full.shape == (3, 5) and full.abs().max() <= 1 + 1e-5
    assert torch.allclose(full, similarity_matrix(tiny, qs, feats, caps, batch_size=2), atol=1e-5)
    video_only = similarity_matrix(tiny, qs, feats[[1, 3]], None)
    assert torch.allclose(full[:, [1, 3]], video_only, atol=1e-5)
    scorer = Scorer(tiny)
    scorer.similarity(qs, feats, caps)
    assert set(scorer._query_cache) == set(qs)


def test_info_nce_matches_manual_and_is_symmetric():
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    logits = 10 * q @ c.T
    manual = -0.5 * (logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean())
    assert torch.allclose(info_nce(q, c, 10.0), manual, atol=1e-6)
    assert torch.allclose(info_nce(q, c, 10.0), info_nce(c, q, 10.0), atol=1e-6)


# ---- data draws ----------------------------------------------------------------------------------


def test_caption_draws_never_leak_the_query():
    ds, _ = synthetic()
    train = [v.id for v in ds.split("train")]
    rng = random.Random(0)
    pool = {train[0]: ["a generated caption", ds.sentences_of(train[0])[0]]}
    for _ in range(50):
        qs, caps = draw_pairs(ds, train, pool, RetrieverTrainConfig(), rng)
        assert all(c is not None and c != q for q, c in zip(qs, caps))
    ref = reference_captions(ds, "test", seed=3)
    assert set(ref) == {v.id for v in ds.split("test")}
    assert all(ref[v] not in ds.queries[v] and ref[v] in ds.sentences_of(v) for v in ref)
    groups = ds.units(train)
    assert all(len(g) == 4 and len({ds.by_id[v].group for v in g}) == 1 for g in groups)


# ---- training ------------------------------------------------------------------------------------


def smoke_cfg(**kw):
    model = RetrieverConfig(text_encoder="tiny", num_frames=T, train_layers=1)
    return replace(preset("smoke"), model=model, **kw)


def test_training_lowers_loss_and_keeps_frozen_parts(tmp_path):
    ds, feats = synthetic()
    cfg = smoke_cfg(epochs=20)
    torch.manual_seed(0)
    init = Retriever(cfg.model)
    frozen = {n: p.detach().clone() for n, p in init.named_parameters() if not p.requires_grad}
    assert frozen and any("layer.0" in n for n in frozen) and not any("layer.1." in n for n in frozen)
    model, metrics = train_retriever(cfg, ds, feats, tmp_path / "run", progress=False)
    losses = [
        r["loss"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(model.video_proj.weight, init.video_proj.weight)
    assert set(metrics) >= {"t2v", "v2t", "twin_acc", "step"} and metrics["step"] == 40
    assert metrics["captioned"] == 8 and metrics["caption_equals_query"] == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_resume_continues_exactly(tmp_path):
    """A run stopped at step 3 and resumed to 6 equals a straight 6-step run."""
    ds, feats = synthetic()
    cfg = smoke_cfg(save_every=3)
    train_retriever(replace(cfg, max_steps=3), ds, feats, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text()) == {"step": 3}
    resumed, _ = train_retriever(replace(cfg, max_steps=6), ds, feats, tmp_path / "run", resume=True, progress=False)
    straight, _ = train_retriever(replace(cfg, max_steps=6), ds, feats, tmp_path / "straight", progress=False)
    rows = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if "loss" in r] == list(range(1, 7))
    for (n, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), n
    with pytest.raises(Exception, match=r"other settings \(model\."):
        other = replace(cfg, max_steps=7, model=replace(cfg.model, video_pooling="sequence"))
        train_retriever(other, ds, feats, tmp_path / "run", resume=True, progress=False)


def test_evaluate_with_reference_captions_and_custom_queries(tmp_path):
    ds, feats = synthetic()
    model, _ = train_retriever(smoke_cfg(epochs=4), ds, feats, tmp_path / "r", progress=False)
    with_caps = evaluate(model, ds, feats, reference_captions(ds, "test"))
    assert with_caps["n_queries"] == 8 and with_caps["n_videos"] == 8
    assert 0 <= with_caps["t2v"]["R1"] <= 100 and with_caps["t2v"]["MnR"] >= 1
    custom = evaluate(model, ds, feats, None, queries={"v4_0": ["a red circle moves left to right", "x"]})
    assert custom["n_queries"] == 2 and custom["captioned"] == 0


# ---- CLI -----------------------------------------------------------------------------------------


def test_cli_train_and_eval(tmp_path, monkeypatch, capsys):
    import typer
    from typer.testing import CliRunner

    from caredpo.cli import retriever as cli

    ds, feats = synthetic()
    monkeypatch.setattr(cli, "load_data", lambda data, features, seed=0: (ds, feats))
    app = typer.Typer()
    app.add_typer(cli.app, name="retriever")
    cli.register(app)
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "retriever",
            "train",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
            "--preset",
            "smoke",
            "--max-steps",
            "3",
            "--variant",
            "caption",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["role_embeddings"] is False
    (tmp_path / "q.json").write_text(json.dumps({"v5_1": ["a red circle moves right to left"]}))
    caps = tmp_path / "caps.jsonl"
    caps.write_text(
        "".join(json.dumps({"video_id": v.id, "captions": ["gen one", "gen two"]}) + "\n" for v in ds.split("test"))
    )
    for extra in (["--captions", "reference"], ["--captions", str(caps), "--queries", str(tmp_path / "q.json")]):
        res = runner.invoke(
            app,
            [
                "eval",
                "--model",
                str(tmp_path / "run" / "model"),
                "--data",
                str(tmp_path),
                "--out",
                str(tmp_path / "m.json"),
                *extra,
            ],
        )
        assert res.exit_code == 0, res.output
        assert "t2v R1" in res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_queries"] == 1 and m["captioned"] == 8 and m["queries"].endswith("q.json")


@pytest.mark.slow
def test_smoke_twinclips_end_to_end(tmp_path):
    """Real pipeline on the TwinClips smoke preset: generate, features, train (smoke), evaluate."""
    from caredpo.data import load_dataset
    from caredpo.data.twinclips import TwinClipsConfig, generate_twinclips
    from caredpo.features import FeatureConfig, FeatureStore, extract_features

    data = generate_twinclips(TwinClipsConfig.preset("smoke"), tmp_path / "tc", progress=False)
    ds = load_dataset(data)
    store = FeatureStore.load(extract_features(ds, tmp_path / "tc" / "features", FeatureConfig(), progress=False))
    cfg = replace(preset("smoke"), model=replace(preset("smoke").model, num_frames=store.num_frames), epochs=4)
    model, metrics = train_retriever(cfg, ds, store, tmp_path / "run", progress=False)
    losses = [
        r["loss"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert len(losses) == 12 and all(x == x for x in losses)  # 6 groups / 2 per batch x 4 epochs, no NaN
    assert metrics["n_videos"] == len(ds.split("test")) and metrics["caption_equals_query"] == 0


def test_reference_captions_prefer_specific_sentences_and_never_the_query():
    from caredpo.records import Dataset, Sentence, Video
    from caredpo.retrieval.score import reference_captions

    videos = [Video("a", "a.mp4", "test"), Video("b", "b.mp4", "test"), Video("c", "c.mp4", "test")]
    sents = [
        Sentence("a", "a red circle", "generic"),
        Sentence("a", "a red circle slides left", "specific"),
        Sentence("a", "a red circle slides left and turns blue", "specific"),
        Sentence("b", "a blue square", "generic"),
        Sentence("b", "a blue square falls", "specific"),
        Sentence("c", "a green star", "generic"),
    ]
    ds = Dataset(
        "/x", videos, sents, queries={"a": ["a red circle slides left"], "b": ["a blue square"], "c": ["a green star"]}
    )
    for seed in range(5):
        caps = reference_captions(ds, "test", seed=seed)
        assert caps["a"] == "a red circle slides left and turns blue"  # the only specific non-query
        assert caps["b"] == "a blue square falls"
        assert caps["c"] is None  # its only sentence is its query: no caption rather than a leak


def with_specificity(ds: Dataset) -> Dataset:
    """The synthetic set with its last sentence of each video marked specific, the rest generic."""
    last = {s.video_id: s.text for s in ds.sentences}
    sents = [
        Sentence(s.video_id, s.text, "specific" if last[s.video_id] == s.text else "generic") for s in ds.sentences
    ]
    extra = [Sentence(v.id, f"a second specific sentence of {v.id}", "specific") for v in ds.videos]
    return Dataset(ds.root, ds.videos, sents + extra, ds.queries, name=ds.name)


def test_fine_recipe_draws_discriminative_queries_and_mixes_generated_captions():
    ds = with_specificity(synthetic()[0])
    train = [v.id for v in ds.split("train")]
    pool = {v: [f"generated for {v}"] for v in train}
    batches = epoch_batches(ds.units(train), units_per_batch(ds, train, 2), seed=0, epoch=0)
    assert all(len({ds.by_id[v].group for v in b}) == 2 and len(b) == 8 for b in batches)  # twins together
    cfg = RetrieverTrainConfig(query_sentences="specific", caption_sentences="specific", generated_caption_prob=0.25)
    rng, n_generated, n = random.Random(0), 0, 0
    for batch in batches * 20:
        qs, caps = draw_pairs(ds, batch, pool, cfg, rng)
        for v, q, c in zip(batch, qs, caps):
            specific = ds.specific_sentences_of(v)
            assert q in specific and len(specific) == 2 and c != q
            assert c == pool[v][0] or c in specific
            n_generated, n = n_generated + (c == pool[v][0]), n + 1
    assert 0.2 < n_generated / n < 0.3
    only_refs = replace(cfg, generated_caption_prob=0.0)
    assert all(
        c in ds.specific_sentences_of(v) for b in batches for v, c in zip(b, draw_pairs(ds, b, pool, only_refs, rng)[1])
    )
    # no specificity marks (real data sets): every sentence can be a query
    plain = synthetic()[0]
    assert plain.specific_sentences_of(train[0]) == plain.sentences_of(train[0])
    with pytest.raises(ValueError, match="query_sentences"):
        RetrieverTrainConfig(query_sentences="medium")
