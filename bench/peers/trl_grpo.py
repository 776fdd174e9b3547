"""TRL's GRPOTrainer on CPU PyTorch, on the fixed workload. Run in bench/.venvs/trl:

    bench/.venvs/trl/bin/python bench/peers/trl_grpo.py --workload W1

Same model shapes and init, vocabulary, prompts (raw text), exact token counts (EOS stopping off),
reward, and GRPO settings (beta 0.04 with TRL's k3 KL against a reference copy, epsilon 0.2, loss
`grpo`, one AdamW step at lr 1e-5 per batch, no gradient clipping, float32) as bench/grpo_step.py.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common_torch  # noqa: E402
import workload as wl  # noqa: E402


def main(argv=None):
    w, warmup, steps = wl.peer_args(argv)

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(w.seed)
    model_dir = common_torch.save_model(w)
    peak = common_torch.matmul_peak()
    gen_times: list[float] = []
    step_times: list[float] = []
    cpu_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    def letters(completions, **kwargs):
        return [wl.letter_fraction(c) for c in completions]

    config = GRPOConfig(
        output_dir=str(wl.BENCH_DIR / ".cache" / "trl-out"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=w.batch_rows, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=w.num_generations, max_completion_length=w.new_tokens,
        temperature=w.temperature, top_p=1.0, top_k=0, generation_kwargs={"eos_token_id": None},
        beta=w.beta, epsilon=w.epsilon, loss_type="grpo", scale_rewards="group", num_iterations=1,
        learning_rate=w.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, max_steps=warmup + steps, logging_steps=1, save_strategy="no",
        report_to="none", seed=w.seed, shuffle_dataset=False, disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
        # TRL's GRPOConfig turns gradient checkpointing on by default; ours keeps activations (its
        # optim.gradient_checkpointing is off by default), so both do the same work.
        gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=letters, args=config,
                          train_dataset=Dataset.from_dict({"prompt": w.prompts()}),
                          processing_class=wl.load_tokenizer(model_dir), callbacks=[StepTimer()])
    generate = trainer.model.generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = generate(*a, **k)
        gen_times.append(time.perf_counter() - t0)
        n_new = out.shape[1] - k["input_ids"].shape[1]
        if n_new != w.new_tokens or out.shape[0] != w.batch_rows:
            raise RuntimeError(f"TRL generated {tuple(out.shape)}: expected {w.batch_rows} rows of {w.new_tokens} new tokens")
        return out

    trainer.model.generate = timed_generate
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    warm = warmup
    print(wl.result_line("trl", w, step_times=step_times[warm:], gen_times=gen_times[warm:],
                         compile_sec=sum(step_times[:warm]), peak=peak, compiles_after_warmup=None,
                         cpu_times=cpu_times[warm:], extra={"warmup_steps": warm, "train_sec_total": total, "trl": trl.__version__,
                                "transformers": transformers.__version__, "torch": torch.__version__,
                                "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}),
          flush=True)


if __name__ == "__main__":
    main()
