"""Launch any sppd-megatron stage, or ``run``, with nemo-run on this machine or on Slurm.

    # CPU / one machine: torchrun with N processes (gloo without GPUs)
    python launch/nemo_run_launch.py train configs/tiny-cpu/sft.yaml --executor local --nproc-per-node 2
    # Slurm: print the sbatch script without submitting
    python launch/nemo_run_launch.py train configs/recipes/llama3-70b/sft-4n8g-tp8pp4.yaml \\
        --executor slurm --account ACC --partition batch --dryrun

Training verbs (train, precompute-ref) run under torchrun with one process per GPU. The other verbs
(sample, score, pairs, eval, convert, run) run one process per node that owns all of the node's GPUs:
``sample`` starts its SGLang engines in that process (engine.dp_size x engine.tp_size GPUs), so the
rollout engines sit on the very nodes the trainer uses, and the stages of ``run`` take turns on one
allocation. Nodes and GPUs per node default to the recipe's name (``-4n8g-``). Only the launch is
built here: the recipe and its overrides are passed through unchanged.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a file: find sppd_megatron without installing

from sppd_megatron.planning.validate import layout_from_recipe_name  # noqa: E402

TORCHRUN_VERBS = ("train", "precompute-ref")
"""Verbs that start one worker per GPU under torchrun; the rest run one process per node."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nemo_run_launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("verb", help="sppd-megatron verb: train, precompute-ref, sample, score, pairs, eval, convert, run")
    p.add_argument("recipe", help="the verb's YAML config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, passed to the verb")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--nodes", type=int, help="nodes (default: the recipe name's, else 1)")
    p.add_argument("--nproc-per-node", "--gpus-per-node", dest="nproc_per_node", type=int,
                   help="processes (= GPUs) per node for training verbs (default: the recipe name's, else 1)")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time", default="04:00:00", help="Slurm time limit")
    p.add_argument("--container-image", help="container image for Slurm (pyxis/enroot); none: the nodes' env")
    p.add_argument("--container-mounts", nargs="*", default=[], help="e.g. /lustre/models:/models")
    p.add_argument("--workdir", default=str(REPO),
                   help="project root as the job sees it (shared filesystem or container path); recipes' "
                        "relative paths resolve there (default: this checkout)")
    p.add_argument("--job-dir", default=str(REPO / "nemo_experiments"), help="where nemo-run keeps job files")
    p.add_argument("--name", help="experiment name (default: VERB-RECIPE)")
    p.add_argument("--dryrun", action="store_true", help="print what would run (the sbatch script on Slurm)")
    p.add_argument("--detach", action="store_true", help="submit and return (Slurm)")
    return p


def resolve_shape(args) -> tuple[int, int]:
    """(nodes, GPUs per node): flags, else the recipe name's ``-<N>n<G>g-``, else one process."""
    named = layout_from_recipe_name(args.recipe) or {}
    nodes = args.nodes or named.get("nodes", 1)
    gpus = args.nproc_per_node or named.get("gpus_per_node", 1)
    return nodes, gpus


def build_task(verb: str, recipe: str, overrides: list[str], workdir: str):
    """``sppd-megatron VERB RECIPE OVERRIDES`` run from ``workdir`` (launch/entry.py), as a nemo-run Script."""
    import nemo_run as run

    entry = str(Path(workdir) / "launch" / "entry.py")
    return run.Script(path=entry, args=[workdir, verb, recipe, *overrides], entrypoint="python",
                      env={"PYTHONUNBUFFERED": "1"})


def build_executor(args, nodes: int, gpus_per_node: int):
    """LocalExecutor or SlurmExecutor; torchrun workers per GPU for training verbs, else one task per node."""
    import nemo_run as run

    distributed = args.verb in TORCHRUN_VERBS
    tasks = gpus_per_node if distributed else 1
    if not distributed and nodes > 1:
        # sample/score/pairs/eval/run are one process: N copies would repeat the same work.
        print(f"note: {args.verb} runs one process; using 1 node of the {nodes} the recipe names")
        nodes = 1
    launcher = "torchrun" if distributed else None
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.executor == "local":
        if nodes != 1:
            raise SystemExit("error: --executor local runs on one node; use --executor slurm for multi-node")
        return run.LocalExecutor(ntasks_per_node=tasks, launcher=launcher, env_vars=env)
    if not (args.account and args.partition):
        raise SystemExit("error: --executor slurm needs --account and --partition")
    executor = run.SlurmExecutor(
        account=args.account,
        partition=args.partition,
        nodes=nodes,
        ntasks_per_node=tasks,
        gpus_per_node=gpus_per_node,
        time=args.time,
        container_image=args.container_image,
        container_mounts=list(args.container_mounts),
        tunnel=run.LocalTunnel(job_dir=args.job_dir),
        env_vars=env,
    )
    executor.launcher = launcher
    return executor


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    import nemo_run as run

    nodes, gpus = resolve_shape(args)
    task = build_task(args.verb, args.recipe, args.overrides, args.workdir)
    executor = build_executor(args, nodes, gpus)
    # Outside a git checkout (e.g. an installed copy) the default GitArchivePackager cannot work.
    executor.packager = run.Packager()
    name = args.name or f"{args.verb}-{Path(args.recipe).stem}"
    print(f"# {args.executor}: {nodes} node(s) x {gpus} GPU(s), "
          f"{'torchrun' if args.verb in TORCHRUN_VERBS else 'one process per node'}: "
          f"sppd-megatron {shlex.join([args.verb, args.recipe, *args.overrides])} (in {args.workdir})")
    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        exp.add(task, executor=executor, name=args.verb)
        if args.dryrun:
            exp.dryrun()
            return 0
        exp.run(sequential=True, detach=args.detach, tail_logs=not args.detach)
    if args.detach:
        return 0
    # Leaving the Experiment waited for its tasks; each job keeps its final torchx AppState.
    states = {job.id: str(job.state) for job in exp.jobs}
    failed = {name: state for name, state in states.items() if state != "SUCCEEDED"}
    if failed:
        print(f"error: task(s) did not succeed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
