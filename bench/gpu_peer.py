#!/usr/bin/env python3
"""Speed peer for the single-GPU benchmark: Hugging Face transformers' DeepseekV3ForCausalLM trained eagerly.

Builds a DeepSeek-V3-shaped model from a config with random init (no downloads, no tokenizer), trains it on random
token ids with AdamW and reports tokens/s, model FLOPs per token and (with --peak-tflops) MFU. The last line printed is
one JSON object (also written to --json PATH).

  --dtype bf16: FP32 parameters and AdamW, forward/backward under torch.autocast(bfloat16) (plain PyTorch mixed
                precision). transformers' grouped_mm experts path bypasses autocast (torch's grouped_mm is not
                autocast-enabled; transformers casts the activations to the *weight* dtype, i.e. FP32), so by default
                this script casts the expert weights to the autocast dtype inside that call, as autocast does for every
                other matmul; --expert-gemm-dtype param keeps transformers' behaviour (expert GEMMs in FP32).
  --dtype fp32: everything FP32.

  --accumulate 1,4: micro-batches per optimizer step, as bench_gpu --micro-batches; each count trained in turn in
                one process (the JSON's top-level figures are the first count's, "runs" holds each).

Router: DeepSeek-V3 sigmoid scores + correction bias (noaux_tc), n_group = topk_group = 1, routed_scaling_factor 2.5,
top-k normalised; no MTP. transformers neither updates the correction bias nor adds a balance loss in training.

Exit status 2 with one line on stdout if building the model or a step fails (e.g. out of GPU memory).
"""

import argparse
import json
import sys
import time

PHASE = "startup"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--layers", type=int, default=4, help="num_hidden_layers")
    a("--dense-layers", type=int, default=1, help="first_k_dense_replace")
    a("--experts", type=int, default=16, help="n_routed_experts")
    a("--top-k", type=int, default=8, help="num_experts_per_tok")
    a("--shared", type=int, default=1, help="n_shared_experts")
    a("--hidden", type=int, default=7168)
    a("--heads", type=int, default=128)
    a("--q-lora-rank", type=int, default=1536)
    a("--kv-lora-rank", type=int, default=512)
    a("--qk-nope-dim", type=int, default=128)
    a("--qk-rope-dim", type=int, default=64)
    a("--v-head-dim", type=int, default=128)
    a("--moe-inter", type=int, default=2048, help="moe_intermediate_size")
    a("--inter", type=int, default=18432, help="dense intermediate_size")
    a("--vocab", type=int, default=32768)
    a("--seq", type=int, default=4096)
    a("--micro-batch", type=int, default=1)
    a("--accumulate", default="1",
      help="micro-batches per optimizer step (gradient accumulation: each backward of loss / N, then one AdamW "
           "step); a comma-separated list trains each count in turn, warm-up and timed steps each, in one process")
    a("--steps", type=int, default=5, help="timed steps")
    a("--warmup", type=int, default=2, help="untimed steps")
    a("--device", default=None, help="cuda if available else cpu")
    a("--threads", type=int, default=None, help="torch.set_num_threads (intra-op threads; default: torch's)")
    a("--dtype", choices=["bf16", "fp32"], default="bf16")
    a("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flex_attention, ...)")
    a("--experts-impl", default="grouped_mm",
      help="transformers experts_implementation: grouped_mm (transformers 5 default), eager (Python loop over "
           "experts), batched_mm (gathers one weight matrix per token-expert pair: memory-hungry)")
    a("--expert-gemm-dtype", choices=["autocast", "param"], default="autocast",
      help="bf16 only, grouped_mm only: 'autocast' casts expert weights to bf16 for the grouped GEMMs (default); "
           "'param' leaves transformers as is (expert GEMMs in the FP32 parameter dtype)")
    a("--lr", type=float, default=1e-4)
    a("--seed", type=int, default=0)
    a("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s of the device, for MFU")
    a("--json", default=None, help="also write the result JSON here")
    args = p.parse_args()
    if not 0 <= args.dense_layers <= args.layers:
        p.error("--dense-layers must be in [0, --layers]")
    if not 1 <= args.top_k <= args.experts:
        p.error("--top-k must be in [1, --experts]")
    try:
        args.accumulate = [int(n) for n in args.accumulate.split(",")]
    except ValueError:
        p.error(f"--accumulate takes positive integers separated by commas, got {args.accumulate!r}")
    if not args.accumulate or min(args.accumulate) < 1:
        p.error(f"--accumulate takes positive integers separated by commas, got {args.accumulate}")
    if args.experts < 2:
        p.error("--experts must be >= 2 (the noaux_tc router takes the top 2 scores of each group)")
    return args


