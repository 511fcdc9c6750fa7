"""moeserve.export: an HF Qwen3-MoE written to GGUF runs in moeserve with HF's logits.

F32 export must match HF to float rounding (names, layouts and metadata are right); Q8_0 export
within the error Q8_0 rounding introduces (~0.4 % per weight).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from moeserve import LLM
from moeserve.errors import MoeServeError
from moeserve.export import ExportError, Vocab, export_qwen3moe
from moeserve.gguf.config import load_config
from moeserve.gguf.reader import GGUFFile

from .conftest import llama_cpp_logits

transformers = pytest.importorskip("transformers")

VOCAB = 384
IDS = [5, 17, 300, 42, 42, 7, 250, 99, 3, 120, 64, 201, 11, 380, 9, 77, 150, 1, 2, 333]


def hf_model(tied: bool = False, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, moe_intermediate_size=64, intermediate_size=256, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=tied,
        max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.08,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **overrides)
    cfg._attn_implementation = "eager"
    model = transformers.Qwen3MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():  # norms away from 1 and a confident router, like a trained model
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.mul_(4.0)
    return model


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def untied():
    return hf_model(tied=False)


def _export(tmp_path, model, qtype, name="m.gguf", **kw):
    return export_qwen3moe(tmp_path / name, model.state_dict(), model.config, Vocab.synthetic(VOCAB), qtype=qtype,
                           **kw)


@pytest.mark.parametrize("tied", [False, True])
def test_f32_export_matches_hf_exactly(tmp_path, tied):
    model = hf_model(tied=tied)
    path = _export(tmp_path, model, QT.F32)
    ours = LLM(str(path), warmup=False, kernels="reference").logits(IDS)
    ref = hf_logits(model)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_q8_0_export_matches_hf_within_quant_tolerance(tmp_path, untied):
    path = _export(tmp_path, untied, QT.Q8_0)
    ref = hf_logits(untied)
    for kernels in ("reference", "cpu"):
        ours = LLM(str(path), warmup=False, kernels=kernels).logits(IDS)
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err < 0.03, f"{kernels}: max |Δlogits| = {err:.4f} of max|logits|"
        # the ranking the sampler sees is preserved where the model is not torn between two tokens
        top2 = np.sort(ref, axis=-1)[:, -2:]
        confident = (top2[:, 1] - top2[:, 0]) > 0.05 * np.abs(ref).max()
        assert (ours.argmax(-1) == ref.argmax(-1))[confident].all()


def test_metadata_and_tensor_types(tmp_path, untied):
    path = _export(tmp_path, untied, QT.Q8_0, name="meta.gguf", context_length=256,
                   metadata={"general.license": "PSF-2.0"})
    f = GGUFFile(path)
    c = load_config(f)
    assert (c.arch, c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim) == ("qwen3moe", 2, 128, 4, 2, 32)
    assert (c.n_experts, c.n_experts_used, c.expert_intermediate_size) == (8, 2, 64)
    assert f.metadata["qwen3moe.expert_feed_forward_length"] == 64
    assert c.context_length == 256 and c.rope_theta == 10000.0 and not c.tied_embeddings
    assert f.metadata["general.license"] == "PSF-2.0"
    assert f.metadata["general.file_type"] == 7  # MOSTLY_Q8_0
    assert f.metadata["tokenizer.ggml.pre"] == "qwen2"
    assert "<|im_start|>" in f.metadata["tokenizer.chat_template"]
    types = {name: f.tensor(name).qtype for name in f.tensors}
    assert types["token_embd.weight"] == QT.Q8_0 and types["output.weight"] == QT.Q8_0
    assert types["blk.0.ffn_gate_exps.weight"] == QT.Q8_0 and types["blk.1.attn_q.weight"] == QT.Q8_0
    assert types["blk.0.ffn_gate_inp.weight"] == QT.F32
    assert all(t == QT.F32 for n, t in types.items() if "norm" in n)


def test_per_expert_layout_is_accepted(tmp_path, untied):
    """transformers 4.x stores one Linear per expert; both layouts give the same file."""
    sd = dict(untied.state_dict())
    I_ = untied.config.moe_intermediate_size
    for i in range(untied.config.num_hidden_layers):
        q = f"model.layers.{i}.mlp.experts."
        gate_up, down = sd.pop(q + "gate_up_proj"), sd.pop(q + "down_proj")
        for e in range(untied.config.num_experts):
            sd[q + f"{e}.gate_proj.weight"] = gate_up[e, :I_]
            sd[q + f"{e}.up_proj.weight"] = gate_up[e, I_:]
            sd[q + f"{e}.down_proj.weight"] = down[e]
    a = _export(tmp_path, untied, QT.Q8_0, name="fused.gguf")
    b = export_qwen3moe(tmp_path / "split.gguf", sd, untied.config, Vocab.synthetic(VOCAB), qtype=QT.Q8_0)
    fa, fb = GGUFFile(a), GGUFFile(b)
    for name in fa.tensors:
        assert torch.equal(fa.tensor(name).data, fb.tensor(name).data), name


def test_trained_tokenizer_round_trips(tmp_path, untied):
    """A `tokenizers` byte-level BPE exported with the model is read back as the same tokenizer."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from moeserve.tokenizer import PRE_TOKENIZERS, Tokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRE_TOKENIZERS["qwen2"].regexes[0]), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x + 1\n"] * 50
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() <= VOCAB
    path = export_qwen3moe(tmp_path / "tok.gguf", untied.state_dict(), untied.config, Vocab.from_tokenizer(tok))
    ours = Tokenizer.from_gguf(path)
    assert ours.vocab_size == VOCAB  # padded to the embedding rows
    sample = "The lazy fox returns x + 1 — naïve 😀 <|im_start|>user\nhi<|im_end|>"
    assert ours.encode(sample, add_special_tokens=False) == tok.encode(sample).ids
    assert ours.decode(tok.encode(sample).ids) == sample
    assert ours.eos_token_id == tok.token_to_id("<|im_end|>")


def test_errors_are_one_clear_exception(tmp_path, untied):
    sd = dict(untied.state_dict())
    del sd["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ExportError, match="k_norm"):
        export_qwen3moe(tmp_path / "x.gguf", sd, untied.config, Vocab.synthetic(VOCAB))
    with pytest.raises(ExportError, match="norm_topk_prob"):
        export_qwen3moe(tmp_path / "x.gguf", untied.state_dict(), {**untied.config.to_dict(), "norm_topk_prob": False},
                        Vocab.synthetic(VOCAB))
    with pytest.raises(ExportError, match="vocab_size"):
        export_qwen3moe(tmp_path / "x.gguf", untied.state_dict(), untied.config, Vocab.synthetic(VOCAB + 64))
    assert issubclass(ExportError, MoeServeError)


@pytest.mark.llama
@pytest.mark.parametrize("qtype, tol", [(QT.F32, 0.005), (QT.Q8_0, 0.06)])
def test_llama_cpp_reads_export_as_hf_model(tmp_path, untied, qtype, tol):
    """llama.cpp interprets the file as the HF model (F32: up to its f16 KV cache; Q8_0: it also
    rounds activations to 8 bits, so its error is about twice moeserve's)."""
    path = _export(tmp_path, untied, qtype, name=f"llama-{qtype.name}.gguf")
    theirs = llama_cpp_logits(path, list(IDS))
    ref = hf_logits(untied)
    assert np.abs(theirs - ref).max() < tol * np.abs(ref).max()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    confident = (top2[:, 1] - top2[:, 0]) > 0.1 * np.abs(ref).max()
    assert (theirs.argmax(-1) == ref.argmax(-1))[confident].all()
