"""`g2rpo <subcommand>`: train, evaluate, plot, sweep, study, plan, export, compile."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": ("g2rpo_jax.train", "train with G²RPO-A"),
    "evaluate": ("g2rpo_jax.evaluate", "evaluate a trained checkpoint on held-out problems"),
    "plot": ("g2rpo_jax.plot", "PNG plots of a run's metrics (reward, accuracy, L, KL)"),
    "sweep": ("g2rpo_jax.sweep", "run configs x seeds and write the replication table and plots"),
    "study": ("g2rpo_jax.study", "the trace-quality study: methods x teacher-trace regimes x seeds, one page"),
    "plan": ("g2rpo_jax.plan", "memory per device for a config's model, batch and mesh; warns when it will not fit"),
    "export": ("g2rpo_jax.export", "write a run as HF safetensors (merged) or a PEFT LoRA adapter"),
    "compile": ("g2rpo_jax.compile", "compile the step for a TPU slice ahead of time: XLA's memory per chip, fits"),
}

USAGE = "usage: g2rpo {" + ",".join(SUBCOMMANDS) + "} [options]\n\n" + "\n".join(
    f"  {name:<9} {text} (g2rpo {name} --help)" for name, (_, text) in SUBCOMMANDS.items())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"{USAGE}\n\nerror: unknown subcommand '{argv[0]}'; choose one of {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
