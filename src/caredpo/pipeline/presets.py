"""What `caredpo run --preset NAME` runs: one frozen config per stage, chosen from a dict.

`smoke` is for tests (tiny random LM and text encoder, a few dozen 64 px clips, under a minute);
`default` uses the pretrained parts (EfficientNet-Lite0, MiniLM, SmolLM2-135M) on TwinClips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from ..captioner.generate import SamplingConfig
from ..captioner.model import CaptionerConfig
from ..captioner.sft import SFTConfig
from ..data.twinclips import TwinClipsConfig
from ..dpo.config import DPOConfig
from ..dpo.prefs import PrefsConfig
from ..features import FeatureConfig
from ..rerank.model import RerankerConfig
from ..rerank.train import RerankerTrainConfig
from ..retrieval.train import RetrieverTrainConfig
from ..retrieval.train import preset as retriever_preset

# Caption arms of the results table, in the order the paper compares them.
CAPTION_ARMS = ("no_caption", "sft", "dpo", "dg_dpo", "reference")
# Retriever variants: name -> (RetrieverConfig.variant, video_pooling).
# Results-table names: role = caption with role embeddings, no_role = caption without them.
RETRIEVERS = {
    "no_caption": ("no_caption", "mean"),
    "role": ("caption_role", "mean"),
    "no_role": ("caption", "mean"),
    "no_caption_seq": ("no_caption", "sequence"),
    "role_seq": ("caption_role", "sequence"),
}

# Rerankers (rerank/): name -> (RerankerConfig.variant, the first-stage retriever it re-orders).
# Caption arms are reranked by rerank_role and rerank_no_role, the no-caption arm by rerank_no_caption.
RERANKERS = {
    "rerank_role": ("caption_role", "role"),
    "rerank_no_role": ("caption", "role"),
    "rerank_no_caption": ("no_caption", "no_caption"),
}


@dataclass(frozen=True)
class RunConfig:
    preset: str  # name in PRESETS
    seed: int  # one seed for every stage (each stage offsets it as it needs)
    data: TwinClipsConfig  # the embedded data set
    features: FeatureConfig  # frozen frame encoder: frames, resolution
    captioner: CaptionerConfig  # the video LM (base LM, LoRA, projector)
    sft: SFTConfig  # captioner supervised fine-tuning
    train_captions: SamplingConfig  # greedy captions of training videos (twins carry them; retriever pool)
    test_captions: SamplingConfig  # greedy captions of test videos, one file per caption arm
    retriever: RetrieverTrainConfig  # retriever training (the variant is set per RETRIEVERS entry)
    prefs: PrefsConfig  # preference groups: K samples per video, reward
    dg_dpo: DPOConfig  # the DG-DPO arm
    dpo: DPOConfig  # the plain-DPO baseline arm
    reranker: RerankerTrainConfig | None = None  # the MLLM rerankers (RERANKERS); None: a run without them

    def __post_init__(self) -> None:
        if self.dpo.mode != "dpo" or self.dg_dpo.mode != "dg-dpo":
            raise ValueError("RunConfig: dpo must be mode 'dpo' and dg_dpo mode 'dg-dpo'")
        if self.features.num_frames < self.captioner.num_frames:
            raise ValueError(
                f"RunConfig: the captioner wants {self.captioner.num_frames} frames, "
                f"features have {self.features.num_frames}"
            )
        if self.captioner.colour_bins != self.features.colour_bins:
            raise ValueError(
                f"RunConfig: the captioner wants {self.captioner.colour_bins} colour bins, features "
                f"have {self.features.colour_bins} ({self.features.colour_levels} levels a channel)"
            )

    def retriever_config(self, name: str) -> RetrieverTrainConfig:
        """The retriever of a RETRIEVERS entry, as `caredpo run` trains it."""
        return self.retriever_variant(*RETRIEVERS[name])

    def retriever_variant(self, variant: str, pooling: str | None = None) -> RetrieverTrainConfig:
        """The preset's retriever as a model variant (VARIANTS in retrieval/model.py) with a video
        pooling (default: the preset's), sized to the features' frames, with the run's seed."""
        model = replace(
            self.retriever.model.with_variant(variant),
            num_frames=self.features.num_frames,
            video_pooling=pooling or self.retriever.model.video_pooling,
        )
        return replace(self.retriever, model=model, seed=self.seed)

    def reranker_config(self, name: str) -> RerankerTrainConfig:
        """The reranker of a RERANKERS entry, as `caredpo run` trains it."""
        if self.reranker is None:
            raise ValueError(f"preset {self.preset!r} has no reranker")
        model = replace(self.reranker.model, variant=RERANKERS[name][0])
        return replace(self.reranker, model=model, seed=self.seed)

    def to_dict(self) -> dict:
        return asdict(self)


def _smoke(seed: int) -> RunConfig:
    return RunConfig(
        preset="smoke",
        seed=seed,
        data=TwinClipsConfig.preset("smoke", seed=seed),
        features=FeatureConfig(num_frames=4, size=64, batch_size=32),
        captioner=CaptionerConfig(
            lm="tiny", num_frames=4, colour_bins=64, projector_hidden=64, lora_layers=-1, lora_rank=4, seed=seed
        ),
        sft=SFTConfig(
            steps=30,
            videos_per_step=6,
            captions_per_video=2,
            warmup_steps=2,
            val_every=0,
            save_every=0,
            lr_lora=3e-3,
            lr_projector=3e-3,
            align_steps=20,
            align_batch_videos=16,
            seed=seed,
        ),
        train_captions=SamplingConfig(n=1, temperature=0.0, max_new_tokens=12, seed=seed),
        test_captions=SamplingConfig(n=1, temperature=0.0, max_new_tokens=12, seed=seed),
        retriever=retriever_preset("smoke", epochs=4),
        prefs=PrefsConfig(num_samples=3, max_new_tokens=12, seed=seed),
        dg_dpo=DPOConfig.for_mode("dg-dpo", lr=1e-3, epochs=1, save_every=1000, seed=seed),
        dpo=DPOConfig.for_mode("dpo", lr=1e-3, epochs=1, save_every=1000, seed=seed),
        reranker=RerankerTrainConfig(steps=6, units_per_step=2, candidates=6, lr=3e-3, head_lr=3e-2, k=8, seed=seed),
    )


def _default(seed: int) -> RunConfig:
    # The choices and the measurements behind them are in docs/results.md. In short: TwinClips with
    # 500 training twin groups (2000 clips: with 800 the captioner overfitted them and read direction
    # far worse on test clips; more clips cost features and train captions, not SFT steps). SFT: 300
    # steps of 8 videos x 2 sentences (at 150 the val loss was still falling and the captioner read
    # direction far worse) after 1000 steps of projector alignment (colour histograms beside the CNN
    # channels), LoRA on all 30 layers; the targets are the *specific* sentences, so captions state
    # a direction and events for the reward to judge; 4 clip tokens that read the whole trajectory
    # (captioner/model.py Projector). The retriever takes the fine-grained recipe
    # (retrieval/train.py PRESETS["default"], 200 steps). The preference stage and
    # both DPO arms use the first 80 training twin groups (320 clips: better than 160 on every seed,
    # as good as 480), one epoch (two made captions worse), with an NLL anchor on the best caption
    # (lambda_nll 0.5: without it the tuned captions drift). Captions may run to 40 tokens: specific
    # sentences do (p90 34). bf16 where the CPU has it (precision.py).
    return RunConfig(
        preset="default",
        seed=seed,
        data=TwinClipsConfig.preset("default", seed=seed),
        features=FeatureConfig(num_frames=8, size=128),
        captioner=CaptionerConfig(
            lm="smollm2", num_frames=8, colour_bins=64, clip_tokens=4, lora_layers=-1, precision="auto", seed=seed
        ),
        sft=SFTConfig(
            steps=300,
            videos_per_step=8,
            captions_per_video=2,
            lr_projector=2e-3,
            lr_lora=1e-3,
            align_steps=1000,
            val_every=50,
            val_videos=16,
            save_every=50,
            sentences="specific",
            seed=seed,
        ),
        train_captions=SamplingConfig(n=1, temperature=0.0, max_new_tokens=40, batch_videos=40, seed=seed),
        test_captions=SamplingConfig(n=1, temperature=0.0, max_new_tokens=40, batch_videos=40, seed=seed),
        retriever=retriever_preset("default"),
        prefs=PrefsConfig(num_samples=4, max_new_tokens=40, max_videos=320, seed=seed),
        dg_dpo=DPOConfig.for_mode("dg-dpo", lr=1e-4, epochs=1, lambda_nll=0.5, seed=seed),
        dpo=DPOConfig.for_mode("dpo", lr=1e-4, epochs=1, lambda_nll=0.5, seed=seed),
    )


def _full(seed: int) -> RunConfig:
    # default + the MLLM rerankers (SmolLM2 from the SFT captioner, LoRA, roles): kept out of
    # default for their cost (docs/results.md, "Reranker").
    reranker = RerankerTrainConfig(
        model=RerankerConfig(precision="auto"), steps=100, units_per_step=2, candidates=8, k=16, seed=seed
    )
    return replace(_default(seed), preset="full", reranker=reranker)


PRESETS: dict[str, Callable[[int], RunConfig]] = {"smoke": _smoke, "default": _default, "full": _full}


def run_config(preset: str, seed: int = 0) -> RunConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset](seed)
