"""One LoRA step of the MDM loss on SmolLM2-135M-Instruct (offline, A2D), batch 4 x 256; prints JSON.

Run in its own process by tests/test_smollm2.py so that its peak memory is measured alone.
"""

import json
import resource
import time

import torch

from dlm_rl.data.collate import DiffusionCollator, encode_prompt
from dlm_rl.diffusion import MCNoise, mdm_loss
from dlm_rl.models.assets import smollm2
from dlm_rl.models.lora import LoraArguments, add_lora
from dlm_rl.testbed import TASKS

torch.manual_seed(0)
start = time.perf_counter()
model = smollm2()
vocab_before = len(model.tokenizer) - 1
add_lora(model, LoraArguments(use_lora=True, lora_r=8, lora_alpha=16))
rows = list(TASKS["chain"].dataset("train", 4, seed=0))
for row in rows:
    row["prompt"] = [{"role": "user", "content": row["prompt"]}]
prompt_len = max(len(encode_prompt(model.tokenizer, r["prompt"])) for r in rows)
batch = DiffusionCollator(model.tokenizer, 256 - prompt_len)(rows)
noise = MCNoise.sample(batch["response_mask"])
loss = mdm_loss(model, batch["input_ids"], batch["response_mask"], noise, batch["attention_mask"])
loss.backward()
trainable = {n for n, p in model.named_parameters() if p.requires_grad}
with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
adapter = [p for n, p in model.named_parameters() if p.requires_grad]
before = [p.detach().clone() for p in adapter]
torch.optim.AdamW(adapter, lr=1e-3).step()
logits = model(batch["input_ids"][:1, :32], batch["attention_mask"][:1, :32]).logits
print(
    json.dumps(
        {
            "loss": loss.item(),
            "shape": list(batch["input_ids"].shape),
            "mask_token_id": model.mask_token_id,
            "vocab_before": vocab_before,
            "embeddings": model.model.get_input_embeddings().num_embeddings,
            "trainable_all_lora": all("lora_" in n for n in trainable),
            "n_trainable": len(trainable),
            "grads_only_on_trainable": with_grad <= trainable and len(with_grad) > 0,
            "adapter_changed": any(not torch.equal(a, b) for a, b in zip(adapter, before)),
            "mask_logit_is_neg_inf": bool(torch.isneginf(logits[..., model.mask_token_id]).all()),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "seconds": time.perf_counter() - start,
        }
    )
)
