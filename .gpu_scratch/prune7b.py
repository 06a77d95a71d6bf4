"""Random-weight LLaMA-2-7B shapes, bf16, kept in CPU memory; pruned block by block on the GPU."""
import json, os, sys, time
sys.path.insert(0, ".")
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from lorsbench.config import CalibrationConfig, PatternConfig, PruningConfig
from lorsbench.pruning.artifacts import prune_model

name, pattern_name, nsamples, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pattern = {"unstructured": PatternConfig("unstructured"), "2of4": PatternConfig("2of4", 2, 4)}[pattern_name]
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
t = time.perf_counter()
torch.set_default_dtype(torch.bfloat16)
with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
model = model.to_empty(device="cpu")
torch.set_default_dtype(torch.float32)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for pname, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=g)
model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
model.eval()
print(f"built in {time.perf_counter() - t:.1f} s", flush=True)
batches = lambda: [{"input_ids": torch.randint(0, 32000, (1, seq_len), generator=torch.Generator().manual_seed(i)),
                    "attention_mask": torch.ones(1, seq_len, dtype=torch.long)} for i in range(nsamples)]
targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
config = PruningConfig(name, 0.5, pattern, targets, CalibrationConfig(nsamples=nsamples, seq_len=seq_len), {})
torch.cuda.reset_peak_memory_stats()
out = prune_model(model, config, batches, "/tmp/prunecache", "random-7b", device="cuda")
peak = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps({"pruner": name, "pattern": pattern_name, "nsamples": nsamples, "seq_len": seq_len,
                  "prune_wall_s": round(out.prune_wall_s, 1), "peak_alloc_gib": round(peak, 2),
                  "sparsity": out.report.sparsity, "nm_valid": out.report.nm_valid,
                  "params_on_cpu": all(p.device.type == "cpu" for p in model.parameters())}), flush=True)
t = time.perf_counter()
out2 = prune_model(model, config, batches, "/tmp/prunecache", "random-7b", device="cuda")
print(json.dumps({"cache_hit": out2.cache_hit, "hit_wall_s": round(out2.prune_wall_s, 1),
                  "total_second_call_s": round(time.perf_counter() - t, 1)}), flush=True)
os.system("du -sh /tmp/prunecache/pruned/*")
