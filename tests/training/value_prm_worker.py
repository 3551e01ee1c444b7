"""One process: the value-head PRM's batched, packed scores against transformers' hidden states.

    python tests/training/value_prm_worker.py CHECKPOINT HF_EXPORT_DIR TREES_JSONL

Scores every trajectory of the trees in one ``score_batch`` call (tries shared, several queries per
bin), then recomputes each state on its own: the exported model in transformers (no packing, no
Megatron) gives the final hidden state at the step's last token, and the value head's weights read
from the loaded model give tanh(w . h + b), read as (v + 1) / 2. Prints ``RESULT {json}``.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from sppd_megatron.records import read_jsonl, Tree
    from sppd_megatron.scoring.tree_scoring import leaf_queries
    from sppd_megatron.tokenization import encode
    from sppd_megatron.training.value_prm import MegatronValuePRM, ValueHeadPRMConfig

    ckpt, hf_dir, trees_path = sys.argv[1:4]
    queries = [q for tree in read_jsonl(trees_path, Tree) for _, q in leaf_queries(tree)]
    prm = MegatronValuePRM(ValueHeadPRMConfig(path=ckpt, pack_length=600))
    scores = prm.score_batch(queries)
    weight = prm.model.value_head.linear.weight.detach().double()
    bias = prm.model.value_head.linear.bias.detach().double()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    diffs = []
    with torch.no_grad():
        for q, row in zip(queries, scores):
            for t in range(len(q.steps)):
                ids = encode(prm.tokenizer, q.prompt + "".join(q.steps[: t + 1]))
                hidden = hf.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].double()
                expected = (torch.tanh(hidden @ weight[0] + bias[0]).item() + 1) / 2
                diffs.append(abs(expected - row[t]))
    prm.close()
    print("RESULT " + json.dumps({"states": len(diffs), "queries": len(queries), "max_abs_diff": max(diffs),
                                  "values": scores}))


if __name__ == "__main__":
    main()
