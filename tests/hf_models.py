"""Tiny random transformers speech models written with ``save_pretrained`` (2 layers, hidden 32), for
the tests of :mod:`analysis.hf` and :mod:`analysis.saliency_hf`; fixtures in ``conftest.py``."""

from __future__ import annotations

import json
import string

import pytest
import torch

tf = pytest.importorskip("transformers", reason="transformers is not installed: pip install '.[hf]'")

SPECIALS = [
    "<|startoftranscript|>",
    "<|en|>",
    "<|transcribe|>",
    "<|translate|>",
    "<|notimestamps|>",
    "<|nocaptions|>",
    "<|startofprev|>",
    "<|startoflm|>",
]


def ctc_folder(path, model_type: str, stable: bool):
    torch.manual_seed(0)
    Config, Model = {"wav2vec2": (tf.Wav2Vec2Config, tf.Wav2Vec2ForCTC), "hubert": (tf.HubertConfig, tf.HubertForCTC)}[
        model_type
    ]
    cfg = Config(
        vocab_size=29,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=stable,
        feat_extract_norm="layer" if stable else "group",
    )
    Model(cfg).save_pretrained(path)
    (path / "vocab.json").write_text(
        json.dumps({c: i for i, c in enumerate(["<pad>", "<unk>", "|", *string.ascii_uppercase])})
    )
    tok = tf.Wav2Vec2CTCTokenizer(str(path / "vocab.json"))
    fe = tf.Wav2Vec2FeatureExtractor(return_attention_mask=stable, do_normalize=True)
    tf.Wav2Vec2Processor(fe, tok).save_pretrained(path)
    return path


def whisper_folder(path, max_target_positions: int = 64):
    """A Whisper with a processor whose tokenizer is a byte-level BPE over letters (no merges); its
    greedy transcript holds at most ``max_target_positions`` - 4 tokens after the prompt."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "v.json").write_text(json.dumps({c: i for i, c in enumerate([*string.ascii_lowercase, "Ġ", "'"])}))
    (path / "m.txt").write_text("#version: 0.2\n")
    tok = tf.WhisperTokenizer(
        str(path / "v.json"),
        str(path / "m.txt"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tf.WhisperProcessor(tf.WhisperFeatureExtractor(feature_size=80), tok).save_pretrained(path)
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(0)
    eot = ids("<|endoftext|>")
    cfg = tf.WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=80,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        d_model=32,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_target_positions=max_target_positions,
        decoder_start_token_id=ids(SPECIALS[0]),
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
    )
    model = tf.WhisperForConditionalGeneration(cfg)
    model.generation_config = tf.GenerationConfig(
        decoder_start_token_id=cfg.decoder_start_token_id,
        eos_token_id=eot,
        pad_token_id=eot,
        no_timestamps_token_id=ids("<|notimestamps|>"),
        is_multilingual=True,
        lang_to_id={"<|en|>": ids("<|en|>")},
        task_to_id={"transcribe": ids("<|transcribe|>")},
    )
    model.save_pretrained(path)
    return path


def build_all(root):
    """Every family: post-LN and pre-LN wav2vec2-CTC, HuBERT-CTC, Whisper, under ``root``."""
    return {
        "post": ctc_folder(root / "post", "wav2vec2", False),
        "pre": ctc_folder(root / "pre", "wav2vec2", True),
        "hubert": ctc_folder(root / "hubert", "hubert", False),
        "whisper": whisper_folder(root / "whisper"),
    }


def tone() -> torch.Tensor:
    """1 s of a 220 Hz tone in light noise, 16 kHz."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16000) / 16000
    return 0.1 * torch.sin(2 * torch.pi * 220 * t) + 0.02 * torch.randn(16000, generator=g)
