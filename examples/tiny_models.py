"""Tiny transformers models built from a config, no download: the examples', benchmarks' and tests' one builder.

Each builder seeds torch, then builds the model, so the same arguments give the same weights. Keyword
arguments are config fields; they override the tiny defaults.
"""

from __future__ import annotations

import torch


def _build(model_class, config_class, seed, defaults, fields):
    config = dict(defaults)
    config.update(fields)
    torch.manual_seed(seed)
    return model_class(config_class(**config))


def bert(num_layers=12, seed=0, **fields):
    """A BertForSequenceClassification with two labels."""
    from transformers import BertConfig, BertForSequenceClassification

    defaults = dict(num_hidden_layers=num_layers, hidden_size=32, num_attention_heads=2, intermediate_size=37,
                    vocab_size=99, max_position_embeddings=64, num_labels=2)
    return _build(BertForSequenceClassification, BertConfig, seed, defaults, fields)


def gpt2(num_layers=4, seed=0, **fields):
    """A GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel

    defaults = dict(n_layer=num_layers, n_embd=32, n_head=2, vocab_size=99, n_positions=64, bos_token_id=0,
                    eos_token_id=0)
    return _build(GPT2LMHeadModel, GPT2Config, seed, defaults, fields)


def llama(num_layers=4, seed=0, **fields):
    """A LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    defaults = dict(num_hidden_layers=num_layers, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=2, vocab_size=99, max_position_embeddings=64)
    return _build(LlamaForCausalLM, LlamaConfig, seed, defaults, fields)


def t5(num_layers=3, num_decoder_layers=2, seed=0, **fields):
    """A T5ForConditionalGeneration with an encoder and a decoder stack."""
    from transformers import T5Config, T5ForConditionalGeneration

    defaults = dict(num_layers=num_layers, num_decoder_layers=num_decoder_layers, d_model=32, d_kv=8, d_ff=37,
                    num_heads=2, vocab_size=99, decoder_start_token_id=0)
    return _build(T5ForConditionalGeneration, T5Config, seed, defaults, fields)
