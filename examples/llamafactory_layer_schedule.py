"""A layer schedule in LLaMA-Factory: its own LoRA, scheduled by ``LayerScheduleCallback``.

LLaMA-Factory builds the LoRA itself (``get_peft_model`` with a plain ``LoraConfig`` from ``lora_target``) and
takes only callbacks, so the schedule goes to the callback; at ``on_init_end`` it adopts LLaMA-Factory's LoRA
(``peft_layersched.schedule_lora``).  Here: SFT of a 4-layer LLaMA-style model (built from a config and saved
to a folder with a word-level tokenizer: no download) on a tiny alpaca-format dataset, LoRA on
``q_proj,v_proj`` of every layer; layer 3 trains first, layer 2 joins at optimizer step 2::

    python examples/llamafactory_layer_schedule.py [--output-dir DIR]

LLaMA-Factory 0.9.5 pins its own stack (peft 0.18, transformers <= 5.6, trl <= 0.24, torchaudio); run this
where it is installed.  The adapter in ``DIR/run`` is a scheduled one: ``PeftModel.from_pretrained`` (with
``import peft_layersched``) loads it back with its schedule.  Exit code 0 when the saved LoRA shows the
schedule: ``lora_B`` of layers 0 and 1 (never scheduled, LoRA initialised with B = 0) still zero, of layers 2
and 3 not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

SCHEDULE = {0: [3], 2: [2, 3]}
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "a", "big", "red", "ball"]


def write_model(folder):
    """A tiny LLaMA-style causal LM and a word-level tokenizer, saved as a model folder."""
    import tiny_models  # examples/tiny_models.py, beside this script
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for word in WORDS:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="[EOS]")
    model = tiny_models.llama(num_layers=4, seed=0, vocab_size=len(vocab), pad_token_id=0, eos_token_id=2,
                              bos_token_id=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_dataset(folder):
    rows = [{"instruction": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3)), "input": "",
             "output": " ".join(WORDS[(i + j + 3) % len(WORDS)] for j in range(3))} for i in range(16)]
    with open(os.path.join(folder, "toy.json"), "w") as handle:
        json.dump(rows, handle)
    with open(os.path.join(folder, "dataset_info.json"), "w") as handle:
        json.dump({"toy": {"file_name": "toy.json"}}, handle)


def train(workdir, extra_callbacks=()):
    """Run LLaMA-Factory's SFT with the scheduled callback; returns the output folder."""
    from llamafactory.train.tuner import run_exp

    from peft_layersched import LayerScheduleCallback

    model_dir, data_dir, out = (os.path.join(workdir, name) for name in ("model", "data", "run"))
    for folder in (model_dir, data_dir):
        os.makedirs(folder, exist_ok=True)
    write_model(model_dir)
    write_dataset(data_dir)
    args = {
        "model_name_or_path": model_dir, "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "q_proj,v_proj",
        "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "dataset": "toy", "dataset_dir": data_dir, "template": "empty", "cutoff_len": 16,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
        "output_dir": out, "overwrite_output_dir": True, "max_steps": 4, "per_device_train_batch_size": 4,
        "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "seed": 0, "disable_tqdm": True, "plot_loss": False,
    }
    callback = LayerScheduleCallback(layer_schedule=SCHEDULE, schedule_unit="step")
    run_exp(args, callbacks=[callback] + list(extra_callbacks))
    return out


def schedule_shows(out):
    """Whether the saved adapter is scheduled and its lora_B are zero exactly in the never-scheduled layers."""
    from safetensors.torch import load_file

    with open(os.path.join(out, "adapter_config.json")) as handle:
        config = json.load(handle)
    weights = load_file(os.path.join(out, "adapter_model.safetensors"))
    moved = sorted({int(k.split("layers.")[1].split(".")[0]) for k, v in weights.items()
                    if "lora_B" in k and bool(v.ne(0).any())})
    print("peft_type:", config["peft_type"], "| ever_active_layers:", config.get("ever_active_layers"),
          "| layers whose lora_B moved:", moved)
    return config["peft_type"] == "SCHEDULED_LORA" and config.get("ever_active_layers") == [2, 3] and moved == [2, 3]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="work folder (default: a temporary one)")
    options = parser.parse_args(argv)
    workdir = options.output_dir or tempfile.mkdtemp(prefix="layersched_llamafactory_")
    return 0 if schedule_shows(train(workdir)) else 1


if __name__ == "__main__":
    sys.exit(main())
