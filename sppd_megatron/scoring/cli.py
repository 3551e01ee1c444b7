"""``sppd-megatron score CONFIG.yaml [dotted.key=value ...]``: add step values to tree shards.

Reads every ``trees-*.jsonl`` shard of ``input_dir``, grades terminal nodes (``answer``,
``correct``), adds ``values[name]`` to every node for each configured scorer, and appends the
scored trees to the same-named shard in ``output_dir``. Trees already there are skipped, so an
interrupted run resumes where it stopped. Input lines that are not valid trees go to
``output_dir/rejects.jsonl`` with file, line and reason, and are counted.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from sppd_megatron.config import USER_ERRORS, ConfigError, parse_config_command, report_error
from sppd_megatron.locking import locked
from sppd_megatron.parallel.state import world_size_from_env
from sppd_megatron.records import JsonlAppender, Tree, iter_jsonl_lenient
from sppd_megatron.sampling.config import EngineConfig
from sppd_megatron.scoring.grading import DEFAULT_TIMEOUT_SECONDS
from sppd_megatron.scoring.hf_prm import HFPRMConfig, SGLangPRMConfig
from sppd_megatron.scoring.mc_prm import MonteCarloPRMConfig
from sppd_megatron.scoring.rejects import RejectsFile
from sppd_megatron.training.value_prm import ValueHeadPRMConfig

ScorerKind = Literal["tree", "mc", "hf", "sglang", "value_head"]
SCORER_KINDS = get_args(ScorerKind)
REJECTS = "rejects.jsonl"


@dataclass
class MCScorerConfig:
    """The policy whose rollouts the Monte-Carlo PRM counts."""

    model: str = "tiny:llama"
    """Hugging Face directory of the policy, or ``tiny:llama`` / ``tiny:qwen2`` built in code."""
    tokenizer: str | None = None
    """Tokenizer directory or ``builtin:char``; None: the model directory (``builtin:char`` for tiny models)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engine, as in ``sppd-megatron sample``."""
    rollouts: MonteCarloPRMConfig = field(default_factory=MonteCarloPRMConfig)
    """N, token budget and sampling of the rollouts."""


@dataclass
class ScoreConfig:
    """Which scorers write which ``node.values`` keys, and where trees come from and go to."""

    input_dir: str
    """Directory of ``trees-*.jsonl`` shards written by ``sppd-megatron sample`` (or one .jsonl file)."""
    output_dir: str
    """Scored shards (same file names), ``rejects.jsonl`` and ``score_summary.json``; re-running resumes."""
    scorers: list[ScorerKind] = field(default_factory=lambda: ["tree"])
    """``tree`` (share of correct leaves, free), ``mc`` (policy rollouts), ``hf`` (transformers PRM), ``sglang``,
    ``value_head`` (the value head of an sppd-megatron checkpoint: stage prm or svpo, any TP/PP)."""
    value_names: dict[str, str] = field(default_factory=dict)
    """Key written in ``node.values`` per scorer kind (default: the kind itself), e.g. ``{hf: skywork}``."""
    hf: HFPRMConfig = field(default_factory=HFPRMConfig)
    """The transformers PRM (scorer ``hf``)."""
    sglang: SGLangPRMConfig = field(default_factory=SGLangPRMConfig)
    """The SGLang reward endpoint (scorer ``sglang``)."""
    mc: MCScorerConfig = field(default_factory=MCScorerConfig)
    """The Monte-Carlo PRM (scorer ``mc``)."""
    value_head: ValueHeadPRMConfig = field(default_factory=ValueHeadPRMConfig)
    """The learned value head (scorer ``value_head``): ``path`` of its checkpoint, ``parallel`` layout."""
    calibration_label: str | None = None
    """A ``values`` key (e.g. ``mc``) to judge the other values of the scored trees against: each one's
    Brier score and AUC of "leads to a correct answer" go to ``score_summary.json`` (``calibration``)."""
    trees_per_batch: int = 8
    """Trees whose trajectories are scored together (one PRM batch / one engine call). Groups are
    fixed by position in the shard, so keep this value when resuming for byte-identical output."""
    grade_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    """Per-answer limit on math-verify."""
    regrade: bool = False
    """Grade terminal nodes again even when the sampler already set ``correct``."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        if not self.scorers:
            raise ValueError("scorers: give at least one of tree, mc, hf, sglang")
        if len(set(self.scorers)) != len(self.scorers):
            raise ValueError(f"scorers: {self.scorers} lists a scorer twice")
        unknown = sorted(set(self.value_names) - set(SCORER_KINDS))
        if unknown:
            raise ValueError(f"value_names: unknown scorer kind(s) {unknown}")
        if "hf" in self.scorers and not self.hf.path:
            raise ValueError("scorer hf needs hf.path (a PRM checkpoint directory)")
        if "value_head" in self.scorers and not self.value_head.path:
            raise ValueError("scorer value_head needs value_head.path (a checkpoint of train stage prm or svpo)")
        if self.trees_per_batch < 1:
            raise ValueError("trees_per_batch must be >= 1")

    def value_name(self, kind: str) -> str:
        return self.value_names.get(kind, kind)


