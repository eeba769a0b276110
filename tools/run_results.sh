#!/usr/bin/env bash
# Every table and figure of docs/results.md. Each step writes JSON + markdown (+ PNG) into docs/results/.
# Runs for hours on 2 CPU cores; run one step by name: tools/run_results.sh bench-smollm2
# The speed steps (bench-*, attention, namm-scorer) want an otherwise idle machine: they interleave their
# configurations and report medians, but two benchmarks at once still measure each other.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
out=docs/results
mkdir -p "$out"
step=${1:-all}
run() { [ "$step" = all ] || [ "$step" = "$1" ]; }
# issue 10: the past-rate recipe of smollm2-rate and qwen2.5-rate (warm start fitted to each pair's attention rate
# since arrival, read from a bias-corrected 0.998 moving average, ranked by budget_zmax; then CMA-ES around it)
rate_recipe=(--data austen,passkey,kv --sample-tokens 512 --scored-tokens 256 --cache-fraction 0.25 --n-sink 4
  --namm-delay 32 --ema-coefficient 0.998 --ema-bias-correction --mode budget_zmax --quorum 1.0
  --warm-start imitation --warm-start-target past_rate --warm-start-samples 18 --warm-start-horizon 256
  --warm-start-steps 600 --population 8 --sigma0 0.03 --covariance diagonal --text-samples 3 --retrieval-samples 3
  --heldout-text 12 --heldout-retrieval 6 --calibration-samples 2 --seed 0 --workers 2 --threads 1)

if run bench-smollm2; then  # issues 2/5: speed vs llama-cpp-python and recompute, evict_chunk, flash, memory
  pymemory bench --model smollm2-135m-instruct --suite speed,recompute,evict_chunk,flash,memory \
    --caches 256,512,1024,2048 --rounds 3 --tokens 64 --json $out/bench_smollm2.json --md $out/bench_smollm2.md
fi
if run bench-qwen; then     # the same comparison on a second architecture
  pymemory bench --model qwen2.5-coder-0.5b-instruct --suite speed,recompute --caches 256,1024 --rounds 3 \
    --tokens 48 --json $out/bench_qwen.json --md $out/bench_qwen.md
fi
if run attention; then      # issue 4: h2o / namm overhead vs sink at 1K and 4K, decode and prefill
  pymemory bench --model smollm2-135m-instruct --suite attention --attention-caches 1024,4096 --rounds 3 \
    --tokens 512 --json $out/bench_attention_smollm2.json --md $out/bench_attention_smollm2.md
fi
if run attention-shipped; then  # issue 13: the same with the shipped NAMM (every 32 tokens, budget mode), scoring
  # all 30 layers (as trained), 10 or 5 of them (namm_layers), and 5 layers every 128 tokens
  # paired rounds: every engine continues its stream 128 tokens per round (a multiple of 32 and 128)
  pymemory bench --model smollm2-135m-instruct --suite attention --attention-caches 1024 --rounds 10 --tokens 128 \
    --prefill-rounds 5 --namm smollm2 --namm-variant none --namm-variant namm_layers=10 --namm-variant namm_layers=5 \
    --namm-variant namm_layers=5,namm_delay=128 \
    --json $out/bench_attention_shipped_namm.json --md $out/bench_attention_shipped_namm.md
fi
if run attention-rate; then  # issue 10: what smollm2-rate costs as deployed (budget_zmax, every 16 tokens, corrected
  # 0.998 average) beside every 32 tokens (as trained), the shipped smollm2 (budget) and the cheap deployment; ~15 min
  pymemory bench --model smollm2-135m-instruct --suite attention --attention-caches 1024 --rounds 10 --tokens 128 \
    --prefill-rounds 5 --namm smollm2-rate --namm-variant none --namm-variant namm_delay=32 --namm-variant namm_path=smollm2 \
    --namm-variant namm_layers=5,namm_delay=128 \
    --json $out/bench_attention_rate_namm.json --md $out/bench_attention_rate_namm.md
fi
if run attention-keys; then  # issue 10: what a key weight costs: smollm2-rate as shipped beside namm_key_weight=0.5
  # (one more graph split per layer for the keys before RoPE), sink and h2o; ~10 minutes
  pymemory bench --model smollm2-135m-instruct --suite attention --attention-caches 1024 --rounds 10 --tokens 128 \
    --prefill-rounds 5 --namm smollm2-rate --namm-variant none --namm-variant namm_key_weight=0.5 \
    --json $out/bench_attention_keys.json --md $out/bench_attention_keys.md
fi
if run attention-positions; then  # issue 13: h2o and the cheap NAMM deployment as users run them (absolute
  # positions, compacted only before the training context: no K-shift) beside h2o re-indexed like sink; ~10 minutes
  pymemory bench --model smollm2-135m-instruct --suite attention --attention-caches 1024 --rounds 10 --tokens 128 \
    --prefill-rounds 5 --namm smollm2 --namm-variant namm_layers=5,namm_delay=128 \
    --json $out/bench_attention_positions.json --md $out/bench_attention_positions.md
fi
if run attention-shipped-4k; then  # the shipped NAMM at a 4K cache: every 32 tokens over 30 layers is ~100 ms per
  # token here, so only the cheaper deployments (5 layers, every 256 or 512 tokens); ~20 minutes
  pymemory bench --model smollm2-135m-instruct --suite attention --attention-caches 4096 --rounds 6 --tokens 512 \
    --prefill-rounds 4 --namm smollm2 --namm-variant namm_layers=5,namm_delay=256 \
    --namm-variant namm_layers=5,namm_delay=512 \
    --json $out/bench_attention_shipped_namm_4k.json --md $out/bench_attention_shipped_namm_4k.md
fi
if run attention-deployments; then  # issue 13: the cost table at 1K and 4K, at the current code, as users run them
  # (absolute positions; h2o re-indexed beside it), with more paired rounds than the steps above: ~35 minutes
  pymemory bench --model smollm2-135m-instruct --suite attention --attention-caches 1024 --rounds 20 --tokens 128 \
    --prefill-rounds 10 --namm smollm2 --namm-variant namm_layers=5,namm_delay=128 \
    --json $out/bench_attention_deployments_1k.json --md $out/bench_attention_deployments_1k.md
  pymemory bench --model smollm2-135m-instruct --suite attention --attention-caches 4096 --rounds 8 --tokens 512 \
    --prefill-rounds 4 --namm smollm2 --namm-variant namm_layers=5,namm_delay=512 \
    --json $out/bench_attention_deployments_4k.json --md $out/bench_attention_deployments_4k.md
fi
if run ppl-attention-deployments; then  # issue 13: what the cheaper NAMM deployments timed above keep in quality,
  # streaming one novel through the caches of the cost tables (1K: 20,000 tokens; 4K: 16,000), 16 tokens per
  # decode, past SmolLM2's 8,192-token training context (~50 minutes on 2 cores)
  pymemory eval ppl --model smollm2-135m-instruct --text austen:prideprejudice --max-tokens 20000 --chunk 16 \
    --policy sink:4+1020 --policy h2o:4+1020 --policy tova:4+1020 \
    --policy namm:4+1020,namm_path=smollm2,namm_mode=budget \
    --policy namm:4+1020,namm_path=smollm2,namm_mode=budget,namm_layers=5 \
    --policy namm:4+1020,namm_path=smollm2,namm_mode=budget,namm_layers=5,namm_delay=128 \
    --json $out/ppl_attention_1k.json --md $out/ppl_attention_1k.md --plot $out/ppl_attention_1k.png
  pymemory eval ppl --model smollm2-135m-instruct --text austen:prideprejudice --max-tokens 16000 --chunk 16 \
    --policy sink:4+4092 --policy h2o:4+4092 \
    --policy namm:4+4092,namm_path=smollm2,namm_mode=budget,namm_layers=5,namm_delay=256 \
    --policy namm:4+4092,namm_path=smollm2,namm_mode=budget,namm_layers=5,namm_delay=512 \
    --json $out/ppl_attention_4k.json --md $out/ppl_attention_4k.md --plot $out/ppl_attention_4k.png
fi
if run namm-layers; then    # issue 13: what scoring fewer layers costs in quality (shipped SmolLM2 NAMM, held out)
  python tools/eval_trained_namm.py --run runs/smollm2 --namm pymemory/data/namm/smollm2-evolved.gguf \
    --out $out/namm_layers_smollm2 --text 12 --retrieval 6 --workers 2 --quants '' --skip-warm-start --no-reproduce \
    --layer-subsets 10,5
fi
if run namm-scorer; then    # issue 3: scorer time per invocation, 512 to 32K cached tokens, per weight type
  python tools/bench_namm_scorer.py --out $out/namm_scorer
fi
if run long-run; then       # issue 2: peak RSS over 100,000 tokens vs the first 10,000
  pymemory bench --model smollm2-135m-instruct --n-sink 4 --window 252 --long-run 100000 \
    --json $out/long_run_smollm2.json --md $out/long_run_smollm2.md
fi
if run soak-1m; then        # issue 11: 1,000,000 tokens through one process at flat RSS (prose fed 63 at a time
  # between sampled tokens: the same feed/evict/K-shift/sample paths at prefill speed; about 2 hours on 2 cores)
  pymemory bench --model smollm2-135m-instruct --n-sink 4 --window 252 --long-run 1000000 --long-run-chunk 63 \
    --json $out/soak_1m_smollm2.json --md $out/soak_1m_smollm2.md
fi
if run fidelity; then       # issue 11: the fidelity numbers only the tests measure (re-indexing KL, scorer agreement)
  PYMEMORY_MEASUREMENTS=$out/fidelity.json python -m pytest -q -p no:cacheprovider tests/test_engine.py \
    tests/test_namm_scorer.py tests/test_namm_policy.py \
    -k "reindexed or fresh_decode or f32_gguf or keep_decisions or q4_0_agreement or equal_the_reference_on_captured"
fi
if run passkey; then        # issues 4/5: accuracy vs needle distance and cache size; what h2o keeps of the key
  pymemory eval passkey --model smollm2-135m-instruct --policy sink --policy h2o --policy h2o,h2o_recent=32 \
    --caches 256,512,1024 --distances 100,200,400,800,1600 --samples 5 --json $out/passkey_smollm2.json \
    --md $out/passkey_smollm2.md --plot $out/passkey_smollm2.png