def flops_per_token(args):
    """Model FLOPs per trained token (forward + backward = 3 x forward; 2 FLOPs per multiply-add)."""
    h, nh = args.hidden, args.heads
    qk_head = args.qk_nope_dim + args.qk_rope_dim
    mla = (h * args.q_lora_rank                                  # q_a_proj
           + args.q_lora_rank * nh * qk_head                     # q_b_proj
           + h * (args.kv_lora_rank + args.qk_rope_dim)          # kv_a_proj_with_mqa
           + args.kv_lora_rank * nh * (args.qk_nope_dim + args.v_head_dim)  # kv_b_proj
           + nh * args.v_head_dim * h)                           # o_proj
    dense_mlp = 3 * h * args.inter
    expert = 3 * h * args.moe_inter
    moe_layers = args.layers - args.dense_layers
    parts = {
        "mla": args.layers * mla,
        "dense_mlp": args.dense_layers * dense_mlp,
        "moe_routed_active": moe_layers * args.top_k * expert,
        "moe_shared": moe_layers * args.shared * expert,
        "router": moe_layers * args.experts * h,
        "lm_head": h * args.vocab,
    }
    matmul_params = sum(parts.values())
    # Causal attention per token: QK^T and PV over on average seq/2 keys, 2 FLOPs a multiply-add, forward +
    # backward 3x: 3 * L * heads * seq * (qk_head + v_head) -- the formula of moetrain plan / bench_gpu.
    attn = 3 * args.layers * nh * args.seq * (qk_head + args.v_head_dim)
    return 6 * matmul_params + attn, matmul_params, parts, attn


def patch_grouped_mm_for_autocast(moe_module, torch):
    """Make transformers' grouped expert GEMMs honour autocast: cast the weight to the autocast dtype first."""
    original = moe_module._grouped_mm

    def _grouped_mm(input, weight, offs):
        dev = weight.device.type
        if torch.is_autocast_enabled(dev):
            weight = weight.to(torch.get_autocast_dtype(dev))
        return original(input, weight, offs)

    moe_module._grouped_mm = _grouped_mm