def input_shards(input_dir: str | Path) -> list[Path]:
    path = Path(input_dir)
    if path.is_file():
        return [path]
    shards = sorted(path.glob("trees-*.jsonl"))
    if not shards:
        raise FileNotFoundError(f"{path}: no trees-*.jsonl shards (run sppd-megatron sample first)")
    return shards


def build_text_prm(kind: str, cfg: ScoreConfig):
    """The PRM object of one text-scorer kind (imports heavy packages only when asked)."""
    if kind == "hf":
        from sppd_megatron.scoring.hf_prm import HF_PRM_STYLES

        return HF_PRM_STYLES[cfg.hf.style].from_pretrained(cfg.hf)
    if kind == "sglang":
        from sppd_megatron.scoring.hf_prm import SGLangRewardPRM

        return SGLangRewardPRM(cfg.sglang)
    if kind == "value_head":
        from sppd_megatron.training.value_prm import MegatronValuePRM

        return MegatronValuePRM(cfg.value_head)
    if kind == "mc":
        from sppd_megatron.sampling.engines import build_engine
        from sppd_megatron.scoring.mc_prm import MonteCarloPRM
        from sppd_megatron.tokenization import load_tokenizer

        spec = cfg.mc.tokenizer or ("builtin:char" if cfg.mc.model.startswith("tiny:") else cfg.mc.model)
        tokenizer = load_tokenizer(spec)
        engine = build_engine(cfg.mc.engine, cfg.mc.model, tokenizer, tokenizer_path=spec, seed=cfg.mc.rollouts.seed)
        return MonteCarloPRM(engine, tokenizer, cfg.mc.rollouts)
    raise ValueError(f"unknown scorer {kind!r}")


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def run_scoring(cfg: ScoreConfig, prms: dict | None = None) -> dict:
    """Score every tree not yet in ``cfg.output_dir`` (locked meanwhile); ``prms`` may inject ready PRM
    objects (tests)."""
    with locked(cfg.output_dir):
        return _score(cfg, prms)