fi
if run streameval; then     # issue 5: StreamEval-style retrieval (Qwen can read the records; SmolLM2 mostly not)
  pymemory eval streameval --model qwen2.5-coder-0.5b-instruct --policy sink --caches 256,512,1024 \
    --distances 5,10,20,40,80 --lines 120 --json $out/streameval_qwen.json --md $out/streameval_qwen.md \
    --plot $out/streameval_qwen.png
  pymemory eval streameval --model smollm2-135m-instruct --policy sink --caches 256,1024 \
    --distances 5,10,20,40 --lines 120 --json $out/streameval_smollm2.json --md $out/streameval_smollm2.md \
    --plot $out/streameval_smollm2.png
fi
if run ppl-smollm2; then    # Table 1 phenomenon + Table 2 sink ablation on SmolLM2 (20,000 tokens of one novel)
  pymemory eval ppl --model smollm2-135m-instruct --text austen:prideprejudice --max-tokens 20000 \
    --policy sink:4+252,evict_chunk=1 --policy window:0+256,evict_chunk=1 --policy recompute:0+256,chunk=32 \
    --policy context_shift:4+252 \
    --json $out/ppl_smollm2.json --md $out/ppl_smollm2.md --plot $out/ppl_smollm2.png
  pymemory eval ppl --model smollm2-135m-instruct --text austen:prideprejudice --max-tokens 20000 \
    --policy sink:0+256,evict_chunk=1 --policy sink:1+255,evict_chunk=1 --policy sink:2+254,evict_chunk=1 \
    --policy sink:4+252,evict_chunk=1 --policy sink:8+248,evict_chunk=1 \
    --json $out/sinks_smollm2.json --md $out/sinks_smollm2.md --plot $out/sinks_smollm2.png
fi
if run ppl-gemma; then      # the same on Gemma-3 (sliding-window cache; BOS added, as it needs)
  pymemory eval ppl --model gemma-3-270m --text austen:prideprejudice --max-tokens 20000 \
    --policy sink:4+252,evict_chunk=1 --policy window:0+256,evict_chunk=1 --policy recompute:0+256,chunk=32 \
    --json $out/ppl_gemma.json --md $out/ppl_gemma.md --plot $out/ppl_gemma.png
fi
if run ppl-qwen; then
  pymemory eval ppl --model qwen2.5-coder-0.5b-instruct --text austen:prideprejudice --max-tokens 20000 \
    --policy sink:4+252,evict_chunk=1 --policy window:0+256,evict_chunk=1 --policy recompute:0+256,chunk=64 \
    --json $out/ppl_qwen.json --md $out/ppl_qwen.md --plot $out/ppl_qwen.png