def main():
    global PHASE
    args = parse_args()

    PHASE = "import"
    import torch
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    PHASE = "setting up the device"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    print(f"versions: transformers {transformers.__version__}, torch {torch.__version__}, python "
          f"{sys.version.split()[0]}" + (f", device {torch.cuda.get_device_name(device)}" if on_cuda else ""))

    expert_gemm = "fp32"
    if args.dtype == "bf16" and args.experts_impl == "grouped_mm":
        if args.expert_gemm_dtype == "autocast":
            from transformers.integrations import moe as hf_moe
            patch_grouped_mm_for_autocast(hf_moe, torch)
            expert_gemm = "bf16 (weights cast under autocast)"
        else:
            expert_gemm = "fp32 (transformers as is: grouped_mm bypasses autocast)"
    elif args.dtype == "bf16":
        expert_gemm = "bf16 (autocast)"

    PHASE = "building the model"
    torch.manual_seed(args.seed)
    config = DeepseekV3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        moe_intermediate_size=args.moe_inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        n_shared_experts=args.shared,
        n_routed_experts=args.experts,
        routed_scaling_factor=2.5,
        kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank,
        qk_rope_head_dim=args.qk_rope_dim,
        v_head_dim=args.v_head_dim,
        qk_nope_head_dim=args.qk_nope_dim,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=args.top_k,
        first_k_dense_replace=args.dense_layers,
        norm_topk_prob=True,
        hidden_act="silu",
        max_position_embeddings=max(args.seq, 4096),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
        num_mtp_layers=0,
        attn_implementation=args.attn,
        experts_implementation=args.experts_impl,
    )
    with torch.device(device):
        model = DeepseekV3ForCausalLM(config)
    model.to(device=device, dtype=torch.float32)
    model.train()
    attn_impl = model.config._attn_implementation
    experts_impl = model.config._experts_implementation
    print(f"attention implementation: {attn_impl} (requested {args.attn}); experts implementation: {experts_impl} "
          f"(requested {args.experts_impl}); expert GEMMs: {expert_gemm}")

    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    active_params = params - expert_params * (args.experts - args.top_k) // args.experts
    embed_params = model.model.embed_tokens.weight.numel()
    fpt, matmul_params, parts, attn_flops = flops_per_token(args)
    print(f"parameters: total {params:,} ({params / 1e9:.3f} B), active per token {active_params:,} "
          f"({active_params / 1e9:.3f} B; routed experts {expert_params:,} of which {args.top_k}/{args.experts} "
          f"active; embedding {embed_params:,})")
    print("FLOPs/token = 6 x matmul params per token + attention:")
    for k, v in parts.items():
        print(f"  {k:18s} {v:>16,}")
    print(f"  {'matmul params':18s} {matmul_params:>16,}  -> 6 x = {6 * matmul_params:,}")
    print(f"  attention 3*L*heads*seq*(qk_head+v_head) = 3*{args.layers}*{args.heads}*{args.seq}*"
          f"({args.qk_nope_dim + args.qk_rope_dim}+{args.v_head_dim}) = {attn_flops:,}")
    print(f"  total {fpt:,} FLOPs/token ({fpt / 1e9:.3f} GFLOP)")

    PHASE = "building the optimizer"
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_batches = 4
    batches = [torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=gen).to(device)
               for _ in range(n_batches)]
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(i, accumulate):
        loss = 0
        for j in range(accumulate):
            ids = batches[(i * accumulate + j) % n_batches]
            with autocast:
                out = model(input_ids=ids, labels=ids, use_cache=False)
            (out.loss / accumulate).backward()
            loss = loss + out.loss.detach() / accumulate
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if on_cuda:
            torch.cuda.synchronize(device)

    def train(accumulate):
        """Warm-up and timed steps of `accumulate` micro-batches each: (tokens/s, s/step, MFU or None)."""
        global PHASE
        tag = f"accumulate {accumulate}: "
        losses = []
        for i in range(args.warmup):
            PHASE = f"{tag}warm-up step {i + 1}"
            t0 = time.perf_counter()
            losses.append(step(i, accumulate))
            sync()
            print(f"{tag}warm-up step {i + 1}/{args.warmup}: loss {losses[-1].item():.4f}, "
                  f"{time.perf_counter() - t0:.3f} s", flush=True)
        PHASE = f"{tag}timed steps"
        sync()
        t0 = time.perf_counter()
        for i in range(args.steps):
            PHASE = f"{tag}timed step {i + 1}"
            losses.append(step(args.warmup + i, accumulate))
        sync()
        elapsed = time.perf_counter() - t0
        PHASE = "reporting"
        for i, l in enumerate(losses[args.warmup:]):
            print(f"{tag}step {i + 1}/{args.steps}: loss {l.item():.4f}")
        tokens = args.micro_batch * args.seq * accumulate * args.steps
        tps = tokens / elapsed
        step_s = elapsed / args.steps if args.steps else float("nan")
        mfu = (tps * fpt / (args.peak_tflops * 1e12)) if args.peak_tflops else None
        print(f"{tag}tokens/s: {tps:,.1f} ({tokens} tokens in {elapsed:.3f} s, {step_s:.3f} s/step)")
        print(f"{tag}model TFLOP/s: {tps * fpt / 1e12:.2f}" +
              (f", MFU {100 * mfu:.2f}% of {args.peak_tflops} TFLOP/s" if mfu is not None else ""), flush=True)
        return tps, step_s, mfu

    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for accumulate in args.accumulate:
        tps, step_s, mfu = train(accumulate)
        runs.append({"accumulate": accumulate, "tokens_per_s": tps, "step_s": step_s, "mfu": mfu})
    peak_mem = torch.cuda.max_memory_allocated(device) if on_cuda else None
    if peak_mem is not None:
        print(f"peak GPU memory allocated: {peak_mem / 2**30:.2f} GiB")
    tps, step_s, mfu = runs[0]["tokens_per_s"], runs[0]["step_s"], runs[0]["mfu"]
    result = {
        "peer": f"transformers {transformers.__version__} DeepseekV3ForCausalLM, uncompiled, attn={attn_impl}, "
                f"experts={experts_impl}, expert GEMMs {expert_gemm.split()[0]}",
        "tokens_per_s": tps,
        "step_s": step_s,
        "mfu": mfu,
        "flops_per_token": fpt,
        "params": params,
        "active_params": active_params,
        "peak_mem_bytes": peak_mem,
        "layers": args.layers,
        "experts": args.experts,
        "top_k": args.top_k,
        "seq": args.seq,
        "accumulate": args.accumulate[0],
        "runs": runs,
        "dtype": args.dtype,
        "device": str(device),
    }
    line = json.dumps(result)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # one line, no traceback wall
        msg = (str(e).strip().splitlines() or [""])[0]
        print(f"gpu_peer: FAILED {PHASE}: {type(e).__name__}: {msg}", flush=True)
        sys.exit(2)
