"""Generation alone with transformers' `generate` (CPU PyTorch), on the fixed workload's rollout.
Run in bench/.venvs/hf:

    bench/.venvs/hf/bin/python bench/peers/hf_generate.py --workload W2

The same random-init Qwen2, prompts, B = prompts x generations rows, exactly N new tokens (EOS
stopping off), temperature 1.0 over the full vocabulary (top_k 0, top_p 1), KV cache on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common_torch  # noqa: E402
import workload as wl  # noqa: E402


def main(argv=None):
    w, warmup, steps = wl.peer_args(argv, warmup=1)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(w.seed)
    model_dir = common_torch.save_model(w)
    peak = common_torch.matmul_peak()
    tok = wl.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(p, add_special_tokens=False) for p in w.prompts()]).repeat_interleave(
        w.num_generations, dim=0)
    gen = GenerationConfig(max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens, do_sample=True,
                           temperature=w.temperature, top_k=0, top_p=1.0, eos_token_id=None,
                           pad_token_id=wl.PAD_ID, use_cache=True)
    times, cpu_times = [], []
    with torch.inference_mode():
        for _ in range(warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            if out.shape != (w.batch_rows, w.prompt_tokens + w.new_tokens):
                raise RuntimeError(f"generate returned {tuple(out.shape)}")
            texts = tok.batch_decode(out[:, ids.shape[1]:])
            rewards = [wl.letter_fraction(t) for t in texts]  # scored as in a GRPO step
    print(wl.result_line("transformers.generate", w, step_times=[], gen_times=times[warmup:],
                         compile_sec=sum(times[:warmup]), peak=peak, compiles_after_warmup=None,
                         cpu_times=cpu_times[warmup:], extra={"warmup_steps": warmup, "transformers": transformers.__version__,
                                "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                                "mean_reward": sum(rewards) / len(rewards)}), flush=True)


if __name__ == "__main__":
    main()