fi
if run sinks-gemma-qwen; then  # Table 2 shape on the other two models (Gemma 6,000 tokens, Qwen 3,000: 4x slower)
  for m in gemma-3-270m:6000 qwen2.5-coder-0.5b-instruct:3000; do
    n=${m#*:}; m=${m%%:*}
    pymemory eval ppl --model $m --text austen:prideprejudice --max-tokens $n \
      --policy sink:0+256,evict_chunk=1 --policy sink:1+255,evict_chunk=1 --policy sink:2+254,evict_chunk=1 \
      --policy sink:4+252,evict_chunk=1 --policy sink:8+248,evict_chunk=1 \
      --json $out/sinks_${m%%-*}.json --md $out/sinks_${m%%-*}.md --plot $out/sinks_${m%%-*}.png
  done
fi
if run long-stream; then    # issue 2 acceptance run: 50,000 tokens per model (about 70 minutes)
  PYMEMORY_STREAM_TOKENS=50000 python -m pytest -q -s tests/test_long_stream.py 2>&1 \
    | grep -v "^.load\|llama_kv" | tee $out/long_stream_50k.txt
fi
if run long-tests; then     # issue 4 acceptance runs: 20,000 tokens with namm (quorum, budget) and h2o
  PYMEMORY_STREAM_TOKENS=20000 python -m pytest -q -s tests/test_namm_policy.py tests/test_attention_policies.py \
    -k long_generation 2>&1 | tee $out/attention_20k.txt
fi
if run namm-agreement; then  # issue 4: shared-cell modes vs the per-(layer, head) keep sets, on real decoding
  python tools/namm_agreement.py --out $out/namm_agreement
fi
if run evict-chunk-ppl; then  # what the default evict_chunk (window/16) costs in quality at cache 1024
  pymemory eval ppl --model smollm2-135m-instruct --text austen:prideprejudice --max-tokens 8000 \
    --policy sink:4+1020,evict_chunk=1 --policy sink:4+1020,evict_chunk=16 --policy sink:4+1020,evict_chunk=63 \
    --policy sink:4+1020,evict_chunk=256 --json $out/evict_chunk_ppl_smollm2.json --md $out/evict_chunk_ppl_smollm2.md
fi
if run ppl-gemma-attention; then  # issue 13: h2o and the shipped NAMM on Gemma-3's sliding-window cache, then sink
  # and window at the same 16 tokens per decode (about 12 minutes per 20,000-token stream on 1 core)
  pymemory eval ppl --model gemma-3-270m --text austen:prideprejudice --max-tokens 20000 --chunk 16 --threads 1 \
    --policy h2o:4+252 --policy namm:4+252,namm_path=smollm2,namm_mode=budget \
    --json $out/ppl_gemma_attention.json --md $out/ppl_gemma_attention.md --plot $out/ppl_gemma_attention.png
  pymemory eval ppl --model gemma-3-270m --text austen:prideprejudice --max-tokens 20000 --chunk 16 --threads 1 \
    --policy sink:4+252 --policy window:0+256 \
    --json $out/ppl_gemma_chunk16.json --md $out/ppl_gemma_chunk16.md --plot $out/ppl_gemma_chunk16.png
fi
if run ppl-gemma-bos; then  # Gemma needs BOS: the recompute baseline with BOS kept in every rebuilt cache
  pymemory eval ppl --model gemma-3-270m --text austen:prideprejudice --max-tokens 20000 \
    --policy recompute:1+255,chunk=32 --json $out/ppl_gemma_bos.json --md $out/ppl_gemma_bos.md
fi
if run train-namm-smollm2; then  # issue 10: the shipped SmolLM2 NAMM (resumable: rerun to continue; GENERATIONS=N)
  pymemory train-namm --model smollm2-135m-instruct --out runs/smollm2 \
    --data austen,passkey,kv --sample-tokens 512 --cache-fraction 0.25 --namm-delay 32 --scored-tokens 256 \
    --mode budget --population 8 --sigma0 0.065 --covariance diagonal --text-samples 1 --retrieval-samples 1 \
    --heldout-every 5 --heldout-text 6 --heldout-retrieval 6 --calibration-samples 2 --generations "${GENERATIONS:-300}" \
    --workers 2 --threads 1 --seed 0
  python tools/ship_namm.py --run runs/smollm2 --name smollm2-evolved  # shipped as smollm2 until the pooled one
fi
if run namm-trained-eval; then  # issue 10: the first shipped NAMM (now smollm2-evolved) vs every policy on held-out data; transfer to Qwen (needs runs/smollm2 from train-namm-smollm2)
  python tools/eval_trained_namm.py --run runs/smollm2 --namm pymemory/data/namm/smollm2-evolved.gguf \
    --out $out/namm_trained_smollm2 --text 8 --retrieval 8 --transfer-model qwen2.5-coder-0.5b-instruct \
    --transfer-samples 4 --workers 2
fi
if run train-namm-smollm2-warm; then  # issue 10 experiment: imitation warm start, then CMA-ES around it (not shipped:
  # on the independent test set it did not beat the shipped NAMM; docs/results.md section 5). Resumable.
  pymemory train-namm --model smollm2-135m-instruct --out runs/smollm2-warm \
    --data austen,passkey,kv --sample-tokens 512 --cache-fraction 0.25 --namm-delay 32 --scored-tokens 256 \
    --mode budget --population 8 --sigma0 0.03 --covariance diagonal --text-samples 2 --retrieval-samples 1 \
    --heldout-every 5 --heldout-text 6 --heldout-retrieval 6 --calibration-samples 2 --generations "${GENERATIONS:-25}" \
    --warm-start imitation --warm-start-target per_head --warm-start-samples 9 --warm-start-horizon 256 \
    --warm-start-steps 600 --workers 2 --threads 1 --seed 0
  cp runs/smollm2-warm/log.json $out/namm_training_smollm2_warm.json
  cp runs/smollm2-warm/curve.png $out/namm_training_smollm2_warm.png
fi
if run namm-warm-eval; then  # the warm-started run's NAMM beside its warm start, the shipped NAMM and every policy
  python tools/eval_trained_namm.py --run runs/smollm2-warm --namm runs/smollm2-warm/namm.gguf \
    --out $out/namm_warm_smollm2 --text 8 --retrieval 8 --transfer-model qwen2.5-coder-0.5b-instruct \
    --transfer-samples 4 --workers 2 --also "NAMM evolved from zero (runs/smollm2)=pymemory/data/namm/smollm2-evolved.gguf"
fi
if run train-namm-qwen; then  # issue 10: the first Qwen2.5 NAMM (per-head warm start + 3 generations; resumable),
  # shipped as qwen2.5 until the pooled one (train-namm-qwen-pooled), now qwen2.5-per-head
  pymemory train-namm --model qwen2.5-coder-0.5b-instruct --out runs/qwen-warm \
    --data austen,passkey,kv --sample-tokens 512 --cache-fraction 0.25 --namm-delay 32 --scored-tokens 256 \
    --mode budget --population 8 --sigma0 0.03 --covariance diagonal --text-samples 2 --retrieval-samples 1 \
    --heldout-every 3 --heldout-text 6 --heldout-retrieval 6 --calibration-samples 2 --generations "${GENERATIONS:-3}" \
    --warm-start imitation --warm-start-target per_head --warm-start-samples 9 --warm-start-horizon 256 \
    --warm-start-steps 600 --workers 2 --threads 1 --seed 0
  python tools/ship_namm.py --run runs/qwen-warm --name qwen2.5-per-head
fi
if run namm-retrieval-probe; then  # issue 10: which attention signals single out a pass key, and the warm start's
  # question target against its future target on held-out text and passkeys (about 25 minutes)
  python tools/namm_retrieval_probe.py --out $out/namm_retrieval_probe
fi
if run namm-warm-targets; then  # issue 10: the warm start's per-head and pooled targets fitted on one capture, side
  # by side on 16 held-out texts and 8 retrievals at 25 % and 50 % (about 35 minutes)
  python tools/namm_warm_targets.py --out $out/namm_warm_targets
fi
if run train-namm-smollm2-pooled; then  # issue 10: the pooled warm start, then CMA-ES around it (resumable)
  pymemory train-namm --model smollm2-135m-instruct --out runs/smollm2-pooled \
    --data austen,passkey,kv --sample-tokens 512 --scored-tokens 256 --cache-fraction 0.25 --n-sink 4 --namm-delay 32 \
    --mode budget --quorum 1.0 --warm-start imitation --warm-start-target pooled --warm-start-samples 18 \
    --warm-start-horizon 256 --warm-start-steps 600 --population 8 --sigma0 0.03 --covariance diagonal \
    --generations "${GENERATIONS:-6}" --text-samples 2 --retrieval-samples 1 --heldout-every 3 --heldout-text 12 \
    --heldout-retrieval 6 --calibration-samples 2 --seed 0 --workers 2 --threads 1
  python tools/ship_namm.py --run runs/smollm2-pooled --name smollm2  # the shipped SmolLM2 NAMM: generation 0 won
fi
if run train-namm-smollm2-rate; then  # issue 10: the past-rate warm start (each pair's attention rate since arrival,
  # read from a bias-corrected 0.998 moving average, ranked by budget_zmax), then CMA-ES around it on 3 texts and 3
  # retrievals per generation (resumable; about 30 minutes)
  pymemory train-namm --model smollm2-135m-instruct --out runs/smollm2-rate "${rate_recipe[@]}" \
    --generations "${GENERATIONS:-4}" --heldout-every 2
fi
if run train-namm-smollm2-rate50; then  # issue 10: the past-rate recipe evolved at 50 % of the sample, where
  # hindsight of future attention closes 78 % of sink's text gap and the causal rule 51 % (namm-aggregation-bound):
  # room that evolution could take; 6 texts + 2 retrievals per generation (resumable; about 35 minutes)
  pymemory train-namm --model smollm2-135m-instruct --out runs/smollm2-rate50 "${rate_recipe[@]}" \
    --cache-fraction 0.5 --text-samples 6 --retrieval-samples 2 --generations "${GENERATIONS:-8}" --heldout-every 2
fi
if run namm-rate50-eval; then  # issue 10: train-namm-smollm2-rate50 vs smollm2-rate and every policy at 50 % on the
  # 48 texts of namm-rate-text48 and 8 retrievals (about 25 minutes)
  python tools/eval_trained_namm.py --run runs/smollm2-rate50 --namm runs/smollm2-rate50/namm.gguf \
    --out $out/namm_rate50_smollm2 --text 48 --retrieval 8 --fractions 0.5 --quants '' --skip-warm-start \
    --no-reproduce --also "smollm2-rate (evolved at 25 %)=pymemory/data/namm/smollm2-rate.gguf" --workers 2
fi
if run namm-pooled-eval; then  # issue 10: the shipped SmolLM2 NAMM (pooled warm start) vs every policy on 16 + 8
  # held-out samples at 25 % and 50 %, beside the first shipped NAMM; zero-shot on Qwen (about 25 minutes)
  python tools/eval_trained_namm.py --run runs/smollm2-pooled --namm runs/smollm2-pooled/namm.gguf \
    --out $out/namm_pooled_smollm2 --text 16 --retrieval 8 --quants '' --skip-warm-start \
    --also "shipped NAMM (evolved from zero)=pymemory/data/namm/smollm2-evolved.gguf" \
    --transfer-model qwen2.5-coder-0.5b-instruct --transfer-samples 4 --workers 2
fi
if run namm-rate-eval; then  # issue 10: the past-rate SmolLM2 NAMM (train-namm-smollm2-rate) vs every policy on 12
  # texts + 16 retrievals at 25 % and 50 %, beside the shipped smollm2; q8_0; zero-shot on Qwen (about 35 minutes)
  python tools/eval_trained_namm.py --run runs/smollm2-rate --namm runs/smollm2-rate/namm.gguf \
    --out $out/namm_rate_smollm2 --text 12 --retrieval 16 --quants q8_0 \
    --also "shipped NAMM (smollm2)=pymemory/data/namm/smollm2.gguf" \
    --transfer-model qwen2.5-coder-0.5b-instruct --transfer-samples 4 --workers 2
fi
if run namm-rate-layers; then  # issue 10: what smollm2-rate keeps when it scores 5, 10 or 15 of the 30 layers (the cheap
  # deployment of bench_attention_rate_namm.md: 5) on namm-rate-eval's test set at 25 % and 50 % (about 20 minutes)
  python tools/eval_trained_namm.py --run runs/smollm2-rate --namm pymemory/data/namm/smollm2-rate.gguf \
    --out $out/namm_rate_layers_smollm2 --text 12 --retrieval 16 --quants '' --skip-warm-start --no-reproduce \
    --layer-subsets 5,10,15 --workers 2
fi
if run namm-rate-text48; then  # issue 10: does smollm2-rate close half of sink's text gap? 48 held-out texts (the
  # first 12 are namm-rate-eval's) at 25 % and 50 %, beside smollm2; no retrieval (about 25 minutes)
  python tools/eval_trained_namm.py --run runs/smollm2-rate --namm pymemory/data/namm/smollm2-rate.gguf \
    --out $out/namm_rate_smollm2_text48 --text 48 --retrieval 0 --quants '' --skip-warm-start --no-reproduce \
    --also "shipped NAMM (smollm2)=pymemory/data/namm/smollm2.gguf" --workers 2
fi
if run namm-rate-1024; then  # issue 10: smollm2-rate (trained on 512-token samples) on 1,024-token held-out samples
  # against every policy at 25 % and 50 %: does the share of sink's text gap closed hold on longer context? (~25 min)
  python tools/eval_trained_namm.py --run runs/smollm2-rate --namm pymemory/data/namm/smollm2-rate.gguf \
    --out $out/namm_rate_smollm2_1024 --text 24 --retrieval 8 --quants '' --skip-warm-start --no-reproduce \
    --sample-tokens 1024 --workers 2
fi
if run namm-rate-1024-text48; then  # issue 10: is half of sink's text gap closed at 50 % on 1,024-token samples? 48
  # texts (the first 24 are namm-rate-1024's) at 512 of 1,024 cells, no retrieval (about 25 minutes)
  python tools/eval_trained_namm.py --run runs/smollm2-rate --namm pymemory/data/namm/smollm2-rate.gguf \
    --out $out/namm_rate_smollm2_1024_text48 --text 48 --retrieval 0 --fractions 0.5 --quants '' --skip-warm-start \
    --no-reproduce --sample-tokens 1024 --workers 2
fi
if run namm-rate-1024-fresh; then  # issue 10: a fresh test of the shipped smollm2-rate on 1,024-token samples (seed 2,
  # never used before), large enough to decide half of sink's text gap at 95 %: 144 texts at 256 and 512 of 1,024
  # cells against sink and the full cache only (h2o, tova and a random NAMM: namm-rate-1024) (about 50 minutes)
  python tools/eval_trained_namm.py --run smollm2-rate --out $out/namm_rate_smollm2_1024_fresh --text 144 \
    --retrieval 0 --quants '' --no-reproduce --sample-tokens 1024 --baselines '' --test-seed 2 --workers 2
  # samples drawn from overlapping stretches of a novel are resampled together (eval's own intervals predate that)
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_1024_fresh $out/namm_rate_smollm2_1024_fresh.json
fi
if run namm-qwen-rate-1024; then  # issue 10: the shipped qwen2.5-rate (trained on 512-token samples) on 1,024-token
  # held-out samples: does the share of sink's gap closed on Qwen2.5 grow with context as SmolLM2's did? 16 texts + 8
  # retrievals at 256 and 512 of 1,024 cells, beside sink (about 25 minutes)
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_rate_qwen_1024 --text 16 --retrieval 8 \
    --quants '' --no-reproduce --sample-tokens 1024 --baselines '' --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_qwen_1024 $out/namm_rate_qwen_1024.json
fi
if run kv-layout-check; then  # does llama.cpp's output depend on the physical order of a cache's cells (the same
  # tokens, positions and K/V bytes after an eviction and after a state restore)? Seconds
  python tools/kv_layout_check.py --out $out/kv_layout_check
fi
if run namm-oracle-bound; then  # issue 10: what a hindsight oracle of future attention closes on the NAMM test set,
  # beside sink, h2o, tova and the shipped NAMM (about 15 minutes)
  python tools/namm_oracle_bound.py --namm smollm2 --out $out/namm_oracle_bound --text 8 --retrieval 8 --workers 2
fi
if run namm-aggregation-probe; then  # issue 10: aggregations over (layer, KV head) of the attention received so far
  # (h2o's sum, mean/max/top-k of per-pair rates, a per-pair quota) on the NAMM test set: can one head save a needle?
  # (about 20 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2 --out $out/namm_aggregation_probe --text 8 --retrieval 16
fi
if run namm-aggregation-recent; then  # issue 10: the same probe's per-pair maximum over every query since a token
  # arrived vs over the last 128 only (what the NAMM's spectrogram average sees) (about 12 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2 --out $out/namm_aggregation_recent --text 8 --retrieval 16 \
    --rules "top-1 of pairs (max),top-1 of pairs over the last 128 queries"
fi
if run namm-aggregation-ema; then  # issue 10: the per-pair maximum of a moving average of attention as the NAMM's
  # spectrogram state keeps it (from zero) vs bias-corrected (a recency-weighted rate), beside the rate since arrival
  # (about 25 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2 --out $out/namm_aggregation_ema --text 8 --retrieval 16 \
    --rules "top-1 of pairs (max),top-1 of pairs: EMA 0.998 from zero,top-1 of pairs: EMA 0.998 bias-corrected,top-1 of pairs: EMA 0.99 bias-corrected,z-max of pairs: EMA 0.998 bias-corrected"
fi
if run namm-aggregation-bound; then  # issue 10: what the best causal rules (variants of budget_zmax's per-pair
  # standardised maximum of the corrected 0.998 average) and hindsight of future attention under each aggregation
  # close of sink's text gap on smollm2-rate's test set: is half at 25 % / 50 % within reach? (about 30 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_aggregation_bound --text 12 --retrieval 0 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected,z-top-3 of pairs: EMA 0.998 bias-corrected,z-top-9 of pairs: EMA 0.998 bias-corrected,z-mean of pairs: EMA 0.998 bias-corrected,z-max of pairs: EMA 0.995 bias-corrected,z-max of pairs: EMA 0.999 bias-corrected,z-max of pairs: rate since arrival,z-max of pairs: EMA 0.998 bias-corrected + newest 32 kept,z-max of pairs: EMA 0.998 bias-corrected + newest 64 kept,hindsight: sum over pairs of all future attention,hindsight: top-1 of pairs of the future rate,hindsight: z-max of pairs of the future rate"
fi
if run namm-value-bound; then  # issue 10: do values lift attention-ranked eviction? budget_zmax's rule and hindsight
  # of future attention beside the same rules weighted by value norms or reading the output displacement
  # a_qk ||v_k - o_q|| (kvpress/VATP/CAOTE's extra input) on namm-aggregation-bound's 12 texts (about 12 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_value_bound --text 12 --retrieval 0 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected,z-max of pairs: EMA 0.998 bias-corrected x value norm,z-max of pairs: EMA 0.998 bias-corrected of the output displacement,hindsight: sum over pairs of all future attention,hindsight: z-max of pairs of the future rate,hindsight: sum over pairs of future attention x value norm,hindsight: z-max of pairs of the future rate x value norm,hindsight: sum over pairs of the future output displacement,hindsight: z-max of pairs of the future output displacement"
fi
if run namm-bound-1024; then  # issue 10: is half of sink's text gap at 25 % within reach of attention-ranked eviction
  # with shared cells on 1,024-token samples (where smollm2-rate closes 43.5 %, namm-rate-1024-fresh)? budget_zmax's
  # causal rule and hindsight of future attention, 24 fresh texts (seed 2) (about 35 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_bound_1024 --text 24 --retrieval 0 \
    --sample-tokens 1024 --test-seed 2 --fractions 0.25 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected,hindsight: sum over pairs of all future attention,hindsight: top-1 of pairs of the future rate,hindsight: z-max of pairs of the future rate,hindsight: z-max of pairs of the future rate x value norm"
fi
if run namm-future-1024; then  # issue 10: half at 25 % needs a causal predictor of summed future attention
  # (namm-bound-1024): learned predictors from attention-so-far features (fitted on 8 training-split texts) and
  # simulated future queries (recent queries moved to future positions) against budget_zmax's rule and hindsight, on
  # the first 16 of namm-bound-1024's texts (about 35 minutes)
  python tools/namm_future_probe.py --namm smollm2-rate --out $out/namm_future_1024 --fit-text 8 --text 16 \
    --sample-tokens 1024 --test-seed 2 --fraction 0.25 --horizon 256
fi
if run namm-pair-offsets; then  # issue 10: budget_zmax's pairs are equal voices; an offset per (layer, KV head) (or
  # per layer), fitted by CMA-ES on 12 training-split texts to the future attention the evicted tokens lose, on
  # namm-bound-1024's 24 texts at 25 % beside the rule, sink and the hindsight sum (about 45 minutes)
  python tools/namm_pair_offsets_probe.py --namm smollm2-rate --out $out/namm_pair_offsets --fit-text 12 --text 24 \
    --sample-tokens 1024 --test-seed 2 --fraction 0.25 --generations 150 --hindsight
fi
if run namm-neighbour-pooling; then  # issue 10: budget_zmax's scores pooled over neighbouring cached tokens (SnapKV
  # pools so), and its protected recent window, on namm-bound-1024's 24 texts at 25 % (about 25 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_neighbour_pooling --text 24 \
    --retrieval 0 --sample-tokens 1024 --test-seed 2 --fractions 0.25 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected,z-max of pairs: EMA 0.998 bias-corrected; max over ±1 cached neighbours,z-max of pairs: EMA 0.998 bias-corrected; max over ±3 cached neighbours,z-max of pairs: EMA 0.998 bias-corrected; each pair's z averaged over ±2 cached neighbours,z-max of pairs: EMA 0.998 bias-corrected + newest 32 kept"
fi
if run namm-key-rules; then  # issue 10: what attention cannot see, from the keys: KeyDiff's distinctiveness (a key
  # unlike the cached keys' mean direction is kept) added to budget_zmax's rule, and a penalty for tokens a better-
  # ranked one duplicates (key and value), on namm-bound-1024's 24 texts at 25 % (about 40 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_key_rules --text 24 \
    --retrieval 0 --sample-tokens 1024 --test-seed 2 --fractions 0.25 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z,z-max of pairs: EMA 0.998 bias-corrected + 1 x KeyDiff z,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE,z-max of pairs: each pair's EMA 0.998 bias-corrected z + 0.5 x its KeyDiff z,z-max of pairs: EMA 0.998 bias-corrected - 0.25 x duplicate z"
fi
if run namm-surprisal-rules; then  # issue 10: a signal beside attention and keys, each token's surprisal (its NLL in
  # context: Selective Context's and LLMLingua's pruning signal) added to budget_zmax's keyed rule, on namm-bound-1024's
  # 24 texts at 25 % (about 35 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_surprisal_rules --text 24 \
    --retrieval 0 --sample-tokens 1024 --test-seed 2 --fractions 0.25 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x surprisal z,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE + 0.25 x surprisal z,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE + 0.5 x surprisal z,surprisal: each token's own NLL in context (Selective Context's self-information)"
