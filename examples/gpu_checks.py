"""GPU checks that CPU cannot run: the Trainer + FSDP path (accelerate refuses FSDP on CPU) and QLoRA on
bitsandbytes' CUDA backend.  One prepared script for a short GPU session:

    torchrun --nproc_per_node $(nvidia-smi -L | wc -l) examples/gpu_checks.py OUT_DIR

(one GPU works too: FSDP with one rank still goes through accelerate's FSDP wrapping).  Writes
OUT_DIR/gpu_checks.json and exits 1 if a check fails.  Checks, on a tiny LLaMA built from a config, with the
schedule {0: [3], 2: [1]} in epochs (layer 3 trains epochs 0-1 and is frozen after, layer 1 joins at 2):

* ``fsdp2`` / ``fsdp1``: Trainer(args=TrainingArguments(fsdp="full_shard auto_wrap", fsdp_config=...)) with
  LayerScheduleCallback: the frozen layer stays bitwise still, the joining layer trains, ranks agree;
* ``qlora``: a 4-bit base (bitsandbytes, CUDA) with a top-down schedule: the layer that joins below the
  layers that ran without gradient trains (on bitsandbytes' CPU backend it does not).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import tiny_models  # examples/tiny_models.py, beside this script
import torch
from peft import get_peft_model
from torch.utils.data import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from peft_layersched import LayerScheduleCallback, ScheduledLoraConfig

SCHEDULE = {0: [3], 2: [1]}


class Tokens(Dataset):
    def __init__(self, n=64, seq=16):
        self.ids = torch.randint(1, 255, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(path):
    if not os.path.isdir(path):
        tiny_models.llama(num_layers=4, seed=0, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=256).save_pretrained(path)
    return path


def lora_hashes(model, gather):
    out = {}
    for layer, params in model.base_model.layer_parameters().items():
        digest = hashlib.sha256()
        for param in gather(params):
            digest.update(param.detach().float().cpu().clone().numpy().tobytes())
        out[str(layer)] = digest.hexdigest()[:16]
    return out


class Recorder(TrainerCallback):
    def __init__(self, gather):
        self.gather, self.steps = gather, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        peft_model = getattr(model, "module", model)
        self.steps.append({"step": state.global_step, "hashes": lora_hashes(peft_model, self.gather)})


def verdict(steps, steps_per_epoch):
    at = {s["step"]: s["hashes"] for s in steps}
    switch = 2 * steps_per_epoch
    frozen = {at[t]["3"] for t in at if t >= switch}
    return {
        "frozen_layer_still": len(frozen) == 1,
        "first_layer_trained": at[1]["3"] != at[switch]["3"],
        "joining_layer_still_before": len({at[t]["1"] for t in at if t <= switch}) == 1,
        "joining_layer_trained": at[switch]["1"] != at[max(at)]["1"],
    }


def fsdp_check(out, version):
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama(os.path.join(out, "base"))),
                           ScheduledLoraConfig(r=8, target_modules=["q_proj", "v_proj"], layer_schedule=SCHEDULE,
                                               init_seed=0))
    fsdp_config = {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    fsdp_config.update({"version": 2} if version == 2 else {"use_orig_params": True})

    def gather(params):
        return [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]

    recorder = Recorder(gather)
    args = TrainingArguments(output_dir=os.path.join(out, f"fsdp{version}"), num_train_epochs=4,
                             per_device_train_batch_size=4, learning_rate=1e-3, weight_decay=0.1, report_to="none",
                             save_strategy="no", fsdp="full_shard auto_wrap", fsdp_config=fsdp_config, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[LayerScheduleCallback(), recorder])
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        def gather(params):  # noqa: F811
            with FSDP.summon_full_params(trainer.model_wrapped):
                return [p.detach().clone() for p in params]

        recorder.gather = gather
    trainer.train()
    steps_per_epoch = max(s["step"] for s in recorder.steps) // 4
    return verdict(recorder.steps, steps_per_epoch)


def qlora_check(out):
    from transformers import BitsAndBytesConfig

    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = LlamaForCausalLM.from_pretrained(tiny_llama(os.path.join(out, "base")), quantization_config=quantized,
                                            device_map={"": torch.cuda.current_device()})
    model = get_peft_model(base, ScheduledLoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                     layer_schedule={0: [3], 1: [1]}, init_seed=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = Tokens().ids[:4].cuda()
    grads = {}
    for epoch in range(2):
        model.activate_layers(epoch)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            grads[epoch] = {str(layer): any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
                            for layer, params in model.base_model.layer_parameters().items()}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"top_layer_gets_gradient_first": grads[0]["3"], "lower_layer_gets_gradient_after_joining": grads[1]["1"]}


def main(out):
    os.makedirs(out, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, check in (("fsdp2", lambda: fsdp_check(out, 2)), ("fsdp1", lambda: fsdp_check(out, 1)),
                        ("qlora", lambda: qlora_check(out))):
        try:
            results[name] = check()
        except Exception as error:  # report every check, then fail
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        with open(os.path.join(out, "gpu_checks.json"), "w") as handle:
            json.dump(results, handle, indent=1)
        print(json.dumps(results, indent=1))
    ok = all(isinstance(v, dict) and "error" not in v and all(v.values()) for k, v in results.items()
             if k in ("fsdp2", "fsdp1", "qlora"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu_checks_out"))
