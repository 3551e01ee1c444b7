"""Small trees written by hand, for tests, docs and debugging the pair builders.

    tree = handmade_tree("q1", "What is 2+3?", "5", [
        step("2+3=5.\\n", v=0.9, children=[step("\\\\boxed{5}", v=1.0)]),
        step("2+3=6.\\n", v=0.1, children=[step("\\\\boxed{6}", v=0.0)]),
    ])

A step without children is terminal unless ``terminal=False``; ``correct`` defaults to whether
its state states the gold answer (graded with the project grader); ``v`` is stored as
``values[value_name]``.
"""

from __future__ import annotations

from typing import Any

from sppd_megatron.records import PromptTemplate, Tree, TreeNode


def step(text: str, v: float | None = None, children: list[dict] | None = None,
         terminal: bool | None = None, correct: bool | None = None) -> dict[str, Any]:
    """One step of a hand-written tree (see the module docstring)."""
    return {"text": text, "v": v, "children": children or [], "terminal": terminal, "correct": correct}


def handmade_tree(tree_id: str, question: str, gold_answer: str, steps: list[dict],
                  value_name: str = "prm", prompt: str | None = None, grade_leaves: bool = True) -> Tree:
    """A valid ``records.Tree`` from nested :func:`step` dicts (node ids in depth-first order)."""
    from sppd_megatron.scoring.grading import extract_answer, grade

    prompt = prompt if prompt is not None else f"Question: {question}\nAnswer:\n"
    nodes = [TreeNode(node_id=0, parent=None, depth=0, text="", token_ids=[ord(c) for c in prompt])]

    def add(spec: dict, parent: int, state: str) -> None:
        node_id = len(nodes)
        text = spec["text"]
        terminal = spec["terminal"] if spec["terminal"] is not None else not spec["children"]
        node = TreeNode(node_id=node_id, parent=parent, depth=nodes[parent].depth + 1, text=text,
                        token_ids=[ord(c) for c in text], terminal=terminal)
        if spec["v"] is not None:
            node.values[value_name] = float(spec["v"])
        if terminal:
            node.finish_reason = "answer"
            node.answer = extract_answer(state + text)
            node.correct = spec["correct"]
            if node.correct is None and grade_leaves:
                node.correct = grade(state + text, gold_answer)
        nodes.append(node)
        for child in spec["children"]:
            add(child, node_id, state + text)

    for spec in steps:
        add(spec, 0, "")
    tree = Tree(id=tree_id, question=question, gold_answer=gold_answer, source="handmade",
                template=PromptTemplate(), prompt=prompt, policy="handmade", sampling={}, nodes=nodes)
    tree.validate()
    return tree
