"""The preference stage: K sampled captions per training video, rewarded by the retriever.

For a video v with hard negatives N(v) (its twins; on real data its nearest videos by the
retriever's video embedding) and reference sentences Q(v):

    contrastive (default):  r(c | v) = mean_q log softmax_u S(q, u, c_u) at u = v,
                            u in {v} + N(v); v carries c, each twin its own greedy caption
    relevance:              r(c | v) = mean_q S(q, v, c)

S is the reward model's logit (`PrefsConfig.reward_model`): the retriever's scaled cosine (logit
scale x cosine, `RetrieverReward`) or the MLLM reranker's score (`rerank.evaluate.RerankerReward`).
A reward model has `logits(queries, video_ids, captions) -> [Q, C]` and `embed(video_ids)` (video
embeddings for the hard negatives of data without twin groups). Each output row also stores the
reference log-probs the DG-DPO loss needs (every sampled caption under v, the best caption under
each twin), so training holds no reference model. Rows are appended one twin group at a time
and a rerun skips the videos already written (see `caredpo.dpo.train` for the row format).
Under torchrun the twin groups are dealt round-robin to the processes (each samples with its
group's own seed, so the rows equal one process's); each appends to groups.jsonl.part<rank> and
rank 0 merges them into groups.jsonl in group order (`caredpo.io.merge_parts`).
Why the reward has this form: docs/design.md, "The preference stage".
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import dist
from ..io import append_jsonl, merge_parts, part_path, part_paths, read_jsonl, write_json
from ..records import SENTENCE_POOLS, DataError, Dataset, check_pool

GROUPS_FILE = "groups.jsonl"
META_FILE = "prefs.json"


def _contrastive(sim: torch.Tensor, k: int) -> torch.Tensor:
    """sim [Q, K + M] (K captions of v, then M twins) -> [K]: mean_q log softmax at v."""
    own, twins = sim[:, :k], sim[:, k:]  # [Q, K], [Q, M]
    rows = torch.cat([own[:, :, None], twins[:, None, :].expand(-1, k, -1)], dim=2)  # [Q, K, 1+M]
    return rows.log_softmax(-1)[:, :, 0].mean(0)


def _relevance(sim: torch.Tensor, k: int) -> torch.Tensor:
    return sim[:, :k].mean(0)


REWARDS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "contrastive": _contrastive,
    "relevance": _relevance,
}
REWARD_MODELS = ("retriever", "reranker")  # the bi-encoder, or the MLLM reranker (rerank/)


class RetrieverReward:
    """The bi-encoder as the reward model: S(q, u, c) = logit scale x cosine of a retrieval `Scorer`."""

    def __init__(self, scorer, store):
        self.scorer, self.store = scorer, store

    def logits(self, queries: list[str], video_ids: list[str], captions: list[str | None]) -> torch.Tensor:
        sim = self.scorer.similarity(queries, self.store.global_feats(video_ids), captions)
        return sim * self.scorer.model.logit_scale().item()

    def embed(self, video_ids: list[str]) -> torch.Tensor:
        return self.scorer.candidates(self.store.global_feats(video_ids))


@dataclass(frozen=True)
class PrefsConfig:
    num_samples: int = 4  # K captions sampled per training video
    temperature: float = 1.0  # sampling temperature of the SFT captioner
    top_p: float = 0.95  # nucleus mass kept when sampling
    max_new_tokens: int = 32  # longest sampled caption, in tokens
    reward: str = "contrastive"  # key of REWARDS
    reward_model: str = "retriever"  # REWARD_MODELS: whose S the reward uses (the reranker: presets that train one)
    # the q of the reward: "specific" sentences (those that tell twins apart; every sentence on
    # data sets that do not mark specificity) or "all" (records.SENTENCE_POOLS)
    reward_queries: str = "specific"
    num_neighbours: int = 3  # hard negatives per video where the data set has no twin groups
    max_videos: int = 0  # use only the first training videos, whole twin groups, at most N (0: all)
    # twin groups sampled in one generate call: larger decode batches; each group keeps its own
    # seeded uniforms, so the samples change only where the batch's arithmetic does (bf16 GEMMs
    # round a little differently at another batch size). 1 on captioners without `seeds_per_video`
    units_per_call: int = 4
    seed: int = 0  # group g samples with seed * 1_000_003 + crc32(g): stable under resume

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"PrefsConfig.num_samples must be >= 2 to form pairs, got {self.num_samples}")
        if self.reward not in REWARDS:
            raise ValueError(f"PrefsConfig.reward must be one of {sorted(REWARDS)}, got {self.reward!r}")
        if self.reward_model not in REWARD_MODELS:
            raise ValueError(f"PrefsConfig.reward_model must be one of {REWARD_MODELS}, got {self.reward_model!r}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("PrefsConfig: need temperature > 0 and 0 < top_p <= 1 (sampling, not greedy)")
        check_pool(self.reward_queries, "PrefsConfig.reward_queries")
        if self.max_new_tokens < 1 or self.num_neighbours < 1 or self.units_per_call < 1 or self.max_videos < 0:
            raise ValueError("PrefsConfig: max_new_tokens, num_neighbours, units_per_call >= 1 and max_videos >= 0")


def hard_negatives(
    dataset: Dataset, video_ids: Sequence[str], embed: Callable[[list[str]], torch.Tensor], k: int, search=None
) -> dict[str, list[str]]:
    """Twins where the data set has groups; else the k nearest videos by embedding (cosine):
    torch up to `search.exact_max` videos, FAISS above (a `retrieval.search.SearchConfig`)."""
    from ..retrieval.search import SearchConfig, neighbours

    if dataset.has_twin_groups(video_ids):
        return {v: dataset.twins_of(v) for v in video_ids}
    ids = list(video_ids)
    emb = torch.nn.functional.normalize(embed(ids), dim=-1)
    top = neighbours(emb, k, search or SearchConfig())
    return {v: [ids[j] for j in top[i].tolist()] for i, v in enumerate(ids)}


def build_preferences(
    captioner,
    reward,
    dataset: Dataset,
    store,
    out_dir: str | Path,
    greedy: Mapping[str, str],
    config: PrefsConfig = PrefsConfig(),
    show_progress: bool = True,
    visual: Callable[[Sequence[str]], torch.Tensor] | None = None,
) -> Path:
    """Write `out_dir/groups.jsonl` (+ `prefs.json` summary); resumes after the last whole unit.

    captioner: a `Captioner` (the frozen SFT model = pi_ref). reward: a reward model
    (`RetrieverReward`, `rerank.evaluate.RerankerReward`).
    store: a FeatureStore. greedy: video id -> the current greedy caption (the twins carry it).
    visual: ids -> the captioner's visual input (default `store.grid_feats`; an HF video MLLM
    takes frames, `HFVideoCaptioner.frames(dataset)`).
    """
    from ..progress import progress_bar

    out = Path(out_dir)
    path = out / GROUPS_FILE
    vids = preference_videos(dataset, config)
    negatives = hard_negatives(dataset, vids, reward.embed, config.num_neighbours)
    missing = sorted({u for v in vids for u in negatives[v]} - set(greedy))
    if missing:
        raise DataError(f"no greedy caption for hard-negative videos {missing[:3]} (run captions for train first)")
    parts = part_paths(path)
    sharded = dist.world_size() > 1 or bool(parts)  # shards left by a killed sharded run count too
    done = {row["video_id"] for p in [path, *parts] for row in read_jsonl(p)}
    all_units = dataset.units(vids)  # whole twin groups: one batch, both directions
    mine = all_units[dist.rank() :: dist.world_size()]
    is_done = lambda unit: set(unit) <= done  # noqa: E731
    target = part_path(path, dist.rank()) if sharded else path
    visual = visual or store.grid_feats
    # Fixed chunks of this process's units: a resumed chunk is sampled whole again, so its decode
    # batch (and every sample in it) is the one an uninterrupted run had; only its missing units
    # are scored and written.
    per_call = config.units_per_call if getattr(captioner, "seeds_per_video", False) else 1
    chunks = [mine[i : i + per_call] for i in range(0, len(mine), per_call)]
    with progress_bar(show=show_progress) as bar:
        total = sum(map(len, mine))
        left = sum(len(u) for u in mine if not is_done(u))
        task = bar.add_task("preferences", total=total, completed=total - left, unit="videos")
        for chunk in (c for c in chunks if not all(map(is_done, c))):
            for unit, samples in zip(chunk, _sample_units(captioner, dataset, chunk, config, visual)):
                if is_done(unit):
                    continue
                rows = _score_unit(captioner, reward, dataset, unit, samples, negatives, greedy, config, visual)
                append_jsonl(target, [r for r in rows if r["video_id"] not in done])
                bar.advance(task, len(unit))
    if sharded:
        dist.barrier()
        if dist.is_main():
            merge_parts(path, [v for u in all_units for v in u])
    if dist.is_main():
        write_json(out / META_FILE, {"config": asdict(config), **summarize(list(read_jsonl(path)), dataset)})
    dist.barrier()  # every process returns with the merged file in place
    return path


def preference_videos(dataset: Dataset, config: PrefsConfig) -> list[str]:
    """Training videos of the stage: all, or the first whole twin groups up to max_videos."""
    vids = [v.id for v in dataset.split("train")]
    if not vids:
        raise DataError(f"{dataset.root}: no training videos for the preference stage")
    if not config.max_videos or len(vids) <= config.max_videos:
        return vids
    keep: list[str] = []
    for unit in dataset.units(vids):
        if len(keep) + len(unit) > config.max_videos:
            break
        keep += unit
    return keep or vids[: config.max_videos]


def unit_seed(dataset: Dataset, unit: Sequence[str], config: PrefsConfig) -> int:
    """The sampling seed of a twin group (unit): stable under resume, sharding and batching."""
    return config.seed * 1_000_003 + zlib.crc32(dataset.group_key(unit[0]).encode())


@torch.no_grad()
def _sample_units(captioner, dataset, units, config: PrefsConfig, visual) -> list[list[list[str]]]:
    """K samples per video of each unit (unit -> video -> K captions), in one generate call: each
    unit's rows use the uniforms its own seed gives it alone (`stream_uniforms`), so batching
    changes a sample only through the logits' rounding. One unit: the plain seeded call every
    `Captioner` takes."""
    from ..captioner.sampling import stream_uniforms

    kw = dict(
        n=config.num_samples, temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens
    )
    if len(units) == 1:
        return [captioner.generate(visual(units[0]), seed=unit_seed(dataset, units[0], config), **kw)]
    K, steps = config.num_samples, config.max_new_tokens
    table = torch.cat([stream_uniforms(unit_seed(dataset, u, config), len(u) * K, steps) for u in units])
    samples = iter(captioner.generate(visual([v for u in units for v in u]), uniforms=table, **kw))
    return [[next(samples) for _ in u] for u in units]


@torch.no_grad()
def _score_unit(captioner, reward, dataset, unit, samples, negatives, greedy, config, visual) -> list[dict]:
    """The rows of one twin group from its samples [video][K]: rewards, reference log-probs."""
    rewards = [_rewards(reward, dataset, v, samples[i], negatives[v], greedy, config) for i, v in enumerate(unit)]
    best = [int(torch.argmax(r)) for r in rewards]
    # One log-prob pass for the unit: each sample under its own video, then each video's best
    # caption under each of its twins. Rows share a prefix pass per distinct video.
    vids = [v for i, v in enumerate(unit) for _ in samples[i]] + [u for v in unit for u in negatives[v]]
    caps = [c for s in samples for c in s] + [samples[i][best[i]] for i, v in enumerate(unit) for _ in negatives[v]]
    logps = iter(captioner.logprob(visual(vids), caps).tolist())  # in the order of `caps`
    ref = [[next(logps) for _ in s] for s in samples]
    ref_cross = [[next(logps) for _ in negatives[v]] for v in unit]
    return [
        {
            "video_id": v,
            "group": dataset.by_id[v].group,
            "captions": samples[i],
            "rewards": rewards[i].tolist(),
            "ref_logps": ref[i],
            "best": best[i],
            "negatives": negatives[v],
            "ref_cross_logps": ref_cross[i],
            "lengths": _lengths(captioner, samples[i]),
        }
        for i, v in enumerate(unit)
    ]


def _lengths(captioner, caps: list[str]) -> list[int]:
    """Caption token counts (EOS included) for the per-token NLL term of the loss."""
    return captioner.encode_captions(caps)[1].sum(1).tolist()


def _rewards(reward, dataset, v, caps, negs, greedy, config) -> torch.Tensor:
    """[K] rewards of v's sampled captions against its twins carrying their greedy captions.
    The twins' logits do not depend on c, so under each query r is monotone in S(q, v, c): the
    twins set where a query's term saturates, not the order of the captions under it. The reward
    sees only what S reads."""
    queries = SENTENCE_POOLS[config.reward_queries](dataset, v)
    logits = reward.logits(queries, [v] * len(caps) + list(negs), list(caps) + [greedy[u] for u in negs])
    return REWARDS[config.reward](logits, len(caps))


def summarize(rows: Sequence[dict], dataset: Dataset | None = None) -> dict:
    """Numbers that tell whether the rewards can teach anything: spread, ties, diversity and, where
    the data set has clip factors, whether the reward prefers the samples that state them right."""
    from ..captioner.factors import FACTORS

    if not rows:
        return {"videos": 0}
    r = torch.tensor([row["rewards"] for row in rows if len(row["rewards"]) == len(rows[0]["rewards"])])
    spread = r.max(1).values - r.min(1).values
    distinct = [len(set(row["captions"])) / len(row["captions"]) for row in rows]
    out = {
        "videos": len(rows),
        "reward_mean": r.mean().item(),
        "reward_std": r.std().item(),
        "within_video_spread_median": spread.median().item(),
        "share_all_tied": (spread == 0).float().mean().item(),
        "distinct_caption_share": sum(distinct) / len(distinct),
    }
    # every factor, not only those that tell twins apart: a reward blind to one (size, which
    # twins share) lets DPO drift on it
    for factor in FACTORS if dataset is not None else ():
        out.update(factor_diagnostics(rows, dataset, factor))
    return out


def factor_diagnostics(rows: Sequence[dict], dataset: Dataset, factor: str) -> dict:
    """For one clip factor (`caredpo.captioner.factors`), over videos that have it:

    {factor}_any_right       share of videos with at least one sample stating it right
    {factor}_best_right      share of those whose top-reward sample states it right
    {factor}_pair_acc        over (right, wrong) sample pairs of a video: share the reward ranks
                             right above wrong (ties count half; 0.5 is a reward blind to it)
    """
    from ..captioner.factors import factor_correct

    any_right = best_right = judged = 0
    wins = pairs = 0.0
    for row in rows:
        verdicts = [factor_correct(c, dataset.by_id[row["video_id"]].factors, factor) for c in row["captions"]]
        if None in verdicts:
            continue
        judged += 1
        if not any(verdicts):
            continue
        any_right += 1
        best_right += verdicts[row["best"]]
        rw = row["rewards"]
        for i, ok in enumerate(verdicts):
            for j, bad in enumerate(verdicts):
                if ok and not bad:
                    pairs += 1
                    wins += 1.0 if rw[i] > rw[j] else 0.5 if rw[i] == rw[j] else 0.0
    if not judged:
        return {}
    return {
        f"{factor}_any_right": any_right / judged,
        f"{factor}_best_right": best_right / any_right if any_right else float("nan"),
        f"{factor}_pair_acc": wins / pairs if pairs else float("nan"),
    }