fi
if run namm-surprisal-negative; then  # issue 10: the other sign: tokens the model predicted well kept first (a
  # surprising token evicted first), beside the keyed rule, namm-surprisal-rules' 24 texts (about 20 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_surprisal_negative --text 24 \
    --retrieval 0 --sample-tokens 1024 --test-seed 2 --fractions 0.25 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE - 0.25 x surprisal z,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE - 0.5 x surprisal z"
fi
if run namm-separator-rules; then  # issue 10: SepLLM's observation that a model packs each segment into its separators
  # (punctuation, line breaks): a bonus for them on top of the keyed rule, namm-surprisal-rules' 24 texts (about 20
  # minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_separator_rules --text 24 \
    --retrieval 0 --sample-tokens 1024 --test-seed 2 --fractions 0.25 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE + 0.5 for separators,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE + 1 for separators"
fi
if run namm-value-distinct; then  # issue 10: more of what the keys gave: the values' distinctiveness (KeyDiff's score on
  # the values) beside the keyed rule, and the keys' distinctiveness aggregated as attention is (each pair
  # standardised, the highest), namm-surprisal-rules' 24 texts (about 25 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_value_distinct --text 24 \
    --retrieval 0 --sample-tokens 1024 --test-seed 2 --fractions 0.25 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE + 0.5 x ValueDiff z,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE + 0.25 x ValueDiff z,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x z-max of pairs of KeyDiff of the keys before RoPE"
fi
if run namm-rarity-rules; then  # issue 10: namm-gap-anatomy's finding that words last seen out of sink's window carry
  # half its gap: a token rare among the cached ones (few copies of its id) ranked up beside the keyed rule, or a
  # word's last cached copy kept first, namm-surprisal-rules' 24 texts (about 20 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_rarity_rules --text 24 \
    --retrieval 0 --sample-tokens 1024 --test-seed 2 --fractions 0.25 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE + 0.25 x rarity z,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE + 0.5 x rarity z,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE + 0.5 for a last copy"
fi
if run namm-gap-anatomy; then  # issue 10: where smollm2-keys loses text at 25 % of 1,024 tokens: sink's gap and the
  # share the NAMM closes per kind of token (far and near repeats, words last seen out of sink's window, new), on
  # namm-bound-1024's 24 texts, one token per decode (about 15 minutes)
  python tools/namm_gap_anatomy.py --namm smollm2-keys --out $out/namm_gap_anatomy --text 24 --sample-tokens 1024 \
    --test-seed 2 --fraction 0.25
fi
if run namm-qwen-gap-anatomy; then  # issue 10: the same on Qwen2.5, where qwen2.5-keys closes half at 25 %: the first 24
  # texts of namm-qwen-decode-1024 (seed 2), one token per decode (about 20 minutes)
  python tools/namm_gap_anatomy.py --namm qwen2.5-keys --test-namm qwen2.5-rate --out $out/namm_qwen_gap_anatomy \
    --text 24 --sample-tokens 1024 --test-seed 2 --fraction 0.25
