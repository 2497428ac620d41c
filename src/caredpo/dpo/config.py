"""DG-DPO training settings (`DPOConfig`), apart from the trainer so the batch code and the CLI read
them without importing the training loop."""

from __future__ import annotations

from dataclasses import dataclass

from .loss import PAIR_MODES

# mode -> the fields it fixes. "dpo" is the plain-DPO baseline arm: best-vs-worst pair, no video group.
MODES = {"dg-dpo": {}, "dpo": {"lambda_video": 0.0, "pairs": "best_worst"}}
# fields that change the maths: a resumed run must keep them (the checkpoint's resume guard)
RESUME_FIXED = (
    "mode",
    "beta",
    "lambda_video",
    "lambda_nll",
    "margin",
    "pairs",
    "lr",
    "weight_decay",
    "warmup_steps",
    "groups_per_batch",
    "grad_clip",
    "seed",
    "dropout",
)


@dataclass(frozen=True)
class DPOConfig:
    """DG-DPO training settings (our reconstruction of the loss; see caredpo.dpo.loss)."""

    mode: str = "dg-dpo"  # "dg-dpo" | "dpo" (plain DPO: lambda_video 0, best-vs-worst); see for_mode()
    beta: float = 0.1  # inverse temperature of the sigmoid on log-ratio differences (> 0)
    lambda_video: float = 1.0  # weight of the video group (best caption: own video vs twins); >= 0
    lambda_nll: float = 0.0  # weight of the per-token NLL of the best caption (anchors fluency); >= 0
    margin: float = 0.0  # a pair (w, l) enters the caption group only if r_w - r_l > margin; >= 0
    pairs: str = "all"  # "all" pairs within a video's K captions, or "best_worst" only
    lr: float = 5e-5  # AdamW learning rate of the trainable parameters
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up of the learning rate, then constant
    epochs: int = 1  # passes over the preference groups
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit)
    groups_per_batch: int = 1  # twin groups per optimizer step (all videos of a group together)
    grad_clip: float = 1.0  # max global grad norm (0: off)
    seed: int = 0  # data order and dropout RNG
    save_every: int = 50  # steps between checkpoints (0: only at the end; one is always written at the end)
    dropout: bool = False  # False: policy in eval mode (no dropout), so h(v, c) = 0 at step 0

    def __post_init__(self) -> None:
        for name, (ok, want) in self._checks().items():
            if not ok:
                raise ValueError(f"DPOConfig.{name} must be {want}, got {getattr(self, name)!r}")
        for name, value in MODES[self.mode].items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"DPOConfig(mode={self.mode!r}) needs {name}={value!r}, got "
                    f"{getattr(self, name)!r}; use DPOConfig.for_mode({self.mode!r}, ...)"
                )

    def _checks(self) -> dict[str, tuple[bool, str]]:
        return {
            "mode": (self.mode in MODES, f"one of {sorted(MODES)}"),
            "pairs": (self.pairs in PAIR_MODES, f"one of {PAIR_MODES}"),
            "beta": (self.beta > 0, "> 0"),
            "lr": (self.lr > 0, "> 0"),
            "lambda_video": (self.lambda_video >= 0, ">= 0"),
            "lambda_nll": (self.lambda_nll >= 0, ">= 0"),
            "margin": (self.margin >= 0, ">= 0"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "epochs": (self.epochs >= 1, ">= 1"),
            "max_steps": (self.max_steps >= 0, ">= 0"),
            "groups_per_batch": (self.groups_per_batch >= 1, ">= 1"),
            "grad_clip": (self.grad_clip >= 0, ">= 0"),
            "save_every": (self.save_every >= 0, ">= 0"),
        }

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> DPOConfig:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        return cls(mode=mode, **{**MODES[mode], **overrides})

    @property
    def lambdas(self) -> dict[str, float]:
        """Weight of each loss term in L (`loss.TERMS`): the caption group's is 1."""
        return {"caption": 1.0, "video": self.lambda_video, "nll": self.lambda_nll}

    def resume_guard(self) -> dict:
        return {name: getattr(self, name) for name in RESUME_FIXED}
