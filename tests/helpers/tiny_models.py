"""Tiny real models built from configs (no hub): one per architecture family the package supports."""

from __future__ import annotations

import torch


def bert(num_layers=12, seed=0, num_labels=2, **config_fields):
    """``config_fields``: more BertConfig fields (e.g. ``hidden_dropout_prob=0.0``)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        num_hidden_layers=num_layers,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=99,
        max_position_embeddings=64,
        num_labels=num_labels,
        **config_fields,
    )
    return BertForSequenceClassification(config)


def gpt2(num_layers=4, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=num_layers, n_embd=32, n_head=2, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def llama(num_layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=99,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def t5(num_layers=3, num_decoder_layers=2, seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        num_layers=num_layers,
        num_decoder_layers=num_decoder_layers,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_heads=2,
        vocab_size=99,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


BUILDERS = {"bert": bert, "gpt2": gpt2, "llama": llama, "t5": t5}

# (family, list target_modules) for each builder.
TARGETS = {
    "bert": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}


def example_inputs(family, batch=2, seq=7, seed=123):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (batch, seq), generator=generator)
    if family == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}
