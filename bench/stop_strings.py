"""What the on-device stop-string check costs per decode step.

    python bench/stop_strings.py            # prints one JSON line

Times the jitted sampler on the same rows twice, without and with `rollout.stop_strings`
(`["</answer>", "\\n\\n\\n"]` over a Qwen-sized 151,936-entry vocabulary whose entries read as their
ids' digits, so no row ever stops and both runs decode every token). EOS is off. Reports the best of
`--repeats` interleaved runs of each and the difference per decode step.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from g2rpo_jax.models import ModelConfig, init_model  # noqa: E402
from g2rpo_jax.rollout import SamplingParams, generate  # noqa: E402
from g2rpo_jax.stop_strings import stop_tables  # noqa: E402

VOCAB = 151_936  # Qwen3's embedding rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    cfg = ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=128, intermediate_size=384,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    graphdef, params = init_model(cfg, 0)
    rng = np.random.default_rng(0)
    B, P = args.rows, 32
    prompt = rng.integers(1, VOCAB, size=(B, P)).astype(np.int32)
    mask = np.ones((B, P), bool)
    t0 = time.perf_counter()
    stop = stop_tables([str(i).encode() for i in range(VOCAB)], ["</answer>", "\n\n\n"])
    table_s = time.perf_counter() - t0

    def run(stop_strings):
        sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, stop=stop_strings)
        out = generate(graphdef, params, prompt, mask, np.zeros((B, 0), np.int32), np.zeros((B,), np.int32),
                       jax.random.PRNGKey(0), sampling=sampling, eos_id=-1, pad_id=0)
        return out.tokens.block_until_ready(), out

    base, with_stop = run(None)[1], run(stop)[1]  # compile both
    assert int(np.asarray(with_stop.num_generated).min()) == args.new_tokens  # nothing stopped early
    np.testing.assert_array_equal(np.asarray(base.tokens), np.asarray(with_stop.tokens))
    times = {"off": [], "on": []}
    for _ in range(args.repeats):
        for name, s in (("off", None), ("on", stop)):
            t0 = time.perf_counter()
            run(s)
            times[name].append(time.perf_counter() - t0)
    off, on = min(times["off"]), min(times["on"])
    print(json.dumps({
        "rows": B, "new_tokens": args.new_tokens, "vocab": VOCAB, "table_build_s": round(table_s, 3),
        "generate_s_without": round(off, 4), "generate_s_with": round(on, 4),
        "ms_per_step_overhead": round(1e3 * (on - off) / args.new_tokens, 4),
        "overhead_pct": round(100 * (on - off) / off, 2), "machine": platform.processor() or platform.machine(),
        "cpus": len(jax.devices()), "backend": jax.default_backend(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
