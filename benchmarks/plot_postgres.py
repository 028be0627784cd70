"""Plot the Kafka -> PostgreSQL benchmark (bench_e2e_postgres.py --json) for docs/benchmarks.md.

PYTHONPATH=. .venv/bin/python benchmarks/bench_e2e_postgres.py --rows 1000000 --json /tmp/e2e.json
PYTHONPATH=. .venv/bin/python benchmarks/plot_postgres.py /tmp/e2e.json docs/img/postgres_e2e.png
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = argv
    with open(src) as f:
        res = json.load(f)
    rates = res["rows_per_s"]
    labels = {
        "naive": "consume + fastavro\n+ write_row (naive)",
        "kfast": "kfast Pipeline\n+ PostgresSink",
        "ceiling": "COPY of pre-encoded\nbytes (ceiling)",
        "kfast_2conn": "kfast, PostgresSink\n(connections=2)",
        "ceiling_2conn": "ceiling,\n2 connections",
    }
    keys = [k for k in ("naive", "kfast", "ceiling", "kfast_2conn", "ceiling_2conn") if k in rates]
    colors = {"naive": "#999999", "kfast": "#2b7bba", "kfast_2conn": "#6fa8dc"}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.bar(
        [labels[k] for k in keys],
        [rates[k] / 1000 for k in keys],
        color=[colors.get(k, "#cccccc") for k in keys],
    )
    n = res["rows"]
    for i, (bar, k) in enumerate(zip(bars, keys)):
        ax.annotate(
            f"{rates[k] / 1000:,.0f}k",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
        # each round's rate as a dot: the spread is the machine's noise
        per_round = [n / rd["seconds"][k] / 1000 for rd in res.get("per_round", [])]
        ax.plot([i] * len(per_round), per_round, "k.", markersize=5)
    q = res["ratios"]
    ax.set_ylabel("rows / s (thousands)")
    ax.set_title(
        f"{n:,} order records Kafka -> PostgreSQL, median of {res.get('rounds', 1)} rounds:\n"
        f"kfast = {q['kfast_vs_naive']:.1f}x naive, {100 * q['kfast_share_of_ceiling']:.0f}% "
        f"of the ceiling (the ceiling is {q.get('ceiling_vs_naive', 0):.1f}x naive)",
        fontsize=10,
    )
    env = res.get("environment", {})
    fig.suptitle(
        f"{env.get('cpus', '?')} CPUs, Python {env.get('python', '?')}, "
        f"psycopg {env.get('psycopg', '?')}, PostgreSQL {str(env.get('postgresql', '?')).split()[0]}, "
        "Kafka 4.4.0, all on one machine",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