fi
keys_decode() {  # $1 report, $2 texts, $3 cache fraction: smollm2-keys (smollm2-rate with key weight 0.5, the file
  # `convert-namm pymemory/data/namm/smollm2-rate.gguf --deploy-key-weight 0.5` writes) beside smollm2-rate as shipped,
  # one token per decode, on namm-decode-1024-96's texts of 1,024 tokens (seed 2) + 16 retrievals
  python tools/eval_trained_namm.py --run smollm2-rate --out $out/$1 --text $2 --retrieval 16 \
    --also "key weight 0.5=pymemory/data/namm/smollm2-keys.gguf" --fractions $3 --quants '' --no-reproduce \
    --sample-tokens 1024 --baselines '' --test-seed 2 --score-chunk 1 --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_${1#namm_} $out/$1.json \
    --versus "trained NAMM (f32)"
}
if run namm-keys-decode; then  # issue 10: namm-key-rules' best rule (KeyDiff on the keys before RoPE added to
  # budget_zmax's ranking) in the deployed NAMM, at 25 %, 96 texts (about 45 minutes)
  keys_decode namm_keys_decode 96 0.25
fi
if run namm-keys-decode-50; then  # issue 10: the same at 50 % (512 of 1,024 cells), the first 48 texts: what the key
  # weight does where the rule already closes half (about 30 minutes)
  keys_decode namm_keys_decode_50 48 0.5
fi
if run namm-qwen-keys-answers; then  # issue 10: the key weight on Qwen2.5, where qwen2.5-rate keeps answers only level
  # with sink: it as shipped beside a key weight of 0.5, one token per decode, on namm-qwen-answers' 8 texts + 40
  # retrievals of 512 tokens (seed 3) at 25 % and 50 % (about 30 minutes)
  mkdir -p runs
  pymemory convert-namm pymemory/data/namm/qwen2.5-rate.gguf -o runs/qwen2.5-rate-keys05.gguf --deploy-key-weight 0.5
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_qwen_keys_answers --text 8 --retrieval 40 \
    --test-seed 3 --quants '' --no-reproduce --baselines '' --score-chunk 1 --workers 2 \
    --also "key weight 0.5=runs/qwen2.5-rate-keys05.gguf"
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_qwen_keys_answers \
    $out/namm_qwen_keys_answers.json --versus "trained NAMM (f32)"
fi
if run namm-qwen-keys-vs-h2o; then  # issue 10: namm-qwen-keys-answers' key weight against namm-qwen-answers' h2o and
  # smollm2-rate on the same samples (seed 3; their sink, full-cache and qwen2.5-rate rows are identical; no model run)
  python tools/namm_closed_intervals.py --join --out $out/namm_closed_intervals_qwen_keys_vs_h2o \
    $out/namm_qwen_answers.json $out/namm_qwen_keys_answers.json --versus h2o
fi
if run namm-qwen-keys-decode-1024; then  # issue 10: Qwen2.5 at 25 % of 1,024 tokens with a key weight:
  # namm-qwen-decode-1024's 48 texts (seed 2), one token per decode, qwen2.5-rate as shipped beside a key weight of
  # 0.5 (about 45 minutes)
  mkdir -p runs
  pymemory convert-namm pymemory/data/namm/qwen2.5-rate.gguf -o runs/qwen2.5-rate-keys05.gguf --deploy-key-weight 0.5
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_qwen_keys_decode_1024 --text 48 \
    --retrieval 0 --fractions 0.25 --quants '' --no-reproduce --sample-tokens 1024 --baselines '' --test-seed 2 \
    --score-chunk 1 --also "key weight 0.5=runs/qwen2.5-rate-keys05.gguf" --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_qwen_keys_decode_1024 \
    $out/namm_qwen_keys_decode_1024.json --versus "trained NAMM (f32)"
fi
key_weight_tune() {  # $1 shipped NAMM, $2 report, then file-tag:weight pairs: it as shipped (key weight 0) beside
  # those key weights at 25 % of 1,024 tokens, one token per decode, on 24 texts of a seed no earlier report used
  # (4): a tuning set, so the weight chosen here is then tested on other texts
  mkdir -p runs
  local also=() name=$1 report=$2
  shift 2
  for name_weight in "$@"; do
    pymemory convert-namm pymemory/data/namm/$name.gguf -o runs/$name-keys${name_weight%%:*}.gguf \
      --deploy-key-weight ${name_weight#*:}
    also+=(--also "key weight ${name_weight#*:}=runs/$name-keys${name_weight%%:*}.gguf")
  done
  python tools/eval_trained_namm.py --run $name --out $out/$report --text 24 --retrieval 0 --fractions 0.25 \
    --quants '' --no-reproduce --sample-tokens 1024 --baselines '' --test-seed 4 --score-chunk 1 "${also[@]}" --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_${report#namm_} $out/$report.json \
    --versus "key weight 0.5"
}
if run namm-qwen-key-weight-tune; then  # issue 10: which key weight on Qwen2.5? (about 35 minutes)
  key_weight_tune qwen2.5-rate namm_qwen_key_weight_tune 05:0.5 1:1 2:2
fi
if run namm-smollm2-key-weight-tune; then  # issue 10: which key weight on SmolLM2, where 0.5 (smollm2-keys) kept text
  # level with none at 25 % (namm-keys-decode)? Around it, Qwen2.5's weight being sharp (about 20 minutes)
  key_weight_tune smollm2-rate namm_smollm2_key_weight_tune 025:0.25 05:0.5 1:1
fi
if run namm-qwen-keys-fresh; then  # issue 10: qwen2.5-keys (key weight 0.5, which namm-qwen-key-weight-tune kept)
  # and the NAMM evolved under that ranking (train-namm-qwen-keys) at 25 % of 1,024 tokens, one token per decode, on
  # 72 texts of a fresh seed (5); then key weight 0.5's share over these and namm-qwen-keys-decode-1024's 48 texts
  # (seed 2) as one test set of 120 (about 65 minutes)
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_qwen_keys_fresh --text 72 --retrieval 0 \
    --fractions 0.25 --quants '' --no-reproduce --sample-tokens 1024 --baselines '' --test-seed 5 --score-chunk 1 \
    --only-also --also "key weight 0.5=pymemory/data/namm/qwen2.5-keys.gguf" \
    --also "evolved with key weight 0.5=runs/qwen2.5-keys-evolved.gguf" --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_qwen_keys_fresh \
    $out/namm_qwen_keys_fresh.json --versus "key weight 0.5"
  python tools/namm_closed_intervals.py --pool --out $out/namm_closed_intervals_qwen_keys_pooled \
    $out/namm_qwen_keys_decode_1024.json $out/namm_qwen_keys_fresh.json
fi
fresh_seed_25() {  # $1 run, $2 report, $3 seed, then further eval flags: beside sink and the full cache at 25 % of
  # 1,024 tokens, one token per decode, on 72 texts of seed $3
  local run=$1 report=$2 seed=$3
  shift 3
  python tools/eval_trained_namm.py --run $run --out $out/$report --text 72 --retrieval 0 --fractions 0.25 \
    --quants '' --no-reproduce --sample-tokens 1024 --baselines '' --test-seed $seed --score-chunk 1 "$@" --workers 2
}
keys_fresh_seed() {  # $1 run, $2 its keyed NAMM, $3 report, $4 seed: the keyed NAMM alone beside sink and the full
  # cache, on a seed none of that model's reports used (about 45 minutes on Qwen2.5, 20 on SmolLM2)
  fresh_seed_25 $1 $3 $4 --only-also --also "key weight 0.5=pymemory/data/namm/$2.gguf"
}
qwen_keys_fresh_seed() {  # $1 seed
  keys_fresh_seed qwen2.5-rate qwen2.5-keys namm_qwen_keys_seed$1 $1
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_qwen_keys_seed$1 $out/namm_qwen_keys_seed$1.json
}
# issue 10: "half of sink's text gap at 25 %" was undecided on 120 texts (53.5 % [47.9, 58.7]); sized before these
# ran: 144 more texts (seeds 6 and 7) give 264, enough for a half-width of about 3.5 points; whatever the pooled
# interval says is the answer (no further texts are added after it)
if run namm-qwen-keys-seed6; then qwen_keys_fresh_seed 6; fi
if run namm-qwen-keys-seed7; then qwen_keys_fresh_seed 7; fi
if run namm-qwen-keys-pooled-264; then  # the four test sets of qwen2.5-keys (seeds 2, 5, 6, 7) as one; seconds
  python tools/namm_closed_intervals.py --pool --out $out/namm_closed_intervals_qwen_keys_pooled_264 \
    $out/namm_qwen_keys_decode_1024.json $out/namm_qwen_keys_fresh.json $out/namm_qwen_keys_seed6.json \
    $out/namm_qwen_keys_seed7.json
  # the 144 texts added (seeds 6 and 7) alone: a test no earlier look at the numbers touched
  python tools/namm_closed_intervals.py --pool --out $out/namm_closed_intervals_qwen_keys_seeds67 \
    $out/namm_qwen_keys_seed6.json $out/namm_qwen_keys_seed7.json
fi
# issue 10: SmolLM2 at 25 %: smollm2-keys closed 48.9 % on namm-keys-decode's 96 texts (seed 2), 58.9 % on the tuning
# set; sized before they ran, 144 fresh texts (seeds 5 and 6) join the 96 as one test of 240, whose verdict stands
if run namm-smollm2-keys-seed5; then keys_fresh_seed smollm2-rate smollm2-keys namm_smollm2_keys_seed5 5; fi
if run namm-smollm2-keys-seed6; then keys_fresh_seed smollm2-rate smollm2-keys namm_smollm2_keys_seed6 6; fi
if run namm-smollm2-keys-pooled-240; then  # seconds
  python tools/namm_closed_intervals.py --pool --out $out/namm_closed_intervals_smollm2_keys_pooled_240 \
    $out/namm_keys_decode.json $out/namm_smollm2_keys_seed5.json $out/namm_smollm2_keys_seed6.json
  # the 144 added texts alone, as for Qwen2.5 (the verdict is the 240's)
  python tools/namm_closed_intervals.py --pool --out $out/namm_closed_intervals_smollm2_keys_seeds56 \
    $out/namm_smollm2_keys_seed5.json $out/namm_smollm2_keys_seed6.json
fi
if run namm-neighbours-decode; then  # issue 10: smollm2-rate ranking each token with its nearest cached neighbours
  # (convert-namm --deploy-neighbours 1; namm-neighbour-pooling's best rule) beside it as shipped, one token per
  # decode at 25 % of 1,024 tokens on namm-decode-1024-96's 96 texts (seed 2) + 16 retrievals (about 45 minutes)
  mkdir -p runs
  pymemory convert-namm pymemory/data/namm/smollm2-rate.gguf -o runs/smollm2-rate-neighbours1.gguf --deploy-neighbours 1
  python tools/eval_trained_namm.py --run smollm2-rate --out $out/namm_neighbours_decode --text 96 --retrieval 16 \
    --also "neighbours 1=runs/smollm2-rate-neighbours1.gguf" --fractions 0.25 --quants '' --no-reproduce \
    --sample-tokens 1024 --baselines '' --test-seed 2 --score-chunk 1 --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_neighbours_decode \
    $out/namm_neighbours_decode.json --versus "trained NAMM (f32)"
fi
if run namm-deploy-delay; then  # issue 10: smollm2-rate run every 16 tokens (its shipped GGUF's namm.deploy.delay,
  # chosen here) against every 32 (the interval it was trained at), side by side on the first 96 of
  # namm-rate-1024-fresh's texts and 16 retrievals of 1,024 tokens (about 55 minutes)
  mkdir -p runs
  pymemory convert-namm pymemory/data/namm/smollm2-rate.gguf -o runs/smollm2-rate-every32.gguf --deploy-delay 32
  python tools/eval_trained_namm.py --run smollm2-rate --out $out/namm_deploy_delay --text 96 --retrieval 16 \
    --also "every 32 tokens (as trained)=runs/smollm2-rate-every32.gguf" --quants '' --no-reproduce \
    --sample-tokens 1024 --baselines '' --test-seed 2 --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_deploy_delay $out/namm_deploy_delay.json \
    --versus "every 32 tokens (as trained)"
fi
if run namm-qwen-deploy-delay; then  # issue 10: qwen2.5-rate every 16 tokens against every 32 (as trained and
  # shipped), side by side on namm-qwen-rate-1024's 16 texts + 8 retrievals of 1,024 tokens (about 40 minutes)
  mkdir -p runs
  pymemory convert-namm pymemory/data/namm/qwen2.5-rate.gguf -o runs/qwen2.5-rate-every16.gguf --deploy-delay 16
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_qwen_deploy_delay --text 16 --retrieval 8 \
    --also "every 16 tokens=runs/qwen2.5-rate-every16.gguf" --quants '' --no-reproduce \
    --sample-tokens 1024 --baselines '' --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_qwen_deploy_delay \
    $out/namm_qwen_deploy_delay.json --versus "trained NAMM (f32)"
fi
if run namm-qwen-deploy-delay-48; then  # issue 10: the same at 25 % on 48 fresh texts of 1,024 tokens (seed 2), to
  # decide the interval qwen2.5-rate ships at (about 25 minutes)
  mkdir -p runs
  pymemory convert-namm pymemory/data/namm/qwen2.5-rate.gguf -o runs/qwen2.5-rate-every16.gguf --deploy-delay 16
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_qwen_deploy_delay_48 --text 48 --retrieval 0 \
    --also "every 16 tokens=runs/qwen2.5-rate-every16.gguf" --quants '' --no-reproduce --fractions 0.25 \
    --sample-tokens 1024 --baselines '' --test-seed 2 --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_qwen_deploy_delay_48 \
    $out/namm_qwen_deploy_delay_48.json --versus "trained NAMM (f32)"
fi
if run namm-rate-2048; then  # issue 10: smollm2-rate (every 16) on 2,048-token samples at 25 %: does the share of
  # sink's gap it closes keep growing with the context (37 % at 512, 48 % at 1,024)? 24 texts + 8 retrievals (25 min)
  python tools/eval_trained_namm.py --run smollm2-rate --out $out/namm_rate_smollm2_2048 --text 24 --retrieval 8 \
    --fractions 0.25 --quants '' --no-reproduce --sample-tokens 2048 --baselines '' --test-seed 2 --workers 2
fi
if run namm-score-chunk; then  # issue 10: sink evicts at least a scored batch's worth before each batch, so the
  # 32-token batches of the earlier 1,024-token tests left it 224-256 cells where it decodes with 240-256 (its
  # eviction chunk is 16). The shipped smollm2-rate (every 16) against sink scored 16 tokens per batch (as it
  # decodes), with sink at 32 beside it, on namm-deploy-delay's 96 texts and 16 retrievals at 25 % (35 minutes)
  python tools/eval_trained_namm.py --run smollm2-rate --out $out/namm_score_chunk --text 96 --retrieval 16 \
    --fractions 0.25 --quants '' --no-reproduce --sample-tokens 1024 --baselines '' --test-seed 2 --workers 2 \
    --score-chunk 16 --also-sink-score-chunk 32
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_score_chunk $out/namm_score_chunk.json
fi
if run namm-decode-eval; then  # issue 10: every policy scored one token per decode, as a chat generates (sink,
  # h2o and tova evict their 16-token chunk; the NAMM, every 16 tokens as shipped, defers what an invocation gives up
  # until new tokens need the room, or evicts it at once beside it): 48 texts + 16 retrievals of 512 tokens
  python tools/eval_trained_namm.py --run smollm2-rate --out $out/namm_decode_smollm2 --text 48 --retrieval 16 \
    --quants '' --no-reproduce --score-chunk 1 --also-immediate --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_decode $out/namm_decode_smollm2.json \
    --versus "trained NAMM, evicting at each invocation"
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_decode_vs_h2o $out/namm_decode_smollm2.json \
    --versus h2o
fi
if run namm-decode-1024; then  # issue 10: the same one-token-per-decode test at 25 % of 1,024 tokens, the first
  # 32 texts of namm-deploy-delay's fresh set (seed 2), text only (about 20 minutes)
  python tools/eval_trained_namm.py --run smollm2-rate --out $out/namm_decode_smollm2_1024 --text 32 --retrieval 0 \
    --fractions 0.25 --quants '' --no-reproduce --sample-tokens 1024 --baselines '' --test-seed 2 --score-chunk 1 \
    --also-immediate --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_decode_1024 \
    $out/namm_decode_smollm2_1024.json --versus "trained NAMM, evicting at each invocation"
fi
if run namm-decode-1024-96; then  # issue 10: one token per decode at 25 % of 1,024 tokens on namm-deploy-delay's
  # 96 texts (seed 2; the first 32 are namm-decode-1024's), to decide half of sink's gap as a chat decodes (30 min)
  python tools/eval_trained_namm.py --run smollm2-rate --out $out/namm_decode_smollm2_1024_96 --text 96 \
    --retrieval 0 --fractions 0.25 --quants '' --no-reproduce --sample-tokens 1024 --baselines '' --test-seed 2 \
    --score-chunk 1 --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_decode_1024_96 \
    $out/namm_decode_smollm2_1024_96.json
fi
if run namm-qwen-decode-eval; then  # issue 10: namm-decode-eval on Qwen2.5: qwen2.5-rate (every 16, deferred) and
  # evicting at once, the pooled qwen2.5, smollm2-rate zero-shot, h2o and sink scored one token per decode; 48 texts
  # + 16 retrievals of 512 tokens (seed 1) at 25 % and 50 % (about 80 minutes)
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_decode_qwen --text 48 --retrieval 16 \
    --quants '' --no-reproduce --baselines h2o --score-chunk 1 --also-immediate \
    --also "smollm2-rate, zero-shot=pymemory/data/namm/smollm2-rate.gguf" \
    --also "shipped qwen2.5 (pooled)=pymemory/data/namm/qwen2.5.gguf" --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_decode_qwen $out/namm_decode_qwen.json \
    --versus "trained NAMM, evicting at each invocation"
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_decode_qwen_vs_h2o \
    $out/namm_decode_qwen.json --versus h2o
fi
if run namm-qwen-decode-50-fresh; then  # issue 10: namm-qwen-decode-eval put qwen2.5-rate at 59 % [47, 71] of sink's
  # gap at 50 % (48 texts): a fresh set (seed 2) of 96 texts of 512 tokens, one token per decode (about 30 minutes)
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_decode_qwen_50_fresh --text 96 --retrieval 0 \
    --fractions 0.5 --quants '' --no-reproduce --baselines '' --test-seed 2 --score-chunk 1 --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_decode_qwen_50_fresh \
    $out/namm_decode_qwen_50_fresh.json
fi
if run train-namm-qwen-transfer; then  # issue 10: Qwen2.5 evolved from the SmolLM2 NAMM (train-namm --warm-start
  # smollm2-rate: its weights and statistics as they are), which keeps more answers on Qwen zero-shot than qwen2.5-rate
  # (namm-qwen-decode-eval); 2 texts + 4 retrievals per generation, 4 generations (resumable; about 20 minutes). Not
  # shipped: no generation beat its start on held-out data; log and curve kept as namm_training_qwen-transfer
  pymemory train-namm --model qwen2.5-coder-0.5b-instruct --out runs/qwen-transfer "${rate_recipe[@]}" \
    --warm-start smollm2-rate --text-samples 2 --retrieval-samples 4 --heldout-text 6 --heldout-retrieval 6 \
    --generations "${GENERATIONS:-4}" --heldout-every 1
  cp runs/qwen-transfer/log.json $out/namm_training_qwen-transfer.json
  cp runs/qwen-transfer/curve.png $out/namm_training_qwen-transfer.png
fi
if run namm-qwen-answers; then  # issue 10: does a NAMM keep more answers than sink and h2o on Qwen2.5? 8 texts + 40
  # retrievals of 512 tokens (a fresh seed, 3), one token per decode: qwen2.5-rate and smollm2-rate zero-shot as
  # shipped (every 16, deferred), h2o, sink, full at 25 % and 50 % (about 40 minutes)
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_qwen_answers --text 8 --retrieval 40 \
    --test-seed 3 --quants '' --no-reproduce --baselines h2o --score-chunk 1 --workers 2 \
    --also "smollm2-rate, zero-shot=pymemory/data/namm/smollm2-rate.gguf"
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_qwen_answers $out/namm_qwen_answers.json \
    --versus h2o
fi
if run namm-qwen-decode-1024; then  # issue 10: Qwen2.5 at 25 % of 1,024 tokens, one token per decode (the batched test,
  # namm-qwen-deploy-delay-48, closed 41 %): its 48 texts (seed 2), qwen2.5-rate as shipped (every 16, deferred) and
  # smollm2-rate zero-shot against sink and the full cache (about 25 minutes)
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_qwen_decode_1024 --text 48 --retrieval 0 \
    --fractions 0.25 --quants '' --no-reproduce --sample-tokens 1024 --baselines '' --test-seed 2 --score-chunk 1 \
    --also "smollm2-rate, zero-shot=pymemory/data/namm/smollm2-rate.gguf" --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_qwen_decode_1024 \
    $out/namm_qwen_decode_1024.json --versus "trained NAMM (f32)"
fi
if run namm-qwen-decode-50-fresh-transfer; then  # issue 10: smollm2-rate zero-shot is the NAMM that keeps answers on
  # Qwen2.5 (namm-qwen-answers): does it close half of sink's text gap at 50 % there too? namm-qwen-decode-50-fresh's
  # 96 texts (seed 2), beside qwen2.5-rate, one token per decode (about 40 minutes)
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_decode_qwen_50_fresh_transfer --text 96 \
    --retrieval 0 --fractions 0.5 --quants '' --no-reproduce --baselines '' --test-seed 2 --score-chunk 1 --workers 2 \
    --also "smollm2-rate, zero-shot=pymemory/data/namm/smollm2-rate.gguf"
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_decode_qwen_50_fresh_transfer \
    $out/namm_decode_qwen_50_fresh_transfer.json --versus "trained NAMM (f32)"
fi
if run namm-qwen-decode-random; then  # issue 10: the random-NAMM row of namm-qwen-decode-eval (decoded, one token per
  # decode): its 48 texts + 16 retrievals of 512 tokens (seed 1), a random NAMM with qwen2.5-rate's settings beside
  # sink, the full cache and qwen2.5-rate as shipped (which reproduce that report) at 25 % and 50 % (about 40 minutes)
  python tools/eval_trained_namm.py --run qwen2.5-rate --out $out/namm_decode_qwen_random --text 48 --retrieval 16 \
    --quants '' --no-reproduce --baselines random --score-chunk 1 --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_decode_qwen_random \
    $out/namm_decode_qwen_random.json --versus "random NAMM"
fi
if run namm-gemma-transfer; then  # issue 10, transfer to a third architecture: both trained NAMMs zero-shot on
  # Gemma-3-270M (sliding-window layers; the NAMM scores and evicts its global layers) against h2o, a random NAMM, sink
  # and the full cache: 48 texts + 16 retrievals of 512 tokens (seed 1), one token per decode, 25 % and 50 % (about
  # 30 minutes)
  python tools/eval_trained_namm.py --run smollm2-rate --model gemma-3-270m --out $out/namm_gemma_transfer --text 48 \
    --retrieval 16 --quants '' --no-reproduce --baselines h2o,random --score-chunk 1 --workers 2 \
    --also "qwen2.5-rate, zero-shot=pymemory/data/namm/qwen2.5-rate.gguf"
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_gemma_transfer \
    $out/namm_gemma_transfer.json --versus h2o
fi
if run namm-gemma-transfer-1024; then  # issue 10: the same on 1,024-token samples, where Gemma-3's sliding-window
  # layers no longer see the whole sample: 32 texts + 8 retrievals (seed 1), h2o, sink, full, both NAMMs zero-shot,
  # one token per decode, 25 % and 50 % (about 35 minutes)
  python tools/eval_trained_namm.py --run smollm2-rate --model gemma-3-270m --out $out/namm_gemma_transfer_1024 \
    --text 32 --retrieval 8 --sample-tokens 1024 --quants '' --no-reproduce --baselines h2o --score-chunk 1 \
    --workers 2 --also "qwen2.5-rate, zero-shot=pymemory/data/namm/qwen2.5-rate.gguf"
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_gemma_transfer_1024 \
    $out/namm_gemma_transfer_1024.json --versus h2o
fi
smollm2_rate_seed() {  # $1 seed: smollm2-rate (no key weight) on the 72 texts of namm-smollm2-keys-seed$1 (about
  # 20 minutes); its sink and full-cache rows reproduce that report's
  fresh_seed_25 smollm2-rate namm_smollm2_rate_seed$1 $1
}
# issue 10: do the keys change SmolLM2's text at 25 %? Measured side by side on seed 2's 96 texts (level) and the
# tuning seed 4's 24 (+6 points, interval including 0); these give the paired answer on all 240 test texts of
# namm-smollm2-keys-pooled-240 (set before the runs: whatever it says is the answer; the half-at-25 % verdict of
# that step is not revisited)
if run namm-smollm2-rate-seed5; then smollm2_rate_seed 5; fi
if run namm-smollm2-rate-seed6; then smollm2_rate_seed 6; fi
if run namm-smollm2-keys-vs-rate-240; then  # seconds: each fresh seed's two runs joined, then the three test sets
  python tools/namm_closed_intervals.py --pool --out $out/namm_closed_intervals_smollm2_keys_vs_rate_240 \
    $out/namm_keys_decode.json $out/namm_smollm2_keys_seed5.json,$out/namm_smollm2_rate_seed5.json \
    $out/namm_smollm2_keys_seed6.json,$out/namm_smollm2_rate_seed6.json --versus "trained NAMM (f32)"
fi
gemma_keys() {  # $1 report, $2 tokens, $3 texts, $4 retrievals, $5 the zero-shot report whose samples these are:
  # both keyed NAMMs zero-shot on Gemma-3-270M (keys from its three global layers, the ones a NAMM scores) beside
  # sink and the full cache, one token per decode, 25 % and 50 %; joined with that report to pair them against its
  # h2o and smollm2-rate rows (its sink and full-cache rows are the same samples and reproduce exactly)
  python tools/eval_trained_namm.py --run smollm2-rate --model gemma-3-270m --out $out/$1 --text $3 \
    --retrieval $4 --sample-tokens $2 --quants '' --no-reproduce --baselines '' --score-chunk 1 --workers 2 \
    --only-also --also "smollm2-keys, zero-shot=pymemory/data/namm/smollm2-keys.gguf" \
    --also "qwen2.5-keys, zero-shot=pymemory/data/namm/qwen2.5-keys.gguf"
  python tools/namm_closed_intervals.py --join --out $out/namm_closed_intervals_${1#namm_}_vs_h2o $out/$5.json \
    $out/$1.json --versus h2o
  python tools/namm_closed_intervals.py --join --out $out/namm_closed_intervals_${1#namm_}_vs_rate $out/$5.json \
    $out/$1.json --versus "trained NAMM (f32)"
}
# issue 10: the keyed NAMMs on a third architecture, on namm-gemma-transfer's 48 texts + 16 retrievals of 512 tokens
# (seed 1; about 15 minutes) and namm-gemma-transfer-1024's 32 + 8 of 1,024 (about 20 minutes)
if run namm-gemma-keys; then gemma_keys namm_gemma_keys 512 48 16 namm_gemma_transfer; fi
if run namm-gemma-keys-1024; then gemma_keys namm_gemma_keys_1024 1024 32 8 namm_gemma_transfer_1024; fi
if run namm-vs-random; then  # issue 10: what training adds beyond the rule: the decoded SmolLM2 and Gemma-3 reports'
  # policies paired against the random NAMM with the same settings (no model run; the Qwen2.5 pairs are written by
  # namm-qwen-decode-random)
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_vs_random $out/namm_decode_smollm2.json \
    $out/namm_gemma_transfer.json --versus "random NAMM"
fi
if run namm-qwen-bound; then  # issue 10: the same bound on Qwen2.5 (qwen2.5-rate's test set, 12 texts): budget_zmax's
  # rule against hindsight of future attention, plain and weighted by value norms (about 30 minutes)
  python tools/namm_aggregation_probe.py --namm qwen2.5-rate --out $out/namm_qwen_bound --text 12 --retrieval 0 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected,hindsight: sum over pairs of all future attention,hindsight: top-1 of pairs of the future rate,hindsight: z-max of pairs of the future rate,hindsight: sum over pairs of future attention x value norm,hindsight: z-max of pairs of the future rate x value norm"
fi
if run namm-qwen-causal; then  # issue 10: on Qwen2.5 hindsight closes half of sink's text gap at 25 % and budget_zmax's
  # rule 15 % (namm-qwen-bound): does another causal rule predict Qwen's future attention better? (about 20 minutes)
  python tools/namm_aggregation_probe.py --namm qwen2.5-rate --out $out/namm_qwen_causal --text 12 --retrieval 0 \
    --fractions 0.25 --rules "sum over pairs (h2o's score, no recent window),mean rate over pairs,top-1 of pairs (max),z-max of pairs: EMA 0.998 bias-corrected,z-max of pairs: EMA 0.995 bias-corrected,z-max of pairs: rate since arrival,z-top-3 of pairs: EMA 0.998 bias-corrected,z-max of pairs: EMA 0.998 bias-corrected + newest 32 kept"
fi
if run namm-warm-rate; then  # issue 10: warm starts whose NAMM reads a bias-corrected 0.998 moving average (a
  # recency-weighted attention rate), per head, pooled and max fits under budget_zmax (about 35 minutes)
  python tools/namm_warm_targets.py --out $out/namm_warm_rate --targets per_head,pooled,max \
    --modes budget_zmax --ema-coefficients 0.998c --test-text 12 --test-retrieval 16
fi
if run namm-warm-past-rate; then  # issue 10: a warm start fitted to each pair's attention rate since arrival (the
  # rule whose standardised maximum keeps text and keys), reading a bias-corrected 0.998 average (about 25 minutes)
  python tools/namm_warm_targets.py --out $out/namm_warm_past_rate --targets past_rate \
    --modes budget_zmax,budget_max --ema-coefficients 0.998c --test-text 12 --test-retrieval 16
fi
if run namm-warm-max; then  # issue 10: warm starts deployed with budget_max (each token's highest score over the
  # pairs): the per-head fit and the max fit, beside sink, h2o, tova and the shipped NAMM (about 25 minutes)
  python tools/namm_warm_targets.py --out $out/namm_warm_max --targets per_head,max --modes budget_max \
    --test-text 12 --test-retrieval 16
fi
if run namm-warm-ema; then  # issue 10: the pooled and max fits with the released spectrogram moving average (0.99
  # per token, ~100 queries) and a longer one (0.998, ~500), under budget and budget_max (about 30 minutes)
  python tools/namm_warm_targets.py --out $out/namm_warm_ema --test-text 12 --test-retrieval 16 \
    --targets pooled,max --modes budget,budget_max --ema-coefficients 0.99,0.998
fi
if run namm-warm-zmax; then  # issue 10: the same fits under budget_zmax (each token's highest score standardised
  # within its (layer, KV head) pair), beside sink, h2o, tova and the shipped NAMM (about 25 minutes)
  python tools/namm_warm_targets.py --out $out/namm_warm_zmax --test-text 12 --test-retrieval 16 \
    --targets pooled,max --modes budget_zmax --ema-coefficients 0.99,0.998
fi
if run namm-warm-mix; then  # issue 10: the pooled fit under budget_mix (budget's mean ranking after a reserve of
  # max_cells / 8 cells for the highest standardised scores) with moving averages 0.99, 0.995, 0.998 (about 30 minutes)
  python tools/namm_warm_targets.py --out $out/namm_warm_mix --test-text 12 --test-retrieval 16 \
    --targets pooled --modes budget_mix --ema-coefficients 0.99,0.995,0.998
fi
if run namm-quant-check; then  # issue 10: each shipped NAMM in f32/f16/q8_0/q4_0 on its trainer's held-out set
  python tools/namm_quant_check.py --namm smollm2 --out $out/namm_quant_smollm2
  python tools/namm_quant_check.py --namm smollm2-evolved --out $out/namm_quant_smollm2_evolved
  python tools/namm_quant_check.py --namm qwen2.5 --out $out/namm_quant_qwen
  python tools/namm_quant_check.py --namm qwen2.5-per-head --out $out/namm_quant_qwen_per_head
fi
if run namm-quant-noise; then  # issue 10: the Qwen NAMM's q8_0 beside f32 files carrying random noise of q8_0's size
  python tools/namm_quant_check.py --namm qwen2.5 --quants q8_0 --noise-draws 5 --out $out/namm_quant_qwen_noise
fi
if run namm-qwen-eval; then  # the per-head Qwen NAMM vs every policy on its held-out test set; transfer to SmolLM2
  python tools/eval_trained_namm.py --run runs/qwen-warm --namm pymemory/data/namm/qwen2.5-per-head.gguf \
    --out $out/namm_trained_qwen --text 12 --retrieval 6 --transfer-model smollm2-135m-instruct \
    --transfer-samples 6 --workers 2 --quants "" --skip-warm-start \
    --also "SmolLM2 NAMM, zero-shot=pymemory/data/namm/smollm2.gguf"
fi
if run train-namm-qwen-pooled; then  # issue 10: the pooled warm start on Qwen2.5, one CMA-ES generation around it
  pymemory train-namm --model qwen2.5-coder-0.5b-instruct --out runs/qwen-pooled \
    --data austen,passkey,kv --sample-tokens 512 --scored-tokens 256 --cache-fraction 0.25 --n-sink 4 --namm-delay 32 \
    --mode budget --quorum 1.0 --warm-start imitation --warm-start-target pooled --warm-start-samples 18 \
    --warm-start-horizon 256 --warm-start-steps 600 --population 8 --sigma0 0.03 --covariance diagonal \
    --generations "${GENERATIONS:-1}" --text-samples 2 --retrieval-samples 1 --heldout-every 1 --heldout-text 12 \
    --heldout-retrieval 6 --calibration-samples 2 --seed 0 --workers 2 --threads 1
  python tools/ship_namm.py --run runs/qwen-pooled --name qwen2.5  # the shipped Qwen2.5 NAMM: generation 1 won
fi
if run train-namm-qwen-rate; then  # issue 10: the smollm2-rate recipe on Qwen2.5 (past-rate warm start, corrected
  # 0.998 average, budget_zmax), then 2 CMA-ES generations on 3 texts + 3 retrievals each (resumable; about 50 minutes)
  pymemory train-namm --model qwen2.5-coder-0.5b-instruct --out runs/qwen-rate "${rate_recipe[@]}" \
    --generations "${GENERATIONS:-2}" --heldout-every 1
  python tools/ship_namm.py --run runs/qwen-rate --name qwen2.5-rate  # shipped: generation 2 (the best held-out)
fi
if run train-namm-qwen-keys; then  # issue 10: qwen2.5-keys evolved under the ranking it deploys with (train-namm
  # --key-weight 0.5): the rate recipe continued from the shipped file for 4 generations (resumable; about 30 minutes)
  pymemory train-namm --model qwen2.5-coder-0.5b-instruct --out runs/qwen-keys "${rate_recipe[@]}" \
    --warm-start qwen2.5-keys --key-weight 0.5 --generations "${GENERATIONS:-4}" --heldout-every 2
  # deployed as qwen2.5-keys is: every 16 tokens (trained every 32)
  pymemory convert-namm runs/qwen-keys/namm.gguf -o runs/qwen2.5-keys-evolved.gguf --deploy-delay 16
  cp runs/qwen-keys/log.json $out/namm_training_qwen_keys.json  # not shipped: level with qwen2.5-keys on fresh
  cp runs/qwen-keys/curve.png $out/namm_training_qwen_keys.png  # texts (namm-qwen-keys-fresh)
fi
if run namm-quant-qwen-rate; then  # issue 10: qwen2.5-rate's q8_0 against its f32 on the trainer's held-out set
  python tools/namm_quant_check.py --namm qwen2.5-rate --quants q8_0 --out $out/namm_quant_qwen_rate
fi
if run namm-qwen-rate-eval; then  # issue 10: the past-rate Qwen NAMM (train-namm-qwen-rate) vs every policy on 12
  # texts + 12 retrievals at 25 % and 50 %, beside the shipped qwen2.5 and smollm2-rate zero-shot; q8_0 (~40 minutes)
  python tools/eval_trained_namm.py --run runs/qwen-rate --namm runs/qwen-rate/namm.gguf \
    --out $out/namm_rate_qwen --text 12 --retrieval 12 --quants q8_0 --workers 2 \
    --also "shipped NAMM (qwen2.5)=pymemory/data/namm/qwen2.5.gguf" \
    --also "SmolLM2 NAMM smollm2-rate, zero-shot=pymemory/data/namm/smollm2-rate.gguf"
fi
if run namm-closed-intervals; then  # issue 10: how sure "closes X % of sink's text gap" is (bootstrap over the texts
  # of the reports named; seconds, no model run)
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals $out/namm_rate_smollm2.json \
    $out/namm_rate_qwen.json $out/namm_pooled_smollm2.json
fi
if run namm-qwen-pooled-eval; then  # the pooled Qwen NAMM vs every policy and the per-head one on 8 + 4 held-out
  # samples at 25 % and 50 %
  python tools/eval_trained_namm.py --run runs/qwen-pooled --namm runs/qwen-pooled/namm.gguf \
    --out $out/namm_pooled_qwen --text 8 --retrieval 4 --quants '' --skip-warm-start --workers 2 \
    --also "per-head Qwen NAMM (qwen-warm, generation 3)=pymemory/data/namm/qwen2.5-per-head.gguf"
fi
if run ruler-smollm2; then  # issue 13: RULER-style tasks at kvpress's ratios (cache 75/50/25/12.5 % of the context)
  # for full cache, sink, h2o, tova and the shipped NAMM; 2,048 tokens, 1 sample per task: ~45 minutes on 2 cores
  pymemory eval ruler --model smollm2-135m-instruct --context "${RULER_CONTEXT:-2048}" --samples "${RULER_SAMPLES:-1}" \
    --ratios 0.75,0.5,0.25,0.125 --policy full --policy sink --policy h2o --policy tova \
    --policy namm,namm_path=smollm2 --threads 2 --seed 0 \
    --json $out/ruler_smollm2.json --md $out/ruler_smollm2.md --plot $out/ruler_smollm2.png
fi
if run ruler-qwen; then  # issue 13: the same on Qwen2.5-Coder-0.5B with its shipped NAMM; 1,024 tokens (the 4x
  # larger model at 2,048 would take about an hour): ~20 minutes on 2 cores
  pymemory eval ruler --model qwen2.5-coder-0.5b-instruct --context "${RULER_CONTEXT:-1024}" \
    --samples "${RULER_SAMPLES:-1}" --ratios 0.75,0.5,0.25,0.125 --policy full --policy sink --policy h2o \
    --policy tova --policy namm,namm_path=qwen2.5 --threads 2 --seed 0 \
    --json $out/ruler_qwen.json --md $out/ruler_qwen.md --plot $out/ruler_qwen.png
fi
if run chat-defaults; then  # issue 11: degenerate chat replies per sampler setting (chooses pymemory.CHAT_SAMPLING)
  python tools/chat_defaults.py --chats 50 --turns 4 --max-tokens 80 --out $out/chat_defaults_smollm2
fi
if run serve-long-chat; then  # issue 12: 300 turns through 512 cells with the openai client; --no-pin is the control
  python tools/serve_long_chat.py --threads 1
fi
if run server-bench; then  # issue 12: vs llama_cpp.server (pip install sse-starlette starlette-context pydantic-settings)
  python tools/bench_server.py
fi
if run namm-keys-reindex; then  # issue 10: smollm2-keys with positions compacted after every eviction (reindex=True,
  # as sink) beside its default (absolute positions), 25 % of 1,024 tokens, one token per decode, the first 24
  # texts of namm-keys-decode (seed 2) (about 7 minutes)
  fresh_seed_25 smollm2-rate namm_keys_reindex 2 --text 24 --only-also \
    --also "key weight 0.5=pymemory/data/namm/smollm2-keys.gguf" --also-reindexed
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_keys_reindex $out/namm_keys_reindex.json \
    --versus "key weight 0.5"
fi
if run namm-merge-rules; then  # issue 10: namm-gap-anatomy's finding that what smollm2-keys leaves is spread over
  # ordinary tokens: keep part of each evicted token instead of nothing, its value merged into the kept token of the
  # most similar key per (layer, KV head) (CaM, D2O; tools/kv_merge.py), at two thresholds, beside the keyed rule and
  # the state round trip alone, namm-surprisal-rules' 24 texts (about 25 minutes)
  python tools/namm_aggregation_probe.py --namm smollm2-rate --out $out/namm_merge_rules --text 24 \
    --retrieval 0 --sample-tokens 1024 --test-seed 2 --fractions 0.25 \
    --rules "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE; cache state written back unchanged at each eviction,z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE; evicted values merged into the most similar kept key (centred cosine >= 0.8),z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE; evicted values merged into the most similar kept key (centred cosine >= 0.6)"
fi
if run namm-keys-merged-dev; then  # issue 10: namm-merge-rules' gain in the engine: smollm2-keys as shipped with the
  # values of the tokens it gives up merged into the kept token of the most similar key (namm_merge_threshold), at
  # four thresholds, 25 % of 1,024 tokens, one token per decode, deferred, the first 24 texts of namm-keys-decode
  # (seed 2: the development set the threshold is chosen on; about 17 minutes)
  fresh_seed_25 smollm2-rate namm_keys_merged_dev 2 --text 24 --only-also \
    --also "key weight 0.5=pymemory/data/namm/smollm2-keys.gguf" --also-merged 0.6 --also-merged 0.4 \
    --also-merged 0.2 --also-merged 0.0
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_keys_merged_dev \
    $out/namm_keys_merged_dev.json --versus "key weight 0.5"
fi
# issue 10: smollm2-merged (smollm2-keys with the values of the tokens it gives up merged into the kept token of the
# most similar key, centred cosine >= 0.4, chosen on namm-keys-merged-dev's seed-2 texts). Set before it ran: 240
# fresh texts (seeds 8, 9 and 10, 80 each; no SmolLM2 report used them) at 25 % of 1,024 tokens, one token per
# decode, beside sink and the full cache; the verdict on half of sink's gap is the pooled 240's interval, and no
# texts are added after it (about 28 minutes per seed)
merged_fresh_seed() {  # $1 seed
  fresh_seed_25 smollm2-rate namm_smollm2_merged_seed$1 $1 --text 80 --only-also \
    --also "smollm2-merged=pymemory/data/namm/smollm2-merged.gguf"
}
if run namm-smollm2-merged-seed8; then merged_fresh_seed 8; fi
if run namm-smollm2-merged-seed9; then merged_fresh_seed 9; fi
if run namm-smollm2-merged-seed10; then merged_fresh_seed 10; fi
if run namm-smollm2-merged-pooled-240; then  # seconds
  python tools/namm_closed_intervals.py --pool --out $out/namm_closed_intervals_smollm2_merged_pooled_240 \
    $out/namm_smollm2_merged_seed8.json $out/namm_smollm2_merged_seed9.json $out/namm_smollm2_merged_seed10.json
fi
if run namm-merged-answers; then  # issue 10: does merging cost the keyed NAMM its answers? smollm2-keys and
  # smollm2-merged on namm-keys-decode's 16 retrievals of 1,024 tokens (seed 2), 25 %, one token per decode (about
  # 12 minutes)
  fresh_seed_25 smollm2-rate namm_merged_answers 2 --text 0 --retrieval 16 --only-also \
    --also "smollm2-keys=pymemory/data/namm/smollm2-keys.gguf" \
    --also "smollm2-merged=pymemory/data/namm/smollm2-merged.gguf"
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_merged_answers \
    $out/namm_merged_answers.json --versus "smollm2-keys"
fi
if run namm-merged-table; then  # issue 10: the table's rows for smollm2-merged at both budgets of 1,024 tokens:
  # beside sink, h2o and the full cache, 16 texts + 16 retrievals of seed 2, one token per decode (about 16 minutes)
  python tools/eval_trained_namm.py --run smollm2-rate --out $out/namm_merged_table --text 16 --retrieval 16 \
    --fractions 0.25,0.5 --quants '' --no-reproduce --sample-tokens 1024 --baselines h2o --test-seed 2 \
    --score-chunk 1 --only-also --also "smollm2-merged=pymemory/data/namm/smollm2-merged.gguf" --workers 2
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_merged_table $out/namm_merged_table.json \
    --versus h2o
  python tools/namm_closed_intervals.py --out $out/namm_closed_intervals_merged_table_vs_sink \
    $out/namm_merged_table.json --versus sink
fi
