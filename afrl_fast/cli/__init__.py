"""The command-line front ends, one module per tool: each parses its arguments, calls the library, and
turns the library's errors into one line and an exit code (2: bad input). `python -m afrl_fast.<tool>`
starts the front end of the same name:

    data         synthetic splits, TREC conversion           (afrl_fast.data, synthetic, trec)
    verify       the verifier over a Parquet of responses    (afrl_fast.verify)
    metrics      metrics of a predictions Parquet            (afrl_fast.metrics)
    evaluate     first-token evaluation of a model           (afrl_fast.evaluate, scoring)
    synthesize   traces from a chat endpoint                 (afrl_fast.synthesize)
    piar         PIAR instruction refinement                 (afrl_fast.piar)
    experiments  arms x seeds, students x seeds              (afrl_fast.experiments)
    report       figures and summaries                       (afrl_fast.report)

The training entry points stay where the README's commands run them: `torchrun afrl_fast/train.py`,
`python -m afrl_fast.distill`; the service: `python -m afrl_fast.serve`.
"""