def _score(cfg: ScoreConfig, prms: dict | None) -> dict:
    from tqdm import tqdm

    from sppd_megatron.scoring.tree_scoring import grade_tree, score_trees_with_prm, score_trees_with_tree_values

    shards = input_shards(cfg.input_dir)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(s.resolve().parent == out_dir.resolve() for s in shards):
        raise ConfigError("output_dir must differ from input_dir (scored shards keep the input's file names)")
    prms = dict(prms or {})
    summary = {"trees": 0, "scored": 0, "already_done": 0, "rejected": 0, "terminal": 0, "correct": 0}
    start = time.perf_counter()
    bar = tqdm(total=sum(_count_lines(s) for s in shards), unit="tree", desc="score",
               disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    rejects = RejectsFile(out_dir / REJECTS)

    def flush(batch: list[Tree], appender: JsonlAppender) -> None:
        # Groups are fixed by position, and a group with any tree missing is scored whole, so a
        # resumed run computes every value in the same batch as an uninterrupted one (same bytes).
        todo = [t for t in batch if t.id not in appender.done_keys]
        summary["already_done"] += len(batch) - len(todo)
        if not todo:
            bar.update(len(batch))
            return
        for tree in batch:
            grade_tree(tree, cfg.grade_timeout_seconds, regrade=cfg.regrade)
        for kind in cfg.scorers:
            if kind == "tree":
                score_trees_with_tree_values(batch, cfg.value_name("tree"))
                continue
            if kind not in prms:
                prms[kind] = build_text_prm(kind, cfg)
            score_trees_with_prm(batch, prms[kind], cfg.value_name(kind))
        for tree in todo:
            appender.append(tree)
            terminal = [n for n in tree.nodes if n.terminal]
            summary["terminal"] += len(terminal)
            summary["correct"] += sum(n.correct is True for n in terminal)
        summary["scored"] += len(todo)
        bar.update(len(batch))

    try:
        for shard in shards:
            with JsonlAppender(out_dir / shard.name, Tree, fault_point="score.tree") as appender:
                batch: list[Tree] = []
                for line, tree, reason in iter_jsonl_lenient(shard, Tree):
                    summary["trees"] += 1
                    if tree is None:
                        rejects.add(shard, line, reason, "invalid tree record")
                        summary["rejected"] += 1
                        bar.update(1)
                        continue
                    batch.append(tree)
                    if len(batch) >= cfg.trees_per_batch:
                        flush(batch, appender)
                        batch = []
                if batch:
                    flush(batch, appender)
    finally:
        bar.close()
        rejects.close()
        for prm in prms.values():
            for close in (getattr(getattr(prm, "engine", None), "close", None), getattr(prm, "close", None)):
                if close is not None:
                    close()
    if summary["trees"] == 0:
        raise ValueError(f"{cfg.input_dir}: no trees in {', '.join(str(s) for s in shards)} (empty input)")
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["scorers"] = {kind: cfg.value_name(kind) for kind in cfg.scorers}
    if cfg.calibration_label:
        summary["calibration"] = calibration_of(out_dir, [s.name for s in shards], cfg.calibration_label)
    (out_dir / "score_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _serves(cfg: ScoreConfig) -> bool:
    """Under torchrun, ranks other than 0 serve the value-head PRM to rank 0, which runs the stage."""
    if world_size_from_env() == 1:
        return False
    if "value_head" not in cfg.scorers:
        raise ConfigError("several processes (torchrun) score with the value_head scorer only (its TP/PP/DP "
                          "layout); run the other scorers in one process")
    from sppd_megatron.training.value_prm import follow

    return follow(lambda: build_text_prm("value_head", cfg))


def calibration_of(out_dir: Path, shard_names: list[str], label: str) -> dict:
    """Every value of the scored trees in ``out_dir`` against ``label`` (Brier, AUC; see scoring.calibration)."""
    from sppd_megatron.records import read_jsonl
    from sppd_megatron.scoring.calibration import value_calibration

    trees = [t for name in shard_names if (out_dir / name).is_file() for t in read_jsonl(out_dir / name, Tree)]
    names = sorted({k for t in trees for n in t.nodes for k in n.values} - {label})
    return {"label": label, "values": {name: value_calibration(trees, name, label) for name in names}}


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config_command("sppd-megatron score", ScoreConfig, argv, __doc__, "scorers=[tree,mc]")
        if _serves(cfg):
            return 0
        # Under torchrun the serving ranks wait for rank 0's PRM from the start, work or not.
        multi = world_size_from_env() > 1
        summary = run_scoring(cfg, {"value_head": build_text_prm("value_head", cfg)} if multi else None)
    except (*USER_ERRORS, RuntimeError) as exc:  # RuntimeError: an unreachable reward server, said in one line
        return report_error("sppd-megatron score", exc)
    accuracy = summary["correct"] / summary["terminal"] if summary["terminal"] else 0.0
    print(
        f"scored {summary['scored']} trees ({summary['already_done']} already done, {summary['rejected']} rejected"
        f"{' -> ' + str(Path(cfg.output_dir) / REJECTS) if summary['rejected'] else ''}) into {cfg.output_dir} "
        f"in {summary['seconds']:.1f}s with {', '.join(summary['scorers'].values())}; "
        f"terminal nodes correct: {summary['correct']}/{summary['terminal']} ({accuracy:.1%})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
