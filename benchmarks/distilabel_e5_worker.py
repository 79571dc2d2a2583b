"""distilabel 1.5.3's E5 retrieval task against an OpenAI-compatible endpoint; prints one JSON line.

Runs in its own virtual environment (distilabel pins its own dependencies), so it imports nothing from
st_synth. Called by ``bench_generation.py``; concurrency is distilabel's ``input_batch_size``: it sends
one batch of requests at once and waits for the whole batch before the next.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--num-examples", type=int, required=True)
    args = parser.parse_args()

    from distilabel.models import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import GenerateTextRetrievalData

    tasks = [
        {"task": f"Retrieve documents that answer questions about topic {i}"}
        for i in range(args.num_examples)
    ]
    with Pipeline(name="e5-retrieval-bench") as pipeline:
        load = LoadDataFromDicts(data=tasks, batch_size=max(args.concurrency, 50))
        generate = GenerateTextRetrievalData(
            llm=OpenAILLM(
                model=args.model, base_url=args.base_url, api_key="none", max_retries=0, timeout=120
            ),
            input_batch_size=args.concurrency,
            language="English",
        )
        load >> generate

    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    distiset = pipeline.run(use_cache=False)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    rows = distiset["default"]["train"]
    kept = sum(1 for row in rows if row.get("user_query") and row.get("positive_document"))
    print(json.dumps({"kept": kept, "requests": len(rows), "wall_s": wall, "cpu_s": cpu}))


if __name__ == "__main__":
    main()
